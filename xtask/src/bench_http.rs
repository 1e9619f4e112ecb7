//! HTTP benchmarks for `cargo xtask bench`: one simulated node with mesh-control, an HTTP server
//! pod behind a Service whose port declares no protocol, and three ways to reach it in one run:
//! - **direct**: an opted-out client pod to the server pod;
//! - **mesh-node**: a meshed client to the Service VIP (detected as HTTP, balanced per request);
//! - **Envoy**: the opted-out client to a real Envoy 1.40 running in the node netns as the node
//!   proxy (static config, same upstream protocol as downstream), the reference L7 proxy.
//!
//! For HTTP/1.1 and h2c each: latency (one connection, open loop at 1,000 req/s, 5,000
//! requests, p50/p99 from each request's scheduled time) and max RPS (16 requests in flight for
//! 5 s: 16 keep-alive connections, or 16 streams on one h2 connection). Then mesh-node again
//! with access logs on for every request (MeshConfig `accessLogFile`, Envoy's default text
//! format, to a file), then with tracing at 1% and 100% sampling (spans to a Zipkin receiver
//! on the node's loopback): what each costs.

use std::time::Duration;

use anyhow::Context;
use nodemesh_tests::{
    CONTROL_PLANE_URL, Pod, Registration, SimNode, envoy, mesh,
    trace_collectors::{Collector, TraceCollectors},
};
use serde_json::Value;

const VIP: &str = "10.96.0.30";
const ENVOY_PORT: u16 = 15080;

/// p50 µs, p99 µs, requests/s.
pub(crate) type Figures = (f64, f64, f64);

pub(crate) struct ProtocolRun {
    pub protocol: &'static str,
    pub direct: Figures,
    pub mesh: Figures,
    pub envoy: Figures,
    /// mesh-node again with telemetry on: every request access-logged; then traced at 1%
    /// and at 100% sampling (access logs off).
    pub logged: Figures,
    pub traced_1: Figures,
    pub traced_100: Figures,
}

pub(crate) struct HttpRuns {
    pub protocols: Vec<ProtocolRun>,
    /// Access-log lines written during the logged runs (one per request unless some dropped).
    pub lines_written: usize,
    /// Spans the collector took during the traced runs.
    pub spans_received: usize,
}

pub(crate) fn run() -> anyhow::Result<HttpRuns> {
    let mut node = SimNode::new()?;
    let config = node.work_dir.join("config");
    std::fs::create_dir_all(&config)?;
    mesh::write_config(
        &config,
        "web.yaml",
        &format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: bench}}\n\
             spec:\n  clusterIP: {VIP}\n  selector: {{app: web}}\n  ports: [{{name: web, port: 80, targetPort: 8080}}]\n"
        ),
    );
    node.start_control_plane(&config)?;
    // mesh-control runs a CA, so every report must carry the node's token.
    let token = node.write_own_node_token()?;
    node.start_mesh_node(&["--control-plane", CONTROL_PLANE_URL, "--token-file", &token])?;
    let plain = node.add_pod("plain", "bench")?;
    node.register(&plain, &Registration::opted_out())?;
    let meshed = node.add_pod("meshed", "bench")?;
    node.register(&meshed, &Registration::meshed())?;
    let server = node.add_pod("web", "bench")?;
    node.register(&server, &mesh::labelled("web"))?;
    node.serve_http(&server, &[server.addr(8080)])?;
    let vip = format!("{VIP}:80");
    mesh::wait_until(Duration::from_secs(20), Duration::from_millis(100), || {
        node.testapp(&meshed, &["http-client", "--to", &vip, "--requests", "3"])
            .is_ok_and(|r| r["statuses"]["200"] == 3)
    })
    .context("the Service VIP never answered HTTP through mesh-node")?;
    let envoy = start_envoy(&mut node, &server)?;

    let mut runs = Vec::new();
    for (protocol, h2) in [("HTTP/1.1", false), ("h2c", true)] {
        crate::util::step(&format!("HTTP bench, {protocol}: direct, mesh-node, Envoy"));
        let direct = measure(&node, &plain, &server.addr(8080).to_string(), h2)?;
        let mesh = measure(&node, &meshed, &vip, h2)?;
        let via_envoy = measure(&node, &plain, &envoy, h2)?;
        runs.push((protocol, h2, direct, mesh, via_envoy));
    }
    let measure_all = |what: &str| -> anyhow::Result<Vec<Figures>> {
        runs.iter()
            .map(|(protocol, h2, ..)| {
                crate::util::step(&format!("HTTP bench, {protocol}: mesh-node with {what}"));
                measure(&node, &meshed, &vip, *h2)
            })
            .collect()
    };
    let log = log_everything(&node, &config, &meshed, &vip)?;
    let lines_before = count_lines(&log);
    let logged = measure_all("access logs on")?;
    // The writer thread may still be draining its queue.
    std::thread::sleep(Duration::from_millis(500));
    let lines_written = count_lines(&log) - lines_before;

    let collectors =
        TraceCollectors::start(&node.node_netns, std::net::Ipv4Addr::LOCALHOST.into(), &node.work_dir)?;
    trace_everything(&node, &config, &collectors, 1.0)?;
    let before = collectors.spans(Collector::Zipkin).len();
    let traced_1 = measure_all("tracing at 1%")?;
    trace_everything(&node, &config, &collectors, 100.0)?;
    let traced_100 = measure_all("tracing at 100%")?;
    // The exporter sends what it holds within a second.
    std::thread::sleep(Duration::from_secs(2));
    let spans_received = collectors.spans(Collector::Zipkin).len() - before;

    let protocols = runs
        .into_iter()
        .zip(logged)
        .zip(traced_1.into_iter().zip(traced_100))
        .map(|(((protocol, _, direct, mesh, envoy), logged), (traced_1, traced_100))| ProtocolRun {
            protocol,
            direct,
            mesh,
            envoy,
            logged,
            traced_1,
            traced_100,
        })
        .collect();
    Ok(HttpRuns { protocols, lines_written, spans_received })
}

