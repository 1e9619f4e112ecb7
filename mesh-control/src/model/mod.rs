//! The one typed config model. Every source — a watched directory of YAML, the Kubernetes API,
//! workloads that nodes report — produces these objects through the same parser
//! ([`parse::object_from_value`]), so a Service means the same thing wherever it came from.

pub mod authorization;
pub mod core;
pub mod destination_rules;
pub mod duration;
pub mod istio;
pub mod layering;
pub mod parse;
pub mod peer_authentication;
pub mod rate_limit;
pub mod store;
pub mod telemetry;
pub mod virtual_service;

use std::{collections::BTreeMap, fmt, net::IpAddr};

pub use parse::{FieldError, ParseError, object_from_value};

/// The DNS domain of Kubernetes Services (`<name>.<namespace>.svc.<domain>`).
pub const CLUSTER_DOMAIN: &str = "cluster.local";

/// Istio's short-name rule: `reviews` in namespace `shop` means `reviews.shop.svc.cluster.local`.
pub fn qualify(host: &str, namespace: &str) -> String {
    if host.contains('.') || host.starts_with('*') {
        host.to_string()
    } else {
        format!("{host}.{namespace}.svc.{CLUSTER_DOMAIN}")
    }
}

/// The kinds the model understands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub enum Kind {
    Namespace,
    Node,
    Pod,
    Service,
    EndpointSlice,
    ServiceEntry,
    WorkloadEntry,
    DestinationRule,
    Sidecar,
    VirtualService,
    RateLimitPolicy,
    MeshConfig,
    /// A workload a node registered in local mode and reported to the control plane.
    NodeWorkload,
    /// A node's proxy as it reported itself (its tunnel address).
    NodeProxy,
    PeerAuthentication,
    AuthorizationPolicy,
    Telemetry,
}

impl Kind {
    pub const ALL: [Kind; 17] = [
        Kind::Namespace,
        Kind::Node,
        Kind::Pod,
        Kind::Service,
        Kind::EndpointSlice,
        Kind::ServiceEntry,
        Kind::WorkloadEntry,
        Kind::DestinationRule,
        Kind::Sidecar,
        Kind::VirtualService,
        Kind::RateLimitPolicy,
        Kind::MeshConfig,
        Kind::NodeWorkload,
        Kind::NodeProxy,
        Kind::PeerAuthentication,
        Kind::AuthorizationPolicy,
        Kind::Telemetry,
    ];

    pub fn is_namespaced(self) -> bool {
        !matches!(self, Kind::Namespace | Kind::Node | Kind::MeshConfig | Kind::NodeProxy)
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// Names one object: kind plus namespace (empty for cluster-scoped kinds) plus name.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub struct ObjectKey {
    pub kind: Kind,
    pub namespace: String,
    pub name: String,
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.namespace.is_empty() {
            write!(f, "{} {}", self.kind, self.name)
        } else {
            write!(f, "{} {}/{}", self.kind, self.namespace, self.name)
        }
    }
}

pub type Labels = BTreeMap<String, String>;

/// `metadata` as the model keeps it.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Meta {
    pub name: String,
    /// Empty for cluster-scoped kinds.
    pub namespace: String,
    pub labels: Labels,
}

#[allow(
    clippy::large_enum_variant,
    reason = "objects live once in the store; boxing the big Istio specs would buy nothing"
)]
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub enum Object {
    Namespace(core::Namespace),
    Node(core::Node),
    Pod(core::Pod),
    Service(core::Service),
    EndpointSlice(core::EndpointSlice),
    ServiceEntry(istio::ServiceEntry),
    WorkloadEntry(istio::WorkloadEntry),
    DestinationRule(istio::DestinationRule),
    Sidecar(istio::Sidecar),
    VirtualService(virtual_service::VirtualService),
    RateLimitPolicy(rate_limit::RateLimitPolicy),
    MeshConfig(istio::MeshConfig),
    NodeWorkload(core::Pod),
    NodeProxy(core::NodeProxy),
    PeerAuthentication(peer_authentication::PeerAuthentication),
    AuthorizationPolicy(authorization::AuthorizationPolicy),
    Telemetry(telemetry::Telemetry),
}

