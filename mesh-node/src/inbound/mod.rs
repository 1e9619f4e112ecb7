//! Inbound: connections *to* this node's meshed workloads — from a tunnel, or from a meshed
//! workload on the same node — delivered into the pod as their real client.

pub mod deliver;
pub mod guard;
pub mod http;
pub mod plaintext;

/// `SO_MARK` of delivery sockets; the pod's routing sends answers to them back to mesh-node.
pub const DEFAULT_DELIVERY_MARK: u32 = 0x4e4e;
