//! Istio `VirtualService` (networking.istio.io), field for field.
//!
//! What Nodemesh enforces today: `hosts`; `http` routes with `match` (uri, method, authority,
//! headers, withoutHeaders, queryParams: exact/prefix/regex; port; sourceLabels;
//! sourceNamespace), weighted `route` destinations to DestinationRule subsets or other services,
//! `redirect`, `rewrite` (uri, authority), `headers` (request/response set/add/remove, per route
//! and per destination), `timeout`, `retries` (under the node's retry budget), `fault` (delay,
//! abort) and `mirror`/`mirrors` with their percentages; `tcp` and `tls` routes (match port,
//! sourceLabels, sourceNamespace, sniHosts; weighted destinations per connection). Fields that
//! are not enforced yet (corsPolicy, directResponse, delegate, destinationSubnets,
//! sourceSubnet, exponential delays, http2Error aborts)
//! make the object **rejected** with a reason that names them, so a VirtualService never
//! half-applies: a policy that was written down never silently does nothing. The object's last good version (if any) stays in force.
//!
//! Beyond Istio: several VirtualServices for one host compose by the `nodemesh.io/precedence`
//! annotation, and a route with only `match` and `fault` is a fault layer over the host's other
//! routes ([`super::layering`]).

use std::{
    collections::{BTreeMap, BTreeSet},
    time::Duration,
};

use serde::{Deserialize, Serialize};

use super::{FieldError, Labels, Meta, duration, istio::PortSelector};

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct VirtualService {
    pub meta: Meta,
    /// The `nodemesh.io/precedence` annotation (default 0): where this object's routes go when
    /// several VirtualServices route one host, highest first (see [`super::layering`]).
    pub precedence: i32,
    pub spec: VirtualServiceSpec,
}

/// The annotation that orders VirtualServices sharing a host.
pub const PRECEDENCE_ANNOTATION: &str = "nodemesh.io/precedence";

