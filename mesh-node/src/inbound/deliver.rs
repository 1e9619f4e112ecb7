//! Delivery: the last hop of an inbound connection, from mesh-node into the destination pod.
//!
//! The socket is created inside the pod's netns and bound (IP_TRANSPARENT) to the *client
//! pod's* address, so the application sees who really called — as without a mesh — and
//! connections from many clients never funnel through one source address (no `127.0.0.6`,
//! no ephemeral-port exhaustion behind one IP). The delivery mark brings the answers back to
//! this socket (see [`super::routing`]).
//!
//! The pod's inbound capture (sk_lookup) must let this connection through to the
//! application, and it only sees the SYN's addresses and ports. So mesh-node picks the source
//! port itself, files the 4-tuple with the capture just before connecting, and withdraws it
//! once the connect is done. The socket has SO_REUSEADDR: the same client address and port
//! may carry connections to different destinations, and only a clash of the whole 4-tuple
//! (EADDRNOTAVAIL) makes it pick another port.

use std::{
    io,
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use tokio::net::{TcpSocket, TcpStream};

use crate::{capture::Capture, netns::NetnsThread};

/// Source ports tried before giving up (each clash is a random port already in use).
const PORT_ATTEMPTS: usize = 16;
/// Where source ports are picked from: clear of the well-known ports.
const PORTS: std::ops::RangeInclusive<u16> = 10_000..=65_535;

pub struct Delivery {
    pub capture: Arc<Capture>,
    /// `SO_MARK` of delivery sockets.
    pub mark: u32,
}

impl Delivery {
    /// Connects to `to` from inside `netns` as `from` (a client of the other family, or none:
    /// as the pod itself).
    pub async fn connect(
        &self,
        netns: &NetnsThread,
        from: Option<IpAddr>,
        to: SocketAddr,
        timeout: Duration,
    ) -> io::Result<TcpStream> {
        let from = from.filter(|ip| ip.is_ipv4() == to.is_ipv4()).unwrap_or(to.ip());
        let mut last = None;
        for _ in 0..PORT_ATTEMPTS {
            let source = SocketAddr::new(from, fastrand::u16(PORTS));
            let filed = self.capture.file_delivery(source, to).map_err(io::Error::other)?;
            let result = self.connect_from(netns, source, to, timeout).await;
            self.capture.withdraw_delivery(filed);
            match result {
                Err(e)
                    if e.kind() == io::ErrorKind::AddrInUse
                        || e.kind() == io::ErrorKind::AddrNotAvailable =>
                {
                    last = Some(e);
                }
                other => return other,
            }
        }
        Err(last.unwrap_or_else(|| io::Error::from(io::ErrorKind::AddrNotAvailable)))
    }

    async fn connect_from(
        &self,
        netns: &NetnsThread,
        source: SocketAddr,
        to: SocketAddr,
        timeout: Duration,
    ) -> io::Result<TcpStream> {
        let mark = self.mark;
        let socket = netns
            .run(move || -> io::Result<Socket> {
                let socket =
                    Socket::new(Domain::for_address(to), Type::STREAM.nonblocking(), Some(Protocol::TCP))?;
                socket.set_mark(mark)?;
                socket.set_tcp_nodelay(true)?;
                socket.set_reuse_address(true)?;
                if source.is_ipv4() {
                    socket.set_ip_transparent_v4(true)?;
                } else {
                    socket.set_ip_transparent_v6(true)?;
                }
                socket.bind(&SockAddr::from(source))?;
                Ok(socket)
            })
            .await
            .map_err(io::Error::other)?
            .map_err(|e| {
                io::Error::new(e.kind(), format!("delivery socket in {}: {e}", netns.path().display()))
            })?;
        let socket = TcpSocket::from_std_stream(std::net::TcpStream::from(socket));
        match tokio::time::timeout(timeout, socket.connect(to)).await {
            Ok(result) => result,
            Err(_) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("no answer from {to} within {timeout:?}"),
            )),
        }
    }
}
