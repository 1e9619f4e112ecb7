//! The client side of HBONE: pooled mTLS HTTP/2 connections to other nodes' tunnels, one
//! CONNECT stream per proxied connection.
//!
//! Connections are pooled per (source identity, tunnel address, destination identity): the
//! certificate a connection presents and the one it accepted are fixed at its handshake, so
//! only streams of the same identity pair may share it. A connection carries up to
//! [`STREAMS_PER_CONNECTION`] streams (below the server's limit, so a stream never queues);
//! beyond that another is opened. Dials for one key are serialised, so a burst of thousands of
//! connects opens a handful of connections, not thousands.

use std::{
    collections::HashMap,
    io,
    net::{IpAddr, SocketAddr},
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::{Duration, Instant, SystemTime},
};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::{Method, Request, StatusCode, client::conn::http2::SendRequest, upgrade::Upgraded};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use nodemesh_api::identity::SpiffeId;
use rustls::pki_types::ServerName;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpSocket, TcpStream},
};

use super::{
    BAGGAGE, FORWARDED, PROTOCOL_HEADER, SERVICE_HEADER, caller_baggage, credentials::Credentials,
    forwarded_for, service_header,
};
use crate::identity::server_name;
use crate::policy::lb::TunnelTarget;
use crate::telemetry::labels::Caller;

/// Streams one pooled connection carries before another is opened.
pub const STREAMS_PER_CONNECTION: usize = 1000;
/// HTTP/2 flow-control windows: a stream may have this much in flight before the receiver
/// reads, a connection its multiple — big enough for full-speed bulk transfer between nodes.
pub const STREAM_WINDOW: u32 = 4 * 1024 * 1024;
pub const CONNECTION_WINDOW: u32 = 16 * 1024 * 1024;

#[derive(Clone, PartialEq, Eq, Hash, Debug)]
struct PoolKey {
    source: SpiffeId,
    tunnel: SocketAddr,
    destination: SpiffeId,
}

struct Connection {
    sender: SendRequest<Empty<Bytes>>,
    streams: AtomicUsize,
    /// When our certificate on it is due for renewal, and the identities version it was made
    /// with: once a renewed one exists, new streams go on a connection presenting it.
    own_renewal: SystemTime,
    cert_version: u64,
    /// When the peer's certificate expires: a new connection may meet its renewed one.
    peer_expiry: Option<SystemTime>,
    /// A request on it failed before any answer (the peer sent GOAWAY: it is draining):
    /// no new stream goes on it.
    refused: AtomicBool,
    /// A stream on it was answered: the peer accepted our certificate too (a TLS 1.3 server
    /// checks it after the client has finished its side of the handshake).
    proven: AtomicBool,
}

#[derive(Default)]
struct KeyPool {
    connections: Mutex<Vec<Arc<Connection>>>,
    /// Held while dialling, so concurrent connects wait for one new connection.
    dialling: tokio::sync::Mutex<()>,
    /// When the last dial failed: a stale connection then serves without a new dial for
    /// [`REDIAL_AFTER`].
    dial_failed: Mutex<Option<Instant>>,
}

/// How long after a failed dial a stale connection serves before dialling again.
const REDIAL_AFTER: Duration = Duration::from_secs(1);

impl Connection {
    fn usable(&self) -> bool {
        !self.sender.is_closed() && !self.refused.load(Ordering::Acquire)
    }

    /// Whether a new connection would do better: ours would present a renewed certificate,
    /// or the peer's has expired (it has a renewed one, or the dial fails and this one serves
    /// on). While the control plane is unreachable nothing is renewed, and a connection both
    /// sides proved at its handshake keeps carrying streams.
    fn stale(&self, now: SystemTime, cert_version: u64) -> bool {
        (self.own_renewal <= now && cert_version != self.cert_version)
            || self.peer_expiry.is_some_and(|expiry| expiry <= now)
    }
}

impl KeyPool {
    /// A connection with room for one more stream, counted as taken: a current one, or with
    /// `stale_too` a stale one too. Stale connections leave the pool once a current one is
    /// proven (make-before-break); hyper closes each when its last stream ends.
    fn take(&self, cert_version: u64, stale_too: bool) -> Option<StreamSlot> {
        let mut connections = self.connections.lock().expect("tunnel pool lock");
        let now = SystemTime::now();
        connections.retain(|c| c.usable());
        let proven_current =
            connections.iter().any(|c| !c.stale(now, cert_version) && c.proven.load(Ordering::Acquire));
        if proven_current {
            connections.retain(|c| !c.stale(now, cert_version));
        }
        connections.iter().filter(|c| stale_too || !c.stale(now, cert_version)).find_map(|c| {
            let taken = c.streams.fetch_add(1, Ordering::AcqRel);
            if taken < STREAMS_PER_CONNECTION {
                Some(StreamSlot(Arc::clone(c)))
            } else {
                c.streams.fetch_sub(1, Ordering::AcqRel);
                None
            }
        })
    }

