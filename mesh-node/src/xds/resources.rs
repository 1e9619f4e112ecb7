//! The resources a node receives, decoded into what the data path uses: one `TryFrom` per
//! resource type (Cluster → [`ClusterConfig`], ClusterLoadAssignment → [`EndpointSet`],
//! Address → [`AddressEntry`]; RouteConfigurations compile in [`crate::policy::http_route`]).
//! Every check happens here, so a bad resource is refused — its error, naming it, is the
//! NACK's detail — before the cache changes anything.

use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use envoy_types::pb::envoy::config::{
    cluster::v3::{Cluster, circuit_breakers::Thresholds, cluster},
    core::v3 as envoy_core,
    endpoint::v3::{ClusterLoadAssignment, LbEndpoint, lb_endpoint},
};
use envoy_types::pb::envoy::extensions::upstreams::http::v3::HttpProtocolOptions as UpstreamHttpOptions;
use envoy_types::pb::google::protobuf as pbuf;
use nodemesh_api::{
    proto::{ENDPOINT_SERVICE_ACCOUNT, ENDPOINT_TUNNEL, ENDPOINT_WORKLOAD, METADATA_KEY, mesh},
    workload::WorkloadNames,
};
use prost::Message;

use crate::policy::{
    caller_variants::{self, CallerVariant},
    connection_settings::ConnectionSettings,
    l4_route::L4Routes,
    lb::{Endpoint, HttpFailures, LbPolicy, OutlierSettings, PoolLimits, TunnelTarget},
    nonzero_duration, std_duration,
};

/// What an IP is, as far as the node has been told.
#[derive(Clone, Debug)]
pub enum AddressInfo {
    Service(Arc<mesh::Service>),
    Workload(Arc<mesh::Workload>),
    /// The control plane answered: no Service, ServiceEntry or workload has this IP.
    Unknown,
}

/// A decoded resource from a response: name, version, payload.
pub struct Incoming {
    pub name: String,
    pub version: String,
    pub value: Vec<u8>,
}

/// A Cluster, as the cluster's balancer is configured from it.
pub struct ClusterConfig {
    pub name: String,
    pub lb: LbPolicy,
    pub outlier: OutlierSettings,
    pub locality_aware: bool,
    /// ORIGINAL_DST: connections go where they were dialled.
    pub passthrough: bool,
    pub limits: PoolLimits,
    pub connection: ConnectionSettings,
    pub caller_variants: Vec<CallerVariant>,
}

impl TryFrom<&Cluster> for ClusterConfig {
    type Error = String;

    fn try_from(c: &Cluster) -> Result<ClusterConfig, String> {
        let http = upstream_http_options(c)?;
        let thresholds = c.circuit_breakers.as_ref().and_then(|cb| cb.thresholds.first());
        let limit =
            |f: fn(&Thresholds) -> Option<&pbuf::UInt32Value>| thresholds.and_then(f).map(|v| v.value);
        let limits = PoolLimits {
            max_requests: limit(|t| t.max_requests.as_ref()),
            max_connections: limit(|t| t.max_connections.as_ref()),
            max_pending_requests: limit(|t| t.max_pending_requests.as_ref()),
            max_requests_per_connection: http
                .as_ref()
                .and_then(|o| o.common_http_protocol_options.as_ref())
                .and_then(|o| o.max_requests_per_connection.as_ref())
                .map(|v| v.value)
                .filter(|v| *v > 0),
            connect_timeout: nonzero_duration(c.connect_timeout.as_ref()),
        };
        let (lb, outlier, locality_aware, passthrough) = cluster_settings(c)?;
        Ok(ClusterConfig {
            name: c.name.clone(),
            lb,
            outlier,
            locality_aware,
            passthrough,
            limits,
            connection: ConnectionSettings::from_cluster(c, http.as_ref())?,
            caller_variants: caller_variants::from_cluster(c)?,
        })
    }
}

/// A ClusterLoadAssignment: the endpoints of one cluster.
pub struct EndpointSet {
    pub cluster: String,
    pub endpoints: Vec<Endpoint>,
}

impl TryFrom<&ClusterLoadAssignment> for EndpointSet {
    type Error = String;

    fn try_from(cla: &ClusterLoadAssignment) -> Result<EndpointSet, String> {
        Ok(EndpointSet { cluster: cla.cluster_name.clone(), endpoints: endpoints(cla)? })
    }
}

/// An Address resource: what its IP is, and the compiled tcp/tls routes of each port of a
/// service (`None`: the port has none), by `<hostname>:<port>`.
pub struct AddressEntry {
    pub ip: IpAddr,
    pub info: AddressInfo,
    pub l4_routes: Vec<(String, Option<L4Routes>)>,
}

impl TryFrom<&Incoming> for AddressEntry {
    type Error = String;

