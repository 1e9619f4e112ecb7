//! The `reviews` service of the routing and conformance tests: a Service at [`VIP`] (port 80
//! → 9080, port name declaring no protocol), a DestinationRule with subsets v1–v3 by the
//! `version` label, and one HTTP server pod per version, named after it.

use crate::{Pod, Registration, SimNode};

pub const VIP: &str = "10.96.0.20";

pub const SERVICE_AND_SUBSETS: &str = r#"apiVersion: v1
kind: Service
metadata: {name: reviews, namespace: shop}
spec:
  clusterIP: 10.96.0.20
  selector: {app: reviews}
  ports: [{name: web, port: 80, targetPort: 9080}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews, namespace: shop}
spec:
  host: reviews
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
  - {name: v3, labels: {version: v3}}
"#;

/// Starts the v1, v2 and v3 pods (HTTP servers on 9080) in namespace `shop`.
pub fn serve_versions(node: &mut SimNode) -> anyhow::Result<Vec<Pod>> {
    let mut versions = Vec::new();
    for version in ["v1", "v2", "v3"] {
        let pod = node.add_pod(version, "shop")?;
        node.register(&pod, &Registration::labelled(&[("app", "reviews"), ("version", version)]))?;
        node.serve_http(&pod, &[pod.addr(9080)])?;
        versions.push(pod);
    }
    Ok(versions)
}

/// A chaos tool's VirtualService for reviews, in its own namespace: a fault layer (a route with
/// only `match` and `fault`) aborting with 418 every request that carries `x-chaos: abort`,
/// whichever of the owner's routes takes it.
pub const CHAOS_LAYER: &str = r#"apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: chaos, namespace: chaos}
spec:
  hosts: [reviews.shop.svc.cluster.local]
  http:
  - match: [{headers: {x-chaos: {exact: abort}}}]
    fault: {abort: {httpStatus: 418, percentage: {value: 100}}}
"#;
