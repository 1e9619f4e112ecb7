//! Istio's `PeerAuthentication` (security.istio.io): which connections a workload accepts in
//! plaintext. Levels, most specific first: a policy selecting the workload (with per-port
//! modes), its namespace's policy without a selector, the root namespace's (mesh-wide). A level
//! whose mode is UNSET defers to the next; nothing set at all is PERMISSIVE.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{FieldError, Labels, Meta, Object, selector_matches, store::Store};

/// The namespace whose selector-less policy applies mesh-wide (Istio's default root namespace;
/// MeshConfig `rootNamespace` changes it).
pub const DEFAULT_ROOT_NAMESPACE: &str = "istio-system";

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PeerAuthentication {
    pub meta: Meta,
    pub spec: PeerAuthenticationSpec,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PeerAuthenticationSpec {
    pub selector: Option<LabelSelector>,
    pub mtls: Option<Mtls>,
    /// Workload port → mode; only with a selector.
    #[serde(default)]
    pub port_level_mtls: BTreeMap<String, Mtls>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LabelSelector {
    #[serde(default)]
    pub match_labels: Labels,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Mtls {
    #[serde(default)]
    pub mode: MtlsMode,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum MtlsMode {
    /// Inherit from the next level.
    #[default]
    Unset,
    /// Plaintext accepted (Nodemesh's inbound treats it like PERMISSIVE).
    Disable,
    /// mTLS (the tunnel) and plaintext accepted.
    Permissive,
    /// Only mTLS: plaintext connections are refused.
    Strict,
}

impl PeerAuthenticationSpec {
    pub fn check(&self, errors: &mut Vec<FieldError>) {
        if !self.port_level_mtls.is_empty() && self.selector.is_none() {
            errors.push(FieldError::new(
                "spec.portLevelMtls",
                "needs spec.selector: port-level modes apply to the workloads a policy selects",
            ));
        }
        for port in self.port_level_mtls.keys() {
            if port.parse::<u16>().ok().filter(|p| *p != 0).is_none() {
                errors.push(FieldError::new(
                    format!("spec.portLevelMtls.{port}"),
                    "must be a port number 1-65535",
                ));
            }
        }
    }
}

/// What a workload's plaintext inbound meets: its mode, and per-port modes where they differ.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resolved {
    pub mode: MtlsMode,
    pub ports: BTreeMap<u16, MtlsMode>,
}

/// Where selector-less security policies apply to the whole mesh.
pub fn root_namespace(store: &Store) -> String {
    store
        .of_kind(super::Kind::MeshConfig)
        .find_map(|o| match o {
            Object::MeshConfig(m) => m.spec.root_namespace.clone(),
            _ => None,
        })
        .unwrap_or_else(|| DEFAULT_ROOT_NAMESPACE.to_string())
}

/// The policies of one store, ready to resolve for any workload.
pub struct PeerAuthentications<'a> {
    policies: Vec<&'a PeerAuthentication>,
    root_namespace: String,
}

impl<'a> PeerAuthentications<'a> {
    pub fn new(store: &'a Store) -> PeerAuthentications<'a> {
        let root_namespace = root_namespace(store);
        let policies = store
            .of_kind(super::Kind::PeerAuthentication)
            .filter_map(|o| match o {
                Object::PeerAuthentication(p) => Some(p),
                _ => None,
            })
            .collect();
        PeerAuthentications { policies, root_namespace }
    }

    /// The first policy by name in `namespace` that `pick` takes.
    fn first(
        &self,
        namespace: &str,
        pick: impl Fn(&PeerAuthentication) -> bool,
    ) -> Option<&'a PeerAuthentication> {
        self.policies
            .iter()
            .copied()
            .filter(|p| p.meta.namespace == namespace && pick(p))
            .min_by(|a, b| a.meta.name.cmp(&b.meta.name))
    }

    /// The modes for a workload in `namespace` with `labels`. Where several policies select
    /// it, the first by name wins (as Istio picks the oldest, which files cannot tell).
    pub fn resolve(&self, namespace: &str, labels: &Labels) -> Resolved {
        let workload = self.first(namespace, |p| {
            p.spec.selector.as_ref().is_some_and(|s| selector_matches(&s.match_labels, labels))
        });
        let namespace_wide = self.first(namespace, |p| p.spec.selector.is_none());
        let mesh_wide = self.first(&self.root_namespace, |p| p.spec.selector.is_none());
        let mode_of = |p: Option<&PeerAuthentication>| {
            p.and_then(|p| p.spec.mtls.as_ref()).map(|m| m.mode).filter(|m| *m != MtlsMode::Unset)
        };
        let mode = mode_of(workload)
            .or_else(|| mode_of(namespace_wide))
            .or_else(|| mode_of(mesh_wide))
            .unwrap_or(MtlsMode::Permissive);
        let ports = workload
            .map(|p| {
                p.spec
                    .port_level_mtls
                    .iter()
                    .filter_map(|(port, m)| {
                        let mode = if m.mode == MtlsMode::Unset { mode } else { m.mode };
                        Some((port.parse().ok()?, mode))
                    })
                    .collect()
            })
            .unwrap_or_default();
        Resolved { mode, ports }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{model::store::Origin, source::files::parse_documents};

    fn store(yaml: &str) -> Store {
        Store::from_valid_yaml(yaml)
    }

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    const POLICIES: &str = "
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: istio-system}
spec: {mtls: {mode: STRICT}}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: legacy}
spec: {mtls: {mode: PERMISSIVE}}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: db, namespace: legacy}
spec:
  selector: {matchLabels: {app: db}}
  mtls: {mode: UNSET}
  portLevelMtls: {'5432': {mode: STRICT}, '9000': {mode: UNSET}}
";

    #[test]
    fn the_most_specific_set_mode_wins_and_ports_refine_it() {
        let store = store(POLICIES);
        let pa = PeerAuthentications::new(&store);
        // Mesh-wide STRICT.
        assert_eq!(pa.resolve("shop", &labels(&[])).mode, MtlsMode::Strict);
        // The namespace relaxes it.
        assert_eq!(pa.resolve("legacy", &labels(&[])).mode, MtlsMode::Permissive);
        // The workload's own mode is UNSET: the namespace's; one port STRICT, an UNSET port inherits.
        let db = pa.resolve("legacy", &labels(&[("app", "db")]));
        assert_eq!(db.mode, MtlsMode::Permissive);
        assert_eq!(db.ports, [(5432, MtlsMode::Strict), (9000, MtlsMode::Permissive)].into());
        // No policy anywhere: PERMISSIVE.
        let none = Store::default();
        assert_eq!(PeerAuthentications::new(&none).resolve("x", &labels(&[])).mode, MtlsMode::Permissive);
    }

    #[test]
    fn port_modes_need_a_selector_and_modes_must_be_known() {
        let mut store = Store::default();
        let docs = parse_documents(
            "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: a, namespace: x}\n\
             spec: {portLevelMtls: {'80': {mode: STRICT}}}\n---\n\
             apiVersion: security.istio.io/v1beta1\nkind: PeerAuthentication\nmetadata: {name: b, namespace: x}\n\
             spec: {mtls: {mode: STRIKT}}\n",
        );
        store.replace_source(&Origin::File("bad.yaml".into()), docs);
        let errors: Vec<String> = store.errors().map(ToString::to_string).collect();
        assert_eq!(errors.len(), 2, "{errors:?}");
        assert!(
            errors[0].contains("spec.portLevelMtls") && errors[0].contains("needs spec.selector"),
            "{errors:?}"
        );
        assert!(errors[1].contains("STRIKT"), "{errors:?}");
    }
}
