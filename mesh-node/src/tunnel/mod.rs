//! HBONE: meshed traffic between nodes rides HTTP/2 CONNECT streams over mutual TLS 1.3.
//!
//! A client node opens one TLS connection per (source identity, destination node,
//! destination identity) and multiplexes a CONNECT stream per proxied connection over it
//! ([`client`]); the destination node's listener ([`server`], port 15008) presents the
//! certificate of the identity the client asked for (by a hashed server name), verifies the
//! client's, checks that the CONNECT target is a workload of that identity on this node, and
//! delivers the stream into the pod as the client pod's own address
//! ([`crate::inbound::deliver`]).

pub mod client;
pub mod credentials;
pub mod server;

use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use crate::telemetry::labels::{Peer, ServiceLabels, SourceLabels, UNKNOWN};

pub const DEFAULT_PORT: u16 = 15008;

/// Carries the client pod's address to the server node, as ztunnel does.
pub const FORWARDED: &str = "forwarded";

/// W3C baggage on CONNECT: who the client workload says it is, for telemetry only (its
/// namespace and service account are proven by its certificate, its name is not).
pub const BAGGAGE: &str = "baggage";
pub const POD_NAME_KEY: &str = "k8s.pod.name";
/// The rest of the caller's labels, under the keys Istio's metadata exchange uses.
const CLUSTER_KEY: &str = "k8s.cluster.name";
const WORKLOAD_KEY: &str = "k8s.workload.name";
const APP_KEY: &str = "app.name";
const VERSION_KEY: &str = "app.version";
const CANONICAL_SERVICE_KEY: &str = "service.name";
const CANONICAL_REVISION_KEY: &str = "service.version";

/// The Service the client dialled, `<namespace>/<hostname>`, for the server's telemetry.
pub const SERVICE_HEADER: &str = "x-nodemesh-service";
/// The stream carries HTTP ([`HTTP1`] or [`HTTP2`]), as the client's node proxied it: the
/// serving node serves it as HTTP and reports each request (`reporter="destination"`).
pub const PROTOCOL_HEADER: &str = "x-nodemesh-protocol";
pub const HTTP1: &str = "http/1.1";
pub const HTTP2: &str = "h2";

/// The baggage a CONNECT carries for a client `pod` with labels `source`.
pub fn caller_baggage(pod: &str, source: &SourceLabels) -> String {
    format!(
        "{POD_NAME_KEY}={pod},{WORKLOAD_KEY}={},{CLUSTER_KEY}={},{APP_KEY}={},{VERSION_KEY}={},\
         {CANONICAL_SERVICE_KEY}={},{CANONICAL_REVISION_KEY}={}",
        source.source_workload,
        source.source_cluster,
        source.source_app,
        source.source_version,
        source.source_canonical_service,
        source.source_canonical_revision,
    )
}

/// `SERVICE_HEADER`'s value for `service` (`None`: the client dialled no Service).
pub fn service_header(service: &ServiceLabels) -> Option<String> {
    (service.destination_service != UNKNOWN)
        .then(|| format!("{}/{}", service.destination_service_namespace, service.destination_service))
}

/// A value the client said about itself, kept only if it looks like a Kubernetes name or
/// label value (a peer cannot smuggle anything else into a metric label), else `unknown`.
fn said(value: Option<&str>) -> String {
    value
        .filter(|v| {
            v.len() <= 253 && v.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
        })
        .unwrap_or(UNKNOWN)
        .to_string()
}

/// The caller as the server reports it: its namespace and principal from its certificate,
/// the rest from its `baggage`.
pub fn caller_from_baggage(baggage: Option<&str>, namespace: &str, principal: String) -> Peer {
    let value = |key| baggage.and_then(|b| baggage_value(b, key));
    let workload = value(WORKLOAD_KEY).or_else(|| value(POD_NAME_KEY));
    Peer {
        workload: said(workload),
        namespace: namespace.to_string(),
        principal,
        app: said(value(APP_KEY)),
        version: said(value(VERSION_KEY)),
        canonical_service: said(value(CANONICAL_SERVICE_KEY).or(workload)),
        canonical_revision: said(value(CANONICAL_REVISION_KEY)),
        cluster: said(value(CLUSTER_KEY)),
    }
}

