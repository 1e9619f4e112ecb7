//! Draining: how this process lets go of its connections when it stops serving (SIGTERM, or a
//! new mesh-node took its listeners over).
//!
//! Every proxied connection runs [`Drain::tracked`], so the process knows how many are open
//! and can end the stragglers at the deadline. HTTP servers run [`Drain::serve`]: once
//! draining starts, HTTP/2 connections get a GOAWAY at once (clients open new connections —
//! to the new process — for new requests; streams in flight finish); HTTP/1 responses carry
//! `Connection: close` ([`Drain::close_after`]), and a connection idle past
//! [`HTTP1_IDLE_GRACE`] is closed. Long-lived TCP and tunnel streams are left to end by
//! themselves until the deadline.

use std::{
    future::Future,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use prometheus_client::{metrics::gauge::Gauge, registry::Registry};
use tokio::sync::{Notify, watch};

/// How long an HTTP/1 connection may still bring a request after draining starts: a busy
/// keep-alive client gets `Connection: close` on its next response well within it; closing
/// an idle connection any earlier races a request the client may be sending right then.
pub const HTTP1_IDLE_GRACE: Duration = Duration::from_secs(1);

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum State {
    Serving,
    /// `why`: "SIGTERM", "handed over to pid N".
    Draining {
        why: String,
    },
    /// The deadline passed: what was still open has been closed.
    Ended {
        why: String,
    },
}

#[derive(Clone)]
pub struct Drain {
    inner: Arc<Inner>,
}

struct Inner {
    state: watch::Sender<State>,
    /// Mirrors `state != Serving` for the per-response check, without the watch's lock.
    draining_now: AtomicBool,
    /// Connections open in this process (also `nodemesh_connections_open`).
    open: Gauge,
    draining: Gauge,
    all_closed: Notify,
}

impl Default for Drain {
    fn default() -> Self {
        Drain {
            inner: Arc::new(Inner {
                state: watch::channel(State::Serving).0,
                draining_now: AtomicBool::new(false),
                open: Gauge::default(),
                draining: Gauge::default(),
                all_closed: Notify::new(),
            }),
        }
    }
}

impl Drain {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "nodemesh_connections_open",
            "Client connections this mesh-node process is serving (proxied, inbound, tunnel)",
            self.inner.open.clone(),
        );
        registry.register(
            "nodemesh_draining",
            "1 while this process drains (SIGTERM, or a new mesh-node took over its listeners)",
            self.inner.draining.clone(),
        );
    }

    pub fn state(&self) -> State {
        self.inner.state.borrow().clone()
    }

    pub fn is_draining(&self) -> bool {
        self.inner.draining_now.load(Ordering::Acquire)
    }

    pub fn open_connections(&self) -> i64 {
        self.inner.open.get()
    }

    /// Starts draining (once; later calls keep the first reason).
    pub fn start(&self, why: &str) {
        let started = self.inner.state.send_if_modified(|s| match s {
            State::Serving => {
                *s = State::Draining { why: why.to_string() };
                true
            }
            _ => false,
        });
        if started {
            self.inner.draining_now.store(true, Ordering::Release);
            self.inner.draining.set(1);
            tracing::info!(open = self.open_connections(), "draining: {why}");
        }
    }

    /// Resolves once draining has started.
    pub async fn started(&self) {
        let mut rx = self.inner.state.subscribe();
        let _ = rx.wait_for(|s| *s != State::Serving).await;
    }

    async fn ended(&self) {
        let mut rx = self.inner.state.subscribe();
        let _ = rx.wait_for(|s| matches!(s, State::Ended { .. })).await;
    }

    /// Waits until no connection is open or `deadline` passes; then ends every connection
    /// still open. Returns how many were cut.
    pub async fn finish(&self, deadline: Instant) -> i64 {
        let all_closed = async {
            loop {
                let notified = self.inner.all_closed.notified();
                if self.open_connections() <= 0 {
                    return;
                }
                notified.await;
            }
        };
        let _ = tokio::time::timeout_at(deadline.into(), all_closed).await;
        let cut = self.open_connections().max(0);
        self.inner.state.send_modify(|s| {
            let why = match s {
                State::Draining { why } | State::Ended { why } => why.clone(),
                State::Serving => "deadline".to_string(),
            };
            *s = State::Ended { why };
        });
        if cut > 0 {
            tracing::warn!(cut, "drain deadline passed: closing the connections still open");
        }
        cut
    }

    /// Runs one connection's work, counted as open until it returns; dropped at the drain
    /// deadline if it is still running then.
    pub fn tracked<F: Future<Output = ()>>(&self, work: F) -> impl Future<Output = ()> + use<F> {
        let open = OpenGuard::new(self);
        let this = self.clone();
        async move {
            let _open = open;
            tokio::select! {
                () = work => {}
                () = this.ended() => {}
            }
        }
    }

    /// Serves a hyper server connection, shutting it down gracefully once draining starts:
    /// at once for HTTP/2 (GOAWAY), after [`HTTP1_IDLE_GRACE`] for HTTP/1 (closed if idle
    /// then, else after the response in progress).
    pub async fn serve<C, T>(&self, conn: C, h2: bool, graceful_shutdown: impl FnOnce(Pin<&mut C>)) -> T
    where
        C: Future<Output = T>,
    {
        self.serve_while(conn, h2, std::future::pending(), graceful_shutdown).await
    }

    /// [`Drain::serve`], also shut down gracefully (at once) when `ended` completes: what the
    /// connection's requests are passed to has gone, so its client must open a new one.
    pub async fn serve_while<C, T>(
        &self,
        conn: C,
        h2: bool,
        ended: impl Future<Output = ()>,
        graceful_shutdown: impl FnOnce(Pin<&mut C>),
    ) -> T
    where
        C: Future<Output = T>,
    {
        let mut conn = std::pin::pin!(conn);
        tokio::select! {
            out = conn.as_mut() => return out,
            () = async {
                self.started().await;
                if !h2 {
                    tokio::time::sleep(HTTP1_IDLE_GRACE).await;
                }
            } => {}
            () = ended => {}
        }
        graceful_shutdown(conn.as_mut());
        conn.await
    }

    /// Whether an HTTP/1 response should carry `Connection: close`: the client then opens its
    /// next request's connection on whatever process serves by then.
    pub fn close_after(&self, response: &mut hyper::http::response::Parts) {
        if self.is_draining() && response.status != hyper::http::StatusCode::SWITCHING_PROTOCOLS {
            response
                .headers
                .insert(hyper::http::header::CONNECTION, hyper::http::HeaderValue::from_static("close"));
        }
    }
}

