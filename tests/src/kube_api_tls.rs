//! The in-test API server as pods meet it: HTTPS on the cluster's service address, with a
//! serving certificate from a cluster CA whose certificate is what kubelet mounts as
//! `ca.crt`. TLS ends here and the bytes go on to the plain [`FakeApiServer`] on loopback, so
//! both speak the same HTTP/1.1 (no ALPN offered, as the real server would negotiate it down).

use std::{
    net::{IpAddr, SocketAddr, TcpListener},
    sync::Arc,
};

use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, SanType};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};

use crate::{kube_api::FakeApiServer, tunnel_client::provider};

/// Names the real API server's certificate holds besides its address.
const SERVICE_NAMES: [&str; 4] =
    ["kubernetes", "kubernetes.default", "kubernetes.default.svc", "kubernetes.default.svc.cluster.local"];

/// A cluster CA and the API server's serving certificate for `ip`: (CA PEM, server config).
fn serving_config(ip: IpAddr) -> anyhow::Result<(String, Arc<rustls::ServerConfig>)> {
    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(rcgen::DnType::CommonName, "kubernetes");
    let ca = ca_params.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca_params, ca_key);
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(SERVICE_NAMES.map(String::from).to_vec())?;
    params.subject_alt_names.push(SanType::IpAddress(ip));
    params.distinguished_name.push(rcgen::DnType::CommonName, "kube-apiserver");
    let cert = params.signed_by(&key, &issuer)?;
    let config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone(), CertificateDer::from_pem_slice(ca.pem().as_bytes())?],
            PrivateKeyDer::from_pem_slice(key.serialize_pem().as_bytes())?,
        )?;
    Ok((ca.pem(), Arc::new(config)))
}

impl FakeApiServer {
    /// An API server serving HTTPS on `listener` (bound where pods reach it; its IP goes in
    /// the certificate). [`FakeApiServer::url`] is then `https://…` and
    /// [`FakeApiServer::ca_pem`] the cluster CA clients must trust.
    pub fn start_tls(listener: TcpListener) -> anyhow::Result<FakeApiServer> {
        let public: SocketAddr = listener.local_addr()?;
        let mut server = FakeApiServer::start(TcpListener::bind("127.0.0.1:0")?)?;
        let inner = server.addr;
        let (ca_pem, config) = serving_config(public.ip())?;
        listener.set_nonblocking(true)?;
        std::thread::spawn(move || {
            let runtime =
                tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
                let acceptor = tokio_rustls::TlsAcceptor::from(config);
                loop {
                    let Ok((tcp, _)) = listener.accept().await else { continue };
                    let acceptor = acceptor.clone();
                    tokio::spawn(async move {
                        let Ok(mut tls) = acceptor.accept(tcp).await else { return };
                        let Ok(mut upstream) = tokio::net::TcpStream::connect(inner).await else { return };
                        let _ = tokio::io::copy_bidirectional(&mut tls, &mut upstream).await;
                    });
                }
            });
        });
        server.addr = public;
        server.tls_ca = Some(ca_pem);
        Ok(server)
    }

    /// The cluster CA (PEM) of a [`FakeApiServer::start_tls`] server: a pod's `ca.crt`.
    pub fn ca_pem(&self) -> Option<&str> {
        self.tls_ca.as_deref()
    }

    /// A ServiceAccount volume as kubelet mounts it in a pod (`token`, `ca.crt`, `namespace`)
    /// in `dir`, for `token` of a pod in `namespace`.
    pub fn write_service_account_volume(
        &self,
        dir: &std::path::Path,
        namespace: &str,
        token: &str,
    ) -> anyhow::Result<()> {
        std::fs::create_dir_all(dir)?;
        std::fs::write(dir.join("token"), token)?;
        std::fs::write(dir.join("namespace"), namespace)?;
        std::fs::write(dir.join("ca.crt"), self.ca_pem().unwrap_or_default())?;
        Ok(())
    }
}
