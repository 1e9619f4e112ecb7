//! One HTTP exchange's Istio metrics, for either reporter: the request is timed from its
//! arrival and its body counted as it passes; the answer is wrapped so that the request is
//! recorded when the answer's last byte has gone (with its gRPC status, from trailers too).

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Instant,
};

use bytes::Bytes;
use http_body_util::{BodyExt, combinators::BoxBody};
use hyper::{HeaderMap, Request, Response, body::Body, header};
use nodemesh_api::access_log::Record;

use super::{
    access_log::{ConnectionFacts, LogSubject, Pending, Side, inbound_cluster},
    body::{Counted, End, Ended, Metered, grpc_status},
    labels::{DestinationLabels, ServiceLabels, Shared, SourceLabels, UNKNOWN},
    metrics::{Metrics, NO_FLAGS, Parties, Reporter, RequestLabels, RequestProtocol, SecurityPolicy},
    trace_context::ensure_request_id,
    tracer::{ActiveSpan, Outcome},
};

/// Envoy's response flags for an answer a proxy gave itself, or an exchange that ended
/// abnormally, kept on the response for metrics (see ARCHITECTURE.md "Metrics").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ResponseFlags(pub &'static str);

/// Envoy's `%RESPONSE_CODE_DETAILS%` where the flags do not say it all (a policy's denial
/// names the policy), kept on the response for access logs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResponseDetails(pub String);

/// On a response from a pod of this node reached with no HTTP server of ours at its end (see
/// `proxy::http::exchange`): nothing there sees the request, so the pod's server-side log line
/// and SERVER span are made by the caller's proxy and written with the request.
#[derive(Clone, Default)]
pub struct ServedHere {
    pub log: Option<Pending>,
    pub span: Option<ActiveSpan>,
}

/// The endpoint that answered, kept on the response for access logs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UpstreamHost(pub SocketAddr);

/// Envoy's response code details for an answer with `flags` (`-`: the upstream's own), all
/// given before a response started (a failure after it keeps `via_upstream`).
fn details_for(flags: &str) -> &'static str {
    match flags {
        "-" => "via_upstream",
        "NR" => "route_not_found",
        "NC" => "cluster_not_found",
        "UH" => "no_healthy_upstream",
        "UF" => "upstream_reset_before_response_started{connection_failure}",
        "URX" => "upstream_reset_before_response_started{retry_limit_exceeded}",
        "UO" => "upstream_reset_before_response_started{overflow}",
        "UC" => "upstream_reset_before_response_started{connection_termination}",
        "UR" => "upstream_reset_before_response_started{remote_reset}",
        "UT" => "response_timeout",
        "RL" => "local_rate_limited",
        "FI" => "fault_filter_abort",
        "DC" => "downstream_remote_disconnect",
        _ => "-",
    }
}

/// Envoy's flag for a request its upstream failed: the connection ended under it (`UC`), or
/// the stream was reset (`UR`).
pub fn upstream_failure_flags(e: &hyper::Error) -> &'static str {
    if e.is_closed() || e.is_incomplete_message() { "UC" } else { "UR" }
}

/// A gRPC request or answer (`content-type: application/grpc[+proto|;...]`).
pub fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"))
}

/// A request on its way: when it arrived, whether it is gRPC, its body's bytes so far.
pub struct Arrived {
    at: Instant,
    grpc: bool,
    request_bytes: Arc<AtomicU64>,
    /// Set when the request is access-logged.
    log: Option<Box<Pending>>,
    /// Set when the request is traced and sampled.
    span: Option<Box<ActiveSpan>>,
}

impl Arrived {
    pub fn new(headers: &HeaderMap) -> Arrived {
        Arrived {
            at: Instant::now(),
            grpc: is_grpc(headers),
            request_bytes: Arc::default(),
            log: None,
            span: None,
        }
    }

    /// `body`, counted as it passes.
    pub fn count<B>(&self, body: B) -> Counted<B> {
        Counted::new(body, Arc::clone(&self.request_bytes))
    }

    /// A body read whole before it was sent.
    pub fn counted_whole(&self, bytes: usize) {
        self.request_bytes.fetch_add(bytes as u64, Ordering::Relaxed);
    }
}

/// The parts of a connection's request series that do not change from request to request.
pub struct RequestReport {
    pub metrics: Arc<Metrics>,
    pub reporter: Reporter,
    pub source: Shared<SourceLabels>,
    pub service: Shared<ServiceLabels>,
    /// Whose requests these are, for access logs and tracing (`None`: nobody's).
    pub access: Option<LogSubject>,
}

