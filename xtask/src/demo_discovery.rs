//! The demo's Kubernetes step: a node whose pods mesh-node finds by itself. An in-test API
//! server holds the Pod and Namespace objects, the pods are laid out as kubelet lays them out,
//! mesh-node runs with `--kubernetes` and nobody calls `workload add`; labelling the namespace
//! at runtime starts capture.

use std::time::{Duration, Instant};

use nodemesh_tests::{
    Pod, SimNode,
    kubelet::{CgroupDriver, Qos, namespace_object},
};

use crate::util;

pub(crate) fn run() -> anyhow::Result<()> {
    util::step("Kubernetes pod discovery: a node whose pods mesh-node finds itself (no `workload add`)");
    let mut node = SimNode::new()?;
    let api = node.start_api_server()?;
    api.apply(&namespace_object("payments", &[]))?;
    let client = node.add_kube_pod("checkout", "payments", CgroupDriver::Systemd, Qos::Burstable)?;
    let server = node
        .add_kube_pod("ledger", "payments", CgroupDriver::Cgroupfs, Qos::Guaranteed)?
        .with_labels(&[("nodemesh.io/enabled", "false")]);
    for pod in [&client, &server] {
        api.apply(&pod.object())?;
    }
    node.serve(&server.pod, &[server.pod.addr(9000)])?;
    node.start_mesh_node(&["--kubernetes", "--kube-api", &api.url()])?;
    let to = server.pod.addr(9000).to_string();
    println!(
        "  pods on the API server: payments/checkout (systemd cgroup driver), payments/ledger (cgroupfs, opted out)"
    );
    print_workloads(&node)?;
    println!("  checkout -> ledger: {}", path(&node, &client.pod, &to)?);
    println!("  kubectl label namespace payments nodemesh.io/enabled=true");
    api.apply(&namespace_object("payments", &[("nodemesh.io/enabled", "true")]))?;
    let labelled = Instant::now();
    while path(&node, &client.pod, &to)? != CAPTURED {
        anyhow::ensure!(
            labelled.elapsed() < Duration::from_secs(10),
            "checkout not captured 10 s after the label"
        );
    }
    println!("  checkout -> ledger: {CAPTURED} ({} ms after the label)", labelled.elapsed().as_millis());
    print_workloads(&node)?;
    Ok(())
}

const CAPTURED: &str = "captured by mesh-node";

fn path(node: &SimNode, pod: &Pod, to: &str) -> anyhow::Result<&'static str> {
    Ok(if node.connect_captured(pod, to)? { CAPTURED } else { "direct" })
}

fn print_workloads(node: &SimNode) -> anyhow::Result<()> {
    println!("  mesh-node workload list:");
    for w in node.workloads()? {
        println!(
            "    {}/{}: {} (cgroup {})",
            w["namespace"].as_str().unwrap_or_default(),
            w["name"].as_str().unwrap_or_default(),
            w["decision"].as_str().unwrap_or_default(),
            w["cgroup"]
                .as_str()
                .unwrap_or_default()
                .rsplit("kubepods")
                .next()
                .map(|c| format!("kubepods{c}"))
                .unwrap_or_default()
        );
    }
    Ok(())
}
