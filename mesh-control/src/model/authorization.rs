//! Istio's `AuthorizationPolicy` (security.istio.io): who may reach a workload, and how.
//!
//! A policy applies to the workloads its `selector` picks in its namespace (all of them
//! without a selector; in the root namespace, every workload of the mesh). Nodes evaluate it
//! where the traffic arrives; this module parses, checks and selects. Fields Nodemesh does not
//! enforce (CUSTOM actions, request principals from JWTs, targetRefs) reject the policy with a
//! reason naming them: a policy is never half-applied.

use serde::{Deserialize, Serialize};

use super::{
    FieldError, Labels, Meta, Object, peer_authentication::LabelSelector, selector_matches, store::Store,
};

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct AuthorizationPolicy {
    pub meta: Meta,
    pub spec: AuthorizationPolicySpec,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuthorizationPolicySpec {
    pub selector: Option<LabelSelector>,
    #[serde(default)]
    pub action: Action,
    /// `None` and `[]` alike: matches nothing (an ALLOW policy without rules allows nothing).
    #[serde(default)]
    pub rules: Vec<Rule>,
    /// Not supported (gateways, waypoints).
    #[serde(default)]
    pub target_refs: Vec<serde_json::Value>,
    pub target_ref: Option<serde_json::Value>,
    /// CUSTOM's external authorizer; not supported.
    pub provider: Option<serde_json::Value>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Action {
    #[default]
    Allow,
    Deny,
    Audit,
    Custom,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Rule {
    #[serde(default)]
    pub from: Vec<FromSource>,
    #[serde(default)]
    pub to: Vec<ToOperation>,
    #[serde(default)]
    pub when: Vec<Condition>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FromSource {
    pub source: Source,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Source {
    #[serde(default)]
    pub principals: Vec<String>,
    #[serde(default)]
    pub not_principals: Vec<String>,
    #[serde(default)]
    pub namespaces: Vec<String>,
    #[serde(default)]
    pub not_namespaces: Vec<String>,
    #[serde(default)]
    pub ip_blocks: Vec<String>,
    #[serde(default)]
    pub not_ip_blocks: Vec<String>,
    #[serde(default)]
    pub remote_ip_blocks: Vec<String>,
    #[serde(default)]
    pub not_remote_ip_blocks: Vec<String>,
    #[serde(default)]
    pub request_principals: Vec<String>,
    #[serde(default)]
    pub not_request_principals: Vec<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ToOperation {
    pub operation: Operation,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Operation {
    #[serde(default)]
    pub hosts: Vec<String>,
    #[serde(default)]
    pub not_hosts: Vec<String>,
    #[serde(default)]
    pub ports: Vec<String>,
    #[serde(default)]
    pub not_ports: Vec<String>,
    #[serde(default)]
    pub methods: Vec<String>,
    #[serde(default)]
    pub not_methods: Vec<String>,
    #[serde(default)]
    pub paths: Vec<String>,
    #[serde(default)]
    pub not_paths: Vec<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Condition {
    pub key: String,
    #[serde(default)]
    pub values: Vec<String>,
    #[serde(default)]
    pub not_values: Vec<String>,
}

/// `when` keys Nodemesh evaluates: the connection's (proven) source and destination, and
/// HTTP request headers.
pub const CONNECTION_KEYS: [&str; 5] =
    ["source.ip", "source.namespace", "source.principal", "destination.ip", "destination.port"];
pub const HEADER_KEY_PREFIX: &str = "request.headers[";

impl AuthorizationPolicySpec {
    pub fn check(&self, errors: &mut Vec<FieldError>) {
        if self.action == Action::Custom || self.provider.is_some() {
            errors.push(FieldError::new("spec.action", "CUSTOM (an external authorizer) is not supported"));
        }
        if !self.target_refs.is_empty() || self.target_ref.is_some() {
            errors.push(FieldError::new(
                "spec.targetRefs",
                "not supported: policies apply to workloads by spec.selector",
            ));
        }
        for (i, rule) in self.rules.iter().enumerate() {
            let at = format!("spec.rules[{i}]");
            for (j, f) in rule.from.iter().enumerate() {
                let s = &f.source;
                let at = format!("{at}.from[{j}].source");
                if !s.request_principals.is_empty() || !s.not_request_principals.is_empty() {
                    errors.push(FieldError::new(
                        format!("{at}.requestPrincipals"),
                        "not supported: needs RequestAuthentication (JWT), which Nodemesh does not validate",
                    ));
                }
                for (name, blocks) in [
                    ("ipBlocks", &s.ip_blocks),
                    ("notIpBlocks", &s.not_ip_blocks),
                    ("remoteIpBlocks", &s.remote_ip_blocks),
                    ("notRemoteIpBlocks", &s.not_remote_ip_blocks),
                ] {
                    for (k, b) in blocks.iter().enumerate() {
                        if let Err(e) = parse_block(b) {
                            errors.push(FieldError::new(format!("{at}.{name}[{k}]"), e));
                        }
                    }
                }
            }
            for (j, t) in rule.to.iter().enumerate() {
                let o = &t.operation;
                for (name, ports) in [("ports", &o.ports), ("notPorts", &o.not_ports)] {
                    for (k, p) in ports.iter().enumerate() {
                        if p.parse::<u16>().ok().filter(|p| *p != 0).is_none() {
                            errors.push(FieldError::new(
                                format!("{at}.to[{j}].operation.{name}[{k}]"),
                                format!("`{p}` is not a port number 1-65535"),
                            ));
                        }
                    }
                }
            }
            for (j, c) in rule.when.iter().enumerate() {
                let header = c.key.strip_prefix(HEADER_KEY_PREFIX).and_then(|h| h.strip_suffix(']'));
                if !CONNECTION_KEYS.contains(&c.key.as_str()) && header.is_none_or(str::is_empty) {
                    errors.push(FieldError::new(
                        format!("{at}.when[{j}].key"),
                        format!(
                            "`{}` is not supported; supported: {}, request.headers[<name>]",
                            c.key,
                            CONNECTION_KEYS.join(", ")
                        ),
                    ));
                }
                if c.values.is_empty() && c.not_values.is_empty() {
                    errors.push(FieldError::new(format!("{at}.when[{j}]"), "needs values or notValues"));
                }
            }
        }
    }
}

pub use nodemesh_api::matchers::parse_block;

/// The policies of one store, collected once, ready to select for any workload.
pub struct AuthorizationPolicies<'a> {
    /// In (namespace, name) order, the store's.
    policies: Vec<&'a AuthorizationPolicy>,
    root_namespace: String,
}

impl<'a> AuthorizationPolicies<'a> {
    pub fn new(store: &'a Store) -> AuthorizationPolicies<'a> {
        let mut policies: Vec<&AuthorizationPolicy> = store
            .of_kind(super::Kind::AuthorizationPolicy)
            .filter_map(|o| match o {
                Object::AuthorizationPolicy(p) => Some(p),
                _ => None,
            })
            .collect();
        policies.sort_by(|a, b| (&a.meta.namespace, &a.meta.name).cmp(&(&b.meta.namespace, &b.meta.name)));
        AuthorizationPolicies { policies, root_namespace: super::peer_authentication::root_namespace(store) }
    }

    /// The policies that apply to a workload in `namespace` with `labels`: those of its
    /// namespace that select it (or select nothing), and the root namespace's selector-less
    /// ones; in (namespace, name) order.
    pub fn for_workload(&self, namespace: &str, labels: &Labels) -> Vec<&'a AuthorizationPolicy> {
        let selects = |p: &AuthorizationPolicy| {
            p.spec.selector.as_ref().is_none_or(|s| selector_matches(&s.match_labels, labels))
        };
        self.policies
            .iter()
            .copied()
            .filter(|p| {
                (p.meta.namespace == namespace && selects(p))
                    || (p.meta.namespace == self.root_namespace && p.spec.selector.is_none())
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{model::store::Origin, source::files::parse_documents};

    fn errors(yaml: &str) -> Vec<String> {
        let mut store = Store::default();
        store.replace_source(&Origin::File("test.yaml".into()), parse_documents(yaml));
        store.errors().map(ToString::to_string).collect()
    }

    #[test]
    fn unsupported_fields_reject_the_policy_naming_them() {
        let e = errors(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: a, namespace: x}\n\
             spec:\n  action: CUSTOM\n  provider: {name: ext}\n  rules:\n  - from: [{source: {requestPrincipals: ['*']}}]\n    \
             to: [{operation: {ports: ['http']}}]\n    when: [{key: 'request.auth.claims[iss]', values: [x]}]\n",
        );
        let all = e.join("\n");
        for needle in ["CUSTOM", "requestPrincipals", "`http` is not a port", "request.auth.claims[iss]"] {
            assert!(all.contains(needle), "{needle}: {all}");
        }
        let ok = errors(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: a, namespace: x}\n\
             spec:\n  selector: {matchLabels: {app: web}}\n  action: DENY\n  rules:\n  - from: [{source: {notNamespaces: [x], ipBlocks: [10.0.0.0/8]}}]\n    \
             to: [{operation: {methods: [POST], paths: ['/admin/*']}}]\n    when: [{key: 'request.headers[x-user]', values: [eve]}]\n",
        );
        assert!(ok.is_empty(), "{ok:?}");
    }
}
