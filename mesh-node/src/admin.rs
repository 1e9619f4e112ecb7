//! Admin endpoint (node-local): readiness, Prometheus metrics, config dump.
//!
//! | path | what |
//! |---|---|
//! | `/healthz/ready` | 200 (`ready (pid N)`) once capture is attached, saved workloads are restored, (with `--kubernetes`) the first pod list is reconciled and any running mesh-node has handed over; 503 while draining, saying why and how many connections are open |
//! | `/metrics` | Prometheus (OpenMetrics text); also on `--metrics-addr`, with readiness |
//! | `/graph/edges` | the service graph's edges folded from these metrics (JSON, for mesh-control); also on `--metrics-addr` |
//! | `/config_dump` | JSON: node settings, every workload with its capture state, and the config
//! |   | received from the control plane (addresses, clusters with endpoints and health) |

use std::sync::{
    Arc,
    atomic::{AtomicBool, Ordering},
};

use hyper::{Method, Request, Response, StatusCode, body::Incoming};
use nodemesh_api::service_graph::{EDGES_PATH, EdgeReport};
use prometheus_client::registry::Registry as MetricsRegistry;
use tokio::net::TcpListener;

use crate::{
    config::Config,
    http::{self, Body},
    registry::Registry,
};

pub struct Admin {
    pub ready: AtomicBool,
    pub drain: crate::drain::Drain,
    pub metrics: MetricsRegistry,
    pub workloads: Arc<Registry>,
    pub config: Config,
    pub xds: Option<Arc<crate::xds::client::Client>>,
    /// Workload certificates (with `--token-file`).
    pub identities: Option<Arc<crate::identity::Identities>>,
    /// Tunnel connections to other nodes (with identities).
    pub tunnels: Option<Arc<crate::tunnel::client::TunnelPool>>,
}

/// What a listener of the admin endpoint answers.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Everything (loopback: `--admin-addr`).
    All,
    /// `/metrics` and `/healthz/ready` only (`--metrics-addr`, reachable off the node).
    Metrics,
}

impl Admin {
    pub async fn serve(self: Arc<Self>, listener: TcpListener, scope: Scope) {
        let handler = Arc::new(move |req: Request<Incoming>| {
            let admin = Arc::clone(&self);
            async move {
                if scope == Scope::Metrics
                    && !matches!(req.uri().path(), "/metrics" | "/healthz/ready" | EDGES_PATH)
                {
                    return http::text(
                        StatusCode::NOT_FOUND,
                        "only /metrics, /graph/edges and /healthz/ready are served here\n",
                    );
                }
                admin.route(req).await
            }
        });
        loop {
            match listener.accept().await {
                Ok((stream, _)) => http::spawn_connection(stream, Arc::clone(&handler)),
                Err(e) => tracing::warn!("admin accept failed: {e}"),
            }
        }
    }

    async fn route(&self, req: Request<Incoming>) -> Response<Body> {
        if req.method() != Method::GET {
            return http::text(StatusCode::METHOD_NOT_ALLOWED, "admin endpoint is read-only\n");
        }
        match req.uri().path() {
            "/healthz/ready" => match self.drain.state() {
                crate::drain::State::Draining { why } | crate::drain::State::Ended { why } => http::text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!(
                        "not ready: draining ({why}); {} connections open\n",
                        self.drain.open_connections()
                    ),
                ),
                crate::drain::State::Serving if self.ready.load(Ordering::Acquire) => {
                    http::text(StatusCode::OK, format!("ready (pid {})\n", std::process::id()))
                }
                crate::drain::State::Serving => {
                    http::text(StatusCode::SERVICE_UNAVAILABLE, "not ready: starting\n")
                }
            },
            "/metrics" => {
                let mut out = String::new();
                match prometheus_client::encoding::text::encode(&mut out, &self.metrics) {
                    Ok(()) => http::openmetrics(out),
                    Err(e) => http::text(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
                }
            }
            // The service graph's edges, folded from this node's own metrics (mesh-control
            // reads this instead of the whole page), on the blocking pool: a busy node's page
            // takes milliseconds to fold.
            EDGES_PATH => {
                let mut page = String::new();
                if let Err(e) = prometheus_client::encoding::text::encode(&mut page, &self.metrics) {
                    return http::text(StatusCode::INTERNAL_SERVER_ERROR, e.to_string());
                }
                match tokio::task::spawn_blocking(move || EdgeReport::of_page(&page)).await {
                    Ok(Ok(report)) => http::json(StatusCode::OK, &report),
                    Ok(Err(e)) => http::text(StatusCode::INTERNAL_SERVER_ERROR, e),
                    Err(e) => http::text(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
                }
            }
            "/config_dump" => {
                let c = &self.config;
                http::json(
                    StatusCode::OK,
                    &serde_json::json!({
                        "node": {
                            "name": c.node_name,
                            "cgroup_root": c.cgroup_root,
                            "exclude_ports": c.exclude_ports,
                            "exclude_cidrs": c.exclude_cidrs.iter()
                                .map(|x| format!("{}/{}", x.addr, x.prefix_len)).collect::<Vec<_>>(),
                            "proxy_mark": c.proxy_mark,
                        },
                        "workloads": self.workloads.list().await,
                        "xds": self.xds.as_ref().map(|x| serde_json::json!({
                            "control_plane": x.control_plane.url,
                            "connected": x.is_connected(),
                            "config": x.cache.dump(),
                        })),
                        "identity": self.identities.as_ref().map(|i| i.dump()),
                        "tunnels": self.tunnels.as_ref().map(|t| t.dump()),
                    }),
                )
            }
            other => http::text(StatusCode::NOT_FOUND, format!("no admin path {other}\n")),
        }
    }
}
