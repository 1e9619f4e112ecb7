//! Certificates for the identities of this node's workloads, from mesh-control's CA.
//!
//! For every identity a registered workload has (`spiffe://<trust-domain>/ns/<ns>/sa/<sa>`),
//! the node makes a key pair (it never leaves this process), sends a CSR over Istio's
//! `CreateCertificate` with its node token and the identity as `ImpersonatedIdentity`, and
//! keeps the chain. A certificate is renewed at half of its remaining life when it arrived; a
//! failed request is retried with back-off while the old certificate stays in use. Identities
//! no workload has any more are dropped with their keys.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{Arc, OnceLock, RwLock},
    time::{Duration, SystemTime},
};

use nodemesh_api::{
    identity::SpiffeId,
    proto::istio_ca::{
        IstioCertificateRequest, istio_certificate_service_client::IstioCertificateServiceClient,
    },
};
use rcgen::{CertificateParams, KeyPair, SanType};
use tokio::sync::watch;

use crate::control_plane::{ControlPlane, LazyChannel, NodeToken};

pub mod tls;

use nodemesh_api::workload::WorkloadSpec;

/// A workload certificate and its key.
pub struct WorkloadCert {
    pub identity: SpiffeId,
    /// PKCS#8 PEM; only ever used by this process (TLS on the workload's behalf).
    key_pem: String,
    /// Leaf first, then the chain to the root.
    pub chain: Vec<String>,
    pub not_after: SystemTime,
    pub received: SystemTime,
    /// [`server_name`] of `identity`.
    pub server_name: String,
    /// The chain and key as rustls presents them, parsed on first use.
    certified: OnceLock<Result<Arc<rustls::sign::CertifiedKey>, String>>,
}

/// The TLS server name a tunnel client sends to reach `identity`: a hash of it (TLS 1.3 hides
/// certificates but not the server name, so the link never shows which workloads talk).
pub fn server_name(identity: &SpiffeId) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(identity.to_string().as_bytes());
    let hex: String = digest.iter().take(16).map(|b| format!("{b:02x}")).collect();
    format!("{hex}.hbone.nodemesh")
}

impl WorkloadCert {
    pub fn new(
        identity: SpiffeId,
        key_pem: String,
        chain: Vec<String>,
        not_after: SystemTime,
        received: SystemTime,
    ) -> WorkloadCert {
        let server_name = server_name(&identity);
        WorkloadCert {
            identity,
            key_pem,
            chain,
            not_after,
            received,
            server_name,
            certified: OnceLock::new(),
        }
    }

    /// The chain (without the root) and key for rustls.
    pub fn certified(&self) -> Result<Arc<rustls::sign::CertifiedKey>, String> {
        self.certified.get_or_init(|| tls::certified_key(self).map(Arc::new)).clone()
    }

    /// The root this certificate chains to (last in the chain).
    pub fn root(&self) -> Option<&str> {
        self.chain.last().map(String::as_str)
    }

    /// Half of the life it had left when it arrived.
    pub fn renew_at(&self) -> SystemTime {
        let left = self.not_after.duration_since(self.received).unwrap_or_default();
        self.received + left / 2
    }

    pub fn key_pem(&self) -> &str {
        &self.key_pem
    }
}

pub struct Identities {
    channel: LazyChannel,
    token: NodeToken,
    trust_domain: String,
    certs: RwLock<BTreeMap<SpiffeId, Arc<WorkloadCert>>>,
    /// The last failure per identity, until it succeeds.
    failures: RwLock<BTreeMap<SpiffeId, String>>,
    /// Bumped whenever a certificate comes or goes: TLS configs built from older ones rebuild.
    version: watch::Sender<u64>,
}

/// First retry after a failed request; doubles up to [`MAX_RETRY`].
const FIRST_RETRY: Duration = Duration::from_millis(500);
const MAX_RETRY: Duration = Duration::from_secs(30);

/// How long to wait before asking again after a failed request: doubling from [`FIRST_RETRY`]
/// up to [`MAX_RETRY`], but never more than a quarter of what is `left` of the certificate in
/// use, so a control plane that is back within the certificate's life is asked several times
/// before the certificate expires (a doubling backoff alone overshoots short lifetimes).
fn retry_delay(previous: Option<Duration>, left: Option<Duration>) -> Duration {
    let doubled = previous.map_or(FIRST_RETRY, |d| (d * 2).min(MAX_RETRY));
    match left {
        Some(left) => doubled.min((left / 4).max(FIRST_RETRY / 5)),
        None => doubled,
    }
}

impl Identities {
    pub fn new(
        control_plane: &ControlPlane,
        token: NodeToken,
        trust_domain: String,
    ) -> anyhow::Result<Identities> {
        let channel = LazyChannel::new(control_plane.clone(), Duration::from_secs(10))?;
        Ok(Identities {
            channel,
            token,
            trust_domain,
            certs: RwLock::default(),
            failures: RwLock::default(),
            version: watch::Sender::new(0),
        })
    }

