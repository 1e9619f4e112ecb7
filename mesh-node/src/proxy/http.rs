//! L7: HTTP/1.x and h2c (gRPC included) from a workload to a Service, proxied with hyper and
//! balanced **per request** (LESSONS.md 2: balancing connections pins keep-alive clients).
//!
//! What the client sent is preserved: `Host` / `:authority` untouched (LESSONS.md 6), the
//! path, headers and trailers as they were; only hop-by-hop headers are dropped. HTTP/1.0
//! requests are accepted (LESSONS.md 7) and forwarded as HTTP/1.1 with a `Host` filled in when
//! they carried none. Routing is keyed on the Service the client dialled, never on `Host`.
//! An HTTP/1.1 upgrade (WebSocket) answered with 101 becomes a byte tunnel.

use std::{convert::Infallible, net::SocketAddr, sync::Arc};

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::{
    HeaderMap, Request, Response, StatusCode, Uri, Version,
    body::Incoming,
    header::{self, HeaderName, HeaderValue},
    server::conn::{http1, http2},
    service::service_fn,
};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use nodemesh_api::proto::mesh::{self, hash_policy::Key};
use tokio::net::TcpStream;

use super::{
    Outbound,
    connect::Attempt,
    local_reply::{grpc_trailers_only, text_response},
    rate_limits::Drawn,
};
use crate::conn::{
    pool::{Body, Sender, full},
    upgrade::{splice_upgrade, upgrade_protocol},
};
use crate::telemetry::metrics::{Reporter, RequestLabels, UNKNOWN};
use crate::workload::Source;
use crate::{
    policy::{
        conn_limits::Refused,
        http_route::{Abort, Action, Fault, Forward, Redirect, Route, RouteTable},
        lb::{Balancer, LocalityKey, Pick, hash_bytes},
        request_match::RequestSource,
        retry::RetryPolicy,
    },
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
    let io = TokioIo::new(client);
    let (key, service_name) = (source.key.clone(), target.service.clone());
    let service = service_fn(move |req| {
        let (outbound, source, target) = (Arc::clone(&outbound), Arc::clone(&source), Arc::clone(&target));
        async move {
            let started = std::time::Instant::now();
            let response = forward(&outbound, &source, &target, req).await;
            record(&outbound, &source, &target, &response, started);
            Ok::<_, Infallible>(response)
        }
    });
    let result = if h2 {
        http2::Builder::new(TokioExecutor::new()).timer(TokioTimer::new()).serve_connection(io, service).await
    } else {
        http1::Builder::new().timer(TokioTimer::new()).serve_connection(io, service).with_upgrades().await
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
) -> Response<Body> {
    let h2 = req.version() == Version::HTTP_2;
    let upgrade = if h2 { None } else { upgrade_protocol(req.headers()) };
    let client_upgrade = upgrade.is_some().then(|| hyper::upgrade::on(&mut req));
    let (mut parts, body) = req.into_parts();

    // A VirtualService route picks the cluster (and may redirect, rewrite, add headers).
    let (table, mut balancer, mut hash_policy) = target.current(&source.key.namespace);
    let mut timeout = None;
    let mut retry = RetryPolicy::istio_default();
    let mut mirrors: Vec<String> = Vec::new();
    let mut chosen: Option<(&Route, &crate::policy::http_route::Target)> = None;
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
    if let (Some(table), Some(cache)) = (&table, &target.cache) {
        let Some(route) = table.select(&parts, &from) else {
            return error_response(
                StatusCode::NOT_FOUND,
                &format!("{}: no route matches {} {}", target.service, parts.method, parts.uri),
            );
        };
        match &route.action {
            Action::Redirect(r) => return redirect_response(r, &parts),
            Action::Forward(f) => {
                let t = f.pick();
                route.request_ops.apply(&mut parts.headers);
                t.request_ops.apply(&mut parts.headers);
                rewrite(&mut parts, f, route);
                if let Some(fault) = &route.fault
                    && let Some(abort) = inject(fault).await
                {
                    return fault_response(abort);
                }
                timeout = f.timeout;
                retry = f.retry.clone();
                if f.hash_policy.is_some() {
                    hash_policy = f.hash_policy.clone();
                }
                mirrors =
                    f.mirrors.iter().filter(|(_, chance)| chance.hit()).map(|(c, _)| c.clone()).collect();
                balancer = match cache.cluster_for(&t.cluster, &source.key.namespace) {
                    Some(b) => b,
                    None => {
                        return error_response(
                            StatusCode::SERVICE_UNAVAILABLE,
                            &format!(
                                "{}: route {} sends to cluster {}, which this node does not have (is the DestinationRule subset defined?)",
                                target.service, route.name, t.cluster
                            ),
                        );
                    }
                };
                chosen = Some((route, t));
            }
        }
    }
    let hash = request_hash(hash_policy.as_ref(), source, &parts);
    let Some(_slot) = balancer.admit_request() else {
        return overloaded(&format!(
            "{}: cluster {} is at its connectionPool limit of requests in flight (overflow)",
            target.service, balancer.name
        ));
    };
    prepare_request(&mut parts, h2, target.vip, upgrade.as_ref());

    // A request can be sent again only if its body is kept: small bodies are buffered when the
    // route retries; upgrades and streams are sent once.
    let (replay, mut stream) = if (retry.attempts > 0 || !mirrors.is_empty()) && upgrade.is_none() {
        match buffer_small(body).await {
            Ok(Buffered::Whole(bytes)) => (Some(bytes), None),
            Ok(Buffered::Stream(body)) => (None, Some(body)),
            Err(e) => {
                return error_response(StatusCode::BAD_REQUEST, &format!("reading the request body: {e}"));
            }
        }
    } else {
        (None, Some(body.boxed()))
    };
    if let (Some(bytes), Some(cache)) = (&replay, &target.cache) {
        for cluster in mirrors {
            let Some(balancer) = cache.cluster_for(&cluster, &source.key.namespace) else { continue };
            let (outbound, source) = (Arc::clone(outbound), Arc::clone(source));
            let (mut parts, bytes, vip) = (parts.clone(), bytes.clone(), target.vip);
            shadow_authority(&mut parts);
            tokio::spawn(async move { mirror(&outbound, &source, &balancer, parts, bytes, h2, vip).await });
        }
    }
    balancer.retry_budget.deposit();
    let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
    let mut previous = Vec::new();
    let mut retries = 0;
    let (pick, sender, mut response) = loop {
        let may_retry = |retries: u32| retries < retry.attempts && replay.is_some();
        let (pick, mut sender) = match connect(outbound, source, target, &balancer, hash, h2, &previous).await
        {
            Ok(c) => c,
            Err(ConnectFailed { why, overflow: true, .. }) => {
                return overloaded(&format!("{} ({}): {why}", target.service, target.vip));
            }
            Err(ConnectFailed { why, denied: true, .. }) => {
                return error_response(StatusCode::FORBIDDEN, &format!("RBAC: access denied: {why}"));
            }
            Err(ConnectFailed { why, .. }) => {
                if may_retry(retries) && retry.retries_failure(false) && balancer.retry_budget.withdraw() {
                    retries += 1;
                    tokio::time::sleep(RetryPolicy::backoff(retries)).await;
                    continue;
                }
                return error_response(
                    StatusCode::SERVICE_UNAVAILABLE,
                    &format!("{} ({}): {why}", target.service, target.vip),
                );
            }
        };
        let addr = pick.endpoint.ep.addr;
        for limit in &server_limits {
            if let Some(refused) = drawn.take(outbound, source, limit, &addr.ip().to_string(), &parts.headers)
            {
                return refused;
            }
        }
        let body = match (&replay, stream.take()) {
            (Some(bytes), _) => full(bytes.clone()),
            (None, Some(body)) => body,
            (None, None) => unreachable!("a streamed body is sent once: no retry without a replayable body"),
        };
        let limit = match (retry.per_try_timeout, deadline) {
            (Some(t), Some(d)) => Some(t.min(d.saturating_duration_since(tokio::time::Instant::now()))),
            (t, d) => t.or_else(|| d.map(|d| d.saturating_duration_since(tokio::time::Instant::now()))),
        };
        let exchange = sender.send(Request::from_parts(parts.clone(), body));
        let result = match limit {
            Some(limit) => tokio::time::timeout(limit, exchange).await.map_err(|_| limit),
            None => Ok(exchange.await),
        };
        let overall_left = deadline.is_none_or(|d| d > tokio::time::Instant::now());
        let retry_now = |retries: u32| may_retry(retries) && overall_left && balancer.retry_budget.withdraw();
        let (status, why) = match result {
            Ok(Ok(response)) => {
                {
                    // Any answer is a success for connect-failure ejection; with the
                    // DestinationRule's outlier detection, 5xx (or gateway errors) count as failures.
                    let failed = balancer
                        .outlier
                        .http_failures
                        .is_some_and(|kind| kind.counts(response.status().as_u16()));
                    if let Some(ejected) = balancer.report(&pick.endpoint, !failed) {
                        tracing::warn!(cluster = balancer.name, endpoint = %addr, "endpoint ejected for {ejected:?} after consecutive {} answers", response.status());
                    }
                }
                if retry.retries_response(response.status(), response.headers()) && retry_now(retries) {
                    tracing::debug!(service = target.service, endpoint = %addr, status = response.status().as_u16(), "retrying");
                    retries += 1;
                    previous.push(addr);
                    tokio::time::sleep(RetryPolicy::backoff(retries)).await;
                    continue;
                }
                break (pick, sender, response);
            }
            Ok(Err(e)) => {
                tracing::info!(workload = %source.key, service = target.service, endpoint = %addr, "request failed: {e}");
                (StatusCode::BAD_GATEWAY, format!("upstream request failed: {e}"))
            }
            Err(limit) => (StatusCode::GATEWAY_TIMEOUT, format!("upstream request timeout after {limit:?}")),
        };
        // The request failed on this endpoint: another may take it, within the budget.
        balancer.report(&pick.endpoint, false);
        if retry.retries_failure(true) && retry_now(retries) {
            retries += 1;
            previous.push(addr);
            continue;
        }
        return error_response(status, &format!("{} ({addr}): {why}", target.service));
    };
    let addr = pick.endpoint.ep.addr;
    let answered_by = pick.endpoint.ep.workload.clone();
    drop(pick);
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
        source.http_pool.put(addr, sender, &balancer);
    }
    strip_hop_by_hop(response.headers_mut());
    if !answered_by.is_empty() {
        response.extensions_mut().insert(AnsweredBy(answered_by));
    }
    if let Some((route, t)) = chosen {
        t.response_ops.apply(response.headers_mut());
        route.response_ops.apply(response.headers_mut());
    }
    drawn.annotate(response.headers_mut());
    response.map(BodyExt::boxed)
}

