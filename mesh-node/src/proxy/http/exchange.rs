//! One request's trip upstream: endpoint after endpoint, within the route's retry policy, its
//! per-try timeout and overall timeout, and the cluster's retry budget.

use std::net::SocketAddr;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::{Request, Response, StatusCode, body::Incoming, http::request::Parts};

use super::{Target, error_response, overloaded};
use crate::{
    conn::pool::{Body, Sender, full},
    policy::{
        conn_limits::Refused,
        lb::{Balancer, Pick},
        rate_limit::RateLimit,
        retry::RetryPolicy,
    },
    proxy::{Outbound, connect::Attempt, rate_limits::Drawn},
    telemetry::{
        access_log::{Pending, Side},
        metrics::NO_FLAGS,
        requests::{ServedHere, upstream_failure_flags},
    },
    workload::Source,
};

/// Everything one request's trip upstream depends on.
pub(super) struct Exchange<'a> {
    pub outbound: &'a Outbound,
    pub source: &'a Source,
    pub target: &'a Target,
    pub balancer: &'a Balancer,
    pub retry: &'a RetryPolicy,
    pub hash: Option<u64>,
    pub h2: bool,
    /// When the route's `timeout` runs out.
    pub deadline: Option<tokio::time::Instant>,
    /// Local rate limits per serving pod, drawn once one is picked.
    pub server_limits: &'a [&'a RateLimit],
}

