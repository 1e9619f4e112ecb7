//! `mesh-node run`: wires capture, proxy, workloads, admin and API together.

use std::{
    os::fd::OwnedFd,
    path::Path,
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use anyhow::Context;
use tokio::net::TcpListener;

use crate::{
    admin::{Admin, Scope},
    api,
    authz::Authorizer,
    capture,
    config::Config,
    drain::Drain,
    handover::{self, Inherited, wire::Role},
    identity::Identities,
    inbound::{deliver::Delivery, plaintext::PlaintextInbound},
    lifecycle::{self, Ending, NodeHandover},
    proxy::Outbound,
    proxy::route::Router,
    registry::Registry,
    telemetry::{labels::Naming, metrics::Metrics},
    tunnel::{client::TunnelPool, credentials::Credentials, server::TunnelServer},
    workload::IpIndex,
    xds::{cache::Cache, client::Client as XdsClient},
};

pub async fn run(config: Config) -> anyhow::Result<()> {
    match crate::sys::raise_open_files_limit() {
        Ok(limit) => tracing::debug!(limit, "open files limit"),
        Err(e) => tracing::warn!("cannot raise the open files limit: {e}"),
    }
    // A mesh-node already serving this node (an upgrade): take its listeners before binding
    // anything, so not one connection is refused in between.
    let handover_socket = handover::socket_path(&config.state_dir);
    std::fs::create_dir_all(&config.state_dir)
        .with_context(|| format!("state dir {}", config.state_dir.display()))?;
    let (predecessor, inherited) = match take_over(&handover_socket, config.drain_timeout).await? {
        Some((predecessor, inherited)) => (Some(predecessor), inherited),
        None => (None, Inherited::default()),
    };
    let ebpf_level =
        if tracing::enabled!(tracing::Level::DEBUG) { aya_log::Level::Debug } else { aya_log::Level::Info };
    let (capture, logger) = capture::load_and_attach(&config, ebpf_level)?;
    let capture = Arc::new(capture);
    // Before any pod's inbound capture starts: the kubelet's probes never meet it.
    capture::node_addresses::refresh(&capture);
    tokio::spawn(capture::node_addresses::keep_current(Arc::clone(&capture)));
    if let Some(logger) = logger {
        tokio::spawn(capture::forward_ebpf_logs(logger));
    }

    let mut metrics_registry = prometheus_client::registry::Registry::default();
    let naming = Naming { trust_domain: config.trust_domain.clone(), cluster: config.cluster_id.clone() };
    let metrics = Arc::new(Metrics::new(&mut metrics_registry, naming));
    let drain = Drain::default();
    drain.register(&mut metrics_registry);
    let index = Arc::new(IpIndex::default());
    let cache = Arc::new(Cache::new(
        config.max_endpoints_per_cluster,
        Arc::clone(&metrics.access_logs),
        Arc::clone(&metrics.tracers),
    ));
    let identities = match (&config.control_plane, &config.token) {
        (Some(cp), Some(token)) => {
            Some(Arc::new(Identities::new(cp, token.clone(), config.trust_domain.clone())?))
        }
        _ => None,
    };
    // The tunnel needs workload identities: without them there is no TLS to speak.
    let credentials =
        identities.as_ref().map(|i| Arc::new(Credentials::new(Arc::clone(i), config.connect_timeout)));
    let xds_client = config.control_plane.as_ref().map(|cp| {
        let mut client = XdsClient::new(cp.clone(), config.node_name.clone(), Arc::clone(&cache));
        client.token = config.token.clone();
        client.tunnel_address = credentials.as_ref().and(config.tunnel_address);
        client.metrics_port = config.metrics_addr.map(|a| a.port());
        Arc::new(client)
    });
    let router = xds_client.as_ref().map(|c| Router {
        cache: Arc::clone(&cache),
        on_demand: c.on_demand(),
        lookup_timeout: config.lookup_timeout,
    });
    let tunnels = credentials.as_ref().map(|c| Arc::new(TunnelPool::new(Arc::clone(c), config.proxy_mark)));
    let delivery = Arc::new(Delivery { capture: Arc::clone(&capture), mark: config.delivery_mark });
    let authorizer = Arc::new(Authorizer {
        cache: config.control_plane.as_ref().map(|_| Arc::clone(&cache)),
        metrics: Arc::clone(&metrics),
        trust_domain: config.trust_domain.clone(),
        policy_wait: config.lookup_timeout,
    });
    let outbound = Arc::new(Outbound {
        drain: drain.clone(),
        capture: Arc::clone(&capture),
        metrics: Arc::clone(&metrics),
        locals: Arc::clone(&index),
        tunnels: tunnels.clone(),
        proxy_mark: config.proxy_mark,
        delivery: Arc::clone(&delivery),
        authorizer: Arc::clone(&authorizer),
        connect_timeout: config.connect_timeout,
        router,
        sniff_timeout: config.sniff_timeout,
    });
    let registry = Registry::new(
        Arc::clone(&capture),
        outbound,
        Arc::clone(&index),
        Arc::clone(&metrics),
        &config.state_dir,
        &config.cgroup_root,
        Arc::new(PlaintextInbound {
            drain: drain.clone(),
            delivery: Arc::clone(&delivery),
            authorizer: Arc::clone(&authorizer),
            connect_timeout: config.connect_timeout,
        }),
    );
    let registry = Arc::new(match &config.control_plane {
        Some(_) => registry.with_fail_closed_policy(Arc::clone(&cache)),
        None => registry,
    });
    tokio::spawn(Arc::clone(&registry).follow_fail_closed());
    let mut own_listeners: Vec<(Role, OwnedFd)> = Vec::new();
    let mut accept_tasks = Vec::new();
    if let Some(credentials) = &credentials {
        let listener = listen(inherited.tunnel, config.tunnel_listen, "tunnel").await?;
        own_listeners.push((Role::Tunnel, dup(&listener)?));
        let server = Arc::new(TunnelServer {
            drain: drain.clone(),
            credentials: Arc::clone(credentials),
            locals: Arc::clone(&index),
            delivery: Arc::clone(&delivery),
            authorizer: Arc::clone(&authorizer),
            connect_timeout: config.connect_timeout,
            metrics: Arc::clone(&metrics),
        });
        accept_tasks.push(tokio::spawn(server.serve(listener)).abort_handle());
    }

    let admin_listener = listen(inherited.admin, config.admin_addr, "admin endpoint").await?;
    own_listeners.push((Role::Admin, dup(&admin_listener)?));
    let api_listener = api::server::bind(&config.api_socket)
        .with_context(|| format!("local API: cannot listen on {}", config.api_socket.display()))?;
    let admin = Arc::new(Admin {
        drain: drain.clone(),
        identities: identities.clone(),
        tunnels,
        ready: false.into(),
        metrics: metrics_registry,
        workloads: Arc::clone(&registry),
        config: config.clone(),
        xds: xds_client.clone(),
    });
    accept_tasks.push(tokio::spawn(Arc::clone(&admin).serve(admin_listener, Scope::All)).abort_handle());
    if let Some(addr) = config.metrics_addr {
        let listener = listen(inherited.metrics, addr, "metrics endpoint").await?;
        own_listeners.push((Role::Metrics, dup(&listener)?));
        accept_tasks.push(tokio::spawn(Arc::clone(&admin).serve(listener, Scope::Metrics)).abort_handle());
    }

    registry.inherit(inherited.workloads);
    let restored = registry.restore().await.context("restoring saved workloads")?;
    // Only now: the first report to the control plane must list the restored workloads, not
    // an empty node (that would withdraw their endpoints from every other node for a moment).
    if let Some(client) = &xds_client {
        tokio::spawn(Arc::clone(client).run(registry.watch_specs()));
    }
    if let Some(identities) = &identities {
        tokio::spawn(Arc::clone(identities).run(registry.watch_specs()));
    }
    let writes = match &config.kubernetes {
        #[cfg(feature = "kubernetes")]
        Some(kubernetes) => {
            start_discovery(&config, kubernetes, Arc::clone(&registry)).await?;
            api::server::Writes::Refused("this node discovers its pods from Kubernetes (--kubernetes)")
        }
        // Config refuses --kubernetes in a build without the feature.
        #[cfg(not(feature = "kubernetes"))]
        Some(_) => anyhow::bail!("--kubernetes: built without the `kubernetes` feature"),
        None => api::server::Writes::Allowed,
    };
    accept_tasks
        .push(tokio::spawn(api::server::serve(api_listener, Arc::clone(&registry), writes)).abort_handle());

    // Every workload is registered again: what the previous process left for pods that are
    // gone goes now.
    let unclaimed = registry.drop_handed();
    let (cgroups, netns, ips) = registry.captured().await;
    let swept = capture.sweep(&cgroups, &netns, &ips);
    if let Some(predecessor) = predecessor {
        // The old process serves until we say Taken: first have what new connections need
        // here — the control plane's answers (services, endpoints) and, since peers' tunnels
        // reach this process from then on, the workloads' certificates.
        if let Some(client) = &xds_client
            && !client.wait_connected(CERTIFICATES_WAIT).await
        {
            tracing::warn!(
                "taking over without a control-plane stream: serving the connections it needs anyway"
            );
        }
        if let Some(identities) = &identities {
            let specs = registry.watch_specs().borrow().clone();
            certificates_ready(identities, &specs, CERTIFICATES_WAIT).await;
        }
        match tokio::task::spawn_blocking(move || predecessor.taken()).await? {
            Ok(pid) => {
                tracing::info!(from = pid, unclaimed, swept, "took over: the previous mesh-node drains")
            }
            // It is gone already: we serve its listeners regardless.
            Err(e) => tracing::warn!("the previous mesh-node did not confirm the handover: {e}"),
        }
    }
    let handover = Arc::new(NodeHandover {
        registry: Arc::clone(&registry),
        drain: drain.clone(),
        listeners: own_listeners,
        accept_tasks,
        exiting: false.into(),
    });
    let state = handover::serve(&handover_socket, Arc::clone(&handover))
        .with_context(|| format!("handover socket {}", handover_socket.display()))?;
    admin.ready.store(true, Ordering::Release);
    tracing::info!(
        node = %config.node_name, admin = %config.admin_addr, api = %config.api_socket.display(),
        restored, swept, "mesh-node ready"
    );
    lifecycle::run_until_end(Ending {
        handover,
        state,
        drain_timeout: config.drain_timeout,
        sockets: vec![config.api_socket.clone(), handover_socket],
    })
    .await
}

/// How long a taking-over process waits for its control-plane stream, then for its workloads'
/// certificates, before it takes over.
const CERTIFICATES_WAIT: Duration = Duration::from_secs(10);

async fn certificates_ready(
    identities: &Identities,
    specs: &[nodemesh_api::workload::WorkloadSpec],
    wait: Duration,
) {
    let deadline = Instant::now() + wait;
    for spec in specs.iter().filter(|s| s.mesh_decision().is_meshed()) {
        let identity = identities.identity(&spec.namespace, &spec.service_account);
        let left = deadline.saturating_duration_since(Instant::now());
        if identities.wait_for(&identity, left).await.is_none() {
            tracing::warn!(%identity, "no certificate yet; serving anyway (handshakes for it wait)");
        }
    }
}

/// [`handover::take_over`], waiting while a running mesh-node that is exiting refuses: it goes
/// within its drain deadline, and this one then starts afresh on the pinned capture.
async fn take_over(
    socket: &Path,
    drain_timeout: Duration,
) -> anyhow::Result<Option<(handover::Predecessor, Inherited)>> {
    let give_up = Instant::now() + drain_timeout + Duration::from_secs(10);
    loop {
        let path = socket.to_path_buf();
        match tokio::task::spawn_blocking(move || handover::take_over(&path)).await? {
            Err(e) if e.kind() == std::io::ErrorKind::ResourceBusy && Instant::now() < give_up => {
                tracing::info!("{e}; waiting for it to exit");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            other => return other.context("taking over from the running mesh-node"),
        }
    }
}

/// The listener handed over for `addr`, else a new one.
async fn listen(
    handed: Option<std::net::TcpListener>,
    addr: std::net::SocketAddr,
    what: &str,
) -> anyhow::Result<TcpListener> {
    match handed {
        Some(listener) => {
            TcpListener::from_std(listener).with_context(|| format!("{what}: handed-over listener"))
        }
        None => TcpListener::bind(addr).await.with_context(|| format!("{what}: cannot listen on {addr}")),
    }
}

/// A descriptor of our own for a listener, to hand over later.
fn dup(listener: &TcpListener) -> anyhow::Result<OwnedFd> {
    use std::os::fd::AsFd;
    Ok(listener.as_fd().try_clone_to_owned()?)
}

/// Connects to the API server and registers the node's pods; returns once the first list is
/// reconciled, so readiness means every existing pod has been looked at.
#[cfg(feature = "kubernetes")]
async fn start_discovery(
    config: &Config,
    kubernetes: &crate::config::KubernetesDiscovery,
    registry: Arc<Registry>,
) -> anyhow::Result<()> {
    use crate::discovery;
    let connection = match &kubernetes.api_url {
        Some(url) => discovery::Connection::Url(url.clone()),
        None => discovery::Connection::Infer,
    };
    let client = discovery::client(&connection).await.context("kubernetes: API server client")?;
    let settings = discovery::Settings {
        node_name: config.node_name.clone(),
        cgroup_root: config.cgroup_root.clone(),
        host: discovery::pod_netns::HostPaths {
            proc: kubernetes.host_proc.clone(),
            netns_dir: kubernetes.netns_dir.clone(),
        },
    };
    discovery::start(client, settings, registry).await.context("kubernetes: pod discovery")
}
