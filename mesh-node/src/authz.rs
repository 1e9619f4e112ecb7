//! AuthorizationPolicy evaluation, as Istio defines it: a DENY policy that matches denies;
//! otherwise, with no ALLOW policy the workload is open, and with some, one must match. AUDIT
//! policies only log. A policy matches when any of its rules does; a rule when one of its
//! `from` sources, one of its `to` operations and all of its `when` conditions match (an empty
//! list matches anything); inside an entry every field set must match, a `not…` field must not.
//!
//! A connection that is not HTTP has no method, path, host or headers. There, a rule that
//! needs them cannot match in an ALLOW policy (it allows only requests), and *does* match in a
//! DENY policy (fail closed: a rule meant to stop some requests must not let raw TCP through).

use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use hyper::HeaderMap;
use nodemesh_api::{identity::SpiffeId, proto::mesh, workload::WorkloadKey};

use crate::{
    delivery_routing::DeliveryRoutes,
    telemetry::{
        labels,
        metrics::{InboundDeniedLabels, Metrics},
    },
    xds::cache::Cache,
};

/// What a decision knows of the connection.
pub struct Peer<'a> {
    /// The client's identity: proven by its certificate (tunnel) or by mesh-node itself (a
    /// meshed pod of this node). `None`: plaintext from outside the mesh.
    pub identity: Option<&'a SpiffeId>,
    pub source_ip: IpAddr,
    pub destination: SocketAddr,
}

/// What a decision knows of one HTTP request.
pub struct Request<'a> {
    pub method: &'a str,
    pub path: &'a str,
    /// `Host` / `:authority`.
    pub host: &'a str,
    pub headers: &'a HeaderMap,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Allow,
    /// `policy`: the DENY policy that matched, or empty when no ALLOW policy did.
    Deny {
        policy: String,
    },
}

impl Verdict {
    /// Why, for an answer or an error message.
    pub fn explain(&self) -> String {
        match self {
            Verdict::Allow => "allowed".into(),
            Verdict::Deny { policy } if policy.is_empty() => "no ALLOW policy matched".into(),
            Verdict::Deny { policy } => format!("denied by {policy}"),
        }
    }

    /// Envoy's response code details for it: `rbac_access_denied_matched_policy[<policy>]`,
    /// `[none]` when no ALLOW policy matched.
    pub fn envoy_details(&self) -> String {
        match self {
            Verdict::Allow => "via_upstream".into(),
            Verdict::Deny { policy } if policy.is_empty() => "rbac_access_denied_matched_policy[none]".into(),
            Verdict::Deny { policy } => format!("rbac_access_denied_matched_policy[{policy}]"),
        }
    }

    /// The metric's `reason` label.
    pub fn reason(&self) -> &'static str {
        match self {
            Verdict::Allow => "allowed",
            Verdict::Deny { policy } if !policy.is_empty() => "denied_by_policy",
            _ => "not_allowed",
        }
    }
}

/// Decides connections to this node's workloads by their policies, logging and counting
/// denials.
pub struct Authorizer {
    /// The workloads' policies come with their `Workload`; `None` (no control plane): open.
    pub cache: Option<Arc<Cache>>,
    pub metrics: Arc<Metrics>,
    /// For the identities of this node's own pods (same-node traffic).
    pub trust_domain: String,
    /// How long a connection to a pod whose Workload (policies) has not arrived yet waits
    /// for it before it is refused.
    pub policy_wait: std::time::Duration,
}

impl Authorizer {
    /// A pod of this node as metrics label it (its record, once its policies have arrived,
    /// carries its owner's name and labels).
    pub fn local_peer(&self, key: &WorkloadKey, service_account: &str) -> labels::Peer {
        labels::Peer::local(self.lookup(key).as_deref(), key, service_account, &self.metrics.naming)
    }

    /// Whether `key`'s policies, as they are now, judge its HTTP request by request (then
    /// `inbound::http` serves and reports its requests itself).
    pub fn judges_requests(&self, key: &WorkloadKey) -> bool {
        self.lookup(key).is_some_and(|w| needs_http(&w.authorizations))
    }

