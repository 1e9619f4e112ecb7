//! Keeps the eBPF map of the node's own addresses current: connections from them (the
//! kubelet's probes above all) pass meshed pods' inbound capture. Under STRICT a probe would
//! otherwise be refused and the pod never become ready — Istio's ambient mode exempts the
//! node the same way. Addresses come and go (DHCP, new interfaces), so they are re-read.

use std::{net::IpAddr, sync::Arc, time::Duration};

use super::Capture;

/// How often the node's addresses are re-read.
const REFRESH: Duration = Duration::from_secs(5);

/// Every non-loopback address of the network namespace mesh-node runs in (the node's).
pub fn node_addresses() -> nix::Result<Vec<IpAddr>> {
    let mut out: Vec<IpAddr> = nix::ifaddrs::getifaddrs()?
        .filter_map(|ifa| ifa.address)
        .filter_map(|sa| {
            sa.as_sockaddr_in()
                .map(|v4| IpAddr::V4(v4.ip()))
                .or_else(|| sa.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip())))
        })
        .filter(|ip| !ip.is_loopback())
        .collect();
    out.sort();
    out.dedup();
    Ok(out)
}

/// Re-reads the node's addresses and updates the map.
pub fn refresh(capture: &Capture) {
    match node_addresses() {
        Ok(addresses) => match capture.set_node_addresses(&addresses) {
            Ok(true) => tracing::info!(?addresses, "the node's addresses pass inbound capture"),
            Ok(false) => {}
            Err(e) => tracing::warn!("node addresses: {e}"),
        },
        Err(e) => tracing::warn!("reading the node's addresses: {e}"),
    }
}

/// Refreshes every few seconds until mesh-node stops.
pub async fn keep_current(capture: Arc<Capture>) {
    loop {
        tokio::time::sleep(REFRESH).await;
        refresh(&capture);
    }
}
