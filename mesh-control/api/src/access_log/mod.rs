//! Access logs as Istio configures them (Telemetry `accessLogging`, MeshConfig providers) and
//! Envoy writes them: what one log line knows ([`Record`]), the filter expression
//! ([`filter`]), the format ([`format`]). Both sides use this: mesh-control checks a Telemetry
//! or MeshConfig with exactly the code a node later runs, so what it accepts a node accepts.

pub mod filter;
pub mod format;

use std::{
    net::SocketAddr,
    sync::OnceLock,
    time::{Duration, SystemTime},
};

pub use filter::Filter;
pub use format::Template;

use crate::proto::mesh;

/// One request (or TCP connection) as a log line sees it. Optional facts are empty strings or
/// `None`, printed as Envoy prints them: `-`.
#[derive(Clone, Debug)]
pub struct Record {
    pub start_time: SystemTime,
    pub duration: Duration,
    /// `None`: a TCP connection.
    pub request: Option<RequestFacts>,
    /// 0 for a TCP connection.
    pub response_code: u16,
    pub grpc_status: Option<u32>,
    /// Envoy's flags (`NR`, `UH`, `RL`, …) or `-`.
    pub response_flags: &'static str,
    /// Envoy's `%RESPONSE_CODE_DETAILS%`: `via_upstream`, `route_not_found`,
    /// `rbac_access_denied_matched_policy[…]`, …
    pub response_code_details: String,
    pub connection_termination_details: String,
    pub upstream_transport_failure_reason: String,
    pub bytes_received: u64,
    pub bytes_sent: u64,
    pub upstream_host: Option<SocketAddr>,
    /// Istio's cluster name: `outbound|<port>||<host>` at the client, `inbound|<port>||` at
    /// the server.
    pub upstream_cluster: String,
    pub upstream_local: Option<SocketAddr>,
    /// What the client dialled (a Service VIP at the client's node, the pod at the server's).
    pub downstream_local: Option<SocketAddr>,
    pub downstream_remote: Option<SocketAddr>,
    pub source_principal: String,
    pub destination_principal: String,
    pub requested_server_name: String,
    pub route_name: String,
    pub mtls: bool,
    /// Response headers a format or filter reads, lowercase names.
    pub response_headers: Vec<(String, String)>,
}

impl Default for Record {
    fn default() -> Record {
        Record {
            start_time: SystemTime::UNIX_EPOCH,
            duration: Duration::ZERO,
            request: None,
            response_code: 0,
            grpc_status: None,
            response_flags: "-",
            response_code_details: String::new(),
            connection_termination_details: String::new(),
            upstream_transport_failure_reason: String::new(),
            bytes_received: 0,
            bytes_sent: 0,
            upstream_host: None,
            upstream_cluster: String::new(),
            upstream_local: None,
            downstream_local: None,
            downstream_remote: None,
            source_principal: String::new(),
            destination_principal: String::new(),
            requested_server_name: String::new(),
            route_name: String::new(),
            mtls: false,
            response_headers: Vec::new(),
        }
    }
}

/// The request line and the request headers a format or filter reads.
#[derive(Clone, Debug, Default)]
pub struct RequestFacts {
    pub method: String,
    /// Path and query, as sent.
    pub path: String,
    /// `HTTP/1.1`, `HTTP/2`, …
    pub protocol: &'static str,
    pub authority: String,
    /// Lowercase names.
    pub headers: Vec<(String, String)>,
}

impl Record {
    pub fn request_header(&self, name: &str) -> Option<&str> {
        let headers = &self.request.as_ref()?.headers;
        headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }

    pub fn response_header(&self, name: &str) -> Option<&str> {
        self.response_headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }
}

/// Envoy's `%START_TIME%`: RFC 3339, UTC, milliseconds.
pub fn start_time(at: SystemTime) -> String {
    match jiff::Timestamp::try_from(at) {
        Ok(ts) => ts.strftime("%Y-%m-%dT%H:%M:%S%.3fZ").to_string(),
        Err(_) => "-".into(),
    }
}

