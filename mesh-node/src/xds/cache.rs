//! What the node knows from the control plane, applied one response at a time: a response is
//! decoded and checked in full before anything changes (a bad one is NACKed and the previous
//! config keeps serving). Survives control-plane outages: nothing here expires.

use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, SocketAddr},
    sync::{Arc, RwLock},
    time::Duration,
};

use envoy_types::pb::envoy::config::{
    cluster::v3::{Cluster, circuit_breakers::Thresholds, cluster},
    core::v3 as envoy_core,
    endpoint::v3::{ClusterLoadAssignment, LbEndpoint, lb_endpoint},
    route::v3::RouteConfiguration,
};
use envoy_types::pb::envoy::extensions::upstreams::http::v3::HttpProtocolOptions as UpstreamHttpOptions;
use envoy_types::pb::google::protobuf as pbuf;
use nodemesh_api::proto::{self, ENDPOINT_SERVICE_ACCOUNT, ENDPOINT_TUNNEL, METADATA_KEY, mesh};
use prost::Message;
use tokio::sync::Notify;

use crate::policy::{
    http_route::RouteTable,
    l4_route::L4Routes,
    lb::{Balancer, Endpoint, HttpFailures, LbPolicy, OutlierSettings, PoolLimits, TunnelTarget},
    rate_limit::BucketRegistry,
};

/// What an IP is, as far as the node has been told.
#[derive(Clone, Debug)]
pub enum AddressInfo {
    Service(Arc<mesh::Service>),
    Workload(Arc<mesh::Workload>),
    /// The control plane answered: no Service, ServiceEntry or workload has this IP.
    Unknown,
}

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
}

/// A decoded resource from a response: name, version, payload.
pub struct Incoming {
    pub name: String,
    pub version: String,
    pub value: Vec<u8>,
}

