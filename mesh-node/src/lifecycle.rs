//! How a mesh-node process hands over and ends.
//!
//! - **Taken over** (a new mesh-node asked on the handover socket): it gets every listener,
//!   this process stops accepting and drains, then waits for its SIGTERM (on Kubernetes the
//!   DaemonSet controller deletes the old pod once the new one is ready; exiting earlier would
//!   have the kubelet restart it, and the restarted process would take over back). Capture
//!   stays pinned: the new process runs it.
//! - **SIGTERM with no successor**: it drains but keeps accepting (a successor may still come
//!   and take the listeners; until then pods are served), until its connections are done or
//!   the drain deadline. Then, if nobody took over, it unpins capture: pods connect directly
//!   until a mesh-node starts again.
//! - **Killed** (SIGKILL, OOM, crash): capture stays pinned and points at listeners that are
//!   gone, so meshed pods' connects are refused (never sent in plaintext) until a new process
//!   adopts the pins and listens again.

use std::{
    os::fd::OwnedFd,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use tokio::{
    signal::unix::{SignalKind, signal},
    sync::watch,
    task::AbortHandle,
};

use crate::{
    capture::Capture,
    drain::Drain,
    handover::{
        Handing, HandoverState,
        wire::{Described, Role},
    },
    registry::Registry,
};

/// This process's side of a handover.
pub struct NodeHandover {
    pub registry: Arc<Registry>,
    pub drain: Drain,
    /// The listeners that are not a workload's (admin, tunnel), descriptors of our own.
    pub listeners: Vec<(Role, OwnedFd)>,
    /// Their accept loops (and the local API's), stopped once the successor serves.
    pub accept_tasks: Vec<AbortHandle>,
    /// Set once this process has decided to exit: a handover asked for after that is refused.
    pub exiting: AtomicBool,
}

impl Handing for NodeHandover {
    async fn freeze(&self) -> Option<Vec<(Described, OwnedFd)>> {
        if self.exiting.load(Ordering::Acquire) {
            return None;
        }
        let mut sockets = self.registry.freeze().await;
        for (role, fd) in &self.listeners {
            match fd.try_clone() {
                Ok(fd) => sockets.push((Described { role: *role, workload: None }, fd)),
                Err(e) => tracing::warn!(?role, "cannot hand over a listener: {e}"),
            }
        }
        Some(sockets)
    }

    async fn thaw(&self) {
        self.registry.thaw();
    }

    async fn release(&self, successor: u32) {
        self.registry.stop_accepting().await;
        self.accept_tasks.iter().for_each(AbortHandle::abort);
        self.drain.start(&format!("handed over to pid {successor}"));
    }
}

/// What the end of the process needs.
pub struct Ending {
    pub handover: Arc<NodeHandover>,
    pub state: watch::Receiver<HandoverState>,
    pub drain_timeout: Duration,
    pub capture: Arc<Capture>,
    /// Removed on an exit nobody took over from (a successor has its own there).
    pub sockets: Vec<PathBuf>,
}

/// Serves until SIGTERM/SIGINT or a takeover, then drains and returns when the process may
/// exit.
pub async fn run_until_end(mut end: Ending) -> anyhow::Result<()> {
    let mut term = signal(SignalKind::terminate())?;
    let handed_over = |s: &HandoverState| matches!(s, HandoverState::Done(_));
    let signalled = tokio::select! {
        _ = term.recv() => true,
        _ = tokio::signal::ctrl_c() => true,
        _ = end.state.wait_for(handed_over) => false,
    };
    let deadline = Instant::now() + end.drain_timeout;
    let drain = end.handover.drain.clone();
    if !signalled {
        // Draining since `release`; the successor serves everything new.
        let signalled = tokio::select! {
            _ = drain.finish(deadline) => false,
            _ = term.recv() => true,
        };
        if signalled {
            drain.finish(deadline).await;
        } else {
            tracing::info!("drained; the new mesh-node serves. Waiting for SIGTERM to exit");
            term.recv().await;
        }
        return Ok(());
    }
    drain.start("SIGTERM");
    tokio::select! {
        _ = drain.finish(deadline) => {}
        _ = end.state.wait_for(handed_over) => {
            drain.finish(deadline).await;
        }
    }
    end.handover.exiting.store(true, Ordering::Release);
    let state = *end.state.wait_for(|s| *s != HandoverState::InProgress).await?;
    if let HandoverState::Done(successor) = state {
        tracing::info!(successor, "exiting; the new mesh-node serves and keeps capture");
        return Ok(());
    }
    tracing::info!(
        "exiting with no mesh-node to take over: capture unpinned, pods connect directly until \
         one starts; workloads stay saved for it"
    );
    end.capture.unpin_all();
    for socket in &end.sockets {
        let _ = std::fs::remove_file(socket);
    }
    Ok(())
}
