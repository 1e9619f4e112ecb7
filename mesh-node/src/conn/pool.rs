//! Upstream HTTP connections of one source workload, reused across requests: HTTP/1.1
//! connections one request at a time, HTTP/2 connections multiplexed.
//!
//! Per workload, because the upstream socket is dialled from inside the workload's netns (the
//! server sees the pod's own address). Not hyper-util's pooled client: it takes `:authority`
//! from the URI it dials, and we must dial an endpoint address while keeping the client's
//! `Host`/`:authority` unchanged (servers route and sign on it).

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use hyper::client::conn::{http1, http2};

use crate::policy::{conn_limits::Evictable, lb::Balancer};

pub(crate) type Body = BoxBody<Bytes, hyper::Error>;

/// A body of bytes the proxy holds (a replayed request, an answer of its own).
pub(crate) fn full(bytes: impl Into<Bytes>) -> Body {
    use http_body_util::BodyExt;
    http_body_util::Full::new(bytes.into()).map_err(|e| match e {}).boxed()
}

/// HTTP/1 connections kept idle per endpoint beyond this are closed when returned.
const MAX_IDLE_PER_ENDPOINT: usize = 64;

/// One upstream connection's request handle, with how many requests it has carried (for
/// DestinationRule `maxRequestsPerConnection`). A new connection has carried none.
pub enum Sender {
    Http1(http1::SendRequest<Body>, u32),
    Http2(http2::SendRequest<Body>, u32),
}

impl Sender {
    pub async fn send(
        &mut self,
        req: hyper::Request<Body>,
    ) -> hyper::Result<hyper::Response<hyper::body::Incoming>> {
        match self {
            Sender::Http1(s, _) => s.send_request(req).await,
            Sender::Http2(s, _) => s.send_request(req).await,
        }
    }
}

/// Idle HTTP/1 connections per endpoint.
type Http1Idle = HashMap<SocketAddr, Vec<Arc<IdleHttp1>>>;

/// An idle HTTP/1 connection in a pool, with the requests it has carried. Shared with the
/// cluster's connection limits, which may close it (drop its handle) for a request waiting
/// under `maxConnections`: hyper then closes the connection once any response still
/// streaming on it is done.
struct IdleHttp1 {
    sender: Mutex<Option<http1::SendRequest<Body>>>,
    uses: u32,
    /// When its idle timeout (the cluster's http.idleTimeout) closes it, if it has one.
    expires: Option<Instant>,
}

impl IdleHttp1 {
    /// The handle, if nobody took it (the pool for a request, or an eviction).
    fn take(&self) -> Option<http1::SendRequest<Body>> {
        self.sender.lock().expect("idle lock").take()
    }

    /// Still worth keeping at `now`: not taken, not closed by the server, not expired. A
    /// connection dropped from the pool closes (the limits only hold it weakly).
    fn alive(&self, now: Instant) -> bool {
        self.expires.is_none_or(|at| now < at)
            && self.sender.lock().expect("idle lock").as_ref().is_some_and(|s| !s.is_closed())
    }
}

/// How often a pool drops what its idle timeouts expired and what servers closed, so
/// endpoints that are gone leave nothing behind; requests never see an expired connection
/// whatever the sweep's timing ([`Pool::get`] checks too).
const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// Drops the dead entries of `pool` every [`SWEEP_EVERY`] until the pool itself goes.
async fn sweep_http1(pool: std::sync::Weak<Mutex<Http1Idle>>) {
    let mut every = tokio::time::interval(SWEEP_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        let Some(pool) = pool.upgrade() else { return };
        let now = Instant::now();
        pool.lock().expect("pool lock").retain(|_, idle| {
            idle.retain(|c| c.alive(now));
            !idle.is_empty()
        });
    }
}

impl Evictable for IdleHttp1 {
    fn is_idle(&self) -> bool {
        self.sender.lock().expect("idle lock").is_some()
    }

    fn evict(&self) -> bool {
        self.take().is_some()
    }
}

/// The pooled HTTP/2 connection to one endpoint.
struct Http2Entry {
    sender: http2::SendRequest<Body>,
    /// Requests it has carried.
    uses: u32,
    /// When a request last took it (for the cluster's http.idleTimeout).
    last_used: Instant,
    /// Which connection this is, so an idle timer never removes a newer one.
    id: u64,
}

