//! A small TCP application that runs inside simulated pods: a server that reports what it saw,
//! and clients for the tests and benchmarks. Every result is one JSON document on stdout.
//!
//! Protocol (client speaks first, one command line):
//! * `HELLO`      → server answers `{"server","local","peer"}` and closes.
//! * `SINK <n>`   → client sends n bytes then shuts down its write side; server answers
//!   `{"server","peer","bytes","sha256"}` (so half-close must work end to end).
//! * `ECHO`       → server echoes everything until EOF.
//!
//! Client mode `hold` keeps one ECHO connection open for as long as its stdin is: each stdin
//! line is sent and must come back unchanged, one JSON line per round on stdout. Tests use it
//! to check that an established connection outlives some event (a control-plane restart).
//! Client mode `idle` echoes one line, then stays silent and reports whether (and when) the
//! other side closed the connection (an idle timeout).
#![forbid(unsafe_code)]

use std::{
    io::{self, BufRead, BufReader, Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    time::{Duration, Instant},
};

use serde_json::{Value, json};
use sha2::{Digest, Sha256};

mod grpc;
mod http;
mod many;
mod steady;
mod tls;

const IO_TIMEOUT: Duration = Duration::from_secs(30);

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(cmd) = args.first() else { usage() };
    let opt = |name: &str| -> Option<String> {
        args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned()
    };
    let opts = |name: &str| -> Vec<String> {
        args.windows(2).filter(|w| w[0] == name).map(|w| w[1].clone()).collect()
    };
    let num = |name: &str, default: u64| -> u64 {
        opt(name)
            .map(|v| v.parse().unwrap_or_else(|_| fail(&format!("{name}: not a number"))))
            .unwrap_or(default)
    };
    let to = || -> SocketAddr {
        opt("--to").unwrap_or_else(|| usage()).parse().unwrap_or_else(|_| fail("--to: not ip:port"))
    };
    let result = match cmd.as_str() {
        "serve" => {
            let name = opt("--name").unwrap_or_else(|| "server".into());
            serve(&name, &opts("--listen"));
            return;
        }
        "http-serve" => {
            let name = opt("--name").unwrap_or_else(|| "server".into());
            let always = opt("--status").map(|c| {
                c.parse::<u16>()
                    .ok()
                    .and_then(|c| hyper::StatusCode::from_u16(c).ok())
                    .unwrap_or_else(|| fail("--status: not an HTTP status"))
            });
            if let Some(to) = opt("--forward-to") {
                let to = to.parse().unwrap_or_else(|_| fail("--forward-to: not ip:port"));
                let _ = http::FORWARD_TO.set(to);
            }
            if let Err(e) = http::serve(&name, &opts("--listen"), always) {
                fail(&format!("http-serve: {e}"));
            }
            return;
        }
        "grpc-serve" => {
            let name = opt("--name").unwrap_or_else(|| "server".into());
            if let Err(e) = grpc::serve(&name, &opts("--listen")) {
                fail(&format!("grpc-serve: {e}"));
            }
            return;
        }
        "grpc-client" => grpc::client(to(), num("--calls", 1) as usize, num("--messages", 3) as usize),
        "http-client" => http::client(&http::Ask {
            to: to(),
            method: opt("--method").unwrap_or_else(|| "GET".into()),
            requests: num("--requests", 1) as usize,
            path: opt("--path").unwrap_or_else(|| "/".into()),
            host: opt("--host"),
            headers: opts("--header")
                .iter()
                .filter_map(|h| h.split_once(':').map(|(k, v)| (k.trim().to_string(), v.trim().to_string())))
                .collect(),
            h2: args.iter().any(|a| a == "--h2"),
            http10: args.iter().any(|a| a == "--http10"),
            upgrade: args.iter().any(|a| a == "--upgrade"),
            duration: opt("--duration-ms").map(|_| Duration::from_millis(num("--duration-ms", 0))),
            concurrency: num("--concurrency", 1).max(1) as usize,
        }),
        "client" => match opt("--mode").as_deref().unwrap_or("hello") {
            "hello" => hello_many(to(), num("--connections", 1) as usize, opt("--sni").as_deref()),
            "sink" => sink(to(), num("--bytes", 1024)),
            "hold" => hold(to()),
            "idle" => idle(to(), Duration::from_millis(num("--wait-ms", 5000))),
            other => fail(&format!("unknown mode {other}")),
        },
        "many-serve" => many::serve(
            opt("--listen").and_then(|a| a.parse().ok()).unwrap_or_else(|| usage()),
            opt("--count-file").map(Into::into).unwrap_or_else(|| usage()),
        ),
        "many-connect" => {
            many::connect(to(), num("--connections", 1) as usize, num("--concurrency", 256).max(1) as usize)
        }
        "steady" => {
            let addr = |flag: &str| opt(flag).and_then(|a| a.parse().ok()).unwrap_or_else(|| usage());
            steady::run(&steady::Steady {
                http: addr("--http"),
                tcp: addr("--tcp"),
                duration: Duration::from_secs(num("--seconds", 10)),
                keepalive_clients: num("--keepalive", 4) as usize,
                fresh_clients: num("--fresh", 2) as usize,
                streams: num("--streams", 4) as usize,
                fresh_tcp_clients: num("--fresh-tcp", 0) as usize,
            })
        }
        "bench-connect" => bench_connect(to(), num("--count", 1000)),
        "bench-latency" => {
            bench_latency(to(), num("--rate", 1000), num("--count", 5000), num("--size", 1024) as usize)
        }
        "bench-bulk" => bench_bulk(to(), num("--bytes", 1 << 30)),
        "bench-http" => http::bench(&http::Bench {
            to: to(),
            h2: args.iter().any(|a| a == "--h2"),
            rate: num("--rate", 1000),
            count: num("--count", 5000),
            concurrency: num("--concurrency", 16) as usize,
            duration: Duration::from_millis(num("--duration-ms", 5000)),
        }),
        _ => usage(),
    };
    match result {
        Ok(v) => println!("{v}"),
        Err(e) => println!("{}", json!({ "error": e.kind().to_string(), "message": e.to_string() })),
    }
}

