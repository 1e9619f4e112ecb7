//! The running process's side: hands its listeners to the one successor that asks.
//!
//! It runs on a thread of its own (every step is a blocking socket call, and a thread left
//! waiting in `accept` never holds up the process's exit), calling into the runtime for the
//! steps that touch the registry.

use std::{
    future::Future,
    io,
    os::fd::{AsRawFd, OwnedFd},
    path::Path,
    sync::Arc,
    time::Duration,
};

use tokio::{runtime::Handle, sync::watch};

use super::{
    STEP_TIMEOUT,
    wire::{self, Described, Message},
};

/// What the running process does in a handover.
pub trait Handing: Send + Sync + 'static {
    /// Stops changing state the successor reads (registrations, the state file); returns
    /// the listeners to hand over (descriptors of our own, closed once sent), or `None` to
    /// refuse (this process is exiting).
    fn freeze(&self) -> impl Future<Output = Option<Vec<(Described, OwnedFd)>>>;
    /// The successor went away before taking over: carry on as before.
    fn thaw(&self) -> impl Future<Output = ()>;
    /// The successor serves on the listeners now: stop accepting, start draining.
    fn release(&self, successor: u32) -> impl Future<Output = ()>;
}

/// Where a handover stands, as the rest of the process sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HandoverState {
    Idle,
    /// A successor is being handed the listeners; the outcome is not known yet.
    InProgress,
    /// Pid of the process that took over.
    Done(u32),
}

/// Listens at `path` for a successor and hands over to the first one that completes a
/// handover; a failed attempt thaws and waits for the next.
pub fn serve<H: Handing>(path: &Path, handing: Arc<H>) -> io::Result<watch::Receiver<HandoverState>> {
    let listener = wire::listen(path)?;
    let runtime = Handle::current();
    let (state, watched) = watch::channel(HandoverState::Idle);
    std::thread::Builder::new().name("handover".into()).spawn(move || {
        loop {
            let conn = match wire::accept(&listener) {
                Ok(conn) => conn,
                Err(e) => {
                    tracing::warn!("handover accept failed: {e}");
                    std::thread::sleep(Duration::from_millis(100));
                    continue;
                }
            };
            state.send_replace(HandoverState::InProgress);
            match hand_over(&conn, &*handing, &runtime) {
                Ok(successor) => {
                    state.send_replace(HandoverState::Done(successor));
                    return;
                }
                Err(e) => {
                    tracing::warn!("handover failed, still serving: {e}");
                    runtime.block_on(handing.thaw());
                    state.send_replace(HandoverState::Idle);
                }
            }
        }
    })?;
    Ok(watched)
}

fn hand_over(conn: &wire::Conn, handing: &impl Handing, runtime: &Handle) -> io::Result<u32> {
    conn.set_timeout(STEP_TIMEOUT)?;
    let successor = match conn.receive()? {
        (Message::Hello { version, pid }, _) if version == wire::VERSION => pid,
        (Message::Hello { version, .. }, _) => {
            let reason = format!("handover protocol v{version}; this mesh-node speaks v{}", wire::VERSION);
            conn.send(&Message::Refused { reason: reason.clone() }, &[])?;
            return Err(io::Error::other(reason));
        }
        (other, _) => return Err(io::Error::other(format!("expected Hello, got {other:?}"))),
    };
    tracing::info!(successor, "handover: a new mesh-node asks for the listeners");
    let Some(sockets) = runtime.block_on(handing.freeze()) else {
        let reason = "this mesh-node is exiting; start afresh".to_string();
        conn.send(&Message::Refused { reason: reason.clone() }, &[])?;
        return Err(io::Error::other(reason));
    };
    for batch in sockets.chunks(wire::FDS_PER_MESSAGE) {
        let described = batch.iter().map(|(d, _)| d.clone()).collect();
        let fds: Vec<_> = batch.iter().map(|(_, fd)| fd.as_raw_fd()).collect();
        conn.send(&Message::Sockets { sockets: described }, &fds)?;
    }
    conn.send(&Message::Done { pid: std::process::id() }, &[])?;
    match conn.receive()? {
        (Message::Taken { pid }, _) if pid == successor => {}
        (other, _) => return Err(io::Error::other(format!("expected Taken, got {other:?}"))),
    }
    runtime.block_on(handing.release(successor));
    conn.send(&Message::Released, &[])?;
    tracing::info!(successor, sockets = sockets.len(), "handover done: the new mesh-node serves; draining");
    Ok(successor)
}
