//! Capture and L4 proxy on one simulated node: real eBPF in the kernel, real mesh-node, real
//! sockets in network namespaces and cgroups. Needs root (see tests/README.md).

use std::{path::Path, thread, time::Duration};

use nodemesh_tests::{Pod, Registration, SimNode};
use serde_json::Value;

const PORT: u16 = 8080;
const OPENED: &str = "istio_tcp_connections_opened_total";
const CLOSED: &str = "istio_tcp_connections_closed_total";
const SENT: &str = "istio_tcp_sent_bytes_total";
const RECEIVED: &str = "istio_tcp_received_bytes_total";

fn opened_from(node: &SimNode, pod: &Pod) -> f64 {
    node.metrics().unwrap().sum(
        OPENED,
        &[
            ("reporter", "source"),
            ("source_workload", &pod.name),
            ("source_workload_namespace", &pod.namespace),
        ],
    )
}

/// Metrics are updated as connections close; poll briefly instead of racing the proxy.
fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    for _ in 0..100 {
        if check() {
            return;
        }
        thread::sleep(Duration::from_millis(50));
    }
    panic!("timed out waiting for: {what}");
}

fn addr_of(v: &Value) -> String {
    v.as_str().unwrap_or_default().to_string()
}

#[test]
fn meshed_pod_to_other_namespace_goes_through_mesh_node_and_10mib_arrives_intact() {
    let mut node = SimNode::new().unwrap();
    let client = node.add_pod("client", "shop").unwrap();
    let server = node.add_pod("db", "data").unwrap();
    node.start_mesh_node(&[]).unwrap();
    node.register(&client, &Registration::meshed()).unwrap();
    node.register(&server, &Registration::unmeshed_namespace()).unwrap();
    node.serve(&server, &[server.addr(PORT)]).unwrap();

    let bytes = 10 * 1024 * 1024;
    let r = node
        .testapp(
            &client,
            &[
                "client",
                "--mode",
                "sink",
                "--to",
                &server.addr(PORT).to_string(),
                "--bytes",
                &bytes.to_string(),
            ],
        )
        .unwrap();
    assert!(r.get("error").is_none(), "{r}");
    assert_eq!(r["reply"]["bytes"], bytes, "{r}");
    assert_eq!(r["reply"]["sha256"], r["sent_sha256"], "payload corrupted: {r}");
    // The upstream leg starts in the client's own netns, so the server sees the pod's address.
    assert!(addr_of(&r["reply"]["peer"]).starts_with(&format!("{}:", client.ip)), "{r}");

    let labels = [
        ("source_workload", "client"),
        ("source_workload_namespace", "shop"),
        ("destination_workload", "db"),
        ("destination_workload_namespace", "data"),
    ];
    eventually("connection counted as closed", || node.metrics().unwrap().sum(CLOSED, &labels) == 1.0);
    let m = node.metrics().unwrap();
    assert_eq!(m.sum(OPENED, &labels), 1.0);
    assert!(m.sum(SENT, &labels) >= bytes as f64, "sent bytes: {}", m.sum(SENT, &labels));
    assert!(m.sum(RECEIVED, &labels) > 0.0, "the reply travelled back through the proxy");
}

