//! `steady`: continuous traffic for a fixed time, counting every failure — what an upgrade
//! under load must not break.
//!
//! Three kinds of client run side by side (blocking sockets, one thread each, no retries: a
//! request that fails counts as failed):
//! - keep-alive HTTP/1.1 clients (`--http`): requests back to back on one connection; a
//!   response with `Connection: close` ends it and the next request opens a new one;
//! - fresh-connection HTTP clients: one connection per request;
//! - long-lived TCP streams (`--tcp`, an ECHO server): a line every 50 ms must come back,
//!   from start to end on the same connection, which must then close cleanly;
//! - short TCP connections to the same server, one line each: through the mesh every one is
//!   a new connection end to end (a new tunnel stream), where HTTP requests ride pooled ones.
//!
//! Output: totals per kind, the first errors, and per-second request counts and p99.

use std::{
    io::{self, BufRead, BufReader, Read, Write},
    net::{Shutdown, SocketAddr, TcpStream},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use serde_json::{Value, json};

use crate::{at, connect};

pub(crate) struct Steady {
    pub(crate) http: SocketAddr,
    pub(crate) tcp: SocketAddr,
    pub(crate) duration: Duration,
    pub(crate) keepalive_clients: usize,
    pub(crate) fresh_clients: usize,
    pub(crate) streams: usize,
    pub(crate) fresh_tcp_clients: usize,
}

/// What one kind of client saw.
#[derive(Default)]
struct Tally {
    ok: u64,
    failed: u64,
    errors: Vec<String>,
    /// (seconds since start, latency) of each successful request.
    latencies: Vec<(u64, Duration)>,
}

impl Tally {
    fn fail(&mut self, what: String) {
        self.failed += 1;
        if self.errors.len() < 10 {
            self.errors.push(what);
        }
    }
}

pub(crate) fn run(s: &Steady) -> io::Result<Value> {
    let start = Instant::now();
    let end = start + s.duration;
    let keepalive = Arc::new(Mutex::new(Tally::default()));
    let fresh = Arc::new(Mutex::new(Tally::default()));
    let streams = Arc::new(Mutex::new(Tally::default()));
    let fresh_tcp = Arc::new(Mutex::new(Tally::default()));
    let mut threads = Vec::new();
    for _ in 0..s.keepalive_clients {
        let (tally, to) = (Arc::clone(&keepalive), s.http);
        threads.push(std::thread::spawn(move || keepalive_client(to, start, end, &tally)));
    }
    for _ in 0..s.fresh_clients {
        let (tally, to) = (Arc::clone(&fresh), s.http);
        threads.push(std::thread::spawn(move || fresh_client(to, start, end, &tally)));
    }
    for _ in 0..s.fresh_tcp_clients {
        let (tally, to) = (Arc::clone(&fresh_tcp), s.tcp);
        threads.push(std::thread::spawn(move || fresh_tcp_client(to, end, &tally)));
    }
    for _ in 0..s.streams {
        let (tally, to) = (Arc::clone(&streams), s.tcp);
        threads.push(std::thread::spawn(move || stream_client(to, end, &tally)));
    }
    for t in threads {
        let _ = t.join();
    }
    let seconds = s.duration.as_secs();
    let report = |t: &Mutex<Tally>| {
        let t = t.lock().expect("tally");
        json!({"ok": t.ok, "failed": t.failed, "errors": t.errors})
    };
    let mut per_second = Vec::new();
    let all: Vec<(u64, Duration)> =
        [&keepalive, &fresh].iter().flat_map(|t| t.lock().expect("tally").latencies.clone()).collect();
    for second in 0..=seconds {
        let mut in_second: Vec<Duration> =
            all.iter().filter(|(s, _)| *s == second).map(|(_, d)| *d).collect();
        in_second.sort();
        let p99 = in_second.get((in_second.len() * 99 / 100).min(in_second.len().saturating_sub(1)));
        per_second.push(json!({
            "second": second,
            "requests": in_second.len(),
            "p99_ms": p99.map(|d| d.as_secs_f64() * 1000.0),
        }));
    }
    Ok(json!({
        "keepalive": report(&keepalive),
        "fresh": report(&fresh),
        "streams": report(&streams),
        "fresh_tcp": report(&fresh_tcp),
        "per_second": per_second,
    }))
}

const REQUEST_KEEPALIVE: &[u8] = b"GET /steady HTTP/1.1\r\nHost: steady\r\n\r\n";
const REQUEST_CLOSE: &[u8] = b"GET /steady HTTP/1.1\r\nHost: steady\r\nConnection: close\r\n\r\n";

fn keepalive_client(to: SocketAddr, start: Instant, end: Instant, tally: &Mutex<Tally>) {
    let mut conn: Option<BufReader<TcpStream>> = None;
    while Instant::now() < end {
        let began = Instant::now();
        let result = (|| {
            if conn.is_none() {
                conn = Some(BufReader::new(connect(to).map_err(at("connect"))?));
            }
            let reader = conn.as_mut().expect("connected");
            reader.get_mut().write_all(REQUEST_KEEPALIVE).map_err(at("write"))?;
            let close = read_response(reader)?;
            if close {
                conn = None;
            }
            Ok::<_, io::Error>(())
        })();
        let mut t = tally.lock().expect("tally");
        match result {
            Ok(()) => {
                t.ok += 1;
                t.latencies.push((began.duration_since(start).as_secs(), began.elapsed()));
            }
            Err(e) => {
                t.fail(format!("keep-alive request: {e}"));
                conn = None;
            }
        }
    }
}

fn fresh_client(to: SocketAddr, start: Instant, end: Instant, tally: &Mutex<Tally>) {
    while Instant::now() < end {
        let began = Instant::now();
        let result = (|| {
            let mut reader = BufReader::new(connect(to).map_err(at("connect"))?);
            reader.get_mut().write_all(REQUEST_CLOSE).map_err(at("write"))?;
            read_response(&mut reader).map(|_| ())
        })();
        let mut t = tally.lock().expect("tally");
        match result {
            Ok(()) => {
                t.ok += 1;
                t.latencies.push((began.duration_since(start).as_secs(), began.elapsed()));
            }
            Err(e) => t.fail(format!("new-connection request: {e}")),
        }
    }
}

/// Reads one response (status 200, `Content-Length` body); returns whether the server said
/// `Connection: close`.
fn read_response(reader: &mut BufReader<TcpStream>) -> io::Result<bool> {
    let mut line = String::new();
    reader.read_line(&mut line).map_err(at("read status"))?;
    if line.is_empty() {
        return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "connection closed before a response"));
    }
    if !line.starts_with("HTTP/1.1 200") {
        return Err(io::Error::other(format!("status line {:?}", line.trim_end())));
    }
    let (mut length, mut close) = (None, false);
    loop {
        line.clear();
        reader.read_line(&mut line).map_err(at("read headers"))?;
        let header = line.trim_end();
        if header.is_empty() {
            break;
        }
        let (name, value) = header.split_once(':').unwrap_or((header, ""));
        let (name, value) = (name.trim().to_ascii_lowercase(), value.trim().to_ascii_lowercase());
        if name == "content-length" {
            length = value.parse::<usize>().ok();
        } else if name == "connection" && value == "close" {
            close = true;
        }
    }
    let length = length.ok_or_else(|| io::Error::other("response without Content-Length"))?;
    let mut body = vec![0u8; length];
    reader.read_exact(&mut body).map_err(at("read body"))?;
    Ok(close)
}

