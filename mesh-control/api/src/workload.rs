//! A workload as a node registers it: a cgroup plus the network namespace its processes run in
//! (a pod's own, or the host's for a plain process), with the Kubernetes-style identity that
//! telemetry and policy key on.

use std::{collections::BTreeMap, net::IpAddr, path::PathBuf};

use crate::meshing::{self, MeshDecision};

/// What the local API (and, later, Kubernetes pod discovery) hands to mesh-node.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkloadSpec {
    pub name: String,
    pub namespace: String,
    #[serde(default = "default_service_account")]
    pub service_account: String,
    /// A cgroup v2 directory, e.g. `/sys/fs/cgroup/kubepods.slice/...`.
    pub cgroup: PathBuf,
    /// A network namespace file: `/var/run/netns/NAME`, `/proc/PID/ns/net`.
    pub netns: PathBuf,
    /// The workload's addresses; destination telemetry resolves these to the workload.
    #[serde(default)]
    pub ips: Vec<IpAddr>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub namespace_labels: BTreeMap<String, String>,
}

fn default_service_account() -> String {
    "default".to_string()
}

/// How telemetry names a workload, as Istio names it: the owner's name, its identity, its
/// `app`/`version` labels and its canonical service and revision. The control plane sends it
/// with each endpoint (so a client's node labels the endpoint that answered without asking
/// for its record); mesh-node derives it the same way for its own pods.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct WorkloadNames {
    /// The owner's name (a Deployment's, not its pods').
    pub workload: String,
    pub service_account: String,
    /// Empty: no such label.
    pub app: String,
    pub version: String,
    pub canonical_service: String,
    pub canonical_revision: String,
}

impl WorkloadNames {
    /// Istio's derivation from a workload's `labels`: `app`, `version`; the canonical service
    /// from `service.istio.io/canonical-name`, `app.kubernetes.io/name`, `app`, else the
    /// workload's name; the canonical revision from `service.istio.io/canonical-revision`,
    /// `app.kubernetes.io/version`, `version`, else `latest`.
    pub fn derive(workload: &str, service_account: &str, labels: &BTreeMap<String, String>) -> WorkloadNames {
        let label =
            |keys: &[&str]| keys.iter().find_map(|k| labels.get(*k)).filter(|v| !v.is_empty()).cloned();
        WorkloadNames {
            workload: workload.to_string(),
            service_account: service_account.to_string(),
            app: label(&["app"]).unwrap_or_default(),
            version: label(&["version"]).unwrap_or_default(),
            canonical_service: label(&["service.istio.io/canonical-name", "app.kubernetes.io/name", "app"])
                .unwrap_or_else(|| workload.to_string()),
            canonical_revision: label(&[
                "service.istio.io/canonical-revision",
                "app.kubernetes.io/version",
                "version",
            ])
            .unwrap_or_else(|| "latest".to_string()),
        }
    }

    /// One string (`;`-separated, as Istio's endpoint `workload` metadata is), for endpoint
    /// metadata. Kubernetes names and label values never hold `;`.
    pub fn encode(&self) -> String {
        [
            &self.workload,
            &self.service_account,
            &self.app,
            &self.version,
            &self.canonical_service,
            &self.canonical_revision,
        ]
        .map(String::as_str)
        .join(";")
    }

    pub fn decode(text: &str) -> Option<WorkloadNames> {
        let mut parts = text.split(';').map(str::to_string);
        let names = WorkloadNames {
            workload: parts.next()?,
            service_account: parts.next()?,
            app: parts.next()?,
            version: parts.next()?,
            canonical_service: parts.next()?,
            canonical_revision: parts.next()?,
        };
        parts.next().is_none().then_some(names)
    }
}

/// Names one workload on a node: `namespace/name`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize)]
pub struct WorkloadKey {
    pub namespace: String,
    pub name: String,
}

impl std::fmt::Display for WorkloadKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SpecError {
    #[error("workload {key}: field `{field}`: {reason}")]
    Invalid { key: String, field: &'static str, reason: String },
}

impl WorkloadSpec {
    pub fn key(&self) -> WorkloadKey {
        WorkloadKey { namespace: self.namespace.clone(), name: self.name.clone() }
    }

    pub fn mesh_decision(&self) -> MeshDecision {
        meshing::decide(&self.namespace_labels, &self.labels)
    }

    /// Checks what can be checked without touching the system; every problem is reported.
    pub fn validate(&self) -> Result<(), Vec<SpecError>> {
        let key = self.key().to_string();
        let mut errors = Vec::new();
        let mut bad = |field, reason: &str| {
            errors.push(SpecError::Invalid { key: key.clone(), field, reason: reason.to_string() })
        };
        for (field, value) in [("name", &self.name), ("namespace", &self.namespace)] {
            if !is_dns_label(value) {
                bad(field, "must be a DNS label: 1-63 lowercase letters, digits or '-'");
            }
        }
        if self.service_account.is_empty() {
            bad("service_account", "must not be empty");
        }
        if !self.cgroup.is_absolute() {
            bad("cgroup", "must be an absolute path to a cgroup v2 directory");
        }
        if !self.netns.is_absolute() {
            bad("netns", "must be an absolute path to a network namespace file");
        }
        if errors.is_empty() { Ok(()) } else { Err(errors) }
    }
}

fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn istio_derivation_and_round_trip() {
        let labels: BTreeMap<String, String> =
            [("app", "reviews"), ("version", "v2")].map(|(k, v)| (k.to_string(), v.to_string())).into();
        let names = WorkloadNames::derive("reviews-v2", "bookinfo-reviews", &labels);
        assert_eq!((names.canonical_service.as_str(), names.canonical_revision.as_str()), ("reviews", "v2"));
        assert_eq!(WorkloadNames::decode(&names.encode()), Some(names));
        let bare = WorkloadNames::derive("batch", "default", &BTreeMap::new());
        assert_eq!(
            (bare.app.as_str(), bare.canonical_service.as_str(), bare.canonical_revision.as_str()),
            ("", "batch", "latest")
        );
        assert_eq!(WorkloadNames::decode("a;b;c"), None);
        assert_eq!(WorkloadNames::decode("a;b;c;d;e;f;g"), None);
    }

    fn spec() -> WorkloadSpec {
        serde_json::from_str(
            r#"{"name":"web","namespace":"shop","cgroup":"/sys/fs/cgroup/web","netns":"/run/netns/web"}"#,
        )
        .unwrap()
    }

    #[test]
    fn defaults_and_valid_spec() {
        let s = spec();
        assert_eq!(s.service_account, "default");
        assert_eq!(s.validate(), Ok(()));
        assert_eq!(s.key().to_string(), "shop/web");
    }

    #[test]
    fn every_error_is_reported_with_its_field() {
        let mut s = spec();
        s.name = "Web_1".into();
        s.cgroup = "relative".into();
        let errors = s.validate().unwrap_err();
        let text: Vec<String> = errors.iter().map(ToString::to_string).collect();
        assert_eq!(errors.len(), 2, "{text:?}");
        assert!(text[0].contains("field `name`"), "{text:?}");
        assert!(text[1].contains("field `cgroup`"), "{text:?}");
    }

    #[test]
    fn unknown_fields_are_rejected() {
        let err = serde_json::from_str::<WorkloadSpec>(
            r#"{"name":"a","namespace":"b","cgroup":"/c","netns":"/n","cgroups":"/x"}"#,
        )
        .unwrap_err();
        assert!(err.to_string().contains("cgroups"), "{err}");
    }
}
