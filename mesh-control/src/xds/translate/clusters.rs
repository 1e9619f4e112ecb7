//! A service port's `Cluster`s (one per DestinationRule subset) from the DestinationRule
//! policy that applies to the port, and their `ClusterLoadAssignment`s.

use std::{
    collections::{BTreeMap, BTreeSet},
    time::Duration,
};

use envoy_types::pb::{
    envoy::config::{
        cluster::v3::{self as cluster, Cluster},
        core::v3 as envoy_core,
        endpoint::v3 as endpoint,
    },
    envoy::extensions::upstreams::http::v3 as upstream_http,
    google::protobuf as pbuf,
};

use super::index::{Ep, EpTunnel};
use crate::{
    model::{Locality, istio},
    proto::{self, mesh},
    workload::WorkloadNames,
    xds::encode::{pb_duration, socket_address, string_value, to_any},
};

/// A DestinationRule as one of its subsets sees it: the subset's traffic policy over the rule's.
pub(super) fn subset_rule(dr: &istio::DestinationRule, subset: &istio::Subset) -> istio::DestinationRule {
    let mut merged = dr.clone();
    if let Some(sp) = &subset.traffic_policy {
        let mut tp = dr.spec.traffic_policy.clone().unwrap_or_default();
        tp.load_balancer = sp.load_balancer.clone().or(tp.load_balancer);
        tp.outlier_detection = sp.outlier_detection.clone().or(tp.outlier_detection);
        tp.connection_pool = sp.connection_pool.clone().or(tp.connection_pool);
        tp.tls = sp.tls.clone().or(tp.tls);
        if !sp.port_level_settings.is_empty() {
            tp.port_level_settings = sp.port_level_settings.clone();
        }
        merged.spec.traffic_policy = Some(tp);
    }
    merged
}

/// The effective policy for one port: port-level settings override the rule's top level.
pub(super) struct PortPolicy {
    lb: Option<istio::LoadBalancerSettings>,
    outlier: Option<istio::OutlierDetection>,
    connect_timeout: Option<Duration>,
    /// connectionPool limits as Envoy circuit-breaker thresholds: (tcp.maxConnections,
    /// http.http1MaxPendingRequests, http.http2MaxRequests).
    limits: [Option<u32>; 3],
    /// http.maxRequestsPerConnection.
    max_requests_per_connection: Option<u32>,
    /// tls.mode, when the rule sets one.
    tls: Option<istio::TlsMode>,
    /// tcp.tcpKeepalive.
    keepalive: Option<istio::TcpKeepalive>,
    /// tcp.idleTimeout: a relayed connection with no bytes either way for this long closes.
    tcp_idle_timeout: Option<Duration>,
    /// http.idleTimeout: a pooled upstream HTTP connection idle this long closes.
    http_idle_timeout: Option<Duration>,
}

pub(super) fn port_policy(dr: &istio::DestinationRule, port: u16) -> PortPolicy {
    let tp = dr.spec.traffic_policy.clone().unwrap_or_default();
    let pl = tp.port_level_settings.iter().find(|p| p.port.as_ref().is_some_and(|p| p.number == port));
    let pool = pl.and_then(|p| p.connection_pool.clone()).or(tp.connection_pool.clone());
    let tcp = pool.as_ref().and_then(|p| p.tcp.as_ref());
    let http = pool.as_ref().and_then(|p| p.http.as_ref());
    PortPolicy {
        lb: pl.and_then(|p| p.load_balancer.clone()).or(tp.load_balancer),
        outlier: pl.and_then(|p| p.outlier_detection.clone()).or(tp.outlier_detection),
        connect_timeout: tcp.and_then(|t| t.connect_timeout),
        limits: [
            tcp.and_then(|t| t.max_connections),
            http.and_then(|h| h.http1_max_pending_requests),
            http.and_then(|h| h.http2_max_requests),
        ],
        max_requests_per_connection: http.and_then(|h| h.max_requests_per_connection).filter(|n| *n > 0),
        tls: pl.and_then(|p| p.tls.as_ref()).or(tp.tls.as_ref()).map(|t| t.mode),
        keepalive: tcp.and_then(|t| t.tcp_keepalive.clone()),
        tcp_idle_timeout: tcp.and_then(|t| t.idle_timeout),
        http_idle_timeout: http.and_then(|h| h.idle_timeout),
    }
}

