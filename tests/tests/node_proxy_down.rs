//! While no mesh-node runs on a node (it crashed, or was SIGKILLed), capture stays pinned and
//! the policy decides per workload: a STRICT pod neither reaches anything nor is reached in
//! plaintext (connects both ways refused at once), a PERMISSIVE one connects directly;
//! MeshConfig `nodeProxyDown: AllClosed` makes every meshed pod fail closed.

use std::{
    net::{SocketAddr, TcpStream},
    time::Duration,
};

use nodemesh_tests::{
    Pod, Registration, SimNode,
    mesh::{eventually, write_config},
    netns,
};
use serde_json::Value;

const PORT: u16 = 8080;

const SECURE_STRICT: &str = "
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: secure}
spec: {mtls: {mode: STRICT}}
";

const ALL_CLOSED: &str = "apiVersion: nodemesh.io/v1alpha1\nkind: MeshConfig\nmetadata: {name: mesh}\nspec: {nodeProxyDown: AllClosed}\n";

fn fail_closed(node: &SimNode, pod: &str) -> Option<bool> {
    let dump = node.config_dump().ok()?;
    let workloads = dump["workloads"].as_array()?.clone();
    let w = workloads.into_iter().find(|w| w["name"] == pod)?;
    w["capture"]["fail_closed"].as_bool()
}

/// `client` → `to`: the HELLO reply's view of the connection, or the error.
fn hello(node: &SimNode, client: &Pod, to: SocketAddr) -> Value {
    node.testapp(client, &["client", "--to", &to.to_string()]).unwrap()
}

/// Whether a plain TCP connect from `from`'s netns (outside any meshed cgroup) to `to`
/// completes within 2 s.
fn connects_from(from: &Pod, to: SocketAddr) -> Result<(), std::io::ErrorKind> {
    netns::run_in(&from.netns, move || Ok(TcpStream::connect_timeout(&to, Duration::from_secs(2)).map(drop)))
        .unwrap()
        .map_err(|e| e.kind())
}

#[test]
fn with_no_mesh_node_strict_pods_are_refused_both_ways_while_permissive_ones_go_direct() {
    let (mut node, config) = SimNode::with_control_plane(&[("strict.yaml", SECURE_STRICT)]).unwrap();
    let guarded = node.add_pod("guarded", "secure").unwrap();
    let open = node.add_pod("open", "shop").unwrap();
    let outsider = node.add_pod("outsider", "legacy").unwrap();
    let target = node.add_pod("target", "legacy").unwrap();
    node.register(&guarded, &Registration::meshed()).unwrap();
    node.register(&open, &Registration::meshed()).unwrap();
    node.register(&outsider, &Registration::unmeshed_namespace()).unwrap();
    node.register(&target, &Registration::unmeshed_namespace()).unwrap();
    for pod in [&guarded, &open, &target] {
        node.serve(pod, &[pod.addr(PORT)]).unwrap();
    }
    eventually("the control plane's marks reach capture", Duration::from_secs(10), || {
        fail_closed(&node, "guarded") == Some(true) && fail_closed(&node, "open") == Some(false)
    });
    // Running: both go through mesh-node (the server sees the pod, the client a rewritten
    // connection: its local address is not what the server saw as its peer).
    let through = hello(&node, &guarded, target.addr(PORT));
    let c = &through["connections"][0];
    assert_ne!(c["reply"]["peer"], c["local"], "captured while mesh-node runs: {through}");

    node.kill_mesh_node().unwrap();

    // PERMISSIVE: directly, both ways.
    let direct = hello(&node, &open, target.addr(PORT));
    let c = &direct["connections"][0];
    assert_eq!(c["reply"]["server"], "target", "{direct}");
    assert_eq!(c["reply"]["peer"], c["local"], "a PERMISSIVE pod connects directly meanwhile: {direct}");
    assert_eq!(connects_from(&outsider, open.addr(PORT)), Ok(()));
    // STRICT: its connects are refused at once, and so are connects to it (its sk_lookup
    // program drops the SYN: the kernel answers as if nothing listened), although its
    // application listens.
    let refused = hello(&node, &guarded, target.addr(PORT));
    assert_eq!(refused["error"], "connection refused", "{refused}");
    assert_eq!(connects_from(&outsider, guarded.addr(PORT)), Err(std::io::ErrorKind::ConnectionRefused));

    // Back: the STRICT pod is served through mesh-node again, nobody re-registered it.
    node.restart_mesh_node().unwrap();
    eventually("guarded captured again", Duration::from_secs(10), || {
        let r = hello(&node, &guarded, target.addr(PORT));
        let c = &r["connections"][0];
        c["reply"]["server"] == "target" && c["reply"]["peer"] != c["local"]
    });

    // The mesh-wide choice: every meshed pod fails closed.
    write_config(&config, "mesh.yaml", ALL_CLOSED);
    eventually("AllClosed marks the PERMISSIVE pod too", Duration::from_secs(10), || {
        fail_closed(&node, "open") == Some(true)
    });
    node.kill_mesh_node().unwrap();
    let refused = hello(&node, &open, target.addr(PORT));
    assert_eq!(refused["error"], "connection refused", "{refused}");
    assert_eq!(connects_from(&outsider, open.addr(PORT)), Err(std::io::ErrorKind::ConnectionRefused));
}
