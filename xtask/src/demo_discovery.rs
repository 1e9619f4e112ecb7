//! The demo's Kubernetes step: a node whose pods mesh-node finds by itself. An in-test API
//! server holds the Pod and Namespace objects, the pods are laid out as kubelet lays them out,
//! mesh-node runs with `--kubernetes` and nobody calls `workload add`; labelling the namespace
//! at runtime starts capture.

use std::{
    net::TcpListener,
    time::{Duration, Instant},
};

use anyhow::Context;
use nodemesh_tests::{
    Pod, SimNode,
    kube_api::FakeApiServer,
    kubelet::{CgroupDriver, Qos, namespace_object},
    netns,
};

use crate::util;

pub(crate) fn run() -> anyhow::Result<()> {
    util::step("Kubernetes pod discovery: a node whose pods mesh-node finds itself (no `workload add`)");
    let mut node = SimNode::new()?;
    let listener = netns::run_in(&node.node_netns, || Ok(TcpListener::bind("127.0.0.1:0")?))?;
    let api = FakeApiServer::start(listener)?;
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

/// Whether a connection from `pod` went through mesh-node (its socket's local address is then
/// mesh-node's listener in the pod, 127.0.0.1).
fn path(node: &SimNode, pod: &Pod, to: &str) -> anyhow::Result<&'static str> {
    let r = node.testapp(pod, &["client", "--mode", "hello", "--to", to])?;
    let local = r["connections"][0]["local"].as_str().with_context(|| format!("{r}"))?;
    Ok(if local.starts_with("127.0.0.1:") { CAPTURED } else { "direct" })
}

fn print_workloads(node: &SimNode) -> anyhow::Result<()> {
    let socket = node.api_socket().display().to_string();
    let list: serde_json::Value =
        serde_json::from_str(&node.mesh_node_cli(&["workload", "--api-socket", &socket, "list"])?)?;
    println!("  mesh-node workload list:");
    for w in list.as_array().into_iter().flatten() {
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