type Http2Pooled = Arc<Mutex<HashMap<SocketAddr, Http2Entry>>>;

#[derive(Default)]
pub struct Pool {
    http1: Arc<Mutex<Http1Idle>>,
    /// Whether [`sweep_http1`] runs for `http1` (started with the first idle connection).
    sweeping: std::sync::atomic::AtomicBool,
    /// One multiplexed connection per endpoint.
    http2: Http2Pooled,
    next_id: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let h1: usize = self.http1.lock().map_or(0, |c| c.values().map(Vec::len).sum());
        let h2 = self.http2.lock().map_or(0, |c| c.len());
        write!(f, "Pool {{ http1: {h1}, http2: {h2} }}")
    }
}

impl Pool {
    /// A connection to `addr` (of `cluster`) that can take a request now, if one is open. At
    /// the cluster's requests per connection, an HTTP/2 connection that reaches it with this
    /// request leaves the pool (its streams finish; new requests open a new connection).
    pub fn get(&self, addr: SocketAddr, h2: bool, cluster: &Balancer) -> Option<Sender> {
        let limit = cluster.limits.max_requests_per_connection;
        if h2 {
            let mut conns = self.http2.lock().expect("pool lock");
            let entry = conns.get_mut(&addr)?;
            if entry.sender.is_closed() || !entry.sender.is_ready() {
                conns.remove(&addr);
                return None;
            }
            entry.uses += 1;
            entry.last_used = Instant::now();
            let sender = Sender::Http2(entry.sender.clone(), entry.uses);
            if limit.is_some_and(|max| entry.uses >= max) {
                conns.remove(&addr);
            }
            return Some(sender);
        }
        let mut conns = self.http1.lock().expect("pool lock");
        let idle = conns.get_mut(&addr)?;
        // Gone: closed by the server, by a request that needed its place, or idle too long.
        let now = Instant::now();
        idle.retain(|c| c.alive(now));
        let ready =
            |c: &IdleHttp1| c.sender.lock().expect("idle lock").as_ref().is_some_and(|s| s.is_ready());
        let ready = idle.iter().position(|c| ready(c))?;
        let conn = idle.swap_remove(ready);
        conn.take().map(|s| Sender::Http1(s, conn.uses))
    }

    /// Keeps `sender`, which has just carried one more request, for later requests, unless it
    /// has carried the cluster's requests per connection. An HTTP/1 connection returned while
    /// it still streams a response is skipped by [`Pool::get`] until it is done.
    pub fn put(&self, addr: SocketAddr, sender: Sender, cluster: &Balancer) {
        let limit = cluster.limits.max_requests_per_connection;
        let idle_timeout = cluster.connection.http_idle_timeout;
        match sender {
            // A pooled HTTP/2 connection was counted when it was taken; a new one enters here.
            Sender::Http2(sender, 0) if limit.is_none_or(|max| max > 1) => {
                let id = self.next_id.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let entry = Http2Entry { sender, uses: 1, last_used: Instant::now(), id };
                let mut conns = self.http2.lock().expect("pool lock");
                if conns.contains_key(&addr) {
                    return;
                }
                conns.insert(addr, entry);
                if let Some(idle) = idle_timeout {
                    tokio::spawn(retire_idle_http2(Arc::clone(&self.http2), addr, id, idle));
                }
            }
            Sender::Http2(..) => {}
            Sender::Http1(s, uses) => {
                let uses = uses + 1;
                if limit.is_some_and(|max| uses >= max) {
                    return; // dropped: the connection closes once idle
                }
                // A request that takes it puts a new entry back, with a new expiry.
                let expires = idle_timeout.map(|idle| Instant::now() + idle);
                let conn = Arc::new(IdleHttp1 { sender: Mutex::new(Some(s)), uses, expires });
                {
                    let mut conns = self.http1.lock().expect("pool lock");
                    let idle = conns.entry(addr).or_default();
                    if idle.len() >= MAX_IDLE_PER_ENDPOINT {
                        return;
                    }
                    idle.push(Arc::clone(&conn));
                }
                if !self.sweeping.swap(true, std::sync::atomic::Ordering::Relaxed) {
                    tokio::spawn(sweep_http1(Arc::downgrade(&self.http1)));
                }
                if cluster.limits.max_connections.is_some() {
                    cluster.connections.track_idle(conn);
                }
            }
        }
    }
}

