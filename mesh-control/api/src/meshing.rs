//! Who is in the mesh: the opt-in rule shared by local registration and Kubernetes discovery.
//!
//! A namespace opts in with `nodemesh.io/enabled=true` (Istio's `istio.io/dataplane-mode=ambient`
//! is honoured too, so existing ambient namespaces move over unchanged); a pod opts out with
//! `nodemesh.io/enabled=false` (or Istio's `istio.io/dataplane-mode=none`).

use std::collections::BTreeMap;

pub const ENABLED_LABEL: &str = "nodemesh.io/enabled";
pub const ISTIO_DATAPLANE_MODE_LABEL: &str = "istio.io/dataplane-mode";

/// Why a workload is or is not captured; shown in the node's workload listing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MeshDecision {
    Meshed,
    NamespaceNotEnabled,
    PodOptedOut,
}

impl MeshDecision {
    pub fn is_meshed(self) -> bool {
        self == MeshDecision::Meshed
    }
}

pub fn decide(
    namespace_labels: &BTreeMap<String, String>,
    pod_labels: &BTreeMap<String, String>,
) -> MeshDecision {
    fn label<'a>(labels: &'a BTreeMap<String, String>, key: &str) -> Option<&'a str> {
        labels.get(key).map(String::as_str)
    }
    let pod_out = label(pod_labels, ENABLED_LABEL) == Some("false")
        || label(pod_labels, ISTIO_DATAPLANE_MODE_LABEL) == Some("none");
    if pod_out {
        return MeshDecision::PodOptedOut;
    }
    let ns_in = label(namespace_labels, ENABLED_LABEL) == Some("true")
        || label(namespace_labels, ISTIO_DATAPLANE_MODE_LABEL) == Some("ambient");
    if ns_in { MeshDecision::Meshed } else { MeshDecision::NamespaceNotEnabled }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn namespace_label_opts_in_and_pod_label_opts_out() {
        let on = labels(&[(ENABLED_LABEL, "true")]);
        let ambient = labels(&[(ISTIO_DATAPLANE_MODE_LABEL, "ambient")]);
        let none = labels(&[]);
        assert_eq!(decide(&on, &none), MeshDecision::Meshed);
        assert_eq!(decide(&ambient, &none), MeshDecision::Meshed);
        assert_eq!(decide(&none, &none), MeshDecision::NamespaceNotEnabled);
        assert_eq!(decide(&labels(&[(ENABLED_LABEL, "yes")]), &none), MeshDecision::NamespaceNotEnabled);
        assert_eq!(decide(&on, &labels(&[(ENABLED_LABEL, "false")])), MeshDecision::PodOptedOut);
        assert_eq!(
            decide(&ambient, &labels(&[(ISTIO_DATAPLANE_MODE_LABEL, "none")])),
            MeshDecision::PodOptedOut
        );
    }
}
