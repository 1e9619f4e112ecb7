//! VirtualService → Envoy `RouteConfiguration`, one per (service, port) that a VirtualService
//! applies to, named `<hostname>:<port>`, with one virtual host matching every authority
//! (routing is keyed on the service dialled, never on `Host`, which clients set to anything).
//!
//! Istio → Envoy, as Istio itself translates for sidecars: uri exact/prefix/regex → path /
//! prefix / safe_regex; method and authority → `:method` / `:authority` header matchers;
//! withoutHeaders → inverted header matchers; weighted destinations → weighted clusters named
//! `outbound|<port>|<subset>|<host>`; headers set/add/remove → header options; no timeout →
//! timeout 0 (disabled, where Envoy would default to 15 s). sourceLabels / sourceNamespace go
//! into the route's typed metadata (`nodemesh.io`, a `RouteSource`).

use std::collections::BTreeSet;

use envoy_types::pb::{
    envoy::{
        config::{
            core::v3::{
                HeaderValue, HeaderValueOption, Metadata, RuntimeFractionalPercent,
                header_value_option::HeaderAppendAction,
            },
            route::v3::{
                self as route, HeaderMatcher, QueryParameterMatcher, RedirectAction, RouteAction,
                RouteConfiguration, RouteMatch, VirtualHost, WeightedCluster,
                header_matcher::HeaderMatchSpecifier, query_parameter_matcher::QueryParameterMatchSpecifier,
                redirect_action, route_action, route_match::PathSpecifier, weighted_cluster::ClusterWeight,
            },
        },
        extensions::filters::{
            common::fault::v3 as common_fault,
            http::fault::v3::{FaultAbort, HttpFault, fault_abort},
        },
        r#type::matcher::v3::{RegexMatcher, StringMatcher, string_matcher::MatchPattern},
        r#type::v3::{FractionalPercent, fractional_percent},
    },
    google::protobuf as pbuf,
};

use super::encode::to_any;
use crate::model::qualify;
use crate::{
    model::{
        Labels,
        virtual_service::{self as vs, Callers, VirtualService},
    },
    proto::{self, mesh},
};

/// What the route of one service port needs to know about other services: the ports a host
/// serves (to resolve a destination without a port).
pub trait Ports {
    fn ports_of(&self, hostname: &str) -> Vec<u16>;
    /// The consistent-hash policy of a cluster's DestinationRule (or subset), if any.
    fn hash_policy(&self, cluster: &str) -> Option<mesh::HashPolicy>;
}

/// The route name for a service port.
pub fn route_name(hostname: &str, port: u16) -> String {
    format!("{hostname}:{port}")
}

pub fn cluster_name(port: u16, subset: &str, hostname: &str) -> String {
    format!("outbound|{port}|{subset}|{hostname}")
}

/// Every cluster the HTTP route of `hostname:port` can send to: the destinations and mirrors
/// of `v`'s http routes on that port, or without them the port's own `cluster`. Known before
/// the route itself is built.
pub fn clusters(v: Option<&VirtualService>, port: u16, cluster: &str, ports: &dyn Ports) -> BTreeSet<String> {
    let Some(v) = v else { return [cluster.to_string()].into() };
    let forwarding = v.spec.http.iter().filter(|http| http.redirect.is_none() && on_port(http, port));
    let mut out: BTreeSet<String> = forwarding
        .flat_map(|http| {
            http.route.iter().map(|d| &d.destination).chain(mirrors(http).into_iter().map(|(d, _)| d))
        })
        .map(|d| destination_cluster(d, v, port, ports))
        .collect();
    if v.spec.http.is_empty() {
        // HTTP (and any connection no L4 route takes) still goes to the port's own cluster.
        out.insert(cluster.to_string());
    }
    out
}

/// The matches of `http` that apply on `port` (`None`: the route has no match, so every request).
fn matches_on_port(http: &vs::HttpRoute, port: u16) -> Vec<Option<&vs::HttpMatch>> {
    if http.matches.is_empty() {
        return vec![None];
    }
    http.matches.iter().filter(|m| m.port.is_none_or(|p| p == port)).map(Some).collect()
}

fn on_port(http: &vs::HttpRoute, port: u16) -> bool {
    !matches_on_port(http, port).is_empty()
}

