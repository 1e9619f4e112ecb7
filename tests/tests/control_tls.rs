//! mesh-control's TLS port (15012): nodes reach xDS, reports and the CA over TLS 1.3 checked
//! against the mesh's root; a node that cannot verify the control plane sends it nothing; the
//! serving certificate renews at half-life; a node token never goes over plaintext to another
//! host; and an xDS stream for a node that has proved itself needs the node's token.

use std::{sync::Arc, time::Duration};

use mesh_control::proto::mesh::{WorkloadReport, node_registration_client::NodeRegistrationClient};
use nodemesh_tests::{SimCluster, mesh::eventually, netns, tunnel_client::TestCa};
use rustls::{
    ClientConfig, RootCertStore,
    pki_types::{CertificateDer, ServerName, pem::PemObject},
};

/// mesh-control's address on the fabric.
const CONTROL_IP: &str = "10.76.0.1";

/// The leaf certificate mesh-control's TLS port presents, verified against `root_pem` for its
/// fabric IP; the handshake error otherwise.
fn serving_leaf(cluster: &SimCluster, root_pem: Vec<u8>) -> anyhow::Result<CertificateDer<'static>> {
    netns::run_in(&cluster.fabric_netns, move || {
        let mut roots = RootCertStore::empty();
        for der in CertificateDer::pem_slice_iter(&root_pem) {
            roots.add(der?)?;
        }
        let config = ClientConfig::builder_with_provider(nodemesh_tests::tunnel_client::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        rt.block_on(async move {
            let tcp = tokio::net::TcpStream::connect((CONTROL_IP, 15012)).await?;
            let name = ServerName::try_from(CONTROL_IP)?.to_owned();
            let tls = tokio_rustls::TlsConnector::from(Arc::new(config)).connect(name, tcp).await?;
            let leaf = tls.get_ref().1.peer_certificates().and_then(|c| c.first()).cloned();
            leaf.ok_or_else(|| anyhow::anyhow!("no certificate presented"))
        })
    })
}

fn connected(cluster: &SimCluster, node: &str) -> bool {
    cluster.control.status_json().is_ok_and(|s| {
        s["nodes"]
            .as_array()
            .is_some_and(|nodes| nodes.iter().any(|n| n["node"] == node && n["connected"] == true))
    })
}

#[test]
fn nodes_reach_the_control_plane_over_tls_checked_against_the_mesh_root() {
    let mut cluster = SimCluster::new(2).unwrap();
    // A 6 s lifetime: the serving certificate renews 3 s after it was issued.
    cluster.start(&["--cert-ttl-secs", "6"], &[]).unwrap();
    let names: Vec<String> = cluster.nodes.iter().map(|n| n.node_netns.clone()).collect();
    eventually("both nodes connected over TLS", Duration::from_secs(15), || {
        names.iter().all(|n| connected(&cluster, n))
    });
    let dump = cluster.nodes[0].config_dump().unwrap();
    assert!(dump.to_string().contains("https://10.76.0.1:15012"), "{dump}");

    // The serving certificate chains to the mesh root, names the address nodes dial, and is
    // replaced after half its life.
    let root = std::fs::read(cluster.control.root_file()).unwrap();
    let first = serving_leaf(&cluster, root.clone()).unwrap();
    std::thread::sleep(Duration::from_millis(3500));
    let second = serving_leaf(&cluster, root.clone()).unwrap();
    assert_ne!(first, second, "the serving certificate was not renewed at half-life");
    assert!(
        serving_leaf(&cluster, TestCa::foreign().certificate_pem().into_bytes()).is_err(),
        "another mesh's root accepted mesh-control's certificate"
    );

    // A node given another mesh's root refuses the control plane: no stream, so no token sent.
    let foreign_root = cluster.work_dir.join("foreign-root.pem");
    std::fs::write(&foreign_root, TestCa::foreign().certificate_pem()).unwrap();
    let node1 = &mut cluster.nodes[1];
    let mut args = node1.mesh_node_args().to_vec();
    let at = args.iter().position(|a| a == "--control-plane-root").unwrap() + 1;
    args[at] = foreign_root.display().to_string();
    node1.stop_mesh_node().unwrap();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    node1.start_mesh_node(&args).unwrap();
    eventually("the node refuses the control plane's certificate", Duration::from_secs(10), || {
        cluster.nodes[1].log().contains("invalid peer certificate")
    });
    assert!(!connected(&cluster, &names[1]), "a node that cannot verify the control plane connected");
    assert!(cluster.control.log().contains("TLS port: handshake failed"), "{}", cluster.control.log());
}

#[test]
fn a_node_token_never_crosses_the_network_in_plaintext_and_xds_needs_it_once_proved() {
    let mut cluster = SimCluster::new(1).unwrap();
    cluster.start(&[], &[]).unwrap();
    let node = &cluster.nodes[0];
    let token_file = node.write_node_token(&cluster.control).unwrap();

    // Plaintext to another host with a token: refused at start, saying why and what to use.
    let plaintext = cluster.control.plaintext_url();
    let refused = node
        .mesh_node_cli(&[
            "run",
            "--control-plane",
            &plaintext,
            "--token-file",
            &token_file,
            "--cgroup-root",
            "/",
        ])
        .unwrap_err()
        .to_string();
    assert!(refused.contains("would cross the network in plaintext"), "{refused}");
    assert!(refused.contains("https://10.76.0.1:15012"), "{refused}");
    // https without the root to check it by: refused, naming the flag.
    let tls = cluster.control.tls_url();
    let refused = node
        .mesh_node_cli(&["run", "--control-plane", &tls, "--token-file", &token_file, "--cgroup-root", "/"])
        .unwrap_err()
        .to_string();
    assert!(refused.contains("--control-plane-root"), "{refused}");

    // The node has proved itself with its token: an xDS stream for it without one is refused.
    let name = node.node_netns.clone();
    eventually("the node connected", Duration::from_secs(15), || connected(&cluster, &name));
    let refusal = netns::run_in(&cluster.fabric_netns, move || {
        use envoy_types::pb::envoy::{
            config::core::v3::Node,
            service::discovery::v3::{
                DeltaDiscoveryRequest, aggregated_discovery_service_client::AggregatedDiscoveryServiceClient,
            },
        };
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        rt.block_on(async move {
            let mut client = AggregatedDiscoveryServiceClient::connect(plaintext.clone()).await?;
            let first = DeltaDiscoveryRequest {
                node: Some(Node { id: name.clone(), ..Default::default() }),
                type_url: mesh_control::proto::WORKLOAD_TYPE.into(),
                ..Default::default()
            };
            let mut stream =
                client.delta_aggregated_resources(tokio_stream::iter([first])).await?.into_inner();
            let answer = stream.message().await;
            // A report without the token is refused the same way.
            let mut registration = NodeRegistrationClient::connect(plaintext).await?;
            let report = registration
                .report_workloads(WorkloadReport { node: name, ..Default::default() })
                .await
                .err()
                .map(|s| s.message().to_string());
            Ok((answer.err().map(|s| s.message().to_string()), report))
        })
    })
    .unwrap();
    let (xds, report) = refusal;
    assert!(xds.as_deref().is_some_and(|m| m.contains("reported with its token before")), "{xds:?}");
    // With a CA every report needs its token, proved before or not.
    assert!(report.as_deref().is_some_and(|m| m.contains("carries no node token")), "{report:?}");
    assert!(connected(&cluster, &cluster.nodes[0].node_netns), "the real node lost its stream");
}
