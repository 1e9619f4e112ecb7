//! HTTP for the tests: a server that reports what each request looked like on arrival, and a
//! client that sends many requests over one connection (or raw HTTP/1.0, one per connection).
//!
//! Server (HTTP/1.x and h2c on the same port), per request, a JSON body:
//! `{"server","method","path","host","version","peer","headers"}`. `/status/<code>` answers
//! with that status; `/flaky/<n>` answers 503 to every n-th request it gets and 200 otherwise;
//! `/delay/<ms>` answers after that long; `/slow-on/<server>/<ms>` too, but only on the server
//! of that name (the others answer at once); `/reset` closes the connection unanswered;
//! `/stats` answers `{"served": n, "last_host"}`: the requests this server answered before it,
//! and the Host of the last one. A request with `Upgrade: nm-echo` is switched (101) to an
//! echo stream. With `--forward-to`, every request is passed on with its trace headers (see
//! [`FORWARD_TO`]).

use std::{
    collections::BTreeMap,
    convert::Infallible,
    io::{self, Read, Write},
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper::{Request, Response, StatusCode, Version, body::Incoming, header, service::service_fn};
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
};
use serde_json::{Value, json};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    sync::Notify,
};

pub(crate) fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("tokio runtime")
}

/// Serves until killed; with `always`, every answer but `/stats` has that status (a broken
/// backend for outlier detection).
pub(crate) fn serve(name: &str, listen: &[String], always: Option<StatusCode>) -> io::Result<()> {
    runtime().block_on(async {
        let mut tasks = Vec::new();
        for addr in listen {
            let listener = tokio::net::TcpListener::bind(addr).await?;
            let name = name.to_string();
            tasks.push(tokio::spawn(async move {
                loop {
                    let Ok((stream, peer)) = listener.accept().await else { continue };
                    let name = name.clone();
                    tokio::spawn(async move {
                        let reset = Arc::new(Notify::new());
                        let service = service_fn({
                            let reset = Arc::clone(&reset);
                            move |req| {
                                let (name, reset) = (name.clone(), Arc::clone(&reset));
                                async move { Ok::<_, Infallible>(answer(&name, peer, req, always, &reset).await) }
                            }
                        });
                        let builder = auto::Builder::new(TokioExecutor::new());
                        let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
                        // `/reset`: the connection is dropped unanswered, as by a crashing server.
                        tokio::select! {
                            _ = conn => {}
                            () = reset.notified() => {}
                        }
                    });
                }
            }));
        }
        eprintln!("nm-testapp: {name} serving HTTP on {listen:?}");
        for t in tasks {
            let _ = t.await;
        }
        Ok(())
    })
}

type Body = http_body_util::combinators::BoxBody<Bytes, hyper::Error>;

/// `http-serve --forward-to ADDR`: every request (but `/stats`) is passed on to ADDR with the
/// trace headers an instrumented application forwards, and answered with what came back — a
/// middle hop of a traced call chain.
pub(crate) static FORWARD_TO: std::sync::OnceLock<SocketAddr> = std::sync::OnceLock::new();

/// The headers that carry a trace from one hop to the next (W3C, B3, Envoy's request id).
const TRACE_HEADERS: [&str; 9] = [
    "traceparent",
    "tracestate",
    "b3",
    "x-b3-traceid",
    "x-b3-spanid",
    "x-b3-parentspanid",
    "x-b3-sampled",
    "x-b3-flags",
    "x-request-id",
];

/// Passes a request for `path` with `headers`' trace headers on to `to`; its answer.
async fn forward(to: SocketAddr, path: &str, headers: &hyper::HeaderMap) -> Response<Body> {
    let answer = async {
        let stream = tokio::net::TcpStream::connect(to).await.map_err(|e| e.to_string())?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        let mut request = Request::get(path).header(header::HOST, to.to_string());
        for name in TRACE_HEADERS {
            if let Some(v) = headers.get(name) {
                request = request.header(name, v);
            }
        }
        let request = request.body(Empty::<Bytes>::new()).map_err(|e| e.to_string())?;
        let response = sender.send_request(request).await.map_err(|e| e.to_string())?;
        let (parts, body) = response.into_parts();
        let body = body.collect().await.map_err(|e| e.to_string())?.to_bytes();
        Ok::<_, String>(Response::from_parts(parts, Full::new(body).map_err(|e| match e {}).boxed()))
    };
    answer.await.unwrap_or_else(|e| {
        let mut r = Response::new(
            Full::new(Bytes::from(format!("forwarding to {to}: {e}\n"))).map_err(|e| match e {}).boxed(),
        );
        *r.status_mut() = StatusCode::BAD_GATEWAY;
        r
    })
}

