//! Reaching one endpoint for the source workload, L4 and HTTP alike: picking endpoints with
//! outlier reports ([`Attempt`]), then delivering into a same-node pod, tunnelling to another
//! node, or dialling directly, as the cluster's connection settings allow.

use std::{future::Future, io, net::SocketAddr, sync::Arc, time::Duration};

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::{TcpSocket, TcpStream};

use super::{Outbound, upstream::Upstream};
use crate::{
    authz::{Inbound, Verdict},
    conn::pool::Sender,
    inbound::{
        guard::Guarded,
        http::{Reporting, judge_and_pass},
    },
    policy::{
        conn_limits::{ConnectionSlot, Refused},
        connection_settings::{ConnectionSettings, UpstreamTls},
        lb::{Balancer, Endpoint, EndpointState, LocalityKey, Pick, TunnelTarget},
    },
    telemetry::{access_log::ConnectionLog, labels::Caller, metrics::SecurityPolicy},
    workload::Source,
};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};

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

impl Outbound {
    /// An HTTP connection to `endpoint` from the source workload, HTTP/2 if `h2`, holding
    /// `slot`.
    pub(super) async fn dial_http(
        &self,
        source: &Source,
        cluster: &Balancer,
        endpoint: &Endpoint,
        h2: bool,
        slot: ConnectionSlot,
        caller: &Caller,
    ) -> io::Result<Sender> {
        let timeout = self.connect_timeout_to(cluster);
        let stream = self
            .connect_upstream(
                source,
                endpoint.addr,
                endpoint.tunnel.as_ref(),
                &cluster.connection,
                timeout,
                caller,
            )
            .await?;
        handshake(stream, h2, slot).await
    }

    /// The cluster's connect timeout (DestinationRule `tcp.connectTimeout`), else the node's.
    pub(super) fn connect_timeout_to(&self, cluster: &Balancer) -> Duration {
        cluster.limits.connect_timeout.unwrap_or(self.connect_timeout)
    }

    /// How [`Outbound::connect_upstream`] reaches `dst`, for metrics: on a meshed path
    /// (delivery into a meshed pod of this node, or the mTLS tunnel), and whether that pod is
    /// this node's and does not judge requests (its requests are delivered as bytes: nothing
    /// on its side reports them). Mirrors `connect_upstream`'s choice of path.
    pub(super) fn reached(
        &self,
        dst: SocketAddr,
        tunnel: Option<&TunnelTarget>,
        settings: &ConnectionSettings,
    ) -> (SecurityPolicy, bool) {
        if settings.tls == UpstreamTls::Disable {
            return (SecurityPolicy::none, false);
        }
        match self.locals.local(dst.ip()).filter(|w| w.delivery.is_some()) {
            Some(w) => (SecurityPolicy::mutual_tls, !self.authorizer.judges_requests(&w.key)),
            None if tunnel.is_some() && self.tunnels.is_some() => (SecurityPolicy::mutual_tls, false),
            None => (SecurityPolicy::none, false),
        }
    }

    /// Reaches `dst` for the source workload: a meshed pod of this node by delivery into its
    /// netns, a meshed pod elsewhere through its node's tunnel, anything else directly — as
    /// the cluster's `settings` allow (tls.mode DISABLE: always directly, in plaintext;
    /// ISTIO_MUTUAL: never directly).
    pub(super) async fn connect_upstream(
        &self,
        source: &Source,
        dst: SocketAddr,
        tunnel: Option<&TunnelTarget>,
        settings: &ConnectionSettings,
        timeout: Duration,
        caller: &Caller,
    ) -> io::Result<Upstream> {
        let from = source.ips.iter().find(|ip| ip.is_ipv4() == dst.is_ipv4()).copied();
        let meshed_path = settings.tls != UpstreamTls::Disable;
        let delivery = self.locals.local(dst.ip()).and_then(|w| w.delivery.clone()).filter(|_| meshed_path);
        if let Some(pod) = delivery {
            // The destination's policy, with the source proven by mesh-node itself.
            let connection = Inbound {
                authorizer: Arc::clone(&self.authorizer),
                workload: pod.key.clone(),
                routes: pod.routes.clone(),
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
            let destination = self.authorizer.local_peer(&pod.key, &pod.service_account).as_destination();
            let server_log = Reporting::server_log(&self.metrics, &pod.key, None, dst);
            let log = if per_request { None } else { ConnectionLog::of(&server_log) };
            let reporting = Reporting::new(
                &self.metrics,
                Arc::clone(&caller.source),
                destination,
                Arc::clone(&caller.service),
                SecurityPolicy::mutual_tls,
                server_log,
            );
            let counters = self.metrics.connection_opened(&reporting.connection_labels());
            if !per_request {
                // Delivered as bytes: the pod's side counts its TCP series and writes its
                // server-side access-log line here.
                return Ok(Upstream::Guarded(
                    Guarded::new(delivered, connection).tallied(counters, log, dst),
                ));
            }
            // Requests are judged by the destination's policies in this process, between the
            // two ends of an in-memory pipe.
            let (ours, theirs) = tokio::io::duplex(CHUNK_FOR_JUDGED);
            let drain = self.drain.clone();
            tokio::spawn(async move {
                let judged = judge_and_pass(
                    theirs,
                    delivered,
                    connection,
                    &counters,
                    &drain,
                    Some(Arc::new(reporting)),
                );
                if let Err(e) = judged.await {
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
                .connect(&identity, target, dst, from, caller, timeout)
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

/// An HTTP connection over `stream`; it holds `slot` (its place under the cluster's
/// `maxConnections`) until it closes.
pub(crate) async fn handshake(stream: Upstream, h2: bool, slot: ConnectionSlot) -> std::io::Result<Sender> {
    let io = TokioIo::new(stream);
    if h2 {
        let (sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .handshake(io)
            .await
            .map_err(std::io::Error::other)?;
        tokio::spawn(async move {
            let _ = conn.await;
            drop(slot);
        });
        Ok(Sender::Http2(sender, 0))
    } else {
        let (sender, conn) =
            hyper::client::conn::http1::handshake(io).await.map_err(std::io::Error::other)?;
        tokio::spawn(async move {
            let _ = conn.with_upgrades().await;
            drop(slot);
        });
        Ok(Sender::Http1(sender, 0))
    }
}
