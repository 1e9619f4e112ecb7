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

use std::net::{IpAddr, SocketAddr};

pub const DEFAULT_PORT: u16 = 15008;

/// Carries the client pod's address to the server node, as ztunnel does.
pub const FORWARDED: &str = "forwarded";

/// W3C baggage on CONNECT: who the client workload says it is, for telemetry only (its
/// namespace and service account are proven by its certificate, its name is not).
pub const BAGGAGE: &str = "baggage";
pub const POD_NAME_KEY: &str = "k8s.pod.name";

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
    fn baggage_member_by_key() {
        let b = "k8s.namespace.name=shop, k8s.pod.name=reviews-1;prop=x";
        assert_eq!(baggage_value(b, POD_NAME_KEY), Some("reviews-1"));
        assert_eq!(baggage_value(b, "service.name"), None);
        assert_eq!(baggage_value("k8s.pod.name=", POD_NAME_KEY), None);
    }
}