/// `%HOSTNAME%`: this machine's name (the node's, for mesh-node on the host network).
fn hostname() -> &'static str {
    static NAME: OnceLock<String> = OnceLock::new();
    NAME.get_or_init(|| {
        std::fs::read_to_string("/proc/sys/kernel/hostname").map(|s| s.trim().to_string()).unwrap_or_default()
    })
}

/// How lines are written: a text template, or JSON with one template per key.
#[derive(Clone, Debug, PartialEq)]
pub enum Encoding {
    Text(Template),
    Json(Vec<(String, Template)>),
}

/// One provider's access log for one workload, checked and ready.
#[derive(Clone, Debug, PartialEq)]
pub struct LogSpec {
    pub provider: String,
    /// `/dev/stdout`, `/dev/stderr` or a file.
    pub path: String,
    pub encoding: Encoding,
    pub filter: Option<Filter>,
    pub client: bool,
    pub server: bool,
}

impl LogSpec {
    /// Checks one `AccessLog` of a Workload; errors name the provider and the field.
    pub fn compile(log: &mesh::AccessLog) -> Result<LogSpec, String> {
        let at = |field: &str, e: String| format!("access log provider `{}`: {field}: {e}", log.provider);
        if log.path.is_empty() {
            return Err(at("path", "empty".into()));
        }
        let encoding = if log.json {
            let mut labels: Vec<(String, Template)> = if log.labels.is_empty() {
                format::ISTIO_JSON
                    .iter()
                    .map(|(k, v)| Ok(((*k).to_string(), Template::parse(v)?)))
                    .collect::<Result<_, String>>()
                    .map_err(|e| at("labels", e))?
            } else {
                log.labels
                    .iter()
                    .map(|(k, v)| {
                        Template::parse(v).map(|t| (k.clone(), t)).map_err(|e| at(&format!("labels.{k}"), e))
                    })
                    .collect::<Result<_, _>>()?
            };
            labels.sort_by(|a, b| a.0.cmp(&b.0));
            Encoding::Json(labels)
        } else {
            let text = if log.text.is_empty() { format::ISTIO_TEXT } else { &log.text };
            Encoding::Text(Template::parse(text).map_err(|e| at("text", e))?)
        };
        let filter = if log.filter.is_empty() {
            None
        } else {
            Some(
                Filter::parse(&log.filter)
                    .map_err(|e| at("filter.expression", format!("`{}`: {e}", log.filter)))?,
            )
        };
        let (client, server) = match mesh::access_log::Mode::try_from(log.mode) {
            Ok(mesh::access_log::Mode::ClientAndServer) => (true, true),
            Ok(mesh::access_log::Mode::Client) => (true, false),
            Ok(mesh::access_log::Mode::Server) => (false, true),
            Err(_) => return Err(at("mode", format!("{} is not a mode", log.mode))),
        };
        Ok(LogSpec {
            provider: log.provider.clone(),
            path: log.path.clone(),
            encoding,
            filter,
            client,
            server,
        })
    }

    /// The line for `record` (ending in a newline), or `None` when the filter says no.
    pub fn line(&self, record: &Record) -> Option<String> {
        if self.filter.as_ref().is_some_and(|f| !f.matches(record)) {
            return None;
        }
        let mut line = String::with_capacity(256);
        match &self.encoding {
            Encoding::Text(t) => {
                t.render(record, &mut line);
                if !line.ends_with('\n') {
                    line.push('\n');
                }
            }
            Encoding::Json(labels) => {
                let object: serde_json::Map<String, serde_json::Value> =
                    labels.iter().map(|(k, t)| (k.clone(), t.json(record))).collect();
                line = serde_json::Value::Object(object).to_string();
                line.push('\n');
            }
        }
        Some(line)
    }

    /// The request and response headers its format and filter read.
    pub fn headers(&self) -> (Vec<String>, Vec<String>) {
        let (mut request, mut response) = self.filter.as_ref().map(Filter::headers).unwrap_or_default();
        let templates: Vec<&Template> = match &self.encoding {
            Encoding::Text(t) => vec![t],
            Encoding::Json(labels) => labels.iter().map(|(_, t)| t).collect(),
        };
        for t in templates {
            let (req, resp) = t.headers();
            request.extend(req);
            response.extend(resp);
        }
        request.sort();
        request.dedup();
        response.sort();
        response.dedup();
        (request, response)
    }
}
