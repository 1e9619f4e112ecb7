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

/// Listeners a previous mesh-node handed over for one workload: used instead of new ones
/// when they live in the netns the workload has now.
#[derive(Default)]
pub(super) struct Handed {
    pub v4: Option<std::net::TcpListener>,
    pub v6: Option<std::net::TcpListener>,
}

pub(super) struct WorkloadListeners {
    pub netns_cookie: u64,
    pub v4: std::net::TcpListener,
    /// None when the netns has no usable ::1 (IPv6 disabled); IPv6 connects then pass uncaptured.
    pub v6: Option<std::net::TcpListener>,
}

impl WorkloadListeners {
    /// Descriptors of our own for the listeners (`roles`: IPv4, IPv6), kept for a handover.
    pub(super) fn own_fds(
        &self,
        roles: [crate::handover::wire::Role; 2],
    ) -> io::Result<Vec<(crate::handover::wire::Role, std::os::fd::OwnedFd)>> {
        let mut fds = vec![(roles[0], self.v4.try_clone()?.into())];
        if let Some(v6) = &self.v6 {
            fds.push((roles[1], v6.try_clone()?.into()));
        }
        Ok(fds)
    }
}

pub(super) async fn bind_in(
    netns: &NetnsThread,
    handed: Handed,
) -> Result<io::Result<WorkloadListeners>, crate::netns::NetnsError> {
    bind_pair(netns, OUTBOUND_PORT, handed).await
}

/// The inbound listeners, for [`crate::capture::Capture::capture_inbound`].
pub(super) async fn bind_inbound(
    netns: &NetnsThread,
    handed: Handed,
) -> Result<io::Result<WorkloadListeners>, crate::netns::NetnsError> {
    bind_pair(netns, INBOUND_PORT, handed).await
}

/// Listeners on 127.0.0.1 and ::1 in `netns`: the handed-over ones if they live there, else
/// new ones on `port` (or an ephemeral one if it is taken).
async fn bind_pair(
    netns: &NetnsThread,
    port: u16,
    handed: Handed,
) -> Result<io::Result<WorkloadListeners>, crate::netns::NetnsError> {
    netns
        .run(move || {
            let here = sys::netns_cookie(&Socket::new(Domain::IPV4, Type::DGRAM, None)?)?;
            // The pod may have been replaced (same name, new netns) since they were made.
            let usable = |l: Option<std::net::TcpListener>| {
                l.filter(|l| sys::netns_cookie(l).is_ok_and(|cookie| cookie == here))
            };
            let v4 = match usable(handed.v4) {
                Some(l) => l,
                None => bind_loopback(SocketAddr::from((Ipv4Addr::LOCALHOST, port)))?,
            };
            let v6 = match usable(handed.v6) {
                Some(l) => Some(l),
                None => match bind_loopback(SocketAddr::from((Ipv6Addr::LOCALHOST, port))) {
                    Ok(l) => Some(l),
                    Err(e) if e.kind() == io::ErrorKind::AddrNotAvailable => None,
                    Err(e) if e.raw_os_error() == Some(libc::EAFNOSUPPORT) => None,
                    Err(e) => return Err(e),
                },
            };
            Ok(WorkloadListeners { netns_cookie: here, v4, v6 })
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
