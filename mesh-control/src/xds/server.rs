//! Envoy v3 aggregated discovery (ADS) over tonic: incremental ("delta", what mesh-node uses)
//! and state-of-the-world (what Envoy and gRPC's proxyless client default to).
//!
//! Per stream and per type at most one response is in flight: the next waits for the node's
//! ACK or NACK (flow control), and changes that arrive meanwhile are coalesced into it. Pushes
//! go in [`PUSH_ORDER`] so references resolve before they are used.
//!
//! Two holds keep a node from ever being handed less than it should have:
//! - A client that declares [`proto::ADDRESS_SCOPED`] gets no clusters or endpoints before its
//!   Address subscription arrived: its scope is what its addresses use, and pushing earlier
//!   would remove what it holds.
//! - A client reconnecting with config (it names resources it holds) is not resynced during the
//!   resync grace after a control-plane start ([`Snapshot::warm`]); it keeps its last good config.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    pin::Pin,
    sync::Arc,
};

use envoy_types::pb::envoy::{
    config::core::v3::Node,
    service::discovery::v3::{
        self as discovery, DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest,
        DiscoveryResponse, aggregated_discovery_service_server::AggregatedDiscoveryService,
    },
};
use futures::Stream;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::{
    super::proto,
    encode::content_version,
    nodes::Nodes,
    snapshot::{PUSH_ORDER, Resource, Snapshot, Subscription},
};
use crate::ca::node_tokens::NodeCredentials;

pub struct AdsServer {
    pub snapshots: watch::Receiver<Arc<Snapshot>>,
    pub nodes: Arc<Nodes>,
    /// A stream for a node that has proved itself with its token needs the token again.
    pub credentials: Arc<NodeCredentials>,
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
        self.open(request, |c| Delta { c, sent: HashMap::new(), told_absent: HashMap::new() }).await
    }

    async fn stream_aggregated_resources(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamAggregatedResourcesStream>, Status> {
        self.open(request, |c| Sotw { c, sent: HashMap::new() }).await
    }
}

