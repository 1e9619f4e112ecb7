//! mesh-node `--kubernetes`: a node's pods are found from the API server (pods with
//! `spec.nodeName` = the node, namespaces for the opt-in label) and captured with nobody
//! calling the local API. Pods are laid out as kubelet + containerd lay them out (see
//! `nodemesh_tests::kubelet`): pod cgroups under either cgroup driver, processes in container
//! scopes below them, the netns held by a pause process. Real eBPF, real mesh-node, the
//! in-test API server. Needs root.

use std::time::{Duration, Instant};

use nodemesh_tests::{
    HeldConnection, Pod, SimNode,
    kube_api::{API_AUDIENCE, FakeApiServer},
    kubelet::{CgroupDriver, KubePod, Qos, namespace_object},
    mesh::eventually,
    netns,
};
use serde_json::Value;

const PORT: u16 = 8080;
const OPENED: &str = "istio_tcp_connections_opened_total";
const ENABLED: (&str, &str) = ("nodemesh.io/enabled", "true");

/// A node whose API server listens in the node's netns, where mesh-node runs.
fn node_with_api() -> (SimNode, FakeApiServer) {
    let node = SimNode::new().unwrap();
    let api = node.start_api_server().unwrap();
    (node, api)
}

fn start_discovering(node: &mut SimNode, api: &FakeApiServer) {
    node.start_mesh_node(&["--kubernetes", "--kube-api", &api.url()]).unwrap();
}

const NODE_ACCOUNT_TOKEN: &str = "token-of-nodemesh-system-mesh-node";

/// Starts mesh-node as the DaemonSet runs it: as ServiceAccount nodemesh-system/mesh-node (its
/// token in a kubeconfig, which kube reads as it would in-cluster credentials), against an API
/// server enforcing the ClusterRole and binding from deploy/daemonset — so a call the role
/// does not allow fails the test.
fn start_as_daemonset_account(node: &mut SimNode, api: &FakeApiServer) {
    let rbac =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/daemonset/base/mesh-node/rbac.yaml");
    api.apply_file(&rbac).unwrap();
    api.add_token(NODE_ACCOUNT_TOKEN, "nodemesh-system", "mesh-node", &node.node_netns, API_AUDIENCE);
    api.enforce_rbac();
    let kubeconfig = node.work_dir.join("kubeconfig");
    api.write_kubeconfig(&kubeconfig, "mesh-node", NODE_ACCOUNT_TOKEN).unwrap();
    node.set_mesh_node_env("KUBECONFIG", &kubeconfig.display().to_string());
    node.start_mesh_node(&["--kubernetes"]).unwrap();
}

/// A raw GET to the API server (inside the node's netns) with `token`; the status line.
fn api_get(node: &SimNode, api: &FakeApiServer, path: &str, token: &str) -> String {
    let (addr, request) = (
        api.addr,
        format!(
            "GET {path} HTTP/1.1\r\nHost: api\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n"
        ),
    );
    netns::run_in(&node.node_netns, move || {
        use std::io::{BufRead, Write};
        let mut stream = std::net::TcpStream::connect(addr)?;
        stream.write_all(request.as_bytes())?;
        let mut status = String::new();
        std::io::BufReader::new(stream).read_line(&mut status)?;
        Ok(status.trim().to_string())
    })
    .unwrap()
}

fn opened_from(node: &SimNode, pod: &Pod) -> f64 {
    node.metrics().unwrap().sum(
        OPENED,
        &[
            ("reporter", "source"),
            ("source_workload", &pod.name),
            ("source_workload_namespace", &pod.namespace),
        ],
    )
}

/// One echo round trip from `from` to `to`; panics if it fails.
fn echo(node: &SimNode, from: &Pod, to: &Pod) {
    let r = node.testapp(from, &["client", "--mode", "hello", "--to", &to.addr(PORT).to_string()]).unwrap();
    assert!(r.get("error").is_none(), "{} -> {}: {r}", from.name, to.name);
}

fn workloads(node: &SimNode) -> Vec<Value> {
    node.workloads().unwrap()
}

fn listed<'a>(list: &'a [Value], pod: &Pod) -> Option<&'a Value> {
    list.iter().find(|w| w["name"] == pod.name.as_str() && w["namespace"] == pod.namespace.as_str())
}