/// One ECHO connection per line, until `end`.
fn fresh_tcp_client(to: SocketAddr, end: Instant, tally: &Mutex<Tally>) {
    while Instant::now() < end {
        let result = (|| {
            let mut s = connect(to).map_err(at("connect"))?;
            s.write_all(b"ECHO\nping\n").map_err(at("write"))?;
            s.shutdown(Shutdown::Write).map_err(at("shutdown"))?;
            let mut back = String::new();
            BufReader::new(s).read_to_string(&mut back).map_err(at("read"))?;
            if back != "ping\n" {
                return Err(io::Error::other(format!("echoed {back:?}")));
            }
            Ok::<_, io::Error>(())
        })();
        let mut t = tally.lock().expect("tally");
        match result {
            Ok(()) => t.ok += 1,
            Err(e) => t.fail(format!("short TCP connection: {e}")),
        }
    }
}

/// One ECHO connection for the whole run: a line every 50 ms must come back unchanged.
fn stream_client(to: SocketAddr, end: Instant, tally: &Mutex<Tally>) {
    let result = (|| {
        let mut s = connect(to).map_err(at("connect"))?;
        s.write_all(b"ECHO\n").map_err(at("write"))?;
        let mut reader = BufReader::new(s.try_clone()?);
        let mut round = 0u64;
        while Instant::now() < end {
            round += 1;
            let sent = format!("round {round}\n");
            s.write_all(sent.as_bytes()).map_err(at("write"))?;
            let mut back = String::new();
            reader.read_line(&mut back).map_err(at("read"))?;
            if back != sent {
                return Err(io::Error::other(format!("round {round}: sent {sent:?}, got {back:?}")));
            }
            tally.lock().expect("tally").ok += 1;
            std::thread::sleep(Duration::from_millis(50));
        }
        s.shutdown(Shutdown::Write).map_err(at("shutdown"))?;
        let mut rest = Vec::new();
        reader.read_to_end(&mut rest).map_err(at("read to close"))?;
        if !rest.is_empty() {
            return Err(io::Error::other(format!("{} unexpected bytes at close", rest.len())));
        }
        Ok::<_, io::Error>(round)
    })();
    if let Err(e) = result {
        tally.lock().expect("tally").fail(format!("stream: {e}"));
    }
}
