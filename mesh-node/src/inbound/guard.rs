//! Connections decided once, at connect time, must not outlive a policy that would now refuse
//! them. A [`Guarded`] stream re-decides whenever this node's Workloads (their
//! AuthorizationPolicies) have changed since it last looked — on its next read or write —
//! and fails with a reset when its connection is no longer allowed, or when its workload now
//! judges HTTP request by request (the client reconnects and is judged that way).

use std::{
    io,
    pin::Pin,
    sync::atomic::Ordering,
    task::{Context, Poll},
};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::{
    authz::{Inbound, Verdict},
    telemetry::{access_log::ConnectionLog, metrics::ConnectionCounters},
};

/// The version of the node's Workloads (0 without a control plane: nothing ever changes).
fn version(connection: &Inbound) -> u64 {
    connection.authorizer.cache.as_ref().map_or(0, |c| c.workloads_version.load(Ordering::Acquire))
}

pub struct Guarded<S> {
    inner: S,
    connection: Inbound,
    seen: u64,
    revoked: bool,
    /// The destination's side of a connection no one else counts for it (same-node
    /// delivery). Boxed: most guarded streams have none, and the data path's `Upstream` stays
    /// small.
    tally: Option<Box<Tally>>,
}

/// The pod's side of a same-node connection: its TCP series (what the pod sends is `sent`)
/// and its server-side access-log line, written with this connection's bytes when it ends.
struct Tally {
    counters: ConnectionCounters,
    log: Option<(ConnectionLog, std::net::SocketAddr)>,
    from_pod: u64,
    to_pod: u64,
}

impl<S> Guarded<S> {
    pub fn new(inner: S, connection: Inbound) -> Guarded<S> {
        let seen = version(&connection);
        Guarded { inner, connection, seen, revoked: false, tally: None }
    }

    /// Counting the bytes that pass as the destination's TCP series, closed with the stream;
    /// and, if the pod's server-side access logs are on, its line for the connection (`pod`:
    /// the address delivered to).
    pub fn tallied(
        mut self,
        counters: ConnectionCounters,
        log: Option<ConnectionLog>,
        pod: std::net::SocketAddr,
    ) -> Guarded<S> {
        let log = log.map(|l| (l, pod));
        self.tally = Some(Box::new(Tally { counters, log, from_pod: 0, to_pod: 0 }));
        self
    }

    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// Re-decides if the policies changed; an error once the connection lost its allowance.
    fn check(&mut self) -> io::Result<()> {
        if !self.revoked {
            let now = version(&self.connection);
            if now != self.seen {
                self.seen = now;
                let policies = self.connection.current();
                if policies.per_request() || self.connection.decide(&policies, None) != Verdict::Allow {
                    tracing::info!(
                        workload = %self.connection.workload, source = %self.connection.source_ip,
                        "closing a connection its workload's AuthorizationPolicy no longer allows as it is"
                    );
                    self.revoked = true;
                }
            }
        }
        if self.revoked {
            Err(io::Error::new(io::ErrorKind::ConnectionReset, "closed: AuthorizationPolicy changed"))
        } else {
            Ok(())
        }
    }
}

impl<S> Drop for Guarded<S> {
    fn drop(&mut self) {
        if let Some(tally) = self.tally.take() {
            tally.counters.closed();
            if let Some((log, pod)) = tally.log {
                // Same-node delivery is mesh-node proving both identities itself: mTLS's case.
                // (A connection a policy change closed has no flag, as an RBAC denial has none
                // in Envoy: the mesh-node log line says why.)
                log.finish("-", Some((pod, true)), (tally.to_pod, tally.from_pod));
            }
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Guarded<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.check()?;
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let (Poll::Ready(Ok(())), Some(tally)) = (&polled, &mut this.tally) {
            let n = (buf.filled().len() - before) as u64;
            tally.counters.sent.inc_by(n);
            tally.from_pod += n;
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Guarded<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.check()?;
        let polled = Pin::new(&mut this.inner).poll_write(cx, buf);
        if let (Poll::Ready(Ok(n)), Some(tally)) = (&polled, &mut this.tally) {
            tally.counters.received.inc_by(*n as u64);
            tally.to_pod += *n as u64;
        }
        polled
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}