/// Turns access logs off and tracing on for every workload at `percent`, spans to the
/// collectors' Zipkin receiver; waits until the node runs it.
fn trace_everything(
    node: &SimNode,
    config: &std::path::Path,
    collectors: &TraceCollectors,
    percent: f64,
) -> anyhow::Result<()> {
    let zipkin = collectors.zipkin;
    mesh::write_config(
        config,
        "mesh.yaml",
        &format!(
            "apiVersion: nodemesh.io/v1alpha1\nkind: MeshConfig\nmetadata: {{name: mesh}}\nspec:\n  \
             extensionProviders: [{{name: zipkin, zipkin: {{service: \"{}\", port: {}}}}}]\n",
            zipkin.ip(),
            zipkin.port()
        ),
    );
    mesh::write_config(
        config,
        "telemetry.yaml",
        &format!(
            "apiVersion: telemetry.istio.io/v1\nkind: Telemetry\nmetadata: {{name: mesh-default, namespace: istio-system}}\n\
             spec:\n  tracing: [{{providers: [{{name: zipkin}}], randomSamplingPercentage: {percent}}}]\n"
        ),
    );
    node.wait_for_config()?;
    Ok(())
}

/// Turns access logs on for every workload, to a file in the node's work dir, and waits until
/// a request of `client` is logged; returns the file.
fn log_everything(
    node: &SimNode,
    config: &std::path::Path,
    client: &Pod,
    vip: &str,
) -> anyhow::Result<std::path::PathBuf> {
    let log = node.work_dir.join("access.log");
    mesh::write_config(
        config,
        "mesh.yaml",
        &format!(
            "apiVersion: nodemesh.io/v1alpha1\nkind: MeshConfig\nmetadata: {{name: mesh}}\n\
             spec: {{accessLogFile: {}}}\n",
            log.display()
        ),
    );
    mesh::wait_until(Duration::from_secs(20), Duration::from_millis(100), || {
        node.testapp(client, &["http-client", "--to", vip, "--requests", "1"]).is_ok()
            && count_lines(&log) > 0
    })
    .context("access logs never came on")?;
    Ok(log)
}

fn count_lines(path: &std::path::Path) -> usize {
    std::fs::read(path).map_or(0, |b| b.iter().filter(|c| **c == b'\n').count())
}

pub(crate) fn measure(node: &SimNode, client: &Pod, to: &str, h2: bool) -> anyhow::Result<Figures> {
    let mut args = vec!["bench-http", "--to", to, "--rate", "1000", "--count", "5000", "--concurrency", "16"];
    if h2 {
        args.push("--h2");
    }
    let r = node.testapp(client, &args)?;
    let get =
        |v: &Value, k: &str| v[k].as_f64().with_context(|| format!("bench-http to {to}: no {k} in {v}"));
    Ok((get(&r, "p50_us")?, get(&r, "p99_us")?, get(&r, "rps")?))
}

/// Envoy in the node netns on the node's bridge address, proxying to `server` with the
/// downstream's protocol. Returns the address clients dial.
fn start_envoy(node: &mut SimNode, server: &Pod) -> anyhow::Result<String> {
    let listen = std::net::SocketAddr::from((node.pod_ip4(1), ENVOY_PORT));
    let bootstrap = envoy::static_bootstrap(listen, server.addr(8080), 15099);
    envoy::start(node, &bootstrap, listen, 7)?;
    Ok(listen.to_string())
}