/// Reads [`PRECEDENCE_ANNOTATION`] from an object's JSON (`metadata.annotations`).
pub fn precedence(object: &serde_json::Value) -> Result<i32, FieldError> {
    let field = format!("metadata.annotations.{PRECEDENCE_ANNOTATION}");
    let Some(value) = object.pointer("/metadata/annotations").and_then(|a| a.get(PRECEDENCE_ANNOTATION))
    else {
        return Ok(0);
    };
    let text = match value {
        serde_json::Value::String(s) => s.trim().to_string(),
        other => other.to_string(),
    };
    text.parse::<i32>().map_err(|_| {
        FieldError::new(field, format!("`{text}` is not an integer (higher goes first; default 0)"))
    })
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VirtualServiceSpec {
    #[serde(default)]
    pub hosts: Vec<String>,
    #[serde(default)]
    pub gateways: Vec<String>,
    #[serde(default)]
    pub http: Vec<HttpRoute>,
    #[serde(default)]
    pub tcp: Vec<L4Route>,
    #[serde(default)]
    pub tls: Vec<L4Route>,
    #[serde(default)]
    pub export_to: Vec<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpRoute {
    #[serde(default)]
    pub name: String,
    #[serde(default, rename = "match")]
    pub matches: Vec<HttpMatch>,
    #[serde(default)]
    pub route: Vec<RouteDestination>,
    pub redirect: Option<Redirect>,
    pub rewrite: Option<Rewrite>,
    #[serde(default, with = "duration::option")]
    pub timeout: Option<Duration>,
    pub headers: Option<Headers>,
    pub retries: Option<HttpRetry>,
    pub fault: Option<HttpFault>,
    pub mirror: Option<Destination>,
    #[serde(default)]
    pub mirrors: Vec<MirrorPolicy>,
    pub mirror_percentage: Option<Percent>,
    /// Deprecated integer form of `mirrorPercentage`.
    pub mirror_percent: Option<u32>,
    // Not enforced yet: their presence rejects the object (see the module docs).
    pub cors_policy: Option<serde_json::Value>,
    pub direct_response: Option<serde_json::Value>,
    pub delegate: Option<serde_json::Value>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpMatch {
    #[serde(default)]
    pub name: String,
    pub uri: Option<StringMatch>,
    pub scheme: Option<StringMatch>,
    pub method: Option<StringMatch>,
    pub authority: Option<StringMatch>,
    #[serde(default)]
    pub headers: BTreeMap<String, StringMatch>,
    pub port: Option<u16>,
    #[serde(default)]
    pub source_labels: Labels,
    #[serde(default)]
    pub gateways: Vec<String>,
    #[serde(default)]
    pub query_params: BTreeMap<String, StringMatch>,
    #[serde(default)]
    pub ignore_uri_case: bool,
    #[serde(default)]
    pub without_headers: BTreeMap<String, StringMatch>,
    #[serde(default)]
    pub source_namespace: String,
    #[serde(default)]
    pub stat_prefix: String,
    /// The callers this match admits by namespace, from its object's `exportTo` (set when
    /// routes are composed; not a field users write).
    #[serde(skip)]
    pub callers: Callers,
}

/// Which calling namespaces a route admits: a VirtualService exported to some namespaces
/// applies only to callers there (`In`); a default route added for callers that see no
/// VirtualService of the host admits everyone else (`NotIn`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Callers {
    #[default]
    All,
    In(BTreeSet<String>),
    NotIn(BTreeSet<String>),
}

impl Callers {
    /// The callers an `exportTo` list admits, for an object in `namespace`: empty or `*`
    /// → everyone; `.` → its own namespace; `~` → nobody; else those namespaces.
    pub fn exported(export_to: &[String], namespace: &str) -> Callers {
        if export_to.is_empty() || export_to.iter().any(|e| e == "*") {
            return Callers::All;
        }
        Callers::In(
            export_to
                .iter()
                .filter(|e| *e != "~")
                .map(|e| if e == "." { namespace.to_string() } else { e.clone() })
                .collect(),
        )
    }

    /// Whether every caller `other` admits, this admits too.
    pub fn covers(&self, other: &Callers) -> bool {
        match (self, other) {
            (Callers::All, _) => true,
            (_, Callers::All) => false,
            (Callers::In(a), Callers::In(b)) => b.is_subset(a),
            (Callers::In(_), Callers::NotIn(_)) => false,
            (Callers::NotIn(a), Callers::NotIn(b)) => a.is_subset(b),
            (Callers::NotIn(a), Callers::In(b)) => a.is_disjoint(b),
        }
    }

    /// The callers both admit; `None` when there are none.
    pub fn intersect(&self, other: &Callers) -> Option<Callers> {
        let both = match (self, other) {
            (Callers::All, x) | (x, Callers::All) => x.clone(),
            (Callers::In(a), Callers::In(b)) => Callers::In(a.intersection(b).cloned().collect()),
            (Callers::In(a), Callers::NotIn(b)) | (Callers::NotIn(b), Callers::In(a)) => {
                Callers::In(a.difference(b).cloned().collect())
            }
            (Callers::NotIn(a), Callers::NotIn(b)) => Callers::NotIn(a.union(b).cloned().collect()),
        };
        match &both {
            Callers::In(set) if set.is_empty() => None,
            _ => Some(both),
        }
    }
}

/// Istio `HTTPRetry`. Unset: Istio's default (2 attempts on connect-failure, refused-stream,
/// unavailable, cancelled, 503); every retry is also bounded by the node's retry budget.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpRetry {
    #[serde(default)]
    pub attempts: u32,
    #[serde(default, with = "duration::option")]
    pub per_try_timeout: Option<Duration>,
    #[serde(default)]
    pub retry_on: String,
    pub retry_remote_localities: Option<bool>,
    pub retry_ignore_previous_hosts: Option<bool>,
    #[serde(default, with = "duration::option")]
    pub backoff: Option<Duration>,
}

/// Istio `HTTPFaultInjection`: delay and/or abort a share of requests, at the caller's node.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpFault {
    pub delay: Option<FaultDelay>,
    pub abort: Option<FaultAbort>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FaultDelay {
    #[serde(default, with = "duration::option")]
    pub fixed_delay: Option<Duration>,
    pub exponential_delay: Option<serde_json::Value>,
    /// Unset: every request.
    pub percentage: Option<Percent>,
    /// Deprecated integer form of `percentage`.
    pub percent: Option<u32>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FaultAbort {
    pub http_status: Option<u16>,
    /// A gRPC status name, e.g. `UNAVAILABLE`.
    pub grpc_status: Option<String>,
    pub http2_error: Option<String>,
    /// Unset: every request.
    pub percentage: Option<Percent>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Percent {
    pub value: f64,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MirrorPolicy {
    pub destination: Destination,
    pub percentage: Option<Percent>,
}

/// gRPC status names Istio accepts in `fault.abort.grpcStatus`, with their codes.
pub const GRPC_STATUS: [(&str, u32); 16] = [
    ("CANCELLED", 1),
    ("UNKNOWN", 2),
    ("INVALID_ARGUMENT", 3),
    ("DEADLINE_EXCEEDED", 4),
    ("NOT_FOUND", 5),
    ("ALREADY_EXISTS", 6),
    ("PERMISSION_DENIED", 7),
    ("RESOURCE_EXHAUSTED", 8),
    ("FAILED_PRECONDITION", 9),
    ("ABORTED", 10),
    ("OUT_OF_RANGE", 11),
    ("UNIMPLEMENTED", 12),
    ("INTERNAL", 13),
    ("UNAVAILABLE", 14),
    ("DATA_LOSS", 15),
    ("UNAUTHENTICATED", 16),
];

/// Exactly one of the three.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct StringMatch {
    pub exact: Option<String>,
    pub prefix: Option<String>,
    /// RE2 syntax, matched against the whole value.
    pub regex: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RouteDestination {
    pub destination: Destination,
    /// Percent of the route's traffic; may be omitted when there is one destination.
    pub weight: Option<u32>,
    pub headers: Option<Headers>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Destination {
    pub host: String,
    #[serde(default)]
    pub subset: String,
    pub port: Option<PortSelector>,
}

impl Destination {
    /// Its host under Istio's short-name rule, in the namespace of the object that wrote it.
    pub fn qualify(&mut self, namespace: &str) {
        self.host = super::qualify(&self.host, namespace);
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Headers {
    pub request: Option<HeaderOperations>,
    pub response: Option<HeaderOperations>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HeaderOperations {
    #[serde(default)]
    pub set: BTreeMap<String, String>,
    #[serde(default)]
    pub add: BTreeMap<String, String>,
    #[serde(default)]
    pub remove: Vec<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Redirect {
    #[serde(default)]
    pub uri: String,
    #[serde(default)]
    pub authority: String,
    pub port: Option<u16>,
    #[serde(default)]
    pub scheme: String,
    pub redirect_code: Option<u16>,
    pub derive_port: Option<serde_json::Value>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Rewrite {
    #[serde(default)]
    pub uri: String,
    #[serde(default)]
    pub authority: String,
    pub uri_regex_rewrite: Option<RegexRewrite>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RegexRewrite {
    #[serde(rename = "match")]
    pub pattern: String,
    pub rewrite: String,
}

impl StringMatch {
    fn check(&self, at: &str, errors: &mut Vec<FieldError>) {
        let set = [self.exact.is_some(), self.prefix.is_some(), self.regex.is_some()];
        if set.iter().filter(|s| **s).count() != 1 {
            errors.push(FieldError::new(at, "set exactly one of exact, prefix, regex"));
        }
        if let Some(r) = &self.regex {
            check_regex(&format!("{at}.regex"), r, errors);
        }
    }
}

fn check_regex(at: &str, pattern: &str, errors: &mut Vec<FieldError>) {
    if let Err(e) = regex::Regex::new(pattern) {
        errors.push(FieldError::new(at, format!("not a valid RE2 regular expression: {e}")));
    }
}

impl VirtualServiceSpec {
    pub fn check(&self, errors: &mut Vec<FieldError>) {
        super::istio::check_export_to("spec.exportTo", &self.export_to, errors);
        if self.hosts.is_empty() {
            errors.push(FieldError::new("spec.hosts", "at least one host is required"));
        }
        for (i, h) in self.hosts.iter().enumerate() {
            super::istio::check_host(format!("spec.hosts[{i}]"), h, errors);
        }
        for (i, g) in self.gateways.iter().enumerate() {
            if g != "mesh" {
                errors.push(FieldError::new(
                    format!("spec.gateways[{i}]"),
                    format!("gateway `{g}`: only `mesh` is supported (Nodemesh has no ingress gateway yet)"),
                ));
            }
        }
        for (i, r) in self.tcp.iter().enumerate() {
            let at = format!("spec.tcp[{i}]");
            for (j, m) in r.matches.iter().enumerate() {
                let at = format!("{at}.match[{j}]");
                if !m.sni_hosts.is_empty() {
                    errors.push(FieldError::new(
                        format!("{at}.sniHosts"),
                        "only tls routes match on server names",
                    ));
                }
                m.check(&at, errors);
            }
            check_l4_destinations(&at, &r.route, errors);
        }
        for (i, r) in self.tls.iter().enumerate() {
            let at = format!("spec.tls[{i}]");
            if r.matches.is_empty() {
                errors
                    .push(FieldError::new(format!("{at}.match"), "a tls route needs a match with sniHosts"));
            }
            for (j, m) in r.matches.iter().enumerate() {
                let at = format!("{at}.match[{j}]");
                if m.sni_hosts.is_empty() {
                    errors.push(FieldError::new(
                        format!("{at}.sniHosts"),
                        "required: the server names this route takes",
                    ));
                }
                for (k, h) in m.sni_hosts.iter().enumerate() {
                    let wildcard_ok = h.strip_prefix("*.").is_none_or(|rest| !rest.contains('*'));
                    if h.is_empty() || (h.contains('*') && !h.starts_with("*.")) || !wildcard_ok {
                        errors.push(FieldError::new(
                            format!("{at}.sniHosts[{k}]"),
                            format!("`{h}`: a server name, or `*.` and a domain"),
                        ));
                    }
                }
                m.check(&at, errors);
            }
            check_l4_destinations(&at, &r.route, errors);
        }
        for (i, r) in self.http.iter().enumerate() {
            r.check(&format!("spec.http[{i}]"), errors);
        }
    }
}

/// Istio `TCPRoute` and `TLSRoute` (one shape: their matches differ only by `sniHosts`):
/// connections (not requests) that match go to one destination, picked by weight per
/// connection. A TLS route takes TLS connections whose ClientHello names a server in
/// `sniHosts`; the TLS is passed through, never terminated.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct L4Route {
    #[serde(default, rename = "match")]
    pub matches: Vec<L4Match>,
    #[serde(default)]
    pub route: Vec<L4RouteDestination>,
}

/// Istio `L4MatchAttributes` (tcp routes) and `TLSMatchAttributes` (tls routes, which add
/// `sniHosts`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct L4Match {
    /// tls routes only: server names, exact or `*.` and a domain.
    #[serde(default)]
    pub sni_hosts: Vec<String>,
    pub port: Option<u16>,
    #[serde(default)]
    pub source_labels: Labels,
    #[serde(default)]
    pub source_namespace: String,
    #[serde(default)]
    pub gateways: Vec<String>,
    // Not enforced yet: their presence rejects the object.
    #[serde(default)]
    pub destination_subnets: Vec<String>,
    #[serde(default)]
    pub source_subnet: String,
    /// As [`HttpMatch::callers`].
    #[serde(skip)]
    pub callers: Callers,
}

/// Istio `RouteDestination` (tcp and tls routes: no header changes at L4).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct L4RouteDestination {
    pub destination: Destination,
    pub weight: Option<u32>,
}

impl L4Match {
    fn check(&self, at: &str, errors: &mut Vec<FieldError>) {
        if !self.destination_subnets.is_empty() {
            errors.push(not_enforced(&format!("{at}.destinationSubnets")));
        }
        if !self.source_subnet.is_empty() {
            errors.push(not_enforced(&format!("{at}.sourceSubnet")));
        }
        if self.gateways.iter().any(|g| g != "mesh") {
            errors.push(FieldError::new(format!("{at}.gateways"), "only sidecar (mesh) traffic is routed"));
        }
    }
}

pub use nodemesh_api::matchers::sni_matches;

fn check_l4_destinations(at: &str, route: &[L4RouteDestination], errors: &mut Vec<FieldError>) {
    if route.is_empty() {
        errors.push(FieldError::new(format!("{at}.route"), "at least one destination is required"));
    }
    if route.len() > 1 {
        let total: u32 = route.iter().map(|d| d.weight.unwrap_or(0)).sum();
        if total != 100 {
            errors
                .push(FieldError::new(format!("{at}.route"), format!("weights add up to {total}, not 100")));
        }
    }
    for (j, d) in route.iter().enumerate() {
        if d.destination.host.is_empty() {
            errors.push(FieldError::new(format!("{at}.route[{j}].destination.host"), "missing"));
        }
    }
}

/// Retry conditions (Envoy's names, which Istio passes through).
pub const RETRY_ON: [&str; 13] = [
    "5xx",
    "gateway-error",
    "reset",
    "connect-failure",
    "refused-stream",
    "retriable-4xx",
    "retriable-status-codes",
    "reset-before-request",
    "cancelled",
    "deadline-exceeded",
    "internal",
    "resource-exhausted",
    "unavailable",
];

fn not_enforced(field: &str) -> FieldError {
    FieldError::new(
        field,
        "not enforced by this version of Nodemesh; the VirtualService is rejected rather than applied without it",
    )
}

impl HttpMatch {
    /// Checks one match condition at `at` (`spec.http[0].match[1]`).
    pub fn check(&self, at: &str, errors: &mut Vec<FieldError>) {
        let m = self;
        for (name, sm) in
            [("uri", &m.uri), ("scheme", &m.scheme), ("method", &m.method), ("authority", &m.authority)]
        {
            if let Some(sm) = sm {
                sm.check(&format!("{at}.{name}"), errors);
            }
        }
        for (group, map) in [
            ("headers", &m.headers),
            ("withoutHeaders", &m.without_headers),
            ("queryParams", &m.query_params),
        ] {
            for (k, sm) in map {
                sm.check(&format!("{at}.{group}.{k}"), errors);
            }
        }
        if !m.gateways.is_empty() {
            errors.push(FieldError::new(format!("{at}.gateways"), "only sidecar (mesh) traffic is routed"));
        }
        if m.scheme.is_some() {
            errors.push(not_enforced(&format!("{at}.scheme")));
        }
    }
}

impl HttpRoute {
    /// A route with a `fault` and no destination: it takes no request itself but adds its fault
    /// to the host's routes where its match overlaps theirs (see [`super::layering`]).
    pub fn is_fault_layer(&self) -> bool {
        self.route.is_empty() && self.redirect.is_none() && self.fault.is_some()
    }

    fn check_fault_layer(&self, at: &str, errors: &mut Vec<FieldError>) {
        let other_fields = [
            ("rewrite", self.rewrite.is_some()),
            ("timeout", self.timeout.is_some()),
            ("headers", self.headers.is_some()),
            ("retries", self.retries.is_some()),
            ("mirror", self.mirror.is_some() || !self.mirrors.is_empty()),
        ];
        for (name, present) in other_fields {
            if present {
                errors.push(FieldError::new(
                    format!("{at}.{name}"),
                    "a fault layer (a route with `fault` and no `route`) carries only `match` and `fault`; the routes it overlaps decide the rest",
                ));
            }
        }
    }

    fn check(&self, at: &str, errors: &mut Vec<FieldError>) {
        let unenforced = [
            ("corsPolicy", self.cors_policy.is_some()),
            ("directResponse", self.direct_response.is_some()),
            ("delegate", self.delegate.is_some()),
        ];
        for (name, present) in unenforced {
            if present {
                errors.push(not_enforced(&format!("{at}.{name}")));
            }
        }
        match (self.route.is_empty(), self.redirect.is_some()) {
            (true, false) if self.fault.is_some() => self.check_fault_layer(at, errors),
            (true, false) => errors.push(FieldError::new(
                at,
                "a route needs `route` destinations or a `redirect` (or, as a fault layer over the host's other routes, only `match` and `fault`)",
            )),
            (false, true) => errors.push(FieldError::new(at, "set either `route` or `redirect`, not both")),
            _ => {}
        }
        if self.redirect.is_some() && self.rewrite.is_some() {
            errors.push(FieldError::new(format!("{at}.rewrite"), "cannot be combined with `redirect`"));
        }
        for (j, m) in self.matches.iter().enumerate() {
            m.check(&format!("{at}.match[{j}]"), errors);
        }
        let weights: Vec<Option<u32>> = self.route.iter().map(|d| d.weight).collect();
        if self.route.len() > 1 {
            let total: u32 = weights.iter().map(|w| w.unwrap_or(0)).sum();
            if total != 100 {
                errors.push(FieldError::new(
                    format!("{at}.route"),
                    format!("weights add up to {total}, not 100"),
                ));
            }
        }
        for (j, d) in self.route.iter().enumerate() {
            if d.destination.host.is_empty() {
                errors.push(FieldError::new(format!("{at}.route[{j}].destination.host"), "missing"));
            }
            if d.weight.is_some_and(|w| w > 100) {
                errors.push(FieldError::new(format!("{at}.route[{j}].weight"), "over 100"));
            }
        }
        if let Some(retry) = &self.retries {
            for (j, cond) in retry.retry_on.split(',').map(str::trim).filter(|c| !c.is_empty()).enumerate() {
                if cond.parse::<u16>().is_err() && !RETRY_ON.contains(&cond) {
                    errors.push(FieldError::new(
                        format!("{at}.retries.retryOn"),
                        format!(
                            "condition {j} `{cond}` is not one of {} or an HTTP status code",
                            RETRY_ON.join(", ")
                        ),
                    ));
                }
            }
            if retry.backoff.is_some() {
                errors.push(not_enforced(&format!("{at}.retries.backoff")));
            }
        }
        if let Some(f) = &self.fault {
            check_fault(&format!("{at}.fault"), f, errors);
        }
        if self.mirror.is_some() && !self.mirrors.is_empty() {
            errors.push(FieldError::new(format!("{at}.mirrors"), "set either `mirror` or `mirrors`"));
        }
        let percents = [
            ("mirrorPercentage".to_string(), self.mirror_percentage),
            ("mirrorPercent".to_string(), self.mirror_percent.map(|p| Percent { value: f64::from(p) })),
        ]
        .into_iter()
        .chain(
            self.mirrors.iter().enumerate().map(|(j, m)| (format!("mirrors[{j}].percentage"), m.percentage)),
        );
        for (name, p) in percents {
            if let Some(p) = p {
                check_percent(&format!("{at}.{name}"), p, errors);
            }
        }
        if let Some(r) = &self.redirect {
            if r.derive_port.is_some() {
                errors.push(not_enforced(&format!("{at}.redirect.derivePort")));
            }
            if let Some(code) = r.redirect_code
                && !(300..=308).contains(&code)
            {
                errors.push(FieldError::new(
                    format!("{at}.redirect.redirectCode"),
                    format!("{code} is not a 3xx redirect"),
                ));
            }
        }
        if let Some(rw) = &self.rewrite
            && let Some(rr) = &rw.uri_regex_rewrite
        {
            check_regex(&format!("{at}.rewrite.uriRegexRewrite.match"), &rr.pattern, errors);
            if !rw.uri.is_empty() {
                errors
                    .push(FieldError::new(format!("{at}.rewrite"), "set either `uri` or `uriRegexRewrite`"));
            }
        }
    }
}

fn check_percent(at: &str, p: Percent, errors: &mut Vec<FieldError>) {
    if !(0.0..=100.0).contains(&p.value) {
        errors.push(FieldError::new(at, format!("{} is not a percentage (0 to 100)", p.value)));
    }
}

fn check_fault(at: &str, f: &HttpFault, errors: &mut Vec<FieldError>) {
    if f.delay.is_none() && f.abort.is_none() {
        errors.push(FieldError::new(at, "needs a `delay` or an `abort`"));
    }
    if let Some(d) = &f.delay {
        if d.exponential_delay.is_some() {
            errors.push(not_enforced(&format!("{at}.delay.exponentialDelay")));
        } else if d.fixed_delay.is_none() {
            errors.push(FieldError::new(format!("{at}.delay.fixedDelay"), "required"));
        }
        if let Some(p) = d.percentage {
            check_percent(&format!("{at}.delay.percentage"), p, errors);
        }
    }
    if let Some(a) = &f.abort {
        let kinds = [a.http_status.is_some(), a.grpc_status.is_some(), a.http2_error.is_some()];
        if kinds.iter().filter(|k| **k).count() != 1 {
            errors.push(FieldError::new(
                format!("{at}.abort"),
                "set exactly one of httpStatus, grpcStatus, http2Error",
            ));
        }
        if a.http2_error.is_some() {
            errors.push(not_enforced(&format!("{at}.abort.http2Error")));
        }
        if let Some(code) = a.http_status
            && !(200..=599).contains(&code)
        {
            errors.push(FieldError::new(
                format!("{at}.abort.httpStatus"),
                format!("{code} is not an HTTP status"),
            ));
        }
        if let Some(g) = &a.grpc_status
            && !GRPC_STATUS.iter().any(|(name, _)| name == g)
        {
            errors.push(FieldError::new(
                format!("{at}.abort.grpcStatus"),
                format!("`{g}` is not a gRPC status name"),
            ));
        }
        if let Some(p) = a.percentage {
            check_percent(&format!("{at}.abort.percentage"), p, errors);
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn errors(spec: serde_json::Value) -> Vec<String> {
        let spec: VirtualServiceSpec = serde_json::from_value(spec).unwrap();
        let mut errors = Vec::new();
        spec.check(&mut errors);
        errors.iter().map(ToString::to_string).collect()
    }

    #[test]
    fn a_canary_with_header_match_is_valid() {
        let e = errors(json!({"hosts": ["reviews"], "http": [
            {"match": [{"headers": {"end-user": {"exact": "jason"}}}], "route": [{"destination": {"host": "reviews", "subset": "v2"}}]},
            {"route": [{"destination": {"host": "reviews", "subset": "v1"}, "weight": 90},
                       {"destination": {"host": "reviews", "subset": "v2"}, "weight": 10}]}]}));
        assert!(e.is_empty(), "{e:?}");
    }

    #[test]
    fn tcp_and_tls_routes_are_checked_field_by_field() {
        let ok = errors(json!({"hosts": ["db"],
            "tls": [{"match": [{"port": 443, "sniHosts": ["a.example", "*.b.example"]}], "route": [{"destination": {"host": "db"}}]}],
            "tcp": [{"route": [{"destination": {"host": "db", "subset": "v1"}, "weight": 80},
                               {"destination": {"host": "db", "subset": "v2"}, "weight": 20}]}]}));
        assert!(ok.is_empty(), "{ok:?}");
        let e = errors(json!({"hosts": ["db"],
            "tls": [{"match": [{"port": 443}], "route": [{"destination": {"host": "db"}}]},
                    {"match": [{"sniHosts": ["a.*.example"]}], "route": []}],
            "tcp": [{"match": [{"destinationSubnets": ["10.0.0.0/8"], "sniHosts": ["x"]}],
                     "route": [{"destination": {"host": "db"}, "weight": 50}, {"destination": {"host": "db"}, "weight": 20}]}]}))
        .join("\n");
        for expected in [
            "spec.tls[0].match[0].sniHosts: required",
            "spec.tls[1].match[0].sniHosts[0]: `a.*.example`",
            "spec.tls[1].route: at least one destination",
            "spec.tcp[0].match[0].destinationSubnets: not enforced",
            "spec.tcp[0].match[0].sniHosts: only tls routes",
            "spec.tcp[0].route: weights add up to 70",
        ] {
            assert!(e.contains(expected), "missing `{expected}` in:\n{e}");
        }
        assert!(sni_matches("*.b.example", "X.B.example") && !sni_matches("*.b.example", "b.example"));
    }

    #[test]
    fn each_problem_is_named_with_its_field() {
        let e = errors(json!({"hosts": ["reviews"], "http": [
            {"match": [{"uri": {"regex": "(unclosed"}, "headers": {"x": {"exact": "a", "prefix": "b"}}}],
             "route": [{"destination": {"host": "reviews"}, "weight": 60}, {"destination": {"host": "reviews"}, "weight": 30}],
             "corsPolicy": {"allowOrigins": [{"exact": "a"}]}}]}));
        let text = e.join("\n");
        assert!(text.contains("spec.http[0].match[0].uri.regex"), "{text}");
        assert!(text.contains("spec.http[0].match[0].headers.x"), "{text}");
        assert!(text.contains("add up to 90"), "{text}");
        assert!(text.contains("spec.http[0].corsPolicy") && text.contains("not enforced"), "{text}");
    }
}
