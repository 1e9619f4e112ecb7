//! Admin endpoint of mesh-control (loopback by default).
//!
//! | path | what |
//! |---|---|
//! | `/healthz/ready` | 200 once the first config is loaded (with Kubernetes: listed) |
//! | `/debug/nodes` | JSON: every node, the generation it applied, NACK reasons |
//! | `/debug/config` | JSON: the current generation, the objects in force, rejected input, conflicts |
//! | `/metrics` | Prometheus (OpenMetrics text): pushes, push latency, nodes, rejections, CA |
//! | `/graph` | the live service graph (a page); `/graph/data`: what it draws, as JSON (`?versions=true`: a vertex per app version) |

use std::sync::{Arc, Mutex};

use hyper::{Method, Request, Response, StatusCode, body::Incoming};
use prometheus_client::registry::Registry;
use tokio::{net::TcpListener, sync::watch};

use crate::{
    graph::ServiceGraph,
    http::{self, Body},
    model::store::Store,
    xds::{nodes::Nodes, snapshot::Snapshot},
};

pub struct Admin {
    pub store: Arc<Mutex<Store>>,
    pub nodes: Arc<Nodes>,
    pub snapshots: watch::Receiver<Arc<Snapshot>>,
    /// Every metric of this process (`nodes.metrics` among them).
    pub registry: Registry,
    /// The service graph; `None` when turned off (`--graph-scrape-interval-ms 0`).
    pub graph: Option<Arc<ServiceGraph>>,
}

/// `/debug/nodes` as `mesh-control status` reads it.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct NodesReport {
    /// The newest config generation mesh-control has built.
    pub generation: u64,
    /// False during the resync grace after a start.
    pub warm: bool,
    /// False until the Kubernetes API (if used) has been listed once.
    pub synced: bool,
    pub nodes: Vec<crate::xds::nodes::NodeStatus>,
}

impl Admin {
    pub async fn serve(self: Arc<Self>, listener: TcpListener) {
        let handler = Arc::new(move |req: Request<Incoming>| {
            let admin = Arc::clone(&self);
            async move { admin.route(&req) }
        });
        loop {
            match listener.accept().await {
                Ok((stream, _)) => http::spawn_connection(stream, Arc::clone(&handler)),
                Err(e) => tracing::warn!("admin accept failed: {e}"),
            }
        }
    }

    fn route(&self, req: &Request<Incoming>) -> Response<Body> {
        if req.method() != Method::GET {
            return http::text(StatusCode::METHOD_NOT_ALLOWED, "admin endpoint is read-only\n");
        }
        match req.uri().path() {
            "/healthz/ready" if self.snapshots.borrow().synced => http::text(StatusCode::OK, "ready\n"),
            "/healthz/ready" => http::text(
                StatusCode::SERVICE_UNAVAILABLE,
                "waiting for the first list of every Kubernetes resource\n",
            ),
            "/debug/nodes" => {
                let snapshot = Arc::clone(&self.snapshots.borrow());
                http::json(
                    StatusCode::OK,
                    &NodesReport {
                        generation: snapshot.generation,
                        warm: snapshot.warm,
                        synced: snapshot.synced,
                        nodes: self.nodes.list(),
                    },
                )
            }
            "/debug/config" => {
                let store = self.store.lock().expect("store lock");
                let snapshot = Arc::clone(&self.snapshots.borrow());
                let mut objects: Vec<String> = Vec::new();
                for kind in crate::model::Kind::ALL {
                    objects.extend(store.of_kind(kind).map(|o| o.key().to_string()));
                }
                http::json(
                    StatusCode::OK,
                    &serde_json::json!({
                        "store_generation": store.generation(),
                        "pushed_generation": snapshot.generation,
                        "objects": objects,
                        "rejected": store.errors().map(ToString::to_string).collect::<Vec<_>>(),
                        "conflicts": snapshot.conflicts,
                        "addresses": snapshot.addresses.len(),
                        "clusters": snapshot.clusters.keys().collect::<Vec<_>>(),
                    }),
                )
            }
            "/metrics" => {
                // Gauges of state read at scrape time, not kept in step on every change.
                let metrics = &self.nodes.metrics;
                metrics.generation.set(self.snapshots.borrow().generation as i64);
                metrics.rejected_objects.set(self.store.lock().expect("store lock").errors().count() as i64);
                let mut out = String::new();
                match prometheus_client::encoding::text::encode(&mut out, &self.registry) {
                    Ok(()) => http::openmetrics(out),
                    Err(e) => http::text(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
                }
            }
            "/graph" | "/graph/" if self.graph.is_some() => http::html(crate::graph::PAGE),
            "/graph/data" => match &self.graph {
                Some(graph) => {
                    let by_version =
                        req.uri().query().is_some_and(|q| q.split('&').any(|p| p == "versions=true"));
                    http::json(StatusCode::OK, &graph.view(by_version))
                }
                None => http::error(
                    StatusCode::NOT_FOUND,
                    "the service graph is off (--graph-scrape-interval-ms 0)",
                ),
            },
            other => http::text(StatusCode::NOT_FOUND, format!("no admin path {other}\n")),
        }
    }
}
