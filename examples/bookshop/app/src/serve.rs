//! HTTP plumbing: the server loop and a one-request client.

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper::{Request, Response, header, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use serde_json::json;
use tokio::net::{TcpListener, TcpStream};

use crate::{Config, answer};

pub(crate) async fn run(listen: SocketAddr, config: Config) -> anyhow::Result<()> {
    let listener = TcpListener::bind(listen).await?;
    eprintln!("bookshop: {} {} listening on {listen}", config.role, config.version);
    let config = Arc::new(config);
    let served = Arc::new(AtomicU64::new(0));
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        let (config, served) = (Arc::clone(&config), Arc::clone(&served));
        tokio::spawn(async move {
            let service = service_fn(move |req: Request<hyper::body::Incoming>| {
                let (config, served) = (Arc::clone(&config), Arc::clone(&served));
                async move {
                    let (status, body) = if req.uri().path() == "/stats" {
                        (
                            200,
                            json!({"service": config.role, "version": config.version, "served": served.load(Ordering::Relaxed)}),
                        )
                    } else {
                        served.fetch_add(1, Ordering::Relaxed);
                        answer(&config, req.uri().path(), req.headers()).await
                    };
                    let mut response = Response::new(Full::new(Bytes::from(format!("{body}\n"))));
                    *response.status_mut() = hyper::StatusCode::from_u16(status).unwrap_or_default();
                    response
                        .headers_mut()
                        .insert(header::CONTENT_TYPE, "application/json".parse().expect("header"));
                    Ok::<_, Infallible>(response)
                }
            });
            let _ = http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
        });
    }
}

/// One GET over a fresh connection (the mesh balances each one).
pub(crate) async fn get(to: &str, path: &str, headers: &[(&str, String)]) -> anyhow::Result<(u16, Bytes)> {
    let stream = TcpStream::connect(to).await?;
    let _ = stream.set_nodelay(true);
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let mut req = Request::get(path).header(header::HOST, to);
    for (k, v) in headers {
        req = req.header(*k, v);
    }
    let response = sender.send_request(req.body(Empty::<Bytes>::new())?).await?;
    let status = response.status().as_u16();
    Ok((status, response.into_body().collect().await?.to_bytes()))
}