/// One open connection; created before the work is first polled, so work dropped unpolled
/// is not left counted.
struct OpenGuard(Drain);

impl OpenGuard {
    fn new(drain: &Drain) -> OpenGuard {
        drain.inner.open.inc();
        OpenGuard(drain.clone())
    }
}

impl Drop for OpenGuard {
    fn drop(&mut self) {
        if self.0.inner.open.dec() <= 1 {
            self.0.inner.all_closed.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn finish_waits_for_tracked_work_and_cuts_it_at_the_deadline() {
        let drain = Drain::default();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let short = tokio::spawn(drain.tracked(async move {
            let _ = rx.await;
        }));
        let long = tokio::spawn(drain.tracked(std::future::pending()));
        assert_eq!(drain.open_connections(), 2);
        drain.start("test");
        assert!(drain.is_draining());
        let _ = tx.send(());
        short.await.unwrap();
        assert_eq!(drain.open_connections(), 1);
        let cut = drain.finish(Instant::now() + Duration::from_millis(50)).await;
        assert_eq!(cut, 1);
        long.await.unwrap();
        assert_eq!(drain.open_connections(), 0);
        assert!(matches!(drain.state(), State::Ended { .. }));
    }

    #[tokio::test]
    async fn finish_returns_at_once_when_nothing_is_open() {
        let drain = Drain::default();
        drain.start("test");
        let started = Instant::now();
        assert_eq!(drain.finish(Instant::now() + Duration::from_secs(10)).await, 0);
        assert!(started.elapsed() < Duration::from_secs(5));
    }
}
