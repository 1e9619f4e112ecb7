//! Outbound: connections captured from a workload, proxied to where they were going.
//!
//! Each meshed workload has its own listeners inside its own netns, so the listener that
//! accepted a connection *is* the source identity — no address-based guessing. The upstream
//! socket is created in the same netns (the destination sees the pod's own address, as without
//! the mesh) and carries the proxy mark so capture never loops it back to us.

use std::{
    future::Future,
    io,
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use nodemesh_api::workload::WorkloadKey;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

use super::{http, pool::Sender, relay, sniff, upstream::Upstream};
use crate::{
    capture::Capture,
    inbound::{
        authz::{Authorizer, Inbound, Verdict},
        deliver::Delivery,
        guard::Guarded,
        http::judge_and_pass,
    },
    netns::NetnsThread,
    telemetry::metrics::{
        ConnectionLabels, EgressDeniedLabels, FailureLabels, FailureReason, Metrics, Reporter, UNKNOWN,
    },
    tunnel::{TunnelTarget, client::TunnelPool},
    workload::IpIndex,
    xds::connection_settings::{ConnectionSettings, UpstreamTls},
    xds::{
        conn_limits::{ConnectionSlot, Refused},
        http_route::RequestSource,
        l4_route::{Connection, L4Routes},
        lb::{Balancer, Endpoint, EndpointState, LocalityKey, Pick},
        route::{Decision, Router, connection_hash},
    },
};

/// What the proxy needs to know about the workload a listener serves — and nothing more: no
/// registry access, no keys.
#[derive(Debug)]
pub struct Source {
    pub key: WorkloadKey,
    pub netns: NetnsThread,
    pub netns_cookie: u64,
    /// The workload's own addresses (consistent hashing on source IP uses the first).
    pub ips: Vec<IpAddr>,
    /// Its identity's service account (the namespace is the key's).
    pub service_account: String,
    /// Its upstream HTTP connections, reused across requests.
    pub http_pool: super::pool::Pool,
}

/// Shared outbound state: capture lookups, metrics, settings.
pub struct Outbound {
    pub capture: Arc<Capture>,
    pub metrics: Arc<Metrics>,
    /// This node's workloads by address: same-node destinations are delivered into their
    /// netns directly, and telemetry names them.
    pub locals: Arc<IpIndex>,
    /// Tunnels to other nodes (the node has workload identities); `None`: meshed peers on
    /// other nodes are reached in plaintext.
    pub tunnels: Option<Arc<TunnelPool>>,
    pub proxy_mark: u32,
    /// Connections into this node's meshed pods (see `inbound::deliver`).
    pub delivery: Arc<Delivery>,
    /// Their AuthorizationPolicies, for same-node traffic.
    pub authorizer: Arc<Authorizer>,
    pub connect_timeout: Duration,
    /// Service routing from the control plane; `None` (no `--control-plane`): every
    /// connection goes where it was dialled.
    pub router: Option<Router>,
    /// How long a connection to a Service port may stay silent before it is taken to be a
    /// server-first protocol and relayed as TCP. Zero: no protocol detection (all L4).
    pub sniff_timeout: Duration,
}

/// A connection to a cluster endpoint: its place under the cluster's maxConnections, and the
/// endpoint's workload (`namespace/name`, empty when unknown) for telemetry.
pub(super) struct Balanced {
    _slot: ConnectionSlot,
    workload: String,
}

/// How long a connection to a port with tls routes may take to send its ClientHello when
/// protocol detection is otherwise off (TLS is client-first: a client sends it at once).
const TLS_SNIFF_TIMEOUT: Duration = Duration::from_secs(1);

/// Buffer of the in-memory pipe to a judged same-node pod.
const CHUNK_FOR_JUDGED: usize = 64 * 1024;

/// Connect attempts per connection (or request) when a cluster endpoint refuses, each a
/// different endpoint.
const MAX_CONNECT_ATTEMPTS: usize = 3;

/// Reaching one endpoint of a cluster for one connection (L4) or request (HTTP).
pub(super) struct Attempt<'a> {
    pub source: &'a Source,
    pub balancer: &'a Balancer,
    pub hash: Option<u64>,
    pub local: Option<&'a LocalityKey>,
    /// The service hostname, for logs.
    pub service: &'a str,
}