/// Applies a route's fault: waits out a delay that hits; returns the abort that hits, if any.
async fn inject(fault: &Fault) -> Option<Abort> {
    if let Some((delay, chance)) = fault.delay
        && chance.hit()
    {
        tokio::time::sleep(delay).await;
    }
    fault.abort.filter(|(_, chance)| chance.hit()).map(|(abort, _)| abort)
}

/// The answer to an injected abort: the HTTP status, or for gRPC a trailers-only response
/// carrying the gRPC status (what a gRPC client reads as that error).
fn fault_response(abort: Abort) -> Response<Body> {
    tracing::debug!(?abort, "fault injected");
    let mut response = Response::new(full(Bytes::from_static(b"fault filter abort")));
    match abort {
        Abort::Http(code) => {
            *response.status_mut() = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
        }
        Abort::Grpc(code) => response = grpc_trailers_only(code, "fault filter abort"),
    }
    response
}

/// Envoy's shadow convention: the mirrored copy's authority gets `-shadow` after the host, so
/// the receiver can tell copies from live traffic.
fn shadow_authority(parts: &mut hyper::http::request::Parts) {
    let Some(authority) = request_authority(parts) else { return };
    let shadow = match authority.rsplit_once(':') {
        Some((host, port)) if port.parse::<u16>().is_ok() => format!("{host}-shadow:{port}"),
        _ => format!("{authority}-shadow"),
    };
    set_authority(parts, &shadow);
}