fn usage() -> ! {
    fail(
        "usage: nm-testapp serve|http-serve --name N --listen ADDR... [--status CODE] | grpc-serve --name N --listen ADDR... | grpc-client --to ADDR [--calls N] [--messages M] | http-client --to ADDR [--requests N] [--method M] [--path P] [--host H] [--header K:V]... [--duration-ms D] [--h2 [--concurrency C]|--http10|--upgrade] | client --to ADDR --mode hello|sink|hold [--connections C] [--sni NAME] [--bytes N] | many-serve --listen ADDR --count-file F | many-connect --to ADDR --connections N [--concurrency C] | bench-connect|bench-latency|bench-bulk|bench-http --to ADDR [--h2] [--rate R --count N --concurrency C --duration-ms D] | steady --http ADDR --tcp ADDR [--seconds S] [--keepalive N] [--fresh N] [--streams N] [--fresh-tcp N]",
    )
}

fn fail(msg: &str) -> ! {
    eprintln!("nm-testapp: {msg}");
    std::process::exit(2)
}

fn serve(name: &str, listen: &[String]) {
    if listen.is_empty() {
        usage();
    }
    let handles: Vec<_> = listen
        .iter()
        .map(|addr| {
            let listener = TcpListener::bind(addr).unwrap_or_else(|e| fail(&format!("bind {addr}: {e}")));
            let name = name.to_string();
            std::thread::spawn(move || {
                for stream in listener.incoming().flatten() {
                    let name = name.clone();
                    std::thread::spawn(move || {
                        let _ = handle(&name, stream);
                    });
                }
            })
        })
        .collect();
    eprintln!("nm-testapp: {name} listening on {listen:?}");
    for h in handles {
        let _ = h.join();
    }
}

fn handle(name: &str, stream: TcpStream) -> io::Result<()> {
    stream.set_nodelay(true)?;
    let peer = stream.peer_addr()?;
    let local = stream.local_addr()?;
    let mut reader = BufReader::new(stream.try_clone()?);
    // A client may open with a TLS ClientHello (`client --sni`): noted, then skipped.
    let tls = reader.fill_buf()?.first() == Some(&tls::HANDSHAKE);
    if tls {
        reader.consume(1);
        tls::skip_record(&mut reader)?;
    }
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let mut out = stream;
    let words: Vec<&str> = line.split_whitespace().collect();
    match words.as_slice() {
        ["HELLO"] => writeln!(out, "{}", json!({"server": name, "local": local, "peer": peer, "tls": tls}))?,
        ["SINK", n] => {
            let expected: u64 = n.parse().map_err(io::Error::other)?;
            let mut hasher = Sha256::new();
            let mut buf = vec![0u8; 64 * 1024];
            let mut total = 0u64;
            loop {
                let got = reader.read(&mut buf)?;
                if got == 0 {
                    break;
                }
                hasher.update(&buf[..got]);
                total += got as u64;
            }
            let digest = hex(&hasher.finalize());
            writeln!(
                out,
                "{}",
                json!({"server": name, "peer": peer, "bytes": total, "expected": expected, "sha256": digest})
            )?;
        }
        ["ECHO"] => {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let got = reader.read(&mut buf)?;
                if got == 0 {
                    break;
                }
                out.write_all(&buf[..got])?;
            }
        }
        _ => writeln!(out, "{}", json!({"error": format!("unknown command {line:?}")}))?,
    }
    out.flush()?;
    out.shutdown(Shutdown::Write)
}

