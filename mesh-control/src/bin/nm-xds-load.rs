//! `nm-xds-load`: many in-process xDS clients against one mesh-control, for `cargo xtask bench`.
//!
//! Each simulated node opens a delta ADS stream the way mesh-node does (address-scoped, ACKing
//! every response) and subscribes on demand to `--per-node` Service VIPs. Prints JSON lines:
//! `{"event":"synced","ms":..}` once every node holds the endpoints of every VIP it subscribed
//! to, then `{"event":"endpoints","node":i,"count":n,"at_us":t}` whenever the endpoint count of
//! `--watch-cluster` changes on a node (t: microseconds since the Unix epoch).
//!
//! With `--metrics-page FILE`, every simulated node announces a metrics port
//! (`nodemesh.io/metrics-port`) where this process serves FILE as its metrics and, as mesh-node
//! does, the edges it folds to at `/graph/edges`: mesh-control's service graph scrapes one
//! report per simulated node.

use std::{
    collections::{BTreeSet, HashMap},
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use clap::Parser;
use envoy_types::pb::{
    envoy::{
        config::{core::v3::Node, endpoint::v3::ClusterLoadAssignment},
        service::discovery::v3::{
            DeltaDiscoveryRequest, aggregated_discovery_service_client::AggregatedDiscoveryServiceClient,
        },
    },
    google::protobuf as pbuf,
};
use mesh_control::proto::{self, mesh};
use prost::Message;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

#[derive(Parser, Debug)]
struct Args {
    /// mesh-control's xDS address, e.g. http://127.0.0.1:15010.
    #[arg(long)]
    xds: String,
    #[arg(long, default_value_t = 50)]
    nodes: usize,
    /// How many Services exist; service i has VIP 10.96.<i / 250>.<i % 250 + 1>.
    #[arg(long, default_value_t = 1000)]
    services: usize,
    /// How many VIPs each node subscribes to (node i: services i*k .. i*k+k, wrapping; every
    /// node also subscribes to service 0, the one the bench changes).
    #[arg(long, default_value_t = 100)]
    per_node: usize,
    /// Cluster whose endpoint count is reported after sync.
    #[arg(long)]
    watch_cluster: String,
    /// A metrics page (OpenMetrics text) every node serves, announced in its xDS metadata.
    #[arg(long)]
    metrics_page: Option<std::path::PathBuf>,
}

/// The VIP of service `i` (the bench writes Services the same way).
fn vip(i: usize) -> String {
    format!("10.96.{}.{}", i / 250, i % 250 + 1)
}

fn now_us() -> u128 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_micros())
}

#[derive(Default)]
struct Progress {
    synced: BTreeSet<usize>,
}