/// Requests answered (except `/stats`), and `/flaky` requests seen.
static SERVED: AtomicU64 = AtomicU64::new(0);
/// The Host (or authority) of the last request answered, for `/stats`.
static LAST_HOST: std::sync::Mutex<String> = std::sync::Mutex::new(String::new());
static FLAKY: AtomicU64 = AtomicU64::new(0);

async fn answer(
    name: &str,
    peer: SocketAddr,
    mut req: Request<Incoming>,
    always: Option<StatusCode>,
    reset: &Notify,
) -> Response<Body> {
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_string)
        .or_else(|| req.uri().authority().map(|a| a.to_string()));
    let headers: BTreeMap<String, String> = req
        .headers()
        .iter()
        .map(|(k, v)| (k.to_string(), String::from_utf8_lossy(v.as_bytes()).into_owned()))
        .collect();
    let report = json!({
        "server": name, "method": req.method().as_str(), "path": req.uri().path(),
        "query": req.uri().query(), "host": host, "version": format!("{:?}", req.version()),
        "peer": peer, "headers": headers,
    });
    if req.headers().get(header::UPGRADE).is_some_and(|u| u == "nm-echo") {
        let upgrade = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            if let Ok(upgraded) = upgrade.await {
                let mut io = TokioIo::new(upgraded);
                let mut buf = vec![0u8; 16 * 1024];
                while let Ok(n) = io.read(&mut buf).await {
                    if n == 0 || io.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            }
        });
        let mut r = Response::new(Empty::new().map_err(|e| match e {}).boxed());
        *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        r.headers_mut().insert(header::UPGRADE, "nm-echo".parse().expect("header"));
        r.headers_mut().insert(header::CONNECTION, "upgrade".parse().expect("header"));
        return r;
    }
    let headers = req.headers().clone();
    let _ = req.into_body().collect().await;
    let path = report["path"].as_str().unwrap_or_default();
    if let Some(to) = FORWARD_TO.get()
        && path != "/stats"
    {
        return forward(*to, path, &headers).await;
    }
    if path == "/stats" {
        let last_host = LAST_HOST.lock().map(|h| h.clone()).unwrap_or_default();
        let stats = json!({"server": name, "served": SERVED.load(Ordering::Relaxed), "last_host": last_host});
        return Response::new(Full::new(Bytes::from(format!("{stats}\n"))).map_err(|e| match e {}).boxed());
    }
    SERVED.fetch_add(1, Ordering::Relaxed);
    if let (Ok(mut last), Some(host)) = (LAST_HOST.lock(), report["host"].as_str()) {
        *last = host.to_string();
    }
    if path == "/reset" {
        reset.notify_one();
        std::future::pending::<()>().await;
    }
    if let Some(ms) = path.strip_prefix("/delay/").and_then(|ms| ms.parse::<u64>().ok()) {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    if let Some((server, ms)) = path.strip_prefix("/slow-on/").and_then(|rest| rest.split_once('/'))
        && server == name
        && let Ok(ms) = ms.parse::<u64>()
    {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    let flaky = path.strip_prefix("/flaky/").and_then(|n| n.parse::<u64>().ok()).filter(|n| *n > 0);
    let status = match flaky {
        _ if always.is_some() => always.unwrap_or(StatusCode::OK),
        Some(n) if (FLAKY.fetch_add(1, Ordering::Relaxed) + 1).is_multiple_of(n) => {
            StatusCode::SERVICE_UNAVAILABLE
        }
        Some(_) => StatusCode::OK,
        None => path
            .strip_prefix("/status/")
            .and_then(|c| c.parse::<u16>().ok())
            .and_then(|c| StatusCode::from_u16(c).ok())
            .unwrap_or(StatusCode::OK),
    };
    let mut r = Response::new(Full::new(Bytes::from(format!("{report}\n"))).map_err(|e| match e {}).boxed());
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, "application/json".parse().expect("header"));
    r
}