impl Cache {
    pub fn new(max_endpoints_per_cluster: usize) -> Cache {
        Cache {
            state: RwLock::default(),
            address_changed: Notify::new(),
            max_endpoints_per_cluster,
            buckets: BucketRegistry::default(),
            workloads_version: std::sync::atomic::AtomicU64::new(0),
            workloads_changed: Notify::new(),
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
                let decoded = decode_all::<Cluster>(updated)?;
                let mut configs = Vec::new();
                for c in decoded {
                    let thresholds = c.circuit_breakers.as_ref().and_then(|cb| cb.thresholds.first());
                    let limit = |f: fn(&Thresholds) -> Option<&pbuf::UInt32Value>| {
                        thresholds.and_then(f).map(|v| v.value)
                    };
                    let limits = PoolLimits {
                        max_requests: limit(|t| t.max_requests.as_ref()),
                        max_connections: limit(|t| t.max_connections.as_ref()),
                        max_pending_requests: limit(|t| t.max_pending_requests.as_ref()),
                        max_requests_per_connection: requests_per_connection(&c)?,
                        connect_timeout: c
                            .connect_timeout
                            .as_ref()
                            .map(|d| Duration::new(d.seconds.max(0) as u64, d.nanos.max(0) as u32))
                            .filter(|d| !d.is_zero()),
                    };
                    let connection =
                        crate::policy::connection_settings::ConnectionSettings::from_cluster(&c)?;
                    let variants = crate::policy::caller_variants::from_cluster(&c)?;
                    configs.push((c.name.clone(), cluster_settings(&c)?, limits, connection, variants));
                }
                let mut s = self.state.write().expect("cache lock");
                for name in removed {
                    s.clusters.remove(name);
                }
                for (name, (policy, outlier, locality_aware, passthrough), limits, connection, variants) in
                    configs
                {
                    // Keep endpoints and their health across a settings change.
                    let mut balancer = match s.clusters.get(&name) {
                        Some(old) => old.reconfigured(policy, outlier, locality_aware, passthrough),
                        None => Balancer::new(&name, policy, outlier, locality_aware, passthrough),
                    };
                    balancer.limits = limits;
                    balancer.connection = connection;
                    balancer.caller_variants = variants;
                    s.clusters.insert(name, Arc::new(balancer));
                }
                s.generation.insert(type_url.into(), generation);
            }
            proto::ENDPOINT_TYPE => {
                let decoded = decode_all::<ClusterLoadAssignment>(updated)?;
                let mut sets = Vec::new();
                for cla in decoded {
                    let eps = endpoints(&cla)?;
                    if eps.len() > self.max_endpoints_per_cluster {
                        return Err(format!(
                            "ClusterLoadAssignment {}: {} endpoints, more than this node accepts per cluster \
                             ({}, --max-endpoints-per-cluster)",
                            cla.cluster_name,
                            eps.len(),
                            self.max_endpoints_per_cluster
                        ));
                    }
                    sets.push((cla.cluster_name, eps));
                }
                let mut s = self.state.write().expect("cache lock");
                // Check every name before changing anything: a response applies whole or not at all.
                if let Some((name, _)) = sets.iter().find(|(name, _)| !s.clusters.contains_key(name)) {
                    return Err(format!(
                        "ClusterLoadAssignment {name}: no Cluster of that name (clusters are sent first)"
                    ));
                }
                for (name, eps) in sets {
                    s.clusters[&name].set_endpoints(eps);
                }
                for name in removed {
                    if let Some(b) = s.clusters.get(name) {
                        b.set_endpoints(Vec::new());
                    }
                }
                s.generation.insert(type_url.into(), generation);
            }
            proto::ROUTE_TYPE => {
                let decoded = decode_all::<RouteConfiguration>(updated)?;
                let tables = decoded.iter().map(|c| RouteTable::compile(c, &self.buckets)).collect::<Result<
                    Vec<_>,
                    String,
                >>(
                )?;
                let mut s = self.state.write().expect("cache lock");
                for name in removed {
                    s.routes.remove(name);
                }
                for t in tables {
                    s.routes.insert(t.name.clone(), Arc::new(t));
                }
                s.generation.insert(type_url.into(), generation);
            }
            proto::WORKLOAD_TYPE => {
                let decoded = decode_all::<mesh::Workload>(updated)?;
                let mut s = self.state.write().expect("cache lock");
                for name in removed {
                    s.workloads.remove(name);
                }
                for w in decoded {
                    s.workloads.insert(w.uid.clone(), Arc::new(w));
                }
                s.generation.insert(type_url.into(), generation);
                self.workloads_version.fetch_add(1, std::sync::atomic::Ordering::Release);
                drop(s);
                self.workloads_changed.notify_waiters();
            }
            proto::ADDRESS_TYPE => {
                let mut entries = Vec::new();
                let mut l4_tables: Vec<(String, Option<L4Routes>)> = Vec::new();
                for r in updated {
                    let ip: IpAddr =
                        r.name.parse().map_err(|_| format!("Address `{}`: name is not an IP", r.name))?;
                    let a = mesh::Address::decode(r.value.as_slice())
                        .map_err(|e| format!("Address {}: cannot decode: {e}", r.name))?;
                    let info = match a.kind {
                        Some(mesh::address::Kind::Service(svc)) => {
                            if let Some(p) = svc.ports.iter().find(|p| p.port == 0 || p.port > 65535) {
                                return Err(format!(
                                    "Address {}: service port {} is not a port",
                                    r.name, p.port
                                ));
                            }
                            // Compiled (and so checked) once; kept below unless unchanged.
                            for p in &svc.ports {
                                let key = format!("{}:{}", svc.hostname, p.port);
                                let table = if p.l4_routes.is_empty() {
                                    None
                                } else {
                                    Some(L4Routes::compile(&p.l4_routes).map_err(|e| {
                                        format!("Address {} ({} port {}): {e}", r.name, svc.hostname, p.port)
                                    })?)
                                };
                                l4_tables.push((key, table));
                            }
                            AddressInfo::Service(Arc::new(svc))
                        }
                        Some(mesh::address::Kind::Workload(w)) => AddressInfo::Workload(Arc::new(w)),
                        None => return Err(format!("Address {}: neither a service nor a workload", r.name)),
                    };
                    entries.push((ip, info));
                }
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
                for (key, table) in l4_tables {
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
                for (ip, info) in entries {
                    s.addresses.insert(ip, info);
                }
                s.generation.insert(type_url.into(), generation);
                drop(s);
                self.address_changed.notify_waiters();
            }
            other => return Err(format!("resource type {other} is not one this node subscribes to")),
        }
        Ok(())
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

type ClusterSettings = (LbPolicy, OutlierSettings, bool, bool);

fn cluster_settings(c: &Cluster) -> Result<ClusterSettings, String> {
    let discovery = match &c.cluster_discovery_type {
        Some(cluster::ClusterDiscoveryType::Type(t)) => cluster::DiscoveryType::try_from(*t).ok(),
        _ => None,
    };
    let passthrough = match discovery {
        Some(cluster::DiscoveryType::OriginalDst) => true,
        Some(cluster::DiscoveryType::Eds) => false,
        other => {
            return Err(format!(
                "Cluster {}: discovery type {other:?} is not supported (EDS or ORIGINAL_DST)",
                c.name
            ));
        }
    };
    let policy = match cluster::LbPolicy::try_from(c.lb_policy) {
        Ok(cluster::LbPolicy::RoundRobin) => LbPolicy::RoundRobin,
        Ok(cluster::LbPolicy::LeastRequest) => LbPolicy::LeastRequest,
        Ok(cluster::LbPolicy::Random) => LbPolicy::Random,
        Ok(cluster::LbPolicy::RingHash | cluster::LbPolicy::Maglev) => {
            let min = match &c.lb_config {
                Some(cluster::LbConfig::RingHashLbConfig(r)) => r.minimum_ring_size.as_ref().map(|v| v.value),
                _ => None,
            };
            let size = min.unwrap_or(1024);
            if size > 8 << 20 {
                return Err(format!("Cluster {}: ring size {size} is over the 8M maximum", c.name));
            }
            LbPolicy::RingHash { min_ring_size: size as usize }
        }
        Ok(cluster::LbPolicy::ClusterProvided) if passthrough => LbPolicy::RoundRobin,
        other => return Err(format!("Cluster {}: lb_policy {other:?} is not supported", c.name)),
    };
    let d = |p: &Option<envoy_types::pb::google::protobuf::Duration>, default: Duration| {
        p.as_ref().map_or(default, |d| Duration::new(d.seconds.max(0) as u64, d.nanos.max(0) as u32))
    };
    let outlier = match &c.outlier_detection {
        Some(od) => OutlierSettings {
            consecutive_failures: od
                .consecutive_gateway_failure
                .as_ref()
                .or(od.consecutive_5xx.as_ref())
                .or(od.consecutive_local_origin_failure.as_ref())
                .map_or(5, |v| v.value.max(1)),
            base_ejection: d(&od.base_ejection_time, Duration::from_secs(30)),
            max_ejection_percent: od.max_ejection_percent.as_ref().map_or(10, |v| v.value.min(100)),
            http_failures: if od.consecutive_5xx.is_some() {
                Some(HttpFailures::Any5xx)
            } else if od.consecutive_gateway_failure.is_some() {
                Some(HttpFailures::Gateway)
            } else {
                None
            },
        },
        None => OutlierSettings::default(),
    };
    let locality_aware = c.common_lb_config.as_ref().is_some_and(|l| l.locality_config_specifier.is_some());
    Ok((policy, outlier, locality_aware, passthrough))
}

/// `maxRequestsPerConnection` from the cluster's upstream HTTP options, if set.
fn requests_per_connection(c: &Cluster) -> Result<Option<u32>, String> {
    let Some(any) =
        c.typed_extension_protocol_options.get("envoy.extensions.upstreams.http.v3.HttpProtocolOptions")
    else {
        return Ok(None);
    };
    let options = UpstreamHttpOptions::decode(any.value.as_slice())
        .map_err(|e| format!("Cluster {}: upstream HTTP options: {e}", c.name))?;
    Ok(options
        .common_http_protocol_options
        .and_then(|o| o.max_requests_per_connection)
        .map(|v| v.value)
        .filter(|v| *v > 0))
}

fn endpoints(cla: &ClusterLoadAssignment) -> Result<Vec<Endpoint>, String> {
    let mut out = Vec::new();
    for group in &cla.endpoints {
        let locality = group.locality.clone().unwrap_or_default();
        for lb in &group.lb_endpoints {
            let Some(lb_endpoint::HostIdentifier::Endpoint(ep)) = &lb.host_identifier else {
                return Err(format!(
                    "ClusterLoadAssignment {}: endpoint without an address",
                    cla.cluster_name
                ));
            };
            let addr = socket_addr(ep.address.as_ref()).ok_or_else(|| {
                format!("ClusterLoadAssignment {}: endpoint address is not ip:port", cla.cluster_name)
            })?;
            let health = envoy_core::HealthStatus::try_from(lb.health_status)
                .unwrap_or(envoy_core::HealthStatus::Unknown);
            out.push(Endpoint {
                addr,
                healthy: !matches!(
                    health,
                    envoy_core::HealthStatus::Unhealthy
                        | envoy_core::HealthStatus::Draining
                        | envoy_core::HealthStatus::Timeout
                ),
                weight: lb.load_balancing_weight.as_ref().map_or(1, |w| w.value.max(1)),
                locality: (locality.region.clone(), locality.zone.clone(), locality.sub_zone.clone()),
                tunnel: endpoint_tunnel(lb, &ep.hostname).map_err(|e| {
                    format!("ClusterLoadAssignment {}: endpoint {addr}: {e}", cla.cluster_name)
                })?,
                workload: ep.hostname.clone(),
            });
        }
    }
    Ok(out)
}

/// The endpoint's tunnel, from its `nodemesh.io` metadata (`tunnel`, `service_account`); the
/// namespace is the workload's (`namespace/name`).
fn endpoint_tunnel(lb: &LbEndpoint, workload: &str) -> Result<Option<TunnelTarget>, String> {
    let Some(fields) =
        lb.metadata.as_ref().and_then(|m| m.filter_metadata.get(METADATA_KEY)).map(|s| &s.fields)
    else {
        return Ok(None);
    };
    let text = |key: &str| match fields.get(key).and_then(|v| v.kind.as_ref()) {
        Some(pbuf::value::Kind::StringValue(s)) => Ok(s.clone()),
        _ => Err(format!("metadata {METADATA_KEY}.{key} is missing or not a string")),
    };
    let address = text(ENDPOINT_TUNNEL)?;
    let address = address
        .parse()
        .map_err(|_| format!("metadata {METADATA_KEY}.{ENDPOINT_TUNNEL} `{address}` is not ip:port"))?;
    let namespace = workload.split_once('/').map(|(ns, _)| ns.to_string()).ok_or_else(|| {
        format!("a tunnelled endpoint must name its workload as namespace/name, not `{workload}`")
    })?;
    Ok(Some(TunnelTarget { address, namespace, service_account: text(ENDPOINT_SERVICE_ACCOUNT)? }))
}

fn socket_addr(a: Option<&envoy_core::Address>) -> Option<SocketAddr> {
    let Some(envoy_core::address::Address::SocketAddress(sa)) = a?.address.as_ref() else { return None };
    let ip: IpAddr = sa.address.parse().ok()?;
    let Some(envoy_core::socket_address::PortSpecifier::PortValue(port)) = sa.port_specifier else {
        return None;
    };
    Some(SocketAddr::new(ip, u16::try_from(port).ok()?))
}
