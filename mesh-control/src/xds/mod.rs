//! xDS: the model translated into resources ([`translate`]: services → clusters and endpoints,
//! workloads; [`routes`], [`l4_routes`], [`listeners`], [`rate_limits`], [`authorizations`]:
//! one resource kind each; [`encode`]: the protobuf helpers they share), collected in a
//! [`snapshot`], served over ADS ([`server`]) with per-node ACK/NACK tracking ([`nodes`]); plus
//! the service nodes report their local workloads through ([`registration`]).
//!
//! Dependencies point one way: `translate` → the per-kind builders → `encode`; `snapshot`
//! depends only on `encode`.

pub mod authorizations;
pub mod encode;
pub mod l4_routes;
pub mod listeners;
pub mod nodes;
pub mod rate_limits;
pub mod registration;
pub mod routes;
pub mod server;
pub mod snapshot;
pub mod translate;