/// What the client was asked to send.
pub(crate) struct Ask {
    pub to: SocketAddr,
    /// GET unless asked.
    pub method: String,
    pub requests: usize,
    pub path: String,
    pub host: Option<String>,
    pub headers: Vec<(String, String)>,
    pub h2: bool,
    pub http10: bool,
    pub upgrade: bool,
    /// Keep sending (sequentially, on the one connection) until this much time has passed,
    /// instead of a fixed number of requests.
    pub duration: Option<Duration>,
    /// With `h2`: streams in flight at once (the requests are spread over them).
    pub concurrency: usize,
}

/// Tallies of what came back: replies by server and by status, the first reply in full.
#[derive(Default)]
struct Tally {
    servers: BTreeMap<String, usize>,
    statuses: BTreeMap<u16, usize>,
    first: Option<Value>,
    /// The client addresses the servers saw (the proxy's upstream connections).
    peers: std::collections::BTreeSet<String>,
    /// The `x-ratelimit-*` headers of the last response that had them.
    rate_limit: Option<Value>,
}

impl Tally {
    fn add(&mut self, status: u16, body: &[u8]) {
        *self.statuses.entry(status).or_default() += 1;
        let reply: Value =
            serde_json::from_slice(body).unwrap_or_else(|_| json!({"text": String::from_utf8_lossy(body)}));
        if let Some(server) = reply["server"].as_str() {
            *self.servers.entry(server.to_string()).or_default() += 1;
        }
        if let Some(peer) = reply["peer"].as_str() {
            self.peers.insert(peer.to_string());
        }
        self.first.get_or_insert(reply);
    }

    /// Reads a response to the end and tallies it, its `x-ratelimit-*` headers included.
    async fn record(&mut self, resp: Response<hyper::body::Incoming>) -> io::Result<()> {
        let status = resp.status().as_u16();
        let headers = resp.headers();
        let get = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        if let Some(limit) = get("x-ratelimit-limit") {
            self.rate_limit = Some(json!({"limit": limit, "remaining": get("x-ratelimit-remaining"),
                                         "reset": get("x-ratelimit-reset")}));
        }
        let body = resp.into_body().collect().await.map_err(io::Error::other)?.to_bytes();
        self.add(status, &body);
        Ok(())
    }

    fn into_json(self, connections: usize, started: std::time::Instant) -> Value {
        json!({"servers": self.servers, "statuses": self.statuses, "first": self.first, "connections": connections,
               "upstream_connections": self.peers.len(), "rate_limit": self.rate_limit,
               "elapsed_ms": started.elapsed().as_millis() as u64})
    }
}