impl AdsServer {
    /// Answers the call at once (a client may wait for the response headers before it sends
    /// anything), then reads the first request, which names the node, and serves the stream
    /// on its own task.
    async fn open<P: Protocol>(
        &self,
        request: Request<Streaming<P::Req>>,
        make: impl FnOnce(Common) -> P + Send + 'static,
    ) -> Result<Response<BoxStream<P::Resp>>, Status> {
        let metadata = request.metadata().clone();
        let peer = request.remote_addr();
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(16);
        let (snapshots, nodes) = (self.snapshots.clone(), Arc::clone(&self.nodes));
        let credentials = Arc::clone(&self.credentials);
        tokio::spawn(async move {
            let first = match inbound.message().await {
                Ok(Some(first)) => first,
                Ok(None) => return,
                Err(e) => {
                    tracing::debug!("stream error before the first request: {e}");
                    return;
                }
            };
            let Some(node) = P::node(&first).filter(|n| !n.id.is_empty()) else {
                let refusal =
                    Status::invalid_argument("the first request must carry node.id (the node's name)");
                let _ = tx.send(Err(refusal)).await;
                return;
            };
            if let Err(refused) = credentials.admit(&node.id, &metadata).await {
                tracing::warn!(node = node.id, "xDS stream refused: {}", refused.message());
                let _ = tx.send(Err(refused)).await;
                return;
            }
            let mut common = Common::new(node.id.clone(), snapshots, Arc::clone(&nodes), P::NAME);
            nodes.metrics_endpoint(
                &node.id,
                peer.zip(metrics_port(node)).map(|(p, port)| (p.ip(), port).into()),
            );
            common.address_scoped = node.client_features.iter().any(|f| f == proto::ADDRESS_SCOPED);
            serve(make(common), first, inbound, tx).await;
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// The port the node announced for its metrics (`nodemesh.io/metrics-port`), if any.
fn metrics_port(node: &Node) -> Option<u16> {
    use envoy_types::pb::google::protobuf::value::Kind;
    let field = node.metadata.as_ref()?.fields.get(proto::NODE_METRICS_PORT)?;
    match field.kind {
        Some(Kind::NumberValue(n)) if n.fract() == 0.0 && (1.0..=65535.0).contains(&n) => Some(n as u16),
        _ => {
            tracing::warn!(
                node = node.id,
                "node metadata {}: not a port: {field:?}",
                proto::NODE_METRICS_PORT
            );
            None
        }
    }
}

/// What differs between delta and state-of-the-world: how requests change subscriptions and
/// how a type's resources become a response.
trait Protocol: Send + 'static {
    type Req: Send + 'static;
    type Resp: Send + 'static;
    const NAME: &'static str;
    fn common(&mut self) -> &mut Common;
    fn node(req: &Self::Req) -> Option<&Node>;
    fn on_request(&mut self, req: Self::Req);
    /// The response bringing the node to `want` for `type_url`; `None` if it has it already.
    /// Without `removals`, what the node holds beyond `want` stays (make-before-break) and the
    /// protocol reports that some removal is still owed through [`Common::deferred`].
    fn response(
        &mut self,
        type_url: &'static str,
        want: BTreeMap<String, Resource>,
        generation: u64,
        nonce: &str,
        removals: bool,
    ) -> Option<Self::Resp>;
}

/// Types whose removals are deferred until everything else is pushed: what routes and
/// addresses point at.
const REMOVED_LAST: [&str; 2] = [proto::CLUSTER_TYPE, proto::ENDPOINT_TYPE];

/// One stream: push what is ready, then wait for a request or a new snapshot.
async fn serve<P: Protocol>(
    mut p: P,
    first: P::Req,
    mut inbound: Streaming<P::Req>,
    tx: mpsc::Sender<Result<P::Resp, Status>>,
) {
    p.on_request(first);
    'stream: loop {
        while let Some(response) = next_response(&mut p) {
            if tx.send(Ok(response)).await.is_err() {
                break 'stream;
            }
        }
        let c = p.common();
        tokio::select! {
            msg = inbound.message() => match msg {
                Ok(Some(req)) => p.on_request(req),
                Ok(None) => break,
                Err(e) => {
                    tracing::debug!(node = c.node, "stream error: {e}");
                    break;
                }
            },
            changed = c.snapshots.changed() => {
                if changed.is_err() { break; }
                c.new_snapshot();
            }
        }
    }
    p.common().closed();
}

/// The next response to send, if a type is ready and the node lacks something of it. A type
/// with nothing new counts as acknowledged at the current generation.
fn next_response<P: Protocol>(p: &mut P) -> Option<P::Resp> {
    loop {
        let c = p.common();
        let (type_url, removals) = c.next_type()?;
        c.dirty.remove(type_url);
        c.deferred.remove(type_url);
        let want = c.snapshot.resources_for(&c.node, &c.subs, type_url);
        let generation = c.snapshot.generation;
        let nonce = c.nonce();
        match p.response(type_url, want, generation, &nonce, removals) {
            Some(response) => {
                tracing::debug!(node = p.common().node, type_url, generation, "push");
                // From the snapshot's making, or from the stream's start for a node that
                // connected after it: the wait this node had for it.
                let c = p.common();
                let waited = c.snapshot.built.map(|built| built.max(c.started).elapsed());
                c.nodes.metrics.pushed(type_url, waited);
                p.common().pending.insert(type_url.to_string(), (nonce, generation));
                return Some(response);
            }
            None => {
                let c = p.common();
                c.nodes.acked(&c.node, type_url, generation);
            }
        }
    }
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
    /// Types whose removals wait until every type that could still reference them has been
    /// pushed and acknowledged (make-before-break).
    deferred: HashSet<&'static str>,
    next_nonce: u64,
    /// The client declared [`proto::ADDRESS_SCOPED`].
    address_scoped: bool,
    /// The client came back holding config (a reconnect).
    resyncing: bool,
    /// When the stream opened.
    started: std::time::Instant,
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
            deferred: HashSet::new(),
            next_nonce: 0,
            address_scoped: false,
            resyncing: false,
            started: std::time::Instant::now(),
        }
    }

    fn nonce(&mut self) -> String {
        self.next_nonce += 1;
        self.next_nonce.to_string()
    }