/// The RouteConfiguration for `hostname:port`: the routes of `v` (without one, a catch-all to
/// `cluster`, the port's own) and the port's rate `limits`.
pub fn build(
    v: Option<&VirtualService>,
    limits: Vec<mesh::RateLimit>,
    hostname: &str,
    port: u16,
    cluster: &str,
    ports: &dyn Ports,
) -> RouteConfiguration {
    let routes = match v {
        Some(v) if !v.spec.http.is_empty() => virtual_service_routes(v, port, ports),
        // No VirtualService, or one with only tcp/tls routes: HTTP keeps its default.
        _ => vec![catch_all(cluster)],
    };
    let name = route_name(hostname, port);
    let typed_per_filter_config = if limits.is_empty() {
        Default::default()
    } else {
        // Optional: Envoy and gRPC, which do not know the type, skip it instead of rejecting.
        let config = route::FilterConfig {
            config: Some(to_any(proto::RATE_LIMITS_TYPE, &mesh::RateLimits { limits })),
            is_optional: true,
            ..Default::default()
        };
        [(proto::RATE_LIMIT_FILTER.to_string(), to_any(FILTER_CONFIG_TYPE, &config))].into()
    };
    RouteConfiguration {
        name: name.clone(),
        virtual_hosts: vec![VirtualHost {
            name,
            domains: vec!["*".into()],
            routes,
            typed_per_filter_config,
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// The Envoy routes of `v` on `port`: one per (route, match), in order.
fn virtual_service_routes(v: &VirtualService, port: u16, ports: &dyn Ports) -> Vec<route::Route> {
    let mut routes = Vec::new();
    for (i, http) in v.spec.http.iter().enumerate() {
        let name = if http.name.is_empty() {
            format!("{}.{}.{i}", v.meta.namespace, v.meta.name)
        } else {
            http.name.clone()
        };
        for m in matches_on_port(http, port) {
            let action = match &http.redirect {
                Some(r) => route::route::Action::Redirect(redirect(r)),
                None => route::route::Action::Route(route_action(http, v, port, ports)),
            };
            let (req_add, req_remove, resp_add, resp_remove) = header_ops(http.headers.as_ref());
            let typed_per_filter_config = http
                .fault
                .as_ref()
                .map(|f| [(FAULT_FILTER.to_string(), to_any(FAULT_TYPE, &fault(f)))].into())
                .unwrap_or_default();
            routes.push(route::Route {
                typed_per_filter_config,
                name: name.clone(),
                r#match: Some(route_match(m)),
                metadata: m.and_then(source_metadata),
                request_headers_to_add: req_add,
                request_headers_to_remove: req_remove,
                response_headers_to_add: resp_add,
                response_headers_to_remove: resp_remove,
                action: Some(action),
                ..Default::default()
            });
        }
    }
    routes
}

const FILTER_CONFIG_TYPE: &str = "type.googleapis.com/envoy.config.route.v3.FilterConfig";

/// Every request to `cluster`.
pub fn catch_all(cluster: &str) -> route::Route {
    route::Route {
        r#match: Some(route_match(None)),
        action: Some(route::route::Action::Route(RouteAction {
            cluster_specifier: Some(route_action::ClusterSpecifier::Cluster(cluster.to_string())),
            // As for VirtualService routes: no timeout unless one is asked for.
            timeout: Some(pbuf::Duration::default()),
            retry_policy: Some(retry_policy(None)),
            ..Default::default()
        })),
        ..Default::default()
    }
}

/// Envoy's HTTP fault filter, configured per route.
pub const FAULT_FILTER: &str = "envoy.filters.http.fault";
pub const FAULT_TYPE: &str = "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault";

/// An Istio percentage as Envoy's fraction per million (so 0.1% survives).
fn per_million(p: Option<vs::Percent>) -> FractionalPercent {
    let value = p.map_or(100.0, |p| p.value);
    FractionalPercent {
        numerator: (value * 10_000.0).round() as u32,
        denominator: fractional_percent::DenominatorType::Million as i32,
    }
}

fn fault(f: &vs::HttpFault) -> HttpFault {
    let delay = f.delay.as_ref().map(|d| {
        let fixed = d.fixed_delay.unwrap_or_default();
        let percent = d.percentage.or(d.percent.map(|p| vs::Percent { value: f64::from(p) }));
        common_fault::FaultDelay {
            percentage: Some(per_million(percent)),
            fault_delay_secifier: Some(common_fault::fault_delay::FaultDelaySecifier::FixedDelay(
                pbuf::Duration { seconds: fixed.as_secs() as i64, nanos: fixed.subsec_nanos() as i32 },
            )),
        }
    });
    let abort = f.abort.as_ref().map(|a| {
        let error_type = match (&a.http_status, &a.grpc_status) {
            (Some(code), _) => fault_abort::ErrorType::HttpStatus(u32::from(*code)),
            (None, Some(name)) => fault_abort::ErrorType::GrpcStatus(
                vs::GRPC_STATUS.iter().find(|(n, _)| n == name).map_or(2, |(_, c)| *c),
            ),
            (None, None) => fault_abort::ErrorType::HttpStatus(500),
        };
        FaultAbort {
            percentage: Some(per_million(a.percentage)),
            error_type: Some(error_type),
            ..Default::default()
        }
    });
    HttpFault { delay, abort, ..Default::default() }
}

fn string_matcher(m: &vs::StringMatch) -> StringMatcher {
    let pattern = match (&m.exact, &m.prefix, &m.regex) {
        (Some(e), _, _) => MatchPattern::Exact(e.clone()),
        (_, Some(p), _) => MatchPattern::Prefix(p.clone()),
        (_, _, Some(r)) => MatchPattern::SafeRegex(regex(r)),
        _ => MatchPattern::Prefix(String::new()),
    };
    StringMatcher { match_pattern: Some(pattern), ..Default::default() }
}

fn regex(r: &str) -> RegexMatcher {
    RegexMatcher { regex: r.to_string(), ..Default::default() }
}

fn header(name: &str, m: &vs::StringMatch, invert: bool) -> HeaderMatcher {
    HeaderMatcher {
        name: name.to_string(),
        header_match_specifier: Some(HeaderMatchSpecifier::StringMatch(string_matcher(m))),
        invert_match: invert,
        ..Default::default()
    }
}

pub fn route_match(m: Option<&vs::HttpMatch>) -> RouteMatch {
    let Some(m) = m else {
        return RouteMatch { path_specifier: Some(PathSpecifier::Prefix("/".into())), ..Default::default() };
    };
    let path = match m.uri.as_ref().map(|u| (&u.exact, &u.prefix, &u.regex)) {
        Some((Some(e), _, _)) => PathSpecifier::Path(e.clone()),
        Some((_, Some(p), _)) => PathSpecifier::Prefix(p.clone()),
        Some((_, _, Some(r))) => PathSpecifier::SafeRegex(regex(r)),
        _ => PathSpecifier::Prefix("/".into()),
    };
    let mut headers = Vec::new();
    if let Some(method) = &m.method {
        headers.push(header(":method", method, false));
    }
    if let Some(authority) = &m.authority {
        headers.push(header(":authority", authority, false));
    }
    headers.extend(m.headers.iter().map(|(k, v)| header(k, v, false)));
    headers.extend(m.without_headers.iter().map(|(k, v)| header(k, v, true)));
    // Envoy and gRPC clients cannot tell who calls: they skip routes for some callers only.
    // (A route for everyone but some namespaces — the default route of callers no
    // VirtualService is exported to — is theirs: they are in no namespace of the mesh.)
    if !m.source_labels.is_empty() || !m.source_namespace.is_empty() || matches!(m.callers, Callers::In(_)) {
        headers.push(HeaderMatcher {
            name: proto::SOURCE_SCOPED_HEADER.into(),
            header_match_specifier: Some(HeaderMatchSpecifier::PresentMatch(true)),
            ..Default::default()
        });
    }
    let query_parameters = m
        .query_params
        .iter()
        .map(|(k, v)| QueryParameterMatcher {
            name: k.clone(),
            query_parameter_match_specifier: Some(QueryParameterMatchSpecifier::StringMatch(string_matcher(
                v,
            ))),
        })
        .collect();
    RouteMatch {
        path_specifier: Some(path),
        case_sensitive: Some(pbuf::BoolValue { value: !m.ignore_uri_case }),
        headers,
        query_parameters,
        ..Default::default()
    }
}

/// Who a match admits beyond what Envoy's RouteMatch can say; `None`: anyone.
pub fn route_source(labels: &Labels, namespace: &str, callers: &Callers) -> Option<mesh::RouteSource> {
    if labels.is_empty() && namespace.is_empty() && *callers == Callers::All {
        return None;
    }
    let (only_namespaces, namespaces, not_namespaces) = match callers {
        Callers::All => (false, Vec::new(), Vec::new()),
        Callers::In(set) => (true, set.iter().cloned().collect(), Vec::new()),
        Callers::NotIn(set) => (false, Vec::new(), set.iter().cloned().collect()),
    };
    Some(mesh::RouteSource {
        labels: labels.clone().into_iter().collect(),
        namespace: namespace.to_string(),
        only_namespaces,
        namespaces,
        not_namespaces,
    })
}

fn source_metadata(m: &vs::HttpMatch) -> Option<Metadata> {
    let source = route_source(&m.source_labels, &m.source_namespace, &m.callers)?;
    let any = to_any(&format!("type.googleapis.com/{}", "nodemesh.mesh.v1.RouteSource"), &source);
    Some(Metadata {
        typed_filter_metadata: [(proto::METADATA_KEY.to_string(), any)].into(),
        ..Default::default()
    })
}

fn route_action(http: &vs::HttpRoute, v: &VirtualService, port: u16, ports: &dyn Ports) -> RouteAction {
    let mut weighted = Vec::new();
    // Envoy hashes per route: the first destination whose DestinationRule (or subset) asks
    // for consistent hashing decides how.
    let mut hash_policy = Vec::new();
    for d in &http.route {
        let cluster = destination_cluster(&d.destination, v, port, ports);
        if hash_policy.is_empty()
            && let Some(h) = ports.hash_policy(&cluster)
        {
            hash_policy.push(envoy_hash_policy(&h));
        }
        let (req_add, req_remove, resp_add, resp_remove) = header_ops(d.headers.as_ref());
        weighted.push(ClusterWeight {
            name: cluster,
            weight: Some(pbuf::UInt32Value {
                value: d.weight.unwrap_or(if http.route.len() == 1 { 100 } else { 0 }),
            }),
            request_headers_to_add: req_add,
            request_headers_to_remove: req_remove,
            response_headers_to_add: resp_add,
            response_headers_to_remove: resp_remove,
            ..Default::default()
        });
    }
    let specifier = if weighted.len() == 1
        && weighted[0].request_headers_to_add.is_empty()
        && weighted[0].request_headers_to_remove.is_empty()
        && weighted[0].response_headers_to_add.is_empty()
        && weighted[0].response_headers_to_remove.is_empty()
    {
        route_action::ClusterSpecifier::Cluster(weighted.remove(0).name)
    } else {
        route_action::ClusterSpecifier::WeightedClusters(WeightedCluster {
            clusters: weighted,
            ..Default::default()
        })
    };
    let request_mirror_policies = mirrors(http)
        .into_iter()
        .map(|(d, percent)| {
            let cluster = destination_cluster(d, v, port, ports);
            route_action::RequestMirrorPolicy {
                cluster,
                runtime_fraction: Some(RuntimeFractionalPercent {
                    default_value: Some(per_million(percent)),
                    ..Default::default()
                }),
                ..Default::default()
            }
        })
        .collect();
    let timeout = http.timeout.unwrap_or_default();
    let mut action = RouteAction {
        hash_policy,
        request_mirror_policies,
        retry_policy: Some(retry_policy(http.retries.as_ref())),
        cluster_specifier: Some(specifier),
        timeout: Some(pbuf::Duration {
            seconds: timeout.as_secs() as i64,
            nanos: timeout.subsec_nanos() as i32,
        }),
        ..Default::default()
    };
    if let Some(rw) = &http.rewrite {
        if !rw.uri.is_empty() {
            action.prefix_rewrite = rw.uri.clone();
        }
        if let Some(rr) = &rw.uri_regex_rewrite {
            action.regex_rewrite =
                Some(envoy_types::pb::envoy::r#type::matcher::v3::RegexMatchAndSubstitute {
                    pattern: Some(regex(&rr.pattern)),
                    substitution: rr.rewrite.clone(),
                });
        }
        if !rw.authority.is_empty() {
            action.host_rewrite_specifier =
                Some(route_action::HostRewriteSpecifier::HostRewriteLiteral(rw.authority.clone()));
        }
    }
    action
}

/// Istio's retry semantics: unset → 2 attempts on its default conditions; `attempts: 0` → none;
/// status codes in `retryOn` become retriable status codes.
/// Where `http` mirrors to, with what share: `mirror` (with `mirrorPercentage` or the legacy
/// `mirrorPercent`) or `mirrors`.
fn mirrors(http: &vs::HttpRoute) -> Vec<(&vs::Destination, Option<vs::Percent>)> {
    match &http.mirror {
        Some(d) => {
            let legacy = http.mirror_percent.map(|p| vs::Percent { value: f64::from(p) });
            vec![(d, http.mirror_percentage.or(legacy))]
        }
        None => http.mirrors.iter().map(|m| (&m.destination, m.percentage)).collect(),
    }
}

fn retry_policy(r: Option<&vs::HttpRetry>) -> route::RetryPolicy {
    const ISTIO_DEFAULT_ON: &str =
        "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes";
    let (attempts, on, per_try) = match r {
        None => (2, ISTIO_DEFAULT_ON.to_string(), None),
        Some(r) => (
            r.attempts,
            if r.retry_on.is_empty() { ISTIO_DEFAULT_ON.to_string() } else { r.retry_on.clone() },
            r.per_try_timeout,
        ),
    };
    let mut conditions: Vec<String> = Vec::new();
    let mut codes: Vec<u32> = Vec::new();
    for c in on.split(',').map(str::trim).filter(|c| !c.is_empty()) {
        match c.parse::<u32>() {
            Ok(code) => codes.push(code),
            Err(_) => conditions.push(c.to_string()),
        }
    }
    if r.is_none() || r.is_some_and(|r| r.retry_on.is_empty()) {
        codes.push(503);
    }
    if !codes.is_empty() && !conditions.iter().any(|c| c == "retriable-status-codes") {
        conditions.push("retriable-status-codes".into());
    }
    route::RetryPolicy {
        retry_on: conditions.join(","),
        num_retries: Some(pbuf::UInt32Value { value: attempts }),
        per_try_timeout: per_try
            .map(|d| pbuf::Duration { seconds: d.as_secs() as i64, nanos: d.subsec_nanos() as i32 }),
        retriable_status_codes: codes,
        ..Default::default()
    }
}

fn envoy_hash_policy(h: &mesh::HashPolicy) -> route_action::HashPolicy {
    use mesh::hash_policy::Key;
    use route_action::hash_policy::{ConnectionProperties, Cookie, Header, PolicySpecifier, QueryParameter};
    let specifier = match &h.key {
        Some(Key::Header(name)) => {
            PolicySpecifier::Header(Header { header_name: name.clone(), ..Default::default() })
        }
        Some(Key::Cookie(name)) => {
            PolicySpecifier::Cookie(Cookie { name: name.clone(), ..Default::default() })
        }
        Some(Key::QueryParameter(name)) => {
            PolicySpecifier::QueryParameter(QueryParameter { name: name.clone() })
        }
        Some(Key::SourceIp(_)) | None => {
            PolicySpecifier::ConnectionProperties(ConnectionProperties { source_ip: true })
        }
    };
    route_action::HashPolicy { policy_specifier: Some(specifier), ..Default::default() }
}

/// The cluster of a destination: its host qualified in the VirtualService's namespace, its port
/// (given, or this port, or the host's only port) and subset.
pub(super) fn destination_cluster(
    d: &vs::Destination,
    v: &VirtualService,
    port: u16,
    ports: &dyn Ports,
) -> String {
    let host = qualify(&d.host, &v.meta.namespace);
    let dest_port = d.port.as_ref().map(|p| p.number).unwrap_or_else(|| {
        let served = ports.ports_of(&host);
        if served.contains(&port) || served.len() != 1 { port } else { served[0] }
    });
    cluster_name(dest_port, &d.subset, &host)
}

fn redirect(r: &vs::Redirect) -> RedirectAction {
    use redirect_action::RedirectResponseCode as Code;
    let code = match r.redirect_code.unwrap_or(301) {
        302 => Code::Found,
        303 => Code::SeeOther,
        307 => Code::TemporaryRedirect,
        308 => Code::PermanentRedirect,
        _ => Code::MovedPermanently,
    };
    RedirectAction {
        host_redirect: r.authority.clone(),
        port_redirect: r.port.map_or(0, u32::from),
        response_code: code as i32,
        scheme_rewrite_specifier: (!r.scheme.is_empty())
            .then(|| redirect_action::SchemeRewriteSpecifier::SchemeRedirect(r.scheme.clone())),
        path_rewrite_specifier: (!r.uri.is_empty())
            .then(|| redirect_action::PathRewriteSpecifier::PathRedirect(r.uri.clone())),
        ..Default::default()
    }
}

type HeaderOps = (Vec<HeaderValueOption>, Vec<String>, Vec<HeaderValueOption>, Vec<String>);

/// Istio `headers` → (request add, request remove, response add, response remove).
fn header_ops(h: Option<&vs::Headers>) -> HeaderOps {
    let ops = |o: Option<&vs::HeaderOperations>| {
        let Some(o) = o else { return (Vec::new(), Vec::new()) };
        let option = |(k, v): (&String, &String), action: HeaderAppendAction| HeaderValueOption {
            header: Some(HeaderValue { key: k.clone(), value: v.clone(), ..Default::default() }),
            append_action: action as i32,
            ..Default::default()
        };
        let mut add: Vec<HeaderValueOption> =
            o.set.iter().map(|kv| option(kv, HeaderAppendAction::OverwriteIfExistsOrAdd)).collect();
        add.extend(o.add.iter().map(|kv| option(kv, HeaderAppendAction::AppendIfExistsOrAdd)));
        (add, o.remove.clone())
    };
    let (req_add, req_remove) = ops(h.and_then(|h| h.request.as_ref()));
    let (resp_add, resp_remove) = ops(h.and_then(|h| h.response.as_ref()));
    (req_add, req_remove, resp_add, resp_remove)
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
    use prost::Message;
    use serde_json::json;

    use super::*;
    use crate::{
        model::{
            object_from_value,
            store::{Document, Origin, Store},
        },
        xds::{snapshot::Subscription, translate},
    };

    const HOST: &str = "reviews.shop.svc.cluster.local";

    fn store(objects: Vec<serde_json::Value>) -> Store {
        let mut store = Store::default();
        let docs = objects
            .into_iter()
            .enumerate()
            .map(|(i, v)| Document { location: format!("document {i}"), result: object_from_value(v) })
            .collect();
        store.replace_source(&Origin::File("test.yaml".into()), docs);
        assert_eq!(
            store.errors().count(),
            0,
            "{:?}",
            store.errors().map(ToString::to_string).collect::<Vec<_>>()
        );
        store
    }

    fn entry(name: &str, ip: &str, version: &str) -> serde_json::Value {
        json!({"apiVersion": "networking.istio.io/v1", "kind": "WorkloadEntry", "metadata": {"name": name, "namespace": "shop"},
               "spec": {"address": ip, "labels": {"app": "reviews", "version": version}}})
    }

    #[test]
    fn a_canary_becomes_a_route_with_weighted_subset_clusters_that_follow_the_address() {
        let store = store(vec![
            json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "reviews", "namespace": "shop"},
                   "spec": {"clusterIP": "10.96.0.20", "selector": {"app": "reviews"}, "ports": [{"name": "http", "port": 80, "targetPort": 9080}]}}),
            entry("r1", "192.0.2.1", "v1"),
            entry("r2", "192.0.2.2", "v2"),
            json!({"apiVersion": "networking.istio.io/v1", "kind": "DestinationRule", "metadata": {"name": "reviews", "namespace": "shop"},
                   "spec": {"host": "reviews", "subsets": [{"name": "v1", "labels": {"version": "v1"}}, {"name": "v2", "labels": {"version": "v2"}}]}}),
            json!({"apiVersion": "networking.istio.io/v1", "kind": "VirtualService", "metadata": {"name": "reviews", "namespace": "shop"},
                   "spec": {"hosts": ["reviews"], "http": [
                       {"match": [{"headers": {"end-user": {"exact": "jason"}}, "sourceLabels": {"app": "productpage"}}],
                        "route": [{"destination": {"host": "reviews", "subset": "v2"}}]},
                       {"route": [{"destination": {"host": "reviews", "subset": "v1"}, "weight": 90},
                                  {"destination": {"host": "reviews", "subset": "v2"}, "weight": 10}]}]}}),
        ]);
        let snap = translate::snapshot(&store);
        let route_name = route_name(HOST, 80);
        let config = RouteConfiguration::decode(snap.routes[&route_name].any.value.as_slice()).unwrap();
        let routes = &config.virtual_hosts[0].routes;
        assert_eq!(routes.len(), 2);
        assert!(
            routes[0]
                .metadata
                .as_ref()
                .is_some_and(|m| m.typed_filter_metadata.contains_key(proto::METADATA_KEY))
        );
        let Some(route::route::Action::Route(a)) = &routes[1].action else { panic!("{routes:?}") };
        let Some(route_action::ClusterSpecifier::WeightedClusters(w)) = &a.cluster_specifier else {
            panic!("{a:?}")
        };
        let split: Vec<(String, u32)> =
            w.clusters.iter().map(|c| (c.name.clone(), c.weight.as_ref().unwrap().value)).collect();
        assert_eq!(split, [(cluster_name(80, "v1", HOST), 90), (cluster_name(80, "v2", HOST), 10)]);
        assert_eq!(a.timeout.as_ref().map(|d| d.seconds), Some(0), "no timeout unless the route sets one");

        // Each subset cluster holds only its version's endpoints.
        let cla =
            ClusterLoadAssignment::decode(snap.endpoints[&cluster_name(80, "v2", HOST)].any.value.as_slice())
                .unwrap();
        assert_eq!(cla.endpoints.iter().map(|l| l.lb_endpoints.len()).sum::<usize>(), 1);

        // A node that dials the VIP gets the route and every cluster behind it; one that does not, nothing.
        let subs = |names: &[&str]| -> HashMap<String, Subscription> {
            let wildcard = Subscription { wildcard: true, names: Default::default() };
            let mut subs: HashMap<String, Subscription> =
                [proto::CLUSTER_TYPE, proto::ENDPOINT_TYPE, proto::ROUTE_TYPE]
                    .map(|t| (t.to_string(), wildcard.clone()))
                    .into();
            subs.insert(
                proto::ADDRESS_TYPE.into(),
                Subscription { wildcard: true, names: names.iter().map(ToString::to_string).collect() },
            );
            subs
        };
        let dialer = subs(&["10.96.0.20"]);
        assert_eq!(snap.resources_for("n1", &dialer, proto::ROUTE_TYPE).len(), 1);
        assert_eq!(snap.resources_for("n1", &dialer, proto::CLUSTER_TYPE).len(), 3, "default + v1 + v2");
        let idle = subs(&[]);
        assert!(snap.resources_for("n2", &idle, proto::ROUTE_TYPE).is_empty());
        assert!(snap.resources_for("n2", &idle, proto::CLUSTER_TYPE).is_empty());

        // Envoy and gRPC clients name the route they want and take clusters by wildcard: they
        // get the clusters that route can send to.
        let mut by_route = subs(&[]);
        by_route.remove(proto::ADDRESS_TYPE);
        by_route.insert(
            proto::ROUTE_TYPE.into(),
            Subscription { wildcard: false, names: [route_name.clone()].into() },
        );
        let clusters = snap.resources_for("envoy", &by_route, proto::CLUSTER_TYPE);
        assert_eq!(clusters.len(), 2, "v1 and v2: {:?}", clusters.keys());
    }

    #[test]
    fn a_route_gets_the_hash_policy_of_a_subset_of_a_service_translated_after_it() {
        // `aardvark` sorts (and is translated) before `zebra`, whose subset hashes on a header.
        let svc = |name: &str, ip: &str| {
            json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": "shop"},
                   "spec": {"clusterIP": ip, "selector": {"app": name}, "ports": [{"name": "http", "port": 80}]}})
        };
        let store = store(vec![
            svc("aardvark", "10.96.0.21"),
            svc("zebra", "10.96.0.22"),
            json!({"apiVersion": "networking.istio.io/v1", "kind": "DestinationRule", "metadata": {"name": "zebra", "namespace": "shop"},
                   "spec": {"host": "zebra", "subsets": [{"name": "sticky", "labels": {"version": "v1"},
                            "trafficPolicy": {"loadBalancer": {"consistentHash": {"httpHeaderName": "x-user"}}}}]}}),
            json!({"apiVersion": "networking.istio.io/v1", "kind": "VirtualService", "metadata": {"name": "aardvark", "namespace": "shop"},
                   "spec": {"hosts": ["aardvark"], "http": [{"route": [{"destination": {"host": "zebra", "subset": "sticky"}}]}]}}),
        ]);
        let snap = translate::snapshot(&store);
        let name = route_name("aardvark.shop.svc.cluster.local", 80);
        let config = RouteConfiguration::decode(snap.routes[&name].any.value.as_slice()).unwrap();
        let Some(route::route::Action::Route(a)) = &config.virtual_hosts[0].routes[0].action else {
            panic!()
        };
        assert_eq!(a.hash_policy.len(), 1, "the subset's consistent hash travels with the route: {a:?}");
    }
}