fn connect(to: SocketAddr) -> io::Result<TcpStream> {
    let s = TcpStream::connect_timeout(&to, IO_TIMEOUT)?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    s.set_nodelay(true)?;
    Ok(s)
}

fn read_json_line(s: &TcpStream) -> io::Result<Value> {
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line)?;
    if line.is_empty() {
        return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "connection closed without a reply"));
    }
    serde_json::from_str(&line).map_err(io::Error::other)
}

/// Opens all connections first (so they are concurrent), then talks on each.
/// `n` connections at once, each saying HELLO (after a TLS ClientHello for `sni`, if given).
fn hello_many(to: SocketAddr, n: usize, sni: Option<&str>) -> io::Result<Value> {
    let hello = match sni {
        Some(name) => tls::client_hello(name)?,
        None => Vec::new(),
    };
    let started = Instant::now();
    let mut conns = Vec::with_capacity(n);
    for _ in 0..n {
        // A reset that lands right after the handshake surfaces in connect's own SO_ERROR check.
        let s = connect(to).map_err(at("connect"))?;
        conns.push((s.local_addr()?, s.peer_addr().map_err(at("connect"))?, s));
    }
    let mut results = Vec::with_capacity(n);
    for (local, peername, mut s) in conns.iter().map(|(l, p, s)| (l, p, s)) {
        s.write_all(&hello).map_err(at("write"))?;
        s.write_all(b"HELLO\n").map_err(at("write"))?;
        s.shutdown(Shutdown::Write).map_err(at("shutdown"))?;
        let reply = read_json_line(s).map_err(at("read"))?;
        results.push(json!({"local": local, "peername": peername, "reply": reply}));
    }
    Ok(json!({"connections": results, "elapsed_ms": started.elapsed().as_millis() as u64}))
}

/// Names the step that failed in the error's message, keeping its kind (a reset surfaces at
/// whichever step the RST overtakes: the write, the shutdown or the read).
fn at(step: &'static str) -> impl Fn(io::Error) -> io::Error {
    move |e| io::Error::new(e.kind(), format!("{step}: {e}"))
}

/// Deterministic pseudo-random payload so the checksum means something.
fn payload_chunk(seed: &mut u64, buf: &mut [u8]) {
    for b in buf.iter_mut() {
        *seed ^= *seed << 13;
        *seed ^= *seed >> 7;
        *seed ^= *seed << 17;
        *b = *seed as u8;
    }
}

fn sink(to: SocketAddr, bytes: u64) -> io::Result<Value> {
    let started = Instant::now();
    let mut s = connect(to)?;
    let (local, peername) = (s.local_addr()?, s.peer_addr()?);
    writeln!(s, "SINK {bytes}")?;
    let mut hasher = Sha256::new();
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut buf = vec![0u8; 64 * 1024];
    let mut left = bytes;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        payload_chunk(&mut seed, &mut buf[..n]);
        hasher.update(&buf[..n]);
        s.write_all(&buf[..n])?;
        left -= n as u64;
    }
    s.shutdown(Shutdown::Write)?;
    let reply = read_json_line(&s)?;
    let secs = started.elapsed().as_secs_f64();
    Ok(json!({
        "local": local, "peername": peername, "sent_sha256": hex(&hasher.finalize()),
        "reply": reply, "secs": secs,
        "mbit_per_s": bytes as f64 * 8.0 / secs / 1e6,
    }))
}

