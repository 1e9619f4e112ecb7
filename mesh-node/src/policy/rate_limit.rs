//! Local rate limits (RateLimitPolicy): token buckets kept on this node, one per calling pod
//! (client side) or per serving pod (server side), per limit.
//!
//! A bucket starts full at `max_tokens`; every `fill_interval`, `tokens_per_fill` come back
//! (capped at `max_tokens`), computed lazily when a request looks — Envoy's local rate limit
//! semantics. Buckets outlive config changes that keep the limit as it was, so re-applying a
//! policy does not hand out a fresh burst.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, Weak},
    time::{Duration, Instant},
};

use envoy_types::pb::{envoy::config::route::v3::FilterConfig, google::protobuf::Any};
use hyper::http::request::Parts;
use nodemesh_api::proto::mesh;
use prost::Message;

use super::request_match::{RequestMatch, RequestSource, compile_match};

pub struct RateLimit {
    /// `<namespace>/<policy>/<limit>`.
    pub name: String,
    /// Server side: the bucket is the serving pod's.
    pub per_destination: bool,
    source: Option<mesh::RouteSource>,
    /// Any of; empty: every request.
    matches: Vec<RequestMatch>,
    buckets: Arc<Buckets>,
}

/// What a bucket said about one request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verdict {
    pub allowed: bool,
    pub limit: u32,
    pub remaining: u32,
    /// Until the next fill.
    pub reset: Duration,
}

/// Every bucket of one limit, by key (a pod).
pub struct Buckets {
    max_tokens: u32,
    tokens_per_fill: u32,
    fill_interval: Duration,
    by_key: Mutex<HashMap<String, Bucket>>,
}

struct Bucket {
    tokens: u32,
    last_fill: Instant,
}

/// The live buckets by limit identity (name and parameters), held weakly: the route tables own
/// them, and a limit dropped from config drops its buckets.
#[derive(Default)]
pub struct BucketRegistry {
    live: Mutex<HashMap<LimitIdentity, Weak<Buckets>>>,
}

/// Name, max tokens, tokens per fill, fill interval (ms).
type LimitIdentity = (String, u32, u32, u64);

impl BucketRegistry {
    fn get(&self, l: &mesh::RateLimit) -> Arc<Buckets> {
        let mut live = self.live.lock().expect("bucket registry lock");
        let key = (l.name.clone(), l.max_tokens, l.tokens_per_fill, l.fill_interval_ms);
        if let Some(b) = live.get(&key).and_then(Weak::upgrade) {
            return b;
        }
        live.retain(|_, b| b.strong_count() > 0);
        let b = Arc::new(Buckets {
            max_tokens: l.max_tokens,
            tokens_per_fill: l.tokens_per_fill,
            fill_interval: Duration::from_millis(l.fill_interval_ms),
            by_key: Mutex::new(HashMap::new()),
        });
        live.insert(key, Arc::downgrade(&b));
        b
    }
}

/// The limits in a virtual host's `nodemesh.io/local_ratelimit` filter config.
pub fn compile(any: &Any, registry: &BucketRegistry) -> Result<Vec<RateLimit>, String> {
    let wrapper = FilterConfig::decode(any.value.as_slice()).map_err(|e| format!("FilterConfig: {e}"))?;
    let inner = wrapper.config.ok_or("FilterConfig without config")?;
    let limits = mesh::RateLimits::decode(inner.value.as_slice()).map_err(|e| format!("RateLimits: {e}"))?;
    limits
        .limits
        .into_iter()
        .map(|l| {
            if l.max_tokens == 0 || l.tokens_per_fill == 0 || l.fill_interval_ms == 0 {
                return Err(format!(
                    "limit {}: a token bucket needs max_tokens, tokens_per_fill and fill_interval",
                    l.name
                ));
            }
            let matches = l
                .matches
                .iter()
                .map(|m| {
                    let m = envoy_types::pb::envoy::config::route::v3::RouteMatch::decode(m.as_slice())
                        .map_err(|e| format!("limit {}: match: {e}", l.name))?;
                    compile_match(&m).map_err(|e| format!("limit {}: {e}", l.name))
                })
                .collect::<Result<Vec<_>, String>>()?;
            Ok(RateLimit {
                buckets: registry.get(&l),
                name: l.name,
                per_destination: l.per_destination,
                source: l.source,
                matches,
            })
        })
        .collect()
}

