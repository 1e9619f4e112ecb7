//! The setup lifecycle tests and the upgrade benchmark share: a two-node cluster with mTLS, a
//! client pod on node 0 and `web` (HTTP and a TCP echo) on node 1, and `nm-testapp steady`
//! load against it.

use std::time::Duration;

use serde_json::Value;

use crate::{
    Pod, Registration, SimCluster,
    mesh::{eventually, labelled},
};

pub const VIP: &str = "10.96.0.10";
pub const HTTP_PORT: u16 = 80;
pub const ECHO_PORT: u16 = 9000;

/// `web`: HTTP on 80 → 8080, and a TCP echo on 9000 (declared tcp: never sniffed).
pub fn web_service() -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: shop}}\n\
         spec:\n  clusterIP: {VIP}\n  selector: {{app: web}}\n  ports:\n\
         \x20 - {{name: http, port: {HTTP_PORT}, targetPort: 8080}}\n\
         \x20 - {{name: tcp-echo, port: {ECHO_PORT}, targetPort: {ECHO_PORT}}}\n"
    )
}

/// Starts the cluster (mesh-control with `control_args`, mesh-node with `node_args`), the
/// client and `web`; returns once the client gets answers through the mesh.
pub fn web_cluster(control_args: &[&str], node_args: &[&str]) -> anyhow::Result<(SimCluster, Pod)> {
    let mut cluster = SimCluster::new(2)?;
    cluster.write_config("web.yaml", &web_service());
    cluster.start(control_args, node_args)?;
    let client = cluster.nodes[0].add_pod("client", "shop")?;
    cluster.nodes[0].register(&client, &Registration::meshed())?;
    let node1 = &mut cluster.nodes[1];
    let web = node1.add_pod("web", "shop")?;
    node1.register(&web, &labelled("web"))?;
    node1.serve_http(&web, &[web.addr(8080)])?;
    node1.serve(&web, &[web.addr(ECHO_PORT)])?;
    eventually("web answers through the mesh", Duration::from_secs(15), || {
        let r = cluster.nodes[0].testapp(&client, &["http-client", "--to", &format!("{VIP}:{HTTP_PORT}")]);
        r.is_ok_and(|r| r["statuses"]["200"] == 1)
    });
    Ok((cluster, client))
}

/// `nm-testapp steady` against `web` for `seconds`: 4 keep-alive clients, 2 opening a
/// connection per request, 4 long-lived echo streams, 2 opening an echo connection per line.
pub fn steady_args(seconds: u64) -> Vec<String> {
    let args = format!(
        "steady --http {VIP}:{HTTP_PORT} --tcp {VIP}:{ECHO_PORT} --seconds {seconds} --keepalive 4 --fresh 2 --streams 4 --fresh-tcp 2"
    );
    args.split(' ').map(String::from).collect()
}

/// The totals of a `steady` report.
#[derive(Clone, Copy, Debug)]
pub struct SteadyTotals {
    /// HTTP requests sent (keep-alive and new-connection), and how many failed.
    pub requests: u64,
    pub failed: u64,
    /// Long-lived echo streams broken, short TCP connections failed.
    pub streams_broken: u64,
    pub short_tcp_failed: u64,
}

impl SteadyTotals {
    pub fn of(report: &Value) -> SteadyTotals {
        let count = |kind: &str, field: &str| report[kind][field].as_u64().unwrap_or(0);
        SteadyTotals {
            requests: ["keepalive", "fresh"].iter().map(|k| count(k, "ok") + count(k, "failed")).sum(),
            failed: count("keepalive", "failed") + count("fresh", "failed"),
            streams_broken: count("streams", "failed"),
            short_tcp_failed: count("fresh_tcp", "failed"),
        }
    }
}
