//! TLS between nodes on behalf of workload identities (the TLS of HBONE): TLS 1.3 only, both
//! sides present a workload certificate, and beyond the chain to a trusted root each side
//! checks *who* the other is by its SPIFFE URI SAN — a client accepts only the identity of the
//! workload it is dialling, a server learns the client's identity for policy.
//!
//! A SPIFFE certificate has no DNS name, so rustls' usual name check cannot apply: the client
//! verifies the chain with webpki itself, then compares the identity.

use std::sync::Arc;

use nodemesh_api::identity::SpiffeId;
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, OtherError, RootCertStore, ServerConfig,
    SignatureScheme,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::CryptoProvider,
    pki_types::{CertificateDer, PrivateKeyDer, ServerName, TrustAnchor, UnixTime, pem::PemObject},
    server::{ResolvesServerCert, WebPkiClientVerifier},
    sign::CertifiedKey,
};

use super::WorkloadCert;

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The trusted roots (PEM), as TLS needs them.
pub struct TrustRoots {
    anchors: Vec<TrustAnchor<'static>>,
    store: Arc<RootCertStore>,
}

impl TrustRoots {
    /// Every certificate in `roots` (each a PEM bundle of one or more roots).
    pub fn from_pem(roots: &[String]) -> Result<TrustRoots, String> {
        let mut store = RootCertStore::empty();
        let mut anchors = Vec::new();
        for (i, pem) in roots.iter().enumerate() {
            for der in CertificateDer::pem_slice_iter(pem.as_bytes()) {
                let der = der.map_err(|e| format!("root bundle {i}: {e:?}"))?;
                let anchor = webpki::anchor_from_trusted_cert(&der)
                    .map_err(|e| format!("root bundle {i}: {e}"))?
                    .to_owned();
                store.add(der).map_err(|e| format!("root bundle {i}: {e}"))?;
                anchors.push(anchor);
            }
        }
        if anchors.is_empty() {
            return Err("no trusted root".into());
        }
        Ok(TrustRoots { anchors, store: Arc::new(store) })
    }
}

/// The certificate chain and key `cert` presents (the root stays out: the peer has it).
fn own(cert: &WorkloadCert) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), String> {
    let mut chain = Vec::new();
    let presented = cert.chain.len().saturating_sub(1).max(1);
    for pem in cert.chain.iter().take(presented) {
        chain
            .push(CertificateDer::from_pem_slice(pem.as_bytes()).map_err(|e| format!("certificate: {e:?}"))?);
    }
    let key = PrivateKeyDer::from_pem_slice(cert.key_pem().as_bytes()).map_err(|e| format!("key: {e:?}"))?;
    Ok((chain, key))
}

/// `cert` as rustls presents it: chain (root left out) and signing key.
pub fn certified_key(cert: &WorkloadCert) -> Result<CertifiedKey, String> {
    let (chain, key) = own(cert)?;
    CertifiedKey::from_der(chain, key, &provider()).map_err(|e| format!("{}: {e}", cert.identity))
}

/// A server presenting `cert`, requiring a client certificate that chains to `roots`; the
/// client's identity is read after the handshake ([`peer_identity`]).
pub fn server_config(cert: &WorkloadCert, roots: &TrustRoots) -> Result<ServerConfig, String> {
    let key = Arc::new(certified_key(cert)?);
    server_config_resolving(Arc::new(rustls::sign::SingleCertAndKey::from(key)), roots)
}

/// A server presenting whichever certificate `certs` picks for the client's server name
/// (the tunnel: one listener for every workload identity on the node).
pub fn server_config_resolving(
    certs: Arc<dyn ResolvesServerCert>,
    roots: &TrustRoots,
) -> Result<ServerConfig, String> {
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::clone(&roots.store), provider())
        .build()
        .map_err(|e| e.to_string())?;
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| e.to_string())?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(certs);
    // No session resumption: a resumed session skips certificate checks, so a peer whose
    // certificate has expired, or whose root has been removed, could keep connecting for the
    // ticket's lifetime. Tunnel connections are pooled and long-lived; full handshakes are few.
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(config)
}

/// A client presenting `cert` that accepts only a server proving `expected`.
pub fn client_config(
    cert: &WorkloadCert,
    roots: &TrustRoots,
    expected: SpiffeId,
) -> Result<ClientConfig, String> {
    let verifier = IdentityVerifier { anchors: roots.anchors.clone(), expected, provider: provider() };
    let (chain, key) = own(cert)?;
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_auth_cert(chain, key)
        .map_err(|e| e.to_string())?;
    // Every connection proves both certificates anew (see `server_config_resolving`).
    config.resumption = rustls::client::Resumption::disabled();
    Ok(config)
}