/// One ECHO connection driven by stdin; see the module docs. Prints `{"connected"}` first, then
/// `{"echoed"}` per line, then `{"closed"}` once stdin ends and the server has closed its side.
/// Any failure ends the process with the error, so a broken connection cannot go unnoticed.
fn hold(to: SocketAddr) -> io::Result<Value> {
    let mut s = connect(to)?;
    let (local, peername) = (s.local_addr()?, s.peer_addr()?);
    s.write_all(b"ECHO\n")?;
    let mut out = io::stdout().lock();
    writeln!(out, "{}", json!({"connected": {"local": local, "peername": peername}}))?;
    out.flush()?;
    let mut rounds = 0u64;
    for line in io::stdin().lock().lines() {
        let sent = format!("{}\n", line?);
        s.write_all(sent.as_bytes())?;
        let mut back = vec![0u8; sent.len()];
        s.read_exact(&mut back)?;
        if back != sent.as_bytes() {
            return Err(io::Error::other(format!(
                "echo mismatch: sent {sent:?}, got {:?}",
                String::from_utf8_lossy(&back)
            )));
        }
        rounds += 1;
        writeln!(out, "{}", json!({"echoed": sent.trim_end(), "rounds": rounds}))?;
        out.flush()?;
    }
    s.shutdown(Shutdown::Write)?;
    let mut rest = Vec::new();
    s.read_to_end(&mut rest)?;
    if !rest.is_empty() {
        return Err(io::Error::other(format!("{} unexpected bytes after close", rest.len())));
    }
    Ok(json!({"closed": true, "rounds": rounds, "local": local}))
}

/// One ECHO connection that echoes one line, then sends nothing and waits up to `wait` for
/// the other side to close it: `{"closed_after_ms", "how"}` (counted from the echo; `how` is
/// `eof` or the error), or `{"open_after_ms"}` if it is still open then.
fn idle(to: SocketAddr, wait: Duration) -> io::Result<Value> {
    let mut s = connect(to)?;
    s.write_all(b"ECHO\nping\n")?;
    let mut back = [0u8; 5];
    s.read_exact(&mut back)?;
    let idle_since = Instant::now();
    s.set_read_timeout(Some(wait))?;
    let mut buf = [0u8; 64];
    let how = match s.read(&mut buf) {
        Ok(0) => "eof".to_string(),
        Ok(n) => return Err(io::Error::other(format!("{n} unexpected bytes while idle"))),
        Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
            return Ok(json!({"open_after_ms": idle_since.elapsed().as_millis() as u64}));
        }
        Err(e) => e.kind().to_string(),
    };
    Ok(json!({"closed_after_ms": idle_since.elapsed().as_millis() as u64, "how": how}))
}

fn bench_connect(to: SocketAddr, count: u64) -> io::Result<Value> {
    let started = Instant::now();
    for _ in 0..count {
        let mut s = connect(to)?;
        s.write_all(b"HELLO\n")?;
        read_json_line(&s)?;
    }
    let secs = started.elapsed().as_secs_f64();
    Ok(json!({"count": count, "secs": secs, "per_sec": count as f64 / secs}))
}

/// Open-loop: request i is due at start + i/rate, and its latency counts from when it was due,
/// so a stall shows up in the tail instead of silently slowing the sender.
fn bench_latency(to: SocketAddr, rate: u64, count: u64, size: usize) -> io::Result<Value> {
    let mut s = connect(to)?;
    s.write_all(b"ECHO\n")?;
    let msg = vec![0x5au8; size];
    let mut back = vec![0u8; size];
    let mut lat_us = Vec::with_capacity(count as usize);
    let interval = Duration::from_secs_f64(1.0 / rate as f64);
    let start = Instant::now();
    for i in 0..count {
        let due = start + interval * i as u32;
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        s.write_all(&msg)?;
        s.read_exact(&mut back)?;
        lat_us.push(due.elapsed().as_secs_f64() * 1e6);
    }
    lat_us.sort_by(f64::total_cmp);
    let pct = |p: f64| lat_us[((lat_us.len() as f64 - 1.0) * p).round() as usize];
    Ok(
        json!({"count": count, "rate": rate, "size": size, "p50_us": pct(0.50), "p99_us": pct(0.99), "max_us": pct(1.0)}),
    )
}

fn bench_bulk(to: SocketAddr, bytes: u64) -> io::Result<Value> {
    let v = sink(to, bytes)?;
    if v["reply"]["sha256"] != v["sent_sha256"] {
        return Err(io::Error::other("bulk transfer arrived corrupted"));
    }
    Ok(json!({"bytes": bytes, "secs": v["secs"], "mbit_per_s": v["mbit_per_s"]}))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
