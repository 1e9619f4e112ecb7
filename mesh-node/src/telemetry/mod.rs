//! Metrics (Prometheus, Istio's standard names so existing dashboards work), access logs and
//! tracing.

pub mod access_log;
pub mod body;
pub mod labels;
pub mod metrics;
pub mod per_workload;
pub mod requests;
pub mod span;
pub mod span_export;
pub mod trace_context;
pub mod tracer;
