//! The certificate authority: an issuing (intermediate) certificate and key, the chain up to the
//! root, and the trusted roots. It signs workload certificates from CSRs.
//!
//! Its state is a directory in Istio's `cacerts` layout — `ca-cert.pem` (the issuing
//! certificate), `ca-key.pem`, `cert-chain.pem` (issuing certificate up to the root),
//! `root-cert.pem` (trusted roots; several during a root rotation) — so a user-supplied bundle
//! for Istio works unchanged. An empty directory gets a self-signed root (its key kept as
//! `root-key.pem`, needed only to mint new intermediates) and an intermediate per cluster, so a
//! second cluster can later share the root without re-issuing it.

use std::{fs, path::Path, time::Duration};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, PublicKeyData, SanType,
};
use time::OffsetDateTime;

use super::SpiffeId;

/// How long a self-signed root and an intermediate are valid.
const ROOT_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
const INTERMEDIATE_VALIDITY: Duration = Duration::from_secs(5 * 365 * 24 * 3600);
/// Workload certificates start this much in the past, for clocks a little behind.
const CLOCK_SKEW: Duration = Duration::from_secs(60);

pub struct CertificateAuthority {
    pub trust_domain: String,
    issuer: Issuer<'static, KeyPair>,
    /// The issuing certificate, then the rest of the chain up to (and with) the root.
    chain: Vec<String>,
    /// Every trusted root (PEM), the one the chain ends in first.
    roots: Vec<String>,
    /// When the issuing certificate expires: no workload certificate outlives it.
    issuer_not_after: OffsetDateTime,
}

/// Why a CSR is refused.
#[derive(Debug, thiserror::Error)]
pub enum SignError {
    #[error("the CSR cannot be read or its signature does not verify: {0}")]
    BadCsr(String),
    #[error("the CSR asks for {asked}, not the identity it is requested for ({identity})")]
    WrongIdentity { asked: String, identity: String },
    #[error("identity {identity} is outside this CA's trust domain {trust_domain}")]
    ForeignTrustDomain { identity: String, trust_domain: String },
    #[error("signing failed: {0}")]
    Signing(String),
}

/// A CA directory that cannot be used, naming the file and what is wrong.
#[derive(Debug, thiserror::Error)]
#[error("CA directory {dir}: {file}: {reason}")]
pub struct LoadError {
    pub dir: String,
    pub file: &'static str,
    pub reason: String,
}

impl CertificateAuthority {
    /// The CA in `dir`: loaded if it holds a `cacerts` bundle, else a new self-signed root and
    /// an intermediate for `cluster`, written there first.
    pub fn load_or_create(dir: &Path, trust_domain: &str, cluster: &str) -> Result<Self, LoadError> {
        if !dir.join("ca-cert.pem").exists() {
            create(dir, trust_domain, cluster)?;
        }
        Self::load(dir, trust_domain)
    }

    /// Loads a `cacerts` bundle; checks that the key is the issuing certificate's and that it
    /// may issue certificates.
    pub fn load(dir: &Path, trust_domain: &str) -> Result<Self, LoadError> {
        let fail =
            |file: &'static str, reason: String| LoadError { dir: dir.display().to_string(), file, reason };
        let read =
            |file: &'static str| fs::read_to_string(dir.join(file)).map_err(|e| fail(file, e.to_string()));
        let cert = read("ca-cert.pem")?;
        let key = KeyPair::from_pem(&read("ca-key.pem")?).map_err(|e| fail("ca-key.pem", e.to_string()))?;
        let chain = split_pem(&read("cert-chain.pem")?);
        let roots = split_pem(&read("root-cert.pem")?);
        if roots.is_empty() {
            return Err(fail("root-cert.pem", "holds no certificate".into()));
        }
        let der = pem_der(&cert).map_err(|e| fail("ca-cert.pem", e))?;
        let (_, parsed) = x509_parser::parse_x509_certificate(&der)
            .map_err(|e| fail("ca-cert.pem", format!("not an X.509 certificate: {e}")))?;
        if parsed.public_key().raw != key.subject_public_key_info().as_slice() {
            return Err(fail("ca-key.pem", "is not the key of ca-cert.pem".into()));
        }
        if !parsed.is_ca() {
            return Err(fail(
                "ca-cert.pem",
                "is not a CA certificate (basicConstraints CA:FALSE or absent)".into(),
            ));
        }
        let issuer_not_after = parsed.validity().not_after.to_datetime();
        if issuer_not_after <= OffsetDateTime::now_utc() {
            return Err(fail("ca-cert.pem", format!("expired on {issuer_not_after}")));
        }
        let issuer =
            Issuer::from_ca_cert_der(&der.into(), key).map_err(|e| fail("ca-cert.pem", e.to_string()))?;
        // The chain starts with the issuing certificate (Istio's files sometimes omit it).
        let chain = if chain.first().is_some_and(|c| same_cert(c, &cert)) {
            chain
        } else {
            std::iter::once(cert).chain(chain).collect()
        };
        Ok(CertificateAuthority {
            trust_domain: trust_domain.to_string(),
            issuer,
            chain,
            roots,
            issuer_not_after,
        })
    }

