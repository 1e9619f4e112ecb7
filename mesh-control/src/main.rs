//! `mesh-control`: run the control plane, validate config files, show what nodes run.

use std::{
    io::{Read, Write},
    net::SocketAddr,
    path::PathBuf,
    process::ExitCode,
    time::Duration,
};

use clap::{Parser, Subcommand};
use mesh_control::{
    admin::NodesReport,
    ca::node_tokens::NodeTokens,
    graph::GraphSettings,
    model::store::{Origin, SourceError, Store},
    run::{
        self, CaSettings, DEFAULT_ADMIN_ADDR, DEFAULT_TLS_ADDR, DEFAULT_TLS_NAMES, DEFAULT_XDS_ADDR, Settings,
    },
    source::{files, kube::Connection},
};

#[derive(Parser, Debug)]
#[command(name = "mesh-control", version, about = "Nodemesh control plane")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[allow(clippy::large_enum_variant, reason = "parsed once at start; boxing buys nothing")]
#[derive(Subcommand, Debug)]
enum Command {
    /// Serve xDS to nodes from a watched config directory and/or Kubernetes (and node reports).
    Run {
        /// Directory of YAML (Kubernetes and Istio objects); watched for changes.
        #[arg(long, env = "NODEMESH_CONFIG_DIR")]
        config_dir: Option<PathBuf>,
        #[arg(long, env = "NODEMESH_XDS_ADDR", default_value = DEFAULT_XDS_ADDR)]
        xds_addr: SocketAddr,
        #[arg(long, env = "NODEMESH_CONTROL_ADMIN_ADDR", default_value = DEFAULT_ADMIN_ADDR)]
        admin_addr: SocketAddr,
        /// Changes closer together than this are pushed as one generation.
        #[arg(long, env = "NODEMESH_DEBOUNCE_MS", default_value_t = 50)]
        debounce_ms: u64,
        /// After a (re)start, nodes that reconnect holding config keep it this long (or until
        /// every Node in the config has reported), so no node is resynced to a view that lacks
        /// the workloads of nodes not yet back. Nodes retry at most every ~7.5 s.
        #[arg(long, env = "NODEMESH_RESYNC_GRACE_MS", default_value_t = 8000)]
        resync_grace_ms: u64,
        /// Also read objects from Kubernetes: in-cluster service account, else KUBECONFIG or
        /// ~/.kube/config.
        #[arg(long, env = "NODEMESH_KUBERNETES")]
        kubernetes: bool,
        /// Read objects from the Kubernetes API at this URL, without credentials (e.g. `kubectl
        /// proxy` at http://127.0.0.1:8001).
        #[arg(long, env = "NODEMESH_KUBE_API", conflicts_with = "kubernetes")]
        kube_api: Option<String>,
        #[command(flatten)]
        ca: CaArgs,
        /// How often the service graph (admin `/graph`) scrapes each node's metrics; 0 turns
        /// the graph off.
        #[arg(long, env = "NODEMESH_GRAPH_SCRAPE_INTERVAL_MS", default_value_t = 5000)]
        graph_scrape_interval_ms: u64,
        /// The span the graph's counts and rates cover.
        #[arg(long, env = "NODEMESH_GRAPH_WINDOW_SECS", default_value_t = 60)]
        graph_window_secs: u64,
    },
    /// Create a CA bundle in Istio's `cacerts` layout (a self-signed root and this cluster's
    /// intermediate) in an empty directory, for `kubectl create secret generic cacerts
    /// --from-file=DIR`; an existing bundle there is checked and left as it is.
    CaInit {
        #[arg(long, env = "NODEMESH_CA_DIR")]
        ca_dir: PathBuf,
        #[arg(long, env = "NODEMESH_TRUST_DOMAIN", default_value = "cluster.local")]
        trust_domain: String,
        #[arg(long, env = "NODEMESH_CLUSTER_NAME", default_value = "cluster1")]
        cluster_name: String,
    },
    /// Print the bootstrap token of a node (local mode): mesh-node presents it to obtain its
    /// workloads' certificates. Needs the CA directory the control plane uses.
    NodeToken {
        node: String,
        #[arg(long, env = "NODEMESH_CA_DIR")]
        ca_dir: PathBuf,
    },
    /// Check files (or every file under a directory) together without applying them; lists
    /// every error and every conflict between objects (shadowed routes, rival
    /// DestinationRules) and exits non-zero if there is one.
    Validate { paths: Vec<PathBuf> },
    /// List nodes, the config generation each has applied, and why a node rejected config.
    Status {
        #[arg(long, env = "NODEMESH_CONTROL_ADMIN_ADDR", default_value = DEFAULT_ADMIN_ADDR)]
        admin_addr: SocketAddr,
        /// Print the raw JSON.
        #[arg(long)]
        json: bool,
    },
    /// Wait until every connected node has applied a config generation (by default the newest
    /// one now); exits non-zero naming the nodes that have not, when one rejected it or the
    /// timeout passes. Use it between the steps of a rollout.
    Wait {
        #[arg(long, env = "NODEMESH_CONTROL_ADMIN_ADDR", default_value = DEFAULT_ADMIN_ADDR)]
        admin_addr: SocketAddr,
        #[arg(long)]
        generation: Option<u64>,
        #[arg(long, default_value_t = 60)]
        timeout_secs: u64,
    },
}

