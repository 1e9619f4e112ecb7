//! The L4 proxy: per-workload listeners inside each workload's netns, and the relay.

pub mod outbound;
mod relay;

pub use outbound::{Outbound, Source};
