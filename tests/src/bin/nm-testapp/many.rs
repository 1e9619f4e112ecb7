//! Many concurrent connections, for the scale tests.
//!
//! * `many-serve --listen ADDR --count-file F`: accepts and *holds* every connection; each
//!   client says `PING`, gets `PONG <its address as seen here>`, and stays open until it
//!   closes. Every 100 ms the file gets `{"open", "peers"}`: connections open right now and
//!   the distinct client addresses seen.
//! * `many-connect --to ADDR --connections N [--concurrency C]`: opens N connections (C
//!   connects in flight), checks each with one PING/PONG, prints `{"open", "errors"}` (errors
//!   by OS error), then keeps them all open until stdin ends.

use std::{
    collections::{BTreeMap, BTreeSet},
    io::{self, BufRead},
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use serde_json::{Value, json};
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::{TcpSocket, TcpStream},
    sync::Semaphore,
};

use crate::http::runtime;

pub(crate) fn serve(listen: SocketAddr, count_file: PathBuf) -> io::Result<Value> {
    runtime().block_on(async move {
        let socket = if listen.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
        socket.set_reuseaddr(true)?;
        socket.bind(listen)?;
        let listener = socket.listen(4096)?;
        eprintln!("nm-testapp: holding connections on {listen}");
        let open = Arc::new(AtomicUsize::new(0));
        let peers: Arc<Mutex<BTreeSet<IpAddr>>> = Arc::default();
        {
            let (open, peers) = (Arc::clone(&open), Arc::clone(&peers));
            tokio::spawn(async move {
                let tmp = count_file.with_extension("tmp");
                loop {
                    let peers: Vec<String> = peers.lock().unwrap().iter().map(ToString::to_string).collect();
                    let text = json!({"open": open.load(Ordering::SeqCst), "peers": peers}).to_string();
                    if std::fs::write(&tmp, text).is_ok() {
                        let _ = std::fs::rename(&tmp, &count_file);
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            });
        }
        loop {
            let Ok((stream, peer)) = listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            };
            peers.lock().unwrap().insert(peer.ip());
            let open = Arc::clone(&open);
            tokio::spawn(async move {
                open.fetch_add(1, Ordering::SeqCst);
                let _ = hold(stream, peer).await;
                open.fetch_sub(1, Ordering::SeqCst);
            });
        }
    })
}

async fn hold(stream: TcpStream, peer: SocketAddr) -> io::Result<()> {
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader.read_line(&mut line).await?;
    if line.trim() != "PING" {
        return Ok(());
    }
    reader.get_mut().write_all(format!("PONG {peer}\n").as_bytes()).await?;
    // Held until the client closes.
    let mut rest = [0u8; 64];
    while reader.read(&mut rest).await? > 0 {}
    Ok(())
}

pub(crate) fn connect(to: SocketAddr, connections: usize, concurrency: usize) -> io::Result<Value> {
    runtime().block_on(async move {
        let gate = Arc::new(Semaphore::new(concurrency));
        let mut tasks = Vec::with_capacity(connections);
        for _ in 0..connections {
            let gate = Arc::clone(&gate);
            tasks.push(tokio::spawn(async move {
                let _permit = gate.acquire_owned().await.expect("semaphore");
                tokio::time::timeout(Duration::from_secs(60), ping(to))
                    .await
                    .unwrap_or_else(|_| Err(io::Error::new(io::ErrorKind::TimedOut, "no PONG within 60 s")))
            }));
        }
        let mut held = Vec::with_capacity(connections);
        let mut errors: BTreeMap<String, usize> = BTreeMap::new();
        for t in tasks {
            match t.await.map_err(io::Error::other)? {
                Ok(stream) => held.push(stream),
                Err(e) => *errors.entry(e.to_string()).or_default() += 1,
            }
        }
        println!("{}", json!({"open": held.len(), "errors": errors}));
        // Hold everything until the test says so (closes stdin).
        tokio::task::spawn_blocking(|| io::stdin().lock().lines().count()).await.map_err(io::Error::other)?;
        Ok(json!({"closed": held.len()}))
    })
}

async fn ping(to: SocketAddr) -> io::Result<TcpStream> {
    let stream = TcpStream::connect(to).await?;
    let mut reader = BufReader::new(stream);
    reader.get_mut().write_all(b"PING\n").await?;
    let mut line = String::new();
    reader.read_line(&mut line).await?;
    if !line.starts_with("PONG ") {
        return Err(io::Error::other(format!("answer {line:?} is not a PONG")));
    }
    Ok(reader.into_inner())
}
