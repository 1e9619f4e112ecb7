//! What the node knows from the control plane, applied one response at a time: a response is
//! decoded and checked in full before anything changes (a bad one is NACKed and the previous
//! config keeps serving). Survives control-plane outages: nothing here expires.

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    sync::{Arc, RwLock},
};

use envoy_types::pb::envoy::config::{
    cluster::v3::Cluster, endpoint::v3::ClusterLoadAssignment, route::v3::RouteConfiguration,
};
use nodemesh_api::proto::{self, mesh};
use prost::Message;
use tokio::sync::Notify;

use super::resources::{AddressEntry, AddressInfo, ClusterConfig, EndpointSet, Incoming};
use crate::{
    policy::{http_route::RouteTable, l4_route::L4Routes, lb::Balancer, rate_limit::BucketRegistry},
    telemetry::{access_log::AccessLogs, tracer::Tracers},
};

#[derive(Default)]
struct State {
    addresses: HashMap<IpAddr, AddressInfo>,
    clusters: HashMap<String, Arc<Balancer>>,
    /// HTTP routes (from VirtualServices), compiled, by name.
    routes: HashMap<String, Arc<RouteTable>>,
    /// Service ports' tcp/tls routes, compiled, by `<hostname>:<port>`.
    l4_routes: HashMap<String, Arc<L4Routes>>,
    /// Workloads of this node (egress policy, locality), by `namespace/name`.
    workloads: HashMap<String, Arc<mesh::Workload>>,
    /// Last `system_version_info` applied per type.
    generation: HashMap<String, u64>,
    /// type → name → version held, for the resync after a reconnect.
    versions: HashMap<String, HashMap<String, String>>,
}

pub struct Cache {
    state: RwLock<State>,
    /// Woken whenever addresses change (on-demand lookups wait on it).
    pub address_changed: Notify,
    max_endpoints_per_cluster: usize,
    /// Rate-limit buckets, shared by the route tables that use them.
    buckets: BucketRegistry,
    /// Bumped whenever this node's Workloads (their policies) change: connections decided
    /// under an older version re-check theirs.
    pub workloads_version: std::sync::atomic::AtomicU64,
    /// Woken whenever Workloads change (inbound decisions wait on it for a new pod's policy).
    pub workloads_changed: Notify,
    /// Workloads' access logs and tracing, switched as their records change.
    access_logs: Arc<AccessLogs>,
    tracers: Arc<Tracers>,
}

impl Cache {
    pub fn new(
        max_endpoints_per_cluster: usize,
        access_logs: Arc<AccessLogs>,
        tracers: Arc<Tracers>,
    ) -> Cache {
        Cache {
            state: RwLock::default(),
            address_changed: Notify::new(),
            max_endpoints_per_cluster,
            buckets: BucketRegistry::default(),
            workloads_version: std::sync::atomic::AtomicU64::new(0),
            workloads_changed: Notify::new(),
            access_logs,
            tracers,
        }
    }

    pub fn address(&self, ip: IpAddr) -> Option<AddressInfo> {
        self.state.read().expect("cache lock").addresses.get(&ip).cloned()
    }

    pub fn cluster(&self, name: &str) -> Option<Arc<Balancer>> {
        self.state.read().expect("cache lock").clusters.get(name).cloned()
    }

    /// Cluster `name` as a caller in `namespace` reaches it: its own variant when the
    /// DestinationRule that caller sees is not the one most see (`None` if that variant, or
    /// the cluster, has not arrived — or the caller's rule lacks that subset).
    pub fn cluster_for(&self, name: &str, namespace: &str) -> Option<Arc<Balancer>> {
        let state = self.state.read().expect("cache lock");
        let cluster = state.clusters.get(name)?;
        match cluster.caller_variants.iter().find(|v| v.namespaces.contains(namespace)) {
            Some(variant) => state.clusters.get(&format!("{name}{}", variant.suffix)).cloned(),
            None => Some(Arc::clone(cluster)),
        }
    }

    pub fn route(&self, name: &str) -> Option<Arc<RouteTable>> {
        self.state.read().expect("cache lock").routes.get(name).cloned()
    }

    /// The tcp/tls routes of a service port, if it has any.
    pub fn l4_routes(&self, hostname: &str, port: u32) -> Option<Arc<L4Routes>> {
        self.state.read().expect("cache lock").l4_routes.get(&format!("{hostname}:{port}")).cloned()
    }

