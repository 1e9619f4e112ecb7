//! `cargo xtask demo`: a simulated cluster of two nodes and mesh-control on `examples/config`;
//! Service VIP traffic balanced across pods on both nodes, and a readable account of what the
//! proxies and the control plane saw; then the bookshop sample and its route files, one at a
//! time (`bookshop`).

use std::{collections::BTreeMap, time::Duration};

use nodemesh_tests::{Pod, Registration, SimCluster, SimNode, mesh, metrics::Metrics};

use crate::{bookshop, setup, util};

const REVIEWS: &str = "10.96.0.20:9080";
const RATINGS: &str = "10.96.0.30:9080";

pub fn run(keep: bool) -> anyhow::Result<()> {
    setup::run()?;
    util::build_release()?;
    util::step("creating a simulated cluster: 2 nodes + a fabric netns, no route off this machine");
    let mut cluster = SimCluster::new(2)?;
    // mesh-control watches the cluster's own config directory: examples/config now, the
    // bookshop and its route files as the walk-through goes.
    let config = cluster.config_dir.clone();
    for entry in std::fs::read_dir(util::workspace_root()?.join("examples/config"))? {
        let entry = entry?;
        std::fs::copy(entry.path(), config.join(entry.file_name()))?;
    }
    cluster.start(&[], &[])?;
    println!("  mesh-control watches {} (xDS at {})", config.display(), cluster.control.url());

    // (node, pod, namespace, labels) — reviews runs on both nodes.
    let layout: [(usize, &str, &str, Registration); 6] = [
        (0, "frontend", "shop", Registration::meshed()),
        (0, "reviews-v1", "shop", mesh::labelled("reviews")),
        (1, "reviews-v2", "shop", mesh::labelled("reviews")),
        (1, "reviews-v3", "shop", mesh::labelled("reviews")),
        (1, "ratings", "shop", mesh::labelled("ratings")),
        (1, "postgres", "data", Registration::unmeshed_namespace()),
    ];
    println!("\n  {:<8} {:<12} {:<10} {:<12} MESH", "NODE", "POD", "NAMESPACE", "IP");
    let mut pods: BTreeMap<&str, (usize, Pod)> = BTreeMap::new();
    for (n, name, ns, how) in &layout {
        let node = &mut cluster.nodes[*n];
        let pod = node.add_pod(name, ns)?;
        let status = node.register(&pod, how)?;
        let decision = status["decision"].as_str().unwrap_or("?").replace('_', " ");
        println!("  node-{:<3} {:<12} {:<10} {:<12} {decision}", n + 1, pod.name, pod.namespace, pod.ip);
        if *name != "frontend" {
            let port = if *name == "postgres" { 5432 } else { 9080 };
            node.serve(&pod, &[pod.addr(port)])?;
        }
        pods.insert(name, (*n, pod));
    }
    let (node0, frontend) = (&cluster.nodes[0], &pods["frontend"].1);
    wait_for_endpoints(node0, frontend)?;

    println!("\nSending traffic from shop/frontend (node-1):");
    let counts = mesh::answered_by(node0, frontend, REVIEWS, 30)?;
    println!("  -> reviews VIP {REVIEWS}, 30 connections, round robin across both nodes:");
    for (server, count) in &counts {
        let node = pods.get(server.as_str()).map_or(0, |p| p.0 + 1);
        println!("       {server:<12} on node-{node}: {count}");
    }
    let counts = mesh::answered_by(node0, frontend, RATINGS, 10)?;
    println!("  -> ratings VIP {RATINGS}, 10 connections, consistent hash on source IP: {counts:?}");
    let postgres = pods["postgres"].1.addr(5432);
    let counts = mesh::answered_by(node0, frontend, &postgres.to_string(), 2)?;
    println!("  -> postgres {postgres} (not meshed, no Service): passed through, {counts:?}");
    std::thread::sleep(Duration::from_millis(300));

    print_report(&node0.metrics()?);
    println!("\nWhat each node holds (scoping: only what its own pods dial):");
    for (i, node) in cluster.nodes.iter().enumerate() {
        let dump = node.config_dump()?;
        let clusters: Vec<&String> =
            dump["xds"]["config"]["clusters"].as_object().map(|m| m.keys().collect()).unwrap_or_default();
        println!("  node-{}: {clusters:?}", i + 1);
    }
    util::step("the bookshop sample (examples/bookshop): L7 routing, one route file at a time");
    let shop = bookshop::start(&mut cluster, &config)?;
    bookshop::walk(&cluster, &config, &shop)?;

    println!("\nmesh-control status:");
    for line in cluster.control.status()?.lines() {
        println!("  {line}");
    }
    if keep {
        keep_running(&cluster, frontend)?;
    }
    util::step("cleaning up the simulated cluster");
    Ok(())
}

