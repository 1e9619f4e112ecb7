//! One node's Istio metrics folded into the graph's edges: for each (caller → callee), the
//! running totals the node has counted since it started.
//!
//! - **Who is a vertex:** an app (Istio's `app` label, else the workload's name) in its
//!   namespace, so `productpage → reviews → ratings` connects whatever workloads back each;
//!   a callee with no workload behind it (no endpoints, an external host) is its service.
//!   Callers outside the mesh are one vertex, `unknown`.
//! - **Counted once:** each request is counted by the caller's node (`reporter="source"`) and
//!   again by the serving node (`reporter="destination"`). The graph takes the source's count,
//!   and the destination's only where there is no source in the mesh to report it.
//! - **An error** is a 5xx, no response at all (code 0: reset, refused, timed out before the
//!   answer) or a gRPC call whose status is not OK.

use std::collections::HashMap;

use super::exposition::{self, Sample};

/// The metric families the graph reads.
pub const FAMILIES: [&str; 5] = [
    REQUESTS,
    DURATION_BUCKETS,
    "istio_tcp_connections_opened_total",
    "istio_tcp_sent_bytes_total",
    "istio_tcp_received_bytes_total",
];
const REQUESTS: &str = "istio_requests_total";
const DURATION_BUCKETS: &str = "istio_request_duration_milliseconds_bucket";
const UNKNOWN: &str = "unknown";

/// A vertex: an app (or service) in its namespace, and the app's version (Istio's `version`
/// label; empty when unknown); the namespace is empty for `unknown`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
pub struct Vertex {
    pub namespace: String,
    pub name: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub version: String,
}

impl Vertex {
    /// `namespace/name`, `namespace/name:version`, or `unknown`.
    pub fn id(&self) -> String {
        let app = if self.namespace.is_empty() {
            self.name.clone()
        } else {
            format!("{}/{}", self.namespace, self.name)
        };
        if self.version.is_empty() { app } else { format!("{app}:{}", self.version) }
    }

    /// The same vertex for all its versions (the app graph).
    pub fn unversioned(mut self) -> Vertex {
        self.version.clear();
        self
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
pub struct EdgeKey {
    pub source: Vertex,
    pub destination: Vertex,
}

/// What one node counted on one edge (counters since the node started).
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct EdgeTotals {
    pub requests: f64,
    pub errors: f64,
    /// Requests that travelled over mTLS (`connection_security_policy="mutual_tls"`).
    pub mtls_requests: f64,
    /// Cumulative request-duration bucket counts by upper bound (ms; `+Inf` last).
    pub duration_buckets: Buckets,
    pub connections: f64,
    pub mtls_connections: f64,
    /// Bytes both ways over the edge's TCP connections.
    pub bytes: f64,
}

/// Cumulative counts by bucket upper bound, ascending: a sorted vector (a node's page lists
/// some twenty bounds per series; a tree of them per edge per scrape cost more than the rest).
///
/// On the wire a bound of `null` is `+Inf` (JSON has no infinity).
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(from = "Vec<(Option<f64>, f64)>", into = "Vec<(Option<f64>, f64)>")]
pub struct Buckets(Vec<(f64, f64)>);

impl From<Vec<(Option<f64>, f64)>> for Buckets {
    fn from(wire: Vec<(Option<f64>, f64)>) -> Buckets {
        let mut buckets = Buckets::default();
        for (le, n) in wire {
            buckets.add(le.unwrap_or(f64::INFINITY), n);
        }
        buckets
    }
}

impl From<Buckets> for Vec<(Option<f64>, f64)> {
    fn from(buckets: Buckets) -> Self {
        buckets.0.into_iter().map(|(le, n)| (le.is_finite().then_some(le), n)).collect()
    }
}

impl Buckets {
    pub fn add(&mut self, le: f64, n: f64) {
        match self.0.binary_search_by(|(b, _)| b.total_cmp(&le)) {
            Ok(i) => self.0[i].1 += n,
            Err(i) => self.0.insert(i, (le, n)),
        }
    }

    pub fn get(&self, le: f64) -> f64 {
        self.0.binary_search_by(|(b, _)| b.total_cmp(&le)).map_or(0.0, |i| self.0[i].1)
    }

    pub fn iter(&self) -> impl DoubleEndedIterator<Item = &(f64, f64)> {
        self.0.iter()
    }
}

impl EdgeTotals {
    /// Whether a counter went down since `earlier`: the node restarted (or replaced its
    /// process in a handover), so its counts start again from zero.
    pub fn reset_since(&self, earlier: &EdgeTotals) -> bool {
        self.requests < earlier.requests
            || self.connections < earlier.connections
            || self.bytes < earlier.bytes
    }

