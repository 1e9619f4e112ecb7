//! Plaintext arriving at a meshed pod without the tunnel — from a pod outside the mesh, or
//! from anything that dialled the pod directly — captured by the pod's sk_lookup program into
//! mesh-node's inbound listener in the pod's netns. It meets the pod's PeerAuthentication:
//! STRICT refuses it (a reset, logged and counted); PERMISSIVE and DISABLE deliver it to the
//! application as its real client.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use nodemesh_api::proto::mesh::{self, MtlsMode};
use tokio::net::{TcpListener, TcpStream};

use super::{
    deliver::Delivery,
    guard::Guarded,
    http::{Reporting, judge_and_pass},
};
use crate::{
    authz::{Authorizer, Inbound, Verdict},
    conn::relay,
    telemetry::{
        labels::{Peer, ServiceLabels},
        metrics::{InboundDeniedLabels, SecurityPolicy},
    },
    workload::Source,
};

/// Metrics and the pod's policies come with the authorizer.
pub struct PlaintextInbound {
    pub drain: crate::drain::Drain,
    pub delivery: Arc<Delivery>,
    pub authorizer: Arc<Authorizer>,
    pub connect_timeout: Duration,
}

/// The mode a plaintext connection to `port` of `workload` meets.
pub fn mode_for(workload: Option<&mesh::Workload>, port: u16) -> MtlsMode {
    let Some(w) = workload else { return MtlsMode::Permissive };
    let mode = w.port_mtls.get(&u32::from(port)).copied().unwrap_or(w.mtls_mode);
    MtlsMode::try_from(mode).unwrap_or(MtlsMode::Permissive)
}

impl PlaintextInbound {
    /// Accepts on one pod's inbound listener until the task is aborted (workload removed).
    pub async fn serve(self: Arc<Self>, listener: TcpListener, pod: Arc<Source>) {
        loop {
            match listener.accept().await {
                Ok((conn, peer)) => {
                    let (this, pod) = (Arc::clone(&self), Arc::clone(&pod));
                    tokio::spawn(self.drain.tracked(async move { this.handle(conn, peer, &pod).await }));
                }
                Err(e) => {
                    tracing::warn!(workload = %pod.key, "inbound accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    async fn handle(&self, conn: TcpStream, peer: SocketAddr, pod: &Source) {
        // sk_lookup keeps the destination: the accepted socket's own address is what the
        // client dialled.
        let Ok(dst) = conn.local_addr() else { return };
        let _ = conn.set_nodelay(true);
        let connection = Inbound {
            authorizer: Arc::clone(&self.authorizer),
            workload: pod.key.clone(),
            routes: pod.routes.clone(),
            identity: None,
            source_ip: peer.ip(),
            destination: dst,
        };
        let Some(policies) = connection.policies().await else {
            relay::reset(&conn);
            return;
        };
        if mode_for(policies.workload(), dst.port()) == MtlsMode::Strict {
            tracing::warn!(
                workload = %pod.key, client = %peer, destination = %dst,
                "plaintext connection refused: PeerAuthentication is STRICT (only mTLS through the mesh)"
            );
            self.authorizer.metrics.inbound_denied(&InboundDeniedLabels {
                destination_workload: pod.key.name.clone(),
                destination_workload_namespace: pod.key.namespace.clone(),
                reason: "mtls_required".into(),
                policy: String::new(),
            });
            relay::reset(&conn);
            return;
        }
        let per_request = policies.per_request();
        if !per_request && connection.decide(&policies, None) != Verdict::Allow {
            relay::reset(&conn);
            return;
        }
        let delivered = match self
            .delivery
            .connect(&pod.netns, Some(peer.ip()), dst, self.connect_timeout)
            .await
        {
            Ok(s) => s,
            Err(e) => {
                tracing::info!(workload = %pod.key, client = %peer, destination = %dst, "inbound delivery failed: {e}");
                relay::reset(&conn);
                return;
            }
        };
        // A plaintext client proves nothing: Istio's `unknown` source, and no Service (the
        // client may have dialled the pod itself).
        let reporting = Reporting::new(
            &self.authorizer.metrics,
            Peer::unknown().as_source(),
            self.authorizer.local_peer(&pod.key, &pod.service_account).as_destination(),
            ServiceLabels::unknown(),
            SecurityPolicy::none,
            Reporting::server_log(&self.authorizer.metrics, &pod.key, Some(peer), dst),
        );
        let counters = self.authorizer.metrics.connection_opened(&reporting.connection_labels());
        let relayed = if per_request {
            judge_and_pass(conn, delivered, connection, &counters, &self.drain, Some(Arc::new(reporting)))
                .await
        } else {
            reporting.relay_to_pod(delivered, Guarded::new(conn, connection), &counters).await
        };
        if let Err(e) = relayed {
            tracing::debug!(workload = %pod.key, client = %peer, "inbound relay ended with error: {e}");
        }
        counters.closed();
    }
}