/// Where Envoy reads a cluster's upstream HTTP options.
pub(crate) const HTTP_PROTOCOL_OPTIONS: &str = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions";
const HTTP_PROTOCOL_OPTIONS_TYPE: &str =
    "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions";

/// Upstream HTTP options: at most `max` requests per connection, pooled connections closed
/// after `idle`, and the downstream's protocol upstream (what mesh-node does; Envoy needs one
/// protocol choice whenever the options exist).
fn http_options(max: Option<u32>, idle: Option<Duration>) -> upstream_http::HttpProtocolOptions {
    use upstream_http::http_protocol_options::{UpstreamProtocolOptions, UseDownstreamHttpConfig};
    upstream_http::HttpProtocolOptions {
        common_http_protocol_options: Some(envoy_core::HttpProtocolOptions {
            max_requests_per_connection: max.map(|value| pbuf::UInt32Value { value }),
            idle_timeout: idle.map(pb_duration),
            ..Default::default()
        }),
        upstream_protocol_options: Some(UpstreamProtocolOptions::UseDownstreamProtocolConfig(
            UseDownstreamHttpConfig {
                http_protocol_options: Some(envoy_core::Http1ProtocolOptions::default()),
                http2_protocol_options: Some(envoy_core::Http2ProtocolOptions::default()),
                ..Default::default()
            },
        )),
        ..Default::default()
    }
}