    /// The certificate of `identity`, if the node holds one.
    pub fn get(&self, identity: &SpiffeId) -> Option<Arc<WorkloadCert>> {
        self.certs.read().expect("certs lock").get(identity).cloned()
    }

    /// The certificate of `identity`, waiting up to `timeout` for it to arrive (a workload
    /// may connect before its first certificate is signed).
    pub async fn wait_for(&self, identity: &SpiffeId, timeout: Duration) -> Option<Arc<WorkloadCert>> {
        self.wait_until(timeout, || self.get(identity)).await
    }

    /// The certificate whose [`server_name`] is `name`.
    pub fn by_server_name(&self, name: &str) -> Option<Arc<WorkloadCert>> {
        self.certs.read().expect("certs lock").values().find(|c| c.server_name == name).cloned()
    }

    /// [`Identities::by_server_name`], waiting up to `timeout` for it: a peer may dial a
    /// workload whose certificate this node is still obtaining (the node just started, or
    /// the workload just arrived).
    pub async fn wait_for_server_name(&self, name: &str, timeout: Duration) -> Option<Arc<WorkloadCert>> {
        self.wait_until(timeout, || self.by_server_name(name)).await
    }

    /// `lookup` once it finds something, re-tried on every certificate change until `timeout`.
    async fn wait_until(
        &self,
        timeout: Duration,
        lookup: impl Fn() -> Option<Arc<WorkloadCert>>,
    ) -> Option<Arc<WorkloadCert>> {
        let mut version = self.version.subscribe();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(cert) = lookup() {
                return Some(cert);
            }
            if tokio::time::timeout_at(deadline, version.changed()).await.is_err() {
                return None;
            }
        }
    }

    /// Why the last request for `identity` failed, until one succeeds.
    pub fn failure(&self, identity: &SpiffeId) -> Option<String> {
        self.failures.read().expect("failures lock").get(identity).cloned()
    }

    /// Changes with every certificate that comes or goes.
    pub fn version(&self) -> u64 {
        *self.version.borrow()
    }

    /// The distinct roots of the certificates held: what a peer's chain must end in.
    pub fn roots(&self) -> Vec<String> {
        let certs = self.certs.read().expect("certs lock");
        let roots: BTreeSet<&str> = certs.values().filter_map(|c| c.root()).collect();
        roots.into_iter().map(str::to_string).collect()
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// `spiffe://<trust domain>/ns/<namespace>/sa/<account>` (`default` for an empty account).
    pub fn identity(&self, namespace: &str, service_account: &str) -> SpiffeId {
        SpiffeId::of_workload(&self.trust_domain, namespace, service_account)
    }

    fn identity_of(&self, spec: &WorkloadSpec) -> SpiffeId {
        self.identity(&spec.namespace, &spec.service_account)
    }

    /// Keeps a valid certificate for every identity of the registered workloads, forever.
    pub async fn run(self: Arc<Self>, mut specs: watch::Receiver<Vec<WorkloadSpec>>) {
        let mut retry: BTreeMap<SpiffeId, Duration> = BTreeMap::new();
        loop {
            // Only meshed workloads speak mTLS; one outside the mesh needs no certificate.
            let wanted: BTreeSet<SpiffeId> = specs
                .borrow()
                .iter()
                .filter(|s| s.mesh_decision().is_meshed())
                .map(|s| self.identity_of(s))
                .collect();
            let before = self.certs.read().expect("certs lock").len();
            self.certs.write().expect("certs lock").retain(|id, _| wanted.contains(id));
            if self.certs.read().expect("certs lock").len() != before {
                self.version.send_modify(|v| *v += 1);
            }
            self.failures.write().expect("failures lock").retain(|id, _| wanted.contains(id));
            retry.retain(|id, _| wanted.contains(id));
            let mut wake = SystemTime::now() + MAX_RETRY;
            for id in &wanted {
                let now = SystemTime::now();
                if let Some(renew_at) = self.get(id).map(|c| c.renew_at()).filter(|at| *at > now) {
                    wake = wake.min(renew_at);
                    continue;
                }
                match self.fetch(id).await {
                    Ok(cert) => {
                        tracing::info!(identity = %id, valid_s = cert.not_after.duration_since(now).unwrap_or_default().as_secs(), "workload certificate obtained");
                        wake = wake.min(cert.renew_at());
                        self.certs.write().expect("certs lock").insert(id.clone(), Arc::new(cert));
                        self.version.send_modify(|v| *v += 1);
                        self.failures.write().expect("failures lock").remove(id);
                        retry.remove(id);
                    }
                    Err(e) => {
                        let left =
                            self.get(id).and_then(|c| c.not_after.duration_since(SystemTime::now()).ok());
                        let delay = retry_delay(retry.get(id).copied(), left);
                        tracing::warn!(identity = %id, retry_ms = delay.as_millis() as u64, "workload certificate not obtained: {e}");
                        self.failures.write().expect("failures lock").insert(id.clone(), e);
                        retry.insert(id.clone(), delay);
                        wake = wake.min(SystemTime::now() + delay);
                    }
                }
            }
            let sleep = wake.duration_since(SystemTime::now()).unwrap_or_default();
            tokio::select! {
                changed = specs.changed() => if changed.is_err() { return },
                () = tokio::time::sleep(sleep) => {}
            }
        }
    }

    /// A new key and a certificate for it.
    async fn fetch(&self, id: &SpiffeId) -> Result<WorkloadCert, String> {
        let key = KeyPair::generate().map_err(|e| format!("key generation: {e}"))?;
        let mut params = CertificateParams::default();
        let uri = id.to_string();
        params.subject_alt_names = vec![SanType::URI(uri.clone().try_into().map_err(|e| format!("{e}"))?)];
        let csr = params.serialize_request(&key).and_then(|c| c.pem()).map_err(|e| format!("CSR: {e}"))?;
        let metadata = prost_types::Struct {
            fields: [(
                nodemesh_api::proto::IMPERSONATED_IDENTITY.to_string(),
                prost_types::Value { kind: Some(prost_types::value::Kind::StringValue(uri.clone())) },
            )]
            .into(),
        };
        let mut request = tonic::Request::new(IstioCertificateRequest {
            csr,
            validity_duration: 0,
            metadata: Some(metadata),
        });
        let bearer = self.token.bearer().ok_or("the node token is not a valid header value")?;
        request.metadata_mut().insert("authorization", bearer);
        let received = SystemTime::now();
        let chain = IstioCertificateServiceClient::new(self.channel.get().map_err(|e| format!("{e:#}"))?)
            .create_certificate(request)
            .await
            .map_err(|s| format!("{:?}: {}", s.code(), s.message()))?
            .into_inner()
            .cert_chain;
        let not_after = leaf_checked(&chain, id)?;
        Ok(WorkloadCert::new(id.clone(), key.serialize_pem(), chain, not_after, received))
    }

    /// What `/config_dump` shows: identities, validity, failures; never keys.
    pub fn dump(&self) -> serde_json::Value {
        let unix = |t: SystemTime| t.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let certs: Vec<serde_json::Value> = self
            .certs
            .read()
            .expect("certs lock")
            .values()
            .map(|c| {
                serde_json::json!({
                    "identity": c.identity.to_string(),
                    "not_after": unix(c.not_after),
                    "renew_at": unix(c.renew_at()),
                    "received": unix(c.received),
                    "chain_length": c.chain.len(),
                })
            })
            .collect();
        let failures: BTreeMap<String, String> = self
            .failures
            .read()
            .expect("failures lock")
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect();
        serde_json::json!({ "certificates": certs, "failures": failures })
    }
}

