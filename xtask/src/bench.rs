//! `cargo xtask bench`: direct pod→pod vs through mesh-node, side by side in one run, on the
//! same simulated node. Appends one dated row per run to bench/RESULTS.md. Numbers are a
//! baseline, not gates.

use std::{fs, time::Instant};

use anyhow::Context;
use nodemesh_tests::{Pod, Registration, SimNode};
use serde_json::Value;

use crate::{setup, util};

const CONNECTS: &str = "3000";
const LATENCY_RATE: &str = "1000";
const LATENCY_COUNT: &str = "10000";
const BULK_BYTES: &str = "1073741824";

pub(crate) struct Run {
    connect_per_sec: f64,
    p50_us: f64,
    p99_us: f64,
    gbit_per_s: f64,
}

pub(crate) fn run(graph_only: bool) -> anyhow::Result<()> {
    setup::run()?;
    util::build_release()?;
    if graph_only {
        let stamp = format!("| {} | {} |", util::output("date", &["-u", "+%Y-%m-%d %H:%M"])?, commit()?);
        return write_rows(vec![(GRAPH_TABLE, graph_row(&stamp)?)]);
    }
    let mut node = SimNode::new()?;
    let direct_client = node.add_pod("direct", "bench")?;
    let mesh_client = node.add_pod("meshed", "bench")?;
    let server = node.add_pod("server", "bench")?;
    node.start_mesh_node(&[])?;
    node.register(&direct_client, &Registration::opted_out())?;
    node.register(&mesh_client, &Registration::meshed())?;
    node.serve(&server, &[server.addr(9000)])?;
    let pid = node.mesh_node_pid().context("mesh-node pid")?;

    util::step("direct pod -> pod");
    let direct = measure(&node, &direct_client, &server)?;
    util::step("pod -> mesh-node -> pod");
    let cpu_before = cpu_seconds(pid)?;
    let started = Instant::now();
    let mesh = measure(&node, &mesh_client, &server)?;
    let cpu_pct = (cpu_seconds(pid)? - cpu_before) / started.elapsed().as_secs_f64() * 100.0;
    let (rss_kib, hwm_kib) = memory_kib(pid)?;
    let opened = node
        .metrics()?
        .sum("istio_tcp_connections_opened_total", &[("reporter", "source"), ("source_workload", "meshed")]);
    anyhow::ensure!(opened > 3000.0, "meshed runs did not go through mesh-node ({opened} connections)");

    // Both tables' rows start with when and at which commit.
    let stamp = format!("| {} | {} |", util::output("date", &["-u", "+%Y-%m-%d %H:%M"])?, commit()?);
    let row = format!(
        "{stamp} {cd:.0} / {cm:.0} | {p50d:.0} / {p50m:.0} | {p99d:.0} / {p99m:.0} | {gd:.2} / {gm:.2} | {rss:.1} ({hwm:.1}) | {cpu:.0}% |",
        cd = direct.connect_per_sec,
        cm = mesh.connect_per_sec,
        p50d = direct.p50_us,
        p50m = mesh.p50_us,
        p99d = direct.p99_us,
        p99m = mesh.p99_us,
        gd = direct.gbit_per_s,
        gm = mesh.gbit_per_s,
        rss = rss_kib as f64 / 1024.0,
        hwm = hwm_kib as f64 / 1024.0,
        cpu = cpu_pct,
    );
    drop(node);
    let http = crate::bench_http::run()?;
    let http_rows: Vec<String> = http
        .protocols
        .iter()
        .map(|r| {
            let three = |f: fn(&crate::bench_http::Figures) -> f64, digits: usize| {
                [&r.direct, &r.mesh, &r.envoy].map(|x| format!("{:.*}", digits, f(x))).join(" / ")
            };
            format!(
                "{stamp} {} | {} | {} | {} |",
                r.protocol,
                three(|x| x.0, 0),
                three(|x| x.1, 0),
                three(|x| x.2, 0)
            )
        })
        .collect();
    let observed_rows: Vec<String> = http
        .protocols
        .iter()
        .map(|r| {
            let four = |f: fn(&crate::bench_http::Figures) -> f64| {
                [&r.mesh, &r.logged, &r.traced_1, &r.traced_100].map(|x| format!("{:.0}", f(x))).join(" / ")
            };
            format!(
                "{stamp} {} | {} | {} | {} | {} / {} |",
                r.protocol,
                four(|x| x.0),
                four(|x| x.1),
                four(|x| x.2),
                http.lines_written,
                http.spans_received
            )
        })
        .collect();
    let x = crate::bench_mtls::run()?;
    let cross = |f: fn(&Run) -> f64, digits: usize| {
        [&x.direct, &x.plaintext, &x.mtls].map(|r| format!("{:.*}", digits, f(r))).join(" / ")
    };
    let mtls_row = format!(
        "{stamp} {} | {} | {} | {} | {:.0} |",
        cross(|r| r.connect_per_sec, 0),
        cross(|r| r.p50_us, 0),
        cross(|r| r.p99_us, 0),
        cross(|r| r.gbit_per_s, 2),
        x.handshakes_per_sec
    );
    let cross_http_rows: Vec<String> = x
        .http
        .iter()
        .map(|(protocol, direct, meshed)| {
            format!(
                "{stamp} {protocol} | {:.0} / {:.0} | {:.0} / {:.0} | {:.0} / {:.0} |",
                direct.0, meshed.0, direct.1, meshed.1, direct.2, meshed.2
            )
        })
        .collect();
    let c = crate::bench_control::run()?;
    let control_row = format!(
        "{stamp} {p50:.0} / {p99:.0} | {sp50:.0} / {sp99:.0} | {sync:.0} | {rss:.1} ({hwm:.1}) | {cpu:.2} |",
        p50 = c.cluster.0,
        p99 = c.cluster.1,
        sp50 = c.scale.propagation.0,
        sp99 = c.scale.propagation.1,
        sync = c.scale.sync_ms,
        rss = c.scale.rss_mib,
        hwm = c.scale.hwm_mib,
        cpu = c.scale.sync_cpu_s,
    );
    let d = crate::bench_discovery::run()?;
    let discovery_row = format!(
        "{stamp} {pods} | {p50:.0} / {p99:.0} | {rss:.1} ({hwm:.1}) |",
        pods = crate::bench_discovery::PODS,
        p50 = d.p50_ms,
        p99 = d.p99_ms,
        rss = d.rss_mib,
        hwm = d.hwm_mib,
    );
    let u = crate::bench_upgrade::run()?;
    let upgrade_row = format!(
        "{stamp} {requests} | {failed} | {broken} / {short} | {before:.1} / {during:.1} | {switch:.2} |",
        requests = u.requests,
        failed = u.failed,
        broken = u.streams_broken,
        short = u.short_tcp_failed,
        before = u.p99_before_ms,
        during = u.p99_during_ms,
        switch = u.switch_s,
    );
    let graph_row = graph_row(&stamp)?;
    let mut rows = vec![
        (DATA_PATH_TABLE, row),
        (MTLS_TABLE, mtls_row),
        (CONTROL_TABLE, control_row),
        (DISCOVERY_TABLE, discovery_row),
        (UPGRADE_TABLE, upgrade_row),
        (GRAPH_TABLE, graph_row),
    ];
    rows.extend(http_rows.into_iter().map(|r| (HTTP_TABLE, r)));
    rows.extend(cross_http_rows.into_iter().map(|r| (CROSS_HTTP_TABLE, r)));
    rows.extend(observed_rows.into_iter().map(|r| (OBSERVABILITY_TABLE, r)));
    write_rows(rows)
}

