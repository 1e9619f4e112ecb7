//! Envoy v3 aggregated discovery (ADS) over tonic: incremental ("delta", what mesh-node uses)
//! and state-of-the-world (what Envoy and gRPC's proxyless client default to).
//!
//! Per stream and per type at most one response is in flight: the next waits for the node's
//! ACK or NACK (flow control), and changes that arrive meanwhile are coalesced into it. Pushes
//! go in [`PUSH_ORDER`] so references resolve before they are used.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    pin::Pin,
    sync::Arc,
};

use envoy_types::pb::envoy::service::discovery::v3::{
    self as discovery, DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
    aggregated_discovery_service_server::AggregatedDiscoveryService,
};
use futures::Stream;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::{
    super::proto,
    nodes::Nodes,
    snapshot::{PUSH_ORDER, Resource, Snapshot, Subscription},
    translate::content_version,
};

pub struct AdsServer {
    pub snapshots: watch::Receiver<Arc<Snapshot>>,
    pub nodes: Arc<Nodes>,
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl AggregatedDiscoveryService for AdsServer {
    type StreamAggregatedResourcesStream = BoxStream<DiscoveryResponse>;
    type DeltaAggregatedResourcesStream = BoxStream<DeltaDiscoveryResponse>;

    async fn delta_aggregated_resources(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        let mut inbound = request.into_inner();
        let first =
            inbound.message().await?.ok_or_else(|| Status::cancelled("stream closed before a request"))?;
        let node = node_id(first.node.as_ref())?;
        let (tx, rx) = mpsc::channel(16);
        let stream = DeltaStream::new(node, self.snapshots.clone(), Arc::clone(&self.nodes));
        tokio::spawn(stream.run(first, inbound, tx));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn stream_aggregated_resources(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamAggregatedResourcesStream>, Status> {
        let mut inbound = request.into_inner();
        let first =
            inbound.message().await?.ok_or_else(|| Status::cancelled("stream closed before a request"))?;
        let node = node_id(first.node.as_ref())?;
        let (tx, rx) = mpsc::channel(16);
        let stream = SotwStream::new(node, self.snapshots.clone(), Arc::clone(&self.nodes));
        tokio::spawn(stream.run(first, inbound, tx));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

fn node_id(node: Option<&envoy_types::pb::envoy::config::core::v3::Node>) -> Result<String, Status> {
    node.map(|n| n.id.clone())
        .filter(|id| !id.is_empty())
        .ok_or_else(|| Status::invalid_argument("the first request must carry node.id (the node's name)"))
}

/// State shared by both protocols: subscriptions, the in-flight response per type, and what
/// changed since.
struct Common {
    node: String,
    snapshots: watch::Receiver<Arc<Snapshot>>,
    snapshot: Arc<Snapshot>,
    nodes: Arc<Nodes>,
    subs: HashMap<String, Subscription>,
    /// type → (nonce, generation) of the response awaiting ACK/NACK.
    pending: HashMap<String, (String, u64)>,
    dirty: HashSet<String>,
    next_nonce: u64,
}

impl Common {
    fn new(
        node: String,
        mut snapshots: watch::Receiver<Arc<Snapshot>>,
        nodes: Arc<Nodes>,
        protocol: &str,
    ) -> Common {
        nodes.connected(&node, protocol);
        tracing::info!(node, protocol, "node connected");
        let snapshot = Arc::clone(&snapshots.borrow_and_update());
        Common {
            node,
            snapshots,
            snapshot,
            nodes,
            subs: HashMap::new(),
            pending: HashMap::new(),
            dirty: HashSet::new(),
            next_nonce: 0,
        }
    }

    fn nonce(&mut self) -> String {
        self.next_nonce += 1;
        self.next_nonce.to_string()
    }

    /// ACK or NACK of an earlier response; stale nonces are ignored.
    fn answer(&mut self, type_url: &str, nonce: &str, error: Option<&str>) {
        if nonce.is_empty() {
            return;
        }
        let Some((pending_nonce, generation)) = self.pending.get(type_url).cloned() else { return };
        if pending_nonce != nonce {
            return;
        }
        self.pending.remove(type_url);
        match error {
            None => self.nodes.acked(&self.node, type_url, generation),
            Some(reason) => self.nodes.nacked(&self.node, type_url, generation, reason),
        }
    }

    fn new_snapshot(&mut self) {
        self.snapshot = Arc::clone(&self.snapshots.borrow_and_update());
        self.dirty.extend(self.subs.keys().cloned());
    }

    /// The next type to push, if any: strictly in push order, each waiting until the types
    /// before it are acknowledged, so an address never reaches a node before the cluster and
    /// endpoints it points at (make-before-break).
    fn ready_types(&self) -> Vec<&'static str> {
        for t in PUSH_ORDER {
            if self.pending.contains_key(t) {
                return Vec::new();
            }
            if self.dirty.contains(t) && self.subs.contains_key(t) {
                return vec![t];
            }
        }
        Vec::new()
    }

    fn closed(&self) {
        tracing::info!(node = self.node, "node disconnected");
        self.nodes.disconnected(&self.node);
    }
}

fn rpc_error(detail: Option<&envoy_types::pb::google::rpc::Status>) -> Option<String> {
    detail.map(|s| if s.message.is_empty() { format!("code {}", s.code) } else { s.message.clone() })
}

struct DeltaStream {
    c: Common,
    /// What the node holds: type → name → version.
    sent: HashMap<String, BTreeMap<String, String>>,
    /// Explicitly subscribed names already answered "does not exist".
    told_absent: HashMap<String, BTreeSet<String>>,
}

impl DeltaStream {
    fn new(node: String, snapshots: watch::Receiver<Arc<Snapshot>>, nodes: Arc<Nodes>) -> DeltaStream {
        DeltaStream {
            c: Common::new(node, snapshots, nodes, "delta"),
            sent: HashMap::new(),
            told_absent: HashMap::new(),
        }
    }

    async fn run(
        mut self,
        first: DeltaDiscoveryRequest,
        mut inbound: Streaming<DeltaDiscoveryRequest>,
        tx: mpsc::Sender<Result<DeltaDiscoveryResponse, Status>>,
    ) {
        self.on_request(first);
        loop {
            if self.flush(&tx).await.is_err() {
                break;
            }
            tokio::select! {
                msg = inbound.message() => match msg {
                    Ok(Some(req)) => self.on_request(req),
                    Ok(None) => break,
                    Err(e) => {
                        tracing::debug!(node = self.c.node, "stream error: {e}");
                        break;
                    }
                },
                changed = self.c.snapshots.changed() => {
                    if changed.is_err() { break; }
                    self.c.new_snapshot();
                }
            }
        }
        self.c.closed();
    }

    fn on_request(&mut self, req: DeltaDiscoveryRequest) {
        let t = req.type_url.clone();
        self.c.answer(&t, &req.response_nonce, rpc_error(req.error_detail.as_ref()).as_deref());
        let first_for_type = !self.c.subs.contains_key(&t);
        let sub = self.c.subs.entry(t.clone()).or_default();
        let before = sub.clone();
        if first_for_type && req.resource_names_subscribe.is_empty() {
            sub.wildcard = true;
        }
        for name in &req.resource_names_subscribe {
            if name == "*" {
                sub.wildcard = true;
            } else {
                sub.names.insert(name.clone());
            }
        }
        for name in &req.resource_names_unsubscribe {
            if name == "*" {
                sub.wildcard = false;
            } else {
                sub.names.remove(name);
                self.told_absent.entry(t.clone()).or_default().remove(name);
            }
        }
        if first_for_type {
            // Resync after a reconnect: the node says what it holds; only differences are sent.
            self.sent.insert(t.clone(), req.initial_resource_versions.into_iter().collect());
        }
        if first_for_type || *sub != before {
            if t == proto::ADDRESS_TYPE {
                // Addresses decide which clusters and endpoints the node gets.
                self.c.dirty.extend([proto::CLUSTER_TYPE.to_string(), proto::ENDPOINT_TYPE.to_string()]);
            }
            self.c.dirty.insert(t);
        }
    }

    /// Pushes until every change is sent or waits on an ACK.
    async fn flush(&mut self, tx: &mpsc::Sender<Result<DeltaDiscoveryResponse, Status>>) -> Result<(), ()> {
        while !self.c.ready_types().is_empty() {
            self.flush_once(tx).await?;
        }
        Ok(())
    }

    async fn flush_once(
        &mut self,
        tx: &mpsc::Sender<Result<DeltaDiscoveryResponse, Status>>,
    ) -> Result<(), ()> {
        let ready = self.c.ready_types();
        if ready.is_empty() {
            return Ok(());
        }
        let view = self.c.snapshot.view(&self.c.node, &self.c.subs);
        let generation = self.c.snapshot.generation;
        for t in ready {
            self.c.dirty.remove(t);
            let want = view.get(t).cloned().unwrap_or_default();
            let sent = self.sent.entry(t.to_string()).or_default();
            let resources: Vec<&Resource> =
                want.values().filter(|r| sent.get(&r.name) != Some(&r.version)).collect();
            let mut removed: Vec<String> = sent.keys().filter(|n| !want.contains_key(*n)).cloned().collect();
            let told = self.told_absent.entry(t.to_string()).or_default();
            let sub = self.c.subs.get(t).cloned().unwrap_or_default();
            for name in &sub.names {
                if !want.contains_key(name) && !sent.contains_key(name) && told.insert(name.clone()) {
                    removed.push(name.clone());
                }
            }
            if resources.is_empty() && removed.is_empty() {
                self.c.nodes.acked(&self.c.node, t, generation);
                continue;
            }
            for r in &resources {
                sent.insert(r.name.clone(), r.version.clone());
                told.remove(&r.name);
            }
            for name in &removed {
                sent.remove(name);
            }
            let nonce = self.c.nonce();
            let response = DeltaDiscoveryResponse {
                system_version_info: generation.to_string(),
                type_url: t.to_string(),
                resources: resources
                    .iter()
                    .map(|r| discovery::Resource {
                        name: r.name.clone(),
                        version: r.version.clone(),
                        resource: Some(r.any.clone()),
                        ..Default::default()
                    })
                    .collect(),
                removed_resources: removed,
                nonce: nonce.clone(),
                ..Default::default()
            };
            tracing::debug!(
                node = self.c.node,
                type_url = t,
                generation,
                updated = response.resources.len(),
                removed = response.removed_resources.len(),
                "push"
            );
            self.c.pending.insert(t.to_string(), (nonce, generation));
            tx.send(Ok(response)).await.map_err(|_| ())?;
        }
        Ok(())
    }
}

struct SotwStream {
    c: Common,
    /// type → hash of the last full set sent.
    sent: HashMap<String, String>,
}

impl SotwStream {
    fn new(node: String, snapshots: watch::Receiver<Arc<Snapshot>>, nodes: Arc<Nodes>) -> SotwStream {
        SotwStream { c: Common::new(node, snapshots, nodes, "sotw"), sent: HashMap::new() }
    }

    async fn run(
        mut self,
        first: DiscoveryRequest,
        mut inbound: Streaming<DiscoveryRequest>,
        tx: mpsc::Sender<Result<DiscoveryResponse, Status>>,
    ) {
        self.on_request(first);
        loop {
            if self.flush(&tx).await.is_err() {
                break;
            }
            tokio::select! {
                msg = inbound.message() => match msg {
                    Ok(Some(req)) => self.on_request(req),
                    Ok(None) => break,
                    Err(e) => {
                        tracing::debug!(node = self.c.node, "stream error: {e}");
                        break;
                    }
                },
                changed = self.c.snapshots.changed() => {
                    if changed.is_err() { break; }
                    self.c.new_snapshot();
                }
            }
        }
        self.c.closed();
    }

    fn on_request(&mut self, req: DiscoveryRequest) {
        let t = req.type_url.clone();
        self.c.answer(&t, &req.response_nonce, rpc_error(req.error_detail.as_ref()).as_deref());
        let sub = Subscription {
            wildcard: req.resource_names.is_empty() || req.resource_names.iter().any(|n| n == "*"),
            names: req.resource_names.into_iter().filter(|n| n != "*").collect(),
        };
        if self.c.subs.get(&t) != Some(&sub) {
            self.c.subs.insert(t.clone(), sub);
            if t == proto::ADDRESS_TYPE {
                self.c.dirty.extend([proto::CLUSTER_TYPE.to_string(), proto::ENDPOINT_TYPE.to_string()]);
            }
            // A changed name list is answered even if the set happens to be equal.
            self.sent.remove(&t);
            self.c.dirty.insert(t);
        } else if req.response_nonce.is_empty() {
            // A fresh request for the same names (client restart of this type): answer it.
            self.sent.remove(&t);
            self.c.dirty.insert(t);
        }
    }

    /// Pushes until every change is sent or waits on an ACK.
    async fn flush(&mut self, tx: &mpsc::Sender<Result<DiscoveryResponse, Status>>) -> Result<(), ()> {
        while !self.c.ready_types().is_empty() {
            self.flush_once(tx).await?;
        }
        Ok(())
    }

    async fn flush_once(&mut self, tx: &mpsc::Sender<Result<DiscoveryResponse, Status>>) -> Result<(), ()> {
        let ready = self.c.ready_types();
        if ready.is_empty() {
            return Ok(());
        }
        let view = self.c.snapshot.view(&self.c.node, &self.c.subs);
        let generation = self.c.snapshot.generation;
        for t in ready {
            self.c.dirty.remove(t);
            let want = view.get(t).cloned().unwrap_or_default();
            let digest: Vec<u8> = want
                .values()
                .flat_map(|r| [r.name.as_bytes(), r.version.as_bytes(), b";"].concat())
                .collect();
            let version = content_version(&digest);
            if self.sent.get(t) == Some(&version) {
                self.c.nodes.acked(&self.c.node, t, generation);
                continue;
            }
            self.sent.insert(t.to_string(), version.clone());
            let nonce = self.c.nonce();
            let response = DiscoveryResponse {
                version_info: version,
                type_url: t.to_string(),
                resources: want.values().map(|r| r.any.clone()).collect(),
                nonce: nonce.clone(),
                ..Default::default()
            };
            self.c.pending.insert(t.to_string(), (nonce, generation));
            tx.send(Ok(response)).await.map_err(|_| ())?;
        }
        Ok(())
    }
}
