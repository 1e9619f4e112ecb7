//! A finished span, as the tracer makes it and the exporters encode it.

use std::{
    net::SocketAddr,
    time::{Duration, SystemTime},
};

use super::access_log::Side;

/// A finished span, in the terms both Zipkin and OTLP use.
#[derive(Clone, Debug)]
pub struct Span {
    pub trace_id: u128,
    pub span_id: u64,
    pub parent_id: Option<u64>,
    pub name: String,
    pub kind: Side,
    pub start: SystemTime,
    pub duration: Duration,
    /// Zipkin's local service name (OTLP's `service.name`).
    pub service: String,
    pub local: Option<SocketAddr>,
    pub remote: Option<SocketAddr>,
    pub error: bool,
    pub tags: Vec<(&'static str, String)>,
}

impl Default for Span {
    fn default() -> Span {
        Span {
            trace_id: 0,
            span_id: 0,
            parent_id: None,
            name: String::new(),
            kind: Side::Client,
            start: SystemTime::UNIX_EPOCH,
            duration: Duration::ZERO,
            service: String::new(),
            local: None,
            remote: None,
            error: false,
            tags: Vec::new(),
        }
    }
}