/// The workload CA (issue certificates only when `--ca-dir` is given).
#[derive(clap::Args, Debug)]
struct CaArgs {
    /// The CA's directory, in Istio's `cacerts` layout (ca-cert.pem, ca-key.pem, cert-chain.pem,
    /// root-cert.pem): a user-supplied bundle is used as is; an empty directory gets a new
    /// self-signed root and an intermediate for this cluster.
    #[arg(long, env = "NODEMESH_CA_DIR")]
    ca_dir: Option<PathBuf>,
    #[arg(long, env = "NODEMESH_TRUST_DOMAIN", default_value = "cluster.local")]
    trust_domain: String,
    /// With Kubernetes: a Secret `cacerts` in this namespace (Istio's keys) supplies the CA
    /// bundle, written into --ca-dir before the CA loads.
    #[arg(long, env = "NODEMESH_CA_SECRET_NAMESPACE", default_value = "istio-system")]
    ca_secret_namespace: String,
    /// With Kubernetes: refuse to start without the `cacerts` Secret instead of making a root
    /// of its own. Several replicas must serve one CA; each making its own would leave nodes
    /// trusting whichever they met first.
    #[arg(long, env = "NODEMESH_REQUIRE_CA_SECRET")]
    require_ca_secret: bool,
    /// Names this cluster's intermediate CA.
    #[arg(long, env = "NODEMESH_CLUSTER_NAME", default_value = "cluster1")]
    cluster_name: String,
    /// The longest workload certificate lifetime (nodes renew at half of it); at least 5.
    #[arg(long, env = "NODEMESH_CERT_TTL_SECS", default_value_t = 24 * 3600)]
    cert_ttl_secs: u64,
    /// With Kubernetes: the ServiceAccount (`namespace/name`) of the mesh-node DaemonSet, whose
    /// tokens (checked by TokenReview) prove which node a request comes from.
    #[arg(long, env = "NODEMESH_NODE_SERVICE_ACCOUNT", default_value = "nodemesh-system/mesh-node")]
    node_service_account: String,
    /// With Kubernetes: the audience of the node proxies' projected ServiceAccount tokens
    /// (the DaemonSet's `serviceAccountToken.audience`); TokenReview must confirm it.
    #[arg(long, env = "NODEMESH_NODE_TOKEN_AUDIENCE", default_value = "nodemesh")]
    node_token_audience: String,
    /// The TLS port: xDS, workload reports and CSRs over TLS 1.3 with a certificate from this
    /// CA (nodes dial it as `https://` with `--control-plane-root`).
    #[arg(long, env = "NODEMESH_TLS_ADDR", default_value = DEFAULT_TLS_ADDR)]
    tls_addr: SocketAddr,
    /// A further DNS name or IP the TLS port's certificate is valid for (repeatable); it always
    /// holds mesh-control, mesh-control.nodemesh-system[.svc[.cluster.local]], localhost and
    /// the --tls-addr IP.
    #[arg(long = "tls-name", env = "NODEMESH_TLS_NAMES", value_delimiter = ',')]
    tls_names: Vec<String>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // `validate` prints its own report; the store's log lines would repeat it.
    if !matches!(cli.command, Command::Validate { .. }) {
        mesh_control::logging::init();
    }
    match cli.command {
        Command::Run {
            config_dir,
            xds_addr,
            admin_addr,
            debounce_ms,
            resync_grace_ms,
            kubernetes,
            kube_api,
            ca,
            graph_scrape_interval_ms,
            graph_window_secs,
        } => {
            let settings = Settings {
                config_dir,
                xds_addr,
                admin_addr,
                debounce: Duration::from_millis(debounce_ms),
                max_delay: Duration::from_millis(debounce_ms.saturating_mul(10).max(100)),
                resync_grace: Duration::from_millis(resync_grace_ms),
                kubernetes: match (kubernetes, kube_api) {
                    (_, Some(url)) => Some(Connection::Url(url)),
                    (true, None) => Some(Connection::Infer),
                    (false, None) => None,
                },
                ca: ca.ca_dir.map(|dir| CaSettings {
                    dir,
                    trust_domain: ca.trust_domain,
                    cluster: ca.cluster_name,
                    max_ttl: Duration::from_secs(ca.cert_ttl_secs.max(5)),
                    node_account: ca.node_service_account,
                    node_token_audience: ca.node_token_audience,
                    secret_namespace: ca.ca_secret_namespace,
                    require_secret: ca.require_ca_secret,
                    tls_addr: ca.tls_addr,
                    tls_names: DEFAULT_TLS_NAMES.iter().map(|n| n.to_string()).chain(ca.tls_names).collect(),
                }),
                graph: (graph_scrape_interval_ms > 0).then(|| GraphSettings {
                    scrape_interval: Duration::from_millis(graph_scrape_interval_ms),
                    window: Duration::from_secs(graph_window_secs.max(1)),
                }),
            };
            let rt = tokio::runtime::Runtime::new().expect("tokio runtime");
            match rt.block_on(run::run(settings)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("mesh-control: {e:#}");
                    ExitCode::from(1)
                }
            }
        }
        Command::Validate { paths } => validate(&paths),
        Command::CaInit { ca_dir, trust_domain, cluster_name } => {
            let created = std::fs::create_dir_all(&ca_dir).map_err(|e| e.to_string()).and_then(|()| {
                mesh_control::ca::authority::CertificateAuthority::load_or_create(
                    &ca_dir,
                    &trust_domain,
                    &cluster_name,
                )
                .map_err(|e| e.to_string())
            });
            match created {
                Ok(_) => {
                    println!("{}: ca-cert.pem ca-key.pem cert-chain.pem root-cert.pem", ca_dir.display());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("mesh-control ca-init: {}: {e}", ca_dir.display());
                    ExitCode::from(1)
                }
            }
        }
        Command::NodeToken { node, ca_dir } => match NodeTokens::load_or_create(&ca_dir) {
            Ok(tokens) => {
                println!("{}", tokens.mint(&node));
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("mesh-control node-token: {}: {e}", ca_dir.display());
                ExitCode::from(1)
            }
        },
        Command::Wait { admin_addr, generation, timeout_secs } => {
            match wait(admin_addr, generation, Duration::from_secs(timeout_secs)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("mesh-control wait: {e:#}");
                    ExitCode::from(1)
                }
            }
        }
        Command::Status { admin_addr, json } => match status(admin_addr, json) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("mesh-control status: {e:#}");
                ExitCode::from(1)
            }
        },
    }
}

