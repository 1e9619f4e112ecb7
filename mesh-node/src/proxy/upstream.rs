//! The far side of a proxied connection: a TCP connection (to a pod, from the source pod's
//! netns or delivered into the destination pod's), or a stream through a node's tunnel.

use std::{
    io,
    pin::Pin,
    task::{Context, Poll},
};

use tokio::{
    io::{AsyncRead, AsyncWrite, DuplexStream, ReadBuf},
    net::TcpStream,
};

use prometheus_client::metrics::counter::Counter;

use crate::{
    conn::relay::{self, Relayed},
    inbound::guard::Guarded,
    tunnel::client::TunnelStream,
};

pub enum Upstream {
    Tcp(TcpStream),
    Tunnel(TunnelStream),
    /// To a pod of this node whose policies judge each HTTP request: the other end is served
    /// by `inbound::http`, in this process.
    Judged(DuplexStream),
    /// Delivered into a pod of this node, re-checked against its policy when that changes.
    Guarded(Guarded<TcpStream>),
}

impl Upstream {
    /// Reached over a meshed path (the tunnel, or delivery into a meshed pod of this node).
    pub fn secured(&self) -> bool {
        !matches!(self, Upstream::Tcp(_))
    }

    /// Relays `client` to this upstream until both directions have finished (or, with `idle`,
    /// until neither has moved a byte for that long); on error resets both sides.
    pub async fn relay(
        self,
        client: TcpStream,
        sent: &Counter,
        received: &Counter,
        idle: Option<std::time::Duration>,
    ) -> Relayed {
        match self {
            Upstream::Tcp(upstream) => relay::relay_tcp(client, upstream, sent, received, idle).await,
            // Dropping a tunnel stream that did not finish resets it (RST_STREAM).
            Upstream::Tunnel(stream) => relay::relay_stream_idle(client, stream, sent, received, idle).await,
            Upstream::Judged(stream) => relay::relay_stream_idle(client, stream, sent, received, idle).await,
            Upstream::Guarded(stream) => relay::relay_stream_idle(client, stream, sent, received, idle).await,
        }
    }
}

impl AsyncRead for Upstream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Upstream::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Upstream::Tunnel(s) => Pin::new(s).poll_read(cx, buf),
            Upstream::Judged(s) => Pin::new(s).poll_read(cx, buf),
            Upstream::Guarded(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Upstream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Upstream::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Upstream::Tunnel(s) => Pin::new(s).poll_write(cx, buf),
            Upstream::Judged(s) => Pin::new(s).poll_write(cx, buf),
            Upstream::Guarded(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Upstream::Tcp(s) => Pin::new(s).poll_flush(cx),
            Upstream::Tunnel(s) => Pin::new(s).poll_flush(cx),
            Upstream::Judged(s) => Pin::new(s).poll_flush(cx),
            Upstream::Guarded(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Upstream::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Upstream::Tunnel(s) => Pin::new(s).poll_shutdown(cx),
            Upstream::Judged(s) => Pin::new(s).poll_shutdown(cx),
            Upstream::Guarded(s) => Pin::new(s).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Upstream::Tcp(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Upstream::Tunnel(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Upstream::Judged(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Upstream::Guarded(s) => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Upstream::Tcp(s) => s.is_write_vectored(),
            Upstream::Tunnel(s) => s.is_write_vectored(),
            Upstream::Judged(s) => s.is_write_vectored(),
            Upstream::Guarded(s) => s.is_write_vectored(),
        }
    }
}
