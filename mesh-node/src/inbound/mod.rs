//! Inbound: connections *to* this node's meshed workloads — from a tunnel, or from a meshed
//! workload on the same node — delivered into the pod as their real client.

pub mod authz;
pub mod deliver;
pub mod guard;
pub mod http;
pub mod plaintext;
pub mod routing;

use std::sync::Arc;

use nodemesh_api::workload::WorkloadKey;

use crate::proxy::Source;

/// `SO_MARK` of delivery sockets; the pod's routing sends answers to them back to mesh-node.
pub const DEFAULT_DELIVERY_MARK: u32 = 0x4e4e;

/// A workload of this node, as inbound traffic and telemetry see it.
#[derive(Debug)]
pub struct LocalWorkload {
    pub key: WorkloadKey,
    pub service_account: String,
    /// Meshed, with delivery routing in place in its netns: where delivery sockets are made.
    /// `None`: not meshed, or sharing mesh-node's own netns (see ARCHITECTURE.md).
    pub delivery: Option<Arc<Source>>,
}