    pub fn workload(&self, uid: &str) -> Option<Arc<mesh::Workload>> {
        self.state.read().expect("cache lock").workloads.get(uid).cloned()
    }

    /// Applies one response of `type_url` (all of it, or nothing: `Err` is the NACK reason).
    pub fn apply(
        &self,
        type_url: &str,
        generation: u64,
        updated: Vec<Incoming>,
        removed: &[String],
    ) -> Result<(), String> {
        self.apply_resources(type_url, generation, &updated, removed)?;
        let mut s = self.state.write().expect("cache lock");
        let held = s.versions.entry(type_url.to_string()).or_default();
        for name in removed {
            held.remove(name);
        }
        for r in updated {
            held.insert(r.name, r.version);
        }
        Ok(())
    }

    fn apply_resources(
        &self,
        type_url: &str,
        generation: u64,
        updated: &[Incoming],
        removed: &[String],
    ) -> Result<(), String> {
        match type_url {
            proto::CLUSTER_TYPE => {
                self.apply_clusters(decode_each::<Cluster, ClusterConfig>(updated)?, removed)
            }
            proto::ENDPOINT_TYPE => {
                self.apply_endpoints(decode_each::<ClusterLoadAssignment, EndpointSet>(updated)?, removed)?
            }
            proto::ROUTE_TYPE => self.apply_routes(&decode_all::<RouteConfiguration>(updated)?, removed)?,
            proto::WORKLOAD_TYPE => self.apply_workloads(decode_all::<mesh::Workload>(updated)?, removed)?,
            proto::ADDRESS_TYPE => self.apply_addresses(
                updated.iter().map(AddressEntry::try_from).collect::<Result<Vec<_>, _>>()?,
                removed,
            ),
            other => return Err(format!("resource type {other} is not one this node subscribes to")),
        }
        self.state.write().expect("cache lock").generation.insert(type_url.into(), generation);
        Ok(())
    }

    fn apply_clusters(&self, configs: Vec<ClusterConfig>, removed: &[String]) {
        let mut s = self.state.write().expect("cache lock");
        for name in removed {
            s.clusters.remove(name);
        }
        for c in configs {
            // Keep endpoints and their health across a settings change.
            let mut balancer = match s.clusters.get(&c.name) {
                Some(old) => old.reconfigured(c.lb, c.outlier, c.locality_aware, c.passthrough),
                None => Balancer::new(&c.name, c.lb, c.outlier, c.locality_aware, c.passthrough),
            };
            balancer.limits = c.limits;
            balancer.connection = c.connection;
            balancer.caller_variants = c.caller_variants;
            s.clusters.insert(c.name, Arc::new(balancer));
        }
    }

    fn apply_endpoints(&self, sets: Vec<EndpointSet>, removed: &[String]) -> Result<(), String> {
        if let Some(set) = sets.iter().find(|set| set.endpoints.len() > self.max_endpoints_per_cluster) {
            return Err(format!(
                "ClusterLoadAssignment {}: {} endpoints, more than this node accepts per cluster \
                 ({}, --max-endpoints-per-cluster)",
                set.cluster,
                set.endpoints.len(),
                self.max_endpoints_per_cluster
            ));
        }
        let s = self.state.write().expect("cache lock");
        // Check every name before changing anything: a response applies whole or not at all.
        if let Some(set) = sets.iter().find(|set| !s.clusters.contains_key(&set.cluster)) {
            return Err(format!(
                "ClusterLoadAssignment {}: no Cluster of that name (clusters are sent first)",
                set.cluster
            ));
        }
        for set in sets {
            s.clusters[&set.cluster].set_endpoints(set.endpoints);
        }
        for name in removed {
            if let Some(b) = s.clusters.get(name) {
                b.set_endpoints(Vec::new());
            }
        }
        Ok(())
    }

    fn apply_routes(&self, configs: &[RouteConfiguration], removed: &[String]) -> Result<(), String> {
        let tables = configs
            .iter()
            .map(|c| RouteTable::compile(c, &self.buckets))
            .collect::<Result<Vec<_>, String>>()?;
        let mut s = self.state.write().expect("cache lock");
        for name in removed {
            s.routes.remove(name);
        }
        for t in tables {
            s.routes.insert(t.name.clone(), Arc::new(t));
        }
        Ok(())
    }

