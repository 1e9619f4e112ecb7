//! Matching that mesh-control (when it validates and translates) and mesh-node (when it
//! enforces) must do exactly alike.

use std::net::IpAddr;

/// An IP or CIDR (`10.0.0.0/8`, `fd00::1`), as AuthorizationPolicy `ipBlocks` write them.
pub fn parse_block(block: &str) -> Result<(IpAddr, u8), String> {
    let (ip, len) = block.split_once('/').map_or((block, None), |(ip, len)| (ip, Some(len)));
    let ip: IpAddr = ip.parse().map_err(|_| format!("`{block}` is not an IP address or CIDR"))?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    let len = match len {
        None => max,
        Some(l) => l
            .parse::<u8>()
            .ok()
            .filter(|l| *l <= max)
            .ok_or_else(|| format!("`{block}`: bad prefix length"))?,
    };
    Ok((ip, len))
}

/// Whether a server name matches an Istio `sniHosts` entry (exact, or `*.` any subdomain).
pub fn sni_matches(pattern: &str, name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    match pattern.strip_prefix('*') {
        Some(suffix) => name.len() > suffix.len() && name.ends_with(&suffix.to_ascii_lowercase()),
        None => pattern.eq_ignore_ascii_case(&name),
    }
}

/// Whether the Sidecar egress host pattern `namespace/host` names the service `hostname` of
/// `service_namespace` (`*` namespace: any; host `*`, exact, short name, or `*.` suffix).
pub fn egress_allows(namespace: &str, host: &str, service_namespace: &str, hostname: &str) -> bool {
    (namespace == "*" || namespace == service_namespace)
        && (host == "*"
            || host == hostname
            || hostname.split('.').next() == Some(host)
            || host.strip_prefix('*').is_some_and(|suffix| hostname.ends_with(suffix)))
}
