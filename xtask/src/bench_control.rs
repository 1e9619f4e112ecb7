//! Control-plane benchmarks for `cargo xtask bench`:
//! - propagation on a simulated 2-node cluster with real mesh-nodes: a WorkloadEntry written to
//!   (or removed from) the config dir until both nodes' config dumps hold the new endpoint set;
//! - scale: mesh-control on 1,000 Services / 10,000 endpoints serving 50 in-process xDS clients
//!   (`nm-xds-load`, each subscribed to 100 Services): time to sync all, mesh-control's memory
//!   and CPU, and propagation of one endpoint change to all 50.

use std::{
    fs,
    io::{BufRead, BufReader},
    process::{Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant, SystemTime},
};

use anyhow::Context;
use nodemesh_tests::{Registration, SimCluster, SimNode, mesh, netns};
use serde_json::Value;

const TOGGLES: usize = 30;
/// How often the 2-node run polls the nodes' config dumps (its resolution).
const POLL: Duration = Duration::from_millis(2);
const SERVICES: usize = 1000;
const ENDPOINTS_PER_SERVICE: usize = 10;
const LOAD_NODES: usize = 50;
const WATCHED: &str = "outbound|80||svc-0.bench.svc.cluster.local";

/// (p50, p99) in milliseconds.
pub(crate) type Percentiles = (f64, f64);

pub(crate) struct ControlRun {
    /// Endpoint change → both nodes of the simulated cluster.
    pub cluster: Percentiles,
    pub scale: Scale,
}

/// mesh-control at 1,000 services / 10,000 endpoints / 50 clients.
pub(crate) struct Scale {
    /// Endpoint change → all 50 clients.
    pub propagation: Percentiles,
    pub sync_ms: f64,
    pub rss_mib: f64,
    pub hwm_mib: f64,
    pub sync_cpu_s: f64,
}

pub(crate) fn run() -> anyhow::Result<ControlRun> {
    crate::util::step("control plane: propagation on a 2-node simulated cluster");
    let cluster = cluster_propagation()?;
    crate::util::step("control plane: 1,000 services / 10,000 endpoints / 50 xDS clients");
    Ok(ControlRun { cluster, scale: scale()? })
}

fn percentiles(mut v: Vec<f64>) -> Percentiles {
    v.sort_by(f64::total_cmp);
    let at = |q: f64| v[((v.len() as f64 * q).ceil() as usize).clamp(1, v.len()) - 1];
    (at(0.5), at(0.99))
}

fn workload_entry(namespace: &str, name: &str, address: &str, app: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {{name: {name}, namespace: {namespace}}}\n\
         spec: {{address: {address}, labels: {{app: {app}}}}}\n"
    )
}

fn cluster_propagation() -> anyhow::Result<Percentiles> {
    let mut cluster = SimCluster::new(2)?;
    cluster.write_config("web.yaml", &mesh::service_yaml("web", "10.96.0.10", "web"));
    cluster.start(&[], &[])?;
    let web = "outbound|80||web.shop.svc.cluster.local";
    let mut clients = Vec::new();
    for (i, node) in cluster.nodes.iter_mut().enumerate() {
        let client = node.add_pod(&format!("client{i}"), "shop")?;
        node.register(&client, &Registration::meshed())?;
        clients.push(client);
    }
    let server = cluster.nodes[0].add_pod("web0", "shop")?;
    cluster.nodes[0].register(&server, &mesh::labelled("web"))?;
    cluster.nodes[0].serve(&server, &[server.addr(8080)])?;
    // Each node dials the VIP once, so each holds web's cluster.
    for (node, client) in cluster.nodes.iter().zip(&clients) {
        mesh::wait_until(Duration::from_secs(20), POLL, || {
            mesh::answered(node, client, "10.96.0.10:80") && mesh::endpoint_count(node, web) == 1
        })
        .context("web never reached both nodes")?;
    }
    let vm = workload_entry("shop", "vm0", &cluster.nodes[1].pod_ip4(200).to_string(), "web");
    let mut samples = Vec::new();
    for k in 0..TOGGLES {
        let started = Instant::now();
        let want = if k % 2 == 0 {
            cluster.write_config("vm.yaml", &vm);
            2
        } else {
            cluster.remove_config("vm.yaml")?;
            1
        };
        mesh::wait_until(Duration::from_secs(10), POLL, || {
            cluster.nodes.iter().all(|n| mesh::endpoint_count(n, web) == want)
        })
        .context("an endpoint change never reached both nodes")?;
        samples.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    Ok(percentiles(samples))
}

fn now_us() -> u128 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_micros())
}

