//! Load balancing over one cluster's endpoints, per DestinationRule: round robin, least request
//! (power of two choices), random, consistent hash (ring); locality preference with failover;
//! passive outlier detection (consecutive connect failures eject an endpoint for a while).

use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicU32, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use nodemesh_api::workload::WorkloadNames;

use super::conn_limits::{ConnectionLimits, ConnectionSlot, Refused};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LbPolicy {
    RoundRobin,
    LeastRequest,
    Random,
    /// Consistent hash; Maglev is served by the same ring (same stickiness guarantees).
    RingHash {
        min_ring_size: usize,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OutlierSettings {
    pub consecutive_failures: u32,
    pub base_ejection: Duration,
    pub max_ejection_percent: u32,
    /// Which HTTP answers count as failures too (only when the DestinationRule configures
    /// outlier detection; connect failures always count).
    pub http_failures: Option<HttpFailures>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HttpFailures {
    /// consecutive5xxErrors: any 5xx.
    Any5xx,
    /// consecutiveGatewayErrors: 502, 503, 504.
    Gateway,
}

impl HttpFailures {
    pub fn counts(self, status: u16) -> bool {
        match self {
            HttpFailures::Any5xx => (500..600).contains(&status),
            HttpFailures::Gateway => (502..=504).contains(&status),
        }
    }
}

impl Default for OutlierSettings {
    /// Always on, also without a DestinationRule: five refused connects in a row eject an
    /// endpoint for 30 s (doubling on repeat), never more than 10% of a cluster (at least one).
    fn default() -> Self {
        OutlierSettings {
            consecutive_failures: 5,
            base_ejection: Duration::from_secs(30),
            max_ejection_percent: 10,
            http_failures: None,
        }
    }
}

/// (region, zone, subzone)
pub type LocalityKey = (String, String, String);

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    pub addr: SocketAddr,
    pub healthy: bool,
    pub weight: u32,
    pub locality: LocalityKey,
    /// `namespace/name` of the workload behind it, when known.
    pub workload: String,
    /// A meshed workload on a node with a tunnel: how the mesh reaches it.
    pub tunnel: Option<TunnelTarget>,
    /// How metrics name the workload behind it, as the control plane sent it.
    pub names: Option<Arc<WorkloadNames>>,
}

#[derive(Debug)]
pub struct EndpointState {
    pub ep: Endpoint,
    active: AtomicU32,
    consecutive_failures: AtomicU32,
    ejections: AtomicU32,
    ejected_until: Mutex<Option<Instant>>,
}

impl EndpointState {
    fn new(ep: Endpoint) -> EndpointState {
        EndpointState {
            ep,
            active: AtomicU32::new(0),
            consecutive_failures: AtomicU32::new(0),
            ejections: AtomicU32::new(0),
            ejected_until: Mutex::new(None),
        }
    }

    fn ejected(&self, now: Instant) -> bool {
        self.ejected_until.lock().expect("ejection lock").is_some_and(|t| t > now)
    }
}

/// A picked endpoint; counts as one active request until dropped (least request uses it).
pub struct Pick {
    pub endpoint: Arc<EndpointState>,
}

impl Drop for Pick {
    fn drop(&mut self) {
        self.endpoint.active.fetch_sub(1, Ordering::Relaxed);
    }
}

#[derive(Default)]
struct Members {
    endpoints: Vec<Arc<EndpointState>>,
    /// Sorted (hash, index) for consistent hashing.
    ring: Vec<(u64, usize)>,
    /// Smooth weighted round robin credit per endpoint, used when weights differ.
    credits: Mutex<Vec<i64>>,
}

pub struct Balancer {
    pub name: String,
    pub policy: LbPolicy,
    pub outlier: OutlierSettings,
    pub locality_aware: bool,
    /// ORIGINAL_DST: connect where the client dialled.
    pub passthrough: bool,
    members: RwLock<Arc<Members>>,
    next: AtomicUsize,
    /// HTTP retries to this cluster, shared across settings changes.
    pub retry_budget: Arc<super::retry::RetryBudget>,
    /// Circuit breaking (DestinationRule connectionPool).
    pub limits: PoolLimits,
    /// Requests in flight now, shared across settings changes.
    in_flight: Arc<AtomicU32>,
    /// Upstream connections open now (and requests waiting for one), shared likewise.
    pub connections: Arc<ConnectionLimits>,
    /// How connections to the endpoints are made and kept (tls mode, keepalive, idle timeouts).
    pub connection: super::connection_settings::ConnectionSettings,
    /// Callers (by namespace) that see another DestinationRule and so another cluster.
    pub caller_variants: Vec<super::caller_variants::CallerVariant>,
}

/// A cluster's connectionPool limits on this node (Envoy circuit-breaker thresholds).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PoolLimits {
    /// http.http2MaxRequests: most requests in flight at once.
    pub max_requests: Option<u32>,
    /// tcp.maxConnections: most upstream connections open at once, idle pooled ones included.
    pub max_connections: Option<u32>,
    /// http.http1MaxPendingRequests: most requests waiting for a connection.
    pub max_pending_requests: Option<u32>,
    /// http.maxRequestsPerConnection: an upstream connection is retired after carrying this
    /// many requests.
    pub max_requests_per_connection: Option<u32>,
    /// tcp.connectTimeout (Envoy's `connect_timeout`; Istio's default is 10 s).
    pub connect_timeout: Option<Duration>,
}

/// One request admitted under a cluster's `max_requests`; leaves on drop.
pub struct RequestSlot(Arc<AtomicU32>);

impl Drop for RequestSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Balancer {
    pub fn new(
        name: &str,
        policy: LbPolicy,
        outlier: OutlierSettings,
        locality_aware: bool,
        passthrough: bool,
    ) -> Balancer {
        Balancer {
            name: name.to_string(),
            policy,
            outlier,
            locality_aware,
            passthrough,
            members: RwLock::default(),
            next: AtomicUsize::new(0),
            retry_budget: Arc::default(),
            limits: PoolLimits::default(),
            in_flight: Arc::default(),
            connections: Arc::default(),
            connection: Default::default(),
            caller_variants: Vec::new(),
        }
    }

    /// Admits one more request unless `max_requests` are in flight (Envoy's overflow).
    pub fn admit_request(&self) -> Option<RequestSlot> {
        let now = self.in_flight.fetch_add(1, Ordering::Relaxed);
        let slot = RequestSlot(Arc::clone(&self.in_flight));
        if self.limits.max_requests.is_some_and(|max| now >= max) {
            return None; // dropping the slot gives the count back
        }
        Some(slot)
    }

    /// A place for one more upstream connection (L4), unless `max_connections` are open.
    pub fn admit_connection(&self) -> Option<ConnectionSlot> {
        self.connections.try_admit(self.limits.max_connections)
    }

    /// A place for one more upstream connection for an HTTP request, waiting as a pending
    /// request (see [`ConnectionLimits::admit_waiting`]).
    pub async fn admit_http_connection(&self, wait: Duration) -> Result<ConnectionSlot, Refused> {
        let limits = self.limits;
        self.connections.admit_waiting(limits.max_connections, limits.max_pending_requests, wait).await
    }

    /// Same endpoints (and their health), new settings.
    pub fn reconfigured(
        &self,
        policy: LbPolicy,
        outlier: OutlierSettings,
        locality_aware: bool,
        passthrough: bool,
    ) -> Balancer {
        let mut b = Balancer::new(&self.name, policy, outlier, locality_aware, passthrough);
        b.retry_budget = Arc::clone(&self.retry_budget);
        b.in_flight = Arc::clone(&self.in_flight);
        b.connections = Arc::clone(&self.connections);
        let eps: Vec<Endpoint> = self.members().endpoints.iter().map(|e| e.ep.clone()).collect();
        *b.members.write().expect("members lock") = Arc::clone(&self.members());
        b.set_endpoints(eps);
        b
    }

    fn members(&self) -> Arc<Members> {
        Arc::clone(&self.members.read().expect("members lock"))
    }

    /// Replaces the endpoint set, keeping runtime state (ejections, counts) of ones that stay.
    pub fn set_endpoints(&self, mut eps: Vec<Endpoint>) {
        eps.sort_by_key(|e| e.addr);
        let old = self.members();
        let endpoints: Vec<Arc<EndpointState>> = eps
            .into_iter()
            .map(|ep| match old.endpoints.iter().find(|o| o.ep.addr == ep.addr) {
                Some(o) if o.ep == ep => Arc::clone(o),
                Some(o) => {
                    let s = EndpointState::new(ep);
                    *s.ejected_until.lock().expect("ejection lock") =
                        *o.ejected_until.lock().expect("ejection lock");
                    Arc::new(s)
                }
                None => Arc::new(EndpointState::new(ep)),
            })
            .collect();
        let ring = match self.policy {
            LbPolicy::RingHash { min_ring_size } if !endpoints.is_empty() => {
                build_ring(&endpoints, min_ring_size)
            }
            _ => Vec::new(),
        };
        let credits = Mutex::new(vec![0; endpoints.len()]);
        *self.members.write().expect("members lock") = Arc::new(Members { endpoints, ring, credits });
    }

    /// Picks an endpoint not in `exclude`. `hash` is the consistent-hash key (ignored by other
    /// policies; a hash policy without a key falls back to random, like Envoy).
    pub fn pick(
        &self,
        hash: Option<u64>,
        local: Option<&LocalityKey>,
        exclude: &[SocketAddr],
    ) -> Option<Pick> {
        let members = self.members();
        let now = Instant::now();
        let usable = |e: &EndpointState| e.ep.healthy && !e.ejected(now) && !exclude.contains(&e.ep.addr);
        let mut candidates: Vec<usize> =
            (0..members.endpoints.len()).filter(|i| usable(&members.endpoints[*i])).collect();
        if candidates.is_empty() {
            // Everything ejected or unhealthy: try any not excluded (Envoy's panic mode) rather than fail.
            candidates = (0..members.endpoints.len())
                .filter(|i| !exclude.contains(&members.endpoints[*i].ep.addr))
                .collect();
        }
        if candidates.is_empty() {
            return None;
        }
        if self.locality_aware
            && let Some(local) = local
        {
            let best =
                candidates.iter().map(|i| priority(local, &members.endpoints[*i].ep.locality)).min()?;
            candidates.retain(|i| priority(local, &members.endpoints[*i].ep.locality) == best);
        }
        let chosen = match (self.policy, hash) {
            (LbPolicy::RoundRobin, _) => {
                let weight = |i: usize| i64::from(members.endpoints[i].ep.weight.max(1));
                let first = weight(candidates[0]);
                if candidates.iter().all(|i| weight(*i) == first) {
                    candidates[self.next.fetch_add(1, Ordering::Relaxed) % candidates.len()]
                } else {
                    // Endpoint weights (WorkloadEntry / ServiceEntry `weight`): smooth weighted
                    // round robin, exact per cycle and interleaved.
                    let choices = candidates.iter().map(|&i| (i, weight(i)));
                    super::weights::step(&mut members.credits.lock().expect("credits lock"), choices)
                }
            }
            (LbPolicy::Random, _) | (LbPolicy::RingHash { .. }, None) => {
                candidates[fastrand::usize(..candidates.len())]
            }
            (LbPolicy::LeastRequest, _) => {
                let a = candidates[fastrand::usize(..candidates.len())];
                let b = candidates[fastrand::usize(..candidates.len())];
                let load = |i: usize| members.endpoints[i].active.load(Ordering::Relaxed);
                if load(b) < load(a) { b } else { a }
            }
            (LbPolicy::RingHash { .. }, Some(key)) => {
                let start = members.ring.partition_point(|(h, _)| *h < key);
                (0..members.ring.len())
                    .map(|k| members.ring[(start + k) % members.ring.len()].1)
                    .find(|i| candidates.contains(i))
                    .unwrap_or(candidates[0])
            }
        };
        let endpoint = Arc::clone(&members.endpoints[chosen]);
        endpoint.active.fetch_add(1, Ordering::Relaxed);
        Some(Pick { endpoint })
    }

    /// Connect outcome: success resets the failure streak; a streak of failures ejects.
    pub fn report(&self, endpoint: &EndpointState, ok: bool) -> Option<Duration> {
        if ok {
            endpoint.consecutive_failures.store(0, Ordering::Relaxed);
            return None;
        }
        let streak = endpoint.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
        if streak < self.outlier.consecutive_failures {
            return None;
        }
        let members = self.members();
        let now = Instant::now();
        let ejected = members.endpoints.iter().filter(|e| e.ejected(now)).count();
        let max = (members.endpoints.len() * self.outlier.max_ejection_percent as usize / 100).max(1);
        if ejected >= max || endpoint.ejected(now) {
            return None;
        }
        let times = endpoint.ejections.fetch_add(1, Ordering::Relaxed) + 1;
        let duration = self.outlier.base_ejection * times.min(10);
        *endpoint.ejected_until.lock().expect("ejection lock") = Some(now + duration);
        endpoint.consecutive_failures.store(0, Ordering::Relaxed);
        Some(duration)
    }

    pub fn dump(&self) -> serde_json::Value {
        let now = Instant::now();
        let members = self.members();
        serde_json::json!({
            "lb_policy": format!("{:?}", self.policy),
            "max_requests": self.limits.max_requests,
            "max_connections": self.limits.max_connections,
            "max_pending_requests": self.limits.max_pending_requests,
            "max_requests_per_connection": self.limits.max_requests_per_connection,
            "requests_in_flight": self.in_flight.load(Ordering::Relaxed),
            "connections_open": self.connections.open(),
            "requests_pending": self.connections.pending(),
            "outlier_detection": {
                "consecutive_failures": self.outlier.consecutive_failures,
                "base_ejection_ms": self.outlier.base_ejection.as_millis() as u64,
                "max_ejection_percent": self.outlier.max_ejection_percent,
                "http_failures": self.outlier.http_failures.map(|h| format!("{h:?}")),
            },
            "locality_aware": self.locality_aware,
            "passthrough": self.passthrough,
            "connection": self.connection.dump(),
            "caller_variants": self.caller_variants.iter().map(|v| serde_json::json!({
                "namespaces": v.namespaces,
                "cluster": format!("{}{}", self.name, v.suffix),
            })).collect::<Vec<_>>(),
            "endpoints": members.endpoints.iter().map(|e| serde_json::json!({
                "address": e.ep.addr.to_string(),
                "workload": e.ep.workload,
                "healthy": e.ep.healthy,
                "ejected": e.ejected(now),
                "locality": format!("{}/{}/{}", e.ep.locality.0, e.ep.locality.1, e.ep.locality.2),
                "active": e.active.load(Ordering::Relaxed),
                // Through which node's tunnel (mTLS), or null: straight to the address.
                "tunnel": e.ep.tunnel.as_ref().map(|t| t.address.to_string()),
            })).collect::<Vec<_>>(),
        })
    }
}

/// 0 = same region/zone/subzone, 1 = same zone, 2 = same region, 3 = elsewhere.
fn priority(local: &LocalityKey, ep: &LocalityKey) -> u8 {
    if local.0 != ep.0 {
        3
    } else if local.1 != ep.1 {
        2
    } else if local.2 != ep.2 {
        1
    } else {
        0
    }
}

fn build_ring(endpoints: &[Arc<EndpointState>], min_ring_size: usize) -> Vec<(u64, usize)> {
    let per = min_ring_size.div_ceil(endpoints.len()).clamp(1, 4096);
    let mut ring = Vec::with_capacity(per * endpoints.len());
    for (i, e) in endpoints.iter().enumerate() {
        let base = e.ep.addr.to_string();
        for v in 0..per {
            ring.push((hash_bytes(format!("{base}_{v}").as_bytes()), i));
        }
    }
    ring.sort_unstable();
    ring
}

/// FNV-1a then a murmur finaliser: stable across runs and nodes (so every node maps a key to
/// the same endpoint), well spread.
pub fn hash_bytes(bytes: &[u8]) -> u64 {
    let mut h = nodemesh_api::hash::fnv1a64(bytes);
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h
}

/// How the mesh reaches a destination workload: its node's tunnel, and who it must prove to be.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct TunnelTarget {
    pub address: SocketAddr,
    pub namespace: String,
    pub service_account: String,
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn ep(last: u8, zone: &str) -> Endpoint {
        Endpoint {
            names: None,
            addr: SocketAddr::from(([10, 0, 0, last], 80)),
            healthy: true,
            weight: 1,
            locality: ("r".into(), zone.into(), String::new()),
            workload: String::new(),
            tunnel: None,
        }
    }

    fn counts(b: &Balancer, n: usize, key: impl Fn(usize) -> Option<u64>) -> HashMap<SocketAddr, usize> {
        let mut m = HashMap::new();
        for i in 0..n {
            let p = b.pick(key(i), None, &[]).unwrap();
            *m.entry(p.endpoint.ep.addr).or_default() += 1;
        }
        m
    }

    #[test]
    fn round_robin_is_even() {
        let b = Balancer::new("c", LbPolicy::RoundRobin, OutlierSettings::default(), false, false);
        b.set_endpoints(vec![ep(1, "a"), ep(2, "a"), ep(3, "a")]);
        let c = counts(&b, 100, |_| None);
        let (min, max) = (c.values().min().unwrap(), c.values().max().unwrap());
        assert!(max - min <= 1, "{c:?}");
    }

    #[test]
    fn ring_hash_is_sticky_and_spreads() {
        let b = Balancer::new(
            "c",
            LbPolicy::RingHash { min_ring_size: 1024 },
            OutlierSettings::default(),
            false,
            false,
        );
        b.set_endpoints(vec![ep(1, "a"), ep(2, "a"), ep(3, "a")]);
        for k in 0..50u64 {
            let key = hash_bytes(&k.to_le_bytes());
            let first = b.pick(Some(key), None, &[]).unwrap().endpoint.ep.addr;
            assert!((0..5).all(|_| b.pick(Some(key), None, &[]).unwrap().endpoint.ep.addr == first));
        }
        let c = counts(&b, 3000, |i| Some(hash_bytes(&(i as u64).to_le_bytes())));
        assert_eq!(c.len(), 3, "{c:?}");
        assert!(c.values().all(|v| *v > 600), "{c:?}");
    }

    #[test]
    fn round_robin_follows_endpoint_weights() {
        let b = Balancer::new("c", LbPolicy::RoundRobin, OutlierSettings::default(), false, false);
        let mut heavy = ep(1, "a");
        heavy.weight = 3;
        b.set_endpoints(vec![heavy, ep(2, "a")]);
        let last_octet = |a: SocketAddr| match a.ip() {
            std::net::IpAddr::V4(v4) => v4.octets()[3],
            std::net::IpAddr::V6(_) => 0,
        };
        let picks: Vec<u8> =
            (0..40).map(|_| last_octet(b.pick(None, None, &[]).unwrap().endpoint.ep.addr)).collect();
        assert_eq!(picks.iter().filter(|p| **p == 1).count(), 30, "3:1 over 40 picks: {picks:?}");
        assert!(picks.windows(4).all(|w| w.contains(&2) || w.iter().all(|p| *p == 1)), "{picks:?}");
    }

    #[test]
    fn failures_eject_and_locality_fails_over() {
        let outlier = OutlierSettings {
            consecutive_failures: 2,
            base_ejection: Duration::from_secs(60),
            max_ejection_percent: 100,
            http_failures: None,
        };
        let b = Balancer::new("c", LbPolicy::RoundRobin, outlier, true, false);
        b.set_endpoints(vec![ep(1, "a"), ep(2, "b")]);
        let local = ("r".to_string(), "a".to_string(), String::new());
        for _ in 0..4 {
            assert_eq!(
                b.pick(None, Some(&local), &[]).unwrap().endpoint.ep.addr.ip().to_string(),
                "10.0.0.1"
            );
        }
        let p = b.pick(None, Some(&local), &[]).unwrap();
        assert!(b.report(&p.endpoint, false).is_none());
        assert!(b.report(&p.endpoint, false).is_some(), "second failure ejects");
        drop(p);
        assert_eq!(b.pick(None, Some(&local), &[]).unwrap().endpoint.ep.addr.ip().to_string(), "10.0.0.2");
    }
}
