//! Nodemesh control plane, and the protocol/model types both sides share.
//!
//! - [`model`]: the one typed config model every source produces, and its store.
//! - [`source`]: the sources (a watched YAML directory; node reports).
//! - [`proto`]: Nodemesh's compact xDS resources (generated from `proto/`).
//! - [`meshing`], [`workload`]: the opt-in rule and a workload as a node registers it.
//! - [`ca`], [`tls_port`]: the workload CA, and the TLS port nodes reach it (and xDS) on.
//! - [`metrics`]: mesh-control's own metrics (istiod's names), on the admin endpoint.
//! - [`graph`]: the live service graph (admin `/graph`), from the nodes' metrics.
#![forbid(unsafe_code)]

// Shared with mesh-node through the nodemesh-api crate; re-exported so paths stay short.
pub use nodemesh_api::{hash, http, logging, meshing, proto, service_graph, workload};

pub mod admin;
pub mod ca;
pub mod graph;
pub mod metrics;
pub mod model;
pub mod run;
pub mod source;
pub mod tls_port;
pub mod xds;
