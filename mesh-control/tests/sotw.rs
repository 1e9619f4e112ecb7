//! State-of-the-world ADS (what Envoy and gRPC's proxyless client speak by default) against a
//! real mesh-control on loopback, through tonic's generated client: full-state responses,
//! ACK and NACK per type reported in the node status, a config change pushed as a new full
//! state, and a reconnect answered at once. mesh-node speaks delta; this is the other protocol.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    path::PathBuf,
    time::Duration,
};

use envoy_types::pb::{
    envoy::{
        config::{cluster::v3::Cluster, core::v3::Node, endpoint::v3::ClusterLoadAssignment},
        service::discovery::v3::{
            DiscoveryRequest, DiscoveryResponse,
            aggregated_discovery_service_client::AggregatedDiscoveryServiceClient,
        },
    },
    google::rpc::Status,
};
use mesh_control::{
    proto::{CLUSTER_TYPE, ENDPOINT_TYPE},
    run::{Settings, run},
};
use prost::Message;
use serde_json::Value;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;

const CLUSTER: &str = "outbound|80||web.shop.svc.cluster.local";
const NODE: &str = "sotw-client";

fn free_port() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("a free loopback port")
}

fn workload_entry(name: &str, ip: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {{name: {name}, namespace: shop}}\n\
         spec: {{address: {ip}, labels: {{app: web}}}}\n"
    )
}

/// A config dir of its own: Service `web` (VIP 10.96.0.10, port 80 → 8080) and two entries.
fn config_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("nm-sotw-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("web.yaml"),
        "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop}\n\
         spec:\n  clusterIP: 10.96.0.10\n  selector: {app: web}\n  ports: [{name: tcp-echo, port: 80, targetPort: 8080}]\n",
    )
    .unwrap();
    std::fs::write(dir.join("a.yaml"), workload_entry("a", "192.0.2.3")).unwrap();
    std::fs::write(dir.join("b.yaml"), workload_entry("b", "192.0.2.4")).unwrap();
    dir
}

/// `GET path` on the admin endpoint, as JSON.
fn admin_json(admin: SocketAddr, path: &str) -> Value {
    let mut s = TcpStream::connect(admin).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: mesh-control\r\nConnection: close\r\n\r\n").unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or_default();
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{path}: {e}: {text}"))
}

/// This test's node in the admin's node report.
fn node_status(admin: SocketAddr) -> Value {
    let report = admin_json(admin, "/debug/nodes");
    report["nodes"].as_array().unwrap().iter().find(|n| n["node"] == NODE).cloned().unwrap_or(Value::Null)
}

/// A request for [`CLUSTER`] of `type_url`; `ack` is the response it answers (with `nack` as
/// the error, if any).
fn request(
    type_url: &str,
    version: &str,
    ack: Option<&DiscoveryResponse>,
    nack: Option<&str>,
) -> DiscoveryRequest {
    DiscoveryRequest {
        version_info: version.to_string(),
        node: Some(Node { id: NODE.into(), ..Default::default() }),
        resource_names: vec![CLUSTER.into()],
        type_url: type_url.into(),
        response_nonce: ack.map(|r| r.nonce.clone()).unwrap_or_default(),
        error_detail: nack.map(|m| Status { code: 3, message: m.into(), ..Default::default() }),
        ..Default::default()
    }
}

struct SotwStream {
    requests: mpsc::Sender<DiscoveryRequest>,
    responses: Streaming<DiscoveryResponse>,
}