    /// A stale connection, while dialling a replacement has just failed.
    fn fallback(&self, cert_version: u64) -> Option<StreamSlot> {
        let failed = *self.dial_failed.lock().expect("tunnel pool lock");
        if failed.is_some_and(|at| at.elapsed() < REDIAL_AFTER) {
            self.take(cert_version, true)
        } else {
            None
        }
    }
}

/// One stream's place on a connection, given back when the stream ends.
struct StreamSlot(Arc<Connection>);

impl Drop for StreamSlot {
    fn drop(&mut self) {
        self.0.streams.fetch_sub(1, Ordering::AcqRel);
    }
}

pub struct TunnelPool {
    credentials: Arc<Credentials>,
    proxy_mark: u32,
    pools: Mutex<HashMap<PoolKey, Arc<KeyPool>>>,
}

impl TunnelPool {
    pub fn new(credentials: Arc<Credentials>, proxy_mark: u32) -> TunnelPool {
        TunnelPool { credentials, proxy_mark, pools: Mutex::default() }
    }

    pub fn credentials(&self) -> &Credentials {
        &self.credentials
    }

    /// A stream to `destination` (a pod address) on the target's node, opened as `source`
    /// for a client at `from` (labelled as `caller` says, for the far node's telemetry). A
    /// refusal by the far node comes back as an error naming its answer: `ConnectionRefused`
    /// when the pod refused or is gone, `PermissionDenied` when policy said no.
    pub async fn connect(
        &self,
        source: &SpiffeId,
        target: &TunnelTarget,
        destination: SocketAddr,
        from: Option<IpAddr>,
        caller: &Caller,
        timeout: Duration,
    ) -> io::Result<TunnelStream> {
        let identities = &self.credentials.identities;
        let key = PoolKey {
            source: source.clone(),
            tunnel: target.address,
            destination: identities.identity(&target.namespace, &target.service_account),
        };
        let work = async {
            // A draining peer answers new streams with GOAWAY / REFUSED_STREAM, before the
            // CONNECT reaches any pod: such a stream is tried once more on a new connection
            // (which reaches whichever process serves the peer's port by then).
            let mut retried = false;
            let (slot, response) = loop {
                let slot = self.slot(&key).await?;
                let mut request = Request::builder().method(Method::CONNECT).uri(destination.to_string());
                if let Some(ip) = from {
                    request = request.header(FORWARDED, forwarded_for(ip));
                }
                request = request.header(BAGGAGE, caller_baggage(&caller.pod, &caller.source));
                if let Some(service) = service_header(&caller.service) {
                    request = request.header(SERVICE_HEADER, service);
                }
                if let Some(http) = caller.http {
                    request = request.header(PROTOCOL_HEADER, http);
                }
                let request = request.body(Empty::new()).map_err(io::Error::other)?;
                let mut sender = slot.0.sender.clone();
                match sender.send_request(request).await {
                    Ok(response) => {
                        // Any answer: the peer took our certificate.
                        slot.0.proven.store(true, Ordering::Release);
                        break (slot, response);
                    }
                    Err(e) if !retried => {
                        tracing::debug!(tunnel = %key.tunnel, "tunnel stream refused ({e}); trying a new connection");
                        slot.0.refused.store(true, Ordering::Release);
                        if !slot.0.proven.load(Ordering::Acquire) {
                            // A new connection's first stream failed: the peer refused our
                            // certificate after the handshake (TLS 1.3 servers check the
                            // client's last). While the two nodes' renewals cross — the peer
                            // renewed, we have not yet — a new dial meets the same refusal, so
                            // the retry goes on an older connection both sides proved.
                            self.dial_refused(&key);
                        }
                        retried = true;
                    }
                    Err(e) => {
                        return Err(io::Error::new(
                            io::ErrorKind::ConnectionReset,
                            format!("tunnel {}: {e}", key.tunnel),
                        ));
                    }
                }
            };
            let status = response.status();
            if status != StatusCode::OK {
                let body = response.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
                let kind = match status {
                    StatusCode::FORBIDDEN => io::ErrorKind::PermissionDenied,
                    StatusCode::GATEWAY_TIMEOUT => io::ErrorKind::TimedOut,
                    _ => io::ErrorKind::ConnectionRefused,
                };
                return Err(io::Error::new(
                    kind,
                    format!(
                        "tunnel {} refused {destination}: {status} {}",
                        key.tunnel,
                        String::from_utf8_lossy(&body).trim()
                    ),
                ));
            }
            let upgraded = hyper::upgrade::on(response).await.map_err(|e| {
                io::Error::new(io::ErrorKind::ConnectionReset, format!("tunnel {}: {e}", key.tunnel))
            })?;
            Ok(TunnelStream { io: TokioIo::new(upgraded), _slot: slot })
        };
        match tokio::time::timeout(timeout, work).await {
            Ok(result) => result,
            Err(_) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("tunnel {}: no answer for {destination} within {timeout:?}", key.tunnel),
            )),
        }
    }

    /// A stream's place: on a current connection, else on a new one, else (the dial failed)
    /// on a stale one that still works.
    async fn slot(&self, key: &PoolKey) -> io::Result<StreamSlot> {
        let pool = Arc::clone(self.pools.lock().expect("tunnel pools lock").entry(key.clone()).or_default());
        let version = self.credentials.identities.version();
        if let Some(slot) = pool.take(version, false).or_else(|| pool.fallback(version)) {
            return Ok(slot);
        }
        let _dialling = pool.dialling.lock().await;
        // Someone else's dial may have made room (or failed) meanwhile.
        if let Some(slot) = pool.take(version, false).or_else(|| pool.fallback(version)) {
            return Ok(slot);
        }
        match self.dial(key).await {
            Ok(connection) => {
                let connection = Arc::new(connection);
                pool.connections.lock().expect("tunnel pool lock").push(Arc::clone(&connection));
                *pool.dial_failed.lock().expect("tunnel pool lock") = None;
                Ok(StreamSlot(connection))
            }
            Err(e) => {
                *pool.dial_failed.lock().expect("tunnel pool lock") = Some(Instant::now());
                match pool.take(version, true) {
                    Some(slot) => {
                        tracing::warn!(tunnel = %key.tunnel, "no new tunnel connection ({e}); an older one carries on");
                        Ok(slot)
                    }
                    None => Err(e),
                }
            }
        }
    }

    /// Counts a new connection to `key` that the peer refused like a failed dial: stale
    /// connections serve for [`REDIAL_AFTER`].
    fn dial_refused(&self, key: &PoolKey) {
        if let Some(pool) = self.pools.lock().expect("tunnel pools lock").get(key) {
            *pool.dial_failed.lock().expect("tunnel pool lock") = Some(Instant::now());
        }
    }

    /// A new connection for `key`, holding its first stream.
    async fn dial(&self, key: &PoolKey) -> io::Result<Connection> {
        let fail = |what: &str, e: &dyn std::fmt::Display| {
            io::Error::new(
                io::ErrorKind::ConnectionRefused,
                format!("tunnel {} as {} to {}: {what}: {e}", key.tunnel, key.source, key.destination),
            )
        };
        let cert_version = self.credentials.identities.version();
        let (config, own_renewal) = self
            .credentials
            .client_config(&key.source, &key.destination)
            .await
            .map_err(|e| fail("TLS", &e))?;
        let socket = if key.tunnel.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
        // Never captured, even if this netns were meshed.
        socket2::SockRef::from(&socket).set_mark(self.proxy_mark)?;
        socket.set_nodelay(true)?;
        let tcp: TcpStream = socket.connect(key.tunnel).await.map_err(|e| fail("connect", &e))?;
        let name =
            ServerName::try_from(server_name(&key.destination)).map_err(|e| fail("server name", &e))?;
        let tls = tokio_rustls::TlsConnector::from(config)
            .connect(name, tcp)
            .await
            .map_err(|e| fail("TLS handshake", &e))?;
        let peer_expiry = tls.get_ref().1.peer_certificates().and_then(|c| c.first()).and_then(not_after);
        let (sender, connection) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .initial_stream_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .keep_alive_interval(Duration::from_secs(30))
            .keep_alive_while_idle(true)
            .handshake(TokioIo::new(tls))
            .await
            .map_err(|e| fail("HTTP/2", &e))?;
        let tunnel = key.tunnel;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(%tunnel, "tunnel connection ended: {e}");
            }
        });
        tracing::debug!(tunnel = %key.tunnel, source = %key.source, destination = %key.destination, "tunnel connection opened");
        Ok(Connection {
            sender,
            streams: AtomicUsize::new(1),
            own_renewal,
            cert_version,
            peer_expiry,
            refused: AtomicBool::new(false),
            proven: AtomicBool::new(false),
        })
    }

    /// What `/config_dump` shows: open tunnel connections and their streams per key.
    pub fn dump(&self) -> serde_json::Value {
        let pools = self.pools.lock().expect("tunnel pools lock");
        let rows: Vec<serde_json::Value> = pools
            .iter()
            .map(|(k, p)| {
                let connections = p.connections.lock().expect("tunnel pool lock");
                let live: Vec<usize> = connections
                    .iter()
                    .filter(|c| !c.sender.is_closed())
                    .map(|c| c.streams.load(Ordering::Relaxed))
                    .collect();
                serde_json::json!({
                    "tunnel": k.tunnel.to_string(),
                    "source": k.source.to_string(),
                    "destination": k.destination.to_string(),
                    "connections": live.len(),
                    "streams": live.iter().sum::<usize>(),
                })
            })
            .collect();
        serde_json::Value::Array(rows)
    }
}

/// When a certificate expires.
fn not_after(der: &rustls::pki_types::CertificateDer<'_>) -> Option<SystemTime> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let secs = u64::try_from(cert.validity().not_after.timestamp()).ok()?;
    Some(SystemTime::UNIX_EPOCH + Duration::from_secs(secs))
}

/// One proxied connection's stream through a tunnel.
pub struct TunnelStream {
    io: TokioIo<Upgraded>,
    _slot: StreamSlot,
}

impl AsyncRead for TunnelStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl AsyncWrite for TunnelStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}