    /// The identity of a pod of this node, as its certificate would say.
    pub fn identity_of(&self, namespace: &str, service_account: &str) -> SpiffeId {
        SpiffeId::of_workload(&self.trust_domain, namespace, service_account)
    }

    /// `workload`'s Workload as the control plane last sent it (`None`: none yet, or no
    /// control plane).
    fn lookup(&self, workload: &WorkloadKey) -> Option<Arc<mesh::Workload>> {
        self.cache.as_ref().and_then(|c| c.workload(&workload.to_string()))
    }

    fn count_denial(&self, workload: &WorkloadKey, reason: &str, policy: String) {
        self.metrics.inbound_denied(&InboundDeniedLabels {
            destination_workload: workload.name.clone(),
            destination_workload_namespace: workload.namespace.clone(),
            reason: reason.into(),
            policy,
        });
    }
}

/// The policies of one workload, as fetched for one connection.
pub struct Policies(Option<Arc<mesh::Workload>>);

impl Policies {
    /// The workload's PeerAuthentication lives here too.
    pub fn workload(&self) -> Option<&mesh::Workload> {
        self.0.as_deref()
    }

    fn authorizations(&self) -> &[mesh::Authorization] {
        self.0.as_ref().map_or(&[], |w| &w.authorizations)
    }

    /// Whether the policies look at requests: then HTTP is judged request by request, and
    /// only other traffic as connections.
    pub fn per_request(&self) -> bool {
        needs_http(self.authorizations())
    }
}

/// A connection to a pod of this node, as its policies see it: who calls (proven identity,
/// address) and where.
#[derive(Clone)]
pub struct Inbound {
    pub authorizer: Arc<Authorizer>,
    pub workload: WorkloadKey,
    /// The delivery routing of the pod it goes to, held for the connection's life so the
    /// pod's answers keep reaching it (see `delivery_routing`). Only the routing: holding the
    /// registration itself would keep every generation of a churned pod alive.
    pub routes: Option<Arc<DeliveryRoutes>>,
    pub identity: Option<SpiffeId>,
    pub source_ip: IpAddr,
    pub destination: SocketAddr,
}

impl Inbound {
    pub fn peer(&self) -> Peer<'_> {
        Peer { identity: self.identity.as_ref(), source_ip: self.source_ip, destination: self.destination }
    }

    /// The workload's policies, waiting (up to `policy_wait`) for the control plane's view of a
    /// pod that just registered. `None`: still unknown, and the connection must be refused
    /// rather than let through unjudged. Without a control plane there is nothing to wait for.
    pub async fn policies(&self) -> Option<Policies> {
        let a = &self.authorizer;
        let Some(cache) = &a.cache else { return Some(Policies(None)) };
        let deadline = tokio::time::Instant::now() + a.policy_wait;
        loop {
            let changed = cache.workloads_changed.notified();
            if let Some(w) = a.lookup(&self.workload) {
                return Some(Policies(Some(w)));
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                tracing::warn!(workload = %self.workload, "no policy known for this workload yet (control plane?): connection refused");
                a.count_denial(&self.workload, "policy_unknown", String::new());
                return None;
            }
        }
    }

    /// The policies as they are now (no waiting): for a re-check, or one request.
    pub fn current(&self) -> Policies {
        Policies(self.authorizer.lookup(&self.workload))
    }

    /// The verdict on the connection as a whole (`request: None`) or on one HTTP request,
    /// logged and counted when it is a denial.
    pub fn decide(&self, policies: &Policies, request: Option<&Request<'_>>) -> Verdict {
        let verdict = evaluate(policies.authorizations(), &self.peer(), request);
        if let Verdict::Deny { policy } = &verdict {
            tracing::warn!(
                workload = %self.workload, source = %self.source_ip,
                identity = self.identity.as_ref().map(ToString::to_string).unwrap_or_default(),
                destination = %self.destination,
                method = request.map(|r| r.method), path = request.map(|r| r.path),
                policy = if policy.is_empty() { "(no ALLOW policy matched)" } else { policy.as_str() },
                "{} denied by AuthorizationPolicy",
                if request.is_some() { "request" } else { "connection" }
            );
            self.authorizer.count_denial(&self.workload, verdict.reason(), policy.clone());
        }
        verdict
    }
}