    /// ACK or NACK of an earlier response; stale nonces are ignored.
    fn answer(&mut self, type_url: &str, nonce: &str, error: Option<&envoy_types::pb::google::rpc::Status>) {
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
            Some(s) => {
                let reason =
                    if s.message.is_empty() { format!("code {}", s.code) } else { s.message.clone() };
                self.nodes.nacked(&self.node, type_url, generation, &reason);
            }
        }
    }

    /// Marks `type_url` for a push; addresses (and, for clients that name their routes, routes)
    /// also decide which clusters and endpoints the node gets, so those are re-derived with them.
    fn changed(&mut self, type_url: String) {
        if type_url == proto::ADDRESS_TYPE {
            self.dirty
                .extend([proto::CLUSTER_TYPE, proto::ENDPOINT_TYPE, proto::ROUTE_TYPE].map(String::from));
        }
        if type_url == proto::ROUTE_TYPE {
            self.dirty.extend([proto::CLUSTER_TYPE, proto::ENDPOINT_TYPE].map(String::from));
        }
        self.dirty.insert(type_url);
    }

    fn new_snapshot(&mut self) {
        self.snapshot = Arc::clone(&self.snapshots.borrow_and_update());
        self.dirty.extend(self.subs.keys().cloned());
    }

    /// The next type to push, if any, and whether its removals may go too: strictly in push
    /// order, each waiting until the types before it are acknowledged, so an address never
    /// reaches a node before the cluster and endpoints it points at. Removals of clusters and
    /// endpoints go last, once routes and addresses no longer point at them
    /// (make-before-break): a canary moving off a subset never meets a missing cluster.
    fn next_type(&self) -> Option<(&'static str, bool)> {
        if !self.snapshot.synced || (self.resyncing && !self.snapshot.warm) {
            return None;
        }
        for t in PUSH_ORDER {
            if self.pending.contains_key(t) {
                return None;
            }
            if self.dirty.contains(t) && self.subs.contains_key(t) {
                let scoped = t == proto::CLUSTER_TYPE || t == proto::ENDPOINT_TYPE || t == proto::ROUTE_TYPE;
                if scoped && self.address_scoped && !self.subs.contains_key(proto::ADDRESS_TYPE) {
                    return None;
                }
                return Some((t, !REMOVED_LAST.contains(&t)));
            }
        }
        PUSH_ORDER.into_iter().find(|t| self.deferred.contains(t)).map(|t| (t, true))
    }

    fn closed(&self) {
        tracing::info!(node = self.node, "node disconnected");
        self.nodes.disconnected(&self.node);
    }
}

struct Delta {
    c: Common,
    /// What the node holds: type → name → version.
    sent: HashMap<String, BTreeMap<String, String>>,
    /// Explicitly subscribed names already answered "does not exist".
    told_absent: HashMap<String, BTreeSet<String>>,
}

impl Protocol for Delta {
    type Req = DeltaDiscoveryRequest;
    type Resp = DeltaDiscoveryResponse;
    const NAME: &'static str = "delta";

    fn common(&mut self) -> &mut Common {
        &mut self.c
    }

    fn node(req: &DeltaDiscoveryRequest) -> Option<&Node> {
        req.node.as_ref()
    }

    fn on_request(&mut self, req: DeltaDiscoveryRequest) {
        let t = req.type_url.clone();
        self.c.answer(&t, &req.response_nonce, req.error_detail.as_ref());
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
        let changed = *sub != before;
        if first_for_type {
            // Resync after a reconnect: the node says what it holds; only differences are sent.
            self.c.resyncing |= !req.initial_resource_versions.is_empty();
            self.sent.insert(t.clone(), req.initial_resource_versions.into_iter().collect());
        }
        if first_for_type || changed {
            self.c.changed(t);
        }
    }

    fn response(
        &mut self,
        t: &'static str,
        want: BTreeMap<String, Resource>,
        generation: u64,
        nonce: &str,
        removals: bool,
    ) -> Option<DeltaDiscoveryResponse> {
        let sent = self.sent.entry(t.to_string()).or_default();
        let told = self.told_absent.entry(t.to_string()).or_default();
        let resources: Vec<&Resource> =
            want.values().filter(|r| sent.get(&r.name) != Some(&r.version)).collect();
        let mut removed: Vec<String> = sent.keys().filter(|n| !want.contains_key(*n)).cloned().collect();
        if !removals && !removed.is_empty() {
            self.c.deferred.insert(t);
            removed.clear();
        }
        if let Some(sub) = self.c.subs.get(t) {
            for name in &sub.names {
                if !want.contains_key(name) && !sent.contains_key(name) && told.insert(name.clone()) {
                    removed.push(name.clone());
                }
            }
        }
        if resources.is_empty() && removed.is_empty() {
            return None;
        }
        for r in &resources {
            sent.insert(r.name.clone(), r.version.clone());
            told.remove(&r.name);
        }
        for name in &removed {
            sent.remove(name);
        }
        Some(DeltaDiscoveryResponse {
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
            nonce: nonce.to_string(),
            ..Default::default()
        })
    }
}

struct Sotw {
    c: Common,
    /// type → hash of the last full set sent.
    sent: HashMap<String, String>,
}

impl Protocol for Sotw {
    type Req = DiscoveryRequest;
    type Resp = DiscoveryResponse;
    const NAME: &'static str = "sotw";

    fn common(&mut self) -> &mut Common {
        &mut self.c
    }