    /// What was counted between `earlier` and `self`.
    pub fn minus(&self, earlier: &EdgeTotals) -> EdgeTotals {
        let buckets = Buckets(
            self.duration_buckets
                .iter()
                .map(|(le, n)| (*le, n - earlier.duration_buckets.get(*le)))
                .collect(),
        );
        EdgeTotals {
            requests: self.requests - earlier.requests,
            errors: self.errors - earlier.errors,
            mtls_requests: self.mtls_requests - earlier.mtls_requests,
            duration_buckets: buckets,
            connections: self.connections - earlier.connections,
            mtls_connections: self.mtls_connections - earlier.mtls_connections,
            bytes: self.bytes - earlier.bytes,
        }
    }

    pub fn add(&mut self, other: &EdgeTotals) {
        self.requests += other.requests;
        self.errors += other.errors;
        self.mtls_requests += other.mtls_requests;
        for (le, n) in other.duration_buckets.iter() {
            self.duration_buckets.add(*le, *n);
        }
        self.connections += other.connections;
        self.mtls_connections += other.mtls_connections;
        self.bytes += other.bytes;
    }

    /// The `q` quantile of request durations (ms), interpolated linearly inside its bucket as
    /// Prometheus's `histogram_quantile` does; `None` without requests. A quantile in the
    /// `+Inf` bucket is the highest finite bound.
    pub fn duration_quantile(&self, q: f64) -> Option<f64> {
        let total = self.duration_buckets.iter().next_back().map(|(_, n)| *n)?;
        if total <= 0.0 {
            return None;
        }
        let rank = q * total;
        let mut lower = (0.0, 0.0);
        for (le, count) in self.duration_buckets.iter() {
            if *count >= rank {
                if le.is_infinite() {
                    return Some(lower.0);
                }
                let in_bucket = count - lower.1;
                let fraction = if in_bucket > 0.0 { (rank - lower.1) / in_bucket } else { 1.0 };
                return Some(lower.0 + (le - lower.0) * fraction);
            }
            lower = (*le, *count);
        }
        Some(lower.0)
    }
}

/// One node's page folded into edges, sample by sample as it is parsed (no sample outlives
/// its line); an error names the line that does not parse.
pub fn fold(page: &str) -> Result<HashMap<EdgeKey, EdgeTotals>, String> {
    let mut folder = Folder::default();
    exposition::for_each_sample(page, |name| FAMILIES.contains(&name), |s| folder.add(&s))?;
    Ok(folder.finish())
}

/// The edges so far, and the run of samples of one edge being added up: a page lists a
/// series' lines together (a histogram's twenty-odd buckets), so the edge's key is made once
/// per run, not once per line.
#[derive(Default)]
struct Folder {
    edges: HashMap<EdgeKey, EdgeTotals>,
    run: Option<(EdgeKey, EdgeTotals)>,
}

impl Folder {
    fn add(&mut self, s: &Sample<'_>) {
        let Some((source, destination)) = edge_of(s) else { return };
        let same =
            self.run.as_ref().is_some_and(|(k, _)| source.is(&k.source) && destination.is(&k.destination));
        if !same {
            self.flush();
            let key = EdgeKey { source: source.owned(), destination: destination.owned() };
            self.run = Some((key, EdgeTotals::default()));
        }
        if let Some((_, totals)) = &mut self.run {
            count(totals, s);
        }
    }

    fn flush(&mut self) {
        if let Some((key, totals)) = self.run.take() {
            self.edges.entry(key).or_default().add(&totals);
        }
    }

    fn finish(mut self) -> HashMap<EdgeKey, EdgeTotals> {
        self.flush();
        self.edges
    }
}

fn count(totals: &mut EdgeTotals, s: &Sample<'_>) {
    let mtls = s.label("connection_security_policy") == "mutual_tls";
    match s.name {
        REQUESTS => {
            totals.requests += s.value;
            if is_error(s) {
                totals.errors += s.value;
            }
            if mtls {
                totals.mtls_requests += s.value;
            }
        }
        DURATION_BUCKETS => {
            let le = match s.label("le") {
                "+Inf" => f64::INFINITY,
                le => match le.parse() {
                    Ok(le) => le,
                    Err(_) => return,
                },
            };
            totals.duration_buckets.add(le, s.value);
        }
        "istio_tcp_connections_opened_total" => {
            totals.connections += s.value;
            if mtls {
                totals.mtls_connections += s.value;
            }
        }
        "istio_tcp_sent_bytes_total" | "istio_tcp_received_bytes_total" => totals.bytes += s.value,
        _ => {}
    }
}

/// A vertex as a sample names it (borrowed from the page).
struct VertexRef<'a> {
    namespace: &'a str,
    name: &'a str,
    version: &'a str,
}

