//! Istio's `IstioCertificateService/CreateCertificate`, served next to xDS: a node proxy sends a
//! CSR (its key never leaves the node) for a workload on its node and gets the certificate chain.
//!
//! The caller proves which node it is with its node token (`authorization: Bearer <token>`); it
//! names the identity it asks for in the request metadata `ImpersonatedIdentity` (as ztunnel
//! does), or else by the CSR's own SAN. A node obtains only identities of workloads scheduled
//! on it: a Pod (or a workload the node reported) there with that namespace and service account.

use std::{
    str::FromStr,
    sync::{Arc, Mutex},
    time::Duration,
};

use tonic::{Request, Response, Status};

use super::{CertificateAuthority, SpiffeId, node_tokens::NodeTokens};
use crate::{
    model::{Kind, Object, store::Store},
    proto::istio_ca::{IstioCertificateRequest, IstioCertificateResponse, istio_certificate_service_server},
};

/// The metadata key naming the identity asked for.
pub const IMPERSONATED_IDENTITY: &str = "ImpersonatedIdentity";

pub struct CertificateService {
    /// `None`: mesh-control runs without a CA; every request is refused saying so.
    pub ca: Option<Arc<CertificateAuthority>>,
    pub tokens: Option<Arc<NodeTokens>>,
    pub store: Arc<Mutex<Store>>,
    /// The longest certificate lifetime handed out (a request may ask for less).
    pub max_ttl: Duration,
}

#[tonic::async_trait]
impl istio_certificate_service_server::IstioCertificateService for CertificateService {
    async fn create_certificate(
        &self,
        request: Request<IstioCertificateRequest>,
    ) -> Result<Response<IstioCertificateResponse>, Status> {
        let (Some(ca), Some(tokens)) = (&self.ca, &self.tokens) else {
            return Err(Status::unavailable("this mesh-control runs without a CA (start it with --ca-dir)"));
        };
        let node = authenticate(tokens, request.metadata())?;
        let request = request.into_inner();
        let identity = requested_identity(&request, &ca.trust_domain)?;
        if let Err(why) = authorize(&self.store.lock().expect("store lock"), &node, &identity) {
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

/// The node a request comes from, by its token.
fn authenticate(tokens: &NodeTokens, metadata: &tonic::metadata::MetadataMap) -> Result<String, Status> {
    let header = metadata.get("authorization").ok_or_else(|| {
        Status::unauthenticated("no node credential: send `authorization: Bearer <node token>`")
    })?;
    let token =
        header.to_str().ok().and_then(|h| h.strip_prefix("Bearer ")).ok_or_else(|| {
            Status::unauthenticated("the authorization header is not `Bearer <node token>`")
        })?;
    tokens.verify(token).ok_or_else(|| {
        Status::unauthenticated(
            "the node token is not valid (mint one with `mesh-control node-token <node>`)",
        )
    })
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

/// Whether `node` runs a workload that has `identity`.
fn authorize(store: &Store, node: &str, identity: &SpiffeId) -> Result<(), String> {
    let runs_it =
        [Kind::Pod, Kind::NodeWorkload].into_iter().flat_map(|k| store.of_kind(k)).any(|o| match o {
            Object::Pod(p) | Object::NodeWorkload(p) => {
                let account =
                    if p.service_account.is_empty() { "default" } else { p.service_account.as_str() };
                p.node == node
                    && p.meta.namespace == identity.namespace
                    && account == identity.service_account
            }
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
