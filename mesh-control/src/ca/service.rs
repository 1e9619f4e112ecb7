//! Istio's `IstioCertificateService/CreateCertificate`, served next to xDS: a node proxy sends a
//! CSR (its key never leaves the node) for a workload on its node and gets the certificate chain.
//!
//! The caller proves which node it is with its node token (`authorization: Bearer <token>`); it
//! names the identity it asks for in the request metadata `ImpersonatedIdentity` (as ztunnel
//! does), or else by the CSR's own SAN. A node obtains only identities of workloads scheduled
//! on it: a Pod there with that namespace and service account, or such a workload the node
//! reported with its token (see [`NodeCredentials`]).

use std::{
    str::FromStr,
    sync::{Arc, Mutex},
    time::Duration,
};

use tonic::{Request, Response, Status};

use super::{CertificateAuthority, SpiffeId, node_tokens::NodeCredentials};
use crate::{
    metrics::ControlMetrics,
    model::{Kind, Object, store::Store},
    proto::istio_ca::{IstioCertificateRequest, IstioCertificateResponse, istio_certificate_service_server},
};

/// The metadata key naming the identity asked for.
pub use crate::proto::IMPERSONATED_IDENTITY;

pub struct CertificateService {
    /// `None`: mesh-control runs without a CA; every request is refused saying so.
    pub ca: Option<Arc<CertificateAuthority>>,
    pub nodes: Arc<NodeCredentials>,
    pub store: Arc<Mutex<Store>>,
    /// The longest certificate lifetime handed out (a request may ask for less).
    pub max_ttl: Duration,
    pub metrics: Arc<ControlMetrics>,
}

#[tonic::async_trait]
impl istio_certificate_service_server::IstioCertificateService for CertificateService {
    async fn create_certificate(
        &self,
        request: Request<IstioCertificateRequest>,
    ) -> Result<Response<IstioCertificateResponse>, Status> {
        self.metrics.csr_requests.inc();
        let issued = self.issue(request).await;
        match &issued {
            Ok(_) => {
                self.metrics.certificates_issued.inc();
            }
            Err(status) => self.metrics.sign_error(match status.code() {
                tonic::Code::Unavailable => "no_ca",
                tonic::Code::Unauthenticated => "bad_token",
                tonic::Code::PermissionDenied => "identity_not_allowed",
                _ => "bad_csr",
            }),
        }
        issued
    }
}

impl CertificateService {
    async fn issue(
        &self,
        request: Request<IstioCertificateRequest>,
    ) -> Result<Response<IstioCertificateResponse>, Status> {
        let Some(ca) = &self.ca else {
            return Err(Status::unavailable("this mesh-control runs without a CA (start it with --ca-dir)"));
        };
        let node = self.nodes.presented(request.metadata()).await?.ok_or_else(|| {
            Status::unauthenticated("no node credential: send `authorization: Bearer <node token>`")
        })?;
        let request = request.into_inner();
        let identity = requested_identity(&request, &ca.trust_domain)?;
        let verdict = authorize(&self.store.lock().expect("store lock"), &self.nodes, &node, &identity);
        if let Err(why) = verdict {
            tracing::warn!(node, %identity, "certificate refused: {why}");
            return Err(Status::permission_denied(why));
        }
        let asked = u64::try_from(request.validity_duration).unwrap_or(0);
        let ttl = if asked == 0 { self.max_ttl } else { Duration::from_secs(asked).min(self.max_ttl) };
        match ca.sign(&request.csr, &identity, ttl) {
            Ok(cert_chain) => {
                tracing::info!(node, %identity, ttl_s = ttl.as_secs(), "certificate issued");
                Ok(Response::new(IstioCertificateResponse { cert_chain }))
            }
            Err(e) => {
                tracing::warn!(node, %identity, "certificate refused: {e}");
                Err(Status::invalid_argument(e.to_string()))
            }
        }
    }
}

/// The identity asked for: `ImpersonatedIdentity`, else the CSR's own.
fn requested_identity(request: &IstioCertificateRequest, trust_domain: &str) -> Result<SpiffeId, Status> {
    let named = request.metadata.as_ref().and_then(|m| m.fields.get(IMPERSONATED_IDENTITY)).and_then(|v| {
        match &v.kind {
            Some(prost_types::value::Kind::StringValue(s)) => Some(s.clone()),
            _ => None,
        }
    });
    let uri = match named {
        Some(uri) => uri,
        None => super::authority::csr_identity(&request.csr)
            .map_err(|e| Status::invalid_argument(e.to_string()))?,
    };
    let id = SpiffeId::from_str(&uri).map_err(Status::invalid_argument)?;
    if id.trust_domain != trust_domain {
        return Err(Status::permission_denied(format!(
            "identity {id} is outside this CA's trust domain {trust_domain}"
        )));
    }
    Ok(id)
}

/// Whether `node` runs a workload that has `identity`: a Pod scheduled there (the API says
/// so), or a workload the node reported with its token.
fn authorize(store: &Store, nodes: &NodeCredentials, node: &str, identity: &SpiffeId) -> Result<(), String> {
    let has = |p: &crate::model::core::Pod| {
        p.node == node
            && SpiffeId::of_workload(&identity.trust_domain, &p.meta.namespace, &p.service_account)
                == *identity
    };
    let runs_it =
        [Kind::Pod, Kind::NodeWorkload].into_iter().flat_map(|k| store.of_kind(k)).any(|o| match o {
            Object::Pod(p) => has(p),
            Object::NodeWorkload(p) => has(p) && nodes.is_verified(node),
            _ => false,
        });
    if runs_it {
        Ok(())
    } else {
        Err(format!(
            "node {node} may not obtain {identity}: no workload with service account {} in namespace {} is \
             scheduled on node {node}",
            identity.service_account, identity.namespace
        ))
    }
}