impl VertexRef<'_> {
    fn is(&self, v: &Vertex) -> bool {
        self.namespace == v.namespace && self.name == v.name && self.version == v.version
    }

    fn owned(&self) -> Vertex {
        Vertex {
            namespace: self.namespace.to_string(),
            name: self.name.to_string(),
            version: self.version.to_string(),
        }
    }
}

/// The edge a sample counts for, or `None` if the other reporter counts it.
fn edge_of<'a>(s: &'a Sample<'_>) -> Option<(VertexRef<'a>, VertexRef<'a>)> {
    let source_known = known(s.label("source_workload")).is_some();
    match s.label("reporter") {
        "source" => {}
        "destination" if !source_known => {}
        _ => return None,
    }
    // A namespace Istio labels `unknown` (PassthroughCluster, BlackHoleCluster) is none.
    let namespace = |label: &str| known(s.label(label)).unwrap_or("");
    let unknown = VertexRef { namespace: "", name: UNKNOWN, version: "" };
    let source = if source_known {
        VertexRef {
            namespace: namespace("source_workload_namespace"),
            name: known(s.label("source_app")).unwrap_or(s.label("source_workload")),
            version: known(s.label("source_version")).unwrap_or(""),
        }
    } else {
        unknown
    };
    let destination = match (known(s.label("destination_app")), known(s.label("destination_service_name"))) {
        (Some(app), _) => VertexRef {
            namespace: namespace("destination_workload_namespace"),
            name: app,
            version: known(s.label("destination_version")).unwrap_or(""),
        },
        (None, Some(service)) => {
            VertexRef { namespace: namespace("destination_service_namespace"), name: service, version: "" }
        }
        (None, None) => match known(s.label("destination_workload")) {
            Some(w) => {
                VertexRef { namespace: namespace("destination_workload_namespace"), name: w, version: "" }
            }
            None => VertexRef { namespace: "", name: UNKNOWN, version: "" },
        },
    };
    Some((source, destination))
}

fn known(value: &str) -> Option<&str> {
    (!value.is_empty() && value != UNKNOWN).then_some(value)
}