pub(crate) fn client(ask: &Ask) -> io::Result<Value> {
    if ask.http10 {
        return http10(ask);
    }
    runtime().block_on(async {
        let stream = tokio::time::timeout(Duration::from_secs(10), tokio::net::TcpStream::connect(ask.to))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))??;
        let io = TokioIo::new(stream);
        let authority = ask.host.clone().unwrap_or_else(|| ask.to.to_string());
        let build = |path: &str| {
            let mut b = Request::builder().method(ask.method.as_str());
            b = if ask.h2 {
                b.uri(format!("http://{authority}{path}")).version(Version::HTTP_2)
            } else {
                b.uri(path).header(header::HOST, &authority)
            };
            for (k, v) in &ask.headers {
                b = b.header(k, v);
            }
            b
        };
        let mut tally = Tally::default();
        let started = std::time::Instant::now();
        let more = |sent: usize| match ask.duration {
            Some(d) => started.elapsed() < d,
            None => sent < ask.requests,
        };
        if ask.h2 {
            let (mut sender, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                .await
                .map_err(io::Error::other)?;
            tokio::spawn(conn);
            if ask.concurrency > 1 {
                // `requests` spread over `concurrency` streams in flight at once.
                let mut tasks = Vec::new();
                for i in 0..ask.concurrency {
                    let share =
                        ask.requests / ask.concurrency + usize::from(i < ask.requests % ask.concurrency);
                    let requests: Vec<_> = (0..share)
                        .map(|_| build(&ask.path).body(Empty::<Bytes>::new()).map_err(io::Error::other))
                        .collect::<io::Result<_>>()?;
                    let mut sender = sender.clone();
                    tasks.push(tokio::spawn(async move {
                        let mut answers = Vec::new();
                        for req in requests {
                            let resp = sender.send_request(req).await.map_err(io::Error::other)?;
                            let status = resp.status().as_u16();
                            let body = resp.into_body().collect().await.map_err(io::Error::other)?.to_bytes();
                            answers.push((status, body));
                        }
                        Ok::<_, io::Error>(answers)
                    }));
                }
                for t in tasks {
                    for (status, body) in t.await.map_err(io::Error::other)?? {
                        tally.add(status, &body);
                    }
                }
                return Ok(tally.into_json(1, started));
            }
            let mut sent = 0;
            while more(sent) {
                sent += 1;
                let req = build(&ask.path).body(Empty::<Bytes>::new()).map_err(io::Error::other)?;
                tally.record(sender.send_request(req).await.map_err(io::Error::other)?).await?;
            }
            return Ok(tally.into_json(1, started));
        }
        let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await.map_err(io::Error::other)?;
        tokio::spawn(conn.with_upgrades());
        if ask.upgrade {
            let req = build(&ask.path)
                .header(header::CONNECTION, "upgrade")
                .header(header::UPGRADE, "nm-echo")
                .body(Empty::<Bytes>::new())
                .map_err(io::Error::other)?;
            let resp = sender.send_request(req).await.map_err(io::Error::other)?;
            let status = resp.status().as_u16();
            if status != 101 {
                return Ok(json!({"status": status, "echoed": false}));
            }
            let mut io = TokioIo::new(hyper::upgrade::on(resp).await.map_err(io::Error::other)?);
            let msg = b"through the tunnel";
            io.write_all(msg).await?;
            let mut back = vec![0u8; msg.len()];
            io.read_exact(&mut back).await?;
            return Ok(json!({"status": status, "echoed": back == msg}));
        }
        let mut sent = 0;
        while more(sent) {
            sent += 1;
            sender.ready().await.map_err(io::Error::other)?;
            let req = build(&ask.path).body(Empty::<Bytes>::new()).map_err(io::Error::other)?;
            tally.record(sender.send_request(req).await.map_err(io::Error::other)?).await?;
        }
        Ok(tally.into_json(1, started))
    })
}

/// HTTP/1.0 the way health checkers send it: one connection per request, no `Host` unless
/// asked, the response read to EOF.
fn http10(ask: &Ask) -> io::Result<Value> {
    let mut tally = Tally::default();
    let started = std::time::Instant::now();
    for _ in 0..ask.requests {
        let mut s = std::net::TcpStream::connect_timeout(&ask.to, Duration::from_secs(10))?;
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        let mut head = format!("GET {} HTTP/1.0\r\n", ask.path);
        if let Some(h) = &ask.host {
            head.push_str(&format!("Host: {h}\r\n"));
        }
        for (k, v) in &ask.headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        head.push_str("\r\n");
        s.write_all(head.as_bytes())?;
        let mut raw = Vec::new();
        s.read_to_end(&mut raw)?;
        let split = raw.windows(4).position(|w| w == b"\r\n\r\n").ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("no response head in {:?}", String::from_utf8_lossy(&raw)),
            )
        })?;
        let status_line =
            String::from_utf8_lossy(&raw[..split]).lines().next().unwrap_or_default().to_string();
        let status: u16 = status_line.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
        tally.add(status, &raw[split + 4..]);
    }
    Ok(tally.into_json(ask.requests, started))
}

/// HTTP benchmarks, one JSON result:
/// * `latency`: one connection, open loop at `rate` requests/s for `count` requests, each
///   timed from its scheduled send (a stall shows in the tail): p50/p99/max in µs.
/// * `rps`: `concurrency` requests in flight for `duration` (HTTP/1.1: that many keep-alive
///   connections; h2: that many streams on one connection): requests per second.
pub(crate) struct Bench {
    pub to: SocketAddr,
    pub h2: bool,
    pub rate: u64,
    pub count: u64,
    pub concurrency: usize,
    pub duration: Duration,
}

