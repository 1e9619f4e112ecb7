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

use crate::{inbound::guard::Guarded, tunnel::client::TunnelStream};

pub enum Upstream {
    Tcp(TcpStream),
    Tunnel(TunnelStream),
    /// To a pod of this node whose policies judge each HTTP request: the other end is served
    /// by `inbound::http`, in this process.
    Judged(DuplexStream),
    /// Delivered into a pod of this node, re-checked against its policy when that changes.
    Guarded(Guarded<TcpStream>),
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