impl RateLimit {
    pub fn matches_source(&self) -> bool {
        self.source.is_some()
    }

    /// Does this limit cover the request from `source`?
    pub fn applies(&self, req: &Parts, source: &RequestSource<'_>) -> bool {
        self.source.as_ref().is_none_or(|s| source.is(s))
            && (self.matches.is_empty() || self.matches.iter().any(|m| m.matches(req, source)))
    }

    /// Takes a token from `key`'s bucket, if there is one.
    pub fn take(&self, key: &str) -> Verdict {
        self.buckets.take(key, Instant::now())
    }
}

impl Buckets {
    fn take(&self, key: &str, now: Instant) -> Verdict {
        let mut by_key = self.by_key.lock().expect("bucket lock");
        let bucket = by_key
            .entry(key.to_string())
            .or_insert_with(|| Bucket { tokens: self.max_tokens, last_fill: now });
        let fills = (now.saturating_duration_since(bucket.last_fill).as_nanos()
            / self.fill_interval.as_nanos().max(1)) as u64;
        if fills > 0 {
            let added = fills.saturating_mul(u64::from(self.tokens_per_fill));
            bucket.tokens = (u64::from(bucket.tokens) + added).min(u64::from(self.max_tokens)) as u32;
            bucket.last_fill += self.fill_interval * fills.min(u64::from(u32::MAX)) as u32;
        }
        let allowed = bucket.tokens > 0;
        if allowed {
            bucket.tokens -= 1;
        }
        let reset = (bucket.last_fill + self.fill_interval).saturating_duration_since(now);
        Verdict { allowed, limit: self.max_tokens, remaining: bucket.tokens, reset }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn buckets(max: u32, per_fill: u32, interval_ms: u64) -> Buckets {
        Buckets {
            max_tokens: max,
            tokens_per_fill: per_fill,
            fill_interval: Duration::from_millis(interval_ms),
            by_key: Mutex::new(HashMap::new()),
        }
    }

    #[test]
    fn a_bucket_allows_its_burst_then_refills_by_interval_up_to_its_size() {
        let b = buckets(3, 2, 1000);
        let t0 = Instant::now();
        let allowed = |at: Instant| b.take("pod", at).allowed;
        assert!((0..3).all(|_| allowed(t0)), "the burst");
        assert!(!allowed(t0), "then empty");
        assert!(!allowed(t0 + Duration::from_millis(999)), "no partial fills");
        let t1 = t0 + Duration::from_millis(1000);
        assert!(allowed(t1) && allowed(t1) && !allowed(t1), "one fill gives tokens_per_fill");
        let later = t1 + Duration::from_secs(60);
        let v = b.take("pod", later);
        assert_eq!((v.allowed, v.remaining, v.limit), (true, 2, 3), "refills cap at max_tokens");
        assert!(b.take("other", t0).allowed, "each key has its own bucket");
    }

    #[test]
    fn reset_counts_down_to_the_next_fill() {
        let b = buckets(1, 1, 1000);
        let t0 = Instant::now();
        b.take("pod", t0);
        let v = b.take("pod", t0 + Duration::from_millis(400));
        assert!(!v.allowed);
        assert_eq!(v.reset, Duration::from_millis(600));
    }

    #[test]
    fn a_limit_kept_across_a_config_change_keeps_its_buckets() {
        let registry = BucketRegistry::default();
        let l = mesh::RateLimit {
            name: "shop/ratings/0".into(),
            max_tokens: 1,
            tokens_per_fill: 1,
            fill_interval_ms: 60_000,
            ..Default::default()
        };
        let first = registry.get(&l);
        assert!(first.take("pod", Instant::now()).allowed);
        let again = registry.get(&l);
        assert!(!again.take("pod", Instant::now()).allowed, "same limit, same bucket");
        let bigger = registry.get(&mesh::RateLimit { max_tokens: 5, ..l });
        assert!(bigger.take("pod", Instant::now()).allowed, "a changed limit starts afresh");
    }
}
