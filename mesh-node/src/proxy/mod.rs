//! The outbound proxy: a workload's connections, routed ([`route`]) and sent on as L4
//! ([`outbound`], [`upstream`]) or, once sniffed as HTTP, request by request ([`http`]) under
//! local rate limits.

mod connect;
pub(crate) mod http;
mod local_reply;
pub mod outbound;
mod rate_limits;
pub mod route;
pub mod upstream;

use std::{sync::Arc, time::Duration};

use crate::{
    authz::Authorizer, capture::Capture, inbound::deliver::Delivery, telemetry::metrics::Metrics,
    tunnel::client::TunnelPool, workload::IpIndex,
};
use route::Router;

/// Shared outbound state: capture lookups, metrics, settings.
pub struct Outbound {
    pub capture: Arc<Capture>,
    /// Counts this process's connections and tells them when it drains.
    pub drain: crate::drain::Drain,
    pub metrics: Arc<Metrics>,
    /// This node's workloads by address: same-node destinations are delivered into their
    /// netns directly, and telemetry names them.
    pub locals: Arc<IpIndex>,
    /// Tunnels to other nodes (the node has workload identities); `None`: meshed peers on
    /// other nodes are reached in plaintext.
    pub tunnels: Option<Arc<TunnelPool>>,
    pub proxy_mark: u32,
    /// Connections into this node's meshed pods (see `inbound::deliver`).
    pub delivery: Arc<Delivery>,
    /// Their AuthorizationPolicies, for same-node traffic.
    pub authorizer: Arc<Authorizer>,
    pub connect_timeout: Duration,
    /// Service routing from the control plane; `None` (no `--control-plane`): every
    /// connection goes where it was dialled.
    pub router: Option<Router>,
    /// How long a connection to a Service port may stay silent before it is taken to be a
    /// server-first protocol and relayed as TCP. Zero: no protocol detection (all L4).
    pub sniff_timeout: Duration,
}
