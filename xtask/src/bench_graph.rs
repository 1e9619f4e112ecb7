//! Service-graph benchmark for `cargo xtask bench`: mesh-control scraping 100 simulated nodes
//! (`nm-xds-load --metrics-page`), each serving the same busy node's metrics page — Istio's
//! full label set for 10 caller apps × 10 called apps × 2 response codes, with the
//! histograms and TCP series a real node has. Measures mesh-control's CPU per scrape round,
//! its memory, and how long `/graph/data` takes to answer.

use std::{
    fmt::Write as _,
    fs,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::Context;
use nodemesh_tests::{SimNode, netns};
use serde_json::Value;

pub(crate) const NODES: usize = 100;
const CALLERS: usize = 10;
const CALLEES: usize = 10;
const INTERVAL_MS: u64 = 2000;
const MEASURE: Duration = Duration::from_secs(30);
const DURATION_BUCKETS: [&str; 19] = [
    "0.5",
    "1.0",
    "5.0",
    "10.0",
    "25.0",
    "50.0",
    "100.0",
    "250.0",
    "500.0",
    "1000.0",
    "2500.0",
    "5000.0",
    "10000.0",
    "30000.0",
    "60000.0",
    "300000.0",
    "600000.0",
    "1800000.0",
    "3600000.0",
];
const SIZE_BUCKETS: [&str; 9] =
    ["1.0", "10.0", "100.0", "1000.0", "10000.0", "100000.0", "1000000.0", "10000000.0", "100000000.0"];

pub(crate) struct GraphRun {
    pub page_mib: f64,
    pub series_lines: usize,
    pub cpu_ms_per_round: f64,
    pub rss_mib: f64,
    pub hwm_mib: f64,
    pub view_ms: f64,
}

/// The labels a node's series carry for caller `i` → callee `j`.
fn labels(i: usize, j: usize, reporter: &str) -> String {
    format!(
        "reporter=\"{reporter}\",source_workload=\"caller-{i}-v1\",source_workload_namespace=\"shop\",\
         source_principal=\"spiffe://cluster.local/ns/shop/sa/caller-{i}\",source_app=\"caller-{i}\",\
         source_version=\"v1\",source_canonical_service=\"caller-{i}\",source_canonical_revision=\"v1\",\
         source_cluster=\"Kubernetes\",destination_workload=\"callee-{j}-v1\",\
         destination_workload_namespace=\"shop\",destination_principal=\"spiffe://cluster.local/ns/shop/sa/callee-{j}\",\
         destination_app=\"callee-{j}\",destination_version=\"v1\",destination_canonical_service=\"callee-{j}\",\
         destination_canonical_revision=\"v1\",destination_cluster=\"Kubernetes\",\
         destination_service=\"callee-{j}.shop.svc.cluster.local\",destination_service_name=\"callee-{j}\",\
         destination_service_namespace=\"shop\""
    )
}

/// A busy node's page, in the OpenMetrics text mesh-node writes; (page, series lines).
fn node_page() -> (String, usize) {
    let mut out = String::new();
    let mut lines = 0;
    let mut line = |out: &mut String, text: String| {
        out.push_str(&text);
        out.push('\n');
        lines += 1;
    };
    for i in 0..CALLERS {
        for j in 0..CALLEES {
            let base = labels(i, j, "source");
            for code in ["200", "503"] {
                let request = format!(
                    "{base},request_protocol=\"http\",response_code=\"{code}\",grpc_response_status=\"\",\
                     response_flags=\"-\",connection_security_policy=\"mutual_tls\""
                );
                line(&mut out, format!("istio_requests_total{{{request}}} {}", 1000 + i * j));
                for (family, buckets) in [
                    ("istio_request_duration_milliseconds", &DURATION_BUCKETS[..]),
                    ("istio_request_bytes", &SIZE_BUCKETS[..]),
                    ("istio_response_bytes", &SIZE_BUCKETS[..]),
                ] {
                    line(&mut out, format!("{family}_sum{{{request}}} 123456.0"));
                    line(&mut out, format!("{family}_count{{{request}}} 1000"));
                    for le in buckets.iter().chain(["+Inf"].iter()) {
                        line(&mut out, format!("{family}_bucket{{{request},le=\"{le}\"}} 1000"));
                    }
                }
            }
            let tcp = format!(
                "{base},request_protocol=\"tcp\",response_flags=\"-\",connection_security_policy=\"mutual_tls\""
            );
            for family in [
                "istio_tcp_connections_opened_total",
                "istio_tcp_connections_closed_total",
                "istio_tcp_sent_bytes_total",
                "istio_tcp_received_bytes_total",
            ] {
                line(&mut out, format!("{family}{{{tcp}}} 4242"));
            }
        }
    }
    let _ = writeln!(out, "# EOF");
    (out, lines)
}

pub(crate) fn run() -> anyhow::Result<GraphRun> {
    crate::util::step("service graph: mesh-control scraping 100 nodes' metrics pages");
    let mut node = SimNode::new()?;
    let (page, series_lines) = node_page();
    let page_file = node.work_dir.join("node-page.txt");
    fs::write(&page_file, &page)?;
    let config = node.work_dir.join("graph-config");
    fs::create_dir_all(&config)?;
    let interval = INTERVAL_MS.to_string();
    node.control_plane().start(&config, &["--graph-scrape-interval-ms", &interval])?;
    let pid = node.control_plane().pid().context("mesh-control pid")?;
    let mut load = Command::new("nsenter")
        .arg(format!("--net={}", netns::path(&node.node_netns).display()))
        .arg(nodemesh_tests::bin("nm-xds-load")?)
        .args(["--xds", nodemesh_tests::CONTROL_PLANE_URL, "--nodes", &NODES.to_string()])
        .args(["--services", "1", "--per-node", "1", "--watch-cluster", "none"])
        .arg("--metrics-page")
        .arg(&page_file)
        .stdout(Stdio::null())
        .spawn()
        .context("starting nm-xds-load")?;
    let result = (|| -> anyhow::Result<GraphRun> {
        let control = node.control_plane();
        let scraped = |control: &nodemesh_tests::ControlPlane| -> anyhow::Result<usize> {
            let data: Value = serde_json::from_str(&control.get("/graph/data")?)?;
            Ok(data["sources"]
                .as_array()
                .map_or(0, |s| s.iter().filter(|s| s["age_seconds"].is_number()).count()))
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while scraped(control)? < NODES {
            anyhow::ensure!(Instant::now() < deadline, "mesh-control never scraped all {NODES} nodes");
            std::thread::sleep(Duration::from_millis(200));
        }
        let cpu_before = crate::bench::cpu_seconds(pid)?;
        std::thread::sleep(MEASURE);
        let cpu = crate::bench::cpu_seconds(pid)? - cpu_before;
        let rounds = MEASURE.as_millis() as f64 / INTERVAL_MS as f64;
        let (rss, hwm) = crate::bench::memory_kib(pid)?;
        let mut views = Vec::new();
        for _ in 0..10 {
            let started = Instant::now();
            control.get("/graph/data")?;
            views.push(started.elapsed().as_secs_f64() * 1000.0);
        }
        views.sort_by(f64::total_cmp);
        let failed: Value = serde_json::from_str(&control.get("/graph/data")?)?;
        let errors: Vec<&Value> =
            failed["sources"].as_array().into_iter().flatten().filter(|s| !s["error"].is_null()).collect();
        anyhow::ensure!(errors.is_empty(), "scrapes failed: {errors:?}");
        Ok(GraphRun {
            page_mib: page.len() as f64 / (1024.0 * 1024.0),
            series_lines,
            cpu_ms_per_round: cpu * 1000.0 / rounds,
            rss_mib: rss as f64 / 1024.0,
            hwm_mib: hwm as f64 / 1024.0,
            view_ms: views[views.len() / 2],
        })
    })();
    let _ = load.kill();
    let _ = load.wait();
    result
}