    /// Every trusted root, PEM.
    pub fn roots(&self) -> &[String] {
        &self.roots
    }

    /// The chain a leaf is presented with: the issuing certificate and any above it, roots
    /// left out (the peer has those).
    fn intermediates(&self) -> impl Iterator<Item = &String> {
        self.chain.iter().filter(|c| !self.roots.iter().any(|r| same_cert(r, c)))
    }

    /// What every leaf this CA issues has: no subject, valid from a little before now for
    /// `ttl` (never beyond the issuing certificate), not a CA, signing keys, `usages`.
    fn leaf_params(&self, ttl: Duration, usages: Vec<ExtendedKeyUsagePurpose>) -> CertificateParams {
        let now = OffsetDateTime::now_utc();
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.not_before = now - CLOCK_SKEW;
        params.not_after = (now + ttl).min(self.issuer_not_after);
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        params.extended_key_usages = usages;
        params.use_authority_key_identifier_extension = true;
        params
    }

    /// Signs `csr_pem` for `identity`, valid for `ttl` (never beyond the issuing certificate).
    /// Returns the leaf, then the chain up to the root, then — as one last PEM element, Istio's
    /// `cert_chain` order — the whole trust bundle: the root the chain ends in first, then
    /// every other trusted root. During a root rotation (`root-cert.pem` holding old and new)
    /// nodes thus learn to trust both before any certificate chains to the new one.
    pub fn sign(&self, csr_pem: &str, identity: &SpiffeId, ttl: Duration) -> Result<Vec<String>, SignError> {
        if identity.trust_domain != self.trust_domain {
            return Err(SignError::ForeignTrustDomain {
                identity: identity.to_string(),
                trust_domain: self.trust_domain.clone(),
            });
        }
        let csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| SignError::BadCsr(e.to_string()))?;
        let asked: Vec<String> = csr
            .params
            .subject_alt_names
            .iter()
            .map(|san| match san {
                SanType::URI(uri) => uri.as_str().to_string(),
                other => format!("{other:?}"),
            })
            .collect();
        let wanted = identity.to_string();
        if asked != [wanted.as_str()] {
            return Err(SignError::WrongIdentity {
                asked: if asked.is_empty() { "no identity".into() } else { asked.join(", ") },
                identity: wanted,
            });
        }
        let mut params = self
            .leaf_params(ttl, vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth]);
        params.subject_alt_names = csr.params.subject_alt_names.clone();
        let leaf = CertificateSigningRequestParams { params, public_key: csr.public_key }
            .signed_by(&self.issuer)
            .map_err(|e| SignError::Signing(e.to_string()))?;
        let mut out = vec![leaf.pem()];
        out.extend(self.intermediates().cloned());
        let chain_root = self
            .chain
            .last()
            .and_then(|last| self.roots.iter().find(|r| same_cert(r, last)))
            .unwrap_or(&self.roots[0]);
        let mut bundle = chain_root.trim_end().to_string();
        for root in self.roots.iter().filter(|r| !same_cert(r, chain_root)) {
            bundle.push('\n');
            bundle.push_str(root.trim_end());
        }
        bundle.push('\n');
        out.push(bundle);
        Ok(out)
    }

    /// A certificate for mesh-control's own TLS port (xDS and CSRs, 15012), with a key made
    /// here: DNS SANs for `names`, IP SANs for those that are addresses. Returns the leaf and
    /// the chain up to (not with) the root, PEM, and the key, PEM. Nodes check it against the
    /// root file they are given, so a node's first secret — its token — never goes to an
    /// impostor.
    pub fn issue_serving(&self, names: &[String], ttl: Duration) -> Result<(Vec<String>, String), SignError> {
        let key = KeyPair::generate().map_err(|e| SignError::Signing(e.to_string()))?;
        let mut params = self.leaf_params(ttl, vec![ExtendedKeyUsagePurpose::ServerAuth]);
        params.subject_alt_names = names
            .iter()
            .map(|name| match name.parse::<std::net::IpAddr>() {
                Ok(ip) => Ok(SanType::IpAddress(ip)),
                Err(_) => name
                    .as_str()
                    .try_into()
                    .map(SanType::DnsName)
                    .map_err(|e| SignError::Signing(format!("{name:?} is not a DNS name: {e}"))),
            })
            .collect::<Result<_, _>>()?;
        params.distinguished_name.push(DnType::CommonName, "mesh-control");
        let leaf = params.signed_by(&key, &self.issuer).map_err(|e| SignError::Signing(e.to_string()))?;
        let mut chain = vec![leaf.pem()];
        chain.extend(self.intermediates().cloned());
        Ok((chain, key.serialize_pem()))
    }
}

