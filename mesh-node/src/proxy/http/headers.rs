//! The request as it goes upstream: authority, version and hop-by-hop headers, and the hash
//! a consistent-hash cluster picks an endpoint by.

use std::net::SocketAddr;

use hyper::{
    HeaderMap, Uri, Version,
    header::{self, HeaderName, HeaderValue},
};
use nodemesh_api::proto::mesh::{self, hash_policy::Key};

use crate::{policy::lb::hash_bytes, workload::Source};

/// Envoy's shadow convention: the mirrored copy's authority gets `-shadow` after the host, so
/// the receiver can tell copies from live traffic.
pub(super) fn shadow_authority(parts: &mut hyper::http::request::Parts) {
    let Some(authority) = request_authority(parts) else { return };
    let shadow = match authority.rsplit_once(':') {
        Some((host, port)) if port.parse::<u16>().is_ok() => format!("{host}-shadow:{port}"),
        _ => format!("{authority}-shadow"),
    };
    set_authority(parts, &shadow);
}

/// The authority the client addressed: the URI's (HTTP/2, absolute form), else `Host`.
pub(super) fn request_authority(parts: &hyper::http::request::Parts) -> Option<String> {
    parts
        .uri
        .authority()
        .map(|a| a.as_str().to_string())
        .or_else(|| parts.headers.get(header::HOST).and_then(|h| h.to_str().ok()).map(str::to_string))
}

/// Replaces the request's authority: `Host`, and the URI's when it carries one.
pub(super) fn set_authority(parts: &mut hyper::http::request::Parts, authority: &str) {
    let Ok(value) = HeaderValue::from_str(authority) else { return };
    parts.headers.insert(header::HOST, value);
    if parts.uri.authority().is_some()
        && let Ok(u) = Uri::builder()
            .scheme(parts.uri.scheme_str().unwrap_or("http"))
            .authority(authority)
            .path_and_query(parts.uri.path_and_query().map_or("/", |p| p.as_str()))
            .build()
    {
        parts.uri = u;
    }
}

/// The request as the upstream connection needs it: hop-by-hop headers gone, HTTP/1.x in
/// origin form with a `Host`, or HTTP/2 with scheme and authority in the URI. An HTTP/1.0
/// request stays HTTP/1.0: some HTTP/1.0-only servers mishandle an HTTP/1.1 request line
/// (chunked answers, keep-alive they do not speak).
pub(super) fn prepare_request(
    parts: &mut hyper::http::request::Parts,
    h2: bool,
    vip: SocketAddr,
    upgrade: Option<&HeaderValue>,
) {
    strip_hop_by_hop(&mut parts.headers);
    let authority = request_authority(parts).unwrap_or_else(|| vip.to_string());
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str()).to_string();
    if h2 {
        parts.version = Version::HTTP_2;
        if let Ok(uri) = Uri::builder().scheme("http").authority(authority).path_and_query(path).build() {
            parts.uri = uri;
        }
        return;
    }
    if parts.version != Version::HTTP_10 {
        parts.version = Version::HTTP_11;
    }
    if let Ok(uri) = path.parse() {
        parts.uri = uri;
    }
    if !parts.headers.contains_key(header::HOST)
        && let Ok(host) = HeaderValue::from_str(&authority)
    {
        parts.headers.insert(header::HOST, host);
    }
    if let Some(protocol) = upgrade {
        parts.headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        parts.headers.insert(header::UPGRADE, protocol.clone());
    }
}

/// Removes the headers that describe one hop only (RFC 9110 §7.6.1), including any the
/// `Connection` header names. `te: trailers` stays: gRPC needs it.
pub(super) fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in [header::CONNECTION, header::TRANSFER_ENCODING, header::UPGRADE, header::PROXY_AUTHENTICATE] {
        headers.remove(name);
    }
    headers.remove("keep-alive");
    headers.remove("proxy-connection");
    if headers.get(header::TE).is_some_and(|v| v.as_bytes() != b"trailers") {
        headers.remove(header::TE);
    }
}

/// The consistent-hash key of one request, per the DestinationRule's hash policy.
pub(super) fn request_hash(
    policy: Option<&mesh::HashPolicy>,
    source: &Source,
    req: &hyper::http::request::Parts,
) -> Option<u64> {
    let value = match policy?.key.as_ref()? {
        Key::SourceIp(_) => source.ips.first().map(ToString::to_string),
        Key::Header(name) => req.headers.get(name.as_str()).and_then(|v| v.to_str().ok()).map(str::to_string),
        Key::Cookie(name) => req
            .headers
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .filter_map(|c| c.trim().split_once('='))
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.to_string()),
        Key::QueryParameter(name) => req.uri.query().and_then(|q| {
            q.split('&')
                .filter_map(|kv| kv.split_once('='))
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.to_string())
        }),
    }?;
    Some(hash_bytes(value.as_bytes()))
}

#[cfg(test)]
mod tests {
    use hyper::Request;

    use super::*;

    #[test]
    fn hop_by_hop_headers_go_and_trailers_te_stays() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("keep-alive, x-private"));
        h.insert("x-private", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        h.insert(header::HOST, HeaderValue::from_static("reviews:9080"));
        strip_hop_by_hop(&mut h);
        assert!(
            h.get("x-private").is_none()
                && h.get("keep-alive").is_none()
                && h.get(header::CONNECTION).is_none()
        );
        assert_eq!(h.get(header::TE).unwrap(), "trailers");
        assert_eq!(h.get(header::HOST).unwrap(), "reviews:9080");
    }

    fn parts(uri: &str, host: Option<&str>, version: Version) -> hyper::http::request::Parts {
        let mut b = Request::builder().uri(uri).version(version);
        if let Some(h) = host {
            b = b.header(header::HOST, h);
        }
        b.body(()).unwrap().into_parts().0
    }

    #[test]
    fn http10_without_host_stays_http10_with_the_dialled_address() {
        let vip: SocketAddr = "10.96.0.10:80".parse().unwrap();
        let mut p = parts("/health", None, Version::HTTP_10);
        prepare_request(&mut p, false, vip, None);
        assert_eq!(p.version, Version::HTTP_10);
        assert_eq!(p.headers[header::HOST], "10.96.0.10:80");
        // A Host the client sent is never replaced, whatever it names.
        let mut p = parts("/x?y=1", Some("unknown.example"), Version::HTTP_11);
        prepare_request(&mut p, false, vip, None);
        assert_eq!(p.headers[header::HOST], "unknown.example");
        assert_eq!(p.uri, "/x?y=1");
    }

    #[test]
    fn h2_requests_keep_their_authority() {
        let vip: SocketAddr = "10.96.0.10:80".parse().unwrap();
        let mut p = parts("http://grpc.shop:80/pkg.Svc/Method", None, Version::HTTP_2);
        prepare_request(&mut p, true, vip, None);
        assert_eq!(p.uri, "http://grpc.shop:80/pkg.Svc/Method");
    }
}