impl Exchange<'_> {
    /// A pod of this node that serves without per-request policy is reached with no HTTP
    /// server of ours at its end: its server-side log line and SERVER span start here (the pod
    /// gets that span's context; the request's own CLIENT span is its parent).
    fn served_here(&self, pick: &Pick, request: &mut Request<Body>) -> Option<ServedHere> {
        let ep = &pick.endpoint.ep;
        let (_, delivered_here) =
            self.outbound.reached(ep.addr, ep.tunnel.as_ref(), &self.balancer.connection);
        if !delivered_here {
            return None;
        }
        let metrics = &self.outbound.metrics;
        let span = metrics.tracers.for_workload(&ep.workload).and_then(|t| t.start(request, Side::Server));
        let logs = metrics.access_logs.for_workload(&ep.workload, Side::Server);
        let log = logs.map(|logs| Pending::start(logs, Side::Server, (&*request).into()));
        (span.is_some() || log.is_some()).then_some(ServedHere { log, span })
    }

    /// Sends the request (`replay`: its body, kept so it can be sent again; else `stream`,
    /// sent once) until an answer is final. `Err` is the answer mesh-node gives instead.
    pub(super) async fn send(
        &self,
        parts: &Parts,
        replay: Option<&Bytes>,
        mut stream: Option<Body>,
        drawn: &mut Drawn,
    ) -> Result<(Pick, Sender, Response<Incoming>), Response<Body>> {
        let (outbound, source, target, balancer, retry) =
            (self.outbound, self.source, self.target, self.balancer, self.retry);
        balancer.retry_budget.deposit();
        let mut previous = Vec::new();
        let mut retries = 0;
        loop {
            let may_retry = |retries: u32| retries < retry.attempts && replay.is_some();
            let (pick, mut sender) =
                match connect(outbound, source, target, balancer, self.hash, self.h2, &previous).await {
                    Ok(c) => c,
                    Err(ConnectFailed { why, overflow: true, .. }) => {
                        return Err(overloaded(&format!("{} ({}): {why}", target.service, target.vip)));
                    }
                    Err(ConnectFailed { why, denied: true, .. }) => {
                        // Envoy has no flag for an RBAC denial: its code (403) says it.
                        return Err(error_response(
                            StatusCode::FORBIDDEN,
                            NO_FLAGS,
                            &format!("RBAC: access denied: {why}"),
                        ));
                    }
                    Err(ConnectFailed { why, no_endpoint, .. }) => {
                        if may_retry(retries)
                            && retry.retries_failure(false)
                            && balancer.retry_budget.withdraw()
                        {
                            retries += 1;
                            tokio::time::sleep(RetryPolicy::backoff(retries)).await;
                            continue;
                        }
                        // The last attempt's reason: no endpoint at all (UH) outranks the
                        // retries spent (URX) on failed connects (UF).
                        let flags = match (no_endpoint, retries) {
                            (true, _) => "UH",
                            (false, 1..) => "URX",
                            (false, 0) => "UF",
                        };
                        return Err(error_response(
                            StatusCode::SERVICE_UNAVAILABLE,
                            flags,
                            &format!("{} ({}): {why}", target.service, target.vip),
                        ));
                    }
                };
            let addr = pick.endpoint.ep.addr;
            for limit in self.server_limits {
                if let Some(refused) =
                    drawn.take(outbound, source, limit, &addr.ip().to_string(), &parts.headers)
                {
                    return Err(refused);
                }
            }
            let body = match (&replay, stream.take()) {
                (Some(bytes), _) => full((*bytes).clone()),
                (None, Some(body)) => body,
                (None, None) => {
                    unreachable!("a streamed body is sent once: no retry without a replayable body")
                }
            };
            let limit = match (retry.per_try_timeout, self.deadline) {
                (Some(t), Some(d)) => Some(t.min(d.saturating_duration_since(tokio::time::Instant::now()))),
                (t, d) => t.or_else(|| d.map(|d| d.saturating_duration_since(tokio::time::Instant::now()))),
            };
            let mut request = Request::from_parts(parts.clone(), body);
            let served_here = self.served_here(&pick, &mut request);
            let exchange = sender.send(request);
            let result = match limit {
                Some(limit) => tokio::time::timeout(limit, exchange).await.map_err(|_| limit),
                None => Ok(exchange.await),
            };
            let overall_left = self.deadline.is_none_or(|d| d > tokio::time::Instant::now());
            let retry_now =
                |retries: u32| may_retry(retries) && overall_left && balancer.retry_budget.withdraw();
            let (status, flags, why) = match result {
                Ok(Ok(mut response)) => {
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
                    if let Some(served) = served_here {
                        response.extensions_mut().insert(served);
                    }
                    return Ok((pick, sender, response));
                }
                Ok(Err(e)) => {
                    tracing::info!(workload = %source.key, service = target.service, endpoint = %addr, "request failed: {e}");
                    (
                        StatusCode::BAD_GATEWAY,
                        upstream_failure_flags(&e),
                        format!("upstream request failed: {e}"),
                    )
                }
                Err(limit) => {
                    (StatusCode::GATEWAY_TIMEOUT, "UT", format!("upstream request timeout after {limit:?}"))
                }
            };
            // The request failed on this endpoint: another may take it, within the budget.
            balancer.report(&pick.endpoint, false);
            if retry.retries_failure(true) && retry_now(retries) {
                retries += 1;
                previous.push(addr);
                continue;
            }
            let flags = if retries > 0 { "URX" } else { flags };
            return Err(error_response(status, flags, &format!("{} ({addr}): {why}", target.service)));
        }
    }
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
                    outbound.dial_http(source, balancer, &endpoint.ep, h2, slot, &target.caller).await
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
            ConnectFailed {
                why,
                overflow,
                denied: e.kind() == std::io::ErrorKind::PermissionDenied,
                no_endpoint: e.kind() == std::io::ErrorKind::NotFound,
            }
        })
}

/// Why a request got no upstream connection.
struct ConnectFailed {
    why: String,
    /// Refused by the cluster's connectionPool limits (not the endpoint's fault).
    overflow: bool,
    /// Refused by the destination's AuthorizationPolicy.
    denied: bool,
    /// The cluster had no endpoint to try.
    no_endpoint: bool,
}

/// Bodies up to this size are kept so that a request can be retried.
const MAX_REPLAY_BODY: u64 = 64 * 1024;

/// A request body as the retry logic holds it.
pub(super) enum Buffered {
    /// Small (or empty) and read in full: can be sent again.
    Whole(Bytes),
    /// Large or of unknown size: streamed once.
    Stream(Body),
}

/// Reads the body in full if it is known to be small; otherwise leaves it to stream.
pub(super) async fn buffer_small(body: Incoming) -> Result<Buffered, hyper::Error> {
    use hyper::body::Body as _;
    if body.is_end_stream() {
        return Ok(Buffered::Whole(Bytes::new()));
    }
    if body.size_hint().upper().is_some_and(|n| n <= MAX_REPLAY_BODY) {
        return Ok(Buffered::Whole(body.collect().await?.to_bytes()));
    }
    Ok(Buffered::Stream(body.boxed()))
}
