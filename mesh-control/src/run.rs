//! `mesh-control run`: sources → store → debounced snapshots → xDS streams, plus the admin
//! endpoint that `mesh-control status` reads.

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::Context;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::AggregatedDiscoveryServiceServer;
use tokio::{
    net::TcpListener,
    sync::{Notify, watch},
};

use crate::{
    admin::Admin,
    ca::{
        CertificateAuthority,
        node_tokens::{NodeCredentials, NodeTokens, TokenReviewer},
        service::CertificateService,
    },
    graph::{GraphSettings, ServiceGraph},
    metrics::ControlMetrics,
    model::{
        Kind,
        store::{Origin, Store},
    },
    proto::{
        istio_ca::istio_certificate_service_server::IstioCertificateServiceServer,
        mesh::node_registration_server::NodeRegistrationServer,
    },
    source::{files::DirectorySource, kube},
    tls_port,
    xds::{nodes::Nodes, registration::Registration, server::AdsServer, snapshot::Snapshot, translate},
};

pub const DEFAULT_XDS_ADDR: &str = "127.0.0.1:15010";
pub const DEFAULT_ADMIN_ADDR: &str = "127.0.0.1:15014";
pub const DEFAULT_TLS_ADDR: &str = "127.0.0.1:15012";
/// Names the TLS port's certificate carries besides `--tls-name`s and its own address.
pub const DEFAULT_TLS_NAMES: &[&str] = &[
    "mesh-control",
    "mesh-control.nodemesh-system",
    "mesh-control.nodemesh-system.svc",
    "mesh-control.nodemesh-system.svc.cluster.local",
    "localhost",
];

#[derive(Clone, Debug)]
pub struct Settings {
    pub config_dir: Option<PathBuf>,
    pub xds_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    /// Changes closer together than this are pushed as one.
    pub debounce: Duration,
    /// …but a steady stream of changes is still pushed at least this often.
    pub max_delay: Duration,
    /// After a start, how long nodes that reconnect holding config keep it before being
    /// resynced, so that every node can report its workloads first (see [`Snapshot::warm`]).
    /// Ends early once every Node object in the config has reported.
    pub resync_grace: Duration,
    /// Read objects from this Kubernetes API too.
    pub kubernetes: Option<kube::Connection>,
    /// The workload CA; `None`: no certificates are issued.
    pub ca: Option<CaSettings>,
    /// The service graph's scrapes of the nodes; `None`: no graph.
    pub graph: Option<GraphSettings>,
}

/// Where the CA keeps its state, and what it issues.
#[derive(Clone, Debug)]
pub struct CaSettings {
    /// A `cacerts` directory (see [`crate::ca::authority`]); created if empty.
    pub dir: PathBuf,
    pub trust_domain: String,
    /// Names this cluster's intermediate.
    pub cluster: String,
    /// The longest workload certificate lifetime.
    pub max_ttl: Duration,
    /// `namespace/name` of the node proxies' ServiceAccount (Kubernetes: TokenReview).
    pub node_account: String,
    /// The audience of the node proxies' projected tokens (Kubernetes: TokenReview).
    pub node_token_audience: String,
    /// Kubernetes: where a `cacerts` Secret replaces the directory's bundle.
    pub secret_namespace: String,
    /// Kubernetes: without that Secret, fail rather than make a root of this replica's own.
    pub require_secret: bool,
    /// The TLS port (xDS, reports and CSRs over TLS, with a certificate from this CA).
    pub tls_addr: SocketAddr,
    /// The names (DNS or IP) nodes may dial the TLS port by.
    pub tls_names: Vec<String>,
}

