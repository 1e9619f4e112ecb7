//! Metrics (Prometheus, Istio's standard names so existing dashboards work).

pub mod metrics;
