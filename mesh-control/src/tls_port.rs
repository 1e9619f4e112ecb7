//! mesh-control's TLS port (15012, where istiod serves the same): xDS, workload reports and
//! CSRs over TLS 1.3, with a serving certificate from mesh-control's own CA that is renewed at
//! half-life. A node that holds the mesh's root thus knows it talks to its control plane
//! before it sends its node token, and the trust bundle it learns from CSR answers cannot be
//! swapped on the way.

use std::{
    io,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use rustls::{
    ServerConfig,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::mpsc,
};
use tokio_rustls::{TlsAcceptor, server::TlsStream};
use tokio_stream::wrappers::ReceiverStream;

use crate::ca::CertificateAuthority;

/// A client that has not finished its handshake by then is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The serving certificate, issued on demand: a handshake after its half-life gets a new one.
pub struct ServingCert {
    ca: Arc<CertificateAuthority>,
    names: Vec<String>,
    ttl: Duration,
    current: Mutex<(Arc<CertifiedKey>, Instant)>,
}

impl std::fmt::Debug for ServingCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServingCert").field("names", &self.names).field("ttl", &self.ttl).finish()
    }
}

impl ServingCert {
    /// A certificate for `names` (DNS names or IP addresses), valid for `ttl`.
    pub fn new(
        ca: Arc<CertificateAuthority>,
        names: Vec<String>,
        ttl: Duration,
    ) -> anyhow::Result<ServingCert> {
        let first = issue(&ca, &names, ttl)?;
        Ok(ServingCert { ca, names, ttl, current: Mutex::new(first) })
    }
}

fn issue(
    ca: &CertificateAuthority,
    names: &[String],
    ttl: Duration,
) -> anyhow::Result<(Arc<CertifiedKey>, Instant)> {
    let (chain, key) = ca.issue_serving(names, ttl)?;
    let chain = chain
        .iter()
        .map(|pem| CertificateDer::from_pem_slice(pem.as_bytes()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| anyhow::anyhow!("serving certificate: {e:?}"))?;
    let key =
        PrivateKeyDer::from_pem_slice(key.as_bytes()).map_err(|e| anyhow::anyhow!("serving key: {e:?}"))?;
    let certified = CertifiedKey::from_der(chain, key, &rustls::crypto::ring::default_provider())?;
    tracing::info!(names = ?names, ttl_secs = ttl.as_secs(), "issued the TLS port's serving certificate");
    Ok((Arc::new(certified), Instant::now() + ttl / 2))
}

impl ResolvesServerCert for ServingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let mut current = self.current.lock().expect("serving certificate lock");
        if Instant::now() >= current.1 {
            match issue(&self.ca, &self.names, self.ttl) {
                Ok(next) => *current = next,
                // The one in hand is still valid for the other half of its life.
                Err(e) => tracing::warn!("renewing the serving certificate failed: {e:#}"),
            }
        }
        Some(Arc::clone(&current.0))
    }
}

/// TLS 1.3, HTTP/2 (gRPC), presenting `cert`; clients prove themselves with their node token
/// inside the stream, not with a certificate.
pub fn server_config(cert: Arc<ServingCert>) -> anyhow::Result<Arc<ServerConfig>> {
    let mut config = ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_cert_resolver(cert);
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// The connections of `listener` once their handshakes are done, each handshake in a task of
/// its own so that a slow client holds up no other.
pub fn incoming(
    listener: TcpListener,
    config: Arc<ServerConfig>,
) -> ReceiverStream<io::Result<TlsStream<TcpStream>>> {
    let (tx, rx) = mpsc::channel(64);
    let acceptor = TlsAcceptor::from(config);
    tokio::spawn(async move {
        loop {
            let (tcp, peer) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::warn!("TLS port: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let (acceptor, tx) = (acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => {
                        let _ = tx.send(Ok(tls)).await;
                    }
                    Ok(Err(e)) => tracing::info!(%peer, "TLS port: handshake failed: {e}"),
                    Err(_) => tracing::info!(%peer, "TLS port: handshake timed out"),
                }
            });
        }
    });
    ReceiverStream::new(rx)
}