impl Object {
    pub fn kind(&self) -> Kind {
        match self {
            Object::Namespace(_) => Kind::Namespace,
            Object::Node(_) => Kind::Node,
            Object::Pod(_) => Kind::Pod,
            Object::Service(_) => Kind::Service,
            Object::EndpointSlice(_) => Kind::EndpointSlice,
            Object::ServiceEntry(_) => Kind::ServiceEntry,
            Object::WorkloadEntry(_) => Kind::WorkloadEntry,
            Object::DestinationRule(_) => Kind::DestinationRule,
            Object::Sidecar(_) => Kind::Sidecar,
            Object::VirtualService(_) => Kind::VirtualService,
            Object::RateLimitPolicy(_) => Kind::RateLimitPolicy,
            Object::MeshConfig(_) => Kind::MeshConfig,
            Object::NodeWorkload(_) => Kind::NodeWorkload,
            Object::NodeProxy(_) => Kind::NodeProxy,
            Object::PeerAuthentication(_) => Kind::PeerAuthentication,
            Object::AuthorizationPolicy(_) => Kind::AuthorizationPolicy,
            Object::Telemetry(_) => Kind::Telemetry,
        }
    }

    pub fn meta(&self) -> &Meta {
        match self {
            Object::Namespace(o) => &o.meta,
            Object::Node(o) => &o.meta,
            Object::Pod(o) | Object::NodeWorkload(o) => &o.meta,
            Object::Service(o) => &o.meta,
            Object::EndpointSlice(o) => &o.meta,
            Object::ServiceEntry(o) => &o.meta,
            Object::WorkloadEntry(o) => &o.meta,
            Object::DestinationRule(o) => &o.meta,
            Object::Sidecar(o) => &o.meta,
            Object::VirtualService(o) => &o.meta,
            Object::RateLimitPolicy(o) => &o.meta,
            Object::MeshConfig(o) => &o.meta,
            Object::NodeProxy(o) => &o.meta,
            Object::PeerAuthentication(o) => &o.meta,
            Object::AuthorizationPolicy(o) => &o.meta,
            Object::Telemetry(o) => &o.meta,
        }
    }

    pub fn key(&self) -> ObjectKey {
        let meta = self.meta();
        ObjectKey { kind: self.kind(), namespace: meta.namespace.clone(), name: meta.name.clone() }
    }
}

/// Where a workload runs, from node topology labels (or a WorkloadEntry's `locality`).
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub struct Locality {
    pub region: String,
    pub zone: String,
    pub subzone: String,
}

impl Locality {
    pub const REGION_LABEL: &str = "topology.kubernetes.io/region";
    pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";
    /// Istio's label for the third level.
    pub const SUBZONE_LABEL: &str = "topology.istio.io/subzone";

    pub fn from_labels(labels: &Labels) -> Locality {
        let get = |k: &str| labels.get(k).cloned().unwrap_or_default();
        Locality {
            region: get(Self::REGION_LABEL),
            zone: get(Self::ZONE_LABEL),
            subzone: get(Self::SUBZONE_LABEL),
        }
    }

    /// Istio's `region/zone/subzone` form.
    pub fn parse(s: &str) -> Locality {
        let mut parts = s.splitn(3, '/').map(str::to_string);
        Locality {
            region: parts.next().unwrap_or_default(),
            zone: parts.next().unwrap_or_default(),
            subzone: parts.next().unwrap_or_default(),
        }
    }
}

/// Does `labels` carry every `key: value` of `selector`? (An empty selector matches all.)
pub fn selector_matches(selector: &Labels, labels: &Labels) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// One IP in a list, parsed; errors name the index.
pub fn parse_ips(field: &str, values: &[String], errors: &mut Vec<FieldError>) -> Vec<IpAddr> {
    values
        .iter()
        .enumerate()
        .filter_map(|(i, v)| match v.parse::<IpAddr>() {
            Ok(ip) => Some(ip),
            Err(_) => {
                errors.push(FieldError::new(format!("{field}[{i}]"), format!("`{v}` is not an IP address")));
                None
            }
        })
        .collect()
}
