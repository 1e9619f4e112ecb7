//! Istio kinds (networking.istio.io) field for field as users write them, plus Nodemesh's
//! `MeshConfig`. Unknown fields are errors: a typo in `loadBalancer` must not silently mean
//! "default".

use std::{collections::BTreeMap, net::IpAddr, time::Duration};

use serde::{Deserialize, Serialize};

use super::{FieldError, Labels, Meta, duration};

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ServiceEntry {
    pub meta: Meta,
    pub spec: ServiceEntrySpec,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServiceEntrySpec {
    pub hosts: Vec<String>,
    #[serde(default)]
    pub addresses: Vec<String>,
    #[serde(default)]
    pub ports: Vec<SePort>,
    #[serde(default)]
    pub location: Location,
    #[serde(default)]
    pub resolution: Resolution,
    #[serde(default)]
    pub endpoints: Vec<WorkloadEntrySpec>,
    pub workload_selector: Option<WorkloadSelector>,
    #[serde(default)]
    pub export_to: Vec<String>,
    #[serde(default)]
    pub subject_alt_names: Vec<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SePort {
    pub number: u16,
    #[serde(default)]
    pub protocol: String,
    #[serde(default)]
    pub name: String,
    pub target_port: Option<u16>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Location {
    #[default]
    MeshExternal,
    MeshInternal,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Resolution {
    /// Connect to the address the client dialled (no endpoints of our own).
    #[default]
    None,
    Static,
    Dns,
    DnsRoundRobin,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WorkloadSelector {
    #[serde(default)]
    pub labels: Labels,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct WorkloadEntry {
    pub meta: Meta,
    pub spec: WorkloadEntrySpec,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WorkloadEntrySpec {
    #[serde(default)]
    pub address: String,
    /// Port name → port on this endpoint.
    #[serde(default)]
    pub ports: BTreeMap<String, u16>,
    #[serde(default)]
    pub labels: Labels,
    #[serde(default)]
    pub network: String,
    #[serde(default)]
    pub locality: String,
    #[serde(default)]
    pub weight: u32,
    #[serde(default)]
    pub service_account: String,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct DestinationRule {
    pub meta: Meta,
    pub spec: DestinationRuleSpec,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DestinationRuleSpec {
    pub host: String,
    pub traffic_policy: Option<TrafficPolicy>,
    #[serde(default)]
    pub subsets: Vec<Subset>,
    #[serde(default)]
    pub export_to: Vec<String>,
    pub workload_selector: Option<WorkloadSelector>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Subset {
    pub name: String,
    #[serde(default)]
    pub labels: Labels,
    pub traffic_policy: Option<TrafficPolicy>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TrafficPolicy {
    pub load_balancer: Option<LoadBalancerSettings>,
    pub outlier_detection: Option<OutlierDetection>,
    pub connection_pool: Option<ConnectionPoolSettings>,
    pub tls: Option<ClientTlsSettings>,
    #[serde(default)]
    pub port_level_settings: Vec<PortTrafficPolicy>,
    /// Not enforced: rejected when set.
    pub tunnel: Option<serde_json::Value>,
    /// Not enforced: rejected when set.
    pub proxy_protocol: Option<serde_json::Value>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PortTrafficPolicy {
    pub port: Option<PortSelector>,
    pub load_balancer: Option<LoadBalancerSettings>,
    pub outlier_detection: Option<OutlierDetection>,
    pub connection_pool: Option<ConnectionPoolSettings>,
    pub tls: Option<ClientTlsSettings>,
}

/// Istio `ClientTLSSettings`: how the caller's proxy speaks to the destination. Nodemesh
/// enforces the two mesh modes — ISTIO_MUTUAL (only through the mTLS tunnel: an endpoint
/// without a mesh identity is not dialled) and DISABLE (plaintext even to meshed endpoints,
/// which their PeerAuthentication then judges) — and rejects TLS origination (SIMPLE,
/// MUTUAL) and the fields only it uses.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ClientTlsSettings {
    #[serde(default)]
    pub mode: TlsMode,
    pub client_certificate: Option<String>,
    pub private_key: Option<String>,
    pub ca_certificates: Option<String>,
    pub credential_name: Option<String>,
    #[serde(default)]
    pub subject_alt_names: Vec<String>,
    pub sni: Option<String>,
    pub insecure_skip_verify: Option<bool>,
    pub ca_crl: Option<String>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum TlsMode {
    #[default]
    Disable,
    Simple,
    Mutual,
    IstioMutual,
}

/// Istio `TcpKeepalive`: keepalive probes on the upstream connections. Unset fields keep the
/// kernel's defaults (net.ipv4.tcp_keepalive_*), as in Istio.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TcpKeepalive {
    pub probes: Option<u32>,
    #[serde(default, with = "duration::option")]
    pub time: Option<Duration>,
    #[serde(default, with = "duration::option")]
    pub interval: Option<Duration>,
}

/// Istio `ConnectionPoolSettings`. Enforced by mesh-node: tcp.maxConnections,
/// tcp.connectTimeout, tcp.tcpKeepalive, tcp.idleTimeout, http.http1MaxPendingRequests,
/// http.http2MaxRequests, http.maxRequestsPerConnection, http.idleTimeout; what mesh-node does
/// not enforce is rejected (see [`ConnectionPoolSettings::check`]).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ConnectionPoolSettings {
    pub tcp: Option<TcpSettings>,
    pub http: Option<HttpSettings>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TcpSettings {
    pub max_connections: Option<u32>,
    #[serde(default, with = "duration::option")]
    pub connect_timeout: Option<Duration>,
    pub tcp_keepalive: Option<TcpKeepalive>,
    #[serde(default, with = "duration::option")]
    pub max_connection_duration: Option<Duration>,
    #[serde(default, with = "duration::option")]
    pub idle_timeout: Option<Duration>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpSettings {
    pub http1_max_pending_requests: Option<u32>,
    pub http2_max_requests: Option<u32>,
    pub max_requests_per_connection: Option<u32>,
    pub max_retries: Option<u32>,
    #[serde(default, with = "duration::option")]
    pub idle_timeout: Option<Duration>,
    pub h2_upgrade_policy: Option<String>,
    pub use_client_protocol: Option<bool>,
    pub max_concurrent_streams: Option<u32>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PortSelector {
    pub number: u16,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LoadBalancerSettings {
    pub simple: Option<SimpleLb>,
    pub consistent_hash: Option<ConsistentHash>,
    pub locality_lb_setting: Option<LocalityLbSetting>,
    #[serde(default, with = "duration::option")]
    pub warmup_duration_secs: Option<Duration>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum SimpleLb {
    Unspecified,
    LeastConn,
    Random,
    Passthrough,
    RoundRobin,
    LeastRequest,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ConsistentHash {
    pub http_header_name: Option<String>,
    pub http_cookie: Option<HttpCookie>,
    pub use_source_ip: Option<bool>,
    pub http_query_parameter_name: Option<String>,
    pub ring_hash: Option<RingHash>,
    pub maglev: Option<Maglev>,
    pub minimum_ring_size: Option<u64>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpCookie {
    pub name: String,
    #[serde(default)]
    pub path: String,
    #[serde(default, with = "duration::option")]
    pub ttl: Option<Duration>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RingHash {
    pub minimum_ring_size: Option<u64>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Maglev {
    pub table_size: Option<u64>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LocalityLbSetting {
    pub enabled: Option<bool>,
    #[serde(default)]
    pub distribute: Vec<serde_json::Value>,
    #[serde(default)]
    pub failover: Vec<LocalityFailover>,
    #[serde(default)]
    pub failover_priority: Vec<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LocalityFailover {
    pub from: String,
    pub to: String,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OutlierDetection {
    pub consecutive_errors: Option<u32>,
    pub consecutive_gateway_errors: Option<u32>,
    #[serde(rename = "consecutive5xxErrors")]
    pub consecutive_5xx_errors: Option<u32>,
    pub consecutive_local_origin_failures: Option<u32>,
    pub split_external_local_origin_errors: Option<bool>,
    #[serde(default, with = "duration::option")]
    pub interval: Option<Duration>,
    #[serde(default, with = "duration::option")]
    pub base_ejection_time: Option<Duration>,
    pub max_ejection_percent: Option<u32>,
    pub min_health_percent: Option<u32>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Sidecar {
    pub meta: Meta,
    pub spec: SidecarSpec,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SidecarSpec {
    pub workload_selector: Option<WorkloadSelector>,
    #[serde(default)]
    pub egress: Vec<SidecarEgress>,
    #[serde(default)]
    pub ingress: Vec<serde_json::Value>,
    pub outbound_traffic_policy: Option<OutboundTrafficPolicySpec>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SidecarEgress {
    pub port: Option<serde_json::Value>,
    #[serde(default)]
    pub bind: String,
    #[serde(default)]
    pub capture_mode: String,
    pub hosts: Vec<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OutboundTrafficPolicySpec {
    #[serde(default)]
    pub mode: OutboundMode,
    pub egress_proxy: Option<serde_json::Value>,
}

impl Sidecar {
    /// Its egress hosts as (namespace, host) patterns: `.` made this Sidecar's namespace, short
    /// hosts qualified in the namespace they name.
    pub fn egress_patterns(&self) -> Vec<(String, String)> {
        self.spec
            .egress
            .iter()
            .flat_map(|e| e.hosts.iter())
            .filter_map(|h| h.split_once('/'))
            .map(|(ns, host)| {
                let ns = if ns == "." { self.meta.namespace.as_str() } else { ns };
                let host = if host.starts_with('*') || ns == "*" {
                    host.to_string()
                } else {
                    super::qualify(host, ns)
                };
                (ns.to_string(), host)
            })
            .collect()
    }
}

pub use nodemesh_api::matchers::egress_allows;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum OutboundMode {
    #[default]
    AllowAny,
    RegistryOnly,
}

/// `nodemesh.io/v1alpha1 MeshConfig`: the mesh-wide settings Istio keeps in its `mesh`
/// ConfigMap (only the ones Nodemesh implements).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct MeshConfig {
    pub meta: Meta,
    pub spec: MeshConfigSpec,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MeshConfigSpec {
    #[serde(default)]
    pub outbound_traffic_policy: OutboundTrafficPolicySpec,
    /// Default `cluster.local`.
    pub trust_domain: Option<String>,
    /// Where selector-less security policies apply mesh-wide; default `istio-system`.
    pub root_namespace: Option<String>,
    /// What meshed pods' traffic does while their node has no mesh-node running (a crash, an
    /// upgrade's gap): Nodemesh's own field.
    #[serde(default)]
    pub node_proxy_down: NodeProxyDown,
    /// Istio's: set, the built-in `envoy` access log is on for every workload, to this path
    /// (`/dev/stdout` for the node's log) unless a Telemetry turns it off.
    pub access_log_file: Option<String>,
    #[serde(default)]
    pub access_log_encoding: AccessLogEncoding,
    /// The `envoy` provider's text format (Envoy command operators); unset: Istio's default.
    pub access_log_format: Option<String>,
    #[serde(default)]
    pub extension_providers: Vec<ExtensionProvider>,
    #[serde(default)]
    pub default_providers: DefaultProviders,
    /// Istio's ProxyConfig defaults; Nodemesh reads `tracing.sampling` from it.
    #[serde(default)]
    pub default_config: ProxyDefaults,
}

/// `MeshConfig.defaultConfig` (Istio's ProxyConfig): only what a node proxy of Nodemesh uses.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ProxyDefaults {
    #[serde(default)]
    pub tracing: TracingDefaults,
}

/// `defaultConfig.tracing`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TracingDefaults {
    /// Percent of requests sampled where no Telemetry sets `randomSamplingPercentage`;
    /// unset: 1.
    pub sampling: Option<f64>,
}

/// The access-log provider every mesh has: Envoy's file log to the node's stdout.
pub const ENVOY_PROVIDER: &str = "envoy";

/// `MeshConfig.accessLogEncoding`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum AccessLogEncoding {
    #[default]
    Text,
    Json,
}

/// `MeshConfig.extensionProviders[]`: named backends Telemetry objects refer to. Envoy's file
/// access log, Zipkin and OpenTelemetry (OTLP/gRPC) tracing are applied; the other kinds are
/// read so that a mesh config written for Istio loads, and are named in the log when a
/// Telemetry selects them.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ExtensionProvider {
    pub name: String,
    pub envoy_file_access_log: Option<EnvoyFileAccessLog>,
    pub zipkin: Option<ZipkinProvider>,
    pub opentelemetry: Option<OpenTelemetryProvider>,
    pub envoy_otel_als: Option<serde_json::Value>,
    pub envoy_http_als: Option<serde_json::Value>,
    pub envoy_tcp_als: Option<serde_json::Value>,
    pub prometheus: Option<serde_json::Value>,
    pub stackdriver: Option<serde_json::Value>,
    pub skywalking: Option<serde_json::Value>,
    pub datadog: Option<serde_json::Value>,
    pub lightstep: Option<serde_json::Value>,
    pub envoy_ext_authz_http: Option<serde_json::Value>,
    pub envoy_ext_authz_grpc: Option<serde_json::Value>,
}

/// Zipkin v2 JSON over HTTP.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ZipkinProvider {
    /// The collector's host (a Service's hostname, or an address).
    pub service: String,
    pub port: u16,
    pub max_tag_length: Option<u32>,
    /// Nodemesh always sends 128-bit trace ids, as W3C trace context needs.
    pub enable_64bit_trace_id: Option<bool>,
    /// Default `/api/v2/spans`.
    pub path: Option<String>,
}

/// OpenTelemetry: OTLP over gRPC (`http` — OTLP over HTTP — is not supported yet).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OpenTelemetryProvider {
    pub service: String,
    pub port: u16,
    pub max_tag_length: Option<u32>,
    pub http: Option<serde_json::Value>,
    pub grpc: Option<serde_json::Value>,
    pub resource_detectors: Option<serde_json::Value>,
    pub dynatrace_sampler: Option<serde_json::Value>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EnvoyFileAccessLog {
    pub path: String,
    pub log_format: Option<LogFormat>,
}

/// Text or JSON (`labels`: key → command-operator format).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogFormat {
    pub text: Option<String>,
    pub labels: Option<BTreeMap<String, String>>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DefaultProviders {
    #[serde(default)]
    pub access_logging: Vec<String>,
    #[serde(default)]
    pub tracing: Vec<String>,
    #[serde(default)]
    pub metrics: Vec<String>,
}

impl MeshConfigSpec {
    pub fn check(&self, errors: &mut Vec<FieldError>) {
        use nodemesh_api::access_log::Template;
        if let Some(format) = &self.access_log_format
            && let Err(e) = Template::parse(format)
        {
            errors.push(FieldError::new("spec.accessLogFormat", e));
        }
        if self.default_config.tracing.sampling.is_some_and(|p| !(0.0..=100.0).contains(&p)) {
            errors.push(FieldError::new("spec.defaultConfig.tracing.sampling", "must be within 0-100"));
        }
        let mut names = std::collections::BTreeSet::new();
        for (i, p) in self.extension_providers.iter().enumerate() {
            let at = |field: &str| format!("spec.extensionProviders[{i}]{field}");
            if p.name.is_empty() {
                errors.push(FieldError::new(at(".name"), "empty"));
            } else if !names.insert(p.name.as_str()) || p.name == ENVOY_PROVIDER {
                errors.push(FieldError::new(
                    at(".name"),
                    format!("`{}` is defined twice (or is the built-in `envoy`)", p.name),
                ));
            }
            let kinds = [
                p.envoy_file_access_log.is_some(),
                p.zipkin.is_some(),
                p.opentelemetry.is_some(),
                p.envoy_otel_als.is_some(),
                p.envoy_http_als.is_some(),
                p.envoy_tcp_als.is_some(),
                p.prometheus.is_some(),
                p.stackdriver.is_some(),
                p.skywalking.is_some(),
                p.datadog.is_some(),
                p.lightstep.is_some(),
                p.envoy_ext_authz_http.is_some(),
                p.envoy_ext_authz_grpc.is_some(),
            ];
            if kinds.iter().filter(|k| **k).count() != 1 {
                errors.push(FieldError::new(
                    at(""),
                    "needs exactly one provider kind (envoyFileAccessLog, zipkin, …)",
                ));
            }
            let collector = match (&p.zipkin, &p.opentelemetry) {
                (Some(z), _) => Some((".zipkin", z.service.as_str(), z.port)),
                (_, Some(o)) => Some((".opentelemetry", o.service.as_str(), o.port)),
                _ => None,
            };
            if let Some((kind, service, port)) = collector {
                if service.is_empty() {
                    errors.push(FieldError::new(at(&format!("{kind}.service")), "empty"));
                }
                if port == 0 {
                    errors.push(FieldError::new(at(&format!("{kind}.port")), "missing"));
                }
            }
            if let Some(otel) = &p.opentelemetry {
                for (field, set) in [
                    ("http", otel.http.is_some()),
                    ("resourceDetectors", otel.resource_detectors.is_some()),
                    ("dynatraceSampler", otel.dynatrace_sampler.is_some()),
                ] {
                    if set {
                        errors.push(FieldError::new(
                            at(&format!(".opentelemetry.{field}")),
                            "not supported by Nodemesh (spans go over OTLP/gRPC)",
                        ));
                    }
                }
            }
            let Some(file) = &p.envoy_file_access_log else { continue };
            if file.path.is_empty() {
                errors.push(FieldError::new(
                    at(".envoyFileAccessLog.path"),
                    "empty (use /dev/stdout for the node's log)",
                ));
            }
            let format = file.log_format.clone().unwrap_or_default();
            if format.text.is_some() && format.labels.is_some() {
                errors.push(FieldError::new(at(".envoyFileAccessLog.logFormat"), "text or labels, not both"));
            }
            if let Some(Err(e)) = format.text.as_deref().map(Template::parse) {
                errors.push(FieldError::new(at(".envoyFileAccessLog.logFormat.text"), e));
            }
            for (key, value) in format.labels.iter().flatten() {
                if let Err(e) = Template::parse(value) {
                    errors
                        .push(FieldError::new(at(&format!(".envoyFileAccessLog.logFormat.labels.{key}")), e));
                }
            }
        }
    }
}

/// `MeshConfig.nodeProxyDown`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum NodeProxyDown {
    /// Pods whose PeerAuthentication is STRICT neither reach nor are reached in plaintext
    /// (connects both ways refused); other meshed pods connect directly.
    #[default]
    StrictClosed,
    /// Every meshed pod's connections, both ways, are refused.
    AllClosed,
}

/// Checks `exportTo`: `*` (every namespace, the default), `.` (the object's own), `~` (none),
/// or namespace names.
pub fn check_export_to(field: &str, values: &[String], errors: &mut Vec<FieldError>) {
    for (i, v) in values.iter().enumerate() {
        let name_ok = !v.is_empty()
            && v.len() <= 63
            && v.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !v.starts_with('-')
            && !v.ends_with('-');
        if !(v == "*" || v == "." || v == "~" || name_ok) {
            errors.push(FieldError::new(
                format!("{field}[{i}]"),
                format!("`{v}` is not `*`, `.`, `~` or a namespace name"),
            ));
        }
    }
    if values.iter().any(|v| v == "~") && values.len() > 1 {
        errors.push(FieldError::new(field, "`~` (visible to no namespace) cannot be combined"));
    }
}

/// Checks an Istio host name: a DNS name, optionally with a leading `*.` wildcard.
pub fn check_host(field: String, host: &str, errors: &mut Vec<FieldError>) {
    let name = host.strip_prefix("*.").unwrap_or(host);
    let ok = host == "*"
        || (!name.is_empty()
            && name.len() <= 253
            && name.split('.').all(|l| {
                !l.is_empty()
                    && l.len() <= 63
                    && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                    && !l.starts_with('-')
                    && !l.ends_with('-')
            }));
    if !ok {
        errors.push(FieldError::new(field, format!("`{host}` is not a valid host name")));
    }
}

impl ServiceEntrySpec {
    pub fn check(&self, errors: &mut Vec<FieldError>) {
        check_export_to("spec.exportTo", &self.export_to, errors);
        if !self.subject_alt_names.is_empty() {
            errors.push(not_enforced("spec.subjectAltNames", "ServiceEntry"));
        }
        if self.hosts.is_empty() {
            errors.push(FieldError::new("spec.hosts", "at least one host is required"));
        }
        for (i, h) in self.hosts.iter().enumerate() {
            check_host(format!("spec.hosts[{i}]"), h, errors);
        }
        for (i, a) in self.addresses.iter().enumerate() {
            let ip = a.split_once('/').map_or(a.as_str(), |(ip, _)| ip);
            if ip.parse::<IpAddr>().is_err() {
                errors.push(FieldError::new(
                    format!("spec.addresses[{i}]"),
                    format!("`{a}` is not an IP or CIDR"),
                ));
            }
        }
        if self.ports.is_empty() {
            errors.push(FieldError::new("spec.ports", "at least one port is required"));
        }
        for (i, p) in self.ports.iter().enumerate() {
            if p.number == 0 {
                errors.push(FieldError::new(format!("spec.ports[{i}].number"), "0 is not a port"));
            }
        }
        if self.resolution == Resolution::Static
            && self.endpoints.is_empty()
            && self.workload_selector.is_none()
        {
            errors.push(FieldError::new(
                "spec.endpoints",
                "resolution STATIC needs endpoints or a workloadSelector",
            ));
        }
        if matches!(self.resolution, Resolution::Dns | Resolution::DnsRoundRobin) {
            errors.push(FieldError::new(
                "spec.resolution",
                "DNS resolution is not supported yet (use STATIC with endpoints, or NONE)",
            ));
        }
        if self.resolution == Resolution::None && self.addresses.is_empty() {
            // Valid in Istio (matched by port only); Nodemesh routes by destination address,
            // so such an entry only whitelists hosts for REGISTRY_ONLY by its addresses.
            errors.push(FieldError::new(
                "spec.addresses",
                "resolution NONE without addresses matches nothing: Nodemesh routes by the \
                 dialled address; list the addresses (or CIDRs) these hosts use",
            ));
        }
        for (i, e) in self.endpoints.iter().enumerate() {
            e.check(&format!("spec.endpoints[{i}]."), errors);
        }
    }
}

impl WorkloadEntrySpec {
    pub fn check(&self, prefix: &str, errors: &mut Vec<FieldError>) {
        if self.address.parse::<IpAddr>().is_err() {
            errors.push(FieldError::new(
                format!("{prefix}address"),
                format!(
                    "`{}` is not an IP address (DNS names and unix sockets are not supported)",
                    self.address
                ),
            ));
        }
    }
}

impl DestinationRuleSpec {
    pub fn check(&self, errors: &mut Vec<FieldError>) {
        check_export_to("spec.exportTo", &self.export_to, errors);
        check_host("spec.host".into(), &self.host, errors);
        if let Some(tp) = &self.traffic_policy {
            tp.check("spec.trafficPolicy", errors);
        }
        let mut seen = std::collections::BTreeSet::new();
        for (i, s) in self.subsets.iter().enumerate() {
            if s.name.is_empty() {
                errors.push(FieldError::new(format!("spec.subsets[{i}].name"), "must not be empty"));
            } else if !seen.insert(&s.name) {
                errors.push(FieldError::new(
                    format!("spec.subsets[{i}].name"),
                    format!("duplicate subset `{}`", s.name),
                ));
            }
            if let Some(tp) = &s.traffic_policy {
                tp.check(&format!("spec.subsets[{i}].trafficPolicy"), errors);
            }
        }
    }
}

/// A field Nodemesh does not enforce: the object is rejected rather than applied without it.
pub fn not_enforced(field: impl Into<String>, kind: &str) -> FieldError {
    FieldError::new(
        field,
        format!(
            "not enforced by this version of Nodemesh; the {kind} is rejected rather than applied without it"
        ),
    )
}

impl TrafficPolicy {
    fn check(&self, at: &str, errors: &mut Vec<FieldError>) {
        if let Some(lb) = &self.load_balancer {
            lb.check(&format!("{at}.loadBalancer"), errors);
        }
        if let Some(od) = &self.outlier_detection {
            od.check(&format!("{at}.outlierDetection"), errors);
        }
        if let Some(pool) = &self.connection_pool {
            pool.check(&format!("{at}.connectionPool"), errors);
        }
        if let Some(tls) = &self.tls {
            tls.check(&format!("{at}.tls"), errors);
        }
        if self.tunnel.is_some() {
            errors.push(not_enforced(format!("{at}.tunnel"), "DestinationRule"));
        }
        if self.proxy_protocol.is_some() {
            errors.push(not_enforced(format!("{at}.proxyProtocol"), "DestinationRule"));
        }
        for (i, p) in self.port_level_settings.iter().enumerate() {
            let at = format!("{at}.portLevelSettings[{i}]");
            if p.port.as_ref().is_none_or(|p| p.number == 0) {
                errors.push(FieldError::new(format!("{at}.port.number"), "a port number is required"));
            }
            if let Some(lb) = &p.load_balancer {
                lb.check(&format!("{at}.loadBalancer"), errors);
            }
            if let Some(od) = &p.outlier_detection {
                od.check(&format!("{at}.outlierDetection"), errors);
            }
            if let Some(pool) = &p.connection_pool {
                pool.check(&format!("{at}.connectionPool"), errors);
            }
            if let Some(tls) = &p.tls {
                tls.check(&format!("{at}.tls"), errors);
            }
        }
    }
}

impl ClientTlsSettings {
    fn check(&self, at: &str, errors: &mut Vec<FieldError>) {
        let origination = match self.mode {
            TlsMode::Simple => Some("SIMPLE"),
            TlsMode::Mutual => Some("MUTUAL"),
            TlsMode::Disable | TlsMode::IstioMutual => None,
        };
        if let Some(mode) = origination {
            errors.push(FieldError::new(
                format!("{at}.mode"),
                format!(
                    "{mode}: TLS origination is not supported yet (supported: ISTIO_MUTUAL, the mesh's \
                     own mTLS; DISABLE, plaintext); the DestinationRule is rejected rather than \
                     sending plaintext"
                ),
            ));
        }
        let origination_only = [
            ("clientCertificate", self.client_certificate.is_some()),
            ("privateKey", self.private_key.is_some()),
            ("caCertificates", self.ca_certificates.is_some()),
            ("credentialName", self.credential_name.is_some()),
            ("subjectAltNames", !self.subject_alt_names.is_empty()),
            ("sni", self.sni.is_some()),
            ("insecureSkipVerify", self.insecure_skip_verify.is_some()),
            ("caCrl", self.ca_crl.is_some()),
        ];
        for (field, set) in origination_only {
            if set {
                errors.push(not_enforced(format!("{at}.{field}"), "DestinationRule"));
            }
        }
    }
}

impl ConnectionPoolSettings {
    fn check(&self, at: &str, errors: &mut Vec<FieldError>) {
        if let Some(tcp) = &self.tcp {
            if tcp.max_connection_duration.is_some() {
                errors.push(not_enforced(format!("{at}.tcp.maxConnectionDuration"), "DestinationRule"));
            }
            if let Some(k) = &tcp.tcp_keepalive {
                if k.probes == Some(0) {
                    errors
                        .push(FieldError::new(format!("{at}.tcp.tcpKeepalive.probes"), "must be at least 1"));
                }
                for (field, d) in [("time", k.time), ("interval", k.interval)] {
                    if d.is_some_and(|d| d < Duration::from_secs(1)) {
                        errors.push(FieldError::new(
                            format!("{at}.tcp.tcpKeepalive.{field}"),
                            "the kernel counts keepalive in whole seconds: at least 1s",
                        ));
                    }
                }
            }
        }
        if let Some(http) = &self.http {
            if http.max_retries.is_some() {
                errors.push(FieldError::new(
                    format!("{at}.http.maxRetries"),
                    "not enforced: retries are bounded by each cluster's retry budget (about 20% of \
                     requests); the DestinationRule is rejected rather than applied without it",
                ));
            }
            match http.h2_upgrade_policy.as_deref() {
                None | Some("DEFAULT" | "DO_NOT_UPGRADE") => {}
                Some("UPGRADE") => errors.push(FieldError::new(
                    format!("{at}.http.h2UpgradePolicy"),
                    "UPGRADE is not enforced: mesh-node speaks the client's protocol upstream \
                     (DEFAULT and DO_NOT_UPGRADE mean that)",
                )),
                Some(other) => errors.push(FieldError::new(
                    format!("{at}.http.h2UpgradePolicy"),
                    format!("`{other}` is not DEFAULT, DO_NOT_UPGRADE or UPGRADE"),
                )),
            }
            if http.use_client_protocol == Some(false) {
                errors.push(FieldError::new(
                    format!("{at}.http.useClientProtocol"),
                    "false is not enforced: mesh-node always speaks the client's protocol upstream",
                ));
            }
            if http.max_concurrent_streams.is_some() {
                errors.push(not_enforced(format!("{at}.http.maxConcurrentStreams"), "DestinationRule"));
            }
        }
    }
}

impl LoadBalancerSettings {
    fn check(&self, at: &str, errors: &mut Vec<FieldError>) {
        if self.warmup_duration_secs.is_some() {
            errors.push(not_enforced(format!("{at}.warmupDurationSecs"), "DestinationRule"));
        }
        if let Some(l) = &self.locality_lb_setting {
            for (field, set) in [
                ("distribute", !l.distribute.is_empty()),
                ("failover", !l.failover.is_empty()),
                ("failoverPriority", !l.failover_priority.is_empty()),
            ] {
                if set {
                    errors.push(not_enforced(format!("{at}.localityLbSetting.{field}"), "DestinationRule"));
                }
            }
        }
        if self.simple.is_some() && self.consistent_hash.is_some() {
            errors.push(FieldError::new(at, "set either `simple` or `consistentHash`, not both"));
        }
        if let Some(ch) = &self.consistent_hash {
            let keys = [
                ch.http_header_name.is_some(),
                ch.http_cookie.is_some(),
                ch.use_source_ip == Some(true),
                ch.http_query_parameter_name.is_some(),
            ];
            if keys.iter().filter(|k| **k).count() != 1 {
                errors.push(FieldError::new(
                    format!("{at}.consistentHash"),
                    "exactly one hash key is required: httpHeaderName, httpCookie, useSourceIp or \
                     httpQueryParameterName",
                ));
            }
            if let Some(c) = &ch.http_cookie
                && c.name.is_empty()
            {
                errors.push(FieldError::new(
                    format!("{at}.consistentHash.httpCookie.name"),
                    "must not be empty",
                ));
            }
            if ch.ring_hash.is_some() && ch.maglev.is_some() {
                errors.push(FieldError::new(
                    format!("{at}.consistentHash"),
                    "set either `ringHash` or `maglev`",
                ));
            }
        }
    }
}

impl OutlierDetection {
    fn check(&self, at: &str, errors: &mut Vec<FieldError>) {
        if let Some(p) = self.max_ejection_percent
            && p > 100
        {
            errors.push(FieldError::new(format!("{at}.maxEjectionPercent"), format!("{p} is over 100")));
        }
        if let Some(p) = self.min_health_percent
            && p > 100
        {
            errors.push(FieldError::new(format!("{at}.minHealthPercent"), format!("{p} is over 100")));
        }
    }
}

impl SidecarSpec {
    pub fn check(&self, errors: &mut Vec<FieldError>) {
        if !self.ingress.is_empty() {
            errors.push(FieldError::new(
                "spec.ingress",
                "not enforced: there is no sidecar to configure listeners in; inbound traffic reaches \
                 the pod on its own ports (use PeerAuthentication and AuthorizationPolicy to govern it); \
                 the Sidecar is rejected rather than applied without it",
            ));
        }
        if self.outbound_traffic_policy.as_ref().is_some_and(|p| p.egress_proxy.is_some()) {
            errors.push(not_enforced("spec.outboundTrafficPolicy.egressProxy", "Sidecar"));
        }
        for (i, e) in self.egress.iter().enumerate() {
            let at = format!("spec.egress[{i}]");
            if e.port.is_some() {
                errors.push(not_enforced(format!("{at}.port"), "Sidecar"));
            }
            if !e.bind.is_empty() {
                errors.push(not_enforced(format!("{at}.bind"), "Sidecar"));
            }
            if !e.capture_mode.is_empty() && e.capture_mode != "DEFAULT" {
                errors.push(FieldError::new(
                    format!("{at}.captureMode"),
                    format!(
                        "`{}` is not enforced: capture is by eBPF at connect(), for every port \
                         (DEFAULT); the Sidecar is rejected rather than applied without it",
                        e.capture_mode
                    ),
                ));
            }
        }
        for (i, e) in self.egress.iter().enumerate() {
            if e.hosts.is_empty() {
                errors.push(FieldError::new(
                    format!("spec.egress[{i}].hosts"),
                    "at least one host is required",
                ));
            }
            for (j, h) in e.hosts.iter().enumerate() {
                let field = format!("spec.egress[{i}].hosts[{j}]");
                match h.split_once('/') {
                    Some((ns, host)) if !ns.is_empty() => check_host(field, host, errors),
                    _ => errors.push(FieldError::new(
                        field,
                        format!("`{h}` must be `namespace/host` (`./host` for the Sidecar's own namespace, `*/host` for any)"),
                    )),
                }
            }
        }
    }
}

#[cfg(test)]
mod egress_tests {
    use super::*;

    #[test]
    fn egress_hosts_resolve_and_match_like_istio() {
        let sidecar = Sidecar {
            meta: Meta { name: "default".into(), namespace: "shop".into(), ..Default::default() },
            spec: SidecarSpec {
                egress: vec![SidecarEgress {
                    hosts: vec![
                        "./reviews".into(),
                        "*/api.example.com".into(),
                        "data/*.svc.cluster.local".into(),
                    ],
                    ..Default::default()
                }],
                ..Default::default()
            },
        };
        let p = sidecar.egress_patterns();
        assert_eq!(p[0], ("shop".to_string(), "reviews.shop.svc.cluster.local".to_string()));
        let allowed = |ns: &str, host: &str| p.iter().any(|(n, h)| egress_allows(n, h, ns, host));
        assert!(allowed("shop", "reviews.shop.svc.cluster.local"));
        assert!(!allowed("shop", "ratings.shop.svc.cluster.local"));
        assert!(allowed("ext", "api.example.com"));
        assert!(allowed("data", "db.data.svc.cluster.local"));
        assert!(!allowed("other", "db.other.svc.cluster.local"));
    }
}