fn is_error(s: &Sample<'_>) -> bool {
    let code = s.label("response_code");
    let grpc = s.label("grpc_response_status");
    code.starts_with('5') || code == "0" || (!grpc.is_empty() && grpc != "0" && grpc != "-")
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAGE: &str = r#"
istio_requests_total{reporter="source",source_workload="client-v2",source_workload_namespace="shop",source_app="client",destination_app="web",destination_workload_namespace="shop",destination_service_name="web",destination_service_namespace="shop",response_code="200",grpc_response_status="",connection_security_policy="mutual_tls"} 30
istio_requests_total{reporter="source",source_workload="client-v2",source_workload_namespace="shop",source_app="client",destination_app="web",destination_workload_namespace="shop",destination_service_name="web",destination_service_namespace="shop",response_code="503",grpc_response_status="",connection_security_policy="none"} 10
istio_requests_total{reporter="destination",source_workload="client-v2",source_workload_namespace="shop",source_app="client",destination_app="web",destination_workload_namespace="shop",destination_service_name="web",destination_service_namespace="shop",response_code="200",connection_security_policy="mutual_tls"} 30
istio_requests_total{reporter="destination",source_workload="unknown",source_workload_namespace="unknown",source_app="unknown",destination_app="web",destination_workload_namespace="shop",destination_service_name="web",destination_service_namespace="shop",response_code="200",connection_security_policy="none"} 4
istio_requests_total{reporter="source",source_workload="client-v2",source_workload_namespace="shop",source_app="client",destination_app="unknown",destination_workload_namespace="unknown",destination_service_name="nowhere",destination_service_namespace="shop",response_code="503",connection_security_policy="none"} 2
istio_requests_total{reporter="source",source_workload="client-v2",source_workload_namespace="shop",source_app="client",destination_app="greeter",destination_workload_namespace="shop",destination_service_name="greeter",destination_service_namespace="shop",response_code="200",grpc_response_status="14",connection_security_policy="mutual_tls"} 1
istio_tcp_connections_opened_total{reporter="source",source_workload="client-v2",source_workload_namespace="shop",source_app="client",destination_app="unknown",destination_workload_namespace="unknown",destination_service_name="PassthroughCluster",destination_service_namespace="unknown",connection_security_policy="none"} 3
istio_request_duration_milliseconds_bucket{reporter="source",source_workload="client-v2",source_workload_namespace="shop",source_app="client",destination_app="web",destination_workload_namespace="shop",destination_service_name="web",destination_service_namespace="shop",le="100"} 30
istio_request_duration_milliseconds_bucket{reporter="source",source_workload="client-v2",source_workload_namespace="shop",source_app="client",destination_app="web",destination_workload_namespace="shop",destination_service_name="web",destination_service_namespace="shop",le="250"} 30
istio_request_duration_milliseconds_bucket{reporter="source",source_workload="client-v2",source_workload_namespace="shop",source_app="client",destination_app="web",destination_workload_namespace="shop",destination_service_name="web",destination_service_namespace="shop",le="500"} 40
istio_request_duration_milliseconds_bucket{reporter="source",source_workload="client-v2",source_workload_namespace="shop",source_app="client",destination_app="web",destination_workload_namespace="shop",destination_service_name="web",destination_service_namespace="shop",le="+Inf"} 40
"#;

    fn unknown() -> Vertex {
        Vertex { namespace: String::new(), name: UNKNOWN.into(), version: String::new() }
    }

    fn vertex(namespace: &str, name: &str) -> Vertex {
        Vertex { namespace: namespace.into(), name: name.into(), version: String::new() }
    }

    fn edges() -> HashMap<EdgeKey, EdgeTotals> {
        fold(PAGE).unwrap()
    }

    #[test]
    fn each_request_is_counted_once_on_its_edge_between_apps() {
        let edges = edges();
        let web = &edges[&EdgeKey { source: vertex("shop", "client"), destination: vertex("shop", "web") }];
        assert_eq!((web.requests, web.errors, web.mtls_requests), (40.0, 10.0, 30.0));
        let outside = &edges[&EdgeKey { source: unknown(), destination: vertex("shop", "web") }];
        assert_eq!(outside.requests, 4.0, "callers outside the mesh: the destination's count");
        let nowhere =
            &edges[&EdgeKey { source: vertex("shop", "client"), destination: vertex("shop", "nowhere") }];
        assert_eq!(nowhere.errors, 2.0, "a service without workloads is its own vertex");
        let greeter =
            &edges[&EdgeKey { source: vertex("shop", "client"), destination: vertex("shop", "greeter") }];
        assert_eq!(greeter.errors, 1.0, "a gRPC status other than OK is an error");
        let passthrough =
            Vertex { namespace: String::new(), name: "PassthroughCluster".into(), version: String::new() };
        let out = &edges[&EdgeKey { source: vertex("shop", "client"), destination: passthrough }];
        assert_eq!(
            (out.connections, out.mtls_connections),
            (3.0, 0.0),
            "Istio's `unknown` namespace is none"
        );
        assert_eq!(edges.len(), 5);
    }

    #[test]
    fn p99_is_interpolated_inside_its_bucket_like_histogram_quantile() {
        let edges = edges();
        let web = &edges[&EdgeKey { source: vertex("shop", "client"), destination: vertex("shop", "web") }];
        // 39.6 of 40: the 9.6th of the 10 requests in (250, 500].
        let close = |got: Option<f64>, want: f64| got.is_some_and(|g| (g - want).abs() < 1e-9);
        assert!(close(web.duration_quantile(0.99), 250.0 + 250.0 * 0.96));
        assert!(close(web.duration_quantile(0.5), 100.0 * 20.0 / 30.0));
        assert_eq!(EdgeTotals::default().duration_quantile(0.99), None);
    }

    #[test]
    fn an_apps_version_is_part_of_its_vertex() {
        let page = r#"istio_requests_total{reporter="source",source_workload="productpage-v1",source_workload_namespace="shop",source_app="productpage",source_version="v1",destination_app="reviews",destination_version="v2",destination_workload_namespace="shop",destination_service_name="reviews",response_code="200"} 7
"#;
        let edges = fold(page).unwrap();
        let key = edges.keys().next().unwrap();
        assert_eq!(
            (key.source.id(), key.destination.id()),
            ("shop/productpage:v1".into(), "shop/reviews:v2".into())
        );
        assert_eq!(key.destination.clone().unversioned().id(), "shop/reviews");
    }

    #[test]
    fn a_restart_is_seen_as_counters_going_down() {
        let now = EdgeTotals { requests: 3.0, ..Default::default() };
        let before = EdgeTotals { requests: 10.0, ..Default::default() };
        assert!(now.reset_since(&before));
        assert!(!before.reset_since(&now));
        assert_eq!(before.minus(&now).requests, 7.0);
    }
}
