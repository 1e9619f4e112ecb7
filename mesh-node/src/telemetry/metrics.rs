//! The node proxy's metrics. Istio's `istio_tcp_*` names and label names are kept so Istio
//! dashboards and alerts work unchanged; everything Nodemesh-specific is under `nodemesh_`.

use std::sync::Arc;

use prometheus_client::{
    encoding::{EncodeLabelSet, EncodeLabelValue},
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

pub use super::labels::UNKNOWN;
use super::{
    access_log::AccessLogs,
    labels::{DestinationLabels, Naming, ServiceLabels, Shared, SourceLabels},
    tracer::Tracers,
};

/// Istio's buckets for `istio_request_duration_milliseconds`.
const DURATION_BUCKETS_MS: [f64; 19] = [
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0, 60000.0,
    300000.0, 600000.0, 1800000.0, 3600000.0,
];

fn duration_histogram() -> Histogram {
    Histogram::new(DURATION_BUCKETS_MS)
}

/// Istio's buckets for `istio_request_bytes` / `istio_response_bytes`: 1 B to 1 GB by tens.
fn size_histogram() -> Histogram {
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(1.0, 10.0, 10))
}

/// Who reported, between which two workloads, for which Service: the part of its labels
/// every Istio series has.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Parties {
    pub reporter: Reporter,
    #[prometheus(flatten)]
    pub source: Shared<SourceLabels>,
    #[prometheus(flatten)]
    pub destination: Shared<DestinationLabels>,
    #[prometheus(flatten)]
    pub service: Shared<ServiceLabels>,
}

/// Labels of one HTTP request: Istio's standard set, from either reporter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    #[prometheus(flatten)]
    pub parties: Parties,
    pub request_protocol: RequestProtocol,
    pub response_code: u16,
    /// The gRPC status (from the answer's headers or trailers); empty for plain HTTP.
    pub grpc_response_status: Option<u32>,
    /// Envoy's response flags (`-`: none): why the proxy answered itself, or how the
    /// exchange ended.
    pub response_flags: &'static str,
    pub connection_security_policy: SecurityPolicy,
}

/// Labels of one TCP connection: Istio's standard set, from either reporter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConnectionLabels {
    #[prometheus(flatten)]
    pub parties: Parties,
    pub request_protocol: RequestProtocol,
    pub response_flags: &'static str,
    pub connection_security_policy: SecurityPolicy,
}

impl ConnectionLabels {
    /// A TCP connection from `source` to `destination` (of `service`).
    pub fn tcp(
        reporter: Reporter,
        source: Arc<SourceLabels>,
        destination: Arc<DestinationLabels>,
        service: Arc<ServiceLabels>,
        security: SecurityPolicy,
    ) -> ConnectionLabels {
        ConnectionLabels {
            parties: Parties {
                reporter,
                source: Shared(source),
                destination: Shared(destination),
                service: Shared(service),
            },
            request_protocol: RequestProtocol::tcp,
            response_flags: NO_FLAGS,
            connection_security_policy: security,
        }
    }
}

/// Envoy's "no flags".
pub const NO_FLAGS: &str = "-";

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types, reason = "label values are Istio's lowercase words")]
pub enum RequestProtocol {
    tcp,
    http,
    grpc,
}

/// How the connection between the two workloads was secured.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types, reason = "label values are Istio's lowercase words")]
pub enum SecurityPolicy {
    /// Through the mTLS tunnel, or delivered between two meshed pods of one node, where
    /// mesh-node proves both identities itself (the case STRICT accepts; see ARCHITECTURE.md).
    mutual_tls,
    /// Plaintext: a peer outside the mesh, or a DestinationRule with `tls.mode: DISABLE`.
    none,
}

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types, reason = "label values are Istio's lowercase words")]
pub enum Reporter {
    source,
    destination,
}

/// Why a captured connection could not be proxied.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FailureLabels {
    pub source_workload: String,
    pub source_workload_namespace: String,
    pub reason: FailureReason,
}

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types, reason = "label values are lowercase words")]
pub enum FailureReason {
    /// The listener accepted a connection capture did not redirect (someone dialled it).
    no_original_destination,
    upstream_connect_refused,
    upstream_connect_timeout,
    upstream_connect_error,
    /// REGISTRY_ONLY egress and no Service/ServiceEntry/workload owns the destination.
    egress_not_in_registry,
    /// A Service port whose cluster has no endpoints (or none that accepted).
    no_healthy_endpoint,
    /// The cluster's connectionPool `tcp.maxConnections` are open.
    upstream_overflow,
}

/// One denied egress destination (REGISTRY_ONLY): the metric names what was blocked.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EgressDeniedLabels {
    pub source_workload: String,
    pub source_workload_namespace: String,
    /// `ip:port` the workload dialled.
    pub destination: String,
    pub reason: String,
}

