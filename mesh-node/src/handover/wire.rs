//! The handover socket: a unix SOCK_SEQPACKET socket (one message per send, never merged or
//! split, so the descriptors attached to a message arrive with it) carrying JSON messages with
//! listening sockets attached as SCM_RIGHTS.
#![expect(unsafe_code, reason = "taking ownership of the descriptors SCM_RIGHTS delivered")]

use std::{
    io::{IoSlice, IoSliceMut},
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
    path::Path,
    time::Duration,
};

use nix::sys::{
    socket::{
        self, AddressFamily, Backlog, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag, SockType,
        UnixAddr, sockopt,
    },
    time::TimeVal,
};
use serde::{Deserialize, Serialize};

/// Descriptors per message: below the kernel's SCM_MAX_FD (253).
pub const FDS_PER_MESSAGE: usize = 200;
/// Bigger than any message we send (a batch of socket descriptions).
const MAX_MESSAGE: usize = 256 * 1024;

/// What a listening socket is for in the process that hands it over.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Admin,
    /// The metrics-only endpoint (`--metrics-addr`).
    Metrics,
    Tunnel,
    /// A workload's outbound capture listener (127.0.0.1 / ::1 in its netns).
    Outbound4,
    Outbound6,
    /// A workload's inbound capture listener.
    Inbound4,
    Inbound6,
}

/// One socket in a [`Message::Sockets`] batch; its descriptor is at the same index.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Described {
    pub role: Role,
    /// `namespace/name` for a workload's listener.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload: Option<String>,
}

#[derive(Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Message {
    /// New → old: asks for the listeners.
    Hello { version: u32, pid: u32 },
    /// Old → new: a batch of listeners (descriptors attached).
    Sockets { sockets: Vec<Described> },
    /// Old → new: every listener sent; the old process has stopped changing shared state.
    Done { pid: u32 },
    /// New → old: serving on the listeners; the old process may stop accepting and drain.
    Taken { pid: u32 },
    /// Old → new: stopped accepting.
    Released,
    /// Old → new: no handover (say, one is already in progress).
    Refused { reason: String },
}

pub const VERSION: u32 = 1;

/// A connected handover socket.
pub struct Conn {
    fd: OwnedFd,
}

fn seqpacket() -> nix::Result<OwnedFd> {
    socket::socket(AddressFamily::Unix, SockType::SeqPacket, SockFlag::SOCK_CLOEXEC, None)
}

/// Listens at `path` (replacing a socket file left there).
pub fn listen(path: &Path) -> std::io::Result<OwnedFd> {
    let _ = std::fs::remove_file(path);
    let fd = seqpacket()?;
    socket::bind(fd.as_raw_fd(), &UnixAddr::new(path)?)?;
    socket::listen(&fd, Backlog::new(4)?)?;
    Ok(fd)
}

pub fn accept(listener: &OwnedFd) -> std::io::Result<Conn> {
    let raw = socket::accept(listener.as_raw_fd())?;
    // SAFETY: accept just returned this descriptor; nothing else owns it.
    Ok(Conn { fd: unsafe { OwnedFd::from_raw_fd(raw) } })
}

/// Connects to a running mesh-node's handover socket.
pub fn connect(path: &Path) -> std::io::Result<Conn> {
    let fd = seqpacket()?;
    socket::connect(fd.as_raw_fd(), &UnixAddr::new(path)?)?;
    Ok(Conn { fd })
}

impl Conn {
    /// Every receive fails after `timeout` without a message.
    pub fn set_timeout(&self, timeout: Duration) -> std::io::Result<()> {
        socket::setsockopt(
            &self.fd,
            sockopt::ReceiveTimeout,
            &TimeVal::from(libc::timeval {
                tv_sec: timeout.as_secs() as libc::time_t,
                tv_usec: libc::suseconds_t::from(timeout.subsec_micros() as i32),
            }),
        )?;
        Ok(())
    }

    pub fn send(&self, message: &Message, fds: &[RawFd]) -> std::io::Result<()> {
        let body = serde_json::to_vec(message).map_err(std::io::Error::other)?;
        let cmsgs: Vec<ControlMessage<'_>> =
            if fds.is_empty() { Vec::new() } else { vec![ControlMessage::ScmRights(fds)] };
        socket::sendmsg::<()>(self.fd.as_raw_fd(), &[IoSlice::new(&body)], &cmsgs, MsgFlags::empty(), None)?;
        Ok(())
    }

    /// The next message and the descriptors that came with it. The peer closing is an
    /// `UnexpectedEof` error.
    pub fn receive(&self) -> std::io::Result<(Message, Vec<OwnedFd>)> {
        let mut body = vec![0u8; MAX_MESSAGE];
        let mut space = nix::cmsg_space!([RawFd; FDS_PER_MESSAGE]);
        let mut iov = [IoSliceMut::new(&mut body)];
        let msg = socket::recvmsg::<()>(
            self.fd.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )?;
        let mut fds = Vec::new();
        for cmsg in msg.cmsgs()? {
            if let ControlMessageOwned::ScmRights(raw) = cmsg {
                // SAFETY: SCM_RIGHTS installed these descriptors in this process for us.
                fds.extend(raw.into_iter().map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }));
            }
        }
        let (len, truncated) = (msg.bytes, msg.flags.contains(MsgFlags::MSG_TRUNC | MsgFlags::MSG_CTRUNC));
        if len == 0 {
            return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "the other mesh-node closed"));
        }
        if truncated {
            return Err(std::io::Error::other("handover message truncated"));
        }
        let message = serde_json::from_slice(&body[..len])
            .map_err(|e| std::io::Error::other(format!("handover message: {e}")))?;
        Ok((message, fds))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptors_travel_with_their_message() {
        let dir = std::env::temp_dir().join(format!("nm-handover-wire-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("h.sock");
        let listener = listen(&path).unwrap();
        let client = connect(&path).unwrap();
        let server = accept(&listener).unwrap();
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let sockets = vec![Described { role: Role::Tunnel, workload: None }];
        server.send(&Message::Sockets { sockets: sockets.clone() }, &[tcp.as_raw_fd()]).unwrap();
        server.send(&Message::Done { pid: 1 }, &[]).unwrap();
        let (message, fds) = client.receive().unwrap();
        assert_eq!(message, Message::Sockets { sockets });
        let received = std::net::TcpListener::from(fds.into_iter().next().unwrap());
        assert_eq!(received.local_addr().unwrap(), tcp.local_addr().unwrap());
        let (message, fds) = client.receive().unwrap();
        assert_eq!(message, Message::Done { pid: 1 });
        assert!(fds.is_empty());
        drop(server);
        let closed = client.receive().unwrap_err();
        assert_eq!(closed.kind(), std::io::ErrorKind::UnexpectedEof);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
