//! This node's workloads as the data path sees them: who a listener serves ([`Source`]), who
//! an address belongs to ([`LocalWorkload`], [`IpIndex`]). The registry
//! ([`crate::registry`]) fills them in; proxies, inbound delivery and the tunnel read them.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::{Arc, RwLock},
};

use nodemesh_api::workload::WorkloadKey;

use crate::{conn::pool::Pool, delivery_routing::DeliveryRoutes, netns::NetnsThread};

/// What the proxy needs to know about the workload a listener serves — and nothing more: no
/// registry access, no keys.
#[derive(Debug)]
pub struct Source {
    pub key: WorkloadKey,
    pub netns: NetnsThread,
    pub netns_cookie: u64,
    /// The workload's own addresses (consistent hashing on source IP uses the first).
    pub ips: Vec<IpAddr>,
    /// Its identity's service account (the namespace is the key's).
    pub service_account: String,
    /// Its upstream HTTP connections, reused across requests.
    pub http_pool: Pool,
    /// The delivery routing in its netns, held while this registration or a connection
    /// delivered into it lives. `None`: it shares mesh-node's own netns (no delivery).
    pub routes: Option<Arc<DeliveryRoutes>>,
}

impl Source {
    /// The address a connection from `peer` to the proxy came from, as a reader of logs and
    /// spans knows it: captured connections reach the proxy from loopback in the pod's netns,
    /// so the pod's own address with the connection's port.
    pub fn client_addr(&self, peer: SocketAddr) -> SocketAddr {
        SocketAddr::new(self.ips.first().copied().unwrap_or(peer.ip()), peer.port())
    }
}

/// A workload of this node, as inbound traffic and telemetry see it.
#[derive(Debug)]
pub struct LocalWorkload {
    pub key: WorkloadKey,
    pub service_account: String,
    /// Meshed, with delivery routing in place in its netns: where delivery sockets are made.
    /// `None`: not meshed, or sharing mesh-node's own netns (see ARCHITECTURE.md).
    pub delivery: Option<Arc<Source>>,
}

/// Registered workloads by address: for inbound delivery and destination telemetry.
#[derive(Default)]
pub struct IpIndex {
    by_ip: RwLock<HashMap<IpAddr, Arc<LocalWorkload>>>,
    /// Notified on every insert, for [`IpIndex::wait_for`].
    inserted: tokio::sync::Notify,
}

impl IpIndex {
    pub fn local(&self, ip: IpAddr) -> Option<Arc<LocalWorkload>> {
        self.by_ip.read().expect("ip index lock").get(&ip).cloned()
    }

    /// [`IpIndex::local`], waiting up to `timeout` for a workload at `ip` to register: a peer
    /// may learn of a pod (from the API server, through mesh-control) a moment before this
    /// node's discovery has registered it.
    pub async fn wait_for(&self, ip: IpAddr, timeout: std::time::Duration) -> Option<Arc<LocalWorkload>> {
        // Every tunnel stream asks; nearly always the workload is there.
        if let Some(found) = self.local(ip) {
            return Some(found);
        }
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            // Registered before looking, so an insert between the look and the wait is seen.
            let inserted = self.inserted.notified();
            if let Some(found) = self.local(ip) {
                return Some(found);
            }
            if tokio::time::timeout_at(deadline, inserted).await.is_err() {
                return None;
            }
        }
    }

    pub(crate) fn insert(&self, ips: &[IpAddr], workload: &Arc<LocalWorkload>) {
        let mut index = self.by_ip.write().expect("ip index lock");
        for ip in ips {
            index.insert(*ip, Arc::clone(workload));
        }
        drop(index);
        self.inserted.notify_waiters();
    }

    pub(crate) fn remove(&self, ips: &[IpAddr]) {
        let mut index = self.by_ip.write().expect("ip index lock");
        for ip in ips {
            index.remove(ip);
        }
    }
}
