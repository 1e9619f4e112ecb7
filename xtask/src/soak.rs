//! `cargo xtask soak --minutes N`: a two-node mTLS cluster under continuous traffic
//! (`nm-testapp steady`) for N minutes while pods churn (web's endpoints registered, removed,
//! their namespace label flipped off and on) and config churns (web's DestinationRule load
//! balancer flipped); reports failed requests, broken streams, and mesh-node's RSS and open
//! descriptors after the first churn cycle and as the load ends. Appends a row to
//! bench/RESULTS.md.

use std::{
    collections::BTreeMap,
    fs,
    time::{Duration, Instant},
};

use anyhow::Context;
use nodemesh_tests::{
    Pod, Registration, SimNode, bin,
    lifecycle::{ECHO_PORT, SteadyTotals, steady_args, web_cluster},
    mesh::labelled,
};
use serde_json::Value;

use crate::{bench, setup, util};

/// Pods that come and go behind `web` on node 1.
const CHURN_PODS: usize = 6;
const POD_EVERY: Duration = Duration::from_secs(2);
const CONFIG_EVERY: Duration = Duration::from_secs(5);
/// Every pod removed, unlabelled and registered again once (36 s).
const WARM_AFTER_STEPS: usize = CHURN_PODS * 3;

/// What one mesh-node uses: RSS KiB, open descriptors, and what they are (by kind: `socket`,
/// `net` namespace, `anon_inode:[eventfd]`, …) with its thread count — so growth says where
/// it comes from.
fn footprint(node: &SimNode) -> anyhow::Result<(u64, usize, BTreeMap<String, usize>)> {
    let pid = node.mesh_node_pid().context("mesh-node not running")?;
    let (rss, _) = bench::memory_kib(pid)?;
    let mut kinds = BTreeMap::new();
    let mut fds = 0;
    for fd in fs::read_dir(format!("/proc/{pid}/fd"))? {
        fds += 1;
        let target = fs::read_link(fd?.path()).map(|t| t.display().to_string()).unwrap_or_default();
        let kind = match target.split_once(":[") {
            _ if target.starts_with("anon_inode:") => target.clone(),
            Some((kind, _)) => kind.to_string(),
            None => "file".into(),
        };
        *kinds.entry(kind).or_default() += 1;
    }
    let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
    let threads = status.lines().find_map(|l| l.strip_prefix("Threads:")).unwrap_or_default().trim();
    kinds.insert("threads".into(), threads.parse().unwrap_or_default());
    Ok((rss, fds, kinds))
}

fn destination_rule(policy: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: web, namespace: shop}}\n\
         spec:\n  host: web.shop.svc.cluster.local\n  trafficPolicy: {{loadBalancer: {{simple: {policy}}}}}\n"
    )
}