/// The SPIFFE identity a peer's leaf certificate proves (its one URI SAN).
pub fn peer_identity(leaf: &CertificateDer<'_>) -> Result<SpiffeId, String> {
    let (_, cert) =
        x509_parser::parse_x509_certificate(leaf).map_err(|e| format!("peer certificate: {e}"))?;
    let uris: Vec<String> = cert
        .subject_alternative_name()
        .ok()
        .flatten()
        .map(|s| {
            s.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    x509_parser::extensions::GeneralName::URI(u) => Some(u.to_string()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    match uris.as_slice() {
        [one] => one.parse(),
        _ => Err(format!("the peer certificate names {} URI identities, not one", uris.len())),
    }
}

/// Chain to a trusted root (webpki, server auth), then the identity.
#[derive(Debug)]
struct IdentityVerifier {
    anchors: Vec<TrustAnchor<'static>>,
    expected: SpiffeId,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for IdentityVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let leaf = webpki::EndEntityCert::try_from(end_entity).map_err(pki_error)?;
        leaf.verify_for_usage(
            self.provider.signature_verification_algorithms.all,
            &self.anchors,
            intermediates,
            now,
            webpki::KeyUsage::server_auth(),
            None,
            None,
        )
        .map_err(pki_error)?;
        match peer_identity(end_entity) {
            Ok(id) if id == self.expected => Ok(ServerCertVerified::assertion()),
            Ok(id) => Err(other(format!("the server is {id}, not {}", self.expected))),
            Err(e) => Err(other(e)),
        }
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("TLS 1.2 is not offered".into()))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

fn other(message: String) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(std::io::Error::other(
        message,
    )))))
}

