//! Responses mesh-node makes itself (a denial, a rate limit, a failed upstream), in the
//! caller's protocol: plain text for HTTP, a trailers-only answer for gRPC.

use bytes::Bytes;
use hyper::{
    Response, StatusCode,
    header::{self, HeaderValue},
};

use crate::{
    conn::pool::{Body, full},
    telemetry::requests::ResponseFlags,
};

/// A gRPC answer with no messages: what a gRPC client reads as status `code`.
pub(super) fn grpc_trailers_only(code: u32, message: &str) -> Response<Body> {
    let mut response = Response::new(full(Bytes::new()));
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    headers.insert("grpc-status", HeaderValue::from(code));
    if let Ok(message) = HeaderValue::from_str(message) {
        headers.insert("grpc-message", message);
    }
    response
}

/// The proxy's own plain-text answer.
pub(super) fn text_response(status: StatusCode, reason: &str) -> Response<Body> {
    let mut response = Response::new(full(format!("nodemesh: {reason}\n")));
    *response.status_mut() = status;
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    response
}

/// `response` marked with `flags`.
pub(crate) fn flagged(mut response: Response<Body>, flags: &'static str) -> Response<Body> {
    response.extensions_mut().insert(ResponseFlags(flags));
    response
}
