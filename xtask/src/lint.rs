//! `cargo xtask lint`: the habits CI holds every change to (part of `cargo xtask test`).

use anyhow::bail;

use crate::{module_cycles, util};

/// Crates whose modules must not import each other in a cycle, by their root file.
const CYCLE_CHECKED: &[(&str, &str)] = &[
    ("mesh-node", "mesh-node/src/lib.rs"),
    ("mesh-control", "mesh-control/src/lib.rs"),
    ("nodemesh-api", "mesh-control/api/src/lib.rs"),
];

/// What the node proxy must never link: the control plane, its file watching and a vendored
/// protoc. They belong to mesh-control; the node talks to it over xDS through `nodemesh-api`
/// alone.
const NOT_IN_MESH_NODE: &[&str] = &["mesh-control", "notify", "protobuf-src"];
/// What its `kubernetes` feature (pod discovery, on by default) adds, and a build without it
/// (`--no-default-features`, hosts outside Kubernetes) must not link.
const KUBERNETES_ONLY: &[&str] = &["kube", "kube-client", "kube-runtime", "k8s-openapi", "serde-saphyr"];

/// Runs every check, then fails naming each that did not pass.
pub(crate) fn run() -> anyhow::Result<()> {
    let mut failed = Vec::new();
    util::step("lint: cargo fmt --check");
    if let Err(e) = util::cargo(&["fmt", "--all", "--check"]) {
        failed.push(format!("formatting ({e}; `cargo fmt --all` fixes it)"));
    }
    util::step("lint: cargo clippy --all-targets -- -D warnings");
    if let Err(e) = util::cargo(&[
        "clippy",
        "--workspace",
        "--exclude",
        "mesh-ebpf",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]) {
        failed.push(format!("clippy ({e})"));
    }
    util::step("lint: import cycles between modules");
    let root = util::workspace_root()?;
    for (krate, file) in CYCLE_CHECKED {
        let cycles = module_cycles::find(&root.join(file))?;
        for cycle in &cycles {
            eprint!("{krate}: {cycle}");
        }
        if !cycles.is_empty() {
            failed.push(format!("{} import cycle(s) in {krate}", cycles.len()));
        }
    }
    util::step("lint: mesh-node's dependency graph, with and without the kubernetes feature");
    let without_kubernetes: Vec<&str> = NOT_IN_MESH_NODE.iter().chain(KUBERNETES_ONLY).copied().collect();
    for (features, forbidden) in
        [(None, NOT_IN_MESH_NODE), (Some("--no-default-features"), &without_kubernetes[..])]
    {
        let mut args =
            vec!["tree", "-p", "mesh-node", "-e", "normal,build", "--prefix", "none", "--format", "{p}"];
        args.extend(features);
        let graph = util::output(&std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()), &args)?;
        let linked: Vec<&str> = forbidden
            .iter()
            .copied()
            .filter(|name| graph.lines().any(|line| line.split(' ').next() == Some(*name)))
            .collect();
        if !linked.is_empty() {
            failed.push(format!(
                "mesh-node{} depends on {} (`cargo tree -p mesh-node -i <name>` shows why)",
                features.map(|f| format!(" {f}")).unwrap_or_default(),
                linked.join(", ")
            ));
        }
    }
    util::step("lint: mesh-node builds without the kubernetes feature");
    if let Err(e) = util::cargo(&["check", "-p", "mesh-node", "--no-default-features", "--bins"]) {
        failed.push(format!("mesh-node --no-default-features ({e})"));
    }
    if !failed.is_empty() {
        bail!("lint failed: {}", failed.join("; "));
    }
    Ok(())
}
