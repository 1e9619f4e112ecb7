//! Nodemesh control plane.
//!
//! For now this is the library half only: the model types that both the node proxy and the
//! (coming) control-plane server agree on. The first of them describes a workload as a node
//! sees it, and the rule that decides whether a workload is meshed.
#![forbid(unsafe_code)]

pub mod meshing;
pub mod workload;
