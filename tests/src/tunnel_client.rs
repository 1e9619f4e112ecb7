//! A tunnel client for tests and benchmarks: workload certificates minted with the cluster's
//! CA (or a CA of its own), mutual TLS 1.3 to a node's HBONE listener, CONNECT requests.
//! It checks nothing of the server: what is under test is the node.

use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::Bytes;
use http_body_util::Empty;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, SanType};
use rustls::{
    DigitallySignedStruct, SignatureScheme,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime, pem::PemObject},
};
use sha2::Digest;
use tokio::io::AsyncReadExt;

use crate::{SimCluster, netns};

pub const TRUST_DOMAIN: &str = "cluster.local";

pub fn spiffe(ns: &str, sa: &str) -> String {
    format!("spiffe://{TRUST_DOMAIN}/ns/{ns}/sa/{sa}")
}

/// The server name a tunnel client sends for `identity` (the wire contract: a hash of it).
pub fn server_name(identity: &str) -> String {
    let digest = sha2::Sha256::digest(identity.as_bytes());
    let hex: String = digest.iter().take(16).map(|b| format!("{b:02x}")).collect();
    format!("{hex}.hbone.nodemesh")
}

/// A leaf certificate and key, and the chain presented with it.
pub struct Minted {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
}

/// Signs leaves: with the cluster's intermediate (`ca-cert.pem`, `ca-key.pem`) or a CA of
/// its own.
pub struct TestCa {
    issuer: Issuer<'static, KeyPair>,
    /// PEM of the issuing certificate, presented after the leaf.
    issuer_pem: String,
}

impl TestCa {
    pub fn cluster(cluster: &SimCluster) -> TestCa {
        TestCa::from_dir(&cluster.control.ca_dir())
    }

    /// The issuing certificate and key of a CA directory (`ca-cert.pem`, `ca-key.pem`).
    pub fn from_dir(dir: &std::path::Path) -> TestCa {
        let cert = std::fs::read_to_string(dir.join("ca-cert.pem")).unwrap();
        let key = KeyPair::from_pem(&std::fs::read_to_string(dir.join("ca-key.pem")).unwrap()).unwrap();
        TestCa { issuer: Issuer::from_ca_cert_pem(&cert, key).unwrap(), issuer_pem: cert }
    }

    pub fn foreign() -> TestCa {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let cert = params.self_signed(&key).unwrap();
        TestCa { issuer_pem: cert.pem(), issuer: Issuer::new(params, key) }
    }

    /// The issuing certificate, PEM (a foreign CA's own root).
    pub fn certificate_pem(&self) -> String {
        self.issuer_pem.clone()
    }

    /// A workload certificate for `uri`, valid from `from` to `until` (relative to now).
    pub fn leaf(&self, uri: &str, from: i64, until: i64) -> Minted {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.subject_alt_names = vec![SanType::URI(uri.try_into().unwrap())];
        params.extended_key_usages =
            vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now + time::Duration::seconds(from);
        params.not_after = now + time::Duration::seconds(until);
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let issuer = CertificateDer::from_pem_slice(self.issuer_pem.as_bytes()).unwrap();
        Minted {
            chain: vec![cert.der().clone(), issuer],
            key: PrivateKeyDer::from_pem_slice(key.serialize_pem().as_bytes()).unwrap(),
        }
    }
}

pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The test client checks nothing of the server: what is under test here is the server.
#[derive(Debug)]
pub struct AnyServer;

impl ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }
    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        provider().signature_verification_algorithms.supported_schemes()
    }
}

/// Dials `tunnel` from the fabric presenting `client`, names `server_identity`, and sends one
/// CONNECT to `target`: the status, or why there was none.
pub fn connect_through(
    fabric: &str,
    tunnel: SocketAddr,
    client: Minted,
    server_identity: &str,
    target: SocketAddr,
) -> Result<StatusCode, String> {
    let sni = server_name(server_identity);
    netns::run_in(fabric, move || {
        let tcp = std::net::TcpStream::connect_timeout(&tunnel, Duration::from_secs(2))?;
        tcp.set_nonblocking(true)?;
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        Ok(rt.block_on(async move {
            let tcp = tokio::net::TcpStream::from_std(tcp).map_err(|e| e.to_string())?;
            let tls = tokio_rustls::TlsConnector::from(client_config(client))
                .connect(ServerName::try_from(sni).unwrap(), tcp)
                .await
                .map_err(|e| format!("TLS: {e}"))?;
            let (mut sender, conn) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
                    .await
                    .map_err(|e| format!("HTTP/2: {e}"))?;
            tokio::spawn(conn);
            let request = Request::builder()
                .method(Method::CONNECT)
                .uri(target.to_string())
                .body(Empty::<Bytes>::new())
                .unwrap();
            let response = tokio::time::timeout(Duration::from_secs(5), sender.send_request(request))
                .await
                .map_err(|_| "no answer".to_string())?
                .map_err(|e| format!("CONNECT: {e}"))?;
            Ok(response.status())
        }))
    })
    .unwrap()
}

/// TLS 1.3 presenting `client`, accepting any server.
fn client_config(client: Minted) -> Arc<rustls::ClientConfig> {
    let config = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("TLS 1.3")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyServer))
        .with_client_auth_cert(client.chain, client.key)
        .expect("client certificate");
    Arc::new(config)
}

/// Full mutual-TLS handshakes per second against `tunnel`, one after another from the
/// fabric, each on a new TCP connection: a handshake counts once the node, having checked
/// the client's certificate, starts speaking HTTP/2 (its first bytes arrive).
pub fn handshake_rate(
    fabric: &str,
    tunnel: SocketAddr,
    client: &Minted,
    server_identity: &str,
    count: usize,
) -> anyhow::Result<f64> {
    let client = Minted { chain: client.chain.clone(), key: client.key.clone_key() };
    let (sni, config) = (server_name(server_identity), client_config(client));
    netns::run_in(fabric, move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        rt.block_on(async move {
            let connector = tokio_rustls::TlsConnector::from(config);
            let name = ServerName::try_from(sni)?;
            let started = Instant::now();
            for _ in 0..count {
                let tcp = tokio::net::TcpStream::connect(tunnel).await?;
                tcp.set_nodelay(true)?;
                let mut tls = connector.connect(name.clone(), tcp).await?;
                let mut first = [0u8; 1];
                let n = tokio::time::timeout(Duration::from_secs(5), tls.read(&mut first)).await??;
                anyhow::ensure!(n == 1, "the tunnel closed the connection instead of serving it");
            }
            Ok(count as f64 / started.elapsed().as_secs_f64())
        })
    })
}
