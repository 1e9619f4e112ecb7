//! Pods laid out the way kubelet and containerd lay them out, for mesh-node's pod discovery.
//!
//! - The pod cgroup is named from the pod UID and QoS class under either kubelet cgroup driver
//!   (`kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid_>.slice` or
//!   `kubepods/burstable/pod<uid>`; Guaranteed has no QoS level), below the node's cgroup root
//!   (kubelet's `--cgroup-root`).
//! - Each container is a child of it (`cri-containerd-<id>.scope` under systemd, `<id>` under
//!   cgroupfs): first the sandbox, whose pause process holds the pod netns (created by the CNI
//!   step, as `ip netns add` does for containerd's `cni-<uuid>`), then the app container, where
//!   the test's processes run — never in the pod cgroup itself.
//! - The Pod object carries what the API server and kubelet fill in: `metadata.uid`,
//!   `spec.nodeName`, `status.qosClass`, `status.podIP(s)`, `status.phase`.

use std::{
    fs,
    net::TcpListener,
    path::{Path, PathBuf},
};

use anyhow::Context;
use serde_json::{Value, json};

use crate::{Pod, SimNode, kube_api::FakeApiServer, netns};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CgroupDriver {
    Systemd,
    Cgroupfs,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Qos {
    Guaranteed,
    Burstable,
    BestEffort,
}

impl Qos {
    fn class(self) -> &'static str {
        match self {
            Qos::Guaranteed => "Guaranteed",
            Qos::Burstable => "Burstable",
            Qos::BestEffort => "BestEffort",
        }
    }
    fn level(self) -> Option<&'static str> {
        match self {
            Qos::Guaranteed => None,
            Qos::Burstable => Some("burstable"),
            Qos::BestEffort => Some("besteffort"),
        }
    }
}

/// The pod cgroup kubelet creates, relative to its cgroup root.
pub fn pod_cgroup(driver: CgroupDriver, qos: Qos, uid: &str) -> PathBuf {
    match (driver, qos.level()) {
        (CgroupDriver::Cgroupfs, Some(level)) => format!("kubepods/{level}/pod{uid}").into(),
        (CgroupDriver::Cgroupfs, None) => format!("kubepods/pod{uid}").into(),
        (CgroupDriver::Systemd, level) => {
            let uid = uid.replace('-', "_");
            match level {
                Some(level) => {
                    format!("kubepods.slice/kubepods-{level}.slice/kubepods-{level}-pod{uid}.slice").into()
                }
                None => format!("kubepods.slice/kubepods-pod{uid}.slice").into(),
            }
        }
    }
}

/// A container's cgroup below its pod's, named as containerd names it.
fn container_cgroup(driver: CgroupDriver, pod_cgroup: &Path, id: &str) -> PathBuf {
    match driver {
        CgroupDriver::Systemd => pod_cgroup.join(format!("cri-containerd-{id}.scope")),
        CgroupDriver::Cgroupfs => pod_cgroup.join(id),
    }
}

/// A fresh random UUID, from the kernel.
fn uuid() -> anyhow::Result<String> {
    Ok(fs::read_to_string("/proc/sys/kernel/random/uuid")?.trim().to_string())
}

/// A 64-hex-digit container ID.
fn container_id() -> anyhow::Result<String> {
    Ok(format!("{}{}", uuid()?.replace('-', ""), uuid()?.replace('-', "")))
}

/// A pod as kubelet runs it.
#[derive(Clone, Debug)]
pub struct KubePod {
    /// Its netns and addresses; `cgroup` is the app container's, where processes the test
    /// starts in it run.
    pub pod: Pod,
    pub uid: String,
    pub qos: Qos,
    pub driver: CgroupDriver,
    /// The pod-level cgroup (what mesh-node should register).
    pub pod_cgroup: PathBuf,
    pub pause_pid: u32,
    pub node_name: String,
    pub service_account: String,
    pub labels: Vec<(String, String)>,
}

