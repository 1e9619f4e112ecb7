//! The live service graph on mesh-control's admin endpoint (`/graph`, data at `/graph/data`).
//!
//! mesh-control scrapes every connected node's metrics endpoint (the port a node announces in
//! its xDS metadata, at the address its stream comes from) on an interval for the edges the
//! node's Istio metrics give (`/graph/edges`, folded by the node; an older node's `/metrics`
//! page, folded here), and keeps a window of scrapes per node. The page
//! polls the data and draws each edge with its request rate, error rate, p99 and mTLS. It
//! reads the same counters Prometheus would, so the graph and a dashboard agree; it needs no
//! Prometheus to run.
//!
//! - [`nodemesh_api::service_graph`]: a node's metrics → per-edge totals (each node serves
//!   its own at `/graph/edges`).
//! - [`window`]: the scrapes in the window → the graph.
//! - [`scrape`]: fetching a node's edges.

mod scrape;
pub mod window;

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use futures::StreamExt;

use crate::xds::nodes::Nodes;
use window::{GraphView, Scrape, SourceView, Windows};

/// The page itself: one self-contained file (SVG drawn by a small script, no external assets).
pub const PAGE: &str = include_str!("page.html");

/// How often and over how long.
#[derive(Clone, Copy, Debug)]
pub struct GraphSettings {
    pub scrape_interval: Duration,
    pub window: Duration,
}

/// Nodes scraped at once; a cluster of thousands is walked in slices this wide. Each page in
/// flight is held whole (a busy node's is several MiB), so this bounds that memory too.
const CONCURRENT_SCRAPES: usize = 8;
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(3);

pub struct ServiceGraph {
    nodes: Arc<Nodes>,
    settings: GraphSettings,
    windows: Mutex<Windows>,
    /// Per node, how its last scrape went.
    sources: Mutex<BTreeMap<String, SourceState>>,
}

#[derive(Default)]
struct SourceState {
    endpoint: Option<std::net::SocketAddr>,
    last_good: Option<Instant>,
    error: Option<String>,
}

impl ServiceGraph {
    pub fn new(nodes: Arc<Nodes>, settings: GraphSettings) -> ServiceGraph {
        ServiceGraph { nodes, settings, windows: Mutex::default(), sources: Mutex::default() }
    }

    /// Scrapes forever, every `scrape_interval`.
    pub async fn run(self: Arc<Self>) {
        let mut ticks = tokio::time::interval(self.settings.scrape_interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            self.scrape_all().await;
        }
    }

    async fn scrape_all(&self) {
        let connected: Vec<_> = self.nodes.list().into_iter().filter(|n| n.connected).collect();
        let names: BTreeSet<String> = connected.iter().map(|n| n.node.clone()).collect();
        self.windows.lock().expect("graph lock").retain(&names);
        self.sources.lock().expect("graph lock").retain(|n, _| names.contains(n));
        let results: Vec<_> = futures::stream::iter(connected)
            .map(|n| async move {
                let result = match n.metrics_endpoint {
                    Some(endpoint) => scrape::fetch(endpoint, SCRAPE_TIMEOUT).await,
                    None => Err("no metrics endpoint: the node runs without --metrics-addr".into()),
                };
                (n.node, n.metrics_endpoint, Instant::now(), result)
            })
            .buffer_unordered(CONCURRENT_SCRAPES)
            .collect()
            .await;
        for (node, endpoint, at, result) in results {
            if endpoint.is_some() {
                self.nodes.metrics.graph_scraped(result.is_ok());
            }
            let mut sources = self.sources.lock().expect("graph lock");
            let state = sources.entry(node.clone()).or_default();
            state.endpoint = endpoint;
            match result {
                Ok(edges) => {
                    state.last_good = Some(at);
                    state.error = None;
                    self.windows.lock().expect("graph lock").record(
                        &node,
                        Scrape { at, edges },
                        self.settings.window,
                    );
                }
                Err(e) => {
                    tracing::debug!(node, "service graph: scrape failed: {e}");
                    state.error = Some(e);
                }
            }
        }
    }

    /// The graph now (what `/graph/data` answers; `?versions=true`: `by_version`).
    pub fn view(&self, by_version: bool) -> GraphView {
        let now = Instant::now();
        let sources = self
            .sources
            .lock()
            .expect("graph lock")
            .iter()
            .map(|(node, s)| SourceView {
                node: node.clone(),
                endpoint: s.endpoint.map(|e| e.to_string()),
                age_seconds: s.last_good.map(|t| now.duration_since(t).as_secs_f64()),
                error: s.error.clone(),
            })
            .collect();
        self.windows.lock().expect("graph lock").view(now, self.settings.window, sources, by_version)
    }
}