/// A connection (or request) to a workload of this node that its policy refused.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct InboundDeniedLabels {
    pub destination_workload: String,
    pub destination_workload_namespace: String,
    /// `mtls_required` (plaintext under PeerAuthentication STRICT), …
    pub reason: String,
    /// The policy that decided, `namespace/name`, when one did.
    pub policy: String,
}

/// A request refused by a local rate limit.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RateLimitedLabels {
    /// `<namespace>/<policy>/<limit>`.
    pub limit: String,
    /// `client` (the caller's bucket) or `server` (the serving pod's).
    pub side: String,
    pub source_workload: String,
    pub source_workload_namespace: String,
}

/// Counters for one connection, resolved once at accept so the data path only does atomics.
#[derive(Clone, Debug)]
pub struct ConnectionCounters {
    pub sent: Counter,
    pub received: Counter,
    closed: Counter,
}

impl ConnectionCounters {
    pub fn closed(&self) {
        self.closed.inc();
    }
}

#[derive(Debug)]
pub struct Metrics {
    opened: Family<ConnectionLabels, Counter>,
    requests: Family<RequestLabels, Counter>,
    durations: Family<RequestLabels, Histogram, fn() -> Histogram>,
    request_sizes: Family<RequestLabels, Histogram, fn() -> Histogram>,
    response_sizes: Family<RequestLabels, Histogram, fn() -> Histogram>,
    closed: Family<ConnectionLabels, Counter>,
    sent: Family<ConnectionLabels, Counter>,
    received: Family<ConnectionLabels, Counter>,
    failures: Family<FailureLabels, Counter>,
    egress_denied: Family<EgressDeniedLabels, Counter>,
    rate_limited: Family<RateLimitedLabels, Counter>,
    inbound_denied: Family<InboundDeniedLabels, Counter>,
    /// mTLS connections this node's tunnel server accepted (handshake done, both identities
    /// proven): how often clients had to open a new one, e.g. after certificate renewal.
    pub tunnel_connections_accepted: Counter,
    pub meshed_workloads: Gauge,
    /// The trust domain and cluster that peers' labels name.
    pub naming: Naming,
    /// Which workloads are access-logged, and the writers (their dropped lines counted here).
    pub access_logs: Arc<AccessLogs>,
    /// Which workloads are traced, and the span exporters (their spans counted here).
    pub tracers: Arc<Tracers>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            opened: Family::default(),
            requests: Family::default(),
            durations: Family::new_with_constructor(duration_histogram),
            request_sizes: Family::new_with_constructor(size_histogram),
            response_sizes: Family::new_with_constructor(size_histogram),
            closed: Family::default(),
            sent: Family::default(),
            received: Family::default(),
            failures: Family::default(),
            egress_denied: Family::default(),
            rate_limited: Family::default(),
            inbound_denied: Family::default(),
            tunnel_connections_accepted: Counter::default(),
            meshed_workloads: Gauge::default(),
            naming: Naming::default(),
            access_logs: Arc::default(),
            tracers: Arc::default(),
        }
    }
}

impl Metrics {
    pub fn new(registry: &mut Registry, naming: Naming) -> Metrics {
        let m = Metrics { naming, ..Metrics::default() };
        registry.register("istio_requests", "HTTP and gRPC requests", m.requests.clone());
        registry.register(
            "nodemesh_access_log_dropped_lines",
            "Access-log lines dropped because their writer fell behind",
            m.access_logs.dropped.clone(),
        );
        registry.register(
            "nodemesh_spans_dropped",
            "Spans dropped: their exporter's queue was full or the collector did not take them",
            m.tracers.dropped.clone(),
        );
        registry.register(
            "nodemesh_spans_exported",
            "Spans a collector accepted",
            m.tracers.exported.clone(),
        );
        registry.register(
            "istio_request_duration_milliseconds",
            "Time from a request's arrival at the proxy to the last byte of its answer",
            m.durations.clone(),
        );
        registry.register("istio_request_bytes", "HTTP request body sizes", m.request_sizes.clone());
        registry.register("istio_response_bytes", "HTTP response body sizes", m.response_sizes.clone());
        registry.register(
            "istio_tcp_connections_opened",
            "TCP connections opened through the node proxy",
            m.opened.clone(),
        );
        registry.register(
            "istio_tcp_connections_closed",
            "TCP connections closed through the node proxy",
            m.closed.clone(),
        );
        registry.register(
            "istio_tcp_sent_bytes",
            "Bytes sent by the source workload to the destination",
            m.sent.clone(),
        );
        registry.register(
            "istio_tcp_received_bytes",
            "Bytes received by the source workload from the destination",
            m.received.clone(),
        );
        registry.register(
            "nodemesh_proxy_failures",
            "Captured connections the proxy could not complete, by reason",
            m.failures.clone(),
        );
        registry.register(
            "nodemesh_egress_denied",
            "Connections refused by outboundTrafficPolicy REGISTRY_ONLY, by destination",
            m.egress_denied.clone(),
        );
        registry.register(
            "nodemesh_rate_limited_requests",
            "HTTP requests answered 429 by a RateLimitPolicy limit",
            m.rate_limited.clone(),
        );
        registry.register(
            "nodemesh_inbound_denied",
            "Connections and requests to this node's workloads refused by their policy",
            m.inbound_denied.clone(),
        );
        registry.register(
            "nodemesh_tunnel_connections_accepted",
            "mTLS tunnel connections (HBONE, port 15008) this node accepted from other nodes",
            m.tunnel_connections_accepted.clone(),
        );
        registry.register(
            "nodemesh_meshed_workloads",
            "Workloads whose traffic this node currently captures",
            m.meshed_workloads.clone(),
        );
        m
    }

