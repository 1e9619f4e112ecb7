//! As many concurrent connections as one node proxy's open-files limit allows — 50,000 where
//! the limit can be raised that far, and never fewer than 10,000 — from meshed clients on one
//! node into one server pod:port on another, all open at once, through the tunnel, with no
//! EADDRNOTAVAIL anywhere: delivery into the pod keeps each client pod's own address, so no
//! single source address carries them.
//!
//! Each mesh-node holds one socket per connection, so the count is capped by the open-files
//! hard limit a process may have: the test raises its soft limit to the hard one, and where
//! the hard limit is below what 50,000 connections need (raising it takes CAP_SYS_RESOURCE),
//! opens as many as it allows. It prints the number it reached, and fails when the machine
//! allows fewer than [`FLOOR`].

use std::{collections::BTreeSet, time::Duration};

use nodemesh_tests::{
    ManyConnections, Registration, SimCluster, bin,
    mesh::{eventually, labelled, service_yaml},
};
use serde_json::Value;

const VIP: &str = "10.96.0.30";
const CLIENT_PODS: usize = 4;
const TARGET: usize = 50_000;
/// Below this the test proves too little to pass: it fails and says why.
const FLOOR: usize = 10_000;
/// Files a process needs besides its connections (listeners, logs, eBPF maps, netns).
const SPARE_FILES: u64 = 2_000;

/// Writes to the run's output even when the test passes: the number this machine reached is
/// the result, and the harness captures only `print!`/`eprint!`.
fn report(line: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "scale: {line}");
}

/// Raises the test's open-files limit (its children inherit it) as far as it may go; returns
/// how many connections fit: each is a socket in each mesh-node and in the server.
fn connections_allowed() -> usize {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let wanted = TARGET as u64 + SPARE_FILES;
    if setrlimit(Resource::RLIMIT_NOFILE, wanted, wanted).is_err() {
        let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).expect("getrlimit");
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard).expect("raising the soft open-files limit");
        let allowed = hard.saturating_sub(SPARE_FILES) as usize;
        report(&format!(
            "this machine's open-files hard limit is {hard} and cannot be raised (no CAP_SYS_RESOURCE); \
             one mesh-node can hold {allowed} connections, not {TARGET}"
        ));
        return allowed.min(TARGET);
    }
    TARGET
}

#[test]
fn tens_of_thousands_of_concurrent_connections_reach_one_pod_through_the_tunnel_as_their_clients() {
    let expected = connections_allowed();
    assert!(
        expected >= FLOOR,
        "this machine lets one process hold {expected} connections (open-files hard limit); \
         the test needs at least {FLOOR}: raise `ulimit -Hn` (or give CAP_SYS_RESOURCE)"
    );
    let per_pod = expected / CLIENT_PODS;
    let expected = per_pod * CLIENT_PODS;
    let mut cluster = SimCluster::new(2).unwrap();
    cluster.write_config("sink.yaml", &service_yaml("sink", VIP, "sink"));
    cluster.start(&[], &[]).unwrap();
    let count_file = cluster.work_dir.join("sink-count.json");
    let node1 = &mut cluster.nodes[1];
    let sink = node1.add_pod("sink", "shop").unwrap();
    node1.register(&sink, &labelled("sink")).unwrap();
    let args = [
        "many-serve",
        "--listen",
        &sink.addr(8080).to_string(),
        "--count-file",
        &count_file.display().to_string(),
    ]
    .map(String::from);
    node1.spawn_in(&sink, &bin("nm-testapp").unwrap(), &args).unwrap();
    let mut clients = Vec::new();
    for i in 0..CLIENT_PODS {
        let pod = cluster.nodes[0].add_pod(&format!("client{i}"), "shop").unwrap();
        cluster.nodes[0].register(&pod, &Registration::meshed()).unwrap();
        clients.push(pod);
    }
    let to = format!("{VIP}:80");
    eventually("the sink answers through the mesh", Duration::from_secs(15), || {
        let probe = ManyConnections::start(&clients[0], &to, 1).unwrap();
        probe.opened(Duration::from_secs(10)).is_ok_and(|r| r["open"] == 1)
    });

    let started = std::time::Instant::now();
    let many: Vec<ManyConnections> =
        clients.iter().map(|pod| ManyConnections::start(pod, &to, per_pod).unwrap()).collect();
    for (pod, m) in clients.iter().zip(&many) {
        let report = m.opened(Duration::from_secs(600)).unwrap();
        assert!(
            report["open"] == per_pod && report["errors"].as_object().is_some_and(|e| e.is_empty()),
            "{}: {report}\n{}",
            pod.name,
            cluster.nodes[0].log_tail()
        );
    }
    let opened_in = started.elapsed();

    // Every connection is open at the server at the same moment, each from its client pod's
    // own address.
    let mut last = Value::Null;
    eventually("the sink holds every connection", Duration::from_secs(10), || {
        last = std::fs::read_to_string(&count_file)
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or(Value::Null);
        last["open"].as_u64().is_some_and(|n| n as usize >= expected)
    });
    let peers: BTreeSet<String> =
        last["peers"].as_array().unwrap().iter().filter_map(|p| p.as_str().map(String::from)).collect();
    let client_ips: BTreeSet<String> = clients.iter().map(|p| p.ip.to_string()).collect();
    assert_eq!(peers, client_ips, "the sink saw other addresses than the client pods'");
    for node in &cluster.nodes {
        let log = node.log();
        assert!(
            !log.contains("os error 99") && !log.contains("Cannot assign requested address"),
            "EADDRNOTAVAIL in {}'s log",
            node.node_netns
        );
    }
    let tunnels = cluster.nodes[0].config_dump().unwrap()["tunnels"].clone();
    report(&format!(
        "{expected} concurrent connections (target {TARGET}) open after {opened_in:?}; tunnels: {tunnels}"
    ));
    for m in many {
        let closed = m.close().unwrap();
        assert_eq!(closed["closed"], per_pod, "{closed}");
    }
}
