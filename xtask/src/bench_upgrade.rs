//! Upgrade under load: on a two-node mTLS cluster, `nm-testapp steady` runs for
//! [`SECONDS`] while mesh-node on both nodes is replaced by a new process (server's node
//! first) at [`SWITCH_AT`]; the old processes drain and go on SIGTERM.

use std::time::{Duration, Instant};

use anyhow::Context;
use nodemesh_tests::{
    bin,
    lifecycle::{SteadyTotals, steady_args, web_cluster},
};
use serde_json::Value;

const SECONDS: u64 = 20;
const SWITCH_AT: Duration = Duration::from_secs(6);

pub(crate) struct Upgrade {
    pub requests: u64,
    pub failed: u64,
    pub streams_broken: u64,
    /// Short TCP connections (each a new tunnel stream) that failed.
    pub short_tcp_failed: u64,
    /// Highest per-second p99 before the switch, and in the seconds it took.
    pub p99_before_ms: f64,
    pub p99_during_ms: f64,
    /// From the first new process's start to the second one serving.
    pub switch_s: f64,
}

pub(crate) fn run() -> anyhow::Result<Upgrade> {
    crate::util::step("upgrade under load: replacing mesh-node on both nodes");
    let (mut cluster, client) = web_cluster(&[], &[])?;
    let started = Instant::now();
    let load = cluster.nodes[0].start_in(&client, &bin("nm-testapp")?, &steady_args(SECONDS))?;
    std::thread::sleep(SWITCH_AT);
    let switch_began = started.elapsed();
    for node in [1, 0] {
        cluster.nodes[node].upgrade_mesh_node()?;
    }
    let switch_ended = started.elapsed();
    for node in &mut cluster.nodes {
        node.stop_retired(Duration::from_secs(60))?;
    }
    let out: Value =
        serde_json::from_str(load.finish(Duration::from_secs(90))?.trim()).context("steady output")?;
    let totals = SteadyTotals::of(&out);
    let seconds = out["per_second"].as_array().context("per_second")?;
    let max_p99 = |from: u64, to: u64| {
        seconds
            .iter()
            .filter(|s| (from..=to).contains(&s["second"].as_u64().unwrap_or(u64::MAX)))
            .filter_map(|s| s["p99_ms"].as_f64())
            .fold(0.0, f64::max)
    };
    let (begin, end) = (switch_began.as_secs(), switch_ended.as_secs());
    Ok(Upgrade {
        requests: totals.requests,
        failed: totals.failed,
        streams_broken: totals.streams_broken,
        short_tcp_failed: totals.short_tcp_failed,
        // Second 0 includes connection set-up; the second the switch began is "during".
        p99_before_ms: max_p99(1, begin.saturating_sub(1)),
        p99_during_ms: max_p99(begin, end),
        switch_s: (switch_ended - switch_began).as_secs_f64(),
    })
}
