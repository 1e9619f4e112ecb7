//! AuthorizationPolicy on a simulated two-node cluster, enforced where traffic arrives: a
//! matrix of callers (by principal, namespace, from another node through the tunnel, from the
//! same node, in plaintext from outside the mesh) × requests (method, path) against ALLOW and
//! DENY policies. A denied request is answered 403 and counted with the policy's name; a
//! denied TCP connection is reset. Allowed requests reach the application as their client.

use std::time::Duration;

use nodemesh_tests::{
    Pod, Registration, SimCluster, SimNode,
    mesh::{answered, eventually, labelled},
};
use serde_json::Value;

const WEB_POLICIES: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: web-allow, namespace: shop}
spec:
  selector: {matchLabels: {app: web}}
  action: ALLOW
  rules:
  - from: [{source: {principals: [cluster.local/ns/shop/sa/reader]}}]
    to: [{operation: {methods: [GET], paths: ["/books/*"]}}]
  - from: [{source: {principals: [cluster.local/ns/shop/sa/writer]}}]
    to: [{operation: {methods: [GET, POST]}}]
  - from: [{source: {namespaces: [other]}}]
    to: [{operation: {paths: ["/public"]}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: web-deny-admin, namespace: shop}
spec:
  selector: {matchLabels: {app: web}}
  action: DENY
  rules:
  - to: [{operation: {paths: ["/admin*"]}}]
"#;

const DB_POLICY: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: db-shop-only, namespace: shop}
spec:
  selector: {matchLabels: {app: db}}
  rules:
  - from: [{source: {namespaces: [shop], notPrincipals: [cluster.local/ns/shop/sa/writer]}}]
"#;

/// The status of one request from `client`, and the client address the app saw.
fn request(node: &SimNode, client: &Pod, to: &str, method: &str, path: &str) -> (u64, Option<String>) {
    let r = node
        .testapp(client, &["http-client", "--to", to, "--method", method, "--path", path])
        .unwrap_or_else(|e| panic!("{e:#}"));
    let statuses =
        r["statuses"].as_object().unwrap_or_else(|| panic!("{method} {path} from {}: {r}", client.name));
    let status = statuses.keys().next().and_then(|s| s.parse().ok()).unwrap_or(0);
    let peer = r["first"]["peer"].as_str().and_then(|p| p.rsplit_once(':')).map(|(ip, _)| ip.to_string());
    (status, peer)
}

fn denied(node: &SimNode, policy: &str) -> f64 {
    node.metrics().unwrap().sum("nodemesh_inbound_denied_total", &[("policy", policy)])
}

