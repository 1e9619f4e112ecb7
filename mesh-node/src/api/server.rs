//! Serves the local workload API.

use std::{os::unix::fs::PermissionsExt, path::Path, sync::Arc};

use hyper::{Method, Request, Response, StatusCode, body::Incoming};
use nodemesh_api::workload::{WorkloadKey, WorkloadSpec};
use tokio::net::UnixListener;

use crate::{
    http::{self, Body},
    registry::Registry,
};

/// Binds the socket (replacing a stale one from a previous run) with mode 0600.
pub fn bind(path: &Path) -> std::io::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Whether the API may add and remove workloads.
#[derive(Clone, Copy, Debug)]
pub enum Writes {
    Allowed,
    /// Refused with this reason (another source owns the workloads); listing still works.
    Refused(&'static str),
}

pub async fn serve(listener: UnixListener, registry: Arc<Registry>, writes: Writes) {
    let handler = Arc::new(move |req: Request<Incoming>| {
        let registry = Arc::clone(&registry);
        async move {
            match writes {
                Writes::Refused(reason) if req.method() != Method::GET => {
                    http::error(StatusCode::CONFLICT, format!("workloads cannot be changed here: {reason}"))
                }
                _ => route(&registry, req).await,
            }
        }
    });
    loop {
        match listener.accept().await {
            Ok((stream, _)) => http::spawn_connection(stream, Arc::clone(&handler)),
            Err(e) => tracing::warn!("api accept failed: {e}"),
        }
    }
}

async fn route(registry: &Registry, req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path().trim_end_matches('/').to_string();
    let rest = path.strip_prefix("/v1/workloads");
    match (req.method().clone(), rest) {
        (Method::GET, Some("")) => http::json(StatusCode::OK, &registry.list().await),
        (Method::POST, Some("")) => {
            let body = match http::read_body(req).await {
                Ok(b) => b,
                Err(e) => return http::error(StatusCode::BAD_REQUEST, e),
            };
            let spec: WorkloadSpec = match serde_json::from_slice(&body) {
                Ok(s) => s,
                Err(e) => return http::error(StatusCode::BAD_REQUEST, format!("workload spec: {e}")),
            };
            match registry.add(spec).await {
                Ok(status) => http::json(StatusCode::OK, &status),
                Err(e) if e.is_client_error() => http::error(StatusCode::BAD_REQUEST, e),
                Err(e) => http::error(StatusCode::INTERNAL_SERVER_ERROR, e),
            }
        }
        (Method::DELETE, Some(key)) => {
            let Some((namespace, name)) = key.trim_start_matches('/').split_once('/') else {
                return http::error(StatusCode::NOT_FOUND, "use DELETE /v1/workloads/{namespace}/{name}");
            };
            let key = WorkloadKey { namespace: namespace.into(), name: name.into() };
            match registry.remove(&key).await {
                Ok(()) => http::text(StatusCode::NO_CONTENT, ""),
                Err(e @ crate::registry::WorkloadError::NotFound(_)) => http::error(StatusCode::NOT_FOUND, e),
                Err(e) => http::error(StatusCode::INTERNAL_SERVER_ERROR, e),
            }
        }
        _ => http::error(StatusCode::NOT_FOUND, format!("no API path {} {path}", req.method())),
    }
}
