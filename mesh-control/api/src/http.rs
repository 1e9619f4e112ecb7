//! The small HTTP/1.1 plumbing the admin endpoints (mesh-node, mesh-control) and mesh-node's
//! local API share.

use std::{convert::Infallible, future::Future, sync::Arc};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::{Request, Response, StatusCode, body::Incoming, header, server::conn::http1};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};

pub type Body = Full<Bytes>;

/// Largest request body either endpoint accepts.
const MAX_BODY: usize = 1 << 20;

/// Serves one connection with `handler` until the client goes away.
pub fn spawn_connection<S, H, F>(stream: S, handler: Arc<H>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    H: Fn(Request<Incoming>) -> F + Send + Sync + 'static,
    F: Future<Output = Response<Body>> + Send + 'static,
{
    tokio::spawn(async move {
        let service = hyper::service::service_fn(move |req| {
            let response = handler(req);
            async move { Ok::<_, Infallible>(response.await) }
        });
        if let Err(e) = http1::Builder::new().serve_connection(TokioIo::new(stream), service).await {
            tracing::debug!("http connection ended: {e}");
        }
    });
}

pub async fn read_body(req: Request<Incoming>) -> Result<Bytes, String> {
    Limited::new(req.into_body(), MAX_BODY)
        .collect()
        .await
        .map(|b| b.to_bytes())
        .map_err(|e| format!("reading request body: {e}"))
}

pub fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
    respond(status, "text/plain; charset=utf-8", body.into())
}

/// Metrics in the OpenMetrics text format (what prometheus-client writes): the content type
/// tells Prometheus which parser to use (counters carry `_total`, the text ends in `# EOF`).
pub fn openmetrics(body: String) -> Response<Body> {
    respond(StatusCode::OK, "application/openmetrics-text; version=1.0.0; charset=utf-8", body.into())
}

/// A page of the admin endpoint's own (the service graph).
pub fn html(body: &'static str) -> Response<Body> {
    respond(StatusCode::OK, "text/html; charset=utf-8", Bytes::from_static(body.as_bytes()))
}

pub fn json(status: StatusCode, value: &impl serde::Serialize) -> Response<Body> {
    match serde_json::to_vec_pretty(value) {
        Ok(body) => respond(status, "application/json", body.into()),
        Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

pub fn error(status: StatusCode, message: impl std::fmt::Display) -> Response<Body> {
    json(status, &serde_json::json!({ "error": message.to_string() }))
}

fn respond(status: StatusCode, content_type: &'static str, body: Bytes) -> Response<Body> {
    let mut response = Response::new(Full::new(body));
    *response.status_mut() = status;
    response.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static(content_type));
    response
}
