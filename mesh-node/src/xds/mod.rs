//! The control-plane side of the node: the xDS client ([`client`]), what it learnt
//! ([`cache`]), how a cluster picks an endpoint ([`lb`]) and where a connection goes ([`route`]).

pub mod cache;
pub mod client;
pub mod http_route;
pub mod lb;
pub mod rate_limit;
pub mod retry;
pub mod route;