    fn node(req: &DiscoveryRequest) -> Option<&Node> {
        req.node.as_ref()
    }

    fn on_request(&mut self, req: DiscoveryRequest) {
        let t = req.type_url.clone();
        self.c.answer(&t, &req.response_nonce, req.error_detail.as_ref());
        let sub = Subscription {
            wildcard: req.resource_names.is_empty() || req.resource_names.iter().any(|n| n == "*"),
            names: req.resource_names.into_iter().filter(|n| n != "*").collect(),
        };
        // A first request that names a version: the client holds config from before.
        self.c.resyncing |= !self.c.subs.contains_key(&t) && !req.version_info.is_empty();
        let changed = self.c.subs.get(&t) != Some(&sub);
        // A changed name list, or a fresh request for the same names (the client restarted this
        // type), is answered even if the set happens to be equal.
        if changed || req.response_nonce.is_empty() {
            self.c.subs.insert(t.clone(), sub);
            self.sent.remove(&t);
            self.c.changed(t);
        }
    }

    fn response(
        &mut self,
        t: &'static str,
        want: BTreeMap<String, Resource>,
        _generation: u64,
        nonce: &str,
        // A state-of-the-world response is the whole set: what it leaves out is removed, so
        // removals cannot be held back here (Envoy answers a missing cluster with 503 too).
        _removals: bool,
    ) -> Option<DiscoveryResponse> {
        let digest: Vec<u8> =
            want.values().flat_map(|r| [r.name.as_bytes(), r.version.as_bytes(), b";"].concat()).collect();
        let version = content_version(&digest);
        if self.sent.get(t) == Some(&version) {
            return None;
        }
        self.sent.insert(t.to_string(), version.clone());
        Some(DiscoveryResponse {
            version_info: version,
            type_url: t.to_string(),
            resources: want.into_values().map(|r| r.any).collect(),
            nonce: nonce.to_string(),
            ..Default::default()
        })
    }
}

#[cfg(test)]
mod tests {
    use envoy_types::pb::envoy::config::cluster::v3::Cluster;

    use super::*;
    use crate::proto::mesh;

    const VIP: &str = "10.96.0.10";
    const CLUSTER: &str = "outbound|80||web.shop.svc.cluster.local";

    /// One service at [`VIP`] whose port 80 uses [`CLUSTER`].
    fn snapshot(generation: u64, warm: bool) -> Arc<Snapshot> {
        let mut snap = Snapshot::new(generation);
        snap.warm = warm;
        snap.synced = true;
        let cluster = Cluster { name: CLUSTER.into(), ..Default::default() };
        snap.clusters.insert(CLUSTER.into(), Resource::new(CLUSTER, proto::CLUSTER_TYPE, &cluster));
        let service = mesh::Service {
            hostname: "web.shop.svc.cluster.local".into(),
            ports: vec![mesh::ServicePort { port: 80, cluster: CLUSTER.into(), ..Default::default() }],
            ..Default::default()
        };
        let address = mesh::Address { kind: Some(mesh::address::Kind::Service(service.clone())) };
        let mut resource = Resource::new(VIP, proto::ADDRESS_TYPE, &address);
        resource.service = Some(Arc::new(service));
        snap.addresses.insert(VIP.into(), resource);
        Arc::new(snap)
    }

    fn stream(snap: Arc<Snapshot>, address_scoped: bool) -> (Delta, watch::Sender<Arc<Snapshot>>) {
        let (tx, rx) = watch::channel(snap);
        let mut c = Common::new("n1".into(), rx, Arc::new(Nodes::default()), "delta");
        c.address_scoped = address_scoped;
        (Delta { c, sent: HashMap::new(), told_absent: HashMap::new() }, tx)
    }