/// The identity a CSR asks for: its one URI SAN.
pub fn csr_identity(csr_pem: &str) -> Result<String, SignError> {
    let csr =
        CertificateSigningRequestParams::from_pem(csr_pem).map_err(|e| SignError::BadCsr(e.to_string()))?;
    let uris: Vec<&str> = csr
        .params
        .subject_alt_names
        .iter()
        .filter_map(|san| match san {
            SanType::URI(uri) => Some(uri.as_str()),
            _ => None,
        })
        .collect();
    match uris.as_slice() {
        [one] => Ok(one.to_string()),
        _ => {
            Err(SignError::BadCsr(format!("it names {} URI SANs; one SPIFFE identity is needed", uris.len())))
        }
    }
}

/// Writes a new self-signed root and an intermediate for `cluster` into `dir`.
fn create(dir: &Path, trust_domain: &str, cluster: &str) -> Result<(), LoadError> {
    let fail =
        |file: &'static str, reason: String| LoadError { dir: dir.display().to_string(), file, reason };
    fs::create_dir_all(dir).map_err(|e| fail(".", e.to_string()))?;
    let now = OffsetDateTime::now_utc();
    let ca_params = |name: String, validity: Duration, path_len: Option<u8>| {
        let mut p = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, trust_domain);
        dn.push(DnType::CommonName, name);
        p.distinguished_name = dn;
        p.not_before = now - CLOCK_SKEW;
        p.not_after = now + validity;
        p.is_ca = IsCa::Ca(path_len.map_or(BasicConstraints::Unconstrained, BasicConstraints::Constrained));
        p.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        p.use_authority_key_identifier_extension = true;
        p
    };
    let gen_key = || KeyPair::generate().map_err(|e| fail("ca-key.pem", e.to_string()));
    let root_key = gen_key()?;
    // A name of its own, so that another mesh's root (or this mesh's next one) is never taken
    // for it when a chain is built.
    let mut tag = [0u8; 8];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut tag)
        .map_err(|_| fail("root-cert.pem", "no randomness for the root's name".into()))?;
    let tag = super::node_tokens::hex(&tag);
    let root_params = ca_params(format!("Nodemesh root CA {tag}"), ROOT_VALIDITY, None);
    let root = root_params.self_signed(&root_key).map_err(|e| fail("root-cert.pem", e.to_string()))?;
    let root_issuer = Issuer::new(root_params, &root_key);
    let key = gen_key()?;
    let intermediate =
        ca_params(format!("Nodemesh intermediate CA ({cluster})"), INTERMEDIATE_VALIDITY, Some(0))
            .signed_by(&key, &root_issuer)
            .map_err(|e| fail("ca-cert.pem", e.to_string()))?;
    let files = [
        ("root-key.pem", root_key.serialize_pem()),
        ("root-cert.pem", root.pem()),
        ("ca-key.pem", key.serialize_pem()),
        ("ca-cert.pem", intermediate.pem()),
        ("cert-chain.pem", format!("{}{}", intermediate.pem(), root.pem())),
    ];
    for (file, text) in files {
        write_private(&dir.join(file), &text).map_err(|e| fail(file, e.to_string()))?;
    }
    tracing::info!(dir = %dir.display(), trust_domain, cluster, "created a self-signed root CA and an intermediate");
    Ok(())
}

/// Writes `text` readable by the owner only (keys live here).
fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(path)?;
    std::io::Write::write_all(&mut f, text.as_bytes())
}

/// The certificates of a PEM file, each as its own PEM text.
fn split_pem(text: &str) -> Vec<String> {
    const END: &str = "-----END CERTIFICATE-----";
    text.split_inclusive(END)
        .filter_map(|part| part.find("-----BEGIN CERTIFICATE-----").map(|i| format!("{}\n", &part[i..])))
        .collect()
}