impl RequestReport {
    /// `request` has arrived: timed from now; given an `x-request-id` if it has none; joined
    /// to its trace (its headers then carry this hop's span) if its workload is traced; and
    /// access-logged if its workload's logs are on.
    pub fn arrived<B>(&self, request: &mut Request<B>) -> Arrived {
        let mut arrived = Arrived::new(request.headers());
        ensure_request_id(request.headers_mut());
        let Some(subject) = &self.access else { return arrived };
        if let Some(tracer) = self.metrics.tracers.for_workload(&subject.workload) {
            arrived.span = tracer.start(request, subject.side).map(Box::new);
        }
        if let Some(logs) = subject.logs_now() {
            arrived.log = Some(Box::new(Pending::start(logs, subject.side, (&*request).into())));
        }
        arrived
    }

    /// `response` to the request that `arrived`, answered by `destination` over a connection
    /// secured as `security`: counted once its body ends. Flags come from a [`ResponseFlags`]
    /// on the response, else from how the body ended (`DC`: the client went away; `UC`: the
    /// upstream failed mid-answer). `also_destination`: this process delivered it to a pod of
    /// its own without serving it as HTTP there, so it reports the destination's series too.
    pub fn meter<B>(
        &self,
        arrived: Arrived,
        mut response: Response<B>,
        destination: Arc<DestinationLabels>,
        security: SecurityPolicy,
        also_destination: bool,
    ) -> Response<BoxBody<Bytes, B::Error>>
    where
        B: Body<Data = Bytes> + Unpin + Send + Sync + 'static,
    {
        let flags = response.extensions().get::<ResponseFlags>().map_or(NO_FLAGS, |f| f.0);
        let served_here = response.extensions_mut().remove::<ServedHere>().unwrap_or_default();
        let logs = self.log_records(
            arrived.log.map(|p| *p),
            served_here.log,
            &response,
            &destination,
            (flags, security),
        );
        let span = arrived.span.map(|span| (span, self.span_facts(&response)));
        let server_span = served_here.span.map(|span| {
            let mut facts = self.span_facts(&response);
            // At the pod's end the request came in on the pod's port (as at a serving node).
            if let Some(pod) = facts.upstream {
                facts.facts.upstream_cluster = inbound_cluster(pod.port());
                facts.name = format!("{}:{}/*", self.service.0.destination_service, pod.port());
            }
            (span, facts)
        });
        let own_side = match self.reporter {
            Reporter::source => Side::Client,
            Reporter::destination => Side::Server,
        };
        let mut labels = RequestLabels {
            parties: Parties {
                reporter: self.reporter,
                source: self.source.clone(),
                destination: Shared(destination),
                service: self.service.clone(),
            },
            request_protocol: if arrived.grpc { RequestProtocol::grpc } else { RequestProtocol::http },
            response_code: response.status().as_u16(),
            grpc_response_status: None,
            response_flags: flags,
            connection_security_policy: security,
        };
        let head_status = if arrived.grpc { grpc_status(response.headers()) } else { None };
        let metrics = Arc::clone(&self.metrics);
        let (at, request_bytes) = (arrived.at, arrived.request_bytes);
        response.map(move |body| {
            Metered::new(body, head_status, move |ended: Ended| {
                labels.grpc_response_status = ended.grpc_status;
                if labels.response_flags == NO_FLAGS {
                    labels.response_flags = match ended.how {
                        End::Complete => NO_FLAGS,
                        End::Failed => "UC",
                        End::Dropped => "DC",
                    };
                }
                let elapsed = at.elapsed();
                let ms = elapsed.as_secs_f64() * 1000.0;
                let request_bytes = request_bytes.load(Ordering::Relaxed);
                metrics.request(&labels, ms, request_bytes, ended.bytes);
                for (pending, mut record) in logs {
                    record.duration = elapsed;
                    record.grpc_status = ended.grpc_status;
                    record.response_flags = labels.response_flags;
                    record.bytes_received = request_bytes;
                    record.bytes_sent = ended.bytes;
                    record.request = Some(pending.request);
                    pending.logs.write(pending.side, &record);
                }
                if let Some((span, facts)) = span {
                    span.finish(facts.outcome(&labels, own_side, request_bytes, ended.bytes));
                }
                if let Some((span, facts)) = server_span {
                    span.finish(facts.outcome(&labels, Side::Server, request_bytes, ended.bytes));
                }
                if also_destination {
                    labels.parties.reporter = Reporter::destination;
                    metrics.request(&labels, ms, request_bytes, ended.bytes);
                }
            })
            .boxed()
        })
    }