/// 1,000 Services, each selecting 10 WorkloadEntries, 100 Services per file.
fn write_scale_config(dir: &std::path::Path) -> anyhow::Result<()> {
    fs::create_dir_all(dir)?;
    for file in 0..SERVICES / 100 {
        let mut text = String::new();
        for i in file * 100..(file + 1) * 100 {
            let vip = format!("10.96.{}.{}", i / 250, i % 250 + 1);
            text.push_str(&format!(
                "apiVersion: v1\nkind: Service\nmetadata: {{name: svc-{i}, namespace: bench}}\n\
                 spec: {{clusterIP: {vip}, selector: {{app: svc-{i}}}, ports: [{{name: tcp, port: 80, targetPort: 8080}}]}}\n---\n"
            ));
            for j in 0..ENDPOINTS_PER_SERVICE {
                let n = i * ENDPOINTS_PER_SERVICE + j;
                let address = format!("10.80.{}.{}", n / 250, n % 250 + 1);
                text.push_str(&workload_entry(
                    "bench",
                    &format!("svc-{i}-{j}"),
                    &address,
                    &format!("svc-{i}"),
                ));
                text.push_str("---\n");
            }
        }
        fs::write(dir.join(format!("services-{file:02}.yaml")), text)?;
    }
    Ok(())
}

fn scale() -> anyhow::Result<Scale> {
    let mut node = SimNode::new()?;
    let config = node.work_dir.join("scale-config");
    write_scale_config(&config)?;
    node.control_plane().start(&config, &[])?;
    let pid = node.control_plane().pid().context("mesh-control pid")?;
    let cpu_before = crate::bench::cpu_seconds(pid)?;

    let mut load = Command::new("nsenter")
        .arg(format!("--net={}", netns::path(&node.node_netns).display()))
        .arg(nodemesh_tests::bin("nm-xds-load")?)
        .args(["--xds", nodemesh_tests::CONTROL_PLANE_URL, "--nodes", &LOAD_NODES.to_string()])
        .args(["--services", &SERVICES.to_string(), "--per-node", "100", "--watch-cluster", WATCHED])
        .stdout(Stdio::piped())
        .spawn()
        .context("starting nm-xds-load")?;
    let stdout = load.stdout.take().context("nm-xds-load stdout")?;
    let (tx, rx) = mpsc::channel::<Value>();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Ok(v) = serde_json::from_str(&line) {
                let _ = tx.send(v);
            }
        }
    });
    let result = (|| -> anyhow::Result<Scale> {
        let mut counts = vec![0u64; LOAD_NODES];
        let apply = |counts: &mut Vec<u64>, v: &Value| {
            if v["event"] == "endpoints"
                && let Some(n) = v["node"].as_u64()
            {
                counts[n as usize] = v["count"].as_u64().unwrap_or(0);
            }
        };
        let sync_ms = loop {
            let v = rx.recv_timeout(Duration::from_secs(120)).context("nm-xds-load never synced")?;
            apply(&mut counts, &v);
            if v["event"] == "synced" {
                break v["ms"].as_f64().unwrap_or_default();
            }
        };
        let sync_cpu_s = crate::bench::cpu_seconds(pid)? - cpu_before;
        let (rss, hwm) = crate::bench::memory_kib(pid)?;
        let base = ENDPOINTS_PER_SERVICE as u64;
        let mut samples = Vec::new();
        for k in 0..TOGGLES {
            let want = if k % 2 == 0 { base + 1 } else { base };
            let t0 = now_us();
            if k % 2 == 0 {
                mesh::write_config(
                    &config,
                    "extra.yaml",
                    &workload_entry("bench", "svc-0-extra", "10.81.0.1", "svc-0"),
                );
            } else {
                fs::remove_file(config.join("extra.yaml"))?;
            }
            let mut last = t0;
            while counts.iter().any(|c| *c != want) {
                let v =
                    rx.recv_timeout(Duration::from_secs(20)).context("a change never reached all clients")?;
                apply(&mut counts, &v);
                if v["count"].as_u64() == Some(want) {
                    last = last.max(v["at_us"].as_u64().unwrap_or_default() as u128);
                }
            }
            samples.push((last - t0) as f64 / 1000.0);
        }
        Ok(Scale {
            propagation: percentiles(samples),
            sync_ms,
            rss_mib: rss as f64 / 1024.0,
            hwm_mib: hwm as f64 / 1024.0,
            sync_cpu_s,
        })
    })();
    let _ = load.kill();
    let _ = load.wait();
    result
}
