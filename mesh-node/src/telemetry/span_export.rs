//! Span export: one task per collector, fed through a bounded queue (a full queue drops the
//! span and counts it: the data path never waits on a collector), sending batches of up to
//! [`BATCH`] spans at least every [`FLUSH_EVERY`] — as Zipkin v2 JSON over HTTP, or over
//! OTLP/gRPC (`TraceService/Export`, tonic).

use std::{net::SocketAddr, time::Duration};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, header};
use hyper_util::rt::TokioIo;
use nodemesh_api::proto::mesh;
use prometheus_client::metrics::counter::Counter;
use serde_json::{Value, json};
use tokio::sync::mpsc;

use opentelemetry_proto::tonic::{
    collector::trace::v1::{ExportTraceServiceRequest, trace_service_client::TraceServiceClient},
    common::v1::{AnyValue, InstrumentationScope, KeyValue, any_value},
    resource::v1::Resource,
    trace::v1 as otlp,
};

use super::{access_log::Side, span::Span};

/// Spans an exporter may hold before new ones are dropped.
const QUEUE: usize = 4096;
/// Spans per request to the collector.
const BATCH: usize = 512;
/// How long a span may wait for its batch to fill.
const FLUSH_EVERY: Duration = Duration::from_secs(1);
/// How long one export may take before it is abandoned (its spans dropped).
const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);

/// Where spans go and how: one exporter per distinct key, shared by every workload using it.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct ExporterKey {
    protocol: Protocol,
    /// `host:port`.
    endpoint: String,
    path: String,
}

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
enum Protocol {
    Zipkin,
    OtlpGrpc,
}

impl ExporterKey {
    pub fn of(t: &mesh::Tracing) -> Result<ExporterKey, String> {
        let protocol = match mesh::tracing::Protocol::try_from(t.protocol) {
            Ok(mesh::tracing::Protocol::Zipkin) => Protocol::Zipkin,
            Ok(mesh::tracing::Protocol::OtlpGrpc) => Protocol::OtlpGrpc,
            Err(_) => return Err(format!("unknown protocol {}", t.protocol)),
        };
        if t.endpoint
            .rsplit_once(':')
            .is_none_or(|(host, port)| host.is_empty() || port.parse::<u16>().is_err())
        {
            return Err(format!("endpoint `{}` is not host:port", t.endpoint));
        }
        let path = if t.path.is_empty() { "/api/v2/spans".to_string() } else { t.path.clone() };
        if !path.starts_with('/') {
            return Err(format!("path `{path}` does not start with /"));
        }
        Ok(ExporterKey { protocol, endpoint: t.endpoint.clone(), path })
    }
}

/// The sending end of one collector's queue.
pub struct Exporter {
    queue: mpsc::Sender<Span>,
    dropped: Counter,
}

impl Exporter {
    /// Starts the export task (on the current tokio runtime).
    pub fn start(key: ExporterKey, dropped: Counter, exported: Counter) -> std::sync::Arc<Exporter> {
        let (queue, spans) = mpsc::channel(QUEUE);
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(export(key, spans, dropped.clone(), exported));
            }
            Err(_) => {
                tracing::error!(endpoint = key.endpoint, "no runtime to export spans on; they are dropped")
            }
        }
        std::sync::Arc::new(Exporter { queue, dropped })
    }

    pub fn send(&self, span: Span) {
        if self.queue.try_send(span).is_err() && self.dropped.inc().is_multiple_of(10_000) {
            tracing::warn!("span exporter behind: spans dropped (nodemesh_spans_dropped_total)");
        }
    }
}

/// Drains `spans` in batches to the collector until every sender is gone.
async fn export(key: ExporterKey, mut spans: mpsc::Receiver<Span>, dropped: Counter, exported: Counter) {
    let mut batch = Vec::with_capacity(BATCH);
    // OTLP: one gRPC channel, reconnecting by itself, for the exporter's life.
    let mut otlp = None;
    loop {
        let deadline = tokio::time::sleep(FLUSH_EVERY);
        tokio::pin!(deadline);
        while batch.len() < BATCH {
            tokio::select! {
                span = spans.recv() => match span {
                    Some(s) => batch.push(s),
                    None => break,
                },
                () = &mut deadline => break,
            }
        }
        if batch.is_empty() {
            if spans.is_closed() {
                return;
            }
            continue;
        }
        let n = batch.len() as u64;
        let sent = async {
            match key.protocol {
                Protocol::Zipkin => send_zipkin(&key, &batch).await,
                Protocol::OtlpGrpc => send_otlp(&key, &mut otlp, &batch).await,
            }
        };
        match tokio::time::timeout(EXPORT_TIMEOUT, sent).await {
            Ok(Ok(())) => {
                exported.inc_by(n);
            }
            failed => {
                let why = match failed {
                    Ok(Err(e)) => e,
                    _ => format!("no answer within {EXPORT_TIMEOUT:?}"),
                };
                tracing::warn!(endpoint = key.endpoint, spans = n, "exporting spans failed: {why}");
                dropped.inc_by(n);
            }
        }
        batch.clear();
    }
}