/// The service-graph table's row.
fn graph_row(stamp: &str) -> anyhow::Result<String> {
    let g = crate::bench_graph::run()?;
    Ok(format!(
        "{stamp} {nodes} | {page:.2} ({lines}) | {cpu:.0} | {share:.1}% | {rss:.1} ({hwm:.1}) | {view:.1} |",
        nodes = crate::bench_graph::NODES,
        page = g.page_mib,
        lines = g.series_lines,
        cpu = g.cpu_ms_per_round,
        share = g.cpu_ms_per_round / 5000.0 * 100.0,
        rss = g.rss_mib,
        hwm = g.hwm_mib,
        view = g.view_ms,
    ))
}

/// Appends each row to its table in bench/RESULTS.md.
fn write_rows(rows: Vec<(&str, String)>) -> anyhow::Result<()> {
    let path = util::workspace_root()?.join("bench/RESULTS.md");
    let mut text = fs::read_to_string(&path).unwrap_or_else(|_| HEADER.to_string());
    for (table, row) in rows {
        text = insert_row(&text, table, &row);
        println!("\n{table}\n{row}");
    }
    fs::write(&path, text)?;
    println!("\nwritten to {}", path.display());
    Ok(())
}

const DATA_PATH_TABLE: &str = "| date (UTC) | commit | connect/s | p50 µs | p99 µs | Gbit/s | mesh-node RSS MiB (peak) | mesh-node CPU |";
const MTLS_TABLE: &str = "| date (UTC) | commit | connect/s direct / mesh plaintext / mesh mTLS | p50 µs | p99 µs | Gbit/s | mTLS handshakes/s |";
const HTTP_TABLE: &str = "| date (UTC) | commit | protocol | p50 µs direct / mesh-node / Envoy | p99 µs direct / mesh-node / Envoy | max req/s direct / mesh-node / Envoy |";
const OBSERVABILITY_TABLE: &str = "| date (UTC) | commit | protocol | p50 µs off / logs / trace 1% / trace 100% | p99 µs off / logs / trace 1% / trace 100% | max req/s off / logs / trace 1% / trace 100% | log lines / spans received (both protocols) |";
const CROSS_HTTP_TABLE: &str = "| date (UTC) | commit | protocol | p50 µs direct / mesh mTLS | p99 µs direct / mesh mTLS | max req/s direct / mesh mTLS |";
const DISCOVERY_TABLE: &str = "| date (UTC) | commit | pods | Pod object → first captured connection p50 / p99 ms | mesh-node RSS MiB with the pods (peak) |";
const UPGRADE_TABLE: &str = "| date (UTC) | commit | HTTP requests | failed | TCP streams broken / short connections failed | p99 ms before / during the switch | switch s |";
const GRAPH_TABLE: &str = "| date (UTC) | commit | nodes | page MiB (series lines) | mesh-control CPU ms per scrape round | CPU at the default 5 s interval | mesh-control RSS MiB (peak) | /graph/data p50 ms |";
const CONTROL_TABLE: &str = "| date (UTC) | commit | 2 nodes: p50 / p99 ms | 50 clients: p50 / p99 ms | sync 50 clients ms | mesh-control RSS MiB (peak) | mesh-control CPU s to sync |";

