//! `RateLimitPolicy` (nodemesh.io/v1alpha1): local rate limits on the HTTP requests to a host,
//! enforced by mesh-node as token buckets — Envoy's local rate limit, as a first-class object
//! instead of an EnvoyFilter patch.
//!
//! ```yaml
//! apiVersion: nodemesh.io/v1alpha1
//! kind: RateLimitPolicy
//! metadata: {name: ratings, namespace: shop}
//! spec:
//!   host: ratings                 # the service whose requests are limited (short or FQDN)
//!   side: Client                  # Client (default): a bucket per calling pod;
//!                                 # Server: a bucket per serving pod
//!   workloadSelector:             # Client side only: which callers (in this namespace);
//!     labels: {app: reviews}      # omitted: every caller, in any namespace
//!   limits:
//!   - name: writes
//!     match: [{method: {exact: POST}}]   # Istio HTTPMatchRequest, any of; omitted: every request
//!     maxTokens: 10               # the burst
//!     tokensPerFill: 5            # default: maxTokens
//!     fillInterval: 1s
//! ```
//!
//! Every limit whose match applies takes a token; a request finding any bucket empty is
//! answered 429 (gRPC: RESOURCE_EXHAUSTED) without reaching the upstream, with `x-ratelimit-limit`,
//! `x-ratelimit-remaining` and `x-ratelimit-reset` (seconds to the next fill) — headers that
//! limited-but-allowed responses carry too.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{FieldError, Meta, duration, istio::WorkloadSelector, virtual_service::HttpMatch};

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RateLimitPolicy {
    pub meta: Meta,
    pub spec: RateLimitPolicySpec,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Side {
    #[default]
    Client,
    Server,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RateLimitPolicySpec {
    #[serde(default)]
    pub host: String,
    #[serde(default)]
    pub side: Side,
    pub workload_selector: Option<WorkloadSelector>,
    #[serde(default)]
    pub limits: Vec<Limit>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Limit {
    #[serde(default)]
    pub name: String,
    #[serde(default, rename = "match")]
    pub matches: Vec<HttpMatch>,
    #[serde(default)]
    pub max_tokens: u32,
    pub tokens_per_fill: Option<u32>,
    #[serde(default, with = "duration::option")]
    pub fill_interval: Option<Duration>,
}

impl Limit {
    pub fn tokens_per_fill(&self) -> u32 {
        self.tokens_per_fill.unwrap_or(self.max_tokens)
    }

    /// The limit's name, or its index when unnamed.
    pub fn label(&self, index: usize) -> String {
        if self.name.is_empty() { index.to_string() } else { self.name.clone() }
    }
}

impl RateLimitPolicySpec {
    pub fn check(&self, errors: &mut Vec<FieldError>) {
        if self.host.is_empty() {
            errors.push(FieldError::new("spec.host", "missing: name the service whose requests are limited"));
        } else {
            super::istio::check_host("spec.host".into(), &self.host, errors);
            if self.host.starts_with('*') {
                errors.push(FieldError::new("spec.host", "name one service, not a wildcard"));
            }
        }
        if self.side == Side::Server && self.workload_selector.is_some() {
            errors.push(FieldError::new(
                "spec.workloadSelector",
                "selects callers, so it applies to side Client only; a Server-side limit covers every serving pod",
            ));
        }
        if self.limits.is_empty() {
            errors.push(FieldError::new("spec.limits", "at least one limit is required"));
        }
        for (i, l) in self.limits.iter().enumerate() {
            let at = format!("spec.limits[{i}]");
            if l.max_tokens == 0 {
                errors.push(FieldError::new(format!("{at}.maxTokens"), "must be at least 1"));
            }
            if l.tokens_per_fill == Some(0) {
                errors.push(FieldError::new(format!("{at}.tokensPerFill"), "must be at least 1"));
            }
            match l.fill_interval {
                None => errors.push(FieldError::new(format!("{at}.fillInterval"), "missing (e.g. 1s)")),
                Some(d) if d < Duration::from_millis(1) => {
                    errors.push(FieldError::new(format!("{at}.fillInterval"), "must be at least 1ms"))
                }
                Some(_) => {}
            }
            for (j, m) in l.matches.iter().enumerate() {
                let at = format!("{at}.match[{j}]");
                m.check(&at, errors);
                if !m.source_labels.is_empty() || !m.source_namespace.is_empty() {
                    errors.push(FieldError::new(
                        at,
                        "sourceLabels/sourceNamespace: choose callers with spec.workloadSelector instead",
                    ));
                }
            }
            if self.limits[..i].iter().any(|o| !l.name.is_empty() && o.name == l.name) {
                errors.push(FieldError::new(format!("{at}.name"), format!("`{}` is used twice", l.name)));
            }
        }
    }
}
