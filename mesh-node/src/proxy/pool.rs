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

/// HTTP/1 connections kept idle per endpoint beyond this are closed when returned.
const MAX_IDLE_PER_ENDPOINT: usize = 64;

pub enum Sender {
    Http1(http1::SendRequest<Body>),
    Http2(http2::SendRequest<Body>),
}

impl Sender {
    pub async fn send(
        &mut self,
        req: hyper::Request<Body>,
    ) -> hyper::Result<hyper::Response<hyper::body::Incoming>> {
        match self {
            Sender::Http1(s) => s.send_request(req).await,
            Sender::Http2(s) => s.send_request(req).await,
        }
    }
}

#[derive(Default)]
pub struct Pool {
    http1: Mutex<HashMap<SocketAddr, Vec<http1::SendRequest<Body>>>>,
    http2: Mutex<HashMap<SocketAddr, http2::SendRequest<Body>>>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let h1: usize = self.http1.lock().map_or(0, |c| c.values().map(Vec::len).sum());
        let h2 = self.http2.lock().map_or(0, |c| c.len());
        write!(f, "Pool {{ http1: {h1}, http2: {h2} }}")
    }
}

impl Pool {
    /// A connection to `addr` that can take a request now, if one is open.
    pub fn get(&self, addr: SocketAddr, h2: bool) -> Option<Sender> {
        if h2 {
            let mut conns = self.http2.lock().expect("pool lock");
            match conns.get(&addr) {
                Some(s) if !s.is_closed() && s.is_ready() => return Some(Sender::Http2(s.clone())),
                Some(_) => {
                    conns.remove(&addr);
                }
                None => {}
            }
            return None;
        }
        let mut conns = self.http1.lock().expect("pool lock");
        let idle = conns.get_mut(&addr)?;
        idle.retain(|s| !s.is_closed());
        let ready = idle.iter().position(http1::SendRequest::is_ready)?;
        Some(Sender::Http1(idle.swap_remove(ready)))
    }

    /// Keeps `sender` for later requests. An HTTP/1 connection returned while it still streams
    /// a response is skipped by [`Pool::get`] until it is done.
    pub fn put(&self, addr: SocketAddr, sender: Sender) {
        match sender {
            Sender::Http2(s) => {
                self.http2.lock().expect("pool lock").insert(addr, s);
            }
            Sender::Http1(s) => {
                let mut conns = self.http1.lock().expect("pool lock");
                let idle = conns.entry(addr).or_default();
                if idle.len() < MAX_IDLE_PER_ENDPOINT {
                    idle.push(s);
                }
            }
        }
    }
}
