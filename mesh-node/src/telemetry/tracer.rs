//! Tracing: which workloads of this node trace their requests and where their spans go (from
//! their control-plane records, switched at runtime), the sampling decision, and the span
//! each proxied request gets — a CLIENT span at the caller's node, a SERVER span where it is
//! served — exported in batches by [`super::span_export`].

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Instant, SystemTime},
};

use hyper::{Request, header};
use nodemesh_api::proto::mesh;
use prometheus_client::metrics::counter::Counter;

use super::{
    access_log::Side,
    per_workload::PerWorkload,
    span::Span,
    span_export::{Exporter, ExporterKey},
    trace_context::{TraceContext, new_span_id, new_trace_id},
};

/// Istio's default longest tag value.
const DEFAULT_MAX_TAG_LENGTH: usize = 256;

/// Every traced workload of this node and the exporters their spans go to.
#[derive(Default)]
pub struct Tracers {
    by_workload: PerWorkload<WorkloadTracer>,
    exporters: Mutex<HashMap<ExporterKey, Arc<Exporter>>>,
    /// Spans dropped because an exporter's queue was full (`nodemesh_spans_dropped`).
    pub dropped: Counter,
    /// Spans a collector accepted (`nodemesh_spans_exported`).
    pub exported: Counter,
}

impl std::fmt::Debug for Tracers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let traced = self.by_workload.len();
        f.debug_struct("Tracers").field("traced_workloads", &traced).finish_non_exhaustive()
    }
}

/// One workload's tracing.
pub struct WorkloadTracer {
    /// 0.0–1.0: the share of undecided requests that are sampled.
    sampling: f64,
    max_tag_length: usize,
    /// `None`: headers are propagated, no span is sent (disableSpanReporting).
    exporter: Option<Arc<Exporter>>,
}

impl Tracers {
    /// The tracing of workload `uid` (`namespace/name`), if it is traced.
    pub fn for_workload(&self, uid: &str) -> Option<Arc<WorkloadTracer>> {
        self.by_workload.get(uid)
    }

    /// Checks the tracing of `workloads` without changing anything: an `Err` names the
    /// workload and what is wrong.
    pub fn compile(
        &self,
        workloads: &[mesh::Workload],
    ) -> Result<Vec<(String, Option<WorkloadTracer>)>, String> {
        workloads
            .iter()
            .map(|w| {
                let Some(t) = &w.tracing else { return Ok((w.uid.clone(), None)) };
                let at = |e: String| format!("Workload {}: tracing provider `{}`: {e}", w.uid, t.provider);
                if !(0.0..=100.0).contains(&t.sampling_percent) {
                    return Err(at(format!("sampling {}% is not within 0-100", t.sampling_percent)));
                }
                let key = ExporterKey::of(t).map_err(at)?;
                let exporter = (!t.reporting_disabled).then(|| self.exporter(key));
                let max_tag_length =
                    if t.max_tag_length == 0 { DEFAULT_MAX_TAG_LENGTH } else { t.max_tag_length as usize };
                Ok((
                    w.uid.clone(),
                    Some(WorkloadTracer { sampling: t.sampling_percent / 100.0, max_tag_length, exporter }),
                ))
            })
            .collect()
    }

    /// Applies compiled tracing and removes that of `removed` workloads.
    pub fn apply(&self, compiled: Vec<(String, Option<WorkloadTracer>)>, removed: &[String]) {
        self.by_workload.apply(compiled, removed);
    }

    /// The exporter for `key`, started on first use and kept for the process's life.
    fn exporter(&self, key: ExporterKey) -> Arc<Exporter> {
        let mut exporters = self.exporters.lock().expect("exporters lock");
        let exporter = exporters
            .entry(key.clone())
            .or_insert_with(|| Exporter::start(key, self.dropped.clone(), self.exported.clone()));
        Arc::clone(exporter)
    }
}

impl WorkloadTracer {
    /// Joins `request` to its trace (or starts one): decides sampling where the request did
    /// not, writes the context of a new span for the next hop into its headers, and returns
    /// that span if it is sampled and reported.
    pub fn start<B>(self: &Arc<Self>, request: &mut Request<B>, kind: Side) -> Option<ActiveSpan> {
        let context = TraceContext::extract(request.headers());
        let sampled = context.sampled.unwrap_or_else(|| fastrand::f64() < self.sampling);
        let trace_id = if context.trace_id == 0 { new_trace_id() } else { context.trace_id };
        let span_id = new_span_id();
        context.inject(request.headers_mut(), trace_id, span_id, sampled);
        if !sampled {
            return None;
        }
        Some(ActiveSpan {
            tracer: Arc::clone(self),
            span: Span {
                trace_id,
                span_id,
                parent_id: context.parent_span_id,
                kind,
                start: SystemTime::now(),
                tags: request_tags(request, self.max_tag_length),
                ..Span::default()
            },
            began: Instant::now(),
        })
    }
}