fn validate(paths: &[PathBuf]) -> ExitCode {
    if paths.is_empty() {
        eprintln!("mesh-control validate: name at least one file or directory");
        return ExitCode::from(2);
    }
    let mut files_checked = 0;
    // Every file into one store, as the control plane would load them: it also refuses an
    // object defined in two files, and lets conflicts between files be found.
    let mut store = Store::default();
    let mut unreadable: Vec<SourceError> = Vec::new();
    for path in paths {
        let list = if path.is_dir() {
            match files::list_files(path) {
                Ok(l) => l,
                Err(e) => {
                    eprintln!("{}: cannot list: {e}", path.display());
                    return ExitCode::from(1);
                }
            }
        } else {
            vec![path.clone()]
        };
        for file in list {
            files_checked += 1;
            match files::load_file(&file) {
                Ok(docs) => {
                    store.replace_source(&Origin::File(file), docs);
                }
                Err(e) => unreadable.push(e),
            }
        }
    }
    let errors: Vec<String> =
        unreadable.iter().map(ToString::to_string).chain(store.errors().map(ToString::to_string)).collect();
    for e in &errors {
        println!("error: {e}");
    }
    let conflicts = mesh_control::model::layering::compose(&store).conflicts;
    for c in &conflicts {
        println!("conflict: {c}");
    }
    println!(
        "{files_checked} file(s), {} valid object(s), {} error(s), {} conflict(s)",
        store.len(),
        errors.len(),
        conflicts.len()
    );
    if errors.is_empty() && conflicts.is_empty() { ExitCode::SUCCESS } else { ExitCode::from(1) }
}

