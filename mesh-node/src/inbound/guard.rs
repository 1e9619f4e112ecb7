//! Connections decided once, at connect time, must not outlive a policy that would now refuse
//! them. A [`Guarded`] stream re-decides whenever this node's Workloads (their
//! AuthorizationPolicies) have changed since it last looked — on its next read or write —
//! and fails with a reset when its connection is no longer allowed, or when its workload now
//! judges HTTP request by request (the client reconnects and is judged that way).

use std::{
    io,
    net::{IpAddr, SocketAddr},
    pin::Pin,
    sync::{Arc, atomic::Ordering},
    task::{Context, Poll},
};

use mesh_control::{ca::SpiffeId, workload::WorkloadKey};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::authz::{Authorizer, Peer, Verdict};

/// What a connection was allowed as.
pub struct Decided {
    pub authorizer: Arc<Authorizer>,
    pub workload: WorkloadKey,
    pub identity: Option<SpiffeId>,
    pub source_ip: IpAddr,
    pub destination: SocketAddr,
}

impl Decided {
    fn version(&self) -> u64 {
        self.authorizer.cache.as_ref().map_or(0, |c| c.workloads_version.load(Ordering::Acquire))
    }

    fn still_allowed(&self) -> bool {
        let peer = Peer {
            identity: self.identity.as_ref(),
            source_ip: self.source_ip,
            destination: self.destination,
        };
        !self.authorizer.needs_http(&self.workload)
            && self.authorizer.connection(&self.workload, &peer) == Verdict::Allow
    }
}

pub struct Guarded<S> {
    inner: S,
    decided: Decided,
    seen: u64,
    revoked: bool,
}

impl<S> Guarded<S> {
    pub fn new(inner: S, decided: Decided) -> Guarded<S> {
        let seen = decided.version();
        Guarded { inner, decided, seen, revoked: false }
    }

    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// Re-decides if the policies changed; an error once the connection lost its allowance.
    fn check(&mut self) -> io::Result<()> {
        if !self.revoked {
            let now = self.decided.version();
            if now != self.seen {
                self.seen = now;
                if !self.decided.still_allowed() {
                    tracing::info!(
                        workload = %self.decided.workload, source = %self.decided.source_ip,
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

impl<S: AsyncRead + Unpin> AsyncRead for Guarded<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.check()?;
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Guarded<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.check()?;
        Pin::new(&mut this.inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}