/// Whether any policy needs HTTP to be decided (then HTTP connections are judged per request).
pub fn needs_http(policies: &[mesh::Authorization]) -> bool {
    policies.iter().flat_map(|p| &p.rules).any(rule_needs_http)
}

fn rule_needs_http(rule: &mesh::AuthorizationRule) -> bool {
    rule.to.iter().any(|o| {
        !(o.hosts.is_empty()
            && o.not_hosts.is_empty()
            && o.methods.is_empty()
            && o.not_methods.is_empty()
            && o.paths.is_empty()
            && o.not_paths.is_empty())
    }) || rule.when.iter().any(|c| c.key.starts_with("request.headers["))
}

pub fn evaluate(policies: &[mesh::Authorization], peer: &Peer<'_>, request: Option<&Request<'_>>) -> Verdict {
    use mesh::authorization::Action;
    let action = |p: &mesh::Authorization| Action::try_from(p.action).unwrap_or(Action::Allow);
    for p in policies.iter().filter(|p| action(p) == Action::Audit) {
        if matches(p, peer, request, true) {
            tracing::info!(policy = p.name, source = %peer.source_ip, destination = %peer.destination, "AUDIT policy matched");
        }
    }
    if let Some(p) = policies.iter().find(|p| action(p) == Action::Deny && matches(p, peer, request, true)) {
        return Verdict::Deny { policy: p.name.clone() };
    }
    let mut allows = policies.iter().filter(|p| action(p) == Action::Allow).peekable();
    if allows.peek().is_none() {
        return Verdict::Allow;
    }
    if allows.any(|p| matches(p, peer, request, false)) {
        Verdict::Allow
    } else {
        Verdict::Deny { policy: String::new() }
    }
}

/// `deny`: a rule that needs HTTP matches a non-HTTP connection (see the module docs).
fn matches(policy: &mesh::Authorization, peer: &Peer<'_>, request: Option<&Request<'_>>, deny: bool) -> bool {
    policy.rules.iter().any(|rule| {
        if request.is_none() && rule_needs_http(rule) && !deny {
            return false;
        }
        (rule.from.is_empty() || rule.from.iter().any(|s| source_matches(s, peer)))
            && (rule.to.is_empty() || rule.to.iter().any(|o| operation_matches(o, peer, request)))
            && rule.when.iter().all(|c| condition_matches(c, peer, request))
    })
}

/// `cluster.local/ns/x/sa/y`, as Istio writes principals.
fn principal(id: &SpiffeId) -> String {
    format!("{}/ns/{}/sa/{}", id.trust_domain, id.namespace, id.service_account)
}

fn source_matches(s: &mesh::AuthorizationSource, peer: &Peer<'_>) -> bool {
    let principal = peer.identity.map(principal);
    let namespace = peer.identity.map(|id| id.namespace.as_str());
    let any = |patterns: &[String], value: Option<&str>| {
        value.is_some_and(|v| patterns.iter().any(|p| pattern(p, v)))
    };
    let in_blocks = |blocks: &[String]| blocks.iter().any(|b| in_block(b, peer.source_ip));
    (s.principals.is_empty() || any(&s.principals, principal.as_deref()))
        && !any(&s.not_principals, principal.as_deref())
        && (s.namespaces.is_empty() || any(&s.namespaces, namespace))
        && !any(&s.not_namespaces, namespace)
        && (s.ip_blocks.is_empty() || in_blocks(&s.ip_blocks))
        && !in_blocks(&s.not_ip_blocks)
        && (s.remote_ip_blocks.is_empty() || in_blocks(&s.remote_ip_blocks))
        && !in_blocks(&s.not_remote_ip_blocks)
}

