//! The proxy: per-workload listeners inside each workload's netns, protocol detection, the
//! L4 relay and the HTTP proxy.

mod http;
pub mod outbound;
mod pool;
mod rate_limits;
mod relay;
pub mod sniff;

pub use outbound::{Outbound, Source};
