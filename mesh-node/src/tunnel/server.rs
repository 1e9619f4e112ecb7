//! The server side of HBONE: the node's tunnel listener (port 15008).
//!
//! A client must present a workload certificate chaining to a trusted root (TLS 1.3); the
//! server presents the certificate of the identity the client named by server name. Each
//! CONNECT stream names a pod address; it is accepted only if that pod runs on this node
//! under exactly the identity the server proved (so a client that verified identity A can
//! never be handed to a pod of identity B), and is then delivered into the pod as the client
//! pod's own address.

use std::{
    convert::Infallible,
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode, body::Incoming, service::service_fn};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use nodemesh_api::identity::SpiffeId;
use tokio::net::{TcpListener, TcpStream};

use super::{
    BAGGAGE, FORWARDED, HTTP1, HTTP2, PROTOCOL_HEADER, SERVICE_HEADER, caller_from_baggage,
    client::{CONNECTION_WINDOW, STREAM_WINDOW, STREAMS_PER_CONNECTION},
    credentials::Credentials,
    parse_forwarded_for, service_from_header,
};
use crate::{
    authz::{Authorizer, Inbound, Verdict},
    conn::relay,
    identity::tls::peer_identity,
    inbound::{deliver::Delivery, guard::Guarded, http},
    telemetry::metrics::{Metrics, SecurityPolicy},
    workload::IpIndex,
};

/// A TLS handshake must finish within this, or the connection is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a CONNECT waits for a workload at its target to register.
const REGISTRATION_WAIT: Duration = Duration::from_secs(2);
/// How long a handshake waits for the certificate its server name asks for (well inside
/// [`HANDSHAKE_TIMEOUT`] and a client's connect timeout).
const CERT_WAIT: Duration = Duration::from_secs(3);
/// Streams a client may open on one connection; clients stay below it
/// ([`STREAMS_PER_CONNECTION`]) so that none of their streams ever waits.
const MAX_STREAMS: u32 = STREAMS_PER_CONNECTION as u32 + 24;

pub struct TunnelServer {
    pub drain: crate::drain::Drain,
    pub credentials: Arc<Credentials>,
    pub locals: Arc<IpIndex>,
    pub delivery: Arc<Delivery>,
    pub authorizer: Arc<Authorizer>,
    pub connect_timeout: Duration,
    pub metrics: Arc<Metrics>,
}

/// Who is at each end of one tunnel connection.
struct Peers {
    client: SpiffeId,
    server: SpiffeId,
    addr: SocketAddr,
}