    /// Counts the connection as opened and returns its counters.
    pub fn connection_opened(&self, labels: &ConnectionLabels) -> ConnectionCounters {
        self.opened.get_or_create(labels).inc();
        ConnectionCounters {
            sent: self.sent.get_or_create(labels).clone(),
            received: self.received.get_or_create(labels).clone(),
            closed: self.closed.get_or_create(labels).clone(),
        }
    }

    /// One HTTP request answered (by the upstream or the proxy) in full after `ms`
    /// milliseconds, with bodies of `request_bytes` and `response_bytes`.
    pub fn request(&self, labels: &RequestLabels, ms: f64, request_bytes: u64, response_bytes: u64) {
        self.requests.get_or_create(labels).inc();
        self.durations.get_or_create(labels).observe(ms);
        self.request_sizes.get_or_create(labels).observe(request_bytes as f64);
        self.response_sizes.get_or_create(labels).observe(response_bytes as f64);
    }

    pub fn failure(&self, labels: &FailureLabels) {
        self.failures.get_or_create(labels).inc();
    }

    pub fn egress_denied(&self, labels: &EgressDeniedLabels) {
        self.egress_denied.get_or_create(labels).inc();
    }

    pub fn rate_limited(&self, labels: &RateLimitedLabels) {
        self.rate_limited.get_or_create(labels).inc();
    }

    pub fn inbound_denied(&self, labels: &InboundDeniedLabels) {
        self.inbound_denied.get_or_create(labels).inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn istio_names_and_labels_are_exported() {
        use crate::telemetry::labels::Peer;
        let mut registry = Registry::default();
        let metrics = Metrics::new(&mut registry, Naming::default());
        let web = Peer::new("shop", "web", Some("web-sa"), None, &metrics.naming);
        let labels = ConnectionLabels::tcp(
            Reporter::source,
            web.as_source(),
            Peer::unknown().as_destination(),
            ServiceLabels::of("db.shop.svc.cluster.local", "shop"),
            SecurityPolicy::none,
        );
        let c = metrics.connection_opened(&labels);
        c.sent.inc_by(5);
        c.closed();
        let request = RequestLabels {
            parties: Parties {
                reporter: Reporter::destination,
                source: Shared(web.as_source()),
                destination: Shared(web.as_destination()),
                service: Shared(ServiceLabels::of("web.shop.svc.cluster.local", "shop")),
            },
            request_protocol: RequestProtocol::grpc,
            response_code: 200,
            grpc_response_status: Some(0),
            response_flags: NO_FLAGS,
            connection_security_policy: SecurityPolicy::mutual_tls,
        };
        metrics.request(&request, 3.0, 10, 2000);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        assert!(text.contains(
            r#"istio_tcp_connections_opened_total{reporter="source",source_workload="web",source_workload_namespace="shop",source_principal="spiffe://cluster.local/ns/shop/sa/web-sa",source_app="unknown",source_version="unknown",source_canonical_service="web",source_canonical_revision="latest",source_cluster="Kubernetes",destination_workload="unknown",destination_workload_namespace="unknown",destination_principal="unknown",destination_app="unknown",destination_version="unknown",destination_canonical_service="unknown",destination_canonical_revision="unknown",destination_cluster="unknown",destination_service="db.shop.svc.cluster.local",destination_service_name="db",destination_service_namespace="shop",request_protocol="tcp",response_flags="-",connection_security_policy="none"} 1"#
        ), "{text}");
        assert!(text.contains("istio_tcp_sent_bytes_total{"), "{text}");
        assert!(text.contains("istio_tcp_connections_closed_total{"), "{text}");
        assert!(text.contains(r#"request_protocol="grpc",response_code="200",grpc_response_status="0",response_flags="-",connection_security_policy="mutual_tls"} 1"#), "{text}");
        assert!(text.contains("istio_response_bytes_sum{reporter=\"destination\""), "{text}");
        assert!(text.contains("istio_request_bytes_count{reporter=\"destination\""), "{text}");
    }
}
