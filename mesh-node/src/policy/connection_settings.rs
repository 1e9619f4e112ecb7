//! How connections to one cluster's endpoints are made and kept, from the DestinationRule:
//! `tls.mode`, `connectionPool.tcp.tcpKeepalive` and `idleTimeout`, `connectionPool.http.idleTimeout`.
//! Decoded from the Cluster (Envoy's own fields where it has them, `nodemesh.io` metadata where
//! it has none) and applied by `proxy::outbound` (the path and socket options of each dial),
//! `proxy::relay` (the TCP idle timeout) and `proxy::pool` (the HTTP idle timeout).

use std::time::Duration;

use envoy_types::pb::envoy::extensions::upstreams::http::v3::HttpProtocolOptions;
use envoy_types::pb::{envoy::config::cluster::v3::Cluster, google::protobuf as pbuf};
use nodemesh_api::proto::{CLUSTER_TCP_IDLE_TIMEOUT_MS, CLUSTER_TLS_MODE, METADATA_KEY};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnectionSettings {
    pub tls: UpstreamTls,
    pub keepalive: Option<Keepalive>,
    /// A relayed (L4) connection with no bytes either way for this long is closed.
    pub tcp_idle_timeout: Option<Duration>,
    /// A pooled upstream HTTP connection idle this long is closed; `None`: never (an explicit
    /// `idleTimeout: 0s`).
    pub http_idle_timeout: Option<Duration>,
}

/// Envoy's (and so Istio's) idle timeout of upstream HTTP connections when none is set. Without
/// one, a pool would keep connections to endpoints that are long gone.
pub const DEFAULT_HTTP_IDLE_TIMEOUT: Duration = Duration::from_secs(3600);

impl Default for ConnectionSettings {
    fn default() -> Self {
        ConnectionSettings {
            tls: UpstreamTls::default(),
            keepalive: None,
            tcp_idle_timeout: None,
            http_idle_timeout: Some(DEFAULT_HTTP_IDLE_TIMEOUT),
        }
    }
}

/// The path to an endpoint (DestinationRule `tls.mode`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub enum UpstreamTls {
    /// Unset: meshed endpoints through the mTLS tunnel (or delivery on this node), others in
    /// plaintext (Istio's auto mTLS).
    #[default]
    Auto,
    /// Only through the mesh's mTLS: an endpoint without a mesh identity is not dialled.
    IstioMutual,
    /// Plaintext even to meshed endpoints; their PeerAuthentication judges it on arrival.
    Disable,
}

/// TCP keepalive on upstream sockets; `None` fields keep the kernel's defaults.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Keepalive {
    pub time: Option<Duration>,
    pub interval: Option<Duration>,
    pub probes: Option<u32>,
}

impl Keepalive {
    /// Turns keepalive on for `socket` with these settings.
    pub fn apply(&self, socket: &socket2::Socket) -> std::io::Result<()> {
        let mut k = socket2::TcpKeepalive::new();
        if let Some(t) = self.time {
            k = k.with_time(t);
        }
        if let Some(i) = self.interval {
            k = k.with_interval(i);
        }
        if let Some(n) = self.probes {
            k = k.with_retries(n);
        }
        socket.set_tcp_keepalive(&k)
    }
}

impl ConnectionSettings {
    /// For `/config_dump`.
    pub fn dump(&self) -> serde_json::Value {
        let ms = |d: Option<Duration>| d.map(|d| d.as_millis() as u64);
        serde_json::json!({
            "tls": self.tls,
            "keepalive": self.keepalive.map(|k| serde_json::json!({
                "time_s": k.time.map(|t| t.as_secs()),
                "interval_s": k.interval.map(|t| t.as_secs()),
                "probes": k.probes,
            })),
            "tcp_idle_timeout_ms": ms(self.tcp_idle_timeout),
            "http_idle_timeout_ms": ms(self.http_idle_timeout),
        })
    }

    /// The settings a Cluster carries (`http`: its upstream HTTP options, decoded by the
    /// caller); an error names what cannot be read.
    pub fn from_cluster(
        c: &Cluster,
        http: Option<&HttpProtocolOptions>,
    ) -> Result<ConnectionSettings, String> {
        let fields = c.metadata.as_ref().and_then(|m| m.filter_metadata.get(METADATA_KEY)).map(|s| &s.fields);
        let field = |key: &str| fields.and_then(|f| f.get(key)).and_then(|v| v.kind.as_ref());
        let tls = match field(CLUSTER_TLS_MODE) {
            None => UpstreamTls::Auto,
            Some(pbuf::value::Kind::StringValue(m)) if m == "ISTIO_MUTUAL" => UpstreamTls::IstioMutual,
            Some(pbuf::value::Kind::StringValue(m)) if m == "DISABLE" => UpstreamTls::Disable,
            Some(other) => {
                return Err(format!(
                    "Cluster {}: metadata {METADATA_KEY}.{CLUSTER_TLS_MODE} {other:?} is not ISTIO_MUTUAL or DISABLE",
                    c.name
                ));
            }
        };
        let tcp_idle_timeout = match field(CLUSTER_TCP_IDLE_TIMEOUT_MS) {
            None => None,
            Some(pbuf::value::Kind::NumberValue(ms)) if *ms >= 0.0 => {
                Some(Duration::from_millis(*ms as u64)).filter(|d| !d.is_zero())
            }
            Some(other) => {
                return Err(format!(
                    "Cluster {}: metadata {METADATA_KEY}.{CLUSTER_TCP_IDLE_TIMEOUT_MS} {other:?} is not a number of milliseconds",
                    c.name
                ));
            }
        };
        let seconds =
            |v: &Option<pbuf::UInt32Value>| v.as_ref().map(|v| Duration::from_secs(u64::from(v.value)));
        let keepalive =
            c.upstream_connection_options.as_ref().and_then(|o| o.tcp_keepalive.as_ref()).map(|k| {
                Keepalive {
                    time: seconds(&k.keepalive_time),
                    interval: seconds(&k.keepalive_interval),
                    probes: k.keepalive_probes.as_ref().map(|v| v.value),
                }
            });
        Ok(ConnectionSettings {
            tls,
            keepalive,
            tcp_idle_timeout,
            // Unset: Envoy's default; 0: none.
            http_idle_timeout: match http
                .and_then(|o| o.common_http_protocol_options.as_ref())
                .and_then(|o| o.idle_timeout.as_ref())
            {
                None => Some(DEFAULT_HTTP_IDLE_TIMEOUT),
                set => super::nonzero_duration(set),
            },
        })
    }
}
