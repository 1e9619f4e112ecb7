//! The control-plane side of the node: the xDS client ([`client`]), what it learnt
//! ([`cache`]), how a cluster picks an endpoint ([`lb`]), where a connection goes ([`route`]),
//! and the route tables of HTTP requests ([`http_route`]) and of other connections
//! ([`l4_route`]).

pub mod cache;
pub mod caller_variants;
pub mod client;
pub mod conn_limits;
pub mod connection_settings;
pub mod http_route;
pub mod l4_route;
pub mod lb;
pub mod rate_limit;
pub mod retry;
pub mod route;
pub mod weights;