    fn apply_workloads(&self, workloads: Vec<mesh::Workload>, removed: &[String]) -> Result<(), String> {
        // Both checked before either changes: a bad record leaves everything as it was.
        let logs = self.access_logs.compile(&workloads)?;
        let tracers = self.tracers.compile(&workloads)?;
        self.access_logs.apply(logs, removed);
        self.tracers.apply(tracers, removed);
        let mut s = self.state.write().expect("cache lock");
        for name in removed {
            s.workloads.remove(name);
        }
        for w in workloads {
            s.workloads.insert(w.uid.clone(), Arc::new(w));
        }
        self.workloads_version.fetch_add(1, std::sync::atomic::Ordering::Release);
        drop(s);
        self.workloads_changed.notify_waiters();
        Ok(())
    }

    fn apply_addresses(&self, entries: Vec<AddressEntry>, removed: &[String]) {
        let mut s = self.state.write().expect("cache lock");
        for name in removed {
            if let Ok(ip) = name.parse::<IpAddr>()
                && let Some(AddressInfo::Service(old)) = s.addresses.insert(ip, AddressInfo::Unknown)
            {
                for p in &old.ports {
                    s.l4_routes.remove(&format!("{}:{}", old.hostname, p.port));
                }
            }
        }
        for entry in entries {
            for (key, table) in entry.l4_routes {
                match table {
                    None => {
                        s.l4_routes.remove(&key);
                    }
                    // An unchanged port keeps its table, and with it its weighted picks.
                    Some(t) if s.l4_routes.get(&key).is_some_and(|old| old.source == t.source) => {}
                    Some(t) => {
                        s.l4_routes.insert(key, Arc::new(t));
                    }
                }
            }
            s.addresses.insert(entry.ip, entry.info);
        }
        drop(s);
        self.address_changed.notify_waiters();
    }

    /// Resource versions held, for the resync after a reconnect (`initial_resource_versions`).
    pub fn held_versions(&self, type_url: &str) -> HashMap<String, String> {
        self.state.read().expect("cache lock").versions.get(type_url).cloned().unwrap_or_default()
    }

    /// For `/config_dump`.
    pub fn dump(&self) -> serde_json::Value {
        let s = self.state.read().expect("cache lock");
        let addresses: BTreeMap<String, String> = s
            .addresses
            .iter()
            .map(|(ip, a)| {
                let what = match a {
                    AddressInfo::Service(svc) => format!("service {}", svc.hostname),
                    AddressInfo::Workload(w) => format!("workload {}", w.uid),
                    AddressInfo::Unknown => "unknown (not in the registry)".into(),
                };
                (ip.to_string(), what)
            })
            .collect();
        let clusters: BTreeMap<&String, serde_json::Value> =
            s.clusters.iter().map(|(n, b)| (n, b.dump())).collect();
        let workloads: BTreeMap<&String, serde_json::Value> = s
            .workloads
            .iter()
            .map(|(n, w)| {
                let policy = mesh::OutboundTrafficPolicy::try_from(w.outbound_policy)
                    .map_or("unknown", |p| p.as_str_name());
                (n, serde_json::json!({ "outbound_traffic_policy": policy, "locality": w.locality.as_ref().map(|l| format!("{}/{}/{}", l.region, l.zone, l.subzone)) }))
            })
            .collect();
        serde_json::json!({
            "generation": s.generation.iter().map(|(t, g)| (t.rsplit('.').next().unwrap_or(t).to_string(), *g)).collect::<BTreeMap<_, _>>(),
            "addresses": addresses,
            "clusters": clusters,
            "routes": s.routes.keys().collect::<std::collections::BTreeSet<_>>(),
            "workloads": workloads,
        })
    }
}

fn decode_all<M: Message + Default>(updated: &[Incoming]) -> Result<Vec<M>, String> {
    updated
        .iter()
        .map(|r| {
            M::decode(r.value.as_slice()).map_err(|e| format!("resource {}: cannot decode: {e}", r.name))
        })
        .collect()
}

/// Decodes each resource as `M`, then converts it (checks included) into `T`.
fn decode_each<M, T>(updated: &[Incoming]) -> Result<Vec<T>, String>
where
    M: Message + Default,
    T: for<'m> TryFrom<&'m M, Error = String>,
{
    decode_all::<M>(updated)?.iter().map(T::try_from).collect()
}
