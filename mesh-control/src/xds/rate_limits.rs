//! RateLimitPolicy → the [`mesh::RateLimit`]s of one service port, which travel in the port's
//! RouteConfiguration (see `proto::RATE_LIMIT_FILTER`). Matches become Envoy `RouteMatch`es,
//! the same translation as VirtualService matches, so mesh-node evaluates both with one code.

use std::collections::HashMap;

use prost::Message;

use super::routes;
use crate::model::qualify;
use crate::{
    model::{
        Object,
        rate_limit::{RateLimitPolicy, Side},
        store::Store,
    },
    proto::mesh,
};

/// Qualified hostname → the policies limiting it, ordered by namespace/name (the store's order).
pub fn policies_by_host(store: &Store) -> HashMap<String, Vec<&RateLimitPolicy>> {
    let mut out: HashMap<String, Vec<&RateLimitPolicy>> = HashMap::new();
    for o in store.of_kind(crate::model::Kind::RateLimitPolicy) {
        let Object::RateLimitPolicy(p) = o else { continue };
        out.entry(qualify(&p.spec.host, &p.meta.namespace)).or_default().push(p);
    }
    out
}

/// The limits of `policies` that apply to requests on `port`. A limit whose every match names
/// another port does not apply here.
pub fn for_port(policies: &[&RateLimitPolicy], port: u16) -> Vec<mesh::RateLimit> {
    let mut out = Vec::new();
    for p in policies {
        let source = p.spec.workload_selector.as_ref().map(|s| mesh::RouteSource {
            labels: s.labels.clone().into_iter().collect(),
            namespace: p.meta.namespace.clone(),
            ..Default::default()
        });
        for (i, limit) in p.spec.limits.iter().enumerate() {
            let on_port: Vec<_> = limit.matches.iter().filter(|m| m.port.is_none_or(|p| p == port)).collect();
            if !limit.matches.is_empty() && on_port.is_empty() {
                continue;
            }
            let interval = limit.fill_interval.unwrap_or_default();
            out.push(mesh::RateLimit {
                name: format!("{}/{}/{}", p.meta.namespace, p.meta.name, limit.label(i)),
                per_destination: p.spec.side == Side::Server,
                source: source.clone(),
                matches: on_port.into_iter().map(|m| routes::route_match(Some(m)).encode_to_vec()).collect(),
                max_tokens: limit.max_tokens,
                tokens_per_fill: limit.tokens_per_fill(),
                fill_interval_ms: interval.as_millis().max(1) as u64,
            });
        }
    }
    out
}
