//! Inbound capture and PeerAuthentication on a simulated two-node cluster: plaintext reaching a
//! meshed pod without the tunnel is captured by the pod's sk_lookup program and meets its
//! policy — PERMISSIVE delivers it (as the real client), STRICT refuses it (a reset, counted),
//! port-level modes refine a workload's mode — while meshed traffic (the tunnel across nodes,
//! delivery on one node) keeps flowing. Dropping the namespace's label returns the pod to
//! plain networking without restarting it.

use std::time::Duration;

use nodemesh_tests::{
    Pod, Registration, SimCluster, SimNode,
    mesh::{answered, eventually},
};
use serde_json::Value;

const STRICT_NAMESPACE: &str = "
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: shop}
spec: {mtls: {mode: STRICT}}
";

const WEB_PORT_9090_PERMISSIVE: &str = "
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: web, namespace: shop}
spec:
  selector: {matchLabels: {app: web}}
  portLevelMtls: {'9090': {mode: PERMISSIVE}}
";

/// The HELLO reply of one connection from `client` to `to`, or why there was none.
fn hello(node: &SimNode, client: &Pod, to: &str) -> Result<Value, String> {
    reply(node.testapp(client, &["client", "--to", to]).map_err(|e| e.to_string())?)
}

/// The server's HELLO reply in an `nm-testapp client` report, or the report if none came.
fn reply(report: Value) -> Result<Value, String> {
    let reply = &report["connections"][0]["reply"];
    if reply["server"].is_string() { Ok(reply.clone()) } else { Err(report.to_string()) }
}

/// The HELLO reply of one connection to `to` from `node`'s own network namespace (the
/// kubelet's place), or why there was none.
fn from_node(node: &SimNode, to: &str) -> Result<Value, String> {
    let app = nodemesh_tests::bin("nm-testapp").map_err(|e| e.to_string())?;
    let args = ["client", "--to", to].map(String::from);
    let out = node.run_in_node(&app, &args, &[], Duration::from_secs(30)).map_err(|e| format!("{e:#}"))?;
    reply(serde_json::from_str(out.trim()).map_err(|e| format!("{e}: {out}"))?)
}

fn inbound_opened(node: &SimNode, workload: &str) -> f64 {
    node.metrics().unwrap().sum(
        "istio_tcp_connections_opened_total",
        &[("reporter", "destination"), ("destination_workload", workload), ("source_workload", "unknown")],
    )
}

fn denied(node: &SimNode) -> f64 {
    node.metrics().unwrap().sum("nodemesh_inbound_denied_total", &[("reason", "mtls_required")])
}

#[test]
fn plaintext_meets_peer_authentication_and_meshed_traffic_does_not() {
    let mut cluster = SimCluster::new(2).unwrap();
    cluster.start(&[], &[]).unwrap();
    let node0 = &mut cluster.nodes[0];
    let outsider = node0.add_pod("outsider", "legacy").unwrap();
    node0.register(&outsider, &Registration::unmeshed_namespace()).unwrap();
    let client = node0.add_pod("client", "shop").unwrap();
    node0.register(&client, &Registration::meshed()).unwrap();
    let node1 = &mut cluster.nodes[1];
    let web = node1.add_pod("web", "shop").unwrap();
    let web_registration = Registration::labelled(&[("app", "web")]);
    node1.register(&web, &web_registration).unwrap();
    let web_pid = node1.serve(&web, &[web.addr(8080), web.addr(9090)]).unwrap();
    let neighbour = node1.add_pod("neighbour", "shop").unwrap();
    node1.register(&neighbour, &Registration::meshed()).unwrap();
    let (web_8080, web_9090) = (web.addr(8080).to_string(), web.addr(9090).to_string());
    let (node0, node1) = (&cluster.nodes[0], &cluster.nodes[1]);

    // PERMISSIVE (no policy): the outsider's plaintext is captured at web and delivered as
    // the outsider itself.
    let reply = hello(node0, &outsider, &web_8080).unwrap();
    assert_eq!(
        reply["peer"].as_str().unwrap().split(':').next(),
        Some(outsider.ip.to_string().as_str()),
        "{reply}"
    );
    eventually("node 1 counts the captured plaintext", Duration::from_secs(5), || {
        inbound_opened(node1, "web") >= 1.0
    });

    // STRICT for the namespace: plaintext is refused, meshed traffic is not.
    cluster.write_config("strict.yaml", STRICT_NAMESPACE);
    eventually("STRICT refuses the outsider", Duration::from_secs(15), || {
        hello(node0, &outsider, &web_8080).is_err()
    });
    assert!(denied(node1) >= 1.0, "the refusal was not counted");
    assert!(node1.log().contains("plaintext connection refused: PeerAuthentication is STRICT"));
    assert!(answered(node0, &client, &web_8080), "a meshed client on another node (the tunnel) was refused");
    assert!(answered(node1, &neighbour, &web_8080), "a meshed client on web's node was refused");
    // The node itself — where the kubelet probes from — reaches the pod directly, as itself;
    // another node's host is not exempt.
    let probe =
        from_node(node1, &web_8080).unwrap_or_else(|e| panic!("a probe from web's node was refused: {e}"));
    assert_eq!(
        probe["peer"].as_str().unwrap().split(':').next(),
        Some(node1.pod_ip4(1).to_string().as_str())
    );
    assert!(from_node(node0, &web_8080).is_err(), "another node's host got past STRICT");

    // A workload policy opens one port to plaintext again.
    cluster.write_config("web.yaml", WEB_PORT_9090_PERMISSIVE);
    eventually("port 9090 is PERMISSIVE", Duration::from_secs(15), || {
        hello(node0, &outsider, &web_9090).is_ok()
    });
    assert!(hello(node0, &outsider, &web_8080).is_err(), "port 8080 must stay STRICT");

    // Without the policies, PERMISSIVE again.
    cluster.remove_config("strict.yaml").unwrap();
    cluster.remove_config("web.yaml").unwrap();
    eventually("PERMISSIVE again", Duration::from_secs(15), || hello(node0, &outsider, &web_8080).is_ok());

    // Dropping the namespace's label: web is plain again (no capture, no proxy), and the same
    // process keeps serving.
    let captured_before = inbound_opened(&cluster.nodes[1], "web");
    let node1 = &mut cluster.nodes[1];
    let status = node1.register(&web, &Registration::unmeshed_namespace()).unwrap();
    assert_eq!(status["capture"], Value::Null, "{status}");
    let reply = hello(&cluster.nodes[0], &outsider, &web_8080).unwrap();
    assert_eq!(reply["peer"].as_str().unwrap().split(':').next(), Some(outsider.ip.to_string().as_str()));
    assert_eq!(inbound_opened(&cluster.nodes[1], "web"), captured_before, "web's inbound is still captured");
    assert!(std::path::Path::new(&format!("/proc/{web_pid}")).exists(), "web was restarted");
}