fn operation_matches(
    o: &mesh::AuthorizationOperation,
    peer: &Peer<'_>,
    request: Option<&Request<'_>>,
) -> bool {
    let port = u32::from(peer.destination.port());
    let ports_ok = (o.ports.is_empty() || o.ports.contains(&port)) && !o.not_ports.contains(&port);
    if !ports_ok {
        return false;
    }
    let Some(r) = request else {
        // No HTTP: only a rule without HTTP fields gets here for ALLOW; for DENY the HTTP
        // fields count as matched (fail closed).
        return true;
    };
    let host = r.host.to_ascii_lowercase();
    let host_matches = |h: &String| {
        let h = h.to_ascii_lowercase();
        pattern(&h, &host) || host.split_once(':').is_some_and(|(name, _)| pattern(&h, name))
    };
    (o.hosts.is_empty() || o.hosts.iter().any(host_matches))
        && !o.not_hosts.iter().any(host_matches)
        && (o.methods.is_empty() || o.methods.iter().any(|m| m == r.method))
        && !o.not_methods.iter().any(|m| m == r.method)
        && (o.paths.is_empty() || o.paths.iter().any(|p| pattern(p, r.path)))
        && !o.not_paths.iter().any(|p| pattern(p, r.path))
}

fn condition_matches(
    c: &mesh::AuthorizationCondition,
    peer: &Peer<'_>,
    request: Option<&Request<'_>>,
) -> bool {
    let value: Option<String> = match c.key.as_str() {
        "source.ip" => {
            let ip = peer.source_ip;
            let any = |vs: &[String]| vs.iter().any(|b| in_block(b, ip));
            return (c.values.is_empty() || any(&c.values)) && !any(&c.not_values);
        }
        "destination.ip" => {
            let ip = peer.destination.ip();
            let any = |vs: &[String]| vs.iter().any(|b| in_block(b, ip));
            return (c.values.is_empty() || any(&c.values)) && !any(&c.not_values);
        }
        "source.namespace" => peer.identity.map(|id| id.namespace.clone()),
        "source.principal" => peer.identity.map(principal),
        "destination.port" => Some(peer.destination.port().to_string()),
        key => match (key.strip_prefix("request.headers[").and_then(|k| k.strip_suffix(']')), request) {
            (Some(name), Some(r)) => r.headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_string),
            // No HTTP: see `matches` (a DENY rule matches, an ALLOW rule never got here).
            (Some(_), None) => return true,
            (None, _) => None,
        },
    };
    let any = |vs: &[String]| value.as_deref().is_some_and(|v| vs.iter().any(|p| pattern(p, v)));
    (c.values.is_empty() || any(&c.values)) && !any(&c.not_values)
}

/// Istio's string match: `*` (anything), `prefix*`, `*suffix`, or exact.
fn pattern(p: &str, value: &str) -> bool {
    if p == "*" {
        return true;
    }
    if let Some(prefix) = p.strip_suffix('*') {
        return value.starts_with(prefix);
    }
    if let Some(suffix) = p.strip_prefix('*') {
        return value.ends_with(suffix);
    }
    p == value
}