/// `text` with `row` added at the end of the table whose header line is `header` (a new
/// table at the end of the file if there is none).
pub(crate) fn insert_row(text: &str, header: &str, row: &str) -> String {
    let mut lines: Vec<&str> = text.lines().collect();
    match lines.iter().position(|l| *l == header) {
        Some(start) => {
            let end =
                lines[start..].iter().position(|l| !l.starts_with('|')).map_or(lines.len(), |i| start + i);
            lines.insert(end, row);
        }
        None => {
            let separator = header.split(" | ").map(|_| "---").collect::<Vec<_>>().join("|");
            let separator = format!("|{separator}|");
            lines.extend(["", header]);
            let mut out = lines.join("\n");
            out.push_str(&format!("\n{separator}\n{row}\n"));
            return out;
        }
    }
    let mut out = lines.join("\n");
    out.push('\n');
    out
}

const HEADER: &str = "# Benchmarks

`cargo xtask bench` adds one row to each table per run.

## Data path

One simulated node (2-core machine); a client pod
talks to a server pod on the same node bridge, first directly (client opted out), then captured
through mesh-node. Each cell is **direct / mesh-node**.

- connect/s: sequential connect + 1 round trip + close, 3,000 times, one client.
- latency: 1 KiB echo on one connection, open loop at 1,000 req/s for 10,000 requests,
  measured from each request's scheduled send time (µs).
- throughput: one 1 GiB upload, checksum verified (Gbit/s).
- mesh-node RSS after the run in MiB (peak), and its CPU use over the meshed phase
  (100% = one core).

| date (UTC) | commit | connect/s | p50 µs | p99 µs | Gbit/s | mesh-node RSS MiB (peak) | mesh-node CPU |
|---|---|---|---|---|---|---|---|
";

pub(crate) fn measure(node: &SimNode, client: &Pod, server: &Pod) -> anyhow::Result<Run> {
    let to = server.addr(9000).to_string();
    let get = |v: &Value, k: &str| -> anyhow::Result<f64> {
        v[k].as_f64().with_context(|| format!("nm-testapp result has no {k}: {v}"))
    };
    let c = node.testapp(client, &["bench-connect", "--to", &to, "--count", CONNECTS])?;
    let l = node
        .testapp(client, &["bench-latency", "--to", &to, "--rate", LATENCY_RATE, "--count", LATENCY_COUNT])?;
    let b = node.testapp(client, &["bench-bulk", "--to", &to, "--bytes", BULK_BYTES])?;
    Ok(Run {
        connect_per_sec: get(&c, "per_sec")?,
        p50_us: get(&l, "p50_us")?,
        p99_us: get(&l, "p99_us")?,
        gbit_per_s: get(&b, "mbit_per_s")? / 1000.0,
    })
}

pub(crate) fn commit() -> anyhow::Result<String> {
    let root = util::workspace_root()?;
    let root = root.to_str().unwrap_or(".");
    let sha = util::output("git", &["-C", root, "rev-parse", "--short", "HEAD"])?;
    let dirty =
        !util::output("git", &["-C", root, "status", "--porcelain", "--untracked-files=no"])?.is_empty();
    Ok(if dirty { format!("{sha}+dirty") } else { sha })
}

/// utime + stime of a process, in seconds.
pub(crate) fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name, which is in parentheses and may contain spaces.
    let rest = stat.rsplit_once(')').context("malformed stat")?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields[11].parse::<f64>()? + fields[12].parse::<f64>()?;
    let hz: f64 = util::output("getconf", &["CLK_TCK"])?.parse()?;
    Ok(ticks / hz)
}

/// VmRSS and VmHWM in KiB.
pub(crate) fn memory_kib(pid: u32) -> anyhow::Result<(u64, u64)> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| -> anyhow::Result<u64> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .with_context(|| format!("{name} missing"))
    };
    Ok((field("VmRSS:")?, field("VmHWM:")?))
}