#[test]
fn authorization_policies_allow_and_deny_by_principal_namespace_method_and_path() {
    let mut cluster = SimCluster::new(2).unwrap();
    cluster.write_config("web-policies.yaml", WEB_POLICIES);
    cluster.write_config("db-policy.yaml", DB_POLICY);
    cluster.start(&[], &[]).unwrap();
    let node0 = &mut cluster.nodes[0];
    let reader = node0.add_pod("reader", "shop").unwrap();
    node0.register(&reader, &Registration::meshed().as_account("reader")).unwrap();
    let writer = node0.add_pod("writer", "shop").unwrap();
    node0.register(&writer, &Registration::meshed().as_account("writer")).unwrap();
    let stranger = node0.add_pod("stranger", "other").unwrap();
    node0.register(&stranger, &Registration::meshed()).unwrap();
    let outsider = node0.add_pod("outsider", "legacy").unwrap();
    node0.register(&outsider, &Registration::unmeshed_namespace()).unwrap();
    let node1 = &mut cluster.nodes[1];
    let web = node1.add_pod("web", "shop").unwrap();
    node1.register(&web, &labelled("web").as_account("web")).unwrap();
    node1.serve_http(&web, &[web.addr(8080)]).unwrap();
    let db = node1.add_pod("db", "shop").unwrap();
    node1.register(&db, &labelled("db").as_account("db")).unwrap();
    node1.serve(&db, &[db.addr(5432)]).unwrap();
    let neighbour = node1.add_pod("neighbour", "shop").unwrap();
    node1.register(&neighbour, &Registration::meshed().as_account("neighbour")).unwrap();
    let (node0, node1) = (&cluster.nodes[0], &cluster.nodes[1]);
    let web_addr = web.addr(8080).to_string();
    eventually("web's policies reached node 1", Duration::from_secs(15), || {
        request(node0, &reader, &web_addr, "GET", "/books/1").0 == 200
    });

    // (who, node, method, path, expected status)
    let matrix: [(&Pod, &SimNode, &str, &str, u64); 11] = [
        (&reader, node0, "GET", "/books/1", 200),
        (&reader, node0, "POST", "/books/1", 403),
        (&reader, node0, "GET", "/orders", 403),
        (&writer, node0, "POST", "/books/1", 200),
        (&writer, node0, "GET", "/admin/users", 403),
        (&stranger, node0, "GET", "/public", 200),
        (&stranger, node0, "GET", "/books/1", 403),
        // Plaintext from outside the mesh has no principal or namespace to be allowed by.
        (&outsider, node0, "GET", "/public", 403),
        (&outsider, node0, "GET", "/books/1", 403),
        // Same node: judged the same, by the identity mesh-node knows.
        (&neighbour, node1, "GET", "/books/1", 403),
        (&neighbour, node1, "GET", "/admin", 403),
    ];
    let mut wrong = Vec::new();
    for (who, node, method, path, expected) in matrix {
        let (status, peer) = request(node, who, &web_addr, method, path);
        if status != expected {
            wrong.push(format!("{} {method} {path}: {status}, expected {expected}", who.name));
        }
        if status == 200 && peer.as_deref() != Some(who.ip.to_string().as_str()) {
            wrong.push(format!("{} {method} {path}: the app saw {peer:?}, not {}", who.name, who.ip));
        }
    }
    assert!(wrong.is_empty(), "{wrong:#?}\n{}", node1.log_tail());

    // An upgrade (what WebSockets use) is judged as the request that asks for it, then the
    // connection becomes a tunnel to the application.
    let upgrade = |who: &Pod, path: &str| -> Value {
        node0
            .testapp(who, &["http-client", "--to", &web_addr, "--path", path, "--upgrade"])
            .unwrap_or_else(|e| panic!("upgrade {path} from {}: {e:#}\n{}", who.name, node1.log_tail()))
    };
    let r = upgrade(&reader, "/books/live");
    assert_eq!((r["status"].as_u64(), r["echoed"].as_bool()), (Some(101), Some(true)), "{r}");
    let r = upgrade(&stranger, "/books/live");
    assert_eq!(r["status"], 403, "an upgrade is not a way around the policy: {r}");
    assert!(denied(node1, "shop/web-deny-admin") >= 2.0, "DENY policy denials not counted by name");
    assert!(node1.log().contains("request denied by AuthorizationPolicy"));

    // L4: db allows shop callers except the writer; a denied connection is reset.
    let db_addr = db.addr(5432).to_string();
    assert!(answered(node0, &reader, &db_addr), "reader (shop) to db");
    assert!(!answered(node0, &writer, &db_addr), "writer is excluded by notPrincipals");
    assert!(!answered(node0, &stranger, &db_addr), "namespace other is not allowed");
    assert!(!answered(node0, &outsider, &db_addr), "plaintext has no namespace");
    assert!(answered(node1, &neighbour, &db_addr), "same-node shop caller");
    assert!(denied(node1, "") >= 3.0, "connection denials not counted");
    let hello: Value = node0.testapp(&reader, &["client", "--to", &db_addr]).unwrap();
    let peer = hello["connections"][0]["reply"]["peer"].as_str().unwrap_or_default().to_string();
    assert!(peer.starts_with(&format!("{}:", reader.ip)), "db saw {peer}, not the reader");
}
