//! What each node runs: the config generation it has acknowledged per resource type, and the
//! reason of its last rejection (NACK). `mesh-control status` prints this.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex},
    time::SystemTime,
};

use crate::metrics::ControlMetrics;

#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct NodeStatus {
    pub node: String,
    pub connected: bool,
    /// Open ADS streams from this node: two while a new mesh-node takes over from the old
    /// one, which keeps its stream until it exits.
    #[serde(default)]
    pub streams: u32,
    /// "delta" or "sotw".
    pub protocol: String,
    /// Seconds since the epoch of the current (or last) stream's start.
    pub connected_at: u64,
    /// Per type URL: the newest generation whose response the node acknowledged (or that had
    /// nothing new for it).
    pub acked: BTreeMap<String, u64>,
    /// Per type URL: the last rejection, until a later response is accepted.
    pub nacks: BTreeMap<String, Nack>,
    /// Where the service graph scrapes the node's metrics: its stream's peer address with the
    /// port it announced (`nodemesh.io/metrics-port`); none if it has no `--metrics-addr`.
    #[serde(default)]
    pub metrics_endpoint: Option<std::net::SocketAddr>,
}

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Nack {
    pub generation: u64,
    pub reason: String,
}

impl NodeStatus {
    /// The generation the node runs in full: the oldest of its per-type acknowledgements.
    pub fn applied_generation(&self) -> u64 {
        self.acked.values().copied().min().unwrap_or(0)
    }
}

#[derive(Default)]
pub struct Nodes {
    by_name: Mutex<HashMap<String, NodeStatus>>,
    /// Streams, pushes and rejections as metrics.
    pub metrics: Arc<ControlMetrics>,
}

impl Nodes {
    pub fn connected(&self, node: &str, protocol: &str) {
        self.metrics.connected_nodes.inc();
        let mut map = self.by_name.lock().expect("nodes lock");
        let s = map.entry(node.to_string()).or_default();
        s.node = node.to_string();
        s.connected = true;
        s.streams += 1;
        s.protocol = protocol.to_string();
        s.connected_at = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        s.acked.clear();
    }

    /// Records where the node's metrics are scraped (see [`NodeStatus::metrics_endpoint`]).
    pub fn metrics_endpoint(&self, node: &str, endpoint: Option<std::net::SocketAddr>) {
        if let Some(s) = self.by_name.lock().expect("nodes lock").get_mut(node) {
            s.metrics_endpoint = endpoint;
        }
    }

    pub fn disconnected(&self, node: &str) {
        self.metrics.connected_nodes.dec();
        if let Some(s) = self.by_name.lock().expect("nodes lock").get_mut(node) {
            s.streams = s.streams.saturating_sub(1);
            s.connected = s.streams > 0;
        }
    }

    pub fn acked(&self, node: &str, type_url: &str, generation: u64) {
        if let Some(s) = self.by_name.lock().expect("nodes lock").get_mut(node) {
            let g = s.acked.entry(type_url.to_string()).or_default();
            *g = (*g).max(generation);
            s.nacks.remove(type_url);
        }
    }

    pub fn nacked(&self, node: &str, type_url: &str, generation: u64, reason: &str) {
        tracing::warn!(node, type_url, generation, "node rejected config: {reason}");
        self.metrics.rejected(type_url);
        if let Some(s) = self.by_name.lock().expect("nodes lock").get_mut(node) {
            s.nacks.insert(type_url.to_string(), Nack { generation, reason: reason.to_string() });
        }
    }

    pub fn list(&self) -> Vec<NodeStatus> {
        let mut v: Vec<NodeStatus> = self.by_name.lock().expect("nodes lock").values().cloned().collect();
        v.sort_by(|a, b| a.node.cmp(&b.node));
        v
    }
}
