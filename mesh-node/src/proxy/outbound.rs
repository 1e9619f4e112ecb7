//! Outbound: connections captured from a workload, proxied to where they were going.
//!
//! Each meshed workload has its own listeners inside its own netns, so the listener that
//! accepted a connection *is* the source identity — no address-based guessing. The upstream
//! socket is created in the same netns (the destination sees the pod's own address, as without
//! the mesh) and carries the proxy mark so capture never loops it back to us.

use std::{io, net::SocketAddr, sync::Arc, time::Duration};

use nodemesh_api::workload::WorkloadNames;

use tokio::net::{TcpListener, TcpStream};

use super::{Outbound, connect::Attempt, http, upstream::Upstream};
use crate::{
    conn::{relay, sniff},
    policy::{
        conn_limits::{ConnectionSlot, Refused},
        connection_settings::ConnectionSettings,
        l4_route::{Connection, L4Routes},
        lb::{Balancer, LocalityKey},
        request_match::RequestSource,
    },
    proxy::route::{Decision, connection_hash},
    telemetry::{
        access_log::{ConnectionFacts, ConnectionLog, Side, outbound_cluster},
        labels::{Caller, Peer, ServiceLabels},
        metrics::{
            ConnectionLabels, EgressDeniedLabels, FailureLabels, FailureReason, Reporter, SecurityPolicy,
        },
    },
    tunnel::{HTTP1, HTTP2},
    workload::Source,
    xds::resources::AddressInfo,
};

/// A connection to a cluster endpoint: its place under the cluster's maxConnections, and the
/// endpoint's workload (`namespace/name`, empty when unknown) for telemetry.
pub(super) struct Balanced {
    _slot: ConnectionSlot,
    workload: String,
    names: Option<Arc<WorkloadNames>>,
}

/// How long a connection to a port with tls routes may take to send its ClientHello when
/// protocol detection is otherwise off (TLS is client-first: a client sends it at once).
const TLS_SNIFF_TIMEOUT: Duration = Duration::from_secs(1);

/// Declared protocols that are never HTTP, or speak first from the server: not sniffed, so a
/// server-first protocol does not wait out the sniff timeout. A wrong declaration costs L7
/// features, never correctness: the connection still goes where it was dialled.
const DECLARED_OPAQUE: [&str; 8] =
    ["tcp", "tls", "https", "mysql", "mongo", "redis", "postgres", "postgresql"];

fn declared_opaque(app_protocol: &str) -> bool {
    let p = app_protocol.to_ascii_lowercase();
    DECLARED_OPAQUE.iter().any(|o| p == *o || p.starts_with(&format!("{o}-")))
}