pub(super) fn build_cluster(
    name: &str,
    policy: Option<&PortPolicy>,
    passthrough: bool,
) -> (Cluster, Option<mesh::HashPolicy>) {
    let mut c = Cluster {
        name: name.to_string(),
        connect_timeout: Some(pb_duration(
            policy.and_then(|p| p.connect_timeout).unwrap_or(Duration::from_secs(10)),
        )),
        ..Cluster::default()
    };
    let mut hash_policy = None;
    let lb = policy.and_then(|p| p.lb.as_ref());
    let simple = lb.and_then(|lb| lb.simple);
    if passthrough || simple == Some(istio::SimpleLb::Passthrough) {
        c.cluster_discovery_type = Some(cluster::cluster::ClusterDiscoveryType::Type(
            cluster::cluster::DiscoveryType::OriginalDst as i32,
        ));
        c.lb_policy = cluster::cluster::LbPolicy::ClusterProvided as i32;
        return (c, None);
    }
    if let Some([connections, pending, requests]) = policy.map(|p| p.limits)
        && (connections.is_some() || pending.is_some() || requests.is_some())
    {
        let u32v = |v: Option<u32>| v.map(|value| pbuf::UInt32Value { value });
        c.circuit_breakers = Some(cluster::CircuitBreakers {
            thresholds: vec![cluster::circuit_breakers::Thresholds {
                max_connections: u32v(connections),
                max_pending_requests: u32v(pending),
                max_requests: u32v(requests),
                ..Default::default()
            }],
            ..Default::default()
        });
    }
    let max_requests = policy.and_then(|p| p.max_requests_per_connection);
    let http_idle = policy.and_then(|p| p.http_idle_timeout);
    if max_requests.is_some() || http_idle.is_some() {
        c.typed_extension_protocol_options.insert(
            HTTP_PROTOCOL_OPTIONS.into(),
            to_any(HTTP_PROTOCOL_OPTIONS_TYPE, &http_options(max_requests, http_idle)),
        );
    }
    if let Some(k) = policy.and_then(|p| p.keepalive.as_ref()) {
        let secs = |d: Option<Duration>| d.map(|d| pbuf::UInt32Value { value: d.as_secs() as u32 });
        c.upstream_connection_options = Some(cluster::UpstreamConnectionOptions {
            tcp_keepalive: Some(envoy_core::TcpKeepalive {
                keepalive_probes: k.probes.map(|value| pbuf::UInt32Value { value }),
                keepalive_time: secs(k.time),
                keepalive_interval: secs(k.interval),
            }),
            ..Default::default()
        });
    }
    c.metadata = cluster_metadata(policy);
    c.cluster_discovery_type =
        Some(cluster::cluster::ClusterDiscoveryType::Type(cluster::cluster::DiscoveryType::Eds as i32));
    c.eds_cluster_config = Some(cluster::cluster::EdsClusterConfig {
        eds_config: Some(envoy_core::ConfigSource {
            resource_api_version: envoy_core::ApiVersion::V3 as i32,
            config_source_specifier: Some(envoy_core::config_source::ConfigSourceSpecifier::Ads(
                envoy_core::AggregatedConfigSource::default(),
            )),
            ..Default::default()
        }),
        service_name: String::new(),
    });
    c.lb_policy = match (simple, lb.and_then(|lb| lb.consistent_hash.as_ref())) {
        (_, Some(ch)) => {
            hash_policy = Some(mesh::HashPolicy {
                key: Some(if let Some(h) = &ch.http_header_name {
                    mesh::hash_policy::Key::Header(h.to_ascii_lowercase())
                } else if let Some(ck) = &ch.http_cookie {
                    mesh::hash_policy::Key::Cookie(ck.name.clone())
                } else if let Some(q) = &ch.http_query_parameter_name {
                    mesh::hash_policy::Key::QueryParameter(q.clone())
                } else {
                    mesh::hash_policy::Key::SourceIp(true)
                }),
            });
            if let Some(m) = &ch.maglev {
                c.lb_config =
                    Some(cluster::cluster::LbConfig::MaglevLbConfig(cluster::cluster::MaglevLbConfig {
                        table_size: m.table_size.map(|v| pbuf::UInt64Value { value: v }),
                    }));
                cluster::cluster::LbPolicy::Maglev as i32
            } else {
                let min = ch.ring_hash.as_ref().and_then(|r| r.minimum_ring_size).or(ch.minimum_ring_size);
                c.lb_config =
                    Some(cluster::cluster::LbConfig::RingHashLbConfig(cluster::cluster::RingHashLbConfig {
                        minimum_ring_size: min.map(|v| pbuf::UInt64Value { value: v }),
                        ..Default::default()
                    }));
                cluster::cluster::LbPolicy::RingHash as i32
            }
        }
        (Some(istio::SimpleLb::LeastRequest | istio::SimpleLb::LeastConn), _) => {
            cluster::cluster::LbPolicy::LeastRequest as i32
        }
        (Some(istio::SimpleLb::Random), _) => cluster::cluster::LbPolicy::Random as i32,
        _ => cluster::cluster::LbPolicy::RoundRobin as i32,
    };
    let outlier = policy.and_then(|p| p.outlier.as_ref());
    if let Some(od) = outlier {
        let u32v = |v: Option<u32>| v.map(|value| pbuf::UInt32Value { value });
        c.outlier_detection = Some(cluster::OutlierDetection {
            consecutive_5xx: u32v(od.consecutive_5xx_errors.or(od.consecutive_errors)),
            consecutive_gateway_failure: u32v(od.consecutive_gateway_errors),
            consecutive_local_origin_failure: u32v(od.consecutive_local_origin_failures),
            interval: od.interval.map(pb_duration),
            base_ejection_time: od.base_ejection_time.map(pb_duration),
            max_ejection_percent: u32v(od.max_ejection_percent),
            ..Default::default()
        });
    }
    // Istio: locality-aware balancing takes effect once outlier detection is configured (so
    // failover has a signal), unless the rule turns it off.
    let locality_enabled = lb.and_then(|lb| lb.locality_lb_setting.as_ref()).and_then(|l| l.enabled);
    if outlier.is_some() && locality_enabled != Some(false) || locality_enabled == Some(true) {
        c.common_lb_config = Some(cluster::cluster::CommonLbConfig {
            locality_config_specifier: Some(
                cluster::cluster::common_lb_config::LocalityConfigSpecifier::ZoneAwareLbConfig(
                    Default::default(),
                ),
            ),
            ..Default::default()
        });
    }
    (c, hash_policy)
}