/// Serves `page` as a node's metrics on a loopback port, and the edges it folds to at
/// `/graph/edges` (folded once: the simulated nodes' counters do not move); the port.
async fn serve_page(page: std::path::PathBuf) -> anyhow::Result<u16> {
    use http_body_util::Full;
    use mesh_control::service_graph::{EDGES_PATH, EdgeReport};
    let text = std::fs::read_to_string(&page)?;
    let report =
        bytes::Bytes::from(serde_json::to_vec(&EdgeReport::of_page(&text).map_err(anyhow::Error::msg)?)?);
    let page = bytes::Bytes::from(text);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    let handler = Arc::new(move |req: hyper::Request<hyper::body::Incoming>| {
        let (body, content_type) = match req.uri().path() {
            EDGES_PATH => (report.clone(), "application/json"),
            _ => (page.clone(), "application/openmetrics-text; version=1.0.0"),
        };
        async move {
            let mut response = hyper::Response::new(Full::new(body));
            response
                .headers_mut()
                .insert(hyper::header::CONTENT_TYPE, hyper::header::HeaderValue::from_static(content_type));
            response
        }
    });
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            mesh_control::http::spawn_connection(stream, Arc::clone(&handler));
        }
    });
    Ok(port)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Arc::new(Args::parse());
    let metrics_port = match &args.metrics_page {
        Some(page) => Some(serve_page(page.clone()).await?),
        None => None,
    };
    let progress = Arc::new(Mutex::new(Progress::default()));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for node in 0..args.nodes {
        let (args, progress) = (Arc::clone(&args), Arc::clone(&progress));
        tasks.push(tokio::spawn(async move {
            if let Err(e) = run_node(node, &args, metrics_port, &progress).await {
                eprintln!("nm-xds-load: node {node}: {e:#}");
                std::process::exit(1);
            }
        }));
    }
    loop {
        if progress.lock().expect("progress").synced.len() == args.nodes {
            println!("{{\"event\":\"synced\",\"ms\":{}}}", started.elapsed().as_millis());
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    for t in tasks {
        t.await?;
    }
    Ok(())
}

async fn run_node(
    node: usize,
    args: &Args,
    metrics_port: Option<u16>,
    progress: &Mutex<Progress>,
) -> anyhow::Result<()> {
    let mut wanted: BTreeSet<usize> =
        (0..args.per_node).map(|k| (node * args.per_node + k) % args.services).collect();
    wanted.insert(0);
    let vips: Vec<String> = wanted.iter().map(|i| vip(*i)).collect();
    let channel = tonic::transport::Endpoint::from_shared(args.xds.clone())?.connect().await?;
    let mut client = AggregatedDiscoveryServiceClient::new(channel).max_decoding_message_size(64 << 20);
    let (tx, rx) = mpsc::channel(64);
    let order = [proto::CLUSTER_TYPE, proto::ENDPOINT_TYPE, proto::WORKLOAD_TYPE, proto::ADDRESS_TYPE];
    for (i, type_url) in order.iter().enumerate() {
        let mut names = vec!["*".to_string()];
        if *type_url == proto::ADDRESS_TYPE {
            names.extend(vips.iter().cloned());
        }
        tx.send(DeltaDiscoveryRequest {
            node: (i == 0).then(|| Node {
                id: format!("load-node-{node}"),
                client_features: vec![proto::ADDRESS_SCOPED.into()],
                metadata: metrics_port.map(|port| pbuf::Struct {
                    fields: [(
                        proto::NODE_METRICS_PORT.to_string(),
                        pbuf::Value { kind: Some(pbuf::value::Kind::NumberValue(f64::from(port))) },
                    )]
                    .into(),
                }),
                ..Default::default()
            }),
            type_url: type_url.to_string(),
            resource_names_subscribe: names,
            ..Default::default()
        })
        .await?;
    }
    let mut inbound = client.delta_aggregated_resources(ReceiverStream::new(rx)).await?.into_inner();
    // Clusters the subscribed addresses use, and the endpoint count per cluster received.
    let mut needed: BTreeSet<String> = BTreeSet::new();
    let mut addresses = 0usize;
    let mut endpoints: HashMap<String, usize> = HashMap::new();
    let mut synced = false;
    let mut watched: Option<usize> = None;
    while let Some(r) = inbound.message().await? {
        for res in &r.resources {
            let value = res.resource.as_ref().map(|a| a.value.as_slice()).unwrap_or_default();
            match r.type_url.as_str() {
                proto::ADDRESS_TYPE => {
                    if let Some(mesh::address::Kind::Service(s)) = mesh::Address::decode(value)?.kind {
                        addresses += 1;
                        needed.extend(s.ports.into_iter().map(|p| p.cluster));
                    }
                }
                proto::ENDPOINT_TYPE => {
                    let cla = ClusterLoadAssignment::decode(value)?;
                    let count = cla.endpoints.iter().map(|l| l.lb_endpoints.len()).sum();
                    endpoints.insert(cla.cluster_name, count);
                }
                _ => {}
            }
        }
        tx.send(DeltaDiscoveryRequest {
            type_url: r.type_url.clone(),
            response_nonce: r.nonce.clone(),
            ..Default::default()
        })
        .await?;
        if !synced
            && addresses >= vips.len()
            && needed.iter().all(|c| endpoints.get(c).is_some_and(|n| *n > 0))
        {
            synced = true;
            progress.lock().expect("progress").synced.insert(node);
        }
        if synced {
            let count = endpoints.get(&args.watch_cluster).copied();
            if count != watched {
                watched = count;
                println!(
                    "{{\"event\":\"endpoints\",\"node\":{node},\"count\":{},\"at_us\":{}}}",
                    count.unwrap_or(0),
                    now_us()
                );
            }
        }
    }
    Ok(())
}
