//! One config generation as xDS resources, and the slice of it a given node gets.
//!
//! Scoping: a node is sent only what its own workloads use (pushing the whole mesh to every
//! node is what makes a large mesh's proxies slow and memory-hungry) — the addresses it
//! subscribed to on demand (the first connect to an IP), the services its workloads' Sidecars
//! name, the clusters and endpoints behind those, and its own workloads.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::IpAddr,
    sync::Arc,
};

use envoy_types::pb::google::protobuf as pbuf;
use prost::Message;

use super::encode::{content_version, to_any};
use crate::proto::{self, mesh};

/// One resource, encoded once and shared by every stream that sends it.
#[derive(Clone, Debug)]
pub struct Resource {
    pub name: String,
    /// Content hash.
    pub version: String,
    pub any: pbuf::Any,
    /// For Address resources that are services: which clusters they pull in.
    pub service: Option<Arc<mesh::Service>>,
}

impl Resource {
    pub fn new(name: &str, type_url: &str, msg: &impl Message) -> Resource {
        let any = to_any(type_url, msg);
        Resource { name: name.to_string(), version: content_version(&any.value), any, service: None }
    }
}

/// What a client asked for, per type: everything scoped to it ("*"), and/or explicit names.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Subscription {
    pub wildcard: bool,
    pub names: BTreeSet<String>,
}

#[derive(Debug, Default)]
pub struct Snapshot {
    pub generation: u64,
    /// By IP (the resource name).
    pub addresses: HashMap<String, Resource>,
    /// ServiceEntry address ranges: an on-demand lookup of an IP inside one resolves to it.
    cidrs: Vec<(IpAddr, u8, Arc<mesh::Service>)>,
    pub clusters: BTreeMap<String, Resource>,
    pub endpoints: BTreeMap<String, Resource>,
    /// HTTP routes (VirtualServices), by route name `<hostname>:<port>`.
    pub routes: BTreeMap<String, Resource>,
    /// Route name → the clusters it can send to, for clients that subscribe to routes by name
    /// (Envoy, gRPC): their wildcard cluster subscription means "what my routes use".
    pub route_clusters: HashMap<String, Vec<String>>,
    /// gRPC proxyless listeners, by `<hostname>:<port>`; served only by name.
    pub listeners: BTreeMap<String, Resource>,
    pub workloads_by_node: BTreeMap<String, Vec<Resource>>,
    /// Objects that compose badly (shadowed routes, fault layers that cannot apply, rival
    /// DestinationRules): reported, never resolved by dropping one (`model::layering`).
    pub conflicts: Vec<String>,
    /// Address names each node's Sidecars ask for up front.
    pub hints_by_node: BTreeMap<String, BTreeSet<String>>,
    /// False while a freshly started control plane may not yet know every node's workloads
    /// (the resync grace): a node reconnecting with config keeps its last good config until
    /// then, instead of being handed a partial view that would drop other nodes' endpoints.
    pub warm: bool,
    /// False until every source that must be read in full before serving (the Kubernetes
    /// API's first list) has been: nothing is pushed from a partial model.
    pub synced: bool,
    /// When it was built: a push's latency counts from here.
    pub built: Option<std::time::Instant>,
}

/// The types, in the order a change is pushed: what is referenced before what references it
/// (a node never sees an address whose cluster it cannot resolve yet).
pub const PUSH_ORDER: [&str; 6] = [
    proto::CLUSTER_TYPE,
    proto::ENDPOINT_TYPE,
    proto::ROUTE_TYPE,
    proto::LISTENER_TYPE,
    proto::WORKLOAD_TYPE,
    proto::ADDRESS_TYPE,
];

impl Snapshot {
    pub fn new(generation: u64) -> Snapshot {
        Snapshot { generation, ..Snapshot::default() }
    }

    pub fn add_cidr(&mut self, ip: IpAddr, len: u8, service: Arc<mesh::Service>) {
        self.cidrs.push((ip, len, service));
    }

    /// An address by name: a known IP, or an IP inside a ServiceEntry range.
    pub fn resolve_address(&self, name: &str) -> Option<Resource> {
        if let Some(r) = self.addresses.get(name) {
            return Some(r.clone());
        }
        let ip: IpAddr = name.parse().ok()?;
        let (_, _, svc) =
            self.cidrs.iter().filter(|(net, len, _)| in_cidr(ip, *net, *len)).max_by_key(|c| c.1)?;
        let msg = mesh::Address { kind: Some(mesh::address::Kind::Service((**svc).clone())) };
        let mut r = Resource::new(name, proto::ADDRESS_TYPE, &msg);
        r.service = Some(Arc::clone(svc));
        Some(r)
    }