/// Checks that the leaf proves exactly `id`; returns when it expires.
fn leaf_checked(chain: &[String], id: &SpiffeId) -> Result<SystemTime, String> {
    let leaf = chain.first().ok_or("the CA answered with an empty chain")?;
    let (_, pem) = x509_parser::pem::parse_x509_pem(leaf.as_bytes()).map_err(|e| format!("leaf PEM: {e}"))?;
    let proven = tls::peer_identity(&pem.contents.as_slice().into())?;
    if proven != *id {
        return Err(format!("the CA's certificate is for {proven}, not {id}"));
    }
    let cert = pem.parse_x509().map_err(|e| format!("leaf certificate: {e}"))?;
    let not_after = cert.validity().not_after.timestamp();
    Ok(SystemTime::UNIX_EPOCH + Duration::from_secs(u64::try_from(not_after).unwrap_or(0)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_double_but_stay_well_inside_the_certificate_left() {
        // No certificate yet: plain doubling, capped.
        assert_eq!(retry_delay(None, None), FIRST_RETRY);
        assert_eq!(retry_delay(Some(Duration::from_secs(4)), None), Duration::from_secs(8));
        assert_eq!(retry_delay(Some(Duration::from_secs(20)), None), MAX_RETRY);
        // A 10 s certificate at half-life (5 s left): never past 1.25 s, so it is asked again
        // several times before it expires.
        let left = Some(Duration::from_secs(5));
        assert_eq!(retry_delay(Some(Duration::from_secs(4)), left), Duration::from_millis(1250));
        // Nearly expired: still a short pause, not a busy loop.
        assert_eq!(
            retry_delay(Some(Duration::from_secs(4)), Some(Duration::from_millis(100))),
            FIRST_RETRY / 5
        );
        // A day-long certificate: the backoff is what limits.
        assert_eq!(
            retry_delay(Some(Duration::from_secs(1)), Some(Duration::from_secs(43_200))),
            Duration::from_secs(2)
        );
    }
}
