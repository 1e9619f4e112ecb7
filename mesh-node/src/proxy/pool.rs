//! Upstream HTTP connections of one source workload, reused across requests: HTTP/1.1
//! connections one request at a time, HTTP/2 connections multiplexed.
//!
//! Per workload, because the upstream socket is dialled from inside the workload's netns (the
//! server sees the pod's own address). Not hyper-util's pooled client: it takes `:authority`
//! from the URI it dials, and we must dial an endpoint address while keeping the client's
//! `Host`/`:authority` unchanged (LESSONS.md 6).

use std::{collections::HashMap, net::SocketAddr, sync::Mutex};

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use hyper::client::conn::{http1, http2};

pub type Body = BoxBody<Bytes, hyper::Error>;

/// A body of bytes the proxy holds (a replayed request, an answer of its own).
pub fn full(bytes: impl Into<Bytes>) -> Body {
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

/// Idle HTTP/1 connections per endpoint, each with the requests it has carried.
type Http1Idle = HashMap<SocketAddr, Vec<(http1::SendRequest<Body>, u32)>>;

#[derive(Default)]
pub struct Pool {
    http1: Mutex<Http1Idle>,
    /// One multiplexed connection per endpoint, and the requests it has carried.
    http2: Mutex<HashMap<SocketAddr, (http2::SendRequest<Body>, u32)>>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let h1: usize = self.http1.lock().map_or(0, |c| c.values().map(Vec::len).sum());
        let h2 = self.http2.lock().map_or(0, |c| c.len());
        write!(f, "Pool {{ http1: {h1}, http2: {h2} }}")
    }
}

impl Pool {
    /// A connection to `addr` that can take a request now, if one is open. `limit` is the
    /// cluster's requests per connection: an HTTP/2 connection that reaches it with this
    /// request leaves the pool (its streams finish; new requests open a new connection).
    pub fn get(&self, addr: SocketAddr, h2: bool, limit: Option<u32>) -> Option<Sender> {
        if h2 {
            let mut conns = self.http2.lock().expect("pool lock");
            let (s, uses) = conns.get_mut(&addr)?;
            if s.is_closed() || !s.is_ready() {
                conns.remove(&addr);
                return None;
            }
            *uses += 1;
            let sender = Sender::Http2(s.clone(), *uses);
            if limit.is_some_and(|max| *uses >= max) {
                conns.remove(&addr);
            }
            return Some(sender);
        }
        let mut conns = self.http1.lock().expect("pool lock");
        let idle = conns.get_mut(&addr)?;
        idle.retain(|(s, _)| !s.is_closed());
        let ready = idle.iter().position(|(s, _)| s.is_ready())?;
        let (s, uses) = idle.swap_remove(ready);
        Some(Sender::Http1(s, uses))
    }

    /// Keeps `sender`, which has just carried one more request, for later requests, unless it
    /// has carried `limit`. An HTTP/1 connection returned while it still streams a response
    /// is skipped by [`Pool::get`] until it is done.
    pub fn put(&self, addr: SocketAddr, sender: Sender, limit: Option<u32>) {
        match sender {
            // A pooled HTTP/2 connection was counted when it was taken; a new one enters here.
            Sender::Http2(s, 0) if limit.is_none_or(|max| max > 1) => {
                self.http2.lock().expect("pool lock").entry(addr).or_insert((s, 1));
            }
            Sender::Http2(..) => {}
            Sender::Http1(s, uses) => {
                let uses = uses + 1;
                if limit.is_some_and(|max| uses >= max) {
                    return; // dropped: the connection closes once idle
                }
                let mut conns = self.http1.lock().expect("pool lock");
                let idle = conns.entry(addr).or_default();
                if idle.len() < MAX_IDLE_PER_ENDPOINT {
                    idle.push((s, uses));
                }
            }
        }
    }
}
