//! Pod discovery (`mesh-node run --kubernetes`): the node's own pods and every namespace are
//! watched on the API server, and each pod is registered with the [`Registry`] exactly as the
//! local API would register it, with nobody calling that API.
//!
//! - Pods are listed and watched with the field selector `spec.nodeName=<node>`, so the API
//!   server sends this node its pods only; namespaces are all watched (their labels decide).
//! - For each pod: its cgroup from the UID and QoS class (`pod_cgroup`), its netns from the
//!   processes in that cgroup, checked against the pod's IPs (`pod_netns`), its ServiceAccount,
//!   labels and namespace labels. The opt-in rule is the local API's (`nodemesh_api::meshing`):
//!   every pod is registered, meshed or not, so `mesh-node workload list` says why a pod is not
//!   captured. hostNetwork pods are never registered (they are the node).
//! - Reconciled on every change and each second while a pod waits for its cgroup, IP or
//!   netns: a pod whose spec changed (a namespace label flipped, say) is registered again,
//!   which starts or stops capture for new connections while established ones carry on; a
//!   deleted or finished pod is removed; after a restart, restored workloads of pods that are
//!   gone are removed and existing pods are picked up by the first list.

pub mod pod_cgroup;
pub mod pod_netns;
mod pods;

use std::{
    collections::{BTreeMap, BTreeSet},
    path::PathBuf,
    sync::Arc,
    time::Duration,
};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::{
    Api, Client,
    runtime::{WatchStreamExt, reflector, watcher},
};
pub use nodemesh_api::kube_client::{Connection, client};
use nodemesh_api::workload::{WorkloadKey, WorkloadSpec};
use tokio::sync::Notify;

use self::{pod_netns::HostPaths, pods::PodFacts};
use crate::registry::Registry;

/// How often pods that are not ready to register (no cgroup, IP or netns yet) are looked at
/// again, besides every change the API server sends.
const RETRY_EVERY: Duration = Duration::from_secs(1);

#[derive(Clone, Debug)]
pub struct Settings {
    /// This node's name as the API server knows it (`spec.nodeName` of its pods).
    pub node_name: String,
    /// kubelet's cgroup root on the host's cgroup2 mount (where `kubepods[.slice]` is).
    pub cgroup_root: PathBuf,
    pub host: HostPaths,
}

/// Starts the watchers and the reconcile loop; returns once the first list of both has been
/// reconciled (the node is then ready: every existing pod has been looked at).
pub async fn start(client: Client, settings: Settings, registry: Arc<Registry>) -> anyhow::Result<()> {
    let changed = Arc::new(Notify::new());
    let (pods, pods_writer) = reflector::store::<Pod>();
    let (namespaces, namespaces_writer) = reflector::store::<Namespace>();
    let on_node = watcher::Config::default().fields(&format!("spec.nodeName={}", settings.node_name));
    let pod_events = watcher(Api::<Pod>::all(client.clone()), on_node).default_backoff().reflect(pods_writer);
    let namespace_events = watcher(Api::<Namespace>::all(client), watcher::Config::default())
        .default_backoff()
        .reflect(namespaces_writer);
    tokio::spawn(follow(pod_events, "pods", Arc::clone(&changed)));
    tokio::spawn(follow(namespace_events, "namespaces", Arc::clone(&changed)));
    pods.wait_until_ready().await?;
    namespaces.wait_until_ready().await?;
    let mut reconciler = Reconciler::new(settings, registry);
    reconciler.reconcile(&pods.state(), &namespaces.state()).await;
    tracing::info!(
        node = %reconciler.settings.node_name,
        pods = pods.state().len(),
        registered = reconciler.registered.len(),
        waiting = reconciler.waiting.len(),
        "kubernetes: first pod list reconciled"
    );
    tokio::spawn(async move {
        loop {
            // Register `notified` before reconciling so no change slips between the two.
            let notified = changed.notified();
            if reconciler.waiting.is_empty() {
                notified.await;
            } else {
                let _ = tokio::time::timeout(RETRY_EVERY, notified).await;
            }
            reconciler.reconcile(&pods.state(), &namespaces.state()).await;
        }
    });
    Ok(())
}

/// Drives one watch stream (the reflector fills its store as a side effect) and wakes the
/// reconcile loop on every event. Errors are retried by the watcher with backoff.
async fn follow<K>(
    events: impl futures::Stream<Item = Result<watcher::Event<K>, watcher::Error>>,
    what: &'static str,
    changed: Arc<Notify>,
) {
    let mut events = std::pin::pin!(events);
    while let Some(event) = events.next().await {
        if let Err(e) = event {
            tracing::warn!(resource = what, "kubernetes: {e}; retrying with backoff");
        }
        changed.notify_one();
    }
}