/// Connects from `from` to `to` until mesh-node counts one from `from` (capture has started).
fn captured_soon(node: &SimNode, from: &Pod, to: &Pod) -> Duration {
    let started = Instant::now();
    let before = opened_from(node, from);
    eventually(&format!("{} captured", from.name), Duration::from_secs(10), || {
        echo(node, from, to);
        opened_from(node, from) > before
    });
    started.elapsed()
}

/// `count` connections from `from` to `to` all bypass mesh-node.
fn not_captured(node: &SimNode, from: &Pod, to: &Pod, count: usize) {
    let before = opened_from(node, from);
    for _ in 0..count {
        echo(node, from, to);
    }
    assert_eq!(opened_from(node, from), before, "{} was captured", from.name);
}

#[test]
fn systemd_driver_pods_are_discovered_captured_relabelled_and_removed_without_workload_add() {
    let (mut node, api) = node_with_api();
    api.apply(&namespace_object("shop", &[ENABLED])).unwrap();
    api.apply(&namespace_object("plain", &[])).unwrap();
    // Pods that run before mesh-node starts.
    let client = node.add_kube_pod("client", "shop", CgroupDriver::Systemd, Qos::Burstable).unwrap();
    let other = node.add_kube_pod("other", "plain", CgroupDriver::Systemd, Qos::BestEffort).unwrap();
    let server = node.add_kube_pod("db", "plain", CgroupDriver::Systemd, Qos::Guaranteed).unwrap();
    for p in [&client, &other, &server] {
        api.apply(&p.object()).unwrap();
    }
    // A pod of another node is none of this node's business (the field selector).
    let mut elsewhere =
        node.add_kube_pod("elsewhere", "shop", CgroupDriver::Systemd, Qos::Burstable).unwrap();
    elsewhere.node_name = "some-other-node".into();
    api.apply(&elsewhere.object()).unwrap();
    node.serve(&server.pod, &[server.pod.addr(PORT)]).unwrap();
    start_as_daemonset_account(&mut node, &api);

    // Ready means the first list is reconciled: existing pods are registered already.
    let list = workloads(&node);
    let registered = |p: &KubePod| listed(&list, &p.pod).cloned();
    let c = registered(&client).expect("client registered");
    assert_eq!(c["decision"], "meshed", "{c}");
    assert_eq!(c["cgroup"], client.pod_cgroup.display().to_string(), "the pod cgroup, not a container's");
    assert_eq!(registered(&other).expect("other registered")["decision"], "namespace_not_enabled");
    assert!(registered(&elsewhere).is_none(), "a pod of another node was registered: {list:?}");

    // The client's processes run in a container scope below the pod cgroup: captured.
    echo(&node, &client.pod, &server.pod);
    eventually("client counted", Duration::from_secs(5), || opened_from(&node, &client.pod) == 1.0);
    not_captured(&node, &other.pod, &server.pod, 2);

    // A pod created after start.
    let late = node.add_kube_pod("late", "shop", CgroupDriver::Systemd, Qos::Burstable).unwrap();
    api.apply(&late.object()).unwrap();
    captured_soon(&node, &late.pod, &server.pod);

    // Label the namespace at runtime: new connections are captured, the one opened before
    // keeps working on its direct path.
    let mut before_label = HeldConnection::open(&other.pod, &server.pod.addr(PORT).to_string()).unwrap();
    api.apply(&namespace_object("plain", &[ENABLED])).unwrap();
    captured_soon(&node, &other.pod, &server.pod);
    before_label.round_trip("still direct").unwrap();
    // ...and unlabel it: capture stops for new connections; one opened through mesh-node
    // carries on.
    let mut while_meshed = HeldConnection::open(&other.pod, &server.pod.addr(PORT).to_string()).unwrap();
    api.apply(&namespace_object("plain", &[])).unwrap();
    eventually("other no longer meshed", Duration::from_secs(10), || {
        listed(&workloads(&node), &other.pod).is_some_and(|w| w["decision"] == "namespace_not_enabled")
    });
    not_captured(&node, &other.pod, &server.pod, 3);
    while_meshed.round_trip("through mesh-node").unwrap();
    before_label.round_trip("still direct").unwrap();
    while_meshed.close().unwrap();
    before_label.close().unwrap();

    // A pod opting out by label.
    api.apply(&client.clone().with_labels(&[("nodemesh.io/enabled", "false")]).object()).unwrap();
    eventually("client opted out", Duration::from_secs(10), || {
        listed(&workloads(&node), &client.pod).is_some_and(|w| w["decision"] == "pod_opted_out")
    });
    not_captured(&node, &client.pod, &server.pod, 2);
    api.apply(&client.object()).unwrap();

    // Deleting a pod frees its registration.
    api.delete("v1", "Pod", "shop", "late").unwrap();
    eventually("late removed", Duration::from_secs(10), || listed(&workloads(&node), &late.pod).is_none());

    // The local API no longer changes workloads by hand.
    let socket = node.api_socket().display().to_string();
    let refused = node.mesh_node_cli(&["workload", "--api-socket", &socket, "remove", "shop/client"]);
    assert!(refused.is_err_and(|e| e.to_string().contains("--kubernetes")), "local API writes accepted");

    // After a restart the existing pods are picked up again (and the deleted one stays gone).
    node.stop_mesh_node().unwrap();
    node.restart_mesh_node().unwrap();
    let list = workloads(&node);
    assert!(listed(&list, &late.pod).is_none(), "{list:?}");
    assert_eq!(listed(&list, &client.pod).expect("client")["decision"], "meshed");
    echo(&node, &client.pod, &server.pod);
    eventually("client captured after restart", Duration::from_secs(5), || {
        opened_from(&node, &client.pod) == 1.0
    });

    // Every call mesh-node made was within its ClusterRole; one outside it is refused.
    assert_eq!(api.forbidden(), Vec::<String>::new(), "mesh-node made calls its ClusterRole does not allow");
    assert!(api_get(&node, &api, "/api/v1/secrets", NODE_ACCOUNT_TOKEN).contains("403"));
    assert_eq!(api.forbidden().len(), 1);
    assert!(api_get(&node, &api, "/api/v1/pods", "not-a-token").contains("401"));
    assert!(
        api_get(&node, &api, "/api/v1/pods?fieldSelector=spec.nodeName%3Dx", NODE_ACCOUNT_TOKEN)
            .contains("200")
    );
}

