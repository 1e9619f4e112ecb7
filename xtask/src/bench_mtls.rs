//! Cross-node data path, in one run on a two-node simulated cluster: a client pod on node 1
//! talks to a server pod on node 2 directly (client opted out), through the mesh in plaintext
//! (meshed client → a server outside the mesh: the client's node proxies, no tunnel), and
//! through the mesh with mTLS (meshed client → meshed server: both nodes' proxies, HBONE).
//! Plus full mutual-TLS handshakes per second against node 2's tunnel.

use anyhow::Context;
use nodemesh_tests::{Registration, SimCluster, mesh, tunnel_client};

use crate::bench::{Run, measure};

pub(crate) struct CrossNode {
    pub direct: Run,
    pub plaintext: Run,
    pub mtls: Run,
    pub handshakes_per_sec: f64,
}

const HANDSHAKES: usize = 2000;

pub(crate) fn run() -> anyhow::Result<CrossNode> {
    let mut cluster = SimCluster::new(2)?;
    cluster.start(&[], &[])?;
    let node0 = &mut cluster.nodes[0];
    let direct_client = node0.add_pod("direct", "bench")?;
    node0.register(&direct_client, &Registration::opted_out())?;
    let meshed_client = node0.add_pod("meshed", "bench")?;
    node0.register(&meshed_client, &Registration::meshed())?;
    let node1 = &mut cluster.nodes[1];
    let meshed_server = node1.add_pod("server", "bench")?;
    node1.register(&meshed_server, &Registration::meshed())?;
    node1.serve(&meshed_server, &[meshed_server.addr(9000)])?;
    let plain_server = node1.add_pod("plain", "legacy")?;
    node1.register(&plain_server, &Registration::unmeshed_namespace())?;
    node1.serve(&plain_server, &[plain_server.addr(9000)])?;
    let node0 = &cluster.nodes[0];
    let to_meshed = meshed_server.addr(9000).to_string();
    mesh::wait_until(std::time::Duration::from_secs(20), std::time::Duration::from_millis(100), || {
        mesh::answered(node0, &meshed_client, &to_meshed)
    })
    .context("the meshed server never answered through the tunnel")?;

    crate::util::step("cross-node: direct pod -> pod");
    let direct = measure(node0, &direct_client, &meshed_server)?;
    crate::util::step("cross-node: pod -> mesh-node -> pod (plaintext)");
    let plaintext = measure(node0, &meshed_client, &plain_server)?;
    crate::util::step("cross-node: pod -> mesh-node =HBONE mTLS=> mesh-node -> pod");
    let mtls = measure(node0, &meshed_client, &meshed_server)?;
    let tunnelled = cluster.nodes[1].metrics()?.sum(
        "istio_tcp_connections_opened_total",
        &[("reporter", "destination"), ("destination_workload", "server")],
    );
    anyhow::ensure!(
        tunnelled > 3000.0,
        "the mTLS runs did not go through the tunnel ({tunnelled} connections)"
    );

    crate::util::step("mutual TLS handshakes against node 2's tunnel");
    let ca = tunnel_client::TestCa::cluster(&cluster);
    let client = ca.leaf(&tunnel_client::spiffe("bench", "default"), -60, 3600);
    let tunnel = "10.76.0.3:15008".parse()?;
    let handshakes_per_sec = tunnel_client::handshake_rate(
        &cluster.fabric_netns,
        tunnel,
        &client,
        &tunnel_client::spiffe("bench", "default"),
        HANDSHAKES,
    )?;
    Ok(CrossNode { direct, plaintext, mtls, handshakes_per_sec })
}
