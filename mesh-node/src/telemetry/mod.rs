//! Metrics (Prometheus, Istio's standard names so existing dashboards work).

pub mod access_log;
pub mod body;
pub mod labels;
pub mod metrics;
pub mod requests;
