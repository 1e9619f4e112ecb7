//! L7: HTTP/1.x and h2c (gRPC included) from a workload to a Service, proxied with hyper and
//! balanced **per request**, since balancing connections pins keep-alive clients to one pod.
//!
//! What the client sent is preserved: `Host` / `:authority` untouched, the path, headers and
//! trailers as they were; only hop-by-hop headers are dropped ([`headers`]). HTTP/1.0
//! requests stay HTTP/1.0 upstream (some HTTP/1.0 servers break on a 1.1 request) with a
//! `Host` filled in when they carried none. Routing is keyed on the Service the client
//! dialled, never on `Host`. An HTTP/1.1 upgrade (WebSocket) answered with 101 becomes a byte
//! tunnel.
//!
//! A request goes through [`forward`]: the caller's rate limits, the route ([`plan`]), the
//! trip upstream with retries and timeouts ([`exchange`]), copies to mirrors ([`mirror`]),
//! then the answer with the route's response headers.

mod exchange;
mod headers;
mod mirror;
mod plan;
mod report;

use std::{convert::Infallible, net::SocketAddr, sync::Arc};

use http_body_util::BodyExt;
use hyper::{
    Request, Response, StatusCode, Version,
    body::Incoming,
    header::HeaderValue,
    server::conn::{http1, http2},
    service::service_fn,
};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use nodemesh_api::proto::mesh;
use tokio::net::TcpStream;

use exchange::{Buffered, Exchange, buffer_small};
use headers::{prepare_request, request_hash, strip_hop_by_hop};
use report::{AnsweredBy, SourceReport};

use super::{
    Outbound,
    local_reply::{flagged, text_response},
    rate_limits::Drawn,
};
use crate::{
    conn::{
        pool::Body,
        upgrade::{splice_upgrade, upgrade_protocol},
    },
    policy::{
        http_route::RouteTable,
        lb::{Balancer, LocalityKey},
        request_match::RequestSource,
    },
    telemetry::{
        labels::Caller,
        requests::{Arrived, UpstreamHost},
    },
    workload::Source,
    xds::{cache::Cache, resources::AddressInfo},
};

/// The Service port a connection's requests go to.
pub(crate) struct Target {
    pub balancer: Arc<Balancer>,
    pub hash_policy: Option<mesh::HashPolicy>,
    /// The source workload's locality, for locality-aware clusters.
    pub local: Option<LocalityKey>,
    /// The service hostname, for logs and error bodies.
    pub service: String,
    /// The caller and the Service, as metrics label them (here and at the serving node).
    pub caller: Caller,
    /// What the client dialled.
    pub vip: SocketAddr,
    /// Routes, clusters and addresses from the control plane. The service port is looked up
    /// again for every request, so a VirtualService or DestinationRule that arrives while a
    /// connection is open applies to its next request.
    pub cache: Option<Arc<Cache>>,
}

impl Target {
    /// The port's current routes (if a VirtualService applies), default cluster (as a caller
    /// in `namespace` reaches it) and hash policy.
    fn current(&self, namespace: &str) -> (Option<Arc<RouteTable>>, Arc<Balancer>, Option<mesh::HashPolicy>) {
        let fallback = || (None, Arc::clone(&self.balancer), self.hash_policy.clone());
        let Some(cache) = &self.cache else { return fallback() };
        let Some(AddressInfo::Service(svc)) = cache.address(self.vip.ip()) else { return fallback() };
        let Some(port) = svc.ports.iter().find(|p| p.port == u32::from(self.vip.port())) else {
            return fallback();
        };
        let balancer =
            cache.cluster_for(&port.cluster, namespace).unwrap_or_else(|| Arc::clone(&self.balancer));
        let routes = if port.route.is_empty() { None } else { cache.route(&port.route) };
        (routes, balancer, port.hash_policy.clone())
    }
}

/// Serves one client connection (`h2`: it opened with the HTTP/2 preface) until it closes.
pub(crate) async fn serve(
    outbound: Arc<Outbound>,
    client: TcpStream,
    h2: bool,
    source: Arc<Source>,
    target: Arc<Target>,
) {
    let peer = client.peer_addr().ok().map(|p| source.client_addr(p));
    let io = TokioIo::new(client);
    let (key, service_name) = (source.key.clone(), target.service.clone());
    let drain = outbound.drain.clone();
    let report = Arc::new(SourceReport::new(&outbound, &target, key.to_string(), peer));
    let service = service_fn(move |req: Request<Incoming>| {
        let (outbound, source, target) = (Arc::clone(&outbound), Arc::clone(&source), Arc::clone(&target));
        let report = Arc::clone(&report);
        async move {
            let mut req = req;
            let arrived = report.arrived(&mut req);
            let response = forward(&outbound, &source, &target, req, &arrived).await;
            let response = report.meter(arrived, response);
            let (mut parts, body) = response.into_parts();
            if !h2 {
                outbound.drain.close_after(&mut parts);
            }
            Ok::<_, Infallible>(Response::from_parts(parts, body))
        }
    });
    let result = if h2 {
        let conn =
            http2::Builder::new(TokioExecutor::new()).timer(TokioTimer::new()).serve_connection(io, service);
        drain.serve(conn, true, |c| c.graceful_shutdown()).await
    } else {
        let conn =
            http1::Builder::new().timer(TokioTimer::new()).serve_connection(io, service).with_upgrades();
        drain.serve(conn, false, |c| c.graceful_shutdown()).await
    };
    if let Err(e) = result {
        tracing::debug!(workload = %key, service = service_name, "HTTP connection ended: {e}");
    }
}

