//! The node's xDS client: one delta ADS stream to mesh-control, plus workload reports.
//!
//! - Every response is applied whole or NACKed with the reason (the previous config serves on).
//! - While the control plane is unreachable the cache keeps serving; reconnects back off
//!   exponentially (100 ms → 5 s) with jitter so a restarted control plane is not stampeded.
//! - On reconnect the node resends its subscriptions and the versions it holds, so a restarted
//!   control plane sends only what changed (resync).
//! - Addresses are subscribed on demand: the first connect to an IP asks for it.

use std::{
    collections::BTreeSet,
    net::IpAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use anyhow::Context;
use envoy_types::pb::{
    envoy::{
        config::core::v3::Node,
        service::discovery::v3::{
            DeltaDiscoveryRequest, DeltaDiscoveryResponse,
            aggregated_discovery_service_client::AggregatedDiscoveryServiceClient,
        },
    },
    google::{protobuf as pbuf, rpc::Status as RpcStatus},
};
use nodemesh_api::{
    proto::{self, mesh},
    workload::WorkloadSpec,
};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;

use super::{
    cache::Cache,
    resources::{AddressInfo, Incoming},
};
use crate::control_plane::{ControlPlane, NodeToken};

/// Hands on-demand address subscriptions to the stream and waits for their answers.
pub struct OnDemand {
    cache: Arc<Cache>,
    /// Every address ever asked for (re-subscribed after a reconnect).
    subscribed: Mutex<BTreeSet<String>>,
    requests: mpsc::UnboundedSender<String>,
    stream: Arc<StreamState>,
}

/// Whether the stream is up, and whether it ever was in this process.
#[derive(Default)]
struct StreamState {
    up: watch::Sender<bool>,
    ever_up: AtomicBool,
}

impl StreamState {
    fn set(&self, up: bool) {
        if up {
            self.ever_up.store(true, Ordering::Release);
        }
        self.up.send_replace(up);
    }

    fn is_up(&self) -> bool {
        *self.up.borrow()
    }

    /// Waits until the stream is up (or `deadline`); whether it is.
    async fn wait_up(&self, deadline: tokio::time::Instant) -> bool {
        let mut up = self.up.subscribe();
        tokio::time::timeout_at(deadline, up.wait_for(|u| *u)).await.is_ok()
    }
}

impl OnDemand {
    /// What `ip` is: from the cache, else asked of the control plane (waiting up to `timeout`).
    /// `None`: no answer (control plane unreachable or slow).
    pub async fn resolve(&self, ip: IpAddr, timeout: Duration) -> Option<AddressInfo> {
        if let Some(info) = self.cache.address(ip) {
            return Some(info);
        }
        let name = ip.to_string();
        let notified = self.cache.address_changed.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if self.subscribed.lock().expect("subscribed lock").insert(name.clone()) {
            let _ = self.requests.send(name);
        }
        let deadline = tokio::time::Instant::now() + timeout;
        if !self.stream.is_up() {
            // Don't make every connection wait out the timeout while we know nobody will answer.
            // But a process that just started (say, one that took over from a running
            // mesh-node) is still opening its stream: waiting for it beats passing the
            // connection through unresolved.
            if self.stream.ever_up.load(Ordering::Acquire) || !self.stream.wait_up(deadline).await {
                return self.cache.address(ip);
            }
        }
        loop {
            if tokio::time::timeout_at(deadline, notified.as_mut()).await.is_err() {
                return self.cache.address(ip);
            }
            if let Some(info) = self.cache.address(ip) {
                return Some(info);
            }
            notified.set(self.cache.address_changed.notified());
            notified.as_mut().enable();
        }
    }
}

pub struct Client {
    pub control_plane: ControlPlane,
    pub node: String,
    pub cache: Arc<Cache>,
    requests: Mutex<Option<mpsc::UnboundedReceiver<String>>>,
    on_demand: Arc<OnDemand>,
    stream: Arc<StreamState>,
    /// The node token, sent with workload reports and xDS streams (read anew for each).
    pub token: Option<NodeToken>,
    /// Where other nodes reach this node's tunnel, reported with the workloads.
    pub tunnel_address: Option<std::net::SocketAddr>,
    /// The port of `--metrics-addr`, announced in the node's metadata so mesh-control can
    /// scrape it for the service graph.
    pub metrics_port: Option<u16>,
}

const SUBSCRIBE_ORDER: [&str; 5] =
    [proto::CLUSTER_TYPE, proto::ENDPOINT_TYPE, proto::ROUTE_TYPE, proto::WORKLOAD_TYPE, proto::ADDRESS_TYPE];

impl Client {
    pub fn new(control_plane: ControlPlane, node: String, cache: Arc<Cache>) -> Client {
        let (tx, rx) = mpsc::unbounded_channel();
        let stream = Arc::new(StreamState::default());
        let on_demand = Arc::new(OnDemand {
            cache: Arc::clone(&cache),
            subscribed: Mutex::default(),
            requests: tx,
            stream: Arc::clone(&stream),
        });
        Client {
            control_plane,
            node,
            cache,
            requests: Mutex::new(Some(rx)),
            on_demand,
            stream,
            token: None,
            tunnel_address: None,
            metrics_port: None,
        }
    }

    pub fn on_demand(&self) -> Arc<OnDemand> {
        Arc::clone(&self.on_demand)
    }

    pub fn is_connected(&self) -> bool {
        self.stream.is_up()
    }

    /// Waits up to `timeout` for the stream to be up; whether it is.
    pub async fn wait_connected(&self, timeout: Duration) -> bool {
        self.stream.wait_up(tokio::time::Instant::now() + timeout).await
    }

    /// Runs forever: connect, stream, and on any failure back off and reconnect. `specs`:
    /// the locally registered workloads, reported to the control plane.
    pub async fn run(self: Arc<Self>, specs: watch::Receiver<Vec<WorkloadSpec>>) {
        let mut requests = self.requests.lock().expect("requests lock").take().expect("run once");
        let mut backoff = Duration::from_millis(100);
        loop {
            let started = tokio::time::Instant::now();
            match self.session(&mut requests, &specs).await {
                Ok(()) => {
                    tracing::warn!(
                        control_plane = self.control_plane.url,
                        "xDS stream closed by the control plane"
                    )
                }
                Err(e) => tracing::warn!(
                    control_plane = self.control_plane.url,
                    "xDS: {e:#}; serving the last good config and retrying"
                ),
            }
            self.stream.set(false);
            if started.elapsed() > Duration::from_secs(10) {
                backoff = Duration::from_millis(100);
            }
            let jitter = Duration::from_millis(fastrand::u64(0..=backoff.as_millis() as u64 / 2));
            tokio::time::sleep(backoff + jitter).await;
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }

    async fn session(
        &self,
        requests: &mut mpsc::UnboundedReceiver<String>,
        specs: &watch::Receiver<Vec<WorkloadSpec>>,
    ) -> anyhow::Result<()> {
        let channel = self
            .control_plane
            .endpoint()?
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(10))
            .connect()
            .await
            .context("cannot connect")?;
        // Workloads first, so the control plane can answer for them right away.
        let reporter = tokio::spawn(report_workloads(
            channel.clone(),
            Reporter {
                node: self.node.clone(),
                token: self.token.clone(),
                tunnel_address: self.tunnel_address,
            },
            specs.clone(),
        ));
        let _reporter = AbortOnDrop(reporter);

        let (tx, rx) = mpsc::channel::<DeltaDiscoveryRequest>(64);
        let node = Some(Node {
            id: self.node.clone(),
            cluster: "nodemesh".into(),
            // Our clusters and endpoints follow from our addresses: the control plane waits for
            // the Address subscription below before computing them.
            client_features: vec![proto::ADDRESS_SCOPED.into()],
            metadata: self.metrics_port.map(node_metadata),
            ..Default::default()
        });
        for (i, type_url) in SUBSCRIBE_ORDER.iter().enumerate() {
            let mut names = vec!["*".to_string()];
            if *type_url == proto::ADDRESS_TYPE {
                names.extend(self.on_demand.subscribed.lock().expect("subscribed lock").iter().cloned());
            }
            tx.send(DeltaDiscoveryRequest {
                node: if i == 0 { node.clone() } else { None },
                type_url: type_url.to_string(),
                resource_names_subscribe: names,
                initial_resource_versions: self.cache.held_versions(type_url),
                ..Default::default()
            })
            .await?;
        }
        let mut client = AggregatedDiscoveryServiceClient::new(channel).max_decoding_message_size(64 << 20);
        let mut stream = tonic::Request::new(ReceiverStream::new(rx));
        if let Some(bearer) = self.token.as_ref().and_then(NodeToken::bearer) {
            // A node that has proved itself with its token must show it on every stream.
            stream.metadata_mut().insert("authorization", bearer);
        }
        let mut inbound = client.delta_aggregated_resources(stream).await?.into_inner();
        self.stream.set(true);
        tracing::info!(control_plane = self.control_plane.url, "xDS stream open");
        loop {
            tokio::select! {
                msg = inbound.message() => {
                    let Some(response) = msg? else { return Ok(()) };
                    let answer = self.apply(response);
                    tx.send(answer).await?;
                }
                Some(name) = requests.recv() => {
                    tx.send(DeltaDiscoveryRequest {
                        type_url: proto::ADDRESS_TYPE.into(),
                        resource_names_subscribe: vec![name],
                        ..Default::default()
                    }).await?;
                }
            }
        }
    }

    /// Applies one response and returns the ACK or NACK for it.
    fn apply(&self, r: DeltaDiscoveryResponse) -> DeltaDiscoveryRequest {
        let generation = r.system_version_info.parse().unwrap_or(0);
        let updated = r
            .resources
            .into_iter()
            .map(|res| Incoming {
                name: res.name,
                version: res.version,
                value: res.resource.map(|a| a.value).unwrap_or_default(),
            })
            .collect::<Vec<_>>();
        let count = updated.len();
        let result = self.cache.apply(&r.type_url, generation, updated, &r.removed_resources);
        let error_detail = match result {
            Ok(()) => {
                tracing::debug!(
                    type_url = r.type_url,
                    generation,
                    updated = count,
                    removed = r.removed_resources.len(),
                    "config applied"
                );
                None
            }
            Err(reason) => {
                tracing::warn!(type_url = r.type_url, generation, "config rejected (NACK): {reason}");
                Some(RpcStatus {
                    code: tonic::Code::InvalidArgument as i32,
                    message: reason,
                    details: Vec::new(),
                })
            }
        };
        DeltaDiscoveryRequest {
            type_url: r.type_url,
            response_nonce: r.nonce,
            error_detail,
            ..Default::default()
        }
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Who reports: the node, its token, its tunnel.
struct Reporter {
    node: String,
    token: Option<NodeToken>,
    tunnel_address: Option<std::net::SocketAddr>,
}

/// First wait before a refused workload report is sent again; doubles up to the max.
const REPORT_RETRY_FIRST: Duration = Duration::from_secs(1);
const REPORT_RETRY_MAX: Duration = Duration::from_secs(30);

/// Reports the registered workloads now and after every change, for as long as the session,
/// with the node token if there is one.
/// The node's xDS metadata: the port mesh-control scrapes for the service graph.
fn node_metadata(metrics_port: u16) -> pbuf::Struct {
    let port = pbuf::Value { kind: Some(pbuf::value::Kind::NumberValue(f64::from(metrics_port))) };
    pbuf::Struct { fields: [(proto::NODE_METRICS_PORT.to_string(), port)].into() }
}

async fn report_workloads(
    channel: tonic::transport::Channel,
    Reporter { node, token, tunnel_address }: Reporter,
    mut specs: watch::Receiver<Vec<WorkloadSpec>>,
) {
    let tunnel_address = tunnel_address.map(|a| a.to_string()).unwrap_or_default();
    let mut client = mesh::node_registration_client::NodeRegistrationClient::new(channel);
    let mut retry = REPORT_RETRY_FIRST;
    loop {
        let workloads = specs
            .borrow_and_update()
            .iter()
            .map(|s| mesh::ReportedWorkload {
                name: s.name.clone(),
                namespace: s.namespace.clone(),
                service_account: s.service_account.clone(),
                addresses: s.ips.iter().map(ToString::to_string).collect(),
                labels: s.labels.clone().into_iter().collect(),
                namespace_labels: s.namespace_labels.clone().into_iter().collect(),
            })
            .collect();
        let mut request = tonic::Request::new(mesh::WorkloadReport {
            node: node.clone(),
            workloads,
            tunnel_address: tunnel_address.clone(),
        });
        if let Some(b) = token.as_ref().and_then(NodeToken::bearer) {
            request.metadata_mut().insert("authorization", b);
        }
        match client.report_workloads(request).await {
            Ok(reply) => {
                tracing::debug!(generation = reply.get_ref().generation, "workloads reported");
                retry = REPORT_RETRY_FIRST;
                if specs.changed().await.is_err() {
                    return;
                }
            }
            Err(e) => {
                // Refused (a token being replaced, a bad entry) or lost: sent again after a
                // while with the token as it is then, or at once when the workloads change.
                tracing::warn!("workload report refused: {}; again in {retry:?}", e.message());
                tokio::select! {
                    changed = specs.changed() => if changed.is_err() { return },
                    () = tokio::time::sleep(retry) => {}
                }
                retry = (retry * 2).min(REPORT_RETRY_MAX);
            }
        }
    }
}
