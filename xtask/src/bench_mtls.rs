//! Cross-node data path, in one run on a two-node simulated cluster: a client pod on node 1
//! talks to a server pod on node 2 directly (client opted out), through the mesh in plaintext
//! (meshed client → a server outside the mesh: the client's node proxies, no tunnel), and
//! through the mesh with mTLS (meshed client → meshed server: both nodes' proxies, HBONE).
//! Plus full mutual-TLS handshakes per second against node 2's tunnel, and HTTP across the
//! nodes: an opted-out client to the server pod, and a meshed client to the Service (the
//! client's node balances per request and sends it through the tunnel; the server's node
//! serves it as HTTP again, reports each request and delivers it).

use anyhow::Context;
use nodemesh_tests::{Registration, SimCluster, mesh, tunnel_client};

use crate::{
    bench::{Run, measure},
    bench_http::{Figures, measure as measure_http},
};

pub(crate) struct CrossNode {
    pub direct: Run,
    pub plaintext: Run,
    pub mtls: Run,
    pub handshakes_per_sec: f64,
    /// Per protocol (HTTP/1.1, h2c): direct and through the mesh with mTLS.
    pub http: Vec<(&'static str, Figures, Figures)>,
}

const WEB_VIP: &str = "10.96.0.31";

const HANDSHAKES: usize = 2000;

pub(crate) fn run() -> anyhow::Result<CrossNode> {
    let mut cluster = SimCluster::new(2)?;
    cluster.write_config(
        "web.yaml",
        &format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: bench}}\n\
             spec:\n  clusterIP: {WEB_VIP}\n  selector: {{app: web}}\n  ports: [{{name: http, port: 80, targetPort: 8080}}]\n"
        ),
    );
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
    let web = node1.add_pod("web", "bench")?;
    node1.register(&web, &mesh::labelled("web"))?;
    node1.serve_http(&web, &[web.addr(8080)])?;
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

    let vip = format!("{WEB_VIP}:80");
    mesh::wait_until(std::time::Duration::from_secs(20), std::time::Duration::from_millis(100), || {
        node0
            .testapp(&meshed_client, &["http-client", "--to", &vip, "--requests", "3"])
            .is_ok_and(|r| r["statuses"]["200"] == 3)
    })
    .context("the web Service never answered HTTP through the tunnel")?;
    let mut http = Vec::new();
    for (protocol, h2) in [("HTTP/1.1", false), ("h2c", true)] {
        crate::util::step(&format!("cross-node HTTP, {protocol}: direct, mesh mTLS"));
        let direct = measure_http(node0, &direct_client, &web.addr(8080).to_string(), h2)?;
        let meshed = measure_http(node0, &meshed_client, &vip, h2)?;
        http.push((protocol, direct, meshed));
    }
    let reported = cluster.nodes[1]
        .metrics()?
        .sum("istio_requests_total", &[("reporter", "destination"), ("destination_workload", "web")]);
    anyhow::ensure!(
        reported > 10_000.0,
        "the serving node did not report the HTTP runs ({reported} requests)"
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
    Ok(CrossNode { direct, plaintext, mtls, handshakes_per_sec, http })
}
