//! Fetching one node's edges (plain HTTP/1.1 on its metrics port, as Prometheus scrapes it):
//! the report the node folded itself (`/graph/edges`), or, from a node that serves none (an
//! older one: 404), its `/metrics` page folded here. Every failure comes back as a sentence
//! for the page's list of sources.

use std::{collections::HashMap, net::SocketAddr, time::Duration};

use http_body_util::{BodyExt, Empty, Limited};
use hyper::{Request, StatusCode, body::Bytes};
use hyper_util::rt::TokioIo;
use nodemesh_api::service_graph::{
    EDGES_PATH, EdgeReport,
    edges::{self, EdgeKey, EdgeTotals},
};
use tokio::net::TcpStream;

/// An answer larger than this is refused rather than held in memory (a node's metrics stay
/// far below it: their label values are bounded, see ARCHITECTURE.md "Workload names are
/// owners' names").
const MAX_PAGE: usize = 64 << 20;

pub(super) async fn fetch(
    endpoint: SocketAddr,
    timeout: Duration,
) -> Result<HashMap<EdgeKey, EdgeTotals>, String> {
    tokio::time::timeout(timeout, fetch_edges(endpoint))
        .await
        .map_err(|_| format!("http://{endpoint}: no answer within {timeout:?}"))?
}

async fn fetch_edges(endpoint: SocketAddr) -> Result<HashMap<EdgeKey, EdgeTotals>, String> {
    let (status, body) = get(endpoint, EDGES_PATH).await?;
    if status.is_success() {
        let report: EdgeReport = serde_json::from_slice(&body)
            .map_err(|e| format!("http://{endpoint}{EDGES_PATH}: not an edge report: {e}"))?;
        return Ok(report.into_map());
    }
    if status != StatusCode::NOT_FOUND {
        return Err(format!("http://{endpoint}{EDGES_PATH}: HTTP {status}"));
    }
    let (status, page) = get(endpoint, "/metrics").await?;
    if !status.is_success() {
        return Err(format!("http://{endpoint}/metrics: HTTP {status}"));
    }
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

async fn get(endpoint: SocketAddr, path: &str) -> Result<(StatusCode, Bytes), String> {
    let url = format!("http://{endpoint}{path}");
    let stream = TcpStream::connect(endpoint).await.map_err(|e| format!("{url}: {e}"))?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("{url}: {e}"))?;
    let connection = tokio::spawn(connection);
    let request = Request::get(path)
        .header(hyper::header::HOST, endpoint.to_string())
        .body(Empty::<Bytes>::new())
        .map_err(|e| format!("{url}: {e}"))?;
    let response = sender.send_request(request).await.map_err(|e| format!("{url}: {e}"))?;
    let status = response.status();
    let body = Limited::new(response.into_body(), MAX_PAGE)
        .collect()
        .await
        .map_err(|e| format!("{url}: reading the answer: {e}"))?
        .to_bytes();
    connection.abort();
    Ok((status, body))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use hyper::body::Incoming;
    use nodemesh_api::http;
    use tokio::net::TcpListener;

    use super::*;

    const PAGE: &str = "istio_requests_total{reporter=\"source\",source_workload=\"a\",\
        source_workload_namespace=\"shop\",destination_app=\"b\",destination_workload_namespace=\"shop\",\
        response_code=\"503\"} 4\n";

    /// A node's metrics port on loopback, answering `/graph/edges` only if `folds`.
    async fn node(folds: bool) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let handler = Arc::new(move |req: hyper::Request<Incoming>| async move {
            match req.uri().path() {
                "/metrics" => http::openmetrics(PAGE.to_string()),
                EDGES_PATH if folds => {
                    let mut report = EdgeReport::of_page(PAGE).unwrap();
                    report.edges[0].totals.requests = 5.0;
                    http::json(StatusCode::OK, &report)
                }
                _ => http::text(StatusCode::NOT_FOUND, "no such path\n"),
            }
        });
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                http::spawn_connection(stream, Arc::clone(&handler));
            }
        });
        addr
    }

    #[tokio::test]
    async fn the_nodes_own_report_is_used_and_an_older_nodes_page_is_folded_here() {
        let timeout = Duration::from_secs(5);
        let folded_by_node = fetch(node(true).await, timeout).await.unwrap();
        assert_eq!(folded_by_node.values().map(|t| t.requests).sum::<f64>(), 5.0, "the report, not the page");
        let folded_here = fetch(node(false).await, timeout).await.unwrap();
        assert_eq!(folded_here.values().map(|t| (t.requests, t.errors)).collect::<Vec<_>>(), [(4.0, 4.0)]);
    }
}
