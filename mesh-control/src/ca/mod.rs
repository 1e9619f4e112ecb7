//! Workload identity: the certificate authority ([`authority`]) that signs SPIFFE certificates
//! ([`identity`]) from CSRs that node proxies send for the workloads on their node, over Istio's
//! CSR API ([`service`]), each node authenticated by its token ([`node_tokens`]); on Kubernetes a
//! `cacerts` Secret may supply the CA ([`secret`]).

pub mod authority;
pub mod node_tokens;
pub mod secret;
pub mod service;

pub use authority::{CertificateAuthority, SignError};
pub use nodemesh_api::identity::SpiffeId;