/// What Envoy's Cluster has no field for, in `filter_metadata["nodemesh.io"]`: `tls_mode`
/// (ISTIO_MUTUAL or DISABLE, from the DestinationRule) and `tcp_idle_timeout_ms` (Envoy keeps
/// that on its TCP proxy filter, and mesh-node has no listener config to carry it).
fn cluster_metadata(policy: Option<&PortPolicy>) -> Option<envoy_core::Metadata> {
    let policy = policy?;
    let mut fields = BTreeMap::new();
    match policy.tls {
        Some(istio::TlsMode::IstioMutual) => {
            fields.insert(proto::CLUSTER_TLS_MODE.to_string(), string_value("ISTIO_MUTUAL".into()));
        }
        Some(istio::TlsMode::Disable) => {
            fields.insert(proto::CLUSTER_TLS_MODE.to_string(), string_value("DISABLE".into()));
        }
        // Rejected by validation: the rule never reaches here.
        Some(istio::TlsMode::Simple | istio::TlsMode::Mutual) | None => {}
    }
    if let Some(idle) = policy.tcp_idle_timeout {
        fields.insert(
            proto::CLUSTER_TCP_IDLE_TIMEOUT_MS.to_string(),
            pbuf::Value { kind: Some(pbuf::value::Kind::NumberValue(idle.as_millis() as f64)) },
        );
    }
    (!fields.is_empty()).then(|| nodemesh_metadata(fields))
}

/// Metadata holding `fields` under `filter_metadata["nodemesh.io"]`.
fn nodemesh_metadata(fields: impl IntoIterator<Item = (String, pbuf::Value)>) -> envoy_core::Metadata {
    envoy_core::Metadata {
        filter_metadata: [(
            proto::METADATA_KEY.to_string(),
            pbuf::Struct { fields: fields.into_iter().collect() },
        )]
        .into_iter()
        .collect(),
        ..Default::default()
    }
}

pub(super) fn build_load_assignment(name: &str, eps: Vec<Ep>) -> endpoint::ClusterLoadAssignment {
    let mut groups: BTreeMap<Locality, Vec<endpoint::LbEndpoint>> = BTreeMap::new();
    let mut seen = BTreeSet::new();
    for e in eps {
        if !seen.insert((e.ip, e.port)) {
            continue;
        }
        let lb = endpoint::LbEndpoint {
            health_status: if e.healthy {
                envoy_core::HealthStatus::Healthy
            } else {
                envoy_core::HealthStatus::Unhealthy
            } as i32,
            load_balancing_weight: Some(pbuf::UInt32Value { value: e.weight }),
            host_identifier: Some(endpoint::lb_endpoint::HostIdentifier::Endpoint(endpoint::Endpoint {
                address: Some(socket_address(e.ip, e.port)),
                hostname: e.workload,
                ..Default::default()
            })),
            metadata: endpoint_metadata(e.tunnel, e.names),
        };
        groups.entry(e.locality).or_default().push(lb);
    }
    endpoint::ClusterLoadAssignment {
        cluster_name: name.to_string(),
        endpoints: groups
            .into_iter()
            .map(|(loc, lb_endpoints)| endpoint::LocalityLbEndpoints {
                locality: Some(envoy_core::Locality {
                    region: loc.region,
                    zone: loc.zone,
                    sub_zone: loc.subzone,
                }),
                // gRPC's xDS client drops localities without a weight.
                load_balancing_weight: Some(pbuf::UInt32Value { value: lb_endpoints.len() as u32 }),
                lb_endpoints,
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    }
}

/// `filter_metadata["nodemesh.io"] = {tunnel, service_account, workload}`: how a meshed
/// endpoint is reached, and how telemetry names the workload behind it.
fn endpoint_metadata(tunnel: Option<EpTunnel>, names: Option<WorkloadNames>) -> Option<envoy_core::Metadata> {
    let string = |s: String| pbuf::Value { kind: Some(pbuf::value::Kind::StringValue(s)) };
    let mut fields = Vec::new();
    if let Some(t) = tunnel {
        fields.push((proto::ENDPOINT_TUNNEL.to_string(), string(t.address.to_string())));
        fields.push((proto::ENDPOINT_SERVICE_ACCOUNT.to_string(), string(t.service_account)));
    }
    if let Some(names) = names {
        fields.push((proto::ENDPOINT_WORKLOAD.to_string(), string(names.encode())));
    }
    (!fields.is_empty()).then(|| nodemesh_metadata(fields))
}
