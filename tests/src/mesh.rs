//! Helpers for tests that run traffic through mesh-control: waiting for config to land,
//! counting which server answered, reading a node's config dump, and config YAML.

use std::{
    collections::BTreeMap,
    fs,
    path::Path,
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::{Pod, Registration, SimNode};

/// Polls `check` every `every` until it holds; an error after `timeout`.
pub fn wait_until(timeout: Duration, every: Duration, mut check: impl FnMut() -> bool) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    while !check() {
        anyhow::ensure!(Instant::now() < deadline, "timed out after {timeout:?}");
        std::thread::sleep(every);
    }
    Ok(())
}

/// Polls `check` every 50 ms; panics naming `what` after `timeout`.
pub fn eventually(what: &str, timeout: Duration, check: impl FnMut() -> bool) {
    if wait_until(timeout, Duration::from_millis(50), check).is_err() {
        panic!("timed out waiting for: {what}");
    }
}

/// Writes a config file the way editors and `kubectl`-like tools do (write, then rename), so a
/// directory watcher never sees half a file.
pub fn write_config(dir: &Path, file: &str, text: &str) {
    let tmp = dir.join(format!(".{file}.tmp"));
    fs::write(&tmp, text).unwrap();
    fs::rename(&tmp, dir.join(file)).unwrap();
}

/// A meshed pod labelled `app=<app>`.
pub fn labelled(app: &str) -> Registration {
    Registration::labelled(&[("app", app)])
}

/// A `shop` Service named `name` at `vip`, port 80 → 8080 on pods labelled `app=<app>`.
pub fn service_yaml(name: &str, vip: &str, app: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: shop}}\n\
         spec:\n  clusterIP: {vip}\n  selector: {{app: {app}}}\n  ports: [{{name: tcp-echo, port: 80, targetPort: 8080}}]\n"
    )
}

/// An HTTP Service (port name `http`) `name` in `namespace` at `vip`, port 80 → 8080 on pods
/// labelled `app=<app>`.
pub fn http_service_yaml(name: &str, namespace: &str, vip: &str, app: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: {namespace}}}\n\
         spec:\n  clusterIP: {vip}\n  selector: {{app: {app}}}\n  ports: [{{name: http, port: 80, targetPort: 8080}}]\n"
    )
}

/// A DestinationRule for `web` in `shop` with `policy` as its traffic policy (flow YAML).
pub fn rule_yaml(policy: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: web, namespace: shop}}\n\
         spec:\n  host: web\n  trafficPolicy: {policy}\n"
    )
}

/// Which server answered each of `n` connections from `client` to `to`; an error if any
/// connection got no answer.
pub fn answered_by(
    node: &SimNode,
    client: &Pod,
    to: &str,
    n: usize,
) -> anyhow::Result<BTreeMap<String, usize>> {
    hellos(node, client, to, n, &[])
}

/// [`hello_counts`] for connections that open with a TLS ClientHello naming `sni`.
pub fn tls_hello_counts(
    node: &SimNode,
    client: &Pod,
    to: &str,
    n: usize,
    sni: &str,
) -> BTreeMap<String, usize> {
    hellos(node, client, to, n, &["--sni", sni]).unwrap_or_else(|e| panic!("{e:#}\n{}", node.log_tail()))
}

fn hellos(
    node: &SimNode,
    client: &Pod,
    to: &str,
    n: usize,
    extra: &[&str],
) -> anyhow::Result<BTreeMap<String, usize>> {
    let n = n.to_string();
    let mut args = vec!["client", "--to", to, "--mode", "hello", "--connections", &n];
    args.extend_from_slice(extra);
    let v = node.testapp(client, &args)?;
    let connections = v["connections"].as_array().ok_or_else(|| anyhow::anyhow!("{to}: {v}"))?;
    let mut counts = BTreeMap::new();
    for c in connections {
        let server = c["reply"]["server"].as_str().ok_or_else(|| anyhow::anyhow!("{to}: no reply: {c}"))?;
        *counts.entry(server.to_string()).or_default() += 1;
    }
    Ok(counts)
}

/// Whether one connection from `client` to `to` is answered.
pub fn answered(node: &SimNode, client: &Pod, to: &str) -> bool {
    answered_by(node, client, to, 1).is_ok()
}

/// [`answered_by`] for tests: a failure panics with both logs.
pub fn hello_counts(node: &SimNode, client: &Pod, to: &str, n: usize) -> BTreeMap<String, usize> {
    answered_by(node, client, to, n).unwrap_or_else(|e| {
        panic!(
            "{e:#}\n--- mesh-node log ---\n{}\n--- mesh-control log ---\n{}",
            node.log_tail(),
            node.control_log()
        )
    })
}

/// A cluster in a node's `/config_dump`.
pub fn dumped_cluster<'a>(dump: &'a Value, name: &str) -> Option<&'a Value> {
    dump["xds"]["config"]["clusters"].get(name)
}

/// How many endpoints a node holds for cluster `name` (0 if it holds none of it).
pub fn endpoint_count(node: &SimNode, name: &str) -> usize {
    node.config_dump()
        .ok()
        .and_then(|d| dumped_cluster(&d, name).and_then(|c| c["endpoints"].as_array()).map(Vec::len))
        .unwrap_or(0)
}

/// `nm-testapp http-client --to <to> <args>` from `client`; panics (with the node's log) if it
/// fails or reports an error.
pub fn http_get(node: &SimNode, client: &Pod, to: &str, args: &[&str]) -> Value {
    let mut all = vec!["http-client", "--to", to];
    all.extend_from_slice(args);
    let r = node.testapp(client, &all).unwrap_or_else(|e| panic!("{e:#}\n{}", node.log_tail()));
    assert!(r.get("error").is_none(), "{all:?}: {r}\n{}", node.log_tail());
    r
}

/// How many of an http-client run's requests `server` answered.
pub fn served(r: &Value, server: &str) -> u64 {
    r["servers"][server].as_u64().unwrap_or(0)
}

/// The certificates a node holds, from its `/config_dump`: `(identity, received, not_after)`
/// (UNIX seconds), never keys.
pub fn held_certificates(node: &SimNode) -> Vec<(String, u64, u64)> {
    let dump = node.config_dump().unwrap_or_default();
    dump["identity"]["certificates"]
        .as_array()
        .map(|certs| {
            certs
                .iter()
                .map(|c| {
                    let n = |k: &str| c[k].as_u64().unwrap_or(0);
                    (c["identity"].as_str().unwrap_or_default().to_string(), n("received"), n("not_after"))
                })
                .collect()
        })
        .unwrap_or_default()
}
