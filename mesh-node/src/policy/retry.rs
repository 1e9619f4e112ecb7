//! HTTP retries: what a route retries (Envoy `RetryPolicy`, from Istio's `retries`), and the
//! per-cluster **budget** that bounds them (retries must never multiply the load on a failing
//! upstream).
//!
//! The budget is Linkerd's design rather than Envoy's (Envoy budgets on *concurrent* retries,
//! which lets a sequential client retry every request): every first attempt deposits 0.2 of a
//! token, every retry spends one, and a small floor (1 token a second, at most 10 banked) keeps
//! retries possible at low traffic. An upstream failing everything therefore sees at most
//! 1.2 × the requests plus that reserve.

use std::{
    sync::Mutex,
    time::{Duration, Instant},
};

use envoy_types::pb::envoy::config::route::v3 as route;
use hyper::{HeaderMap, StatusCode};

/// Share of first attempts that may be retried.
const RETRY_RATIO: f64 = 0.2;
/// Tokens the floor adds per second…
const FLOOR_PER_SECOND: f64 = 1.0;
/// …and the most that can be banked (also caps deposits): a burst after a quiet spell stays small.
const MAX_BANKED: f64 = 10.0;

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Retries after the first attempt (0: none).
    pub attempts: u32,
    pub per_try_timeout: Option<Duration>,
    five_xx: bool,
    gateway_error: bool,
    connect_failure: bool,
    reset: bool,
    retriable_4xx: bool,
    status_codes: Vec<u16>,
    /// gRPC status codes (from `grpc-status` in the response headers).
    grpc_codes: Vec<u32>,
}

impl RetryPolicy {
    /// What Istio gives a route without `retries`: two retries on connect failure, refused
    /// stream, gRPC unavailable/cancelled and 503, all under the budget here.
    pub fn istio_default() -> RetryPolicy {
        RetryPolicy {
            attempts: 2,
            connect_failure: true,
            reset: false,
            status_codes: vec![503],
            grpc_codes: vec![GRPC_CANCELLED, GRPC_UNAVAILABLE],
            ..RetryPolicy::default()
        }
    }

    pub fn from_envoy(p: &route::RetryPolicy) -> Result<RetryPolicy, String> {
        let mut policy = RetryPolicy {
            attempts: p.num_retries.as_ref().map_or(1, |n| n.value),
            per_try_timeout: super::nonzero_duration(p.per_try_timeout.as_ref()),
            ..RetryPolicy::default()
        };
        for cond in p.retry_on.split(',').map(str::trim).filter(|c| !c.is_empty()) {
            match cond {
                "5xx" => policy.five_xx = true,
                "gateway-error" => policy.gateway_error = true,
                "connect-failure" => policy.connect_failure = true,
                "refused-stream" | "reset" | "reset-before-request" => policy.reset = true,
                "retriable-4xx" => policy.retriable_4xx = true,
                "retriable-status-codes" => {
                    for c in &p.retriable_status_codes {
                        let code = u16::try_from(*c).ok().filter(|c| (100..600).contains(c));
                        policy
                            .status_codes
                            .push(code.ok_or_else(|| format!("retriable status code {c} is not HTTP"))?);
                    }
                }
                grpc => match grpc_code(grpc) {
                    Some(code) => policy.grpc_codes.push(code),
                    None => {
                        return Err(format!("retry_on `{cond}` is not a retry condition this node knows"));
                    }
                },
            }
        }
        Ok(policy)
    }

    /// Whether a response with this status (and headers, for gRPC) is worth another attempt.
    pub fn retries_response(&self, status: StatusCode, headers: &HeaderMap) -> bool {
        let code = status.as_u16();
        (self.five_xx && status.is_server_error())
            || (self.gateway_error && matches!(code, 502..=504))
            || (self.retriable_4xx && code == 409)
            || self.status_codes.contains(&code)
            || headers
                .get("grpc-status")
                .and_then(|v| v.to_str().ok()?.parse::<u32>().ok())
                .is_some_and(|c| self.grpc_codes.contains(&c))
    }

