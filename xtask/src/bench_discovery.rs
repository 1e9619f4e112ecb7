//! Pod discovery on one simulated node: mesh-node runs with `--kubernetes` against the in-test
//! API server; 100 pods laid out as kubelet lays them out (half under each cgroup driver) are
//! created one at a time, and each is timed from the moment its Pod object is written to the
//! API server to its first connection that mesh-node captured (the client socket's local
//! address is then mesh-node's listener on 127.0.0.1 in the pod). Each probe is one process
//! started in the pod, a few milliseconds, which bounds the resolution. Then mesh-node's RSS
//! with the 100 pods registered.

use std::time::{Duration, Instant};

use anyhow::Context;
use nodemesh_tests::{
    SimNode,
    kubelet::{CgroupDriver, Qos, namespace_object},
};

pub(crate) const PODS: usize = 100;
const PORT: u16 = 9000;
/// A pod not captured by then fails the bench.
const GIVE_UP: Duration = Duration::from_secs(10);

pub(crate) struct DiscoveryRun {
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub rss_mib: f64,
    pub hwm_mib: f64,
}

pub(crate) fn run() -> anyhow::Result<DiscoveryRun> {
    let mut node = SimNode::new()?;
    let api = node.start_api_server()?;
    api.apply(&namespace_object("bench", &[("nodemesh.io/enabled", "true")]))?;
    // The server opts out: the measure is the client's capture, not inbound delivery.
    let server = node
        .add_kube_pod("server", "bench", CgroupDriver::Systemd, Qos::Burstable)?
        .with_labels(&[("nodemesh.io/enabled", "false")]);
    api.apply(&server.object())?;
    node.serve(&server.pod, &[server.pod.addr(PORT)])?;
    node.start_mesh_node(&["--kubernetes", "--kube-api", &api.url()])?;
    let to = server.pod.addr(PORT).to_string();
    let mut pods = Vec::with_capacity(PODS);
    for i in 0..PODS {
        let driver = if i % 2 == 0 { CgroupDriver::Systemd } else { CgroupDriver::Cgroupfs };
        pods.push(node.add_kube_pod(&format!("p{i}"), "bench", driver, Qos::Burstable)?);
    }
    let mut delays_ms = Vec::with_capacity(PODS);
    for pod in &pods {
        let written = Instant::now();
        api.apply(&pod.object())?;
        while !node.connect_captured(&pod.pod, &to)? {
            anyhow::ensure!(
                written.elapsed() < GIVE_UP,
                "pod {} not captured after {GIVE_UP:?}",
                pod.pod.name
            );
        }
        delays_ms.push(written.elapsed().as_secs_f64() * 1000.0);
    }
    delays_ms.sort_by(f64::total_cmp);
    let at = |q: f64| delays_ms[((delays_ms.len() as f64 * q).ceil() as usize).clamp(1, delays_ms.len()) - 1];
    let pid = node.mesh_node_pid().context("mesh-node pid")?;
    let (rss, hwm) = crate::bench::memory_kib(pid)?;
    Ok(DiscoveryRun {
        p50_ms: at(0.50),
        p99_ms: at(0.99),
        rss_mib: rss as f64 / 1024.0,
        hwm_mib: hwm as f64 / 1024.0,
    })
}
