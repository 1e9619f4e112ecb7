//! gRPC's own xDS client (proxyless: the `grpcio` library resolving `xds:///<host>:<port>`
//! through mesh-control) and plain gRPC servers that name themselves, driven through
//! `py/grpc_who.py`. `cargo xtask setup` installs grpcio.

use std::{net::SocketAddr, path::Path, time::Duration};

use anyhow::Context;
use serde_json::Value;

use crate::{Pod, SimNode, netns};

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/py/grpc_who.py");

fn python() -> &'static Path {
    Path::new("python3")
}

/// Starts a gRPC server in `pod` on `port` that answers every call with `name`, and waits
/// until it listens.
pub fn serve(node: &mut SimNode, pod: &Pod, port: u16, name: &str) -> anyhow::Result<()> {
    let args = [SCRIPT, "serve", "--port", &port.to_string(), "--name", name].map(String::from);
    node.spawn_in(pod, python(), &args)?;
    netns::wait_listening(&pod.netns, pod.addr(port), Duration::from_secs(30)).with_context(|| {
        format!("gRPC server {name} did not listen on {} (is grpcio installed?)", pod.addr(port))
    })
}

/// The bootstrap of a proxyless client named `node_id` whose xDS server is mesh-control at `xds`.
pub fn bootstrap(node_id: &str, xds: SocketAddr) -> String {
    serde_json::json!({
        "xds_servers": [{
            "server_uri": xds.to_string(),
            "channel_creds": [{"type": "insecure"}],
            "server_features": ["xds_v3"],
        }],
        "node": {"id": node_id, "locality": {}},
    })
    .to_string()
}

fn client_args(target: &str, requests: u32, metadata: &[&str]) -> Vec<String> {
    let mut args = [SCRIPT, "client", "--target", target, "--requests", &requests.to_string()]
        .map(String::from)
        .to_vec();
    for m in metadata {
        args.extend(["--metadata".to_string(), m.to_string()]);
    }
    args
}

fn parse(out: anyhow::Result<String>) -> anyhow::Result<Value> {
    let out = out?;
    serde_json::from_str(out.trim()).with_context(|| format!("grpc_who.py output: {out}"))
}

/// `requests` unary calls from a proxyless client in the node netns to `xds:///<listener>`;
/// `metadata` as `key=value`. Returns `{"servers": {name: count}, "errors": n}`.
pub fn proxyless_calls(
    node: &SimNode,
    bootstrap: &str,
    listener: &str,
    requests: u32,
    metadata: &[&str],
) -> anyhow::Result<Value> {
    let args = client_args(&format!("xds:///{listener}"), requests, metadata);
    let env = [("GRPC_XDS_BOOTSTRAP_CONFIG", bootstrap)];
    parse(node.run_in_node(python(), &args, &env, Duration::from_secs(120)))
}

/// The same calls from a plain gRPC client in `pod` to `target` (`ip:port`).
pub fn calls_from(
    node: &SimNode,
    pod: &Pod,
    target: &str,
    requests: u32,
    metadata: &[&str],
) -> anyhow::Result<Value> {
    parse(node.run_in(pod, python(), &client_args(target, requests, metadata), Duration::from_secs(120)))
}