/// The Service a CONNECT's `SERVICE_HEADER` names (unknown when absent or malformed).
pub fn service_from_header(value: Option<&str>) -> Arc<ServiceLabels> {
    match value.and_then(|v| v.split_once('/')) {
        Some((namespace, host)) if said(Some(namespace)) != UNKNOWN && said(Some(host)) != UNKNOWN => {
            ServiceLabels::of(host, namespace)
        }
        _ => ServiceLabels::unknown(),
    }
}

/// The value of `key` in a baggage header (`k1=v1,k2=v2;prop`).
pub fn baggage_value<'a>(baggage: &'a str, key: &str) -> Option<&'a str> {
    baggage.split(',').find_map(|member| {
        let (k, v) = member.split(';').next()?.split_once('=')?;
        (k.trim() == key).then(|| v.trim()).filter(|v| !v.is_empty())
    })
}

/// `for="10.0.0.1"` / `for="[fd00::1]"` (RFC 7239).
pub fn forwarded_for(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => format!("for=\"{v4}\""),
        IpAddr::V6(v6) => format!("for=\"[{v6}]\""),
    }
}

/// The address in a `Forwarded` header's first `for=` (quotes, brackets and a port allowed).
pub fn parse_forwarded_for(value: &str) -> Option<IpAddr> {
    let element = value.split(',').next()?;
    let node = element.split(';').find_map(|pair| {
        let (k, v) = pair.trim().split_once('=')?;
        k.eq_ignore_ascii_case("for").then_some(v.trim().trim_matches('"'))
    })?;
    if let Some(rest) = node.strip_prefix('[') {
        return rest.split(']').next()?.parse().ok();
    }
    node.parse().ok().or_else(|| node.parse::<SocketAddr>().ok().map(|s| s.ip()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwarded_for_round_trips_both_families() {
        for ip in ["10.77.1.2", "fd77::2"] {
            let ip: IpAddr = ip.parse().unwrap();
            assert_eq!(parse_forwarded_for(&forwarded_for(ip)), Some(ip));
        }
        assert_eq!(parse_forwarded_for("for=10.0.0.1:4711;proto=http"), Some("10.0.0.1".parse().unwrap()));
        assert_eq!(parse_forwarded_for("proto=http"), None);
        assert_eq!(parse_forwarded_for("for=unknown"), None);
    }

    #[test]
    fn the_callers_labels_cross_the_tunnel_and_nothing_else_does() {
        use crate::telemetry::labels::Naming;
        let labels: std::collections::BTreeMap<String, String> =
            [("app", "web"), ("version", "v3")].map(|(k, v)| (k.to_string(), v.to_string())).into();
        let peer = Peer::new("shop", "web-v3", Some("web"), Some(&labels), &Naming::default());
        let baggage = caller_baggage("web-v3-5d9f-x2x7q", &peer.as_source());
        let principal = "spiffe://cluster.local/ns/shop/sa/web".to_string();
        let seen = caller_from_baggage(Some(&baggage), "shop", principal.clone());
        assert_eq!(seen, peer, "{baggage}");

        let hostile = "k8s.workload.name=a\"b,app.name=x=y,app.version=ok";
        let seen = caller_from_baggage(Some(hostile), "shop", principal.clone());
        assert_eq!(
            (seen.workload.as_str(), seen.app.as_str(), seen.version.as_str()),
            (UNKNOWN, UNKNOWN, "ok")
        );
        assert_eq!(caller_from_baggage(None, "shop", principal).workload, UNKNOWN);

        let svc = ServiceLabels::of("reviews.shop.svc.cluster.local", "shop");
        assert_eq!(service_from_header(service_header(&svc).as_deref()), svc);
        assert_eq!(service_header(&ServiceLabels::unknown()), None);
        assert_eq!(service_from_header(Some("shop/a b")).destination_service, UNKNOWN);
    }

    #[test]
    fn baggage_member_by_key() {
        let b = "k8s.namespace.name=shop, k8s.pod.name=reviews-1;prop=x";
        assert_eq!(baggage_value(b, POD_NAME_KEY), Some("reviews-1"));
        assert_eq!(baggage_value(b, "service.name"), None);
        assert_eq!(baggage_value("k8s.pod.name=", POD_NAME_KEY), None);
    }
}
