//! Taking over from a running mesh-node without refusing a single connection.
//!
//! A starting mesh-node connects to `<state-dir>/handover.sock`. If a mesh-node answers, it
//! stops changing shared state (registrations, the state file), and sends every listening
//! socket it has — admin, tunnel, and each workload's outbound and inbound capture listeners
//! — as SCM_RIGHTS. The new process swaps its programs into the pinned links
//! (`capture::pins`), registers its workloads on the listeners it received (the same
//! sockets, so MESHED_CGROUPS and INBOUND_LISTENERS keep pointing at live sockets and their
//! accept queues keep every pending connection), starts accepting, and says `Taken`. Only
//! then does the old process stop accepting and drain ([`crate::drain`]). Both accept from the
//! same queues for a moment; a connection is served by whichever took it. If the new process
//! dies before `Taken`, the old one carries on as if nothing happened.

mod server;
pub mod wire;

use std::{
    collections::HashMap,
    io,
    net::TcpListener,
    path::{Path, PathBuf},
    time::Duration,
};

pub use server::{Handing, HandoverState, serve};
use wire::{Message, Role};

/// How long each step of a handover may take before the side waiting gives up.
const STEP_TIMEOUT: Duration = Duration::from_secs(60);

pub fn socket_path(state_dir: &Path) -> PathBuf {
    state_dir.join("handover.sock")
}

/// Listeners received from the previous process.
#[derive(Debug, Default)]
pub struct Inherited {
    pub admin: Option<TcpListener>,
    pub metrics: Option<TcpListener>,
    pub tunnel: Option<TcpListener>,
    /// By `namespace/name`.
    pub workloads: HashMap<String, Vec<(Role, TcpListener)>>,
}

/// The previous process, waiting for [`Predecessor::taken`].
pub struct Predecessor {
    conn: wire::Conn,
    pub pid: u32,
}

/// Asks the mesh-node serving at `path`, if any, for its listeners (blocking). `None`: nobody
/// there (no socket file, or a stale one). `ResourceBusy`: it is exiting and will not hand
/// over; ask again once it is gone.
pub fn take_over(path: &Path) -> io::Result<Option<(Predecessor, Inherited)>> {
    let conn = match wire::connect(path) {
        Ok(conn) => conn,
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ECONNREFUSED)) => return Ok(None),
        Err(e) => return Err(io::Error::new(e.kind(), format!("handover socket {}: {e}", path.display()))),
    };
    conn.set_timeout(STEP_TIMEOUT)?;
    conn.send(&Message::Hello { version: wire::VERSION, pid: std::process::id() }, &[])?;
    let mut inherited = Inherited::default();
    let mut received = 0;
    loop {
        match conn.receive()? {
            (Message::Sockets { sockets }, fds) => {
                if sockets.len() != fds.len() {
                    return Err(io::Error::other(format!(
                        "handover: {} sockets described, {} received",
                        sockets.len(),
                        fds.len()
                    )));
                }
                received += fds.len();
                for (described, fd) in sockets.into_iter().zip(fds) {
                    let listener = TcpListener::from(fd);
                    listener.set_nonblocking(true)?;
                    match (described.role, described.workload) {
                        (Role::Admin, _) => inherited.admin = Some(listener),
                        (Role::Metrics, _) => inherited.metrics = Some(listener),
                        (Role::Tunnel, _) => inherited.tunnel = Some(listener),
                        (role, Some(key)) => {
                            inherited.workloads.entry(key).or_default().push((role, listener))
                        }
                        (role, None) => {
                            tracing::warn!(?role, "handover: workload listener without a workload")
                        }
                    }
                }
            }
            (Message::Done { pid }, _) => {
                tracing::info!(
                    from = pid,
                    sockets = received,
                    "handover: took the listeners of the running mesh-node"
                );
                return Ok(Some((Predecessor { conn, pid }, inherited)));
            }
            (Message::Refused { reason }, _) => {
                return Err(io::Error::new(
                    io::ErrorKind::ResourceBusy,
                    format!("the running mesh-node refused the handover: {reason}"),
                ));
            }
            (other, _) => return Err(io::Error::other(format!("handover: unexpected {other:?}"))),
        }
    }
}

impl Predecessor {
    /// Tells the previous process we serve now; returns once it has stopped accepting.
    pub fn taken(self) -> io::Result<u32> {
        self.conn.send(&Message::Taken { pid: std::process::id() }, &[])?;
        match self.conn.receive()? {
            (Message::Released, _) => Ok(self.pid),
            (other, _) => Err(io::Error::other(format!("handover: expected Released, got {other:?}"))),
        }
    }
}