pub(crate) fn run(minutes: u64) -> anyhow::Result<()> {
    anyhow::ensure!(minutes > 0, "--minutes must be at least 1");
    setup::run()?;
    util::build_release()?;
    util::step(&format!("soak: {minutes} min of traffic, pod churn and config churn on two nodes"));
    let (mut cluster, client) = web_cluster(&[], &[])?;
    let mut pods: Vec<(Pod, bool)> = Vec::new();
    for i in 0..CHURN_PODS {
        let node1 = &mut cluster.nodes[1];
        let pod = node1.add_pod(&format!("churn{i}"), "shop")?;
        node1.register(&pod, &labelled("web"))?;
        node1.serve_http(&pod, &[pod.addr(8080)])?;
        node1.serve(&pod, &[pod.addr(ECHO_PORT)])?;
        pods.push((pod, true));
    }
    let seconds = minutes * 60;
    let load = cluster.nodes[0].start_in(&client, &bin("nm-testapp")?, &steady_args(seconds))?;

    let end = Instant::now() + Duration::from_secs(seconds);
    let (mut pod_ops, mut config_changes, mut step) = (0u64, 0u64, 0usize);
    // Measured once every pod has been through a whole cycle (connections, pools and each
    // pod's listeners in use), then again as the load ends: growth between the two is a leak.
    let mut warm = None;
    let mut next_config = Instant::now() + CONFIG_EVERY;
    while Instant::now() < end {
        std::thread::sleep(POD_EVERY);
        let node1 = &cluster.nodes[1];
        let (pod, meshed) = &mut pods[step % CHURN_PODS];
        // Cycle: removed, registered again, namespace label off, on again.
        let how = match step / CHURN_PODS % 3 {
            0 => None,
            1 if *meshed => Some(Registration::labelled(&[("app", "web")]).namespace_unlabelled()),
            _ => Some(labelled("web")),
        };
        match how {
            None => {
                let key = format!("{}/{}", pod.namespace, pod.name);
                let socket = node1.api_socket().display().to_string();
                node1.mesh_node_cli(&["workload", "--api-socket", &socket, "remove", &key])?;
                node1.register(pod, &labelled("web"))?;
            }
            Some(registration) => {
                *meshed = registration.namespace_enabled;
                node1.register(pod, &registration)?;
            }
        }
        pod_ops += 1;
        step += 1;
        if step == WARM_AFTER_STEPS {
            warm = Some(cluster.nodes.iter().map(footprint).collect::<anyhow::Result<Vec<_>>>()?);
        }
        if Instant::now() >= next_config {
            let policy = if config_changes % 2 == 0 { "LEAST_REQUEST" } else { "ROUND_ROBIN" };
            cluster.write_config("web-rule.yaml", &destination_rule(policy));
            config_changes += 1;
            next_config += CONFIG_EVERY;
        }
    }
    let after: Vec<_> = cluster.nodes.iter().map(footprint).collect::<anyhow::Result<_>>()?;
    let before =
        warm.with_context(|| format!("the soak ended before the first {WARM_AFTER_STEPS} pod changes"))?;
    let out: Value =
        serde_json::from_str(load.finish(Duration::from_secs(120))?.trim()).context("steady output")?;

    let totals = SteadyTotals::of(&out);
    let (requests, failed) = (totals.requests, totals.failed);
    let broken = totals.streams_broken + totals.short_tcp_failed;
    for kind in ["keepalive", "fresh", "streams", "fresh_tcp"] {
        for e in out[kind]["errors"].as_array().into_iter().flatten() {
            println!("  {kind}: {e}");
        }
    }
    if failed + broken > 0 {
        // The cluster's directories go with it: the logs that explain a failure are kept.
        let kept = util::workspace_root()?.join("target/soak-logs");
        fs::create_dir_all(&kept)?;
        for (i, node) in cluster.nodes.iter().enumerate() {
            let to = kept.join(format!("node{}-mesh-node.log", i + 1));
            fs::copy(node.mesh_node_log(), &to).with_context(|| format!("keeping {}", to.display()))?;
        }
        println!("  failures: mesh-node logs kept in {}", kept.display());
    }
    for (i, (start, end)) in before.iter().zip(&after).enumerate() {
        println!(
            "  node {} mesh-node descriptors and threads, start → end: {:?} → {:?}",
            i + 1,
            start.2,
            end.2
        );
    }
    let per_node = |i: usize| {
        format!(
            "{:.1} → {:.1} / {} → {}",
            before[i].0 as f64 / 1024.0,
            after[i].0 as f64 / 1024.0,
            before[i].1,
            after[i].1
        )
    };
    let row = format!(
        "| {} | {} | {minutes} | {requests} | {failed} | {broken} | {pod_ops} | {config_changes} | {} | {} |",
        util::output("date", &["-u", "+%Y-%m-%d %H:%M"])?,
        bench::commit()?,
        per_node(0),
        per_node(1),
    );
    let path = util::workspace_root()?.join("bench/RESULTS.md");
    let text = fs::read_to_string(&path)?;
    fs::write(&path, bench::insert_row(&text, SOAK_TABLE, &row))?;
    println!("\n{SOAK_TABLE}\n{row}\n\nwritten to {}", path.display());
    Ok(())
}

const SOAK_TABLE: &str = "| date (UTC) | commit | minutes | HTTP requests | failed | TCP failed (streams + short) | pod changes | config changes | node 1 mesh-node RSS MiB / fds start → end | node 2 mesh-node RSS MiB / fds start → end |";
