//! Creates a workload's proxy listeners inside its network namespace.

use std::{
    io,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
};

use socket2::{Domain, Protocol, Socket, Type};

use crate::{netns::NetnsThread, sys};

/// The port the proxy prefers inside a pod, as Istio's outbound capture port. In a shared netns
/// (plain host processes) the second workload gets an ephemeral port instead.
pub(super) const OUTBOUND_PORT: u16 = 15001;
/// Where the pod's inbound capture (sk_lookup) hands connections, as Istio's inbound port.
/// The address is loopback, but sk_lookup may steer any destination to it.
pub(super) const INBOUND_PORT: u16 = 15006;
/// Deep enough for bursts of thousands of connects per pod.
const BACKLOG: i32 = 4096;

pub(super) struct WorkloadListeners {
    pub netns_cookie: u64,
    pub v4: std::net::TcpListener,
    /// None when the netns has no usable ::1 (IPv6 disabled); IPv6 connects then pass uncaptured.
    pub v6: Option<std::net::TcpListener>,
}

pub(super) async fn bind_in(
    netns: &NetnsThread,
) -> Result<io::Result<WorkloadListeners>, crate::netns::NetnsError> {
    bind_pair(netns, OUTBOUND_PORT).await
}

/// The inbound listeners, for [`crate::capture::Capture::capture_inbound`].
pub(super) async fn bind_inbound(
    netns: &NetnsThread,
) -> Result<io::Result<WorkloadListeners>, crate::netns::NetnsError> {
    bind_pair(netns, INBOUND_PORT).await
}

/// Listeners on 127.0.0.1 and ::1 (`port`, or an ephemeral one if it is taken) in `netns`.
async fn bind_pair(
    netns: &NetnsThread,
    port: u16,
) -> Result<io::Result<WorkloadListeners>, crate::netns::NetnsError> {
    netns
        .run(move || {
            let v4 = bind_loopback(SocketAddr::from((Ipv4Addr::LOCALHOST, port)))?;
            let netns_cookie = sys::netns_cookie(&v4)?;
            let v6 = match bind_loopback(SocketAddr::from((Ipv6Addr::LOCALHOST, port))) {
                Ok(l) => Some(l),
                Err(e) if e.kind() == io::ErrorKind::AddrNotAvailable => None,
                Err(e) if e.raw_os_error() == Some(libc::EAFNOSUPPORT) => None,
                Err(e) => return Err(e),
            };
            Ok(WorkloadListeners { netns_cookie, v4, v6 })
        })
        .await
}

fn bind_loopback(preferred: SocketAddr) -> io::Result<std::net::TcpListener> {
    match bind(preferred) {
        Err(e) if e.kind() == io::ErrorKind::AddrInUse => bind(SocketAddr::new(preferred.ip(), 0)),
        other => other,
    }
}

fn bind(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    Ok(socket.into())
}
