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

/// Forwards TCP connections accepted on `listen` (in the caller's own netns, typically the
/// host's loopback) to `to` inside netns `name`, until the process exits: how the demo lets a
/// browser on the host open a page served inside the simulated cluster. Each connection gets
/// two copying threads; the connection to `to` is made from a thread that entered `name`.
pub fn forward(listen: SocketAddr, name: &str, to: SocketAddr) -> anyhow::Result<()> {
    let listener = std::net::TcpListener::bind(listen).with_context(|| format!("listening on {listen}"))?;
    let name = name.to_string();
    std::thread::spawn(move || {
        for client in listener.incoming().flatten() {
            let upstream =
                match run_in(&name, move || Ok(TcpStream::connect_timeout(&to, Duration::from_secs(2))?)) {
                    Ok(s) => s,
                    Err(_) => continue,
                };
            for (mut from, mut into) in
                [(client.try_clone(), upstream.try_clone()), (upstream.try_clone(), client.try_clone())]
                    .into_iter()
                    .filter_map(|(a, b)| Some((a.ok()?, b.ok()?)))
            {
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut from, &mut into);
                    let _ = into.shutdown(std::net::Shutdown::Write);
                });
            }
        }
    });
    Ok(())
}