type H2Sender = hyper::client::conn::http2::SendRequest<Empty<Bytes>>;
type H1Sender = hyper::client::conn::http1::SendRequest<Empty<Bytes>>;

enum Conn {
    H1(H1Sender),
    H2(H2Sender),
}

impl Conn {
    async fn open(to: SocketAddr, h2: bool) -> io::Result<Conn> {
        let stream = tokio::net::TcpStream::connect(to).await?;
        stream.set_nodelay(true)?;
        let io = TokioIo::new(stream);
        Ok(if h2 {
            let (s, c) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                .await
                .map_err(io::Error::other)?;
            tokio::spawn(c);
            Conn::H2(s)
        } else {
            let (s, c) = hyper::client::conn::http1::handshake(io).await.map_err(io::Error::other)?;
            tokio::spawn(c);
            Conn::H1(s)
        })
    }

    /// One GET, body read in full; errors on a non-200.
    async fn get(&mut self, to: SocketAddr) -> io::Result<()> {
        let resp = match self {
            Conn::H1(s) => {
                s.ready().await.map_err(io::Error::other)?;
                let req = Request::get("/")
                    .header(header::HOST, to.to_string())
                    .body(Empty::new())
                    .map_err(io::Error::other)?;
                s.send_request(req).await
            }
            Conn::H2(s) => {
                let req = Request::get(format!("http://{to}/"))
                    .version(Version::HTTP_2)
                    .body(Empty::new())
                    .map_err(io::Error::other)?;
                s.send_request(req).await
            }
        }
        .map_err(io::Error::other)?;
        let status = resp.status();
        resp.into_body().collect().await.map_err(io::Error::other)?;
        if status != StatusCode::OK {
            return Err(io::Error::other(format!("status {status}")));
        }
        Ok(())
    }

    fn clone_h2(&self) -> Option<Conn> {
        match self {
            Conn::H2(s) => Some(Conn::H2(s.clone())),
            Conn::H1(_) => None,
        }
    }
}

pub(crate) fn bench(b: &Bench) -> io::Result<Value> {
    runtime().block_on(async {
        let mut conn = Conn::open(b.to, b.h2).await?;
        // Warm up: the connection, the proxy's upstream pool.
        for _ in 0..100 {
            conn.get(b.to).await?;
        }
        let interval = Duration::from_secs_f64(1.0 / b.rate.max(1) as f64);
        let start = tokio::time::Instant::now();
        let mut lat_us = Vec::with_capacity(b.count as usize);
        for i in 0..b.count {
            let due = start + interval * i as u32;
            // A thread sleep, not tokio's timer: that one wakes up to 1 ms late, which would
            // count as latency. This thread only drives the loop; connections run on workers.
            if let Some(wait) = due.checked_duration_since(tokio::time::Instant::now()) {
                std::thread::sleep(wait);
            }
            conn.get(b.to).await?;
            lat_us.push(due.elapsed().as_secs_f64() * 1e6);
        }
        lat_us.sort_by(f64::total_cmp);
        let pct = |p: f64| lat_us[((lat_us.len() as f64 - 1.0) * p).round() as usize];

        let mut workers = Vec::new();
        for _ in 0..b.concurrency {
            let mut c = match conn.clone_h2() {
                Some(c) => c,
                None => Conn::open(b.to, false).await?,
            };
            let (to, duration) = (b.to, b.duration);
            workers.push(tokio::spawn(async move {
                let started = tokio::time::Instant::now();
                let mut done = 0u64;
                while started.elapsed() < duration {
                    c.get(to).await?;
                    done += 1;
                }
                Ok::<u64, io::Error>(done)
            }));
        }
        let mut total = 0;
        for w in workers {
            total += w.await.map_err(io::Error::other)??;
        }
        Ok(json!({
            "p50_us": pct(0.50), "p99_us": pct(0.99), "max_us": pct(1.0),
            "rps": total as f64 / b.duration.as_secs_f64(),
        }))
    })
}
