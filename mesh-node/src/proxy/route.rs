//! Where a captured connection goes, from what the control plane said about its destination
//! IP: a Service port → its cluster's balancer; a workload IP → straight there; an unknown IP →
//! straight there (ALLOW_ANY) or refused (REGISTRY_ONLY, naming the reason).

use std::{net::SocketAddr, sync::Arc, time::Duration};

use nodemesh_api::{
    matchers::egress_allows,
    proto::mesh::{self, OutboundTrafficPolicy, hash_policy::Key},
};
use tokio::net::TcpStream;

use crate::{
    policy::{
        l4_route::L4Routes,
        lb::{Balancer, LocalityKey, TunnelTarget, hash_bytes},
    },
    workload::Source,
    xds::{
        client::OnDemand,
        {cache::Cache, resources::AddressInfo},
    },
};

pub enum Decision {
    /// Connect to the dialled address (through its node's tunnel when it is a meshed workload
    /// on a node that has one).
    Direct(Option<TunnelTarget>),
    Balance {
        balancer: Arc<Balancer>,
        /// How a consistent-hash cluster keys a connection or request.
        hash_policy: Option<mesh::HashPolicy>,
        /// The port's declared protocol (a hint: see `proxy::sniff`).
        app_protocol: String,
        /// The source workload's locality, for locality-aware clusters.
        local: Option<LocalityKey>,
        /// The service hostname, for logs.
        service: String,
        /// The port's tcp/tls routes, for a connection not proxied as HTTP.
        l4_routes: Option<Arc<L4Routes>>,
        /// Whether the port has an HTTP route (a VirtualService's http routes or rate limits).
        http_routed: bool,
    },
    Deny(DenyReason, String),
}

/// Why a connection is refused, as the `reason` label of `nodemesh_egress_denied_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DenyReason {
    /// REGISTRY_ONLY and nothing in the registry owns the destination (or that port).
    NoServiceEntry,
    /// REGISTRY_ONLY and the service is outside the workload's Sidecar egress hosts.
    NotInSidecarEgress,
    /// The service's cluster has not arrived from the control plane yet.
    NotReceived,
}

impl DenyReason {
    pub fn label(self) -> &'static str {
        match self {
            DenyReason::NoServiceEntry => "no_service_entry",
            DenyReason::NotInSidecarEgress => "not_in_sidecar_egress",
            DenyReason::NotReceived => "cluster_not_received",
        }
    }
}

pub struct Router {
    pub cache: Arc<Cache>,
    pub on_demand: Arc<OnDemand>,
    /// How long the first connect to an unknown IP waits for the control plane's answer.
    pub lookup_timeout: Duration,
}

