//! Running socket syscalls inside another network namespace.
//!
//! `setns(CLONE_NEWNET)` changes the namespace of the calling *thread*, and a socket belongs to
//! the namespace it was created in for its whole life. So each workload netns gets one helper
//! thread that enters it once and then creates sockets on request; the sockets are handed back
//! to the tokio runtime, where they keep living in the workload's namespace. This is how the
//! proxy listens inside each pod and dials upstream *from* the pod (its source address is the
//! pod's own) without iptables and with any CNI.

use std::{
    fs::File,
    path::{Path, PathBuf},
    sync::mpsc,
};

use nix::sched::{CloneFlags, setns};
use tokio::sync::oneshot;

#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("cannot open network namespace {path}: {source} (does the pod still exist?)")]
    Open { path: PathBuf, source: std::io::Error },
    #[error("cannot enter network namespace {path}: {source} (mesh-node needs CAP_SYS_ADMIN)")]
    Enter { path: PathBuf, source: nix::Error },
    #[error("helper thread for network namespace {path} has stopped")]
    ThreadGone { path: PathBuf },
}

type Job = Box<dyn FnOnce() + Send>;

/// A thread parked inside one network namespace. Dropping the last handle ends the thread.
#[derive(Debug)]
pub struct NetnsThread {
    path: PathBuf,
    jobs: mpsc::Sender<Job>,
}

impl NetnsThread {
    pub fn spawn(path: &Path) -> Result<NetnsThread, NetnsError> {
        let file =
            File::open(path).map_err(|source| NetnsError::Open { path: path.to_path_buf(), source })?;
        let (jobs, rx) = mpsc::channel::<Job>();
        let (ready_tx, ready_rx) = mpsc::sync_channel(1);
        let name = format!("netns-{}", path.file_name().unwrap_or_default().to_string_lossy());
        let thread_path = path.to_path_buf();
        std::thread::Builder::new()
            .name(name.chars().take(15).collect())
            .spawn(move || {
                let entered = setns(&file, CloneFlags::CLONE_NEWNET);
                let ok = entered.is_ok();
                let _ =
                    ready_tx.send(entered.map_err(|source| NetnsError::Enter { path: thread_path, source }));
                if ok {
                    for job in rx {
                        job();
                    }
                }
            })
            .map_err(|source| NetnsError::Open { path: path.to_path_buf(), source })?;
        ready_rx.recv().map_err(|_| NetnsError::ThreadGone { path: path.to_path_buf() })??;
        Ok(NetnsThread { path: path.to_path_buf(), jobs })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `f` on the helper thread (inside the namespace) and returns its result.
    pub async fn run<R, F>(&self, f: F) -> Result<R, NetnsError>
    where
        R: Send + 'static,
        F: FnOnce() -> R + Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        self.jobs
            .send(Box::new(move || {
                let _ = tx.send(f());
            }))
            .map_err(|_| self.gone())?;
        rx.await.map_err(|_| self.gone())
    }

    fn gone(&self) -> NetnsError {
        NetnsError::ThreadGone { path: self.path.clone() }
    }
}