    /// The resources of `type_url` that `node` gets, given its subscriptions. Clusters and
    /// endpoints follow from the addresses (those the node's services use), so computing them
    /// computes the address set first.
    pub fn resources_for(
        &self,
        node: &str,
        subs: &HashMap<String, Subscription>,
        type_url: &str,
    ) -> BTreeMap<String, Resource> {
        let sub = subs.get(type_url).cloned().unwrap_or_default();
        match type_url {
            proto::ADDRESS_TYPE => self.addresses_for(node, &sub),
            proto::CLUSTER_TYPE | proto::ENDPOINT_TYPE | proto::ROUTE_TYPE => {
                let all = match type_url {
                    proto::CLUSTER_TYPE => &self.clusters,
                    proto::ENDPOINT_TYPE => &self.endpoints,
                    _ => &self.routes,
                };
                let routes = type_url == proto::ROUTE_TYPE;
                let mut set = BTreeMap::new();
                if sub.wildcard {
                    let address_sub = subs.get(proto::ADDRESS_TYPE).cloned().unwrap_or_default();
                    let addresses = self.addresses_for(node, &address_sub);
                    // Clusters: each port's own and those its route can send to; routes: each
                    // port's route.
                    let referenced = addresses.values().filter_map(|r| r.service.as_ref()).flat_map(|s| {
                        s.ports.iter().flat_map(move |p| -> Vec<&str> {
                            if routes {
                                vec![p.route.as_str()]
                            } else {
                                std::iter::once(p.cluster.as_str())
                                    .chain(p.route_clusters.iter().map(String::as_str))
                                    .collect()
                            }
                        })
                    });
                    for name in referenced {
                        if let Some(r) = all.get(name) {
                            set.insert(name.to_string(), r.clone());
                        }
                    }
                }
                if sub.wildcard && !routes {
                    let route_sub = subs.get(proto::ROUTE_TYPE).map(|s| &s.names);
                    let used =
                        route_sub.into_iter().flatten().filter_map(|r| self.route_clusters.get(r)).flatten();
                    for name in used {
                        if let Some(r) = all.get(name) {
                            set.insert(name.clone(), r.clone());
                        }
                    }
                }
                for name in &sub.names {
                    if let Some(r) = all.get(name) {
                        set.insert(name.clone(), r.clone());
                    }
                }
                set
            }
            proto::LISTENER_TYPE => sub
                .names
                .iter()
                .filter_map(|name| Some((name.clone(), self.listeners.get(name)?.clone())))
                .collect(),
            proto::WORKLOAD_TYPE => self
                .workloads_by_node
                .get(node)
                .map(|v| v.iter().map(|r| (r.name.clone(), r.clone())).collect())
                .unwrap_or_default(),
            _ => BTreeMap::new(),
        }
    }

    /// Sidecar hints (wildcard) plus the names subscribed on demand that exist.
    fn addresses_for(&self, node: &str, sub: &Subscription) -> BTreeMap<String, Resource> {
        let mut addresses = BTreeMap::new();
        if sub.wildcard
            && let Some(hints) = self.hints_by_node.get(node)
        {
            for name in hints {
                if let Some(r) = self.addresses.get(name) {
                    addresses.insert(name.clone(), r.clone());
                }
            }
        }
        for name in &sub.names {
            if let Some(r) = self.resolve_address(name) {
                addresses.insert(name.clone(), r);
            }
        }
        addresses
    }
}

pub fn in_cidr(ip: IpAddr, net: IpAddr, len: u8) -> bool {
    match (ip, net) {
        (IpAddr::V4(a), IpAddr::V4(n)) => {
            let mask = if len == 0 { 0 } else { u32::MAX << (32 - u32::from(len.min(32))) };
            u32::from(a) & mask == u32::from(n) & mask
        }
        (IpAddr::V6(a), IpAddr::V6(n)) => {
            let mask = if len == 0 { 0 } else { u128::MAX << (128 - u32::from(len.min(128))) };
            u128::from(a) & mask == u128::from(n) & mask
        }
        _ => false,
    }
}
