//! Fetching one node's `/metrics` page (plain HTTP/1.1, as Prometheus scrapes it) and folding
//! it into edges. Every failure comes back as a sentence for the page's list of sources.

use std::{collections::HashMap, net::SocketAddr, time::Duration};

use http_body_util::{BodyExt, Empty, Limited};
use hyper::{Request, body::Bytes};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::edges::{self, EdgeKey, EdgeTotals};

/// A page larger than this is refused rather than held in memory (a node's metrics stay far
/// below it: their label values are bounded, see the README's cardinality section).
const MAX_PAGE: usize = 64 << 20;

pub(super) async fn fetch(
    endpoint: SocketAddr,
    timeout: Duration,
) -> Result<HashMap<EdgeKey, EdgeTotals>, String> {
    let page = tokio::time::timeout(timeout, get(endpoint))
        .await
        .map_err(|_| format!("http://{endpoint}/metrics: no answer within {timeout:?}"))??;
    // Parsing a busy node's page takes milliseconds: off the runtime that serves xDS.
    tokio::task::spawn_blocking(move || {
        let page = std::str::from_utf8(&page).map_err(|_| "the page is not UTF-8".to_string())?;
        edges::fold(page)
    })
    .await
    .map_err(|e| e.to_string())
    .flatten()
    .map_err(|e| format!("http://{endpoint}/metrics: {e}"))
}

async fn get(endpoint: SocketAddr) -> Result<Bytes, String> {
    let url = format!("http://{endpoint}/metrics");
    let stream = TcpStream::connect(endpoint).await.map_err(|e| format!("{url}: {e}"))?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("{url}: {e}"))?;
    let connection = tokio::spawn(connection);
    let request = Request::get("/metrics")
        .header(hyper::header::HOST, endpoint.to_string())
        .body(Empty::<Bytes>::new())
        .map_err(|e| format!("{url}: {e}"))?;
    let response = sender.send_request(request).await.map_err(|e| format!("{url}: {e}"))?;
    let status = response.status();
    let body = Limited::new(response.into_body(), MAX_PAGE)
        .collect()
        .await
        .map_err(|e| format!("{url}: reading the page: {e}"))?
        .to_bytes();
    connection.abort();
    if !status.is_success() {
        return Err(format!("{url}: HTTP {status}"));
    }
    Ok(body)
}