/// POSTs `spans` as Zipkin v2 JSON.
async fn send_zipkin(key: &ExporterKey, spans: &[Span]) -> Result<(), String> {
    let body = serde_json::to_vec(&Value::Array(spans.iter().map(zipkin_json).collect()))
        .map_err(|e| format!("encoding: {e}"))?;
    // Resolved and connected per batch (at most one a second): a collector Service's address
    // may change, and an idle connection between batches buys nothing.
    let addr: SocketAddr = tokio::net::lookup_host(&key.endpoint)
        .await
        .map_err(|e| format!("resolving {}: {e}", key.endpoint))?
        .next()
        .ok_or_else(|| format!("{} resolves to no address", key.endpoint))?;
    let stream =
        tokio::net::TcpStream::connect(addr).await.map_err(|e| format!("connecting to {addr}: {e}"))?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let request = Request::post(&key.path)
        .header(header::HOST, &key.endpoint)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| e.to_string())?;
    let response = sender.send_request(request).await.map_err(|e| e.to_string())?;
    let status = response.status();
    let _ = response.into_body().collect().await;
    if status.is_success() { Ok(()) } else { Err(format!("the collector answered {status}")) }
}

type OtlpClient = TraceServiceClient<tonic::transport::Channel>;

/// Exports `spans` over OTLP/gRPC, grouped by service (OTLP's resource).
async fn send_otlp(key: &ExporterKey, client: &mut Option<OtlpClient>, spans: &[Span]) -> Result<(), String> {
    let client = match client {
        Some(c) => c,
        None => {
            let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", key.endpoint))
                .map_err(|e| format!("endpoint {}: {e}", key.endpoint))?
                .connect_timeout(EXPORT_TIMEOUT)
                .connect_lazy();
            client.insert(TraceServiceClient::new(channel))
        }
    };
    let mut by_service: std::collections::BTreeMap<&str, Vec<otlp::Span>> = std::collections::BTreeMap::new();
    for span in spans {
        by_service.entry(span.service.as_str()).or_default().push(otlp_span(span));
    }
    let resource_spans = by_service
        .into_iter()
        .map(|(service, spans)| otlp::ResourceSpans {
            resource: Some(Resource {
                attributes: vec![string_attribute("service.name", service)],
                ..Default::default()
            }),
            scope_spans: vec![otlp::ScopeSpans {
                scope: Some(InstrumentationScope { name: "nodemesh".into(), ..Default::default() }),
                spans,
                ..Default::default()
            }],
            ..Default::default()
        })
        .collect();
    let answer = client
        .export(ExportTraceServiceRequest { resource_spans })
        .await
        .map_err(|s| format!("{}: {}", s.code(), s.message()))?;
    match answer.into_inner().partial_success {
        Some(p) if p.rejected_spans > 0 => {
            Err(format!("the collector rejected {} spans: {}", p.rejected_spans, p.error_message))
        }
        _ => Ok(()),
    }
}

fn string_attribute(key: &str, value: &str) -> KeyValue {
    KeyValue {
        key: key.to_string(),
        value: Some(AnyValue { value: Some(any_value::Value::StringValue(value.to_string())) }),
        ..Default::default()
    }
}

