//! The last minute (the window) of each node's scrapes, and the graph they give: what each
//! edge carried between a node's oldest scrape in the window and its newest. Counts are exact
//! (the difference of the node's own counters), not extrapolated; a rate is that count over
//! the time between the two scrapes, summed over nodes.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, VecDeque},
    time::{Duration, Instant},
};

use nodemesh_api::service_graph::edges::{EdgeKey, EdgeTotals, Vertex};

/// One scrape of one node, folded into edges.
pub struct Scrape {
    pub at: Instant,
    pub edges: HashMap<EdgeKey, EdgeTotals>,
}

/// Per node, its scrapes inside the window (oldest first; never fewer than the newest one).
#[derive(Default)]
pub struct Windows {
    by_node: HashMap<String, VecDeque<Scrape>>,
}

/// The graph as the page draws it (`/graph/data`).
#[derive(Debug, serde::Serialize)]
pub struct GraphView {
    /// The window asked for (`--graph-window`).
    pub window_seconds: f64,
    /// The longest time the counts below cover (shorter than the window right after a start).
    pub span_seconds: f64,
    pub vertices: Vec<VertexView>,
    pub edges: Vec<EdgeView>,
    /// Each node's last scrape: where, and why it failed.
    pub sources: Vec<SourceView>,
}

#[derive(Debug, serde::Serialize)]
pub struct VertexView {
    pub id: String,
    pub namespace: String,
    pub name: String,
    /// Empty in the app graph, and for an app without a `version` label.
    pub version: String,
}

#[derive(Debug, serde::Serialize)]
pub struct EdgeView {
    pub source: String,
    pub destination: String,
    /// `http` (requests were counted; gRPC is HTTP here) or `tcp` (only connections).
    pub protocol: &'static str,
    /// Requests (http) or connections (tcp) in the window.
    pub count: u64,
    /// Per second, over the span each node's scrapes cover.
    pub rate: f64,
    /// Errors / requests (http); 0 for tcp.
    pub error_rate: f64,
    /// p99 request duration, ms (http, with requests).
    pub p99_ms: Option<f64>,
    /// Bytes per second both ways over the edge's connections.
    pub bytes_rate: f64,
    /// `mutual_tls` (all of it), `none` (none of it) or `partial`.
    pub mtls: &'static str,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct SourceView {
    pub node: String,
    pub endpoint: Option<String>,
    /// Seconds since its last good scrape (none yet: null).
    pub age_seconds: Option<f64>,
    pub error: Option<String>,
}

impl Windows {
    /// Adds a node's newest scrape and forgets its scrapes older than `window`. Only scrapes
    /// a sixth of the window apart are kept as baselines (the newest replaces one closer to
    /// the last kept): a node's memory stays at eight scrapes whatever the interval, and the
    /// counts cover between five sixths of the window and all of it (the span says which).
    pub fn record(&mut self, node: &str, scrape: Scrape, window: Duration) {
        let scrapes = self.by_node.entry(node.to_string()).or_default();
        let spacing = window / 6;
        let len = scrapes.len();
        if len >= 2 && scrape.at.duration_since(scrapes[len - 2].at) < spacing {
            scrapes.pop_back();
        }
        scrapes.push_back(scrape);
        let newest = scrapes.back().map(|s| s.at).expect("just pushed");
        while scrapes.len() > 1 && scrapes.front().is_some_and(|s| newest.duration_since(s.at) > window) {
            scrapes.pop_front();
        }
    }

    /// Forgets nodes that are gone (not in `keep`).
    pub fn retain(&mut self, keep: &BTreeSet<String>) {
        self.by_node.retain(|node, _| keep.contains(node));
    }

    /// The graph over the window, with `sources` describing each node's scrape; one vertex
    /// per app, or (`by_version`) per version of each app (Kiali's versioned app graph).
    /// A node whose last good scrape is older than the window (unreachable since) is left
    /// out: its numbers would be old news drawn as live.
    pub fn view(
        &self,
        now: Instant,
        window: Duration,
        sources: Vec<SourceView>,
        by_version: bool,
    ) -> GraphView {
        let mut merged: BTreeMap<EdgeKey, (EdgeTotals, f64, f64)> = BTreeMap::new();
        let mut span = 0.0f64;
        for scrapes in self.by_node.values() {
            let (Some(oldest), Some(newest)) = (scrapes.front(), scrapes.back()) else { continue };
            if now.saturating_duration_since(newest.at) > window {
                continue;
            }
            let seconds = newest.at.duration_since(oldest.at).as_secs_f64();
            if seconds <= 0.0 {
                continue;
            }
            span = span.max(seconds);
            for (key, now) in &newest.edges {
                let delta = match oldest.edges.get(key) {
                    Some(then) if !now.reset_since(then) => now.minus(then),
                    // New since the oldest scrape (counters start at zero), or restarted.
                    _ => now.clone(),
                };
                let key = if by_version {
                    key.clone()
                } else {
                    EdgeKey {
                        source: key.source.clone().unversioned(),
                        destination: key.destination.clone().unversioned(),
                    }
                };
                let entry = merged.entry(key).or_default();
                entry.0.add(&delta);
                entry.1 += delta.requests.max(delta.connections) / seconds;
                entry.2 += delta.bytes / seconds;
            }
        }
        let mut vertices = BTreeSet::new();
        let mut edges = Vec::new();
        for (key, (totals, rate, bytes_rate)) in merged {
            let Some(edge) = edge_view(&key, &totals, rate, bytes_rate) else { continue };
            vertices.insert(key.source);
            vertices.insert(key.destination);
            edges.push(edge);
        }
        GraphView {
            window_seconds: window.as_secs_f64(),
            span_seconds: span,
            vertices: vertices.into_iter().map(vertex_view).collect(),
            edges,
            sources,
        }
    }
}