struct Reconciler {
    settings: Settings,
    registry: Arc<Registry>,
    /// What is registered now, as registered (restored ones included at start).
    registered: BTreeMap<WorkloadKey, WorkloadSpec>,
    /// Pods not registered (yet), and why; a reason is logged when it changes.
    waiting: BTreeMap<WorkloadKey, String>,
}

impl Reconciler {
    fn new(settings: Settings, registry: Arc<Registry>) -> Reconciler {
        let registered = registry.watch_specs().borrow().iter().map(|s| (s.key(), s.clone())).collect();
        Reconciler { settings, registry, registered, waiting: BTreeMap::new() }
    }

    async fn reconcile(&mut self, pods: &[Arc<Pod>], namespaces: &[Arc<Namespace>]) {
        let namespace_labels: BTreeMap<String, BTreeMap<String, String>> = namespaces
            .iter()
            .filter_map(|n| Some((n.metadata.name.clone()?, n.metadata.labels.clone().unwrap_or_default())))
            .collect();
        let mut keep = BTreeSet::new();
        let mut waiting = BTreeMap::new();
        for pod in pods.iter().filter_map(|p| PodFacts::of(p)) {
            if pod.host_network || pod.finished {
                continue;
            }
            let labels = namespace_labels.get(&pod.key.namespace).cloned().unwrap_or_default();
            let spec = match self.spec_for(&pod, labels) {
                Ok(spec) => spec,
                Err(reason) => {
                    // Registered before (the pod is restarting its sandbox, say): kept while
                    // its cgroup is there.
                    if self.registered.get(&pod.key).is_some_and(|s| s.cgroup.is_dir()) {
                        keep.insert(pod.key.clone());
                    }
                    waiting.insert(pod.key, reason);
                    continue;
                }
            };
            keep.insert(pod.key.clone());
            if self.registered.get(&pod.key) == Some(&spec) {
                continue;
            }
            match self.registry.add(spec.clone()).await {
                Ok(status) => {
                    tracing::info!(pod = %pod.key, decision = ?status.decision, cgroup = %spec.cgroup.display(),
                        netns = %spec.netns.display(), "kubernetes: pod registered");
                    self.registered.insert(pod.key, spec);
                }
                Err(e) => {
                    waiting.insert(pod.key, e.to_string());
                }
            }
        }
        let gone: Vec<WorkloadKey> = self.registered.keys().filter(|k| !keep.contains(*k)).cloned().collect();
        for key in gone {
            match self.registry.remove(&key).await {
                Ok(()) | Err(crate::registry::WorkloadError::NotFound(_)) => {
                    tracing::info!(pod = %key, "kubernetes: pod gone; removed");
                }
                Err(e) => tracing::warn!(pod = %key, "kubernetes: removing: {e}"),
            }
            self.registered.remove(&key);
        }
        for (key, reason) in &waiting {
            if self.waiting.get(key) != Some(reason) {
                tracing::info!(pod = %key, "kubernetes: pod not registered yet: {reason}");
            }
        }
        self.waiting = waiting;
    }

    /// The spec the registry should hold for `pod`, or why there is none yet.
    fn spec_for(
        &self,
        pod: &PodFacts,
        namespace_labels: BTreeMap<String, String>,
    ) -> Result<WorkloadSpec, String> {
        if pod.ips.is_empty() {
            return Err("no pod IP yet".into());
        }
        let cgroup = pod_cgroup::find(&self.settings.cgroup_root, &pod.uid, pod.qos).ok_or_else(|| {
            format!("no cgroup for pod UID {} under {} yet", pod.uid, self.settings.cgroup_root.display())
        })?;
        // The netns is looked up once per pod cgroup (it lives as long as the sandbox).
        let netns = match self.registered.get(&pod.key) {
            Some(spec) if spec.cgroup == cgroup && spec.ips == pod.ips => spec.netns.clone(),
            _ => pod_netns::find(&self.settings.host, &cgroup, &pod.ips).map_err(|e| e.to_string())?,
        };
        Ok(WorkloadSpec {
            name: pod.key.name.clone(),
            namespace: pod.key.namespace.clone(),
            service_account: pod.service_account.clone(),
            cgroup,
            netns,
            ips: pod.ips.clone(),
            labels: pod.labels.clone(),
            namespace_labels,
        })
    }
}