/// Whether `ip` is `block` (an address or a CIDR).
fn in_block(block: &str, ip: IpAddr) -> bool {
    let Ok((net, len)) = nodemesh_api::matchers::parse_block(block) else { return false };
    match (net, ip) {
        (IpAddr::V4(n), IpAddr::V4(a)) => {
            let mask = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
            u32::from(n) & mask == u32::from(a) & mask
        }
        (IpAddr::V6(n), IpAddr::V6(a)) => {
            let mask = u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0);
            u128::from(n) & mask == u128::from(a) & mask
        }
        (IpAddr::V4(n), IpAddr::V6(a)) => {
            a.to_ipv4_mapped().is_some_and(|a| in_block(&format!("{n}/{len}"), a.into()))
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh::authorization::Action;

    fn policy(name: &str, action: Action, rules: Vec<mesh::AuthorizationRule>) -> mesh::Authorization {
        mesh::Authorization { name: name.into(), action: action as i32, rules }
    }

    fn from_ns(ns: &str) -> mesh::AuthorizationRule {
        mesh::AuthorizationRule {
            from: vec![mesh::AuthorizationSource { namespaces: vec![ns.into()], ..Default::default() }],
            ..Default::default()
        }
    }

    fn post_admin() -> mesh::AuthorizationRule {
        mesh::AuthorizationRule {
            to: vec![mesh::AuthorizationOperation {
                methods: vec!["POST".into()],
                paths: vec!["/admin/*".into()],
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    fn id(ns: &str, sa: &str) -> SpiffeId {
        SpiffeId { trust_domain: "cluster.local".into(), namespace: ns.into(), service_account: sa.into() }
    }

    fn peer(identity: Option<&SpiffeId>) -> Peer<'_> {
        Peer {
            identity,
            source_ip: "10.0.0.9".parse().unwrap(),
            destination: "10.0.1.2:8080".parse().unwrap(),
        }
    }

    #[test]
    fn deny_beats_allow_and_allow_policies_close_the_rest() {
        let shop = id("shop", "web");
        let other = id("other", "x");
        let policies = vec![
            policy("shop/allow-shop", Action::Allow, vec![from_ns("shop")]),
            policy("shop/no-admin-posts", Action::Deny, vec![post_admin()]),
        ];
        let headers = HeaderMap::new();
        let get = Request { method: "GET", path: "/admin/x", host: "web", headers: &headers };
        let post = Request { method: "POST", path: "/admin/x", host: "web", headers: &headers };
        assert_eq!(evaluate(&policies, &peer(Some(&shop)), Some(&get)), Verdict::Allow);
        assert_eq!(
            evaluate(&policies, &peer(Some(&shop)), Some(&post)),
            Verdict::Deny { policy: "shop/no-admin-posts".into() }
        );
        assert_eq!(
            evaluate(&policies, &peer(Some(&other)), Some(&get)),
            Verdict::Deny { policy: String::new() }
        );
        assert_eq!(evaluate(&policies, &peer(None), Some(&get)), Verdict::Deny { policy: String::new() });
        // Raw TCP: the DENY rule needs HTTP, so it fails closed.
        assert_eq!(
            evaluate(&policies, &peer(Some(&shop)), None),
            Verdict::Deny { policy: "shop/no-admin-posts".into() }
        );
        // No policy: open; an ALLOW policy without rules: closed.
        assert_eq!(evaluate(&[], &peer(None), None), Verdict::Allow);
        assert_eq!(
            evaluate(&[policy("a/none", Action::Allow, vec![])], &peer(Some(&shop)), None),
            Verdict::Deny { policy: String::new() }
        );
    }

    #[test]
    fn principals_blocks_ports_and_conditions() {
        let web = id("shop", "web");
        let rule = mesh::AuthorizationRule {
            from: vec![mesh::AuthorizationSource {
                principals: vec!["cluster.local/ns/shop/*".into()],
                not_ip_blocks: vec!["10.0.0.0/30".into()],
                ..Default::default()
            }],
            to: vec![mesh::AuthorizationOperation { ports: vec![8080], ..Default::default() }],
            when: vec![mesh::AuthorizationCondition {
                key: "source.ip".into(),
                values: vec!["10.0.0.0/24".into()],
                not_values: vec![],
            }],
        };
        let policies = vec![policy("shop/p", Action::Allow, vec![rule])];
        assert_eq!(evaluate(&policies, &peer(Some(&web)), None), Verdict::Allow);
        let mut p = peer(Some(&web));
        p.destination = "10.0.1.2:9090".parse().unwrap();
        assert_ne!(evaluate(&policies, &p, None), Verdict::Allow, "port");
        let mut p = peer(Some(&web));
        p.source_ip = "10.0.0.2".parse().unwrap();
        assert_ne!(evaluate(&policies, &p, None), Verdict::Allow, "notIpBlocks");
        assert_ne!(evaluate(&policies, &peer(None), None), Verdict::Allow, "plaintext has no principal");
    }
}
