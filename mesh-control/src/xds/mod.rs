//! xDS: the model translated into resources ([`translate`], [`snapshot`]), served over ADS
//! ([`server`]) with per-node ACK/NACK tracking ([`nodes`]); plus the service nodes report
//! their local workloads through ([`registration`]).

pub mod authorizations;
pub mod l4_routes;
pub mod listeners;
pub mod nodes;
pub mod rate_limits;
pub mod registration;
pub mod routes;
pub mod server;
pub mod snapshot;
pub mod translate;