fn status(admin: SocketAddr, json: bool) -> anyhow::Result<()> {
    let body = http_get(admin, "/debug/nodes")?;
    if json {
        println!("{body}");
        return Ok(());
    }
    let report: NodesReport = serde_json::from_str(&body)?;
    println!("config generation: {}", report.generation);
    if !report.synced {
        println!("kubernetes: first list not complete; nothing is pushed yet");
    }
    if !report.warm {
        println!(
            "resync grace (just started): a node that comes back holding config keeps it until every node has reported"
        );
    }
    println!("{:<24} {:<10} {:<8} {:>8}  REJECTED", "NODE", "CONNECTED", "PROTOCOL", "APPLIED");
    for n in &report.nodes {
        let nacks: Vec<String> = n
            .nacks
            .iter()
            .map(|(t, nack)| format!("{} gen {}: {}", short_type(t), nack.generation, nack.reason))
            .collect();
        println!(
            "{:<24} {:<10} {:<8} {:>8}  {}",
            n.node,
            if n.connected { "yes" } else { "no" },
            n.protocol,
            n.applied_generation(),
            if nacks.is_empty() { "-".to_string() } else { nacks.join("; ") }
        );
    }
    Ok(())
}

fn wait(admin: SocketAddr, generation: Option<u64>, timeout: Duration) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    let mut target = generation;
    loop {
        let report: NodesReport = serde_json::from_str(&http_get(admin, "/debug/nodes")?)?;
        let want = *target.get_or_insert(report.generation);
        if want > report.generation {
            // The change that makes `want` may not have been read yet (debounce, watch delay).
            anyhow::ensure!(
                started.elapsed() < timeout,
                "generation {want} was not built within {timeout:?} (the newest is {})",
                report.generation
            );
            std::thread::sleep(Duration::from_millis(20));
            continue;
        }
        let connected: Vec<_> = report.nodes.iter().filter(|n| n.connected).collect();
        let rejected: Vec<String> = connected
            .iter()
            .flat_map(|n| {
                n.nacks.iter().filter(|(_, nack)| nack.generation >= want).map(move |(t, nack)| {
                    format!(
                        "{} rejected {} of generation {}: {}",
                        n.node,
                        short_type(t),
                        nack.generation,
                        nack.reason
                    )
                })
            })
            .collect();
        anyhow::ensure!(rejected.is_empty(), "{}", rejected.join("\n"));
        let behind: Vec<String> = connected
            .iter()
            .filter(|n| n.applied_generation() < want)
            .map(|n| format!("{} (at generation {})", n.node, n.applied_generation()))
            .collect();
        if behind.is_empty() {
            println!(
                "generation {want} applied by all {} connected node(s) after {:?}",
                connected.len(),
                started.elapsed()
            );
            let offline: Vec<&str> =
                report.nodes.iter().filter(|n| !n.connected).map(|n| n.node.as_str()).collect();
            if !offline.is_empty() {
                println!("not connected (they resync when they return): {}", offline.join(", "));
            }
            return Ok(());
        }
        anyhow::ensure!(
            started.elapsed() < timeout,
            "generation {want} not applied within {timeout:?} by: {}",
            behind.join(", ")
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn short_type(type_url: &str) -> &str {
    type_url.rsplit('.').next().unwrap_or(type_url)
}

/// Minimal HTTP/1.0 GET (the admin endpoint is loopback-only and answers small JSON).
fn http_get(addr: SocketAddr, path: &str) -> anyhow::Result<String> {
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .map_err(|e| anyhow::anyhow!("cannot reach mesh-control's admin endpoint at {addr}: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut buf = String::new();
    s.read_to_string(&mut buf)?;
    let (head, body) =
        buf.split_once("\r\n\r\n").ok_or_else(|| anyhow::anyhow!("malformed HTTP response"))?;
    anyhow::ensure!(head.starts_with("HTTP/1.1 200") || head.starts_with("HTTP/1.0 200"), "{head}");
    Ok(body.to_string())
}
