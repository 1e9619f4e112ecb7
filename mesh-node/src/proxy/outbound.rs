//! Outbound: connections captured from a workload, proxied to where they were going.
//!
//! Each meshed workload has its own listeners inside its own netns, so the listener that
//! accepted a connection *is* the source identity — no address-based guessing. The upstream
//! socket is created in the same netns (the destination sees the pod's own address, as without
//! the mesh) and carries the proxy mark so capture never loops it back to us.

use std::{
    io,
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use mesh_control::workload::WorkloadKey;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

use super::relay;
use crate::{
    capture::Capture,
    netns::NetnsThread,
    telemetry::metrics::{ConnectionLabels, FailureLabels, FailureReason, Metrics, Reporter, UNKNOWN},
};

/// Resolves a destination address to the workload that owns it, for telemetry.
pub trait DestinationIndex: Send + Sync {
    fn workload_for(&self, ip: IpAddr) -> Option<WorkloadKey>;
}

/// What the proxy needs to know about the workload a listener serves — and nothing more: no
/// registry access, no keys.
#[derive(Debug)]
pub struct Source {
    pub key: WorkloadKey,
    pub netns: NetnsThread,
    pub netns_cookie: u64,
}

/// Shared outbound state: capture lookups, metrics, settings.
pub struct Outbound {
    pub capture: Arc<Capture>,
    pub metrics: Arc<Metrics>,
    pub destinations: Arc<dyn DestinationIndex>,
    pub proxy_mark: u32,
    pub connect_timeout: Duration,
}

impl Outbound {
    /// Accepts on one workload listener until the task is aborted (workload removed).
    pub async fn serve(self: Arc<Self>, listener: TcpListener, source: Arc<Source>) {
        loop {
            match listener.accept().await {
                Ok((client, peer)) => {
                    let this = Arc::clone(&self);
                    let source = Arc::clone(&source);
                    tokio::spawn(async move { this.handle(client, peer, &source).await });
                }
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning; the listener stays.
                    tracing::warn!(workload = %source.key, "accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    async fn handle(&self, client: TcpStream, peer: SocketAddr, source: &Source) {
        let fail = |reason| FailureLabels {
            source_workload: source.key.name.clone(),
            source_workload_namespace: source.key.namespace.clone(),
            reason,
        };
        let Some(dst) = self.capture.take_orig_dst(source.netns_cookie, peer) else {
            tracing::warn!(
                workload = %source.key, %peer,
                "connection to the proxy listener has no original destination \
                 (not captured by eBPF; dialled directly?) — refusing it"
            );
            self.metrics.failure(&fail(FailureReason::no_original_destination));
            relay::reset(&client);
            return;
        };
        let _ = client.set_nodelay(true);
        let upstream = match self.connect_upstream(source, dst).await {
            Ok(s) => s,
            Err(e) => {
                let reason = match e.kind() {
                    io::ErrorKind::ConnectionRefused => FailureReason::upstream_connect_refused,
                    io::ErrorKind::TimedOut => FailureReason::upstream_connect_timeout,
                    _ => FailureReason::upstream_connect_error,
                };
                tracing::info!(workload = %source.key, %dst, "upstream connect failed: {e}");
                self.metrics.failure(&fail(reason));
                relay::reset(&client);
                return;
            }
        };
        let dst_workload = self.destinations.workload_for(dst.ip());
        let labels = ConnectionLabels {
            reporter: Reporter::source,
            source_workload: source.key.name.clone(),
            source_workload_namespace: source.key.namespace.clone(),
            destination_workload: dst_workload.as_ref().map_or(UNKNOWN, |k| &k.name).to_string(),
            destination_workload_namespace: dst_workload
                .as_ref()
                .map_or(UNKNOWN, |k| &k.namespace)
                .to_string(),
        };
        let counters = self.metrics.connection_opened(&labels);
        tracing::debug!(workload = %source.key, %dst, "proxying");
        match relay::relay(client, upstream, &counters.sent, &counters.received).await {
            Ok(t) => {
                tracing::debug!(workload = %source.key, %dst, sent = t.sent, received = t.received, "closed")
            }
            Err(e) => tracing::debug!(workload = %source.key, %dst, "relay ended with error: {e}"),
        }
        counters.closed();
    }

    /// Dials `dst` from inside the source workload's netns with the proxy mark set.
    async fn connect_upstream(&self, source: &Source, dst: SocketAddr) -> io::Result<TcpStream> {
        let mark = self.proxy_mark;
        let socket = source
            .netns
            .run(move || -> io::Result<Socket> {
                let socket =
                    Socket::new(Domain::for_address(dst), Type::STREAM.nonblocking(), Some(Protocol::TCP))?;
                socket.set_mark(mark)?;
                socket.set_tcp_nodelay(true)?;
                Ok(socket)
            })
            .await
            .map_err(io::Error::other)??;
        let socket = TcpSocket::from_std_stream(std::net::TcpStream::from(socket));
        match tokio::time::timeout(self.connect_timeout, socket.connect(dst)).await {
            Ok(result) => result,
            Err(_) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("no answer from {dst} within {:?}", self.connect_timeout),
            )),
        }
    }
}