fn vertex_view(v: Vertex) -> VertexView {
    VertexView { id: v.id(), namespace: v.namespace, name: v.name, version: v.version }
}

/// The edge as drawn, or `None` if nothing crossed it in the window.
fn edge_view(key: &EdgeKey, t: &EdgeTotals, rate: f64, bytes_rate: f64) -> Option<EdgeView> {
    let (protocol, count, secured) = if t.requests > 0.0 {
        ("http", t.requests, t.mtls_requests)
    } else if t.connections > 0.0 || t.bytes > 0.0 {
        ("tcp", t.connections, t.mtls_connections)
    } else {
        return None;
    };
    let mtls = if count > 0.0 && secured >= count {
        "mutual_tls"
    } else if secured <= 0.0 {
        "none"
    } else {
        "partial"
    };
    Some(EdgeView {
        source: key.source.id(),
        destination: key.destination.id(),
        protocol,
        count: count.round() as u64,
        rate,
        error_rate: if t.requests > 0.0 { t.errors / t.requests } else { 0.0 },
        p99_ms: if t.requests > 0.0 { t.duration_quantile(0.99) } else { None },
        bytes_rate,
        mtls,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(from: &str, to: &str) -> EdgeKey {
        let v = |name: &str| Vertex { namespace: "shop".into(), name: name.into(), version: String::new() };
        EdgeKey { source: v(from), destination: v(to) }
    }

    fn scrape(at: Instant, requests: f64, errors: f64) -> Scrape {
        let totals = EdgeTotals { requests, errors, mtls_requests: requests, ..Default::default() };
        Scrape { at, edges: [(key("client", "web"), totals)].into() }
    }

    #[test]
    fn counts_are_the_difference_over_the_window_summed_over_nodes() {
        let t0 = Instant::now();
        let window = Duration::from_secs(10);
        let mut w = Windows::default();
        w.record("n1", scrape(t0, 100.0, 0.0), window);
        w.record("n1", scrape(t0 + Duration::from_secs(5), 120.0, 5.0), window);
        w.record("n2", scrape(t0, 0.0, 0.0), window);
        w.record("n2", scrape(t0 + Duration::from_secs(4), 20.0, 5.0), window);
        let view = w.view(t0 + Duration::from_secs(5), window, vec![], false);
        assert_eq!(view.edges.len(), 1);
        let e = &view.edges[0];
        assert_eq!((e.count, e.rate, e.error_rate, e.mtls), (40, 4.0 + 5.0, 0.25, "mutual_tls"));
        assert_eq!(view.span_seconds, 5.0);
        assert_eq!(view.vertices.len(), 2);

        // Older than the window: forgotten, so the baseline moves.
        w.record("n1", scrape(t0 + Duration::from_secs(12), 130.0, 5.0), window);
        let view = w.view(t0 + Duration::from_secs(12), window, vec![], false);
        let e = &view.edges[0];
        assert_eq!(e.count, 10 + 20, "n1 counts from its scrape at 5 s");

        // n2 not scraped for longer than the window: left out.
        let view = w.view(t0 + Duration::from_secs(15), window, vec![], false);
        assert_eq!(view.edges[0].count, 10, "only n1's requests");
    }

    #[test]
    fn a_node_keeps_a_bounded_number_of_scrapes_whatever_the_interval() {
        let t0 = Instant::now();
        let window = Duration::from_secs(60);
        let mut w = Windows::default();
        for k in 0..300u64 {
            w.record("n1", scrape(t0 + Duration::from_millis(500 * k), k as f64, 0.0), window);
        }
        let kept = &w.by_node["n1"];
        assert!(kept.len() <= 8, "{} scrapes kept", kept.len());
        let view = w.view(t0 + Duration::from_millis(500 * 299), window, vec![], false);
        assert!(view.span_seconds >= 50.0 && view.span_seconds <= 60.0, "{}", view.span_seconds);
        let e = &view.edges[0];
        assert!((e.rate - 2.0).abs() < 1e-9, "two requests a second: {}", e.rate);
        assert_eq!(e.count as f64, view.span_seconds * 2.0);
    }

    #[test]
    fn a_restarted_node_counts_from_zero_and_an_idle_edge_is_not_drawn() {
        let t0 = Instant::now();
        let window = Duration::from_secs(60);
        let mut w = Windows::default();
        w.record("n1", scrape(t0, 100.0, 0.0), window);
        w.record("n1", scrape(t0 + Duration::from_secs(2), 7.0, 0.0), window);
        assert_eq!(w.view(t0 + Duration::from_secs(2), window, vec![], false).edges[0].count, 7);

        let mut idle = Windows::default();
        idle.record("n1", scrape(t0, 100.0, 0.0), window);
        idle.record("n1", scrape(t0 + Duration::from_secs(2), 100.0, 0.0), window);
        let view = idle.view(t0 + Duration::from_secs(2), window, vec![], false);
        assert!(view.edges.is_empty() && view.vertices.is_empty());
    }
}
