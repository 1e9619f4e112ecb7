//! What discovery needs from a Pod object, read once per reconcile.

use std::{collections::BTreeMap, net::IpAddr};

use k8s_openapi::api::core::v1::Pod;
use nodemesh_api::workload::WorkloadKey;

use super::pod_cgroup::QosClass;

/// A pod of this node as the API server describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct PodFacts {
    pub(super) key: WorkloadKey,
    pub(super) uid: String,
    pub(super) qos: Option<QosClass>,
    /// `status.podIPs` (or `status.podIP`): empty until the sandbox has its network.
    pub(super) ips: Vec<IpAddr>,
    pub(super) labels: BTreeMap<String, String>,
    pub(super) service_account: String,
    /// Shares the node's netns: never captured, never registered.
    pub(super) host_network: bool,
    /// Succeeded or Failed: its containers are gone for good.
    pub(super) finished: bool,
}

impl PodFacts {
    /// `None` for an object without the name, namespace or UID every stored Pod has.
    pub(super) fn of(pod: &Pod) -> Option<PodFacts> {
        let meta = &pod.metadata;
        let key = WorkloadKey { namespace: meta.namespace.clone()?, name: meta.name.clone()? };
        let spec = pod.spec.as_ref();
        let status = pod.status.as_ref();
        let mut ips: Vec<IpAddr> = status
            .and_then(|s| s.pod_ips.as_ref())
            .into_iter()
            .flatten()
            .filter_map(|p| p.ip.parse().ok())
            .collect();
        if ips.is_empty()
            && let Some(ip) = status.and_then(|s| s.pod_ip.as_ref()).and_then(|ip| ip.parse().ok())
        {
            ips.push(ip);
        }
        Some(PodFacts {
            key,
            uid: meta.uid.clone()?,
            qos: status.and_then(|s| s.qos_class.as_deref()).and_then(QosClass::parse),
            ips,
            labels: meta.labels.clone().unwrap_or_default(),
            service_account: spec
                .and_then(|s| s.service_account_name.clone())
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| "default".to_string()),
            host_network: spec.and_then(|s| s.host_network).unwrap_or(false),
            finished: matches!(status.and_then(|s| s.phase.as_deref()), Some("Succeeded" | "Failed")),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_pod_as_the_api_server_serves_it() {
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "web-1", "namespace": "shop", "uid": "7f0b2a8c-1d2e-4f3a-9b8c-0123456789ab",
                "labels": {"app": "web"}},
            "spec": {"nodeName": "node-a", "serviceAccountName": "web", "containers": [{"name": "app"}]},
            "status": {"phase": "Running", "qosClass": "Burstable", "podIP": "10.0.0.5",
                "podIPs": [{"ip": "10.0.0.5"}, {"ip": "fd00::5"}]}
        }))
        .expect("pod");
        let facts = PodFacts::of(&pod).expect("facts");
        assert_eq!(facts.key.to_string(), "shop/web-1");
        assert_eq!(facts.qos, Some(QosClass::Burstable));
        assert_eq!(facts.ips, vec!["10.0.0.5".parse::<IpAddr>().unwrap(), "fd00::5".parse().unwrap()]);
        assert_eq!(facts.service_account, "web");
        assert!(!facts.host_network && !facts.finished);

        let pending: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "job", "namespace": "shop", "uid": "u"},
            "spec": {"hostNetwork": true, "containers": []},
            "status": {"phase": "Succeeded"}
        }))
        .expect("pod");
        let facts = PodFacts::of(&pending).expect("facts");
        assert!(facts.ips.is_empty() && facts.host_network && facts.finished);
        assert_eq!(facts.service_account, "default");
    }
}