#[test]
fn unmeshed_namespace_opted_out_pod_loopback_and_exclusions_bypass_mesh_node() {
    let mut node = SimNode::new().unwrap();
    let plain = node.add_pod("plain", "legacy").unwrap();
    let opted_out = node.add_pod("batch", "shop").unwrap();
    let meshed = node.add_pod("web", "shop").unwrap();
    let server = node.add_pod("api", "shop").unwrap();
    let excluded = node.add_pod("excluded", "shop").unwrap();
    node.start_mesh_node(&["--exclude-port", "9999", "--exclude-cidr", &format!("{}/32", excluded.ip)])
        .unwrap();
    let status = node.register(&plain, &Registration::unmeshed_namespace()).unwrap();
    assert_eq!(status["decision"], "namespace_not_enabled", "{status}");
    let status = node.register(&opted_out, &Registration::opted_out()).unwrap();
    assert_eq!(status["decision"], "pod_opted_out", "{status}");
    node.register(&meshed, &Registration::meshed()).unwrap();
    node.serve(&server, &[server.addr(PORT), server.addr(9999)]).unwrap();
    node.serve(&excluded, &[excluded.addr(PORT)]).unwrap();
    node.serve(&meshed, &["127.0.0.1:7000".parse().unwrap()]).unwrap();

    // Direct connections: the server sees exactly the client's own socket address.
    let direct = |pod: &Pod, to: String| {
        let r = node.testapp(pod, &["client", "--to", &to]).unwrap();
        let c = &r["connections"][0];
        assert_eq!(c["reply"]["peer"], c["local"], "{} to {to} should bypass the proxy: {r}", pod.name);
    };
    direct(&plain, server.addr(PORT).to_string());
    direct(&opted_out, server.addr(PORT).to_string());
    direct(&meshed, server.addr(9999).to_string());
    direct(&meshed, excluded.addr(PORT).to_string());
    direct(&meshed, "127.0.0.1:7000".into());
    assert_eq!(opened_from(&node, &plain), 0.0);
    assert_eq!(opened_from(&node, &opted_out), 0.0);
    assert_eq!(opened_from(&node, &meshed), 0.0, "excluded port/CIDR and loopback must not be proxied");

    // And the same meshed pod to a non-excluded destination is captured.
    node.testapp(&meshed, &["client", "--to", &server.addr(PORT).to_string()]).unwrap();
    eventually("meshed connection counted", || opened_from(&node, &meshed) == 1.0);
}

#[test]
fn getpeername_shows_the_dialled_address_over_ipv4_and_ipv6() {
    let mut node = SimNode::new().unwrap();
    let client = node.add_pod("client", "shop").unwrap();
    let server = node.add_pod("server", "shop").unwrap();
    node.start_mesh_node(&[]).unwrap();
    node.register(&client, &Registration::meshed()).unwrap();
    node.serve(&server, &[server.addr(PORT), server.addr6(PORT)]).unwrap();

    for to in [server.addr(PORT), server.addr6(PORT)] {
        let r = node.testapp(&client, &["client", "--to", &to.to_string()]).unwrap();
        let c = &r["connections"][0];
        assert_eq!(c["peername"], to.to_string(), "getpeername must show the dialled address: {r}");
        assert_eq!(c["reply"]["server"], "server", "{r}");
        assert_eq!(c["reply"]["local"], to.to_string(), "{r}");
        assert_ne!(c["reply"]["peer"], c["local"], "the connection went through the proxy: {r}");
    }
    eventually("both connections proxied", || opened_from(&node, &client) == 2.0);
    // The connect programs' own (aya-log) records arrive in mesh-node's log.
    eventually("eBPF log records in mesh-node's log", || node.log().contains("nodemesh: captured connect"));
}

#[test]
fn mesh_node_never_captures_its_own_upstream_connects() {
    let mut node = SimNode::new().unwrap();
    let client = node.add_pod("client", "shop").unwrap();
    let server = node.add_pod("server", "shop").unwrap();
    // A plain process on the node, in the same cgroup as mesh-node, and that cgroup meshed:
    // the proxy's own upstream sockets are then in a meshed cgroup *and* the meshed netns.
    // Only the proxy mark keeps them from being captured again (an endless loop).
    let shared_cgroup = node.cgroup_root.join("node-processes");
    std::fs::create_dir_all(&shared_cgroup).unwrap();
    node.start_mesh_node_in_cgroup(&shared_cgroup, &[]).unwrap();
    let host_netns = nodemesh_tests::netns::path(&node.node_netns);
    let enabled = ["--namespace-label".to_string(), "nodemesh.io/enabled=true".into()];
    let out = node.workload_add("host-agent", "node", &shared_cgroup, &host_netns, &enabled).unwrap();
    assert!(out.contains("\"proxy_port4\""), "{out}");
    node.register(&client, &Registration::meshed()).unwrap();
    node.register(&server, &Registration::meshed()).unwrap();
    node.serve(&server, &[server.addr(PORT)]).unwrap();

    // Pod to meshed pod: exactly one proxied connection, not a chain.
    let r = node.testapp(&client, &["client", "--to", &server.addr(PORT).to_string()]).unwrap();
    assert_eq!(r["connections"][0]["reply"]["server"], "server", "{r}");
    eventually("client connection counted", || opened_from(&node, &client) == 1.0);

    // A host process in mesh-node's own (meshed) cgroup and netns: captured once, delivered.
    let host = Pod {
        name: "host-agent".into(),
        namespace: "node".into(),
        netns: node.node_netns.clone(),
        cgroup: shared_cgroup.clone(),
        ip: "10.77.0.1".parse().unwrap(),
        ip6: "fd77::1".parse().unwrap(),
    };
    let r = node.testapp(&host, &["client", "--to", &server.addr(PORT).to_string()]).unwrap();
    assert_eq!(r["connections"][0]["reply"]["server"], "server", "{r}");
    eventually("host connection counted", || opened_from(&node, &host) == 1.0);
    thread::sleep(Duration::from_millis(300));
    let m = node.metrics().unwrap();
    // Counted once by the client's side (the server's side counts the same connections).
    assert_eq!(
        m.sum(OPENED, &[("reporter", "source")]),
        2.0,
        "a proxied connection was captured again (loop)"
    );
    assert_eq!(m.sum("nodemesh_proxy_failures_total", &[]), 0.0);
}

