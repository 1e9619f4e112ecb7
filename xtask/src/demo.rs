//! `cargo xtask demo`: a simulated node with a few pods, traffic through the mesh, and a
//! readable account of what the proxy saw.

use std::{net::SocketAddr, time::Duration};

use nodemesh_tests::{Pod, Registration, SimNode, metrics::Metrics};

use crate::{setup, util};

pub fn run(keep: bool) -> anyhow::Result<()> {
    setup::run()?;
    util::build_release()?;
    util::step("creating a simulated node (netns + bridge, no route off this machine)");
    let mut node = SimNode::new()?;
    let pods = [
        ("frontend", "shop", Registration::meshed()),
        ("reviews", "shop", Registration::meshed()),
        ("ratings", "shop", Registration::meshed()),
        ("nightly-report", "shop", Registration::opted_out()),
        ("postgres", "data", Registration::unmeshed_namespace()),
    ];
    let mut created: Vec<Pod> = Vec::new();
    for (name, ns, _) in &pods {
        created.push(node.add_pod(name, ns)?);
    }
    node.start_mesh_node(&[])?;
    println!("\n  {:<16} {:<10} {:<14} {:<24}", "POD", "NAMESPACE", "IP", "MESH");
    for (pod, (_, _, how)) in created.iter().zip(&pods) {
        let status = node.register(pod, how)?;
        let decision = status["decision"].as_str().unwrap_or("?").replace('_', " ");
        println!("  {:<16} {:<10} {:<14} {decision}", pod.name, pod.namespace, pod.ip);
    }
    let [frontend, reviews, ratings, report, postgres] = &created[..] else { unreachable!() };
    node.serve(reviews, &[reviews.addr(9080)])?;
    node.serve(ratings, &[ratings.addr(9080)])?;
    node.serve(postgres, &[postgres.addr(5432)])?;

    println!("\nSending traffic:");
    let send = |from: &Pod, to: SocketAddr, args: &[&str], what: &str| -> anyhow::Result<()> {
        let to_s = to.to_string();
        let mut all = vec!["client", "--to", to_s.as_str()];
        all.extend_from_slice(args);
        let r = node.testapp(from, &all)?;
        anyhow::ensure!(r.get("error").is_none(), "{} -> {to}: {r}", from.name);
        println!("  {:<16} -> {:<22} {what}", from.name, to_s);
        Ok(())
    };
    send(frontend, reviews.addr(9080), &["--connections", "5"], "5 connections")?;
    send(
        frontend,
        ratings.addr(9080),
        &["--mode", "sink", "--bytes", "1048576"],
        "1 MiB upload, checksum verified",
    )?;
    send(reviews, ratings.addr(9080), &["--connections", "3"], "3 connections")?;
    send(frontend, postgres.addr(5432), &["--connections", "2"], "2 connections (server not meshed)")?;
    send(report, postgres.addr(5432), &["--connections", "4"], "4 connections (client opted out: direct)")?;
    std::thread::sleep(Duration::from_millis(300));

    print_report(&node.metrics()?);
    if keep {
        keep_running(&node, &created)?;
    }
    util::step("cleaning up the simulated node");
    Ok(())
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
    println!("  (shop/nightly-report is opted out, so its 4 connections went direct and are not here)");
}

fn human_bytes(b: f64) -> String {
    match b {
        b if b >= 1048576.0 => format!("{:.1} MiB", b / 1048576.0),
        b if b >= 1024.0 => format!("{:.1} KiB", b / 1024.0),
        b => format!("{b} B"),
    }
}

fn keep_running(node: &SimNode, pods: &[Pod]) -> anyhow::Result<()> {
    let testapp = nodemesh_tests::bin("nm-testapp")?;
    let frontend = &pods[0];
    println!("\nThe node stays up until you press Ctrl-C (everything is removed then). Try:");
    println!("  # metrics, config dump (admin endpoint inside the node netns)");
    println!("  nsenter --net=/var/run/netns/{} curl -s 127.0.0.1:15000/metrics", node.node_netns);
    println!("  nsenter --net=/var/run/netns/{} curl -s 127.0.0.1:15000/config_dump", node.node_netns);
    println!("  # a connection from the meshed frontend pod (joins its cgroup, then its netns)");
    println!(
        "  sh -c 'echo $$ > {}/cgroup.procs; exec nsenter --net=/var/run/netns/{} {} client --to {}'",
        frontend.cgroup.display(),
        frontend.netns,
        testapp.display(),
        pods[1].addr(9080)
    );
    println!("  # workloads via the local API");
    println!(
        "  {} workload --api-socket {} list",
        nodemesh_tests::bin("mesh-node")?.display(),
        node.api_socket().display()
    );
    println!("  # mesh-node's log: {}", node.mesh_node_log().display());
    let mut signals = nix::sys::signal::SigSet::empty();
    signals.add(nix::sys::signal::Signal::SIGINT);
    signals.add(nix::sys::signal::Signal::SIGTERM);
    signals.thread_block()?;
    let signal = signals.wait()?;
    println!("\n[xtask] got {signal}");
    Ok(())
}
