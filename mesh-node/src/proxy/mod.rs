//! The proxy: per-workload listeners inside each workload's netns, protocol detection, the
//! L4 relay and the HTTP proxy.

pub(crate) mod http;
pub mod outbound;
pub(crate) mod pool;
mod rate_limits;
pub mod relay;
pub mod sniff;
pub mod upstream;

pub use outbound::{Outbound, Source};