pub async fn run(settings: Settings) -> anyhow::Result<()> {
    let store = Arc::new(Mutex::new(Store::default()));
    let changed = Arc::new(Notify::new());
    let nodes = Arc::new(Nodes::default());

    if let Some(dir) = &settings.config_dir {
        let mut source = DirectorySource::new(dir.clone(), Arc::clone(&store), Arc::clone(&changed));
        source.load_all()?;
        tokio::spawn(source.watch(Duration::from_millis(20), Duration::from_secs(5)));
    }

    let mut kube_client = None;
    if let Some(connection) = &settings.kubernetes {
        let client = kube::client(connection).await.context("kubernetes client configuration")?;
        kube::start(client.clone(), Arc::clone(&store), Arc::clone(&changed));
        kube_client = Some(client);
    }

    let grace_end = Instant::now() + settings.resync_grace;
    let first = {
        let store = store.lock().expect("store lock");
        let state = State { warm: settings.resync_grace.is_zero(), synced: is_synced(&settings, &store) };
        state.snapshot(&store)
    };
    tracing::info!(
        generation = first.generation,
        addresses = first.addresses.len(),
        clusters = first.clusters.len(),
        resync_grace_ms = settings.resync_grace.as_millis() as u64,
        "initial config"
    );
    let (snap_tx, snap_rx) = watch::channel(Arc::new(first));
    tokio::spawn(publish_snapshots(
        Arc::clone(&store),
        Arc::clone(&changed),
        snap_tx,
        settings.clone(),
        grace_end,
    ));

    let mut registry = prometheus_client::registry::Registry::default();
    nodes.metrics.register(&mut registry);
    let graph = settings.graph.map(|g| Arc::new(ServiceGraph::new(Arc::clone(&nodes), g)));
    if let Some(graph) = &graph {
        tokio::spawn(Arc::clone(graph).run());
    }
    let admin = Arc::new(Admin {
        store: Arc::clone(&store),
        nodes: Arc::clone(&nodes),
        snapshots: snap_rx.clone(),
        registry,
        graph,
    });
    let admin_listener = TcpListener::bind(settings.admin_addr)
        .await
        .with_context(|| format!("admin endpoint: cannot listen on {}", settings.admin_addr))?;
    tokio::spawn(admin.serve(admin_listener));

    let xds_listener = TcpListener::bind(settings.xds_addr)
        .await
        .with_context(|| format!("xDS: cannot listen on {}", settings.xds_addr))?;
    let (certificates, node_credentials) = certificate_service(
        settings.ca.as_ref(),
        kube_client,
        Arc::clone(&store),
        Arc::clone(&nodes.metrics),
    )
    .await?;
    let tls = match (&settings.ca, &certificates.ca) {
        (Some(s), Some(ca)) => Some((s.tls_addr, tls_port(s, Arc::clone(ca)).await?)),
        _ => None,
    };
    let ads = AdsServer { snapshots: snap_rx, nodes, credentials: Arc::clone(&node_credentials) };
    let registration = Registration { store, changed, nodes: node_credentials };
    // Both ports serve the same services; the plaintext one is for loopback and trusted
    // networks (nodes refuse to send a token over it to another host).
    let services = tonic::service::Routes::new(
        AggregatedDiscoveryServiceServer::new(ads).max_decoding_message_size(16 << 20),
    )
    .add_service(NodeRegistrationServer::new(registration))
    .add_service(IstioCertificateServiceServer::new(certificates));
    let server = || {
        tonic::transport::Server::builder()
            .http2_keepalive_interval(Some(Duration::from_secs(10)))
            .http2_keepalive_timeout(Some(Duration::from_secs(10)))
            .add_routes(services.clone())
    };
    let plaintext = server().serve_with_incoming_shutdown(
        tokio_stream::wrappers::TcpListenerStream::new(xds_listener),
        shutdown(),
    );
    tracing::info!(
        xds = %settings.xds_addr,
        tls = ?tls.as_ref().map(|(addr, _)| addr),
        admin = %settings.admin_addr,
        "mesh-control ready"
    );
    match tls {
        Some((_, incoming)) => {
            let tls = server().serve_with_incoming_shutdown(incoming, shutdown());
            tokio::try_join!(async { plaintext.await.context("xDS server") }, async {
                tls.await.context("TLS port")
            })?;
        }
        None => plaintext.await.context("xDS server")?,
    }
    tracing::info!("mesh-control stopped");
    Ok(())
}

/// The TLS port's listener, serving a certificate from `ca` for the configured names and the
/// address it listens on.
async fn tls_port(
    settings: &CaSettings,
    ca: Arc<CertificateAuthority>,
) -> anyhow::Result<
    tokio_stream::wrappers::ReceiverStream<
        std::io::Result<tokio_rustls::server::TlsStream<tokio::net::TcpStream>>,
    >,
> {
    let mut names = settings.tls_names.clone();
    let ip = settings.tls_addr.ip().to_string();
    if !settings.tls_addr.ip().is_unspecified() && !names.contains(&ip) {
        names.push(ip);
    }
    let cert = tls_port::ServingCert::new(ca, names, settings.max_ttl)
        .context("issuing the TLS port's certificate")?;
    let listener = TcpListener::bind(settings.tls_addr)
        .await
        .with_context(|| format!("TLS port: cannot listen on {}", settings.tls_addr))?;
    Ok(tls_port::incoming(listener, tls_port::server_config(Arc::new(cert))?))
}

