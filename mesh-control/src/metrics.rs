//! mesh-control's own metrics, under istiod's names where istiod has one (so its dashboards
//! and alerts carry over): xDS pushes and their latency, connected nodes, rejections, CA
//! signings. Served on the admin endpoint's `/metrics`.
//!
//! Cardinality: the only label is the resource type (six values) or a fixed error kind.

use std::time::Duration;

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct XdsType {
    /// The xDS type, short: `cds`, `eds`, `rds`, `lds`, `wds` (workloads), `ads` (addresses).
    pub r#type: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SignErrorLabels {
    /// `bad_token`, `bad_csr`, `identity_not_allowed`, `sign_failed`.
    pub error: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ScrapeLabels {
    /// `ok` or `failed` (unreachable, timed out, not 2xx, a page that does not parse; a node
    /// without a metrics endpoint is not scraped at all).
    pub result: String,
}

/// istiod's buckets for `pilot_proxy_convergence_time` (seconds).
const CONVERGENCE_BUCKETS: [f64; 10] = [0.1, 0.5, 1.0, 3.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0];

#[derive(Debug)]
pub struct ControlMetrics {
    pushes: Family<XdsType, Counter>,
    rejects: Family<XdsType, Counter>,
    convergence: Histogram,
    pub connected_nodes: Gauge,
    pub generation: Gauge,
    pub rejected_objects: Gauge,
    pub csr_requests: Counter,
    pub certificates_issued: Counter,
    sign_errors: Family<SignErrorLabels, Counter>,
    /// The service graph's scrapes of nodes' metrics, by result.
    graph_scrapes: Family<ScrapeLabels, Counter>,
}

impl Default for ControlMetrics {
    fn default() -> Self {
        ControlMetrics {
            pushes: Family::default(),
            rejects: Family::default(),
            convergence: Histogram::new(CONVERGENCE_BUCKETS),
            connected_nodes: Gauge::default(),
            generation: Gauge::default(),
            rejected_objects: Gauge::default(),
            csr_requests: Counter::default(),
            certificates_issued: Counter::default(),
            sign_errors: Family::default(),
            graph_scrapes: Family::default(),
        }
    }
}

impl ControlMetrics {
    /// Registers every metric in `registry`.
    pub fn register(&self, registry: &mut Registry) {
        registry.register("pilot_xds_pushes", "xDS responses sent to nodes, by type", self.pushes.clone());
        registry.register(
            "pilot_total_xds_rejects",
            "xDS responses nodes rejected (NACKed), by type",
            self.rejects.clone(),
        );
        registry.register_with_unit(
            "pilot_proxy_convergence_time",
            "Time from a config change's snapshot to its push to a node",
            prometheus_client::registry::Unit::Seconds,
            self.convergence.clone(),
        );
        registry.register("pilot_xds", "Open xDS streams from nodes", self.connected_nodes.clone());
        registry.register(
            "nodemesh_control_config_generation",
            "The newest config generation mesh-control has built",
            self.generation.clone(),
        );
        registry.register(
            "nodemesh_control_rejected_objects",
            "Objects in the sources that were rejected (see /debug/config for why)",
            self.rejected_objects.clone(),
        );
        registry.register(
            "citadel_server_csr_count",
            "Certificate signing requests received",
            self.csr_requests.clone(),
        );
        registry.register(
            "citadel_server_success_cert_issuance_count",
            "Certificates issued",
            self.certificates_issued.clone(),
        );
        registry.register(
            "citadel_server_csr_sign_err_count",
            "Certificate signing requests refused, by reason",
            self.sign_errors.clone(),
        );
        registry.register(
            "nodemesh_control_graph_scrapes",
            "The service graph's scrapes of node metrics, by result",
            self.graph_scrapes.clone(),
        );
    }

    /// A response of `type_url` went to a node, `since` its snapshot was built.
    pub fn pushed(&self, type_url: &str, since: Option<Duration>) {
        self.pushes.get_or_create(&XdsType { r#type: short_type(type_url).into() }).inc();
        if let Some(since) = since {
            self.convergence.observe(since.as_secs_f64());
        }
    }

    pub fn rejected(&self, type_url: &str) {
        self.rejects.get_or_create(&XdsType { r#type: short_type(type_url).into() }).inc();
    }

    /// A scrape of a node's metrics for the service graph.
    pub fn graph_scraped(&self, ok: bool) {
        let result = if ok { "ok" } else { "failed" };
        self.graph_scrapes.get_or_create(&ScrapeLabels { result: result.into() }).inc();
    }

    pub fn sign_error(&self, error: &'static str) {
        self.sign_errors.get_or_create(&SignErrorLabels { error: error.into() }).inc();
    }
}

/// istiod's short names for the xDS types; Nodemesh's own types by their role.
fn short_type(type_url: &str) -> &'static str {
    match type_url.rsplit('/').next().unwrap_or_default() {
        "envoy.config.cluster.v3.Cluster" => "cds",
        "envoy.config.endpoint.v3.ClusterLoadAssignment" => "eds",
        "envoy.config.route.v3.RouteConfiguration" => "rds",
        "envoy.config.listener.v3.Listener" => "lds",
        t if t.ends_with(".Workload") => "wds",
        t if t.ends_with(".Address") => "ads",
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn istiod_names() {
        let metrics = ControlMetrics::default();
        let mut registry = Registry::default();
        metrics.register(&mut registry);
        metrics
            .pushed("type.googleapis.com/envoy.config.cluster.v3.Cluster", Some(Duration::from_millis(30)));
        metrics.rejected(crate::proto::WORKLOAD_TYPE);
        metrics.sign_error("bad_csr");
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        for expected in [
            r#"pilot_xds_pushes_total{type="cds"} 1"#,
            r#"pilot_total_xds_rejects_total{type="wds"} 1"#,
            "pilot_proxy_convergence_time_seconds_bucket{le=\"0.1\"} 1",
            r#"citadel_server_csr_sign_err_count_total{error="bad_csr"} 1"#,
            "pilot_xds 0",
        ] {
            assert!(text.contains(expected), "{expected} not in\n{text}");
        }
    }
}
