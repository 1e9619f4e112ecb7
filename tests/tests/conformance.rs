//! Conformance with real xDS clients: the routing config mesh-control serves for a service is
//! consumed by a real Envoy 1.40 (state-of-the-world ADS: RDS by name, CDS wildcard, EDS) and by
//! gRPC's proxyless client (grpcio: LDS → RDS → CDS → EDS, all by name), and each routes a 90/10
//! split and a header match the same way mesh-node does. A route scoped to a source (a sandbox's
//! labels) comes first in each VirtualService: clients that cannot see their own labels must
//! skip it rather than send everyone to the sandbox.

use std::{fs, net::SocketAddr, time::Duration};

use nodemesh_tests::{
    Pod, Registration, SimNode, envoy, grpc_xds,
    mesh::{eventually, http_get as get, served},
    reviews::{self, VIP},
};

const ROUTE: &str = "reviews.shop.svc.cluster.local:80";
const ENVOY_NODE: &str = "envoy-conformance";

/// The routes both conformance tests give `host`: a sandbox route first (that clients other
/// than mesh-node must skip), `end-user: jason` → v2, then 90/10 between v1 and v3.
fn split_routes(host: &str) -> String {
    r#"apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: HOST, namespace: shop}
spec:
  hosts: [HOST]
  http:
  - match: [{sourceLabels: {app: sandbox}}]
    route: [{destination: {host: HOST, subset: v3}}]
  - match: [{headers: {end-user: {exact: jason}}}]
    route: [{destination: {host: HOST, subset: v2}}]
  - route:
    - {destination: {host: HOST, subset: v1}, weight: 90}
    - {destination: {host: HOST, subset: v3}, weight: 10}
"#
    .replace("HOST", host)
}

#[test]
fn envoy_fed_by_mesh_control_routes_a_split_and_a_header_match_like_mesh_node() {
    let (mut node, _) = SimNode::with_control_plane(&[
        ("reviews.yaml", reviews::SERVICE_AND_SUBSETS),
        ("reviews-routes.yaml", &split_routes("reviews")),
        ("chaos.yaml", reviews::CHAOS_LAYER),
    ])
    .unwrap();
    let meshed = node.add_pod("meshed", "shop").unwrap();
    node.register(&meshed, &Registration::meshed()).unwrap();
    let plain = node.add_pod("plain", "shop").unwrap();
    node.register(&plain, &Registration::opted_out()).unwrap();
    reviews::serve_versions(&mut node).unwrap();
    let listen = SocketAddr::from((node.pod_ip4(1), 15081));
    envoy::start(&mut node, &envoy::ads_bootstrap(ENVOY_NODE, listen, ROUTE, 15098), listen, 11).unwrap();

    let via_envoy = listen.to_string();
    let via_mesh = format!("{VIP}:80");
    let paths: [(&str, &Pod, &str); 2] = [("mesh-node", &meshed, &via_mesh), ("Envoy", &plain, &via_envoy)];
    for (name, client, to) in paths {
        eventually(&format!("{name} routes jason to v2"), Duration::from_secs(20), || {
            node.testapp(
                client,
                &["http-client", "--to", to, "--requests", "10", "--header", "end-user: jason"],
            )
            .is_ok_and(|r| served(&r, "v2") == 10)
        });
    }
    let status = node.control_status().unwrap();
    let envoy_line = status.lines().find(|l| l.starts_with(ENVOY_NODE)).unwrap_or_else(|| panic!("{status}"));
    assert!(envoy_line.contains(" yes ") && envoy_line.contains("sotw"), "{status}");
    assert!(envoy_line.trim_end().ends_with('-'), "Envoy rejected config: {status}");

    for (name, client, to) in paths {
        // 2,000 requests: Envoy picks weighted clusters at random, so ±3 points is 4.5 sigma.
        let r = get(&node, client, to, &["--requests", "2000"]);
        let (v1, v3) = (served(&r, "v1"), served(&r, "v3"));
        eprintln!("{name}: 90/10 over 2000 requests gave v1 {v1}, v3 {v3}");
        assert!(
            (1740..=1860).contains(&v1) && (140..=260).contains(&v3),
            "{name}: 90/10 within 3 points: {r}"
        );
        assert_eq!(served(&r, "v2"), 0, "{name}: only jason goes to v2: {r}");
        let r = get(&node, client, to, &["--requests", "100", "--header", "end-user: jason"]);
        assert_eq!(served(&r, "v2"), 100, "{name}: jason always to v2: {r}");
        for user in ["end-user: jason", "end-user: someone"] {
            let r =
                get(&node, client, to, &["--requests", "20", "--header", "x-chaos: abort", "--header", user]);
            assert_eq!(r["statuses"]["418"], 20, "{name}: the fault layer over `{user}`'s route: {r}");
        }
    }
}