    /// The lines to write for this request when its answer ends, all but the end's facts: the
    /// client's or server's (`pending`), and the serving pod's where this node delivered it.
    fn log_records<B>(
        &self,
        pending: Option<Pending>,
        server: Option<Pending>,
        response: &Response<B>,
        destination: &DestinationLabels,
        (flags, security): (&str, SecurityPolicy),
    ) -> Vec<(Pending, Record)> {
        if pending.is_none() && server.is_none() {
            return Vec::new();
        }
        let known =
            |principal: &str| if principal == UNKNOWN { String::new() } else { principal.to_string() };
        let facts = self.access.as_ref().map(|a| a.facts.clone()).unwrap_or_default();
        let upstream = response.extensions().get::<UpstreamHost>().map(|u| u.0).or(facts.upstream_host);
        let common = Record {
            response_code: response.status().as_u16(),
            response_code_details: response
                .extensions()
                .get::<ResponseDetails>()
                .map_or_else(|| details_for(flags).to_string(), |d| d.0.clone()),
            upstream_host: upstream,
            upstream_cluster: facts.upstream_cluster,
            downstream_local: facts.downstream_local,
            downstream_remote: facts.downstream_remote,
            source_principal: known(&self.source.0.source_principal),
            destination_principal: known(&destination.destination_principal),
            mtls: security == SecurityPolicy::mutual_tls,
            ..Record::default()
        };
        let mut records = Vec::with_capacity(2);
        if let Some(pending) = pending {
            let record = Record {
                start_time: pending.start_time,
                response_headers: pending.logs.capture_response(response.headers()),
                ..common.clone()
            };
            records.push((pending, record));
        }
        if let Some(pending) = server {
            // At the pod's end the connection came from the client and went to the pod.
            let record = Record {
                start_time: pending.start_time,
                response_headers: pending.logs.capture_response(response.headers()),
                downstream_local: upstream,
                upstream_cluster: upstream.map_or_else(String::new, |u| inbound_cluster(u.port())),
                ..common
            };
            records.push((pending, record));
        }
        records
    }

    /// What a span needs of the request besides how it ended.
    fn span_facts<B>(&self, response: &Response<B>) -> SpanFacts {
        let facts = self.access.as_ref().map(|a| a.facts.clone()).unwrap_or_default();
        let upstream = response.extensions().get::<UpstreamHost>().map(|u| u.0).or(facts.upstream_host);
        let port = facts.downstream_local.map_or(0, |a| a.port());
        SpanFacts { name: format!("{}:{port}/*", self.service.0.destination_service), upstream, facts }
    }
}

/// A traced request's facts, gathered when its answer starts.
struct SpanFacts {
    name: String,
    upstream: Option<SocketAddr>,
    facts: ConnectionFacts,
}

impl SpanFacts {
    /// The span's outcome: named for the workload on its side (the caller at a CLIENT span,
    /// the serving workload at a SERVER span), as Istio's spans are.
    fn outcome<'a>(
        &'a self,
        labels: &'a RequestLabels,
        side: Side,
        request_bytes: u64,
        response_bytes: u64,
    ) -> Outcome<'a> {
        let (source, d) = (&labels.parties.source.0, &labels.parties.destination.0);
        let (namespace, service, revision, cluster) = match side {
            Side::Client => (
                &source.source_workload_namespace,
                &source.source_canonical_service,
                &source.source_canonical_revision,
                &source.source_cluster,
            ),
            Side::Server => (
                &d.destination_workload_namespace,
                &d.destination_canonical_service,
                &d.destination_canonical_revision,
                &d.destination_cluster,
            ),
        };
        Outcome {
            name: self.name.clone(),
            service: format!("{service}.{namespace}"),
            status: labels.response_code,
            flags: labels.response_flags,
            grpc_status: labels.grpc_response_status,
            request_bytes,
            response_bytes,
            upstream: self.upstream,
            upstream_cluster: &self.facts.upstream_cluster,
            peer: self.facts.downstream_remote,
            istio: [
                ("istio.namespace", namespace),
                ("istio.canonical_service", service),
                ("istio.canonical_revision", revision),
                ("istio.cluster_id", cluster),
            ],
        }
    }
}
