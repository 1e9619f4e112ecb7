//! HTTP arriving at a workload whose AuthorizationPolicies look at requests (methods, paths,
//! hosts, headers): mesh-node serves the connection as HTTP (hyper), judges every request,
//! answers a denied one 403 itself, and passes allowed ones to the application over the
//! delivered connection (one upstream connection per inbound connection, same HTTP version).

use std::{convert::Infallible, net::SocketAddr, sync::Arc, time::Duration};

use http_body_util::BodyExt;
use hyper::{Request, Response, StatusCode, body::Incoming, header, service::service_fn};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpStream,
    sync::Mutex,
};

use nodemesh_api::workload::WorkloadKey;

use crate::authz::{Inbound, Request as AuthzRequest, Verdict};
use crate::drain::Drain;
use crate::{
    conn::{
        pool::{Body, full},
        relay,
        sniff::{self, Prefixed, Protocol},
        upgrade::{splice_upgrade, upgrade_protocol},
    },
    telemetry::{
        access_log::{ConnectionFacts, ConnectionLog, LogSubject, Side, inbound_cluster},
        labels::{DestinationLabels, ServiceLabels, Shared, SourceLabels},
        metrics::{ConnectionCounters, ConnectionLabels, Metrics, Reporter, SecurityPolicy},
        requests::{Arrived, RequestReport, ResponseDetails, ResponseFlags, upstream_failure_flags},
    },
};

enum Upstream {
    Http1(Mutex<hyper::client::conn::http1::SendRequest<Body>>),
    Http2(hyper::client::conn::http2::SendRequest<Body>),
}

/// `reporter="destination"` request metrics for one delivered connection: the caller and
/// Service as the client's node said, this pod, and how the caller reached it.
pub struct Reporting {
    pub report: RequestReport,
    pub destination: Arc<DestinationLabels>,
    pub security: SecurityPolicy,
}

impl Reporting {
    /// The `reporter="destination"` series (and server-side access logs) of one connection
    /// delivered into a pod.
    pub fn new(
        metrics: &Arc<Metrics>,
        source: Arc<SourceLabels>,
        destination: Arc<DestinationLabels>,
        service: Arc<ServiceLabels>,
        security: SecurityPolicy,
        access: LogSubject,
    ) -> Reporting {
        let report = RequestReport {
            metrics: Arc::clone(metrics),
            reporter: Reporter::destination,
            source: Shared(source),
            service: Shared(service),
            access: Some(access),
        };
        Reporting { report, destination, security }
    }

    /// Server-side access logs of `workload` for a connection from `client` to `target` (a
    /// port of the pod).
    pub fn server_log(
        metrics: &Metrics,
        workload: &WorkloadKey,
        client: Option<SocketAddr>,
        target: SocketAddr,
    ) -> LogSubject {
        LogSubject {
            logs: Arc::clone(&metrics.access_logs),
            workload: workload.to_string(),
            side: Side::Server,
            facts: ConnectionFacts {
                downstream_remote: client,
                downstream_local: Some(target),
                upstream_host: Some(target),
                upstream_cluster: inbound_cluster(target.port()),
            },
        }
    }

    /// Relays `client` to the pod over `delivered` as bytes, counted, and access-logged as a
    /// TCP connection if the pod's server-side logs are on.
    pub async fn relay_to_pod<S>(
        &self,
        delivered: TcpStream,
        client: S,
        counters: &ConnectionCounters,
    ) -> Result<(), String>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let log = self.report.access.as_ref().and_then(ConnectionLog::of);
        // The pod is the first side: what it sends is what the destination sent.
        let relayed = relay::relay_stream(delivered, client, &counters.sent, &counters.received).await;
        if let Some(log) = log {
            let pod = self.report.access.as_ref().and_then(|a| a.facts.upstream_host);
            let mtls = self.security == SecurityPolicy::mutual_tls;
            log.finish("-", pod.map(|p| (p, mtls)), (relayed.totals.received, relayed.totals.sent));
        }
        relayed.result.map_err(|e| e.to_string())
    }

    /// The connection's own TCP labels.
    pub fn connection_labels(&self) -> ConnectionLabels {
        ConnectionLabels::tcp(
            Reporter::destination,
            Arc::clone(&self.report.source.0),
            Arc::clone(&self.destination),
            Arc::clone(&self.report.service.0),
            self.security,
        )
    }
}

/// How long a connection to a workload with request-level policies may stay silent before it
/// is taken to be a server-first protocol (then judged as a connection).
const SNIFF_TIMEOUT: Duration = Duration::from_millis(500);

/// Passes `client` to `delivered` for a workload whose policies look at requests: HTTP is
/// judged request by request (and reported, with `reporting`); anything else is judged as a
/// connection (a DENY rule that needs HTTP then matches: fail closed) and relayed.
pub async fn judge_and_pass<S>(
    mut client: S,
    delivered: TcpStream,
    connection: Inbound,
    counters: &ConnectionCounters,
    drain: &Drain,
    reporting: Option<Arc<Reporting>>,
) -> Result<(), String>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (protocol, prefix) = sniff::read_prefix(&mut client, SNIFF_TIMEOUT).await;
    let client = Prefixed::new(prefix, client);
    match protocol {
        Protocol::Http1 | Protocol::H2c => {
            serve(client, delivered, protocol == Protocol::H2c, connection, drain, reporting).await
        }
        _ => {
            if connection.decide(&connection.current(), None) != Verdict::Allow {
                relay::reset(&delivered);
                return Err("denied".into());
            }
            match reporting {
                // Logged as the TCP connection it turned out to be.
                Some(reporting) => reporting.relay_to_pod(delivered, client, counters).await,
                // The pod is the first side: what it sends is what the destination sent.
                None => relay::relay_stream(delivered, client, &counters.sent, &counters.received)
                    .await
                    .result
                    .map_err(|e| e.to_string()),
            }
        }
    }
}

