//! gRPC for the tests, with tonic's standard health service (no codegen of our own): a server
//! whose status for service `nm` flips every 50 ms, so `Watch` is a live server stream, and a
//! client that makes unary `Check` calls (their status comes back in trailers) then reads a
//! number of `Watch` messages.

use std::{io, net::SocketAddr, time::Duration};

use serde_json::{Value, json};
use tokio_stream::StreamExt;
use tonic_health::{
    ServingStatus,
    pb::{HealthCheckRequest, health_client::HealthClient},
};

use super::http::runtime;

pub(crate) fn serve(name: &str, listen: &[String]) -> io::Result<()> {
    runtime().block_on(async {
        let (reporter, service) = tonic_health::server::health_reporter();
        reporter.set_service_status("", ServingStatus::Serving).await;
        let flipper = reporter.clone();
        tokio::spawn(async move {
            for i in 0u64.. {
                let status = if i % 2 == 0 { ServingStatus::Serving } else { ServingStatus::NotServing };
                flipper.set_service_status("nm", status).await;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
        let mut servers = Vec::new();
        for addr in listen {
            let addr: SocketAddr = addr.parse().map_err(io::Error::other)?;
            let router = tonic::transport::Server::builder().add_service(service.clone());
            servers.push(tokio::spawn(router.serve(addr)));
        }
        eprintln!("nm-testapp: {name} serving gRPC on {listen:?}");
        for s in servers {
            let _ = s.await;
        }
        Ok(())
    })
}

pub(crate) fn client(to: SocketAddr, calls: usize, messages: usize) -> io::Result<Value> {
    runtime().block_on(async {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{to}"))
            .map_err(io::Error::other)?
            .connect()
            .await
            .map_err(io::Error::other)?;
        let mut client = HealthClient::new(channel);
        let mut serving = 0;
        for _ in 0..calls {
            let reply = client
                .check(HealthCheckRequest { service: String::new() })
                .await
                .map_err(|s| io::Error::other(format!("Check: {s}")))?;
            serving += usize::from(reply.into_inner().status == 1);
        }
        let mut stream = client
            .watch(HealthCheckRequest { service: "nm".into() })
            .await
            .map_err(|s| io::Error::other(format!("Watch: {s}")))?
            .into_inner();
        let mut statuses = Vec::new();
        while statuses.len() < messages {
            match tokio::time::timeout(Duration::from_secs(10), stream.next()).await {
                Ok(Some(Ok(m))) => statuses.push(m.status),
                Ok(Some(Err(s))) => return Err(io::Error::other(format!("Watch stream: {s}"))),
                Ok(None) => return Err(io::Error::other("Watch stream ended early")),
                Err(_) => {
                    return Err(io::Error::new(io::ErrorKind::TimedOut, "no Watch message within 10 s"));
                }
            }
        }
        Ok(json!({"checks_serving": serving, "watch_statuses": statuses}))
    })
}