    fn request(type_url: &str, subscribe: &[&str], held: &[(&str, &str)]) -> DeltaDiscoveryRequest {
        DeltaDiscoveryRequest {
            type_url: type_url.into(),
            resource_names_subscribe: subscribe.iter().map(ToString::to_string).collect(),
            initial_resource_versions: held.iter().map(|(n, v)| (n.to_string(), v.to_string())).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn an_address_scoped_node_gets_no_clusters_before_its_address_subscription() {
        let snap = snapshot(1, true);
        let version = snap.clusters[CLUSTER].version.clone();
        let (mut d, _tx) = stream(snap, true);
        // Reconnecting, holding the cluster: pushing now would remove it (no addresses known yet).
        d.on_request(request(proto::CLUSTER_TYPE, &["*"], &[(CLUSTER, &version)]));
        assert!(next_response(&mut d).is_none(), "no cluster push before the Address subscription");
        d.on_request(request(proto::ADDRESS_TYPE, &["*", VIP], &[]));
        let r = next_response(&mut d).expect("the address goes out once the clusters are settled");
        assert_eq!(r.type_url, proto::ADDRESS_TYPE, "the held cluster is current: nothing to send");
        assert!(r.removed_resources.is_empty());
    }

    #[test]
    fn a_node_reconnecting_with_config_keeps_it_until_the_resync_grace_ends() {
        let (mut d, tx) = stream(snapshot(1, false), false);
        d.on_request(request(proto::CLUSTER_TYPE, &["*"], &[(CLUSTER, "older")]));
        assert!(next_response(&mut d).is_none(), "held during the grace");
        tx.send_replace(snapshot(1, true));
        d.c.new_snapshot();
        let r = next_response(&mut d).expect("resynced after the grace");
        assert_eq!(r.type_url, proto::CLUSTER_TYPE);

        // A node with nothing to lose is served at once, grace or not.
        let (mut fresh, _tx) = stream(snapshot(1, false), false);
        fresh.on_request(request(proto::CLUSTER_TYPE, &["*", CLUSTER], &[]));
        assert!(next_response(&mut fresh).is_some());
    }

    /// Two generations of one service: its port's route sends to `subset`'s cluster.
    fn canary_snapshot(generation: u64, subset: &str) -> Arc<Snapshot> {
        let mut snap = Snapshot::new(generation);
        snap.warm = true;
        snap.synced = true;
        let subset_cluster = format!("outbound|80|{subset}|web.shop.svc.cluster.local");
        for name in [CLUSTER, subset_cluster.as_str()] {
            let cluster = Cluster { name: name.into(), ..Default::default() };
            snap.clusters.insert(name.into(), Resource::new(name, proto::CLUSTER_TYPE, &cluster));
        }
        let route = envoy_types::pb::envoy::config::route::v3::RouteConfiguration {
            name: format!("web:80 via {subset}"),
            ..Default::default()
        };
        snap.routes.insert("web:80".into(), Resource::new("web:80", proto::ROUTE_TYPE, &route));
        let service = mesh::Service {
            hostname: "web.shop.svc.cluster.local".into(),
            ports: vec![mesh::ServicePort {
                port: 80,
                cluster: CLUSTER.into(),
                route: "web:80".into(),
                route_clusters: vec![subset_cluster],
                ..Default::default()
            }],
            ..Default::default()
        };
        let address = mesh::Address { kind: Some(mesh::address::Kind::Service(service.clone())) };
        let mut resource = Resource::new(VIP, proto::ADDRESS_TYPE, &address);
        resource.service = Some(Arc::new(service));
        snap.addresses.insert(VIP.into(), resource);
        Arc::new(snap)
    }

    /// Sends `d`'s pending responses, ACKing each; returns (type, added, removed) per push.
    fn drain(d: &mut Delta) -> Vec<(String, Vec<String>, Vec<String>)> {
        let mut pushes = Vec::new();
        while let Some(r) = next_response(d) {
            let added = r.resources.iter().map(|x| x.name.clone()).collect();
            pushes.push((r.type_url.clone(), added, r.removed_resources.clone()));
            d.on_request(DeltaDiscoveryRequest {
                type_url: r.type_url,
                response_nonce: r.nonce,
                ..Default::default()
            });
        }
        pushes
    }

    #[test]
    fn a_cluster_leaves_only_after_the_route_that_used_it() {
        let (mut d, tx) = stream(canary_snapshot(1, "v1"), true);
        for t in [proto::CLUSTER_TYPE, proto::ENDPOINT_TYPE, proto::ROUTE_TYPE] {
            d.on_request(request(t, &["*"], &[]));
        }
        d.on_request(request(proto::ADDRESS_TYPE, &["*", VIP], &[]));
        drain(&mut d);

        tx.send_replace(canary_snapshot(2, "v2"));
        d.c.new_snapshot();
        let pushes = drain(&mut d);
        let v1 = "outbound|80|v1|web.shop.svc.cluster.local".to_string();
        let v2 = "outbound|80|v2|web.shop.svc.cluster.local".to_string();
        let cluster = proto::CLUSTER_TYPE.to_string();
        assert_eq!(pushes[0], (cluster.clone(), vec![v2], vec![]), "v2 arrives first, v1 stays: {pushes:?}");
        assert_eq!(pushes[1].0, proto::ROUTE_TYPE, "then the route moves to v2: {pushes:?}");
        assert_eq!(pushes.last(), Some(&(cluster, vec![], vec![v1])), "v1 leaves last: {pushes:?}");
    }
}
