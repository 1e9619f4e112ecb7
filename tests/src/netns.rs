//! Doing things inside a namespace from the test process: a short-lived thread enters it.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::Context;
use nix::sched::{CloneFlags, setns};

pub fn path(name: &str) -> PathBuf {
    PathBuf::from("/var/run/netns").join(name)
}

/// Runs `f` on a fresh thread that has entered netns `name`; the thread ends afterwards, so the
/// test process's own threads never change namespace.
pub fn run_in<R: Send + 'static>(
    name: &str,
    f: impl FnOnce() -> anyhow::Result<R> + Send + 'static,
) -> anyhow::Result<R> {
    let file = std::fs::File::open(path(name)).with_context(|| format!("netns {name}"))?;
    std::thread::spawn(move || {
        setns(&file, CloneFlags::CLONE_NEWNET).context("setns")?;
        f()
    })
    .join()
    .map_err(|_| anyhow::anyhow!("netns thread panicked"))?
}

/// A minimal HTTP/1.0 GET; returns the body of a 2xx answer.
pub fn http_get(netns: &str, addr: SocketAddr, target: &str) -> anyhow::Result<String> {
    let target = target.to_string();
    run_in(netns, move || {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        write!(s, "GET {target} HTTP/1.0\r\nHost: admin\r\n\r\n")?;
        let mut response = String::new();
        s.read_to_string(&mut response)?;
        let (head, body) = response.split_once("\r\n\r\n").context("malformed HTTP response")?;
        let status = head.split_whitespace().nth(1).unwrap_or("");
        anyhow::ensure!(status.starts_with('2'), "GET {target}: {head}\n{body}");
        Ok(body.to_string())
    })
}

/// Waits until something accepts TCP connections on `addr` inside netns `name`.
pub fn wait_listening(name: &str, addr: SocketAddr, timeout: Duration) -> anyhow::Result<()> {
    run_in(name, move || {
        let deadline = Instant::now() + timeout;
        loop {
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return Ok(());
            }
            anyhow::ensure!(Instant::now() < deadline, "nothing listening on {addr} after {timeout:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
    })
}