fn pki_error(e: webpki::Error) -> rustls::Error {
    use webpki::Error as E;
    rustls::Error::InvalidCertificate(match e {
        E::CertExpired { .. } => CertificateError::Expired,
        E::CertNotValidYet { .. } => CertificateError::NotValidYet,
        E::UnknownIssuer => CertificateError::UnknownIssuer,
        E::InvalidSignatureForPublicKey => CertificateError::BadSignature,
        other => CertificateError::Other(OtherError(Arc::new(other))),
    })
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use rcgen::{CertificateParams, IsCa, Issuer, KeyPair, SanType};
    use rustls::{ClientConnection, ServerConnection};

    use super::*;

    fn id(sa: &str) -> SpiffeId {
        SpiffeId {
            trust_domain: "cluster.local".into(),
            namespace: "shop".into(),
            service_account: sa.into(),
        }
    }

    /// A root CA of the test's own (rcgen), signing workload certificates as mesh-control's
    /// CA does: the SPIFFE identity as the only SAN, client and server auth.
    struct TestCa {
        key: KeyPair,
        params: CertificateParams,
        pem: String,
    }

    impl TestCa {
        fn roots(&self) -> Vec<String> {
            vec![self.pem.clone()]
        }
    }

    fn ca(name: &str) -> TestCa {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.distinguished_name.push(rcgen::DnType::CommonName, format!("test root {name}"));
        let pem = params.self_signed(&key).unwrap().pem();
        TestCa { key, params, pem }
    }

    fn issue(ca: &TestCa, who: &SpiffeId) -> WorkloadCert {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![SanType::URI(who.to_string().try_into().unwrap())];
        params.extended_key_usages =
            vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth, rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        let leaf = params.signed_by(&key, &Issuer::new(ca.params.clone(), &ca.key)).unwrap();
        let now = SystemTime::now();
        WorkloadCert::new(
            who.clone(),
            key.serialize_pem(),
            vec![leaf.pem(), ca.pem.clone()],
            now + Duration::from_secs(3600),
            now,
        )
    }

    /// Runs a handshake in memory; `Err((side, error))` names the side that refused.
    fn handshake(
        client: ClientConfig,
        server: ServerConfig,
    ) -> Result<Option<SpiffeId>, (&'static str, String)> {
        let mut c = ClientConnection::new(Arc::new(client), ServerName::try_from("hbone").unwrap()).unwrap();
        let mut s = ServerConnection::new(Arc::new(server)).unwrap();
        for _ in 0..10 {
            let mut buf = Vec::new();
            c.write_tls(&mut buf).unwrap();
            s.read_tls(&mut buf.as_slice()).unwrap();
            s.process_new_packets().map_err(|e| ("server", e.to_string()))?;
            let mut buf = Vec::new();
            s.write_tls(&mut buf).unwrap();
            c.read_tls(&mut buf.as_slice()).unwrap();
            c.process_new_packets().map_err(|e| ("client", e.to_string()))?;
            if !c.is_handshaking() && !s.is_handshaking() {
                // The client's last flight (its certificate) reaches the server.
                let mut buf = Vec::new();
                c.write_tls(&mut buf).unwrap();
                s.read_tls(&mut buf.as_slice()).unwrap();
                s.process_new_packets().map_err(|e| ("server", e.to_string()))?;
                let peer = s.peer_certificates().and_then(|p| p.first()).map(|l| peer_identity(l).unwrap());
                return Ok(peer);
            }
        }
        Err(("both", "no handshake after 10 rounds".into()))
    }

    #[test]
    fn each_side_proves_its_identity_and_the_client_accepts_only_the_one_it_dials() {
        let authority = ca("good");
        let roots = TrustRoots::from_pem(&authority.roots()).unwrap();
        let (client, server) = (issue(&authority, &id("productpage")), issue(&authority, &id("reviews")));
        let s = server_config(&server, &roots).unwrap();
        let peer = handshake(client_config(&client, &roots, id("reviews")).unwrap(), s.clone()).unwrap();
        assert_eq!(peer, Some(id("productpage")), "the server learns who called");
        // Dialling ratings but reaching a server that is reviews: refused by the client.
        let (side, e) = handshake(client_config(&client, &roots, id("ratings")).unwrap(), s).unwrap_err();
        assert_eq!(side, "client");
        assert!(e.contains("the server is spiffe://cluster.local/ns/shop/sa/reviews, not"), "{e}");
    }

    #[test]
    fn certificates_from_another_ca_are_refused_on_both_sides() {
        let (ours, theirs) = (ca("ours"), ca("theirs"));
        let roots = TrustRoots::from_pem(&ours.roots()).unwrap();
        let good = issue(&ours, &id("a"));
        let stranger = issue(&theirs, &id("b"));
        // A server with a foreign certificate: the client refuses.
        let (side, e) = handshake(
            client_config(&good, &roots, id("b")).unwrap(),
            server_config(&stranger, &TrustRoots::from_pem(&theirs.roots()).unwrap()).unwrap(),
        )
        .unwrap_err();
        assert_eq!(side, "client", "{e}");
        assert!(e.contains("UnknownIssuer"), "{e}");
        // A client with a foreign certificate (that trusts our server): the server refuses.
        let (side, e) = handshake(
            client_config(&stranger, &roots, id("a")).unwrap(),
            server_config(&good, &roots).unwrap(),
        )
        .unwrap_err();
        assert_eq!(side, "server", "{e}");
        assert!(e.contains("UnknownIssuer"), "{e}");
    }

    #[test]
    fn an_expired_certificate_is_refused() {
        // A root of our own whose workload certificate expired yesterday.
        let root_key = KeyPair::generate().unwrap();
        let mut root_params = CertificateParams::default();
        root_params.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let root = root_params.self_signed(&root_key).unwrap();
        let issuer = Issuer::new(root_params, &root_key);
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![SanType::URI(id("old").to_string().try_into().unwrap())];
        params.not_before = time::OffsetDateTime::now_utc() - time::Duration::days(2);
        params.not_after = time::OffsetDateTime::now_utc() - time::Duration::days(1);
        let leaf = params.signed_by(&key, &issuer).unwrap();
        let now = SystemTime::now();
        let expired =
            WorkloadCert::new(id("old"), key.serialize_pem(), vec![leaf.pem(), root.pem()], now, now);
        let roots = TrustRoots::from_pem(&[root.pem()]).unwrap();
        let authority = ca("expiry");
        let fresh_roots = TrustRoots::from_pem(&authority.roots()).unwrap();
        let fresh = issue(&authority, &id("new"));
        let (side, e) = handshake(
            client_config(&fresh, &roots, id("old")).unwrap(),
            server_config(&expired, &fresh_roots).unwrap(),
        )
        .unwrap_err();
        assert_eq!(side, "client");
        assert!(e.contains("Expired"), "{e}");
        let (side, e) = handshake(
            client_config(&expired, &fresh_roots, id("new")).unwrap(),
            server_config(&fresh, &roots).unwrap(),
        )
        .unwrap_err();
        assert_eq!(side, "server");
        assert!(e.contains("Expired") || e.contains("expired"), "{e}");
    }
}
