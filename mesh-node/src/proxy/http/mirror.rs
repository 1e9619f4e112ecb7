//! Request mirroring: a copy of the request to one endpoint of each mirror cluster, its answer
//! discarded; the live request never waits for a copy.

use std::sync::Arc;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::{Request, http::request::Parts};

use super::{Target, headers::shadow_authority};
use crate::{
    conn::pool::full, policy::lb::Balancer, proxy::Outbound, telemetry::labels::Caller, workload::Source,
};

/// Sends a copy of the request (`body`: kept whole) to each of `clusters`, in the background.
pub(super) fn spawn_copies(
    outbound: &Arc<Outbound>,
    source: &Arc<Source>,
    target: &Target,
    clusters: &[String],
    parts: &Parts,
    body: &Bytes,
    h2: bool,
) {
    let Some(cache) = &target.cache else { return };
    for cluster in clusters {
        let Some(balancer) = cache.cluster_for(cluster, &source.key.namespace) else { continue };
        let (outbound, source) = (Arc::clone(outbound), Arc::clone(source));
        let (mut parts, body, caller) = (parts.clone(), body.clone(), target.caller.clone());
        shadow_authority(&mut parts);
        tokio::spawn(async move { mirror(&outbound, &source, &balancer, parts, body, h2, caller).await });
    }
}

/// Sends a copy of a request to one endpoint of a mirror cluster and discards the answer.
async fn mirror(
    outbound: &Outbound,
    source: &Source,
    balancer: &Balancer,
    parts: hyper::http::request::Parts,
    body: Bytes,
    h2: bool,
    caller: Caller,
) {
    let Some(pick) = balancer.pick(None, None, &[]) else { return };
    let addr = pick.endpoint.ep.addr;
    let sender = match source.http_pool.get(addr, h2, balancer) {
        Some(s) => Ok(s),
        // A copy never waits for a connection: under maxConnections it is skipped.
        None => match balancer.admit_connection() {
            Some(slot) => outbound.dial_http(source, balancer, &pick.endpoint.ep, h2, slot, &caller).await,
            None => return,
        },
    };
    let Ok(mut sender) = sender else { return };
    let request = Request::from_parts(parts, full(body));
    match sender.send(request).await {
        Ok(response) => {
            let _ = response.into_body().collect().await;
            source.http_pool.put(addr, sender, balancer);
        }
        Err(e) => tracing::debug!(
            service = caller.service.destination_service,
            endpoint = %addr,
            "mirrored request failed: {e}"
        ),
    }
}