/// One span in OTLP's model; Zipkin's endpoints become OpenTelemetry's semantic attributes.
fn otlp_span(span: &Span) -> otlp::Span {
    let nanos = |t: std::time::SystemTime| {
        u64::try_from(t.duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos())
            .unwrap_or(u64::MAX)
    };
    let mut attributes: Vec<KeyValue> = span.tags.iter().map(|(k, v)| string_attribute(k, v)).collect();
    if let Some(remote) = span.remote {
        attributes.push(string_attribute("net.peer.ip", &remote.ip().to_string()));
    }
    otlp::Span {
        trace_id: span.trace_id.to_be_bytes().to_vec(),
        span_id: span.span_id.to_be_bytes().to_vec(),
        parent_span_id: span.parent_id.map(|p| p.to_be_bytes().to_vec()).unwrap_or_default(),
        name: span.name.clone(),
        kind: match span.kind {
            Side::Client => otlp::span::SpanKind::Client,
            Side::Server => otlp::span::SpanKind::Server,
        } as i32,
        start_time_unix_nano: nanos(span.start),
        end_time_unix_nano: nanos(span.start + span.duration),
        attributes,
        status: Some(otlp::Status {
            code: if span.error { otlp::status::StatusCode::Error } else { otlp::status::StatusCode::Unset }
                as i32,
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// One span in Zipkin's v2 model (timestamps and durations in microseconds).
fn zipkin_json(span: &Span) -> Value {
    let micros = |d: Duration| u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
    let endpoint = |service: Option<&str>, addr: Option<SocketAddr>| {
        let mut e = serde_json::Map::new();
        if let Some(s) = service {
            e.insert("serviceName".into(), s.into());
        }
        if let Some(a) = addr {
            let family = if a.is_ipv4() { "ipv4" } else { "ipv6" };
            e.insert(family.into(), a.ip().to_string().into());
            e.insert("port".into(), a.port().into());
        }
        Value::Object(e)
    };
    let mut v = json!({
        "traceId": format!("{:032x}", span.trace_id),
        "id": format!("{:016x}", span.span_id),
        "name": span.name,
        "kind": match span.kind { Side::Client => "CLIENT", Side::Server => "SERVER" },
        "timestamp": micros(span.start.duration_since(std::time::UNIX_EPOCH).unwrap_or_default()),
        "duration": micros(span.duration).max(1),
        "localEndpoint": endpoint(Some(&span.service), span.local),
        "tags": span.tags.iter().map(|(k, v)| ((*k).to_string(), Value::from(v.as_str()))).collect::<serde_json::Map<_, _>>(),
    });
    if let Some(parent) = span.parent_id {
        v["parentId"] = format!("{parent:016x}").into();
    }
    if span.remote.is_some() {
        v["remoteEndpoint"] = endpoint(None, span.remote);
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zipkin_v2_fields() {
        let span = Span {
            trace_id: 0xabc,
            span_id: 0x12,
            parent_id: Some(0x34),
            name: "web.shop.svc.cluster.local:80/*".into(),
            kind: Side::Server,
            start: std::time::UNIX_EPOCH + Duration::from_millis(1500),
            duration: Duration::from_micros(250),
            service: "web.shop".into(),
            local: Some("10.0.0.2:8080".parse().unwrap()),
            remote: Some("10.0.0.1:0".parse().unwrap()),
            error: false,
            tags: vec![("http.status_code", "200".into())],
        };
        let v = zipkin_json(&span);
        assert_eq!(v["traceId"], "00000000000000000000000000000abc");
        assert_eq!(
            (v["id"].as_str(), v["parentId"].as_str()),
            (Some("0000000000000012"), Some("0000000000000034"))
        );
        assert_eq!(
            (v["kind"].as_str(), v["timestamp"].as_u64(), v["duration"].as_u64()),
            (Some("SERVER"), Some(1_500_000), Some(250))
        );
        assert_eq!(v["localEndpoint"], json!({"serviceName": "web.shop", "ipv4": "10.0.0.2", "port": 8080}));
        assert_eq!(v["tags"]["http.status_code"], "200");
    }

    #[test]
    fn otlp_fields() {
        let span = Span {
            trace_id: 0x0102,
            span_id: 0x03,
            parent_id: None,
            kind: Side::Client,
            start: std::time::UNIX_EPOCH + Duration::from_secs(2),
            duration: Duration::from_millis(3),
            error: true,
            tags: vec![("http.status_code", "503".into())],
            remote: Some("10.0.0.1:80".parse().unwrap()),
            ..Span::default()
        };
        let s = otlp_span(&span);
        assert_eq!(s.trace_id.len(), 16);
        assert_eq!((s.trace_id[14], s.trace_id[15]), (1, 2), "big-endian, as the W3C id reads");
        assert_eq!(s.span_id, vec![0, 0, 0, 0, 0, 0, 0, 3]);
        assert!(s.parent_span_id.is_empty(), "a root span has no parent id");
        assert_eq!(s.kind, otlp::span::SpanKind::Client as i32);
        assert_eq!((s.start_time_unix_nano, s.end_time_unix_nano), (2_000_000_000, 2_003_000_000));
        assert_eq!(s.status.map(|st| st.code), Some(otlp::status::StatusCode::Error as i32));
        let keys: Vec<&str> = s.attributes.iter().map(|a| a.key.as_str()).collect();
        assert_eq!(keys, ["http.status_code", "net.peer.ip"]);
    }

    #[test]
    fn keys_name_what_is_wrong() {
        let t = |endpoint: &str, protocol: i32| mesh::Tracing {
            endpoint: endpoint.into(),
            protocol,
            ..Default::default()
        };
        assert!(ExporterKey::of(&t("zipkin:9411", 0)).is_ok());
        assert!(ExporterKey::of(&t("zipkin", 0)).unwrap_err().contains("host:port"));
        assert!(ExporterKey::of(&t("zipkin:9411", 7)).unwrap_err().contains("unknown protocol"));
    }
}