impl Outbound {
    /// Accepts on one workload listener until the task is aborted (workload removed).
    pub async fn serve(self: Arc<Self>, listener: TcpListener, source: Arc<Source>) {
        loop {
            match listener.accept().await {
                Ok((client, peer)) => {
                    let this = Arc::clone(&self);
                    let source = Arc::clone(&source);
                    tokio::spawn(self.drain.tracked(async move { this.handle(client, peer, source).await }));
                }
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning; the listener stays.
                    tracing::warn!(workload = %source.key, "accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    async fn handle(self: Arc<Self>, client: TcpStream, peer: SocketAddr, source: Arc<Source>) {
        let fail = |reason| FailureLabels {
            source_workload: source.key.name.clone(),
            source_workload_namespace: source.key.namespace.clone(),
            reason,
        };
        let Some(dst) = self.capture.take_orig_dst(source.netns_cookie, peer) else {
            tracing::warn!(
                workload = %source.key, %peer,
                "connection to the proxy listener has no original destination \
                 (not captured by eBPF; dialled directly?) — refusing it"
            );
            self.metrics.failure(&fail(FailureReason::no_original_destination));
            relay::reset(&client);
            return;
        };
        let _ = client.set_nodelay(true);
        let decision = match &self.router {
            Some(router) => router.decide(&source, dst).await,
            None => Decision::Direct(None),
        };
        let caller = match &decision {
            Decision::Balance { service, .. } => self.caller(&source, service, dst),
            _ => self.caller(&source, "", dst),
        };
        // Its access-log line, if the caller's logs are on (a connection proxied as HTTP logs
        // each request instead, and drops this).
        let log = self.metrics.access_logs.for_key(&source.key, Side::Client).map(|logs| {
            let facts = ConnectionFacts {
                downstream_remote: Some(source.client_addr(peer)),
                downstream_local: Some(dst),
                upstream_host: None,
                upstream_cluster: match &decision {
                    Decision::Balance { service, .. } => outbound_cluster(dst.port(), service),
                    Decision::Direct(_) => "PassthroughCluster".into(),
                    Decision::Deny(..) => "BlackHoleCluster".into(),
                },
            };
            ConnectionLog::start(logs, Side::Client, facts)
        });
        // The cluster's tcp.idleTimeout, once the connection goes to one.
        let mut idle = None;
        let connected = match decision {
            Decision::Direct(tunnel) => self
                .connect_upstream(
                    &source,
                    dst,
                    tunnel.as_ref(),
                    &ConnectionSettings::default(),
                    self.connect_timeout,
                    &caller,
                )
                .await
                .map(|s| (s, dst, None)),
            Decision::Balance {
                balancer,
                hash_policy,
                app_protocol,
                local,
                service,
                l4_routes,
                http_routed,
            } => {
                // A tls route needs the ClientHello's server name, whatever the declaration.
                let read_tls = l4_routes.as_ref().is_some_and(|t| t.has_tls());
                let opaque = declared_opaque(&app_protocol);
                let protocol = if read_tls {
                    sniff::detect(&client, self.sniff_timeout.max(TLS_SNIFF_TIMEOUT)).await
                } else if self.sniff_timeout.is_zero() || opaque {
                    sniff::Protocol::Opaque
                } else {
                    sniff::detect(&client, self.sniff_timeout).await
                };
                // HTTP is proxied per request unless the port has tcp routes and no HTTP
                // route: then the tcp routes the user wrote take the connection as a whole.
                let tcp_routes_take_it = !http_routed && l4_routes.as_ref().is_some_and(|t| t.has_tcp());
                let http = matches!(protocol, sniff::Protocol::Http1 | sniff::Protocol::H2c);
                if http && !opaque && !tcp_routes_take_it {
                    let h2 = protocol == sniff::Protocol::H2c;
                    let cache = self.router.as_ref().map(|r| Arc::clone(&r.cache));
                    // Its upstream connections carry HTTP of the client's version: the
                    // serving node reports each request too.
                    let caller = Caller { http: Some(if h2 { HTTP2 } else { HTTP1 }), ..caller };
                    let target = Arc::new(http::Target {
                        balancer,
                        hash_policy,
                        local,
                        service,
                        caller,
                        vip: dst,
                        cache,
                    });
                    http::serve(Arc::clone(&self), client, h2, source, target).await;
                    return;
                }
                let sni = match &protocol {
                    sniff::Protocol::Tls { sni } => sni.clone(),
                    _ => None,
                };
                match self.l4_route(&source, l4_routes.as_deref(), sni.as_deref(), &service) {
                    Err(e) => Err(e),
                    Ok(Some(b)) if b.passthrough => {
                        let timeout = self.connect_timeout_to(&b);
                        idle = b.connection.tcp_idle_timeout;
                        self.connect_upstream(&source, dst, None, &b.connection, timeout, &caller)
                            .await
                            .map(|s| (s, dst, None))
                    }
                    Ok(Some(b)) => {
                        idle = b.connection.tcp_idle_timeout;
                        self.connect_balanced(&source, &b, None, local.as_ref(), &caller, dst).await
                    }
                    Ok(None) => {
                        idle = balancer.connection.tcp_idle_timeout;
                        let hash = connection_hash(hash_policy.as_ref(), &source, &client).await;
                        self.connect_balanced(&source, &balancer, hash, local.as_ref(), &caller, dst).await
                    }
                }
            }
            Decision::Deny(code, reason) => {
                tracing::warn!(workload = %source.key, destination = %dst, "connection refused: {reason}");
                self.metrics.failure(&fail(FailureReason::egress_not_in_registry));
                self.metrics.egress_denied(&EgressDeniedLabels {
                    source_workload: source.key.name.clone(),
                    source_workload_namespace: source.key.namespace.clone(),
                    destination: dst.to_string(),
                    reason: code.label().into(),
                });
                relay::reset(&client);
                if let Some(log) = log {
                    log.finish("UH", None, (0, 0));
                }
                return;
            }
        };
        // `balanced`: this connection's place under the cluster's maxConnections (held while it
        // is relayed) and the endpoint's workload.
        let (upstream, dst, balanced) = match connected {
            Ok(s) => s,
            Err(e) => {
                let reason = match e.kind() {
                    _ if Refused::caused(&e) => FailureReason::upstream_overflow,
                    io::ErrorKind::ConnectionRefused => FailureReason::upstream_connect_refused,
                    io::ErrorKind::TimedOut => FailureReason::upstream_connect_timeout,
                    io::ErrorKind::NotFound => FailureReason::no_healthy_endpoint,
                    _ => FailureReason::upstream_connect_error,
                };
                tracing::info!(workload = %source.key, %dst, "upstream connect failed: {e}");
                self.metrics.failure(&fail(reason));
                relay::reset(&client);
                if let Some(log) = log {
                    let flags = match reason {
                        FailureReason::upstream_overflow => "UO",
                        FailureReason::no_healthy_endpoint => "UH",
                        _ => "UF",
                    };
                    log.finish(flags, None, (0, 0));
                }
                return;
            }
        };
        // The endpoint's own workload (it may run on another node), else whatever runs locally
        // at that address.
        let destination = match balanced.as_ref().filter(|b| !b.workload.is_empty()) {
            Some(b) => Peer::of_endpoint(&b.workload, b.names.as_deref(), &self.metrics.naming),
            None => match self.locals.local(dst.ip()) {
                Some(w) => self.authorizer.local_peer(&w.key, &w.service_account),
                None => Peer::unknown(),
            },
        };
        let security = if upstream.secured() { SecurityPolicy::mutual_tls } else { SecurityPolicy::none };
        let labels = ConnectionLabels::tcp(
            Reporter::source,
            Arc::clone(&caller.source),
            destination.as_destination(),
            Arc::clone(&caller.service),
            security,
        );
        let counters = self.metrics.connection_opened(&labels);
        tracing::debug!(workload = %source.key, %dst, "proxying");
        let relayed = upstream.relay(client, &counters.sent, &counters.received, idle).await;
        counters.closed();
        let t = relayed.totals;
        match &relayed.result {
            Ok(()) => {
                tracing::debug!(workload = %source.key, %dst, sent = t.sent, received = t.received, "closed")
            }
            Err(e) => {
                tracing::debug!(workload = %source.key, %dst, sent = t.sent, received = t.received, "relay ended with error: {e}")
            }
        }
        if let Some(log) = log {
            log.finish("-", Some((dst, security == SecurityPolicy::mutual_tls)), (t.sent, t.received));
        }
    }

    /// The source workload's labels and the Service it dialled (`service`: its hostname;
    /// empty: none, passed through to `vip`).
    pub(super) fn caller(&self, source: &Source, service: &str, vip: SocketAddr) -> Caller {
        let cache = self.router.as_ref().map(|r| &r.cache);
        let record = cache.and_then(|c| c.workload(&source.key.to_string()));
        let peer = Peer::local(record.as_deref(), &source.key, &source.service_account, &self.metrics.naming);
        let service = if service.is_empty() {
            ServiceLabels::passthrough()
        } else {
            let namespace = match cache.and_then(|c| c.address(vip.ip())) {
                Some(AddressInfo::Service(svc)) => svc.namespace.clone(),
                _ => String::new(),
            };
            ServiceLabels::of(service, &namespace)
        };
        Caller { pod: source.key.name.clone(), source: peer.as_source(), service, http: None }
    }

    /// The cluster of the tcp/tls route that takes this connection (`None`: no route does,
    /// the port's own cluster).
    fn l4_route(
        &self,
        source: &Source,
        routes: Option<&L4Routes>,
        sni: Option<&str>,
        service: &str,
    ) -> io::Result<Option<Arc<Balancer>>> {
        let (Some(routes), Some(router)) = (routes, &self.router) else { return Ok(None) };
        let workload = router.cache.workload(&source.key.to_string());
        let from =
            RequestSource { namespace: &source.key.namespace, labels: workload.as_ref().map(|w| &w.labels) };
        let Some((route, cluster)) = routes.pick(&Connection { sni, source: &from }) else { return Ok(None) };
        tracing::debug!(workload = %source.key, service, route, cluster, "L4 route");
        match router.cache.cluster_for(cluster, &source.key.namespace) {
            Some(b) => Ok(Some(b)),
            None => Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!(
                    "service {service}: route {route}: cluster {cluster} has not been received from the control plane"
                ),
            )),
        }
    }

    /// Picks an endpoint and connects; a refused or timed-out connect counts against that
    /// endpoint (outlier detection) and moves on to another one.
    async fn connect_balanced(
        &self,
        source: &Source,
        balancer: &Balancer,
        hash: Option<u64>,
        local: Option<&LocalityKey>,
        caller: &Caller,
        vip: SocketAddr,
    ) -> io::Result<(Upstream, SocketAddr, Option<Balanced>)> {
        let service = caller.service.destination_service.as_str();
        let slot = balancer.admit_connection().ok_or_else(|| {
            io::Error::other(Refused::AtLimit(balancer.limits.max_connections.unwrap_or_default()))
        })?;
        let attempt = Attempt { source, balancer, hash, local, service };
        let (pick, stream) = attempt
            .open(&[], true, |endpoint| async move {
                let ep = &endpoint.ep;
                let timeout = self.connect_timeout_to(balancer);
                self.connect_upstream(
                    source,
                    ep.addr,
                    ep.tunnel.as_ref(),
                    &balancer.connection,
                    timeout,
                    caller,
                )
                .await
            })
            .await
            .map_err(|e| match e.kind() {
                io::ErrorKind::NotFound => {
                    io::Error::new(e.kind(), format!("service {service} ({vip}): {e}"))
                }
                _ => e,
            })?;
        let addr = pick.endpoint.ep.addr;
        tracing::debug!(workload = %source.key, %vip, service, endpoint = %addr, "balanced");
        Ok((
            stream,
            addr,
            Some(Balanced {
                _slot: slot,
                workload: pick.endpoint.ep.workload.clone(),
                names: pick.endpoint.ep.names.clone(),
            }),
        ))
    }
}
