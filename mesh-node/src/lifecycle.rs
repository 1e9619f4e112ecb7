//! How a mesh-node process hands over and ends.
//!
//! - **Taken over** (a new mesh-node asked on the handover socket): it gets every listener,
//!   this process stops accepting and drains, then waits for its SIGTERM (on Kubernetes the
//!   DaemonSet controller deletes the old pod once the new one is ready; exiting earlier would
//!   have the kubelet restart it, and the restarted process would take over back). Capture
//!   stays pinned: the new process runs it.
//! - **SIGTERM with no successor**: it drains but keeps accepting (a successor may still come
//!   and take the listeners; until then pods are served), until its connections are done or
//!   the drain deadline, then exits.
//! - **Killed** (SIGKILL, OOM, crash): it just ends.
//!
//! Either way capture stays pinned, finding no listener until the next mesh-node: fail-closed
//! workloads (STRICT, or MeshConfig nodeProxyDown AllClosed) are refused both ways, the others
//! connect directly. `mesh-node uninstall` takes capture away for good.

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
        "exiting with no mesh-node to take over: until one starts, fail-closed workloads are \
         refused and the others connect directly; workloads stay saved for it"
    );
    for socket in &end.sockets {
        let _ = std::fs::remove_file(socket);
    }
    Ok(())
}
