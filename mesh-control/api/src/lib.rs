//! What mesh-node and mesh-control must agree on, in one small crate both depend on (so the
//! node proxy does not pull in the control plane's Kubernetes client, file watcher and YAML):
//!
//! - [`proto`]: Nodemesh's xDS resources and services (generated), Istio's CA API, the type
//!   URLs and the metadata keys that carry what Envoy's resources cannot say;
//! - [`identity`]: SPIFFE identities; [`workload`]: a workload as a node registers it;
//!   [`meshing`]: the opt-in rule; [`matchers`]: the matching both sides must do alike;
//!   [`hash`]: the process-independent hash behind resource versions and hash rings;
//! - [`http`], [`logging`]: the admin-endpoint and log plumbing both binaries share;
//! - [`service_graph`]: a node's Istio metrics folded into service-graph edges, as the node
//!   serves them and mesh-control reads them;
//! - `kube_client` (feature `kubernetes`): how both reach the API server.
#![forbid(unsafe_code)]

pub mod access_log;
pub mod hash;
pub mod http;
pub mod identity;
#[cfg(feature = "kubernetes")]
pub mod kube_client;
pub mod logging;
pub mod matchers;
pub mod meshing;
pub mod proto;
pub mod service_graph;
pub mod workload;

/// The HBONE tunnel's port on every node (mesh-node's `--tunnel-listen` default; the
/// DaemonSet runs on the host network, so a pod's `status.hostIP` and this port reach its
/// node's tunnel).
pub const TUNNEL_PORT: u16 = 15008;