    /// Whether a failed exchange (no response) is worth another attempt: `connected` tells a
    /// failure to connect from a reset or timeout after the request went out.
    pub fn retries_failure(&self, connected: bool) -> bool {
        if connected {
            self.reset || self.five_xx || self.gateway_error
        } else {
            self.connect_failure || self.five_xx || self.gateway_error
        }
    }

    /// Envoy's default back-off: 25 ms doubling, jittered, at most 250 ms.
    pub fn backoff(retry: u32) -> Duration {
        let base = 25u64 << retry.min(3);
        Duration::from_millis(fastrand::u64(base / 2..=base).min(250))
    }
}

const GRPC_CANCELLED: u32 = 1;
const GRPC_UNAVAILABLE: u32 = 14;

fn grpc_code(name: &str) -> Option<u32> {
    Some(match name {
        "cancelled" => GRPC_CANCELLED,
        "deadline-exceeded" => 4,
        "resource-exhausted" => 8,
        "internal" => 13,
        "unavailable" => GRPC_UNAVAILABLE,
        _ => return None,
    })
}

/// One cluster's retry budget (see the module docs).
pub struct RetryBudget {
    state: Mutex<(f64, Instant)>,
}

impl Default for RetryBudget {
    /// Starts with the full reserve, so that the first failures of a new cluster are retried.
    fn default() -> Self {
        RetryBudget { state: Mutex::new((MAX_BANKED, Instant::now())) }
    }
}

impl RetryBudget {
    fn refill(state: &mut (f64, Instant)) {
        let now = Instant::now();
        state.0 = (state.0 + now.duration_since(state.1).as_secs_f64() * FLOOR_PER_SECOND).min(MAX_BANKED);
        state.1 = now;
    }

    /// A first attempt went out.
    pub fn deposit(&self) {
        let mut s = self.state.lock().expect("budget lock");
        Self::refill(&mut s);
        s.0 = (s.0 + RETRY_RATIO).min(MAX_BANKED);
    }

    /// Takes a token for one retry; false when the budget is spent.
    pub fn withdraw(&self) -> bool {
        let mut s = self.state.lock().expect("budget lock");
        Self::refill(&mut s);
        if s.0 >= 1.0 {
            s.0 -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failing_upstream_gets_at_most_a_fifth_more_than_the_first_attempts() {
        let budget = RetryBudget::default();
        let mut retries = 0;
        for _ in 0..10_000 {
            budget.deposit();
            // Two retries allowed per request, as Istio's default.
            for _ in 0..2 {
                if budget.withdraw() {
                    retries += 1;
                }
            }
        }
        assert!(retries <= 2_000 + 2 * 12, "{retries} retries for 10,000 requests");
        assert!(retries >= 1_900, "the budget must allow retries: {retries}");
    }

    #[test]
    fn retry_conditions_from_envoy() {
        let p = route::RetryPolicy {
            retry_on: "gateway-error,connect-failure,retriable-status-codes,unavailable".into(),
            retriable_status_codes: vec![429],
            num_retries: Some(envoy_types::pb::google::protobuf::UInt32Value { value: 3 }),
            ..Default::default()
        };
        let policy = RetryPolicy::from_envoy(&p).unwrap();
        assert_eq!(policy.attempts, 3);
        let none = HeaderMap::new();
        assert!(policy.retries_response(StatusCode::BAD_GATEWAY, &none));
        assert!(policy.retries_response(StatusCode::TOO_MANY_REQUESTS, &none));
        assert!(!policy.retries_response(StatusCode::INTERNAL_SERVER_ERROR, &none));
        let mut grpc = HeaderMap::new();
        grpc.insert("grpc-status", "14".parse().unwrap());
        assert!(policy.retries_response(StatusCode::OK, &grpc));
        assert!(
            RetryPolicy::from_envoy(&route::RetryPolicy {
                retry_on: "sometimes".into(),
                ..Default::default()
            })
            .is_err()
        );
    }
}