/// The authority the client addressed: the URI's (HTTP/2, absolute form), else `Host`.
fn request_authority(parts: &hyper::http::request::Parts) -> Option<String> {
    parts
        .uri
        .authority()
        .map(|a| a.as_str().to_string())
        .or_else(|| parts.headers.get(header::HOST).and_then(|h| h.to_str().ok()).map(str::to_string))
}

/// Replaces the request's authority: `Host`, and the URI's when it carries one.
fn set_authority(parts: &mut hyper::http::request::Parts, authority: &str) {
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

/// Sends a copy of a request to one endpoint of a mirror cluster and discards the answer.
async fn mirror(
    outbound: &Outbound,
    source: &Source,
    balancer: &Balancer,
    parts: hyper::http::request::Parts,
    body: Bytes,
    h2: bool,
    vip: SocketAddr,
) {
    let Some(pick) = balancer.pick(None, None, &[]) else { return };
    let addr = pick.endpoint.ep.addr;
    let sender = match source.http_pool.get(addr, h2, balancer) {
        Some(s) => Ok(s),
        // A copy never waits for a connection: under maxConnections it is skipped.
        None => match balancer.admit_connection() {
            Some(slot) => outbound.dial_http(source, balancer, &pick.endpoint.ep, h2, slot).await,
            None => return,
        },
    };
    let Ok(mut sender) = sender else { return };
    let request = Request::from_parts(parts, full(body));
    match sender.send(request).await {
        Ok(response) => {
            let _ = response.into_body().collect().await;
            source.http_pool.put(addr, sender, balancer);
        }
        Err(e) => tracing::debug!(%vip, endpoint = %addr, "mirrored request failed: {e}"),
    }
}

/// The upstream workload that answered (`namespace/name`), kept on the response for metrics.
#[derive(Clone)]
struct AnsweredBy(String);

/// `istio_requests_total` and `istio_request_duration_milliseconds` for one answered request.
fn record(
    outbound: &Outbound,
    source: &Source,
    target: &Target,
    response: &Response<Body>,
    started: std::time::Instant,
) {
    let answered = response.extensions().get::<AnsweredBy>().map(|a| a.0.as_str()).unwrap_or_default();
    let (namespace, name) = answered.split_once('/').unwrap_or((UNKNOWN, UNKNOWN));
    let labels = RequestLabels {
        reporter: Reporter::source,
        source_workload: source.key.name.clone(),
        source_workload_namespace: source.key.namespace.clone(),
        destination_service: target.service.clone(),
        destination_workload: name.to_string(),
        destination_workload_namespace: namespace.to_string(),
        response_code: response.status().as_u16().to_string(),
    };
    outbound.metrics.request(&labels, started.elapsed().as_secs_f64() * 1000.0);
}

/// A connection to an endpoint of `balancer` (preferring ones no earlier attempt used): a
/// pooled one, or a new one; see [`Attempt::open`].
async fn connect(
    outbound: &Outbound,
    source: &Source,
    target: &Target,
    balancer: &Balancer,
    hash: Option<u64>,
    h2: bool,
    previous: &[SocketAddr],
) -> Result<(Pick, Sender), ConnectFailed> {
    let attempt = Attempt { source, balancer, hash, local: target.local.as_ref(), service: &target.service };
    attempt
        .open(previous, false, |endpoint| async move {
            match source.http_pool.get(endpoint.ep.addr, h2, balancer) {
                Some(sender) => Ok(sender),
                None => {
                    let slot = balancer
                        .admit_http_connection(outbound.connect_timeout_to(balancer))
                        .await
                        .map_err(std::io::Error::other)?;
                    outbound.dial_http(source, balancer, &endpoint.ep, h2, slot).await
                }
            }
        })
        .await
        .map_err(|e| {
            let overflow = Refused::caused(&e);
            let why = match e.kind() {
                _ if overflow => format!(
                    "cluster {} is at its connectionPool limit of connections ({}): {e}",
                    balancer.name,
                    balancer.limits.max_connections.unwrap_or_default()
                ),
                std::io::ErrorKind::NotFound => e.to_string(),
                _ => format!("upstream connect error: {e}"),
            };
            ConnectFailed { why, overflow, denied: e.kind() == std::io::ErrorKind::PermissionDenied }
        })
}

/// Why a request got no upstream connection.
struct ConnectFailed {
    why: String,
    /// Refused by the cluster's connectionPool limits (not the endpoint's fault).
    overflow: bool,
    /// Refused by the destination's AuthorizationPolicy.
    denied: bool,
}

/// 503 with Envoy's overflow marker, so callers (and Envoy-aware clients) can tell a
/// circuit breaker from a failing upstream.
fn overloaded(reason: &str) -> Response<Body> {
    let mut response = error_response(StatusCode::SERVICE_UNAVAILABLE, reason);
    response.headers_mut().insert("x-envoy-overloaded", HeaderValue::from_static("true"));
    response
}

/// Bodies up to this size are kept so that a request can be retried.
const MAX_REPLAY_BODY: u64 = 64 * 1024;

/// A request body as the retry logic holds it.
enum Buffered {
    /// Small (or empty) and read in full: can be sent again.
    Whole(Bytes),
    /// Large or of unknown size: streamed once.
    Stream(Body),
}

/// Reads the body in full if it is known to be small; otherwise leaves it to stream.
async fn buffer_small(body: Incoming) -> Result<Buffered, hyper::Error> {
    use hyper::body::Body as _;
    if body.is_end_stream() {
        return Ok(Buffered::Whole(Bytes::new()));
    }
    if body.size_hint().upper().is_some_and(|n| n <= MAX_REPLAY_BODY) {
        return Ok(Buffered::Whole(body.collect().await?.to_bytes()));
    }
    Ok(Buffered::Stream(body.boxed()))
}

/// A route's rewrite: the matched prefix (or the whole path) replaced, or a regex substitution;
/// the authority replaced. The query string stays.
fn rewrite(parts: &mut hyper::http::request::Parts, f: &Forward, route: &Route) {
    let path = parts.uri.path().to_string();
    let new_path = if let Some(replacement) = &f.prefix_rewrite {
        let matched = route.matched_prefix().filter(|p| path.starts_with(p)).unwrap_or(&path);
        Some(format!("{replacement}{}", &path[matched.len()..]))
    } else {
        f.regex_rewrite.as_ref().map(|(re, with)| re.replace_all(&path, with.as_str()).into_owned())
    };
    if let Some(new_path) = new_path {
        let with_query = match parts.uri.query() {
            Some(q) => format!("{new_path}?{q}"),
            None => new_path,
        };
        let mut uri = hyper::http::uri::Builder::new();
        if let Some(scheme) = parts.uri.scheme() {
            uri = uri.scheme(scheme.clone());
        }
        if let Some(authority) = parts.uri.authority() {
            uri = uri.authority(authority.clone());
        }
        if let Ok(u) = uri.path_and_query(with_query).build() {
            parts.uri = u;
        }
    }
    if let Some(authority) = &f.authority_rewrite {
        set_authority(parts, authority);
    }
}

/// A redirect answered by the proxy: `Location` from the route's parts and the request's.
fn redirect_response(r: &Redirect, parts: &hyper::http::request::Parts) -> Response<Body> {
    let host = request_authority(parts)
        .and_then(|a| a.parse::<hyper::http::uri::Authority>().ok())
        .map(|a| a.host().to_string())
        .unwrap_or_default();
    let authority = r.authority.clone().unwrap_or(host);
    let authority = match r.port {
        Some(p) => format!("{}:{p}", authority.split(':').next().unwrap_or(&authority)),
        None => authority,
    };
    let path =
        r.path.clone().unwrap_or_else(|| parts.uri.path_and_query().map_or("/", |p| p.as_str()).to_string());
    let location = format!("{}://{authority}{path}", r.scheme.as_deref().unwrap_or("http"));
    let mut response = Response::new(full(Bytes::new()));
    *response.status_mut() = StatusCode::from_u16(r.status).unwrap_or(StatusCode::MOVED_PERMANENTLY);
    if let Ok(v) = HeaderValue::from_str(&location) {
        response.headers_mut().insert(header::LOCATION, v);
    }
    response
}

/// The request as the upstream connection needs it: hop-by-hop headers gone, HTTP/1.x in
/// origin form with a `Host`, or HTTP/2 with scheme and authority in the URI. An HTTP/1.0
/// request stays HTTP/1.0: some HTTP/1.0-only servers mishandle an HTTP/1.1 request line
/// (chunked answers, keep-alive they do not speak).
fn prepare_request(
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
fn strip_hop_by_hop(headers: &mut HeaderMap) {
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
fn request_hash(
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

fn error_response(status: StatusCode, reason: &str) -> Response<Body> {
    tracing::info!(status = status.as_u16(), "answered by the proxy: {reason}");
    text_response(status, reason)
}

#[cfg(test)]
mod tests {
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