impl Attempt<'_> {
    /// Picks endpoints (those in `prefer_not` only when nothing else is left) and calls `open`
    /// on each until one succeeds, up to [`MAX_CONNECT_ATTEMPTS`]: a failure counts against
    /// that endpoint (outlier detection) and moves on to another. A success is reported only
    /// if `report_success`: HTTP reports the answer instead, since a backend that accepts
    /// connections and answers 5xx must not have its failure streak reset. No endpoint at all
    /// is `NotFound`.
    pub(super) async fn open<T, Fut>(
        &self,
        prefer_not: &[SocketAddr],
        report_success: bool,
        mut open: impl FnMut(Arc<EndpointState>) -> Fut,
    ) -> io::Result<(Pick, T)>
    where
        Fut: Future<Output = io::Result<T>>,
    {
        let b = self.balancer;
        let mut refused: Vec<SocketAddr> = Vec::new();
        let mut last_error = None;
        for _ in 0..MAX_CONNECT_ATTEMPTS {
            let avoid: Vec<SocketAddr> = prefer_not.iter().chain(&refused).copied().collect();
            let Some(pick) =
                b.pick(self.hash, self.local, &avoid).or_else(|| b.pick(self.hash, self.local, &refused))
            else {
                break;
            };
            let addr = pick.endpoint.ep.addr;
            match open(Arc::clone(&pick.endpoint)).await {
                // The cluster's connectionPool refused: not this endpoint's fault, and no
                // other endpoint would be let in either.
                Err(e) if Refused::caused(&e) => return Err(e),
                // The destination's AuthorizationPolicy said no: final, and not the endpoint's
                // fault.
                Err(e) if e.kind() == io::ErrorKind::PermissionDenied => return Err(e),
                Ok(opened) => {
                    if report_success {
                        b.report(&pick.endpoint, true);
                    }
                    return Ok((pick, opened));
                }
                Err(e) => {
                    if let Some(d) = b.report(&pick.endpoint, false) {
                        tracing::warn!(
                            cluster = b.name, endpoint = %addr,
                            "endpoint ejected for {d:?} after {} consecutive failures",
                            b.outlier.consecutive_failures
                        );
                    }
                    tracing::info!(workload = %self.source.key, service = self.service, endpoint = %addr, "connect failed ({e}); trying another endpoint");
                    refused.push(addr);
                    last_error = Some(e);
                }
            }
        }
        Err(last_error.unwrap_or_else(|| {
            io::Error::new(io::ErrorKind::NotFound, format!("no endpoints in cluster {}", b.name))
        }))
    }
}

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
                    tokio::spawn(async move { this.handle(client, peer, source).await });
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
                    let target =
                        Arc::new(http::Target { balancer, hash_policy, local, service, vip: dst, cache });
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
                        self.connect_upstream(&source, dst, None, &b.connection, timeout)
                            .await
                            .map(|s| (s, dst, None))
                    }
                    Ok(Some(b)) => {
                        idle = b.connection.tcp_idle_timeout;
                        self.connect_balanced(&source, &b, None, local.as_ref(), &service, dst).await
                    }
                    Ok(None) => {
                        idle = balancer.connection.tcp_idle_timeout;
                        let hash = connection_hash(hash_policy.as_ref(), &source, &client).await;
                        self.connect_balanced(&source, &balancer, hash, local.as_ref(), &service, dst).await
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
                return;
            }
        };
        // The endpoint's own workload (it may run on another node), else whatever runs locally
        // at that address.
        let dst_workload = balanced
            .as_ref()
            .and_then(|b| b.workload.split_once('/'))
            .map(|(namespace, name)| WorkloadKey { namespace: namespace.into(), name: name.into() })
            .or_else(|| self.locals.local(dst.ip()).map(|w| w.key.clone()));
        let labels = ConnectionLabels {
            reporter: Reporter::source,
            source_workload: source.key.name.clone(),
            source_workload_namespace: source.key.namespace.clone(),
            destination_workload: dst_workload.as_ref().map_or(UNKNOWN, |k| &k.name).to_string(),
            destination_workload_namespace: dst_workload
                .as_ref()
                .map_or(UNKNOWN, |k| &k.namespace)
                .to_string(),
        };
        let counters = self.metrics.connection_opened(&labels);
        tracing::debug!(workload = %source.key, %dst, "proxying");
        match relay::relay(client, upstream, &counters.sent, &counters.received, idle).await {
            Ok(t) => {
                tracing::debug!(workload = %source.key, %dst, sent = t.sent, received = t.received, "closed")
            }
            Err(e) => tracing::debug!(workload = %source.key, %dst, "relay ended with error: {e}"),
        }
        counters.closed();
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
        service: &str,
        vip: SocketAddr,
    ) -> io::Result<(Upstream, SocketAddr, Option<Balanced>)> {
        let slot = balancer.admit_connection().ok_or_else(|| {
            io::Error::other(Refused::AtLimit(balancer.limits.max_connections.unwrap_or_default()))
        })?;
        let attempt = Attempt { source, balancer, hash, local, service };
        let (pick, stream) = attempt
            .open(&[], true, |endpoint| async move {
                let ep = &endpoint.ep;
                let timeout = self.connect_timeout_to(balancer);
                self.connect_upstream(source, ep.addr, ep.tunnel.as_ref(), &balancer.connection, timeout)
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
        Ok((stream, addr, Some(Balanced { _slot: slot, workload: pick.endpoint.ep.workload.clone() })))
    }

    /// An HTTP connection to `endpoint` from the source workload, HTTP/2 if `h2`, holding
    /// `slot`.
    pub(super) async fn dial_http(
        &self,
        source: &Source,
        cluster: &Balancer,
        endpoint: &Endpoint,
        h2: bool,
        slot: ConnectionSlot,
    ) -> io::Result<Sender> {
        let timeout = self.connect_timeout_to(cluster);
        let stream = self
            .connect_upstream(source, endpoint.addr, endpoint.tunnel.as_ref(), &cluster.connection, timeout)
            .await?;
        http::handshake(stream, h2, slot).await
    }

    /// The cluster's connect timeout (DestinationRule `tcp.connectTimeout`), else the node's.
    pub(super) fn connect_timeout_to(&self, cluster: &Balancer) -> Duration {
        cluster.limits.connect_timeout.unwrap_or(self.connect_timeout)
    }

    /// Reaches `dst` for the source workload: a meshed pod of this node by delivery into its
    /// netns, a meshed pod elsewhere through its node's tunnel, anything else directly — as
    /// the cluster's `settings` allow (tls.mode DISABLE: always directly, in plaintext;
    /// ISTIO_MUTUAL: never directly).
    async fn connect_upstream(
        &self,
        source: &Source,
        dst: SocketAddr,
        tunnel: Option<&TunnelTarget>,
        settings: &ConnectionSettings,
        timeout: Duration,
    ) -> io::Result<Upstream> {
        let from = source.ips.iter().find(|ip| ip.is_ipv4() == dst.is_ipv4()).copied();
        let meshed_path = settings.tls != UpstreamTls::Disable;
        let delivery = self.locals.local(dst.ip()).and_then(|w| w.delivery.clone()).filter(|_| meshed_path);
        if let Some(pod) = delivery {
            // The destination's policy, with the source proven by mesh-node itself.
            let connection = Inbound {
                authorizer: Arc::clone(&self.authorizer),
                workload: pod.key.clone(),
                identity: Some(self.authorizer.identity_of(&source.key.namespace, &source.service_account)),
                source_ip: from.unwrap_or(dst.ip()),
                destination: dst,
            };
            let Some(policies) = connection.policies().await else {
                return Err(io::Error::new(
                    io::ErrorKind::ConnectionRefused,
                    format!("{dst}: the workload's policy has not arrived from the control plane"),
                ));
            };
            let per_request = policies.per_request();
            if !per_request && let verdict @ Verdict::Deny { .. } = connection.decide(&policies, None) {
                return Err(io::Error::new(
                    io::ErrorKind::PermissionDenied,
                    format!("{dst}: {}", verdict.explain()),
                ));
            }
            let delivered = self.delivery.connect(&pod.netns, from, dst, timeout).await?;
            if let Some(k) = &settings.keepalive {
                k.apply(&socket2::SockRef::from(&delivered))?;
            }
            if !per_request {
                return Ok(Upstream::Guarded(Guarded::new(delivered, connection)));
            }
            // Requests are judged by the destination's policies in this process, between the
            // two ends of an in-memory pipe.
            let (ours, theirs) = tokio::io::duplex(CHUNK_FOR_JUDGED);
            let counters = self.metrics.connection_opened(&ConnectionLabels {
                reporter: Reporter::destination,
                source_workload: source.key.name.clone(),
                source_workload_namespace: source.key.namespace.clone(),
                destination_workload: pod.key.name.clone(),
                destination_workload_namespace: pod.key.namespace.clone(),
            });
            tokio::spawn(async move {
                if let Err(e) = judge_and_pass(theirs, delivered, connection, &counters).await {
                    tracing::debug!("judged same-node connection ended: {e}");
                }
                counters.closed();
            });
            return Ok(Upstream::Judged(ours));
        }
        if let (Some(target), Some(tunnels), true) = (tunnel, &self.tunnels, meshed_path) {
            let identity =
                tunnels.credentials().identities.identity(&source.key.namespace, &source.service_account);
            return tunnels
                .connect(&identity, target, dst, from, &source.key.name, timeout)
                .await
                .map(Upstream::Tunnel);
        }
        if settings.tls == UpstreamTls::IstioMutual {
            return Err(io::Error::new(
                io::ErrorKind::ConnectionRefused,
                format!(
                    "{dst} has no mesh identity (not a meshed workload) and the DestinationRule's \
                     tls.mode is ISTIO_MUTUAL: not dialled in plaintext"
                ),
            ));
        }
        let stream = self.connect_direct(source, dst, timeout).await?;
        if let Some(k) = &settings.keepalive {
            k.apply(&socket2::SockRef::from(&stream))?;
        }
        Ok(Upstream::Tcp(stream))
    }

    /// Dials `dst` from inside the source workload's netns with the proxy mark set.
    async fn connect_direct(
        &self,
        source: &Source,
        dst: SocketAddr,
        timeout: Duration,
    ) -> io::Result<TcpStream> {
        let mark = self.proxy_mark;
        let socket = source
            .netns
            .run(move || -> io::Result<Socket> {
                let socket =
                    Socket::new(Domain::for_address(dst), Type::STREAM.nonblocking(), Some(Protocol::TCP))?;
                socket.set_mark(mark)?;
                socket.set_tcp_nodelay(true)?;
                Ok(socket)
            })
            .await
            .map_err(io::Error::other)??;
        let socket = TcpSocket::from_std_stream(std::net::TcpStream::from(socket));
        match tokio::time::timeout(timeout, socket.connect(dst)).await {
            Ok(result) => result,
            Err(_) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("no answer from {dst} within {timeout:?}"),
            )),
        }
    }
}
