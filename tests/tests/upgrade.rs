//! mesh-node's lifecycle under load, on a simulated two-node cluster with mTLS between the
//! nodes: replacing mesh-node by a new process (an upgrade) fails no request and resets no
//! connection; the old process drains; a SIGTERM lets requests in flight finish.

use std::time::Duration;

use nodemesh_tests::{
    Background, Pod, SimNode, bin,
    lifecycle::{HTTP_PORT, VIP, steady_args, web_cluster},
    link_capture::{LinkCapture, contains},
    mesh::eventually,
};
use serde_json::Value;

/// A request from `client` to web that takes `ms` to answer, running in the background.
fn slow_request(node: &SimNode, client: &Pod, ms: u64) -> Background {
    let path = format!("/delay/{ms}");
    let args = ["http-client", "--to", &format!("{VIP}:{HTTP_PORT}"), "--path", &path].map(String::from);
    node.start_in(client, &bin("nm-testapp").unwrap(), &args).unwrap()
}

fn assert_no_failures(load: &Value) {
    for kind in ["keepalive", "fresh", "streams", "fresh_tcp"] {
        assert_eq!(load[kind]["failed"], 0, "{kind} failures: {}", load[kind]["errors"]);
        assert!(load[kind]["ok"].as_u64().unwrap_or(0) > 0, "no {kind} traffic at all: {load}");
    }
}

#[test]
fn replacing_mesh_node_on_both_nodes_under_load_fails_no_request_and_resets_no_stream() {
    let (mut cluster, client) = web_cluster(&[], &["--drain-timeout-secs", "25"]).unwrap();
    let link = LinkCapture::start(&cluster.fabric_netns).unwrap();
    let load = cluster.nodes[0].start_in(&client, &bin("nm-testapp").unwrap(), &steady_args(14)).unwrap();
    std::thread::sleep(Duration::from_secs(4));

    // The server's node first, then the client's: each new process takes the listeners and the
    // pinned capture of the running one, which then drains.
    for node in [1, 0] {
        let node = &mut cluster.nodes[node];
        node.upgrade_mesh_node().unwrap();
        let log = node.log();
        assert!(log.contains("took over: the previous mesh-node drains"), "{}", node.log_tail());
        assert!(log.contains("adopted the pinned links"), "{}", node.log_tail());
    }
    // The old processes hold the long-lived streams until the load ends them; SIGTERM then
    // lets them go as soon as their last connection closes.
    let retired: Vec<_> = cluster.nodes.iter_mut().map(|n| n.stop_retired(Duration::from_secs(40))).collect();
    let load: Value =
        serde_json::from_str(load.finish(Duration::from_secs(60)).unwrap().trim()).expect("steady output");
    let frames = link.stop();

    eprintln!("load across the upgrade: {load}");
    assert_no_failures(&load);
    for statuses in retired {
        for status in statuses.unwrap() {
            assert!(status.success(), "the old mesh-node exits cleanly after draining: {status}");
        }
    }
    // Every second had traffic: the switch never stalled it.
    for second in load["per_second"].as_array().unwrap().iter().take(14) {
        assert!(second["requests"].as_u64().unwrap() > 0, "a second without requests: {load}");
    }
    // Nothing crossed the link in plaintext, before, during or after the switch.
    assert!(!frames.is_empty(), "the link capture saw no traffic");
    assert!(!contains(&frames, b"GET /steady"), "an HTTP request crossed the link in the clear");
    assert!(!contains(&frames, b"round 1"), "echo stream bytes crossed the link in the clear");
    // The new processes serve: fresh requests go through them.
    let r =
        cluster.nodes[0].testapp(&client, &["http-client", "--to", &format!("{VIP}:{HTTP_PORT}")]).unwrap();
    assert_eq!(r["statuses"]["200"], 1, "{r}");
}

#[test]
fn sigterm_drains_requests_in_flight_and_reports_it_while_draining() {
    let (mut cluster, client) = web_cluster(&[], &["--drain-timeout-secs", "10"]).unwrap();
    let node0 = &mut cluster.nodes[0];
    // A request that takes 3 s is in flight through node 0's mesh-node when it gets SIGTERM.
    let slow = slow_request(node0, &client, 3000);
    std::thread::sleep(Duration::from_millis(500));
    node0.sigterm_mesh_node().unwrap();
    eventually("readiness says draining", Duration::from_secs(2), || {
        // 503: admin_get's error carries the body.
        node0
            .admin_get("/healthz/ready")
            .is_err_and(|e| e.to_string().contains("not ready: draining (SIGTERM)"))
    });
    let metrics = node0.metrics().unwrap();
    assert_eq!(metrics.sum("nodemesh_draining", &[]), 1.0);
    assert!(metrics.sum("nodemesh_connections_open", &[]) >= 1.0);
    let r: Value = serde_json::from_str(slow.finish(Duration::from_secs(20)).unwrap().trim()).unwrap();
    assert_eq!(r["statuses"]["200"], 1, "the request in flight completes: {r}");
    // Its connection done, the process exits well before the 10 s deadline, leaving capture
    // pinned for the next one.
    let status = node0.stop_mesh_node().unwrap();
    assert!(status.success(), "{status}");
    assert!(node0.bpf_pin_dir().join("v1/links/sock4_connect").exists());
}

#[test]
fn a_new_mesh_node_takes_over_from_one_draining_after_sigterm_and_serves_what_is_new() {
    let (mut cluster, client) = web_cluster(&[], &["--drain-timeout-secs", "20"]).unwrap();
    let node0 = &mut cluster.nodes[0];
    let slow = slow_request(node0, &client, 4000);
    std::thread::sleep(Duration::from_millis(500));
    node0.sigterm_mesh_node().unwrap();
    // The pod deleted first, its successor second (the kubelet's order when a DaemonSet pod
    // is replaced): the draining process still hands its listeners over.
    node0.upgrade_mesh_node().unwrap();
    let requests = |node: &SimNode| {
        node.metrics().unwrap().sum("istio_requests_total", &[("source_workload", "client")])
    };
    assert_eq!(requests(node0), 0.0, "the admin port now answers from the new process");
    for _ in 0..5 {
        let r = node0.testapp(&client, &["http-client", "--to", &format!("{VIP}:{HTTP_PORT}")]).unwrap();
        assert_eq!(r["statuses"]["200"], 1, "{r}");
    }
    eventually("new requests counted by the new process", Duration::from_secs(5), || requests(node0) >= 5.0);
    let r: Value = serde_json::from_str(slow.finish(Duration::from_secs(20)).unwrap().trim()).unwrap();
    assert_eq!(r["statuses"]["200"], 1, "the request in flight on the old process completes: {r}");
    for status in node0.stop_retired(Duration::from_secs(25)).unwrap() {
        assert!(status.success(), "{status}");
    }
}