async fn forward(
    outbound: &Arc<Outbound>,
    source: &Arc<Source>,
    target: &Target,
    mut req: Request<Incoming>,
    arrived: &Arrived,
) -> Response<Body> {
    let h2 = req.version() == Version::HTTP_2;
    let upgrade = if h2 { None } else { upgrade_protocol(req.headers()) };
    let client_upgrade = upgrade.is_some().then(|| hyper::upgrade::on(&mut req));
    let (mut parts, body) = req.into_parts();

    let (table, balancer, hash_policy) = target.current(&source.key.namespace);
    // Only routes and limits that depend on the caller need its workload record.
    let workload = match (&table, &target.cache) {
        (Some(table), Some(cache)) if table.matches_source() => cache.workload(&source.key.to_string()),
        _ => None,
    };
    let from =
        RequestSource { namespace: &source.key.namespace, labels: workload.as_ref().map(|w| &w.labels) };
    // Local rate limits: the caller's buckets now, the serving pod's once one is picked.
    let mut drawn = Drawn::default();
    let mut server_limits = Vec::new();
    for limit in table.iter().flat_map(|t| &t.limits).filter(|l| l.applies(&parts, &from)) {
        if limit.per_destination {
            server_limits.push(limit);
        } else if let Some(refused) =
            drawn.take(outbound, source, limit, &source.key.to_string(), &parts.headers)
        {
            return refused;
        }
    }
    let plan =
        match plan::plan(table.as_deref(), target, source, &from, &mut parts, balancer, hash_policy).await {
            Ok(plan) => plan,
            Err(answer) => return answer,
        };
    let hash = request_hash(plan.hash_policy.as_ref(), source, &parts);
    let Some(_slot) = plan.balancer.admit_request() else {
        return overloaded(&format!(
            "{}: cluster {} is at its connectionPool limit of requests in flight",
            target.service, plan.balancer.name
        ));
    };
    prepare_request(&mut parts, h2, target.vip, upgrade.as_ref());

    // A request can be sent again only if its body is kept: small bodies are buffered when the
    // route retries or mirrors; upgrades and streams are sent once.
    let (replay, stream) = if (plan.retry.attempts > 0 || !plan.mirrors.is_empty()) && upgrade.is_none() {
        match buffer_small(body).await {
            Ok(Buffered::Whole(bytes)) => (Some(bytes), None),
            Ok(Buffered::Stream(body)) => (None, Some(body)),
            Err(e) => {
                return error_response(
                    StatusCode::BAD_REQUEST,
                    "DC",
                    &format!("reading the request body: {e}"),
                );
            }
        }
    } else {
        (None, Some(body.boxed()))
    };
    let stream = stream.map(|body| arrived.count(body).boxed());
    if let Some(bytes) = &replay {
        arrived.counted_whole(bytes.len());
    }
    if let Some(bytes) = &replay {
        mirror::spawn_copies(outbound, source, target, &plan.mirrors, &parts, bytes, h2);
    }
    let exchange = Exchange {
        outbound,
        source,
        target,
        balancer: &plan.balancer,
        retry: &plan.retry,
        hash,
        h2,
        deadline: plan.timeout.map(|t| tokio::time::Instant::now() + t),
        server_limits: &server_limits,
    };
    let (pick, sender, mut response) = match exchange.send(&parts, replay.as_ref(), stream, &mut drawn).await
    {
        Ok(answered) => answered,
        Err(answer) => return answer,
    };
    let addr = pick.endpoint.ep.addr;
    let (security, delivered_here) =
        outbound.reached(addr, pick.endpoint.ep.tunnel.as_ref(), &plan.balancer.connection);
    let answered_by = AnsweredBy {
        workload: pick.endpoint.ep.workload.clone(),
        names: pick.endpoint.ep.names.clone(),
        security,
        delivered_here,
    };
    drop(pick);
    response.extensions_mut().insert(answered_by);
    response.extensions_mut().insert(UpstreamHost(addr));
    if response.status() == StatusCode::SWITCHING_PROTOCOLS
        && let Some(client_upgrade) = client_upgrade
    {
        // The connection now belongs to the tunnel; it does not go back to the pool.
        splice_upgrade(client_upgrade, &mut response);
        return response.map(BodyExt::boxed);
    }
    // An HTTP/1.0 exchange ends its connection (hyper closes it after the answer: no
    // keep-alive in 1.0), so it never goes back to the pool.
    if parts.version != Version::HTTP_10 {
        source.http_pool.put(addr, sender, &plan.balancer);
    }
    strip_hop_by_hop(response.headers_mut());
    if let Some((route, t)) = plan.chosen {
        t.response_ops.apply(response.headers_mut());
        route.response_ops.apply(response.headers_mut());
    }
    drawn.annotate(response.headers_mut());
    response.map(BodyExt::boxed)
}

/// 503 with Envoy's overflow marker, so callers (and Envoy-aware clients) can tell a
/// circuit breaker from a failing upstream.
fn overloaded(reason: &str) -> Response<Body> {
    let mut response = error_response(StatusCode::SERVICE_UNAVAILABLE, "UO", reason);
    response.headers_mut().insert("x-envoy-overloaded", HeaderValue::from_static("true"));
    response
}

/// The proxy's own answer, with Envoy's response `flags` saying why.
fn error_response(status: StatusCode, flags: &'static str, reason: &str) -> Response<Body> {
    tracing::info!(status = status.as_u16(), flags, "answered by the proxy: {reason}");
    flagged(text_response(status, reason), flags)
}