const WHO: &str = r#"apiVersion: v1
kind: Service
metadata: {name: who, namespace: shop}
spec:
  clusterIP: 10.96.0.30
  selector: {app: who}
  ports: [{name: grpc, port: 50051}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: who, namespace: shop}
spec:
  host: who
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
  - {name: v3, labels: {version: v3}}
"#;

const LISTENER: &str = "who.shop.svc.cluster.local:50051";
const GRPC_NODE: &str = "grpc-proxyless-conformance";

#[test]
fn grpc_proxyless_client_fed_by_mesh_control_routes_a_split_and_a_header_match_like_mesh_node() {
    let (mut node, config) =
        SimNode::with_control_plane(&[("who.yaml", WHO), ("who-routes.yaml", &split_routes("who"))]).unwrap();
    let meshed = node.add_pod("meshed", "shop").unwrap();
    node.register(&meshed, &Registration::meshed()).unwrap();
    for version in ["v1", "v2", "v3"] {
        let pod = node.add_pod(version, "shop").unwrap();
        node.register(&pod, &Registration::labelled(&[("app", "who"), ("version", version)])).unwrap();
        grpc_xds::serve(&mut node, &pod, 50051, version).unwrap();
    }
    let bootstrap = grpc_xds::bootstrap(GRPC_NODE, "127.0.0.1:15010".parse().unwrap());
    let proxyless = |requests, metadata: &[&str]| {
        grpc_xds::proxyless_calls(&node, &bootstrap, LISTENER, requests, metadata)
    };
    let via_mesh = |requests, metadata: &[&str]| {
        grpc_xds::calls_from(&node, &meshed, "10.96.0.30:50051", requests, metadata)
    };
    type Calls<'a> = &'a dyn Fn(u32, &[&str]) -> anyhow::Result<serde_json::Value>;
    let clients: [(&str, Calls<'_>); 2] = [("mesh-node", &via_mesh), ("gRPC proxyless", &proxyless)];
    for (name, calls) in clients {
        eventually(&format!("{name} routes jason to v2"), Duration::from_secs(30), || {
            calls(10, &["end-user=jason"]).is_ok_and(|r| served(&r, "v2") == 10)
        });
    }
    let status = node.control_status().unwrap();
    let grpc_line = status.lines().find(|l| l.starts_with(GRPC_NODE)).unwrap_or_else(|| panic!("{status}"));
    // Each client run is its own process, so the node shows as disconnected by now.
    assert!(grpc_line.contains("sotw"), "{status}");
    assert!(grpc_line.trim_end().ends_with('-'), "the gRPC client rejected config: {status}");

    for (name, calls) in clients {
        // gRPC, like Envoy, picks weighted clusters at random: ±3 points over 2,000 is 4.5 sigma.
        let r = calls(2000, &[]).unwrap();
        let (v1, v3) = (served(&r, "v1"), served(&r, "v3"));
        eprintln!("{name}: 90/10 over 2000 calls gave v1 {v1}, v3 {v3}");
        assert!(
            (1740..=1860).contains(&v1) && (140..=260).contains(&v3),
            "{name}: 90/10 within 3 points: {r}"
        );
        assert_eq!(served(&r, "v2"), 0, "{name}: only jason goes to v2: {r}");
        let r = calls(100, &["end-user=jason"]).unwrap();
        assert_eq!(served(&r, "v2"), 100, "{name}: jason always to v2: {r}");
    }

    // Without a VirtualService the listener routes inline to the whole service: every version.
    node.apply_and_wait(|| fs::remove_file(config.join("who-routes.yaml")).unwrap()).unwrap();
    for (name, calls) in clients {
        eventually(&format!("{name} balances over all versions"), Duration::from_secs(30), || {
            calls(300, &[]).is_ok_and(|r| ["v1", "v2", "v3"].iter().all(|v| served(&r, v) >= 60))
        });
    }
}
