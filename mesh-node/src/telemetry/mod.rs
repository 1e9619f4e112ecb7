//! Metrics (Prometheus, Istio's standard names so existing dashboards work).

pub mod body;
pub mod labels;
pub mod metrics;
pub mod requests;