/// Envoy's request tags, as Istio's spans carry them.
fn request_tags<B>(request: &Request<B>, max: usize) -> Vec<(&'static str, String)> {
    let header = |name: &str| request.headers().get(name).and_then(|v| v.to_str().ok()).unwrap_or("-");
    let authority = request.uri().authority().map(|a| a.as_str()).unwrap_or_else(|| header("host"));
    let path = request.uri().path_and_query().map_or("/", |p| p.as_str());
    let protocol = match request.version() {
        hyper::Version::HTTP_10 => "HTTP/1.0",
        hyper::Version::HTTP_2 => "HTTP/2",
        _ => "HTTP/1.1",
    };
    let mut tags = vec![
        ("component", "proxy".to_string()),
        ("guid:x-request-id", header("x-request-id").to_string()),
        ("http.url", format!("http://{authority}{path}")),
        ("http.method", request.method().as_str().to_string()),
        ("http.protocol", protocol.to_string()),
        ("user_agent", header(header::USER_AGENT.as_str()).to_string()),
        ("downstream_cluster", header("x-envoy-downstream-service-cluster").to_string()),
    ];
    for (_, v) in &mut tags {
        truncate(v, max);
    }
    tags
}

fn truncate(value: &mut String, max: usize) {
    if value.len() > max {
        let mut end = max;
        while !value.is_char_boundary(end) {
            end -= 1;
        }
        value.truncate(end);
    }
}

/// A span in progress: finished when its request's answer ends.
#[derive(Clone)]
pub struct ActiveSpan {
    tracer: Arc<WorkloadTracer>,
    span: Span,
    began: Instant,
}

/// What is known of a request when its answer has ended.
pub struct Outcome<'a> {
    /// `<host>:<port>/*`, as Istio names a proxy's spans.
    pub name: String,
    /// `<canonical service>.<namespace>` of the workload this span is for.
    pub service: String,
    pub status: u16,
    pub flags: &'static str,
    pub grpc_status: Option<u32>,
    pub request_bytes: u64,
    pub response_bytes: u64,
    pub upstream: Option<SocketAddr>,
    pub upstream_cluster: &'a str,
    pub peer: Option<SocketAddr>,
    /// Istio's workload tags: namespace, canonical service and revision, cluster, mesh.
    pub istio: [(&'static str, &'a str); 4],
}

impl ActiveSpan {
    /// Completes the span with the request's outcome and queues it for export.
    pub fn finish(mut self, outcome: Outcome<'_>) {
        let Some(exporter) = &self.tracer.exporter else { return };
        let span = &mut self.span;
        span.duration = self.began.elapsed();
        span.name = outcome.name;
        span.service = outcome.service;
        span.local = outcome.upstream.filter(|_| span.kind == Side::Server);
        span.remote = match span.kind {
            Side::Client => outcome.upstream,
            Side::Server => outcome.peer,
        };
        span.error = outcome.status >= 500 || outcome.status == 0;
        let mut more = vec![
            ("http.status_code", outcome.status.to_string()),
            ("response_flags", outcome.flags.to_string()),
            ("request_size", outcome.request_bytes.to_string()),
            ("response_size", outcome.response_bytes.to_string()),
            ("upstream_cluster", outcome.upstream_cluster.to_string()),
            ("upstream_cluster.name", outcome.upstream_cluster.to_string()),
        ];
        if let Some(peer) = outcome.peer {
            more.push(("peer.address", peer.ip().to_string()));
        }
        if let Some(status) = outcome.grpc_status {
            more.push(("grpc.status_code", status.to_string()));
        }
        if span.error {
            more.push(("error", "true".to_string()));
        }
        more.extend(outcome.istio.iter().map(|(k, v)| (*k, (*v).to_string())));
        for (_, v) in &mut more {
            truncate(v, self.tracer.max_tag_length);
        }
        span.tags.extend(more);
        exporter.send(self.span);
    }
}