/// Registration → report → generation → push: wait until both VIPs answer from node 0.
fn wait_for_endpoints(node: &SimNode, from: &Pod) -> anyhow::Result<()> {
    // The first connect to each VIP subscribes the node to it (on demand).
    mesh::wait_until(Duration::from_secs(20), Duration::from_millis(100), || {
        mesh::answered(node, from, REVIEWS)
            && mesh::answered(node, from, RATINGS)
            && mesh::endpoint_count(node, "outbound|9080||reviews.shop.svc.cluster.local") == 3
    })
    .map_err(|e| anyhow::anyhow!("the VIPs never reached node-1 ({e}):\n{}", node.log_tail()))
}

fn print_report(m: &Metrics) {
    println!("\nWhat mesh-node saw (from its /metrics):");
    println!(
        "  {:<26} {:<26} {:>7} {:>7} {:>12} {:>12}",
        "SOURCE", "DESTINATION", "OPENED", "CLOSED", "SENT", "RECEIVED"
    );
    let mut pairs: Vec<(String, String)> = m
        .samples
        .iter()
        .filter(|s| s.name == "istio_tcp_connections_opened_total")
        .map(|s| {
            let l = |k: &str| s.labels.get(k).cloned().unwrap_or_default();
            (
                format!("{}/{}", l("source_workload_namespace"), l("source_workload")),
                format!("{}/{}", l("destination_workload_namespace"), l("destination_workload")),
            )
        })
        .collect();
    pairs.sort();
    pairs.dedup();
    for (src, dst) in &pairs {
        let (sns, sname) = src.split_once('/').unwrap_or_default();
        let (dns, dname) = dst.split_once('/').unwrap_or_default();
        let labels = [
            ("source_workload", sname),
            ("source_workload_namespace", sns),
            ("destination_workload", dname),
            ("destination_workload_namespace", dns),
        ];
        println!(
            "  {:<26} {:<26} {:>7} {:>7} {:>12} {:>12}",
            src,
            dst,
            m.sum("istio_tcp_connections_opened_total", &labels),
            m.sum("istio_tcp_connections_closed_total", &labels),
            human_bytes(m.sum("istio_tcp_sent_bytes_total", &labels)),
            human_bytes(m.sum("istio_tcp_received_bytes_total", &labels)),
        );
    }
}

fn human_bytes(b: f64) -> String {
    match b {
        b if b >= 1048576.0 => format!("{:.1} MiB", b / 1048576.0),
        b if b >= 1024.0 => format!("{:.1} KiB", b / 1024.0),
        b => format!("{b} B"),
    }
}

fn keep_running(cluster: &SimCluster, frontend: &Pod) -> anyhow::Result<()> {
    let testapp = nodemesh_tests::bin("nm-testapp")?;
    let node = &cluster.nodes[0];
    println!("\nThe cluster stays up until you press Ctrl-C (everything is removed then). Try:");
    println!(
        "  # mesh-control watches {}: edit shop.yaml there (say, drop the",
        cluster.config_dir.display()
    );
    println!(
        "  # DestinationRule), or copy in a route file from examples/bookshop/routes/, and watch it apply"
    );
    println!("  # node-1's config dump and metrics (admin endpoint inside the node netns)");
    println!("  nsenter --net=/var/run/netns/{} curl -s 127.0.0.1:15000/config_dump", node.node_netns);
    println!("  nsenter --net=/var/run/netns/{} curl -s 127.0.0.1:15000/metrics", node.node_netns);
    println!("  # what every node applied");
    println!(
        "  nsenter --net=/var/run/netns/{} {} status",
        cluster.fabric_netns,
        nodemesh_tests::bin("mesh-control")?.display()
    );
    println!("  # a connection from the meshed frontend pod (joins its cgroup, then its netns)");
    println!(
        "  sh -c 'echo $$ > {}/cgroup.procs; exec nsenter --net=/var/run/netns/{} {} client --to {REVIEWS} --mode hello'",
        frontend.cgroup.display(),
        frontend.netns,
        testapp.display(),
    );
    println!(
        "  # logs: {} and {}",
        node.mesh_node_log().display(),
        cluster.work_dir.join("mesh-control.log").display()
    );
    let mut signals = nix::sys::signal::SigSet::empty();
    signals.add(nix::sys::signal::Signal::SIGINT);
    signals.add(nix::sys::signal::Signal::SIGTERM);
    signals.thread_block()?;
    let signal = signals.wait()?;
    println!("\n[xtask] got {signal}");
    Ok(())
}
