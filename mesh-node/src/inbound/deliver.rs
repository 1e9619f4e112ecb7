//! Delivery: the last hop of an inbound connection, from mesh-node into the destination pod.
//!
//! The socket is created inside the pod's netns and bound (IP_TRANSPARENT) to the *client
//! pod's* address, so the application sees who really called — as without a mesh — and
//! connections from many clients never funnel through one source address (no `127.0.0.6`,
//! no ephemeral-port exhaustion behind one IP). `IP_BIND_ADDRESS_NO_PORT` lets the kernel pick
//! the port at connect time per 4-tuple. The delivery mark brings the answers back to this
//! socket (see [`super::routing`]).

use std::{
    io,
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use tokio::net::{TcpSocket, TcpStream};

use crate::netns::NetnsThread;

/// Connects to `to` from inside `netns`, as `from` when given (else as the pod itself would).
pub async fn deliver(
    netns: &NetnsThread,
    from: Option<IpAddr>,
    to: SocketAddr,
    mark: u32,
    timeout: Duration,
) -> io::Result<TcpStream> {
    // A client of the other family cannot be the source; the pod's own address is used then.
    let from = from.filter(|ip| ip.is_ipv4() == to.is_ipv4());
    let socket = netns
        .run(move || -> io::Result<Socket> {
            let socket =
                Socket::new(Domain::for_address(to), Type::STREAM.nonblocking(), Some(Protocol::TCP))?;
            socket.set_mark(mark)?;
            socket.set_tcp_nodelay(true)?;
            if let Some(ip) = from {
                if ip.is_ipv4() {
                    socket.set_ip_transparent_v4(true)?;
                    crate::sys::set_bind_address_no_port(&socket)?;
                } else {
                    socket.set_ip_transparent_v6(true)?;
                }
                socket.bind(&SockAddr::from(SocketAddr::new(ip, 0)))?;
            }
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
        Err(_) => {
            Err(io::Error::new(io::ErrorKind::TimedOut, format!("no answer from {to} within {timeout:?}")))
        }
    }
}
