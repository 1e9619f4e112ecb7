//! `mesh-node run`: wires capture, proxy, workloads, admin and API together.

use std::sync::{Arc, atomic::Ordering};

use anyhow::Context;
use tokio::{net::TcpListener, signal::unix::SignalKind};

use crate::{
    admin::Admin,
    api,
    authz::Authorizer,
    capture,
    config::Config,
    identity::Identities,
    inbound::{deliver::Delivery, plaintext::PlaintextInbound},
    proxy::Outbound,
    proxy::route::Router,
    registry::Registry,
    telemetry::metrics::Metrics,
    tunnel::{client::TunnelPool, credentials::Credentials, server::TunnelServer},
    workload::IpIndex,
    xds::{cache::Cache, client::Client as XdsClient},
};

pub async fn run(config: Config) -> anyhow::Result<()> {
    match crate::sys::raise_open_files_limit() {
        Ok(limit) => tracing::debug!(limit, "open files limit"),
        Err(e) => tracing::warn!("cannot raise the open files limit: {e}"),
    }
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
    let metrics = Arc::new(Metrics::new(&mut metrics_registry));
    let index = Arc::new(IpIndex::default());
    let cache = Arc::new(Cache::new(config.max_endpoints_per_cluster));
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
    let registry = Arc::new(Registry::new(
        Arc::clone(&capture),
        outbound,
        Arc::clone(&index),
        Arc::clone(&metrics),
        &config.state_dir,
        &config.cgroup_root,
        Arc::new(PlaintextInbound {
            delivery: Arc::clone(&delivery),
            authorizer: Arc::clone(&authorizer),
            connect_timeout: config.connect_timeout,
        }),
    ));
    if let Some(credentials) = &credentials {
        let listener = TcpListener::bind(config.tunnel_listen)
            .await
            .with_context(|| format!("tunnel: cannot listen on {}", config.tunnel_listen))?;
        let server = Arc::new(TunnelServer {
            credentials: Arc::clone(credentials),
            locals: Arc::clone(&index),
            delivery: Arc::clone(&delivery),
            authorizer: Arc::clone(&authorizer),
            connect_timeout: config.connect_timeout,
            metrics: Arc::clone(&metrics),
        });
        tokio::spawn(server.serve(listener));
    }

    let admin_listener = TcpListener::bind(config.admin_addr)
        .await
        .with_context(|| format!("admin endpoint: cannot listen on {}", config.admin_addr))?;
    let api_listener = api::server::bind(&config.api_socket)
        .with_context(|| format!("local API: cannot listen on {}", config.api_socket.display()))?;
    let admin = Arc::new(Admin {
        identities: identities.clone(),
        tunnels,
        ready: false.into(),
        metrics: metrics_registry,
        workloads: Arc::clone(&registry),
        config: config.clone(),
        xds: xds_client.clone(),
    });
    if let Some(client) = &xds_client {
        tokio::spawn(Arc::clone(client).run(registry.watch_specs()));
    }
    if let Some(identities) = &identities {
        tokio::spawn(Arc::clone(identities).run(registry.watch_specs()));
    }
    tokio::spawn(Arc::clone(&admin).serve(admin_listener));

    let restored = registry.restore().await.context("restoring saved workloads")?;
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
    tokio::spawn(api::server::serve(api_listener, Arc::clone(&registry), writes));
    admin.ready.store(true, Ordering::Release);
    tracing::info!(
        node = %config.node_name, admin = %config.admin_addr, api = %config.api_socket.display(),
        restored, "mesh-node ready"
    );

    let mut term = tokio::signal::unix::signal(SignalKind::terminate())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    admin.ready.store(false, Ordering::Release);
    tracing::info!(
        "shutting down: detaching capture (pods fall back to direct connections); \
         connections proxied by this process close now; workloads stay saved for the next start"
    );
    let _ = std::fs::remove_file(&config.api_socket);
    Ok(())
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