    fn try_from(r: &Incoming) -> Result<AddressEntry, String> {
        let ip: IpAddr = r.name.parse().map_err(|_| format!("Address `{}`: name is not an IP", r.name))?;
        let a = mesh::Address::decode(r.value.as_slice())
            .map_err(|e| format!("Address {}: cannot decode: {e}", r.name))?;
        let mut l4_routes = Vec::new();
        let info = match a.kind {
            Some(mesh::address::Kind::Service(svc)) => {
                if let Some(p) = svc.ports.iter().find(|p| p.port == 0 || p.port > 65535) {
                    return Err(format!("Address {}: service port {} is not a port", r.name, p.port));
                }
                // Compiled (and so checked) once; the cache keeps an unchanged port's table.
                for p in &svc.ports {
                    let key = format!("{}:{}", svc.hostname, p.port);
                    let table = if p.l4_routes.is_empty() {
                        None
                    } else {
                        Some(L4Routes::compile(&p.l4_routes).map_err(|e| {
                            format!("Address {} ({} port {}): {e}", r.name, svc.hostname, p.port)
                        })?)
                    };
                    l4_routes.push((key, table));
                }
                AddressInfo::Service(Arc::new(svc))
            }
            Some(mesh::address::Kind::Workload(w)) => AddressInfo::Workload(Arc::new(w)),
            None => return Err(format!("Address {}: neither a service nor a workload", r.name)),
        };
        Ok(AddressEntry { ip, info, l4_routes })
    }
}

/// A Cluster's load balancing: (policy, outlier detection, locality-aware, passthrough).
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
        p.as_ref().map_or(default, std_duration)
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

/// The cluster's upstream HTTP options (`maxRequestsPerConnection`, `idleTimeout`), if set.
fn upstream_http_options(c: &Cluster) -> Result<Option<UpstreamHttpOptions>, String> {
    let Some(any) =
        c.typed_extension_protocol_options.get("envoy.extensions.upstreams.http.v3.HttpProtocolOptions")
    else {
        return Ok(None);
    };
    let options = UpstreamHttpOptions::decode(any.value.as_slice())
        .map_err(|e| format!("Cluster {}: upstream HTTP options: {e}", c.name))?;
    Ok(Some(options))
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
                names: endpoint_names(lb),
            });
        }
    }
    Ok(out)
}

/// How metrics name the endpoint's workload (`nodemesh.io` metadata `workload`). Telemetry
/// only: a value this node cannot read leaves the endpoint named by its workload key, and the
/// endpoint is taken all the same.
fn endpoint_names(lb: &LbEndpoint) -> Option<Arc<WorkloadNames>> {
    let fields = &lb.metadata.as_ref()?.filter_metadata.get(METADATA_KEY)?.fields;
    let Some(pbuf::value::Kind::StringValue(text)) = fields.get(ENDPOINT_WORKLOAD)?.kind.as_ref() else {
        return None;
    };
    WorkloadNames::decode(text).map(Arc::new)
}

/// The endpoint's tunnel, from its `nodemesh.io` metadata (`tunnel`, `service_account`); the
/// namespace is the workload's (`namespace/name`). No `tunnel`: none.
fn endpoint_tunnel(lb: &LbEndpoint, workload: &str) -> Result<Option<TunnelTarget>, String> {
    let Some(fields) =
        lb.metadata.as_ref().and_then(|m| m.filter_metadata.get(METADATA_KEY)).map(|s| &s.fields)
    else {
        return Ok(None);
    };
    // Metadata without a tunnel (only the workload's names): reached in plaintext.
    if !fields.contains_key(ENDPOINT_TUNNEL) {
        return Ok(None);
    }
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

#[cfg(test)]
mod tests {
    use envoy_types::pb::envoy::config::{core::v3::Metadata, endpoint::v3::Endpoint as EnvoyEndpoint};

    use super::*;

    fn lb_with(fields: &[(&str, &str)]) -> LbEndpoint {
        let string = |s: &str| pbuf::Value { kind: Some(pbuf::value::Kind::StringValue(s.into())) };
        LbEndpoint {
            host_identifier: Some(lb_endpoint::HostIdentifier::Endpoint(EnvoyEndpoint::default())),
            metadata: Some(Metadata {
                filter_metadata: [(
                    METADATA_KEY.to_string(),
                    pbuf::Struct { fields: fields.iter().map(|(k, v)| (k.to_string(), string(v))).collect() },
                )]
                .into(),
                ..Metadata::default()
            }),
            ..LbEndpoint::default()
        }
    }

    #[test]
    fn an_endpoint_named_for_telemetry_only_is_reached_in_plaintext() {
        let names = WorkloadNames::derive("web", "web-sa", &Default::default());
        let lb = lb_with(&[(ENDPOINT_WORKLOAD, &names.encode())]);
        assert_eq!(endpoint_tunnel(&lb, "shop/web-1").unwrap(), None);
        assert_eq!(endpoint_names(&lb).as_deref(), Some(&names));
        // A value this node cannot read names nothing, and costs the endpoint nothing.
        assert_eq!(endpoint_names(&lb_with(&[(ENDPOINT_WORKLOAD, "a;b")])), None);
        let tunnelled = lb_with(&[(ENDPOINT_TUNNEL, "10.0.0.2:15008"), (ENDPOINT_SERVICE_ACCOUNT, "web-sa")]);
        let t = endpoint_tunnel(&tunnelled, "shop/web-1").unwrap().unwrap();
        assert_eq!((t.namespace.as_str(), t.service_account.as_str()), ("shop", "web-sa"));
    }
}