impl TunnelServer {
    pub async fn serve(self: Arc<Self>, listener: TcpListener) {
        loop {
            match listener.accept().await {
                Ok((tcp, addr)) => {
                    let this = Arc::clone(&self);
                    tokio::spawn(self.drain.tracked(async move { this.connection(tcp, addr).await }));
                }
                Err(e) => {
                    tracing::warn!("tunnel accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    /// Reads the ClientHello first: when the server name asked for is a workload whose
    /// certificate is still on its way (this node just started, or the workload just came),
    /// the handshake waits for it, up to [`CERT_WAIT`], instead of failing — a refusal would
    /// count against the endpoint at the peer, which ejects it after a few.
    async fn handshake(&self, tcp: TcpStream) -> Result<tokio_rustls::server::TlsStream<TcpStream>, String> {
        let acceptor = tokio_rustls::LazyConfigAcceptor::new(rustls::server::Acceptor::default(), tcp);
        let start = acceptor.await.map_err(|e| format!("reading the ClientHello: {e}"))?;
        if let Some(name) = start.client_hello().server_name().map(str::to_string) {
            self.credentials.identities.wait_for_server_name(&name, CERT_WAIT).await;
        }
        let config = self.credentials.server_config()?;
        start.into_stream(config).await.map_err(|e| format!("TLS handshake failed: {e}"))
    }

    async fn connection(self: Arc<Self>, tcp: TcpStream, addr: SocketAddr) {
        let _ = tcp.set_nodelay(true);
        let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, self.handshake(tcp)).await {
            Ok(Ok(tls)) => tls,
            Ok(Err(e)) => {
                tracing::warn!(peer = %addr, "tunnel connection refused: {e}");
                return;
            }
            Err(_) => {
                tracing::warn!(peer = %addr, "tunnel TLS handshake did not finish within {HANDSHAKE_TIMEOUT:?}");
                return;
            }
        };
        let peers = {
            let (_, session) = tls.get_ref();
            let client = session
                .peer_certificates()
                .and_then(|c| c.first())
                .ok_or_else(|| "no client certificate".to_string())
                .and_then(peer_identity);
            let server = session
                .server_name()
                .and_then(|n| self.credentials.identities.by_server_name(n))
                .map(|c| c.identity.clone());
            match (client, server) {
                (Ok(client), Some(server)) => Arc::new(Peers { client, server, addr }),
                (Err(e), _) => {
                    tracing::warn!(peer = %addr, "tunnel refused: client identity: {e}");
                    return;
                }
                (_, None) => {
                    tracing::warn!(peer = %addr, "tunnel refused: the server identity asked for is not on this node");
                    return;
                }
            }
        };
        tracing::debug!(peer = %addr, client = %peers.client, server = %peers.server, "tunnel connection accepted");
        self.metrics.tunnel_connections_accepted.inc();
        let drain = self.drain.clone();
        let service = service_fn(move |request| {
            let this = Arc::clone(&self);
            let peers = Arc::clone(&peers);
            async move { Ok::<_, Infallible>(this.stream(request, &peers).await) }
        });
        let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .max_concurrent_streams(MAX_STREAMS)
            .initial_stream_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .serve_connection(TokioIo::new(tls), service);
        // Draining: a GOAWAY; the peer opens new streams on a new connection (to whichever
        // process holds the listener by then), streams already open run to their end.
        let served = drain.serve(conn, true, |c| c.graceful_shutdown()).await;
        if let Err(e) = served {
            tracing::debug!(peer = %addr, "tunnel connection ended: {e}");
        }
    }

    /// One CONNECT stream: checks, delivers, and relays once the client has its 200.
    async fn stream(&self, mut request: Request<Incoming>, peers: &Peers) -> Response<Full<Bytes>> {
        let ConnectRequest { target, from, baggage, service, http: carries_http } =
            match ConnectRequest::parse(&request) {
                Ok(r) => r,
                Err((status, why)) => return answer(status, why),
            };
        // Held briefly when unknown: the client may have learned of a pod this node is still
        // registering; a 404 would count against the endpoint at the client.
        let Some(local) = self.locals.wait_for(target.ip(), REGISTRATION_WAIT).await else {
            return answer(StatusCode::NOT_FOUND, format!("no workload at {} on this node", target.ip()));
        };
        let identity = self.credentials.identities.identity(&local.key.namespace, &local.service_account);
        if identity != peers.server {
            // The client verified `peers.server`; handing it to another identity would
            // defeat that check.
            return answer(
                StatusCode::MISDIRECTED_REQUEST,
                format!("{target} is {identity}, not {}", peers.server),
            );
        }
        let Some(pod) = local.delivery.clone() else {
            return answer(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("workload {} is not set up for inbound delivery", local.key),
            );
        };
        let connection = Inbound {
            authorizer: Arc::clone(&self.authorizer),
            workload: local.key.clone(),
            routes: pod.routes.clone(),
            identity: Some(peers.client.clone()),
            source_ip: from.unwrap_or(peers.addr.ip()),
            destination: target,
        };
        let Some(policies) = connection.policies().await else {
            return answer(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("{target}: the workload's policy has not arrived from the control plane"),
            );
        };
        // A workload whose policies look at requests is judged per request (HTTP) once the
        // stream is open; otherwise the connection is judged here.
        let per_request = policies.per_request();
        if !per_request && let verdict @ Verdict::Deny { .. } = connection.decide(&policies, None) {
            return answer(
                StatusCode::FORBIDDEN,
                format!("RBAC: access denied to {target}: {}", verdict.explain()),
            );
        }
        let delivered = match self.delivery.connect(&pod.netns, from, target, self.connect_timeout).await {
            Ok(s) => s,
            Err(e) => {
                let status = if e.kind() == std::io::ErrorKind::TimedOut {
                    StatusCode::GATEWAY_TIMEOUT
                } else {
                    StatusCode::SERVICE_UNAVAILABLE
                };
                tracing::info!(client = %peers.client, %target, "tunnel delivery failed: {e}");
                return answer(status, format!("{target}: {e}"));
            }
        };
        // The client's namespace and principal are proven by its certificate; its other labels
        // are its node's say (baggage).
        let source =
            caller_from_baggage(baggage.as_deref(), &peers.client.namespace, peers.client.to_string());
        let destination = self.authorizer.local_peer(&local.key, &local.service_account).as_destination();
        let reporting = http::Reporting::new(
            &self.metrics,
            source.as_source(),
            destination,
            service_from_header(service.as_deref()),
            SecurityPolicy::mutual_tls,
            http::Reporting::server_log(
                &self.metrics,
                &local.key,
                Some(SocketAddr::new(from.unwrap_or(peers.addr.ip()), 0)),
                target,
            ),
        );
        let metrics = Arc::clone(&self.metrics);
        let client = peers.client.clone();
        let peer = peers.addr;
        let drain = self.drain.clone();
        tokio::spawn(self.drain.tracked(async move {
            let upgraded = match hyper::upgrade::on(&mut request).await {
                Ok(u) => u,
                Err(e) => {
                    tracing::debug!(%client, %target, "tunnel stream not upgraded: {e}");
                    relay::reset(&delivered);
                    return;
                }
            };
            let counters = metrics.connection_opened(&reporting.connection_labels());
            let client_side = TokioIo::new(upgraded);
            let relayed = if let Some(h2) = carries_http {
                // The client's node proxied HTTP: served as HTTP here too, each request judged
                // and reported.
                http::serve(client_side, delivered, h2, connection, &drain, Some(Arc::new(reporting))).await
            } else if per_request {
                http::judge_and_pass(
                    client_side,
                    delivered,
                    connection,
                    &counters,
                    &drain,
                    Some(Arc::new(reporting)),
                )
                .await
            } else {
                reporting.relay_to_pod(delivered, Guarded::new(client_side, connection), &counters).await
            };
            if let Err(e) = relayed {
                tracing::debug!(%client, %peer, %target, "tunnel stream ended with error: {e}");
            }
            counters.closed();
        }));
        Response::new(Full::new(Bytes::new()))
    }
}

/// What a CONNECT request asks for, read from its head alone (the fuzzed part of the tunnel
/// server: everything here comes from the peer).
#[derive(Debug)]
pub struct ConnectRequest {
    /// The pod address and port (`ip:port` authority).
    pub target: SocketAddr,
    /// The client pod's address (`Forwarded: for=`), when given.
    pub from: Option<IpAddr>,
    /// What the client's node says about it (W3C baggage), for telemetry only.
    pub baggage: Option<String>,
    /// The Service the client dialled (`SERVICE_HEADER`), for telemetry only.
    pub service: Option<String>,
    /// The stream carries HTTP (`PROTOCOL_HEADER`): `Some(true)` for HTTP/2.
    pub http: Option<bool>,
}

impl ConnectRequest {
    /// The request's asks, or the status and reason to refuse it with.
    pub fn parse<B>(request: &Request<B>) -> Result<ConnectRequest, (StatusCode, String)> {
        if request.method() != Method::CONNECT {
            return Err((StatusCode::METHOD_NOT_ALLOWED, "only CONNECT is served here".into()));
        }
        let Some(target) = request.uri().authority().and_then(|a| a.as_str().parse::<SocketAddr>().ok())
        else {
            return Err((
                StatusCode::BAD_REQUEST,
                format!("CONNECT target {} is not ip:port", request.uri()),
            ));
        };
        let header = |name: &str| request.headers().get(name).and_then(|v| v.to_str().ok());
        Ok(ConnectRequest {
            target,
            from: header(FORWARDED).and_then(parse_forwarded_for),
            baggage: header(BAGGAGE).map(str::to_string),
            service: header(SERVICE_HEADER).map(str::to_string),
            http: match header(PROTOCOL_HEADER) {
                Some(HTTP2) => Some(true),
                Some(HTTP1) => Some(false),
                _ => None,
            },
        })
    }
}

fn answer(status: StatusCode, reason: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(reason)));
    *response.status_mut() = status;
    response
}