/// Serves `client` (HTTP/2 if `h2`) until it closes, forwarding allowed requests over
/// `delivered`, each reported with `reporting`.
pub async fn serve<S>(
    client: S,
    delivered: TcpStream,
    h2: bool,
    connection: Inbound,
    drain: &Drain,
    reporting: Option<Arc<Reporting>>,
) -> Result<(), String>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let io = TokioIo::new(delivered);
    // Ends when the upstream HTTP/2 connection does (the pod closed or reset it): the client's
    // connection is then shut down (GOAWAY) rather than left failing every request.
    let (upstream_gone, upstream_ended) = tokio::sync::oneshot::channel::<()>();
    let upstream = if h2 {
        let (sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .handshake(io)
            .await
            .map_err(|e| format!("upstream HTTP/2: {e}"))?;
        tokio::spawn(async move {
            let _ = conn.await;
            drop(upstream_gone);
        });
        Upstream::Http2(sender)
    } else {
        let (sender, conn) =
            hyper::client::conn::http1::handshake(io).await.map_err(|e| format!("upstream HTTP/1: {e}"))?;
        tokio::spawn(conn.with_upgrades());
        Upstream::Http1(Mutex::new(sender))
    };
    let shared = Arc::new((connection, upstream, drain.clone(), reporting));
    let service = service_fn(move |request: Request<Incoming>| {
        let shared = Arc::clone(&shared);
        async move {
            let mut request = request;
            let arrived = match &shared.3 {
                Some(r) => r.report.arrived(&mut request),
                None => Arrived::new(request.headers()),
            };
            let request = request.map(|body| arrived.count(body).boxed());
            let response = handle(&shared.0, &shared.1, request).await;
            let response = match &shared.3 {
                Some(r) => r.report.meter(arrived, response, Arc::clone(&r.destination), r.security, false),
                None => response,
            };
            let (mut parts, body) = response.into_parts();
            if !h2 {
                shared.2.close_after(&mut parts);
            }
            Ok::<_, Infallible>(Response::from_parts(parts, body))
        }
    });
    let client = TokioIo::new(client);
    let served = if h2 {
        let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .serve_connection(client, service);
        let ended = async {
            let _ = upstream_ended.await;
        };
        drain.serve_while(conn, true, ended, |c| c.graceful_shutdown()).await
    } else {
        let conn =
            hyper::server::conn::http1::Builder::new().serve_connection(client, service).with_upgrades();
        drain.serve(conn, false, |c| c.graceful_shutdown()).await
    };
    served.map_err(|e| e.to_string())
}

async fn handle(connection: &Inbound, upstream: &Upstream, mut request: Request<Body>) -> Response<Body> {
    let host = request
        .uri()
        .authority()
        .map(|a| a.as_str().to_string())
        .or_else(|| request.headers().get(header::HOST).and_then(|h| h.to_str().ok()).map(str::to_string))
        .unwrap_or_default();
    let facts = AuthzRequest {
        method: request.method().as_str(),
        path: request.uri().path(),
        host: &host,
        headers: request.headers(),
    };
    // The policies as they are now: a change applies to the next request.
    let verdict = connection.decide(&connection.current(), Some(&facts));
    if verdict != Verdict::Allow {
        let mut response = Response::new(full("RBAC: access denied\n"));
        *response.status_mut() = StatusCode::FORBIDDEN;
        response.extensions_mut().insert(ResponseDetails(verdict.envoy_details()));
        return response;
    }
    // An allowed upgrade (WebSocket) becomes a byte tunnel once the application agrees; the
    // request that asked for it was judged like any other.
    let client_upgrade = (request.version() == hyper::Version::HTTP_11
        && upgrade_protocol(request.headers()).is_some())
    .then(|| hyper::upgrade::on(&mut request));
    let sent = match upstream {
        Upstream::Http1(sender) => {
            let mut sender = sender.lock().await;
            match sender.ready().await {
                Ok(()) => sender.send_request(request).await,
                Err(e) => Err(e),
            }
        }
        Upstream::Http2(sender) => sender.clone().send_request(request).await,
    };
    match sent {
        Ok(mut response) => {
            if response.status() == StatusCode::SWITCHING_PROTOCOLS
                && let Some(client_upgrade) = client_upgrade
            {
                splice_upgrade(client_upgrade, &mut response);
            }
            response.map(BodyExt::boxed)
        }
        Err(e) => {
            let mut response = Response::new(full(format!("upstream request failed: {e}\n")));
            *response.status_mut() = StatusCode::BAD_GATEWAY;
            response.extensions_mut().insert(ResponseFlags(upstream_failure_flags(&e)));
            // The HTTP/1 connection to the pod is unusable now; so is this one, which the
            // client would otherwise send its next request on.
            if matches!(upstream, Upstream::Http1(_)) {
                response.headers_mut().insert(header::CONNECTION, header::HeaderValue::from_static("close"));
            }
            response
        }
    }
}
