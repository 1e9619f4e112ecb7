//! One HTTP exchange's Istio metrics, for either reporter: the request is timed from its
//! arrival and its body counted as it passes; the answer is wrapped so that the request is
//! recorded when the answer's last byte has gone (with its gRPC status, from trailers too).

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Instant,
};

use bytes::Bytes;
use http_body_util::{BodyExt, combinators::BoxBody};
use hyper::{HeaderMap, Response, body::Body, header};

use super::{
    body::{Counted, End, Ended, Metered, grpc_status},
    labels::{DestinationLabels, ServiceLabels, Shared, SourceLabels},
    metrics::{Metrics, NO_FLAGS, Parties, Reporter, RequestLabels, RequestProtocol, SecurityPolicy},
};

/// Envoy's response flags for an answer a proxy gave itself, or an exchange that ended
/// abnormally, kept on the response for metrics (see ARCHITECTURE.md "Metrics").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ResponseFlags(pub &'static str);

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
}

impl Arrived {
    pub fn new(headers: &HeaderMap) -> Arrived {
        Arrived { at: Instant::now(), grpc: is_grpc(headers), request_bytes: Arc::default() }
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
}

impl RequestReport {
    /// `response` to the request that `arrived`, answered by `destination` over a connection
    /// secured as `security`: counted once its body ends. Flags come from a [`ResponseFlags`]
    /// on the response, else from how the body ended (`DC`: the client went away; `UC`: the
    /// upstream failed mid-answer). `also_destination`: this process delivered it to a pod of
    /// its own without serving it as HTTP there, so it reports the destination's series too.
    pub fn meter<B>(
        &self,
        arrived: Arrived,
        response: Response<B>,
        destination: Arc<DestinationLabels>,
        security: SecurityPolicy,
        also_destination: bool,
    ) -> Response<BoxBody<Bytes, B::Error>>
    where
        B: Body<Data = Bytes> + Unpin + Send + Sync + 'static,
    {
        let flags = response.extensions().get::<ResponseFlags>().map_or(NO_FLAGS, |f| f.0);
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
                let ms = arrived.at.elapsed().as_secs_f64() * 1000.0;
                let request_bytes = arrived.request_bytes.load(Ordering::Relaxed);
                metrics.request(&labels, ms, request_bytes, ended.bytes);
                if also_destination {
                    labels.parties.reporter = Reporter::destination;
                    metrics.request(&labels, ms, request_bytes, ended.bytes);
                }
            })
            .boxed()
        })
    }
}