impl Router {
    pub async fn decide(&self, source: &Source, dst: SocketAddr) -> Decision {
        let workload = self.cache.workload(&source.key.to_string());
        let policy = workload
            .as_ref()
            .and_then(|w| OutboundTrafficPolicy::try_from(w.outbound_policy).ok())
            .unwrap_or(OutboundTrafficPolicy::AllowAny);
        let registry_only = policy == OutboundTrafficPolicy::RegistryOnly;
        let resolved = match self.on_demand.resolve(dst.ip(), self.lookup_timeout).await {
            // A service exported to other namespaces only is, for this workload, not there.
            Some(AddressInfo::Service(svc))
                if svc.restricted && !svc.visible_to.contains(&source.key.namespace) =>
            {
                if registry_only {
                    return Decision::Deny(
                        DenyReason::NoServiceEntry,
                        format!(
                            "service {} is exported only to namespaces [{}], not to {}; \
                             outboundTrafficPolicy is REGISTRY_ONLY",
                            svc.hostname,
                            svc.visible_to.join(", "),
                            source.key.namespace
                        ),
                    );
                }
                Some(AddressInfo::Unknown)
            }
            other => other,
        };
        match resolved {
            Some(AddressInfo::Service(svc)) => {
                // A Sidecar's egress hosts narrow what a REGISTRY_ONLY workload may reach.
                if registry_only
                    && let Some(w) = &workload
                    && !w.egress_hosts.is_empty()
                    && !w
                        .egress_hosts
                        .iter()
                        .any(|h| egress_allows(&h.namespace, &h.host, &svc.namespace, &svc.hostname))
                {
                    return Decision::Deny(
                        DenyReason::NotInSidecarEgress,
                        format!(
                            "service {} is not among the egress hosts of the workload's Sidecar ({}); \
                             outboundTrafficPolicy is REGISTRY_ONLY",
                            svc.hostname,
                            w.egress_hosts
                                .iter()
                                .map(|h| format!("{}/{}", h.namespace, h.host))
                                .collect::<Vec<_>>()
                                .join(", ")
                        ),
                    );
                }
                let Some(port) = svc.ports.iter().find(|p| p.port == u32::from(dst.port())) else {
                    return if registry_only {
                        Decision::Deny(
                            DenyReason::NoServiceEntry,
                            format!(
                                "service {} does not declare port {} (outboundTrafficPolicy REGISTRY_ONLY)",
                                svc.hostname,
                                dst.port()
                            ),
                        )
                    } else {
                        Decision::Direct(None)
                    };
                };
                match self.cache.cluster_for(&port.cluster, &source.key.namespace) {
                    Some(b) if b.passthrough => Decision::Direct(None),
                    Some(balancer) => {
                        let local = workload
                            .as_ref()
                            .and_then(|w| w.locality.as_ref())
                            .map(|l| (l.region.clone(), l.zone.clone(), l.subzone.clone()));
                        Decision::Balance {
                            balancer,
                            hash_policy: port.hash_policy.clone(),
                            app_protocol: port.app_protocol.clone(),
                            local,
                            service: svc.hostname.clone(),
                            l4_routes: self.cache.l4_routes(&svc.hostname, port.port),
                            http_routed: !port.route.is_empty(),
                        }
                    }
                    None => Decision::Deny(
                        DenyReason::NotReceived,
                        format!(
                            "cluster {} of service {} has not been received from the control plane",
                            port.cluster, svc.hostname
                        ),
                    ),
                }
            }
            Some(AddressInfo::Workload(w)) => {
                Decision::Direct(w.tunnel_address.parse().ok().map(|address| TunnelTarget {
                    address,
                    namespace: w.namespace.clone(),
                    service_account: w.service_account.clone(),
                }))
            }
            Some(AddressInfo::Unknown) if registry_only => Decision::Deny(
                DenyReason::NoServiceEntry,
                format!(
                    "no ServiceEntry (or Service) matches {dst}; outboundTrafficPolicy is REGISTRY_ONLY — add a \
                 ServiceEntry for this host to allow it"
                ),
            ),
            None if registry_only => Decision::Deny(
                DenyReason::NoServiceEntry,
                format!(
                    "{dst} is not in the registry this node holds and the control plane did not answer; \
                 outboundTrafficPolicy is REGISTRY_ONLY, so unknown destinations are refused"
                ),
            ),
            Some(AddressInfo::Unknown) | None => Decision::Direct(None),
        }
    }
}

/// The consistent-hash key of a connection proxied at L4: the source workload's IP, or a
/// request header / cookie read (not consumed) from the first bytes the client sent.
pub async fn connection_hash(
    policy: Option<&mesh::HashPolicy>,
    source: &Source,
    client: &TcpStream,
) -> Option<u64> {
    match policy?.key.as_ref()? {
        Key::SourceIp(_) => source.ips.first().map(|ip| hash_bytes(ip.to_string().as_bytes())),
        Key::Header(name) => peek_header(client, name, false).await.map(|v| hash_bytes(v.as_bytes())),
        Key::Cookie(name) => peek_header(client, name, true).await.map(|v| hash_bytes(v.as_bytes())),
        Key::QueryParameter(name) => peek_query(client, name).await.map(|v| hash_bytes(v.as_bytes())),
    }
}

/// Reads the HTTP/1 request head with MSG_PEEK (the bytes stay for the upstream), up to 8 KiB
/// or 1 s. Per-request hashing over HTTP/2 comes with the L7 proxy.
async fn peek_head(client: &TcpStream) -> Option<String> {
    let mut buf = vec![0u8; 8192];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
    let mut last = 0;
    loop {
        let n = tokio::time::timeout_at(deadline, client.peek(&mut buf)).await.ok()?.ok()?;
        if n == 0 {
            return None;
        }
        if let Some(end) = buf[..n].windows(4).position(|w| w == b"\r\n\r\n") {
            return String::from_utf8(buf[..end].to_vec()).ok();
        }
        if n == buf.len() {
            return None;
        }
        if n == last {
            // Nothing new yet: peek returns at once while data is queued, so wait a little.
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        last = n;
    }
}

async fn peek_header(client: &TcpStream, name: &str, cookie: bool) -> Option<String> {
    let head = peek_head(client).await?;
    let wanted = if cookie { "cookie" } else { name };
    for line in head.split("\r\n").skip(1) {
        let (k, v) = line.split_once(':')?;
        if !k.trim().eq_ignore_ascii_case(wanted) {
            continue;
        }
        let v = v.trim();
        if !cookie {
            return Some(v.to_string());
        }
        for c in v.split(';') {
            if let Some((ck, cv)) = c.trim().split_once('=')
                && ck == name
            {
                return Some(cv.to_string());
            }
        }
    }
    None
}

async fn peek_query(client: &TcpStream, name: &str) -> Option<String> {
    let head = peek_head(client).await?;
    let target = head.split(' ').nth(1)?;
    let query = target.split_once('?')?.1;
    query.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == name).then(|| v.to_string())
    })
}
