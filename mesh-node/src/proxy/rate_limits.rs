//! Local rate limits on the HTTP request path: the caller's buckets are checked before a route
//! is taken, the serving pod's once an endpoint is picked. A refused request never reaches the
//! upstream; it is answered 429 (gRPC: RESOURCE_EXHAUSTED), counted, and says which limit.
//! Responses under a limit carry `x-ratelimit-limit`, `x-ratelimit-remaining` and
//! `x-ratelimit-reset` (seconds to the next fill) of the tightest bucket they drew from.

use hyper::{HeaderMap, Response, StatusCode, header::HeaderValue};

use super::{
    Outbound,
    local_reply::{flagged, grpc_trailers_only, text_response},
};
use crate::{conn::pool::Body, workload::Source};
use crate::{
    policy::rate_limit::{RateLimit, Verdict},
    telemetry::{metrics::RateLimitedLabels, requests::is_grpc},
};

/// The tightest bucket a request drew from so far (fewest tokens left).
#[derive(Default)]
pub(super) struct Drawn(Option<Verdict>);

impl Drawn {
    /// Takes a token from `limit`'s bucket for `key`; if it was empty, the refusal to answer
    /// `request` (whose headers say whether it is gRPC).
    pub(super) fn take(
        &mut self,
        outbound: &Outbound,
        source: &Source,
        limit: &RateLimit,
        key: &str,
        request: &HeaderMap,
    ) -> Option<Response<Body>> {
        let verdict = limit.take(key);
        if !verdict.allowed {
            outbound.metrics.rate_limited(&RateLimitedLabels {
                limit: limit.name.clone(),
                side: if limit.per_destination { "server" } else { "client" }.into(),
                source_workload: source.key.name.clone(),
                source_workload_namespace: source.key.namespace.clone(),
            });
            return Some(refusal(limit, &verdict, key, is_grpc(request)));
        }
        if self.0.as_ref().is_none_or(|v| verdict.remaining < v.remaining) {
            self.0 = Some(verdict);
        }
        None
    }

    /// Adds the `x-ratelimit-*` headers to a response, if any limit applied.
    pub(super) fn annotate(&self, headers: &mut HeaderMap) {
        if let Some(v) = &self.0 {
            set_headers(headers, v);
        }
    }
}

fn set_headers(headers: &mut HeaderMap, v: &Verdict) {
    headers.insert("x-ratelimit-limit", HeaderValue::from(v.limit));
    headers.insert("x-ratelimit-remaining", HeaderValue::from(v.remaining));
    headers.insert("x-ratelimit-reset", HeaderValue::from(v.reset.as_secs_f64().ceil() as u64));
}

fn refusal(limit: &RateLimit, v: &Verdict, key: &str, grpc: bool) -> Response<Body> {
    let side = if limit.per_destination { "serving pod" } else { "caller" };
    let reason = format!("rate limited by {} ({side} {key}: {} requests per bucket)", limit.name, v.limit);
    // Debug, not info like other proxy answers: refusals can come thousands a second.
    tracing::debug!("{reason}");
    let mut response = if grpc {
        grpc_trailers_only(RESOURCE_EXHAUSTED, &reason)
    } else {
        text_response(StatusCode::TOO_MANY_REQUESTS, &reason)
    };
    set_headers(response.headers_mut(), v);
    flagged(response, "RL")
}

const RESOURCE_EXHAUSTED: u32 = 8;