/// Removes the pooled HTTP/2 connection `id` to `addr` once no request has taken it for
/// `idle` (DestinationRule http.idleTimeout); streams still open on it finish, then hyper
/// closes it.
async fn retire_idle_http2(pool: Http2Pooled, addr: SocketAddr, id: u64, idle: Duration) {
    let mut deadline = Instant::now() + idle;
    loop {
        tokio::time::sleep_until(deadline.into()).await;
        let mut conns = pool.lock().expect("pool lock");
        match conns.get(&addr) {
            Some(entry) if entry.id == id => {
                let due = entry.last_used + idle;
                if Instant::now() >= due {
                    conns.remove(&addr);
                    return;
                }
                deadline = due;
            }
            // Replaced or gone already.
            _ => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use hyper::{Response, server::conn::http1 as server, service::service_fn};
    use hyper_util::rt::TokioIo;

    use super::*;
    use crate::policy::lb::{Balancer, LbPolicy, OutlierSettings};

    fn cluster(idle: Option<Duration>) -> Balancer {
        let mut b = Balancer::new("c", LbPolicy::RoundRobin, OutlierSettings::default(), false, false);
        b.connection.http_idle_timeout = idle;
        b
    }

    /// An HTTP/1 client connection to a real hyper server over an in-memory pipe.
    async fn connection() -> Sender {
        let (client, server_io) = tokio::io::duplex(4096);
        tokio::spawn(async move {
            let answer =
                service_fn(|_req| async { Ok::<_, std::convert::Infallible>(Response::new(full("ok"))) });
            let _ = server::Builder::new().serve_connection(TokioIo::new(server_io), answer).await;
        });
        let (mut sender, conn) = http1::handshake(TokioIo::new(client)).await.unwrap();
        tokio::spawn(conn);
        // As after a first exchange: the pool keeps connections that carried a request.
        let answer = sender.send_request(hyper::Request::new(full(""))).await.unwrap();
        assert_eq!(answer.status(), 200);
        Sender::Http1(sender, 0)
    }

    fn entries(pool: &Pool) -> usize {
        pool.http1.lock().unwrap().values().map(Vec::len).sum()
    }

    #[tokio::test]
    async fn idle_connections_expire_and_the_sweep_leaves_nothing_for_gone_endpoints() {
        let pool = Pool::default();
        let addr: SocketAddr = "10.0.0.1:80".parse().unwrap();
        let c = cluster(Some(Duration::from_millis(200)));
        pool.put(addr, connection().await, &c);
        assert!(pool.get(addr, false, &c).is_some(), "reused while fresh");
        pool.put(addr, connection().await, &c);
        // Two sweeps later.
        tokio::time::sleep(SWEEP_EVERY * 2 + Duration::from_millis(500)).await;
        // The sweep dropped it, and a request would not have been given it either way.
        assert_eq!(entries(&pool), 0, "an expired connection stayed pooled");
        assert!(pool.http1.lock().unwrap().is_empty(), "the gone endpoint's key stayed");
        assert!(pool.get(addr, false, &c).is_none());
    }

    #[tokio::test]
    async fn expiry_is_checked_when_taking_not_only_by_the_sweep() {
        let pool = Pool::default();
        let addr: SocketAddr = "10.0.0.1:80".parse().unwrap();
        let c = cluster(Some(Duration::from_millis(100)));
        pool.put(addr, connection().await, &c);
        // Past the timeout but before the next sweep (the first ran at once).
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(pool.get(addr, false, &c).is_none(), "an expired connection was handed out");
    }

    #[tokio::test]
    async fn without_an_idle_timeout_a_connection_stays_through_sweeps() {
        let pool = Pool::default();
        let addr: SocketAddr = "10.0.0.1:80".parse().unwrap();
        let c = cluster(None);
        pool.put(addr, connection().await, &c);
        tokio::time::sleep(SWEEP_EVERY * 2 + Duration::from_millis(500)).await;
        assert!(pool.get(addr, false, &c).is_some());
    }

    #[test]
    fn an_unset_idle_timeout_is_envoys_hour() {
        assert_eq!(
            crate::policy::connection_settings::ConnectionSettings::default().http_idle_timeout,
            Some(Duration::from_secs(3600))
        );
    }
}