#[test]
fn two_hundred_concurrent_connections_from_each_of_four_pods_reach_their_own_destination() {
    let mut node = SimNode::new().unwrap();
    let clients: Vec<Pod> = (0..4).map(|i| node.add_pod(&format!("client{i}"), "shop").unwrap()).collect();
    let servers: Vec<Pod> = (0..4).map(|i| node.add_pod(&format!("server{i}"), "shop").unwrap()).collect();
    node.start_mesh_node(&[]).unwrap();
    for c in &clients {
        node.register(c, &Registration::meshed()).unwrap();
    }
    // Same ports on every server: only the original destination tells them apart.
    let ports = [8080u16, 8081];
    for s in &servers {
        node.serve(s, &ports.map(|p| s.addr(p))).unwrap();
    }
    let per_pod = 200;
    let results: Vec<(usize, usize, Value)> = thread::scope(|scope| {
        let handles: Vec<_> = clients
            .iter()
            .enumerate()
            .flat_map(|(ci, c)| {
                let node = &node;
                let servers = &servers;
                // Each client pod runs one process per destination, all at the same time.
                (0..servers.len() * ports.len()).map(move |d| {
                    let (server, port) = (&servers[d / ports.len()], ports[d % ports.len()]);
                    let n = per_pod / (servers.len() * ports.len());
                    scope.spawn(move || {
                        let to = server.addr(port).to_string();
                        (
                            ci,
                            d,
                            node.testapp(c, &["client", "--to", &to, "--connections", &n.to_string()])
                                .unwrap(),
                        )
                    })
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut total = 0;
    for (ci, d, r) in &results {
        let (server, port) = (&servers[d / ports.len()], ports[d % ports.len()]);
        let conns = r["connections"].as_array().unwrap_or_else(|| panic!("client{ci}: {r}"));
        for c in conns {
            assert_eq!(c["reply"]["server"], server.name.as_str(), "client{ci} reached the wrong pod: {c}");
            assert_eq!(c["reply"]["local"], server.addr(port).to_string(), "client{ci}: wrong port: {c}");
            assert_eq!(c["peername"], server.addr(port).to_string(), "{c}");
            total += 1;
        }
    }
    assert_eq!(total, per_pod * clients.len());
    for c in &clients {
        eventually("all proxied", || opened_from(&node, c) == per_pod as f64);
    }
}

#[test]
fn upstream_refusal_reaches_the_client_as_a_reset_not_a_hang() {
    let mut node = SimNode::new().unwrap();
    let client = node.add_pod("client", "shop").unwrap();
    let server = node.add_pod("server", "shop").unwrap();
    node.start_mesh_node(&[]).unwrap();
    node.register(&client, &Registration::meshed()).unwrap();
    // Nothing listens on the server's port 8080. The contract: the client's connection (to
    // mesh-node's listener, so its connect succeeds) is reset — never closed cleanly as if the
    // server had answered nothing, never left hanging until the client's timeout. mesh-node
    // resets at once, so the RST can overtake the client at any of its steps, and the kernel
    // reports it by the step: connect's own error check right after the handshake, or the
    // write or read that meets it, gets ECONNRESET; a shutdown or getpeername after it gets
    // ENOTCONN (the socket is already closed); a write after the error was consumed gets EPIPE. A FIN
    // ("unexpected end of file"), a timeout or a refusal (capture missed: the server's own
    // kernel refused) fail the test.
    let r = node.testapp(&client, &["client", "--to", &server.addr(PORT).to_string()]).unwrap();
    let error = r["error"].as_str().unwrap_or_else(|| panic!("expected a failure: {r}"));
    let reset_forms = ["connection reset", "not connected", "broken pipe"];
    assert!(reset_forms.contains(&error), "the client must see a reset, saw {r}");
    eprintln!("upstream refusal seen by the client as: {}", r["message"]);
    assert!(r["message"].as_str().is_some());
    eventually("failure counted", || {
        node.metrics()
            .unwrap()
            .sum("nodemesh_proxy_failures_total", &[("reason", "upstream_connect_refused")])
            == 1.0
    });
}

#[test]
fn a_killed_mesh_node_leaves_capture_pinned_and_a_permissive_pod_connects_directly_until_it_returns() {
    let mut node = SimNode::new().unwrap();
    let client = node.add_pod("client", "shop").unwrap();
    let server = node.add_pod("server", "shop").unwrap();
    node.start_mesh_node(&[]).unwrap();
    node.register(&client, &Registration::meshed()).unwrap();
    node.serve(&server, &[server.addr(PORT)]).unwrap();
    let to = server.addr(PORT).to_string();
    node.testapp(&client, &["client", "--to", &to]).unwrap();
    eventually("captured before the kill", || opened_from(&node, &client) == 1.0);

    node.kill_mesh_node().unwrap();
    // SIGKILL gives no chance to clean up: capture stays pinned, but finds no listener. This
    // pod is not fail-closed (no control plane, so no STRICT policy: see node_proxy_down.rs
    // for one that is), so it connects directly meanwhile.
    assert!(node.bpf_pin_dir().join("v1/links/sock4_connect").exists(), "capture stays pinned");
    let r = node.testapp(&client, &["client", "--to", &to]).unwrap();
    let c = &r["connections"][0];
    assert_eq!(c["reply"]["server"], "server", "{r}");
    assert_eq!(c["reply"]["peer"], c["local"], "while mesh-node is down it connects directly: {r}");

    // Restarted with nothing re-registered: the saved workload state brings capture back.
    node.restart_mesh_node().unwrap();
    let r = node.testapp(&client, &["client", "--to", &to]).unwrap();
    let c = &r["connections"][0];
    assert_eq!(c["reply"]["server"], "server", "{r}");
    assert_ne!(c["reply"]["peer"], c["local"], "captured again after restart: {r}");
    eventually("captured by the new process", || opened_from(&node, &client) == 1.0);
}

#[test]
fn clean_shutdown_keeps_capture_until_uninstall_and_bad_workloads_are_refused_with_reasons() {
    let mut node = SimNode::new().unwrap();
    let client = node.add_pod("client", "shop").unwrap();
    node.start_mesh_node(&[]).unwrap();
    let bad_add = |name: &str| {
        node.workload_add(name, "shop", Path::new("/tmp"), Path::new("/nonexistent"), &[])
            .unwrap_err()
            .to_string()
    };
    let err = bad_add("Bad_Name");
    assert!(err.contains("field `name`"), "{err}");
    let err = bad_add("ok");
    assert!(err.contains("cgroup /tmp") && err.contains("not on a cgroup v2 filesystem"), "{err}");
    // The good registration still works afterwards and shows in the config dump.
    node.register(&client, &Registration::meshed()).unwrap();
    let dump: Value = serde_json::from_str(&node.admin_get("/config_dump").unwrap()).unwrap();
    assert_eq!(dump["workloads"][0]["name"], "client", "{dump}");
    assert_eq!(dump["workloads"][0]["capture"]["proxy_port4"], 15001, "{dump}");

    let status = node.stop_mesh_node().unwrap();
    assert!(status.success(), "clean shutdown exits 0, got {status}");
    // Capture stays pinned (policy decides what pods do meanwhile) until `mesh-node uninstall`.
    let links = node.bpf_pin_dir().join("v1/links");
    assert!(links.join("sock4_connect").exists(), "a clean exit leaves capture pinned");
    let pin_dir = node.bpf_pin_dir().display().to_string();
    let out = node.mesh_node_cli(&["uninstall", "--bpf-pin-dir", &pin_dir]).unwrap();
    assert!(out.contains("capture removed"), "{out}");
    assert!(!node.bpf_pin_dir().exists());
    let out = node.mesh_node_cli(&["uninstall", "--bpf-pin-dir", &pin_dir]).unwrap();
    assert!(out.contains("no capture pinned"), "{out}");
}