impl KubePod {
    /// The Pod object as the API server serves it once the pod runs.
    pub fn object(&self) -> Value {
        let labels: serde_json::Map<String, Value> =
            self.labels.iter().map(|(k, v)| (k.clone(), Value::from(v.as_str()))).collect();
        json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": self.pod.name, "namespace": self.pod.namespace, "uid": self.uid,
                "labels": labels},
            "spec": {"nodeName": self.node_name, "serviceAccountName": self.service_account,
                "containers": [{"name": "app", "image": "nm-testapp"}]},
            "status": {"phase": "Running", "qosClass": self.qos.class(), "hostIP": "10.76.0.2",
                "conditions": [{"type": "PodScheduled", "status": "True"}, {"type": "Initialized", "status": "True"},
                    {"type": "ContainersReady", "status": "True"}, {"type": "Ready", "status": "True"}],
                "podIP": self.pod.ip.to_string(),
                "podIPs": [{"ip": self.pod.ip.to_string()}, {"ip": self.pod.ip6.to_string()}]}
        })
    }

    /// Starts another container (a new scope below the pod cgroup, as for a restarted or
    /// sidecar-less second container): the same pod, processes in the new scope.
    pub fn new_container(&self) -> anyhow::Result<Pod> {
        let scope = container_cgroup(self.driver, &self.pod_cgroup, &container_id()?);
        fs::create_dir_all(&scope)?;
        Ok(Pod { cgroup: scope, ..self.pod.clone() })
    }

    pub fn with_labels(mut self, labels: &[(&str, &str)]) -> KubePod {
        self.labels = labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        self
    }
}

/// A Namespace object with these labels.
pub fn namespace_object(name: &str, labels: &[(&str, &str)]) -> Value {
    let labels: serde_json::Map<String, Value> =
        labels.iter().map(|(k, v)| (k.to_string(), Value::from(*v))).collect();
    json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}})
}

impl SimNode {
    /// An in-test API server listening on loopback in the node's netns, where mesh-node runs.
    pub fn start_api_server(&self) -> anyhow::Result<FakeApiServer> {
        let listener = netns::run_in(&self.node_netns, || Ok(TcpListener::bind("127.0.0.1:0")?))?;
        FakeApiServer::start(listener)
    }

    /// `mesh-node workload list`: every registered workload with its decision and cgroup.
    pub fn workloads(&self) -> anyhow::Result<Vec<Value>> {
        let socket = self.api_socket().display().to_string();
        Ok(serde_json::from_str(&self.mesh_node_cli(&["workload", "--api-socket", &socket, "list"])?)?)
    }

    /// Whether a connection from `pod` to `to` went through mesh-node: the client socket's
    /// local address is then mesh-node's listener in the pod, on 127.0.0.1.
    pub fn connect_captured(&self, pod: &Pod, to: &str) -> anyhow::Result<bool> {
        let r = self.testapp(pod, &["client", "--mode", "hello", "--to", to])?;
        let local = r["connections"][0]["local"].as_str().with_context(|| format!("nm-testapp: {r}"))?;
        Ok(local.starts_with("127.0.0.1:"))
    }

    /// Adds a pod as kubelet + containerd would: network (see [`SimNode::add_pod`]), the pod
    /// cgroup for `driver` and `qos`, a sandbox scope with a pause process in the pod netns,
    /// and an app container scope for the test's processes.
    pub fn add_kube_pod(
        &mut self,
        name: &str,
        namespace: &str,
        driver: CgroupDriver,
        qos: Qos,
    ) -> anyhow::Result<KubePod> {
        let mut pod = self.add_pod(name, namespace)?;
        // add_pod's own directory stays empty: this pod's processes live where kubelet's would.
        let _ = fs::remove_dir(&pod.cgroup);
        let uid = uuid()?;
        let pod_cgroup = self.cgroup_root.join(pod_cgroup(driver, qos, &uid));
        let sandbox = container_cgroup(driver, &pod_cgroup, &container_id()?);
        let app = container_cgroup(driver, &pod_cgroup, &container_id()?);
        for dir in [&sandbox, &app] {
            fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        // The pause process: sleeps for the pod's lifetime, holding the netns.
        let in_sandbox = Pod { cgroup: sandbox, ..pod.clone() };
        let pause_pid = self.spawn_in(&in_sandbox, Path::new("/bin/sleep"), &["infinity".to_string()])?;
        // The runtime reports the sandbox only once it runs; the harness's spawn returns before
        // the process has moved itself into its scope, so wait for that.
        let procs = in_sandbox.cgroup.join("cgroup.procs");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while !fs::read_to_string(&procs)?.lines().any(|l| l.trim() == pause_pid.to_string()) {
            anyhow::ensure!(std::time::Instant::now() < deadline, "pause process not in {}", procs.display());
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        pod.cgroup = app;
        Ok(KubePod {
            pod,
            uid,
            qos,
            driver,
            pod_cgroup,
            pause_pid,
            node_name: self.node_netns.clone(),
            service_account: "default".into(),
            labels: Vec::new(),
        })
    }
}