impl SotwStream {
    /// Opens a stream whose first request asks for `type_url`, naming `version` as held. The
    /// call is awaited before anything is sent, as a plain tonic client would: the server
    /// must answer it without waiting for the first request.
    async fn open(xds: SocketAddr, type_url: &str, version: &str) -> SotwStream {
        let url = format!("http://{xds}");
        let mut tries = 0;
        let mut client = loop {
            match AggregatedDiscoveryServiceClient::connect(url.clone()).await {
                Ok(c) => break c,
                Err(_) if tries < 500 => {
                    tries += 1;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => panic!("mesh-control not serving xDS on {xds}: {e}"),
            }
        };
        let (requests, rx) = mpsc::channel(8);
        requests.send(request(type_url, version, None, None)).await.unwrap();
        let responses =
            client.stream_aggregated_resources(ReceiverStream::new(rx)).await.unwrap().into_inner();
        SotwStream { requests, responses }
    }

    async fn request(
        &self,
        type_url: &str,
        version: &str,
        ack: Option<&DiscoveryResponse>,
        nack: Option<&str>,
    ) {
        self.requests.send(request(type_url, version, ack, nack)).await.unwrap();
    }

    async fn next(&mut self, type_url: &str) -> DiscoveryResponse {
        let r = tokio::time::timeout(Duration::from_secs(10), self.responses.message())
            .await
            .unwrap_or_else(|_| panic!("no {type_url} response within 10 s"))
            .unwrap()
            .expect("stream open");
        assert_eq!(r.type_url, type_url);
        r
    }
}

fn endpoints(r: &DiscoveryResponse) -> Vec<String> {
    assert_eq!(r.resources.len(), 1, "the one subscribed cluster's endpoints");
    let cla = ClusterLoadAssignment::decode(r.resources[0].value.as_slice()).unwrap();
    assert_eq!(cla.cluster_name, CLUSTER);
    let mut ips: Vec<String> = cla
        .endpoints
        .iter()
        .flat_map(|l| &l.lb_endpoints)
        .filter_map(|e| match e.host_identifier.as_ref()? {
            envoy_types::pb::envoy::config::endpoint::v3::lb_endpoint::HostIdentifier::Endpoint(ep) => {
                match ep.address.as_ref()?.address.as_ref()? {
                    envoy_types::pb::envoy::config::core::v3::address::Address::SocketAddress(sa) => {
                        Some(sa.address.clone())
                    }
                    _ => None,
                }
            }
            _ => None,
        })
        .collect();
    ips.sort();
    ips
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_state_of_the_world_client_gets_full_state_and_its_acks_and_nacks_are_tracked() {
    let dir = config_dir();
    let (xds, admin) = (free_port(), free_port());
    let settings = Settings {
        config_dir: Some(dir.clone()),
        xds_addr: xds,
        admin_addr: admin,
        debounce: Duration::from_millis(20),
        max_delay: Duration::from_millis(200),
        resync_grace: Duration::ZERO,
        kubernetes: None,
        ca: None,
        graph: None,
    };
    let server = tokio::spawn(run(settings));

    let mut stream = SotwStream::open(xds, CLUSTER_TYPE, "").await;
    let cds = stream.next(CLUSTER_TYPE).await;
    assert_eq!(cds.resources.len(), 1);
    assert_eq!(Cluster::decode(cds.resources[0].value.as_slice()).unwrap().name, CLUSTER);
    stream.request(CLUSTER_TYPE, &cds.version_info, Some(&cds), None).await;

    stream.request(ENDPOINT_TYPE, "", None, None).await;
    let eds = stream.next(ENDPOINT_TYPE).await;
    assert_eq!(endpoints(&eds), ["192.0.2.3", "192.0.2.4"]);
    stream.request(ENDPOINT_TYPE, &eds.version_info, Some(&eds), None).await;

    let admin_task = move || tokio::task::spawn_blocking(move || node_status(admin));
    // The ACK is on its way: wait for the server to have read it.
    let mut status = Value::Null;
    for _ in 0..100 {
        status = admin_task().await.unwrap();
        if status["acked"][ENDPOINT_TYPE].as_u64().is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(status["protocol"], "sotw", "{status}");
    assert_eq!(status["connected"], true, "{status}");
    assert!(status["acked"][ENDPOINT_TYPE].as_u64().is_some(), "EDS acknowledged: {status}");
    assert!(status["nacks"].as_object().is_some_and(|n| n.is_empty()), "{status}");

    // A third entry: the next response is the full new state, with a new version. The client
    // rejects it; the status names the reason.
    std::fs::write(dir.join("c.yaml"), workload_entry("c", "192.0.2.5")).unwrap();
    let three = stream.next(ENDPOINT_TYPE).await;
    assert_eq!(endpoints(&three), ["192.0.2.3", "192.0.2.4", "192.0.2.5"]);
    assert_ne!(three.version_info, eds.version_info);
    stream.request(ENDPOINT_TYPE, &eds.version_info, Some(&three), Some("sotw test refuses three")).await;
    for _ in 0..100 {
        status = admin_task().await.unwrap();
        if status["nacks"][ENDPOINT_TYPE]["reason"] == "sotw test refuses three" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(status["nacks"][ENDPOINT_TYPE]["reason"], "sotw test refuses three", "{status}");

    // Back to two entries: a new full state; accepting it clears the NACK.
    std::fs::remove_file(dir.join("c.yaml")).unwrap();
    let two = stream.next(ENDPOINT_TYPE).await;
    assert_eq!(endpoints(&two), ["192.0.2.3", "192.0.2.4"]);
    stream.request(ENDPOINT_TYPE, &two.version_info, Some(&two), None).await;
    for _ in 0..100 {
        status = admin_task().await.unwrap();
        if status["nacks"].as_object().is_some_and(|n| n.is_empty()) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(status["nacks"].as_object().is_some_and(|n| n.is_empty()), "NACK cleared: {status}");

    // A reconnecting client that names the version it holds is answered at once.
    drop(stream);
    let mut again = SotwStream::open(xds, ENDPOINT_TYPE, &two.version_info).await;
    let resync = again.next(ENDPOINT_TYPE).await;
    assert_eq!(endpoints(&resync), ["192.0.2.3", "192.0.2.4"]);
    assert_eq!(resync.version_info, two.version_info, "same state, same version");

    server.abort();
    let _ = std::fs::remove_dir_all(&dir);
}
