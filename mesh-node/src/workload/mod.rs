//! The workloads this node serves: registration, capture on/off, listeners, persistence.

mod listeners;
mod registry;
mod state;

pub use registry::{IpIndex, Registry, WorkloadError, WorkloadStatus};