#[test]
fn cgroupfs_driver_pods_of_every_qos_class_are_captured_and_host_network_pods_never() {
    let (mut node, api) = node_with_api();
    api.apply(&namespace_object("shop", &[("istio.io/dataplane-mode", "ambient")])).unwrap();
    let server = node.add_kube_pod("server", "shop", CgroupDriver::Cgroupfs, Qos::Burstable).unwrap();
    let guaranteed = node.add_kube_pod("g", "shop", CgroupDriver::Cgroupfs, Qos::Guaranteed).unwrap();
    let best_effort = node.add_kube_pod("be", "shop", CgroupDriver::Cgroupfs, Qos::BestEffort).unwrap();
    for p in [&server, &guaranteed, &best_effort] {
        api.apply(&p.object()).unwrap();
    }
    let mut host =
        node.add_kube_pod("host", "shop", CgroupDriver::Cgroupfs, Qos::Burstable).unwrap().object();
    host["spec"]["hostNetwork"] = true.into();
    api.apply(&host).unwrap();
    node.serve(&server.pod, &[server.pod.addr(PORT)]).unwrap();
    start_discovering(&mut node, &api);

    let list = workloads(&node);
    assert!(list.iter().all(|w| w["name"] != "host"), "a hostNetwork pod was registered: {list:?}");
    for pod in [&guaranteed, &best_effort] {
        let w =
            listed(&list, &pod.pod).unwrap_or_else(|| panic!("{} not registered: {list:?}", pod.pod.name));
        assert_eq!(w["cgroup"], pod.pod_cgroup.display().to_string());
        assert_eq!(w["decision"], "meshed");
        echo(&node, &pod.pod, &server.pod);
        eventually("counted", Duration::from_secs(5), || opened_from(&node, &pod.pod) == 1.0);
        // A container started after the pod was registered (a new scope) is captured too.
        let second = pod.new_container().unwrap();
        echo(&node, &second, &server.pod);
        eventually("second container counted", Duration::from_secs(5), || {
            opened_from(&node, &pod.pod) == 2.0
        });
    }
}