fn pem_der(pem: &str) -> Result<Vec<u8>, String> {
    use rustls_pki_types::{CertificateDer, pem::PemObject};
    CertificateDer::from_pem_slice(pem.as_bytes())
        .map(|d| d.to_vec())
        .map_err(|e| format!("not a PEM certificate: {e:?}"))
}

fn same_cert(a: &str, b: &str) -> bool {
    matches!((pem_der(a), pem_der(b)), (Ok(x), Ok(y)) if x == y)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity(ns: &str, sa: &str) -> SpiffeId {
        SpiffeId { trust_domain: "cluster.local".into(), namespace: ns.into(), service_account: sa.into() }
    }

    fn csr_for(uri: &str) -> (KeyPair, String) {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![SanType::URI(uri.try_into().unwrap())];
        let csr = params.serialize_request(&key).unwrap().pem().unwrap();
        (key, csr)
    }

    fn temp_dir(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("nm-ca-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn a_new_ca_signs_a_workload_certificate_that_chains_to_its_root() {
        let dir = temp_dir("new");
        let ca = CertificateAuthority::load_or_create(&dir, "cluster.local", "c1").unwrap();
        let id = identity("shop", "reviews");
        let (_key, csr) = csr_for(&id.to_string());
        let chain = ca.sign(&csr, &id, Duration::from_secs(3600)).unwrap();
        assert_eq!(chain.len(), 3, "leaf, intermediate, root");
        assert!(same_cert(&chain[2], &ca.roots()[0]));
        // The leaf: the identity as its only URI SAN, not a CA, valid for about the TTL.
        let der = pem_der(&chain[0]).unwrap();
        let (_, leaf) = x509_parser::parse_x509_certificate(&der).unwrap();
        assert!(!leaf.is_ca());
        let san = leaf.subject_alternative_name().unwrap().unwrap();
        assert_eq!(
            format!("{:?}", san.value.general_names),
            "[URI(\"spiffe://cluster.local/ns/shop/sa/reviews\")]"
        );
        let lifetime = leaf.validity().not_after.timestamp() - leaf.validity().not_before.timestamp();
        assert_eq!(lifetime, 3600 + 60);
        // Verify the signatures along the chain.
        let intermediate_der = pem_der(&chain[1]).unwrap();
        let (_, intermediate) = x509_parser::parse_x509_certificate(&intermediate_der).unwrap();
        let root_der = pem_der(&chain[2]).unwrap();
        let (_, root) = x509_parser::parse_x509_certificate(&root_der).unwrap();
        leaf.verify_signature(Some(intermediate.public_key())).unwrap();
        intermediate.verify_signature(Some(root.public_key())).unwrap();
        // A second start loads the same CA instead of making a new one.
        let again = CertificateAuthority::load_or_create(&dir, "cluster.local", "c1").unwrap();
        assert_eq!(again.roots(), ca.roots());
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &fs::metadata(dir.join("ca-key.pem")).unwrap().permissions(),
        );
        assert_eq!(mode & 0o777, 0o600);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_csr_for_another_identity_or_trust_domain_is_refused() {
        let dir = temp_dir("refuse");
        let ca = CertificateAuthority::load_or_create(&dir, "cluster.local", "c1").unwrap();
        let (_key, csr) = csr_for("spiffe://cluster.local/ns/shop/sa/admin");
        let err =
            ca.sign(&csr, &identity("shop", "reviews"), Duration::from_secs(60)).unwrap_err().to_string();
        assert!(
            err.contains("asks for spiffe://cluster.local/ns/shop/sa/admin") && err.contains("sa/reviews"),
            "{err}"
        );
        let foreign = SpiffeId { trust_domain: "other.org".into(), ..identity("shop", "admin") };
        assert!(matches!(
            ca.sign(&csr, &foreign, Duration::from_secs(60)),
            Err(SignError::ForeignTrustDomain { .. })
        ));
        let tampered = csr.replace("MII", "MIJ");
        assert!(matches!(
            ca.sign(&tampered, &identity("shop", "admin"), Duration::from_secs(60)),
            Err(SignError::BadCsr(_))
        ));
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_bundle_whose_key_is_not_the_certificates_is_refused_naming_the_file() {
        let dir = temp_dir("mismatch");
        CertificateAuthority::load_or_create(&dir, "cluster.local", "c1").unwrap();
        fs::copy(dir.join("root-key.pem"), dir.join("ca-key.pem")).unwrap();
        let err = CertificateAuthority::load(&dir, "cluster.local").err().unwrap().to_string();
        assert!(err.contains("ca-key.pem: is not the key of ca-cert.pem"), "{err}");
        fs::remove_dir_all(&dir).unwrap();
    }
}