/// The CSR API, with the CA of `settings` (loaded, or created in an empty directory), and the
/// node credentials it shares with workload reports.
async fn certificate_service(
    settings: Option<&CaSettings>,
    kube_client: Option<::kube::Client>,
    store: Arc<Mutex<Store>>,
    metrics: Arc<ControlMetrics>,
) -> anyhow::Result<(CertificateService, Arc<NodeCredentials>)> {
    let Some(s) = settings else {
        let nodes = Arc::new(NodeCredentials::new(None, None));
        let service = CertificateService {
            ca: None,
            nodes: Arc::clone(&nodes),
            store,
            max_ttl: Duration::ZERO,
            metrics,
        };
        return Ok((service, nodes));
    };
    if let Some(client) = &kube_client {
        let secret = format!("{}/{}", s.secret_namespace, crate::ca::secret::SECRET_NAME);
        let found = crate::ca::secret::fetch(client, &s.secret_namespace, &s.dir)
            .await
            .with_context(|| format!("reading Secret {secret}"))?;
        if found {
            tracing::info!(secret, dir = %s.dir.display(), "CA bundle taken from the cluster's cacerts Secret");
        } else if s.require_secret {
            anyhow::bail!(
                "Secret {secret} not found, and --require-ca-secret is set: every replica must serve \
                 the same CA, so none makes its own; create it first (`mesh-control ca-init`, then \
                 `kubectl create secret generic cacerts`, README \"Install on Kubernetes\")"
            );
        }
    }
    let ca = CertificateAuthority::load_or_create(&s.dir, &s.trust_domain, &s.cluster)?;
    let tokens = NodeTokens::load_or_create(&s.dir)
        .with_context(|| format!("node token key in {}", s.dir.display()))?;
    tracing::info!(dir = %s.dir.display(), trust_domain = s.trust_domain, roots = ca.roots().len(), "CA ready");
    // On Kubernetes, node proxies may also prove their node with their ServiceAccount token.
    let reviewer = kube_client.map(|client| TokenReviewer {
        client,
        account: s.node_account.clone(),
        audience: s.node_token_audience.clone(),
    });
    let nodes = Arc::new(NodeCredentials::new(Some(tokens), reviewer));
    let service = CertificateService {
        ca: Some(Arc::new(ca)),
        nodes: Arc::clone(&nodes),
        store,
        max_ttl: s.max_ttl,
        metrics,
    };
    Ok((service, nodes))
}

async fn shutdown() {
    let mut term =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

/// Rebuilds the snapshot after changes settle (debounce), never later than `max_delay` after
/// the first change of a burst; and once more when the resync grace ends.
async fn publish_snapshots(
    store: Arc<Mutex<Store>>,
    changed: Arc<Notify>,
    tx: watch::Sender<Arc<Snapshot>>,
    settings: Settings,
    grace_end: Instant,
) {
    loop {
        if tx.borrow().warm {
            changed.notified().await;
        } else {
            tokio::select! {
                _ = changed.notified() => {}
                _ = tokio::time::sleep_until(grace_end.into()) => {}
            }
        }
        let burst_start = Instant::now();
        loop {
            let wait = settings.debounce.min(settings.max_delay.saturating_sub(burst_start.elapsed()));
            if wait.is_zero() || tokio::time::timeout(wait, changed.notified()).await.is_err() {
                break;
            }
        }
        let started = Instant::now();
        let was = State { warm: tx.borrow().warm, synced: tx.borrow().synced };
        let snapshot = {
            let store = store.lock().expect("store lock");
            let state = State {
                warm: was.warm || Instant::now() >= grace_end || every_node_reported(&store),
                synced: is_synced(&settings, &store),
            };
            if store.generation() == tx.borrow().generation && state == was {
                continue;
            }
            state.snapshot(&store)
        };
        if snapshot.warm && !was.warm {
            tracing::info!("resync grace over: nodes that reconnected holding config are resynced now");
        }
        tracing::info!(
            generation = snapshot.generation,
            addresses = snapshot.addresses.len(),
            clusters = snapshot.clusters.len(),
            took_ms = started.elapsed().as_millis() as u64,
            "config generation ready"
        );
        for conflict in snapshot.conflicts.iter().filter(|c| !tx.borrow().conflicts.contains(c)) {
            tracing::warn!(generation = snapshot.generation, "conflict: {conflict}");
        }
        tx.send_replace(Arc::new(snapshot));
    }
}

/// Whether a snapshot may be served, and to whom.
#[derive(Clone, Copy, PartialEq, Eq)]
struct State {
    warm: bool,
    synced: bool,
}

impl State {
    fn snapshot(self, store: &Store) -> Snapshot {
        let mut snapshot = translate::snapshot(store);
        snapshot.warm = self.warm;
        snapshot.synced = self.synced;
        snapshot.built = Some(Instant::now());
        snapshot
    }
}

fn is_synced(settings: &Settings, store: &Store) -> bool {
    settings.kubernetes.is_none() || kube::synced(store)
}

/// Whether the config lists its nodes and each has reported its workloads since the start.
fn every_node_reported(store: &Store) -> bool {
    let mut nodes = store.of_kind(Kind::Node).peekable();
    nodes.peek().is_some() && nodes.all(|n| store.has_delivered(&Origin::Node(n.meta().name.clone())))
}
