//! VirtualService tcp and tls routes through the node proxy: connections (not requests) split
//! by weight to DestinationRule subsets, routed by the caller's labels, and by the server name
//! of a real TLS ClientHello on a port declared `https` (TLS passed through, never terminated).

use std::time::Duration;

use nodemesh_tests::{
    Registration, SimNode,
    mesh::{eventually, hello_counts, tls_hello_counts, write_config as write},
};

const DB: &str = r#"apiVersion: v1
kind: Service
metadata: {name: db, namespace: shop}
spec:
  clusterIP: 10.96.0.40
  selector: {app: db}
  ports: [{name: db, port: 7000}, {name: https, port: 443, targetPort: 7443}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: db, namespace: shop}
spec:
  host: db
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
"#;

const ROUTES: &str = r#"apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: db, namespace: shop}
spec:
  hosts: [db]
  tls:
  - match: [{port: 443, sniHosts: [v2.db.example]}]
    route: [{destination: {host: db, subset: v2}}]
  - match: [{port: 443, sniHosts: ["*.db.example"]}]
    route: [{destination: {host: db, subset: v1}}]
  tcp:
  - match: [{sourceLabels: {track: canary}}]
    route: [{destination: {host: db, subset: v2}}]
  - match: [{port: 7000}]
    route:
    - {destination: {host: db, subset: v1}, weight: 80}
    - {destination: {host: db, subset: v2}, weight: 20}
"#;

const DB_TCP: &str = "10.96.0.40:7000";
const DB_TLS: &str = "10.96.0.40:443";

fn count(counts: &std::collections::BTreeMap<String, usize>, server: &str) -> usize {
    counts.get(server).copied().unwrap_or(0)
}

#[test]
fn tcp_and_tls_routes_split_connections_by_weight_source_and_server_name() {
    let (mut node, config) = SimNode::with_control_plane(&[("db.yaml", DB)]).unwrap();
    let client = node.add_pod("client", "shop").unwrap();
    node.register(&client, &Registration::meshed()).unwrap();
    let canary = node.add_pod("canary", "shop").unwrap();
    node.register(&canary, &Registration::labelled(&[("track", "canary")])).unwrap();
    for version in ["v1", "v2"] {
        let pod = node.add_pod(version, "shop").unwrap();
        node.register(&pod, &Registration::labelled(&[("app", "db"), ("version", version)])).unwrap();
        node.serve(&pod, &[pod.addr(7000), pod.addr(7443)]).unwrap();
    }
    eventually("db answers from both versions", Duration::from_secs(15), || {
        nodemesh_tests::mesh::answered_by(&node, &client, DB_TCP, 10).is_ok_and(|c| c.len() == 2)
    });

    node.apply_and_wait(|| write(&config, "db-routes.yaml", ROUTES)).unwrap();

    // 80/20 per connection over 500 connections, opaque bytes on an undeclared port.
    let counts = hello_counts(&node, &client, DB_TCP, 500);
    let v1 = count(&counts, "v1");
    eprintln!("80/20 over 500 connections: {counts:?}");
    assert!(
        (385..=415).contains(&v1) && v1 + count(&counts, "v2") == 500,
        "80/20 within 3 points: {counts:?}"
    );

    // A caller labelled track=canary: every connection to v2, on either port.
    assert_eq!(count(&hello_counts(&node, &canary, DB_TCP, 40), "v2"), 40);

    // TLS on a port declared https: the ClientHello's server name picks the route.
    assert_eq!(count(&tls_hello_counts(&node, &client, DB_TLS, 20, "v2.db.example"), "v2"), 20);
    assert_eq!(count(&tls_hello_counts(&node, &client, DB_TLS, 20, "shard-7.db.example"), "v1"), 20);
    // A name no tls route takes falls through to the tcp routes: the canary's goes to v2,
    // anyone else's to the port's own cluster (both versions).
    assert_eq!(count(&tls_hello_counts(&node, &canary, DB_TLS, 20, "db.other.example"), "v2"), 20);
    let other = tls_hello_counts(&node, &client, DB_TLS, 20, "db.other.example");
    assert!(count(&other, "v1") > 0 && count(&other, "v2") > 0, "no route: round robin: {other:?}");

    // Routes withdrawn: connections to 7000 round-robin again.
    node.apply_and_wait(|| std::fs::remove_file(config.join("db-routes.yaml")).unwrap()).unwrap();
    let counts = hello_counts(&node, &client, DB_TCP, 100);
    assert_eq!((count(&counts, "v1"), count(&counts, "v2")), (50, 50), "{counts:?}");
}
