//! Generated code for `proto/nodemesh/mesh/v1/mesh.proto` and Istio's CA API, and the type URLs of every resource
//! Nodemesh serves over xDS.

#[allow(clippy::all, rust_2018_idioms)]
pub mod mesh {
    tonic::include_proto!("nodemesh.mesh.v1");
}

/// Istio's `IstioCertificateService` (`proto/istio/v1/auth/ca.proto`).
#[allow(clippy::all, rust_2018_idioms)]
pub mod istio_ca {
    tonic::include_proto!("istio.v1.auth");
}

pub const ADDRESS_TYPE: &str = "type.googleapis.com/nodemesh.mesh.v1.Address";
pub const WORKLOAD_TYPE: &str = "type.googleapis.com/nodemesh.mesh.v1.Workload";
pub const CLUSTER_TYPE: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
pub const ENDPOINT_TYPE: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
pub const ROUTE_TYPE: &str = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";
pub const LISTENER_TYPE: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";

/// Where Nodemesh puts what Envoy's resources have no field for:
/// - an endpoint's filter metadata: [`ENDPOINT_TUNNEL`], [`ENDPOINT_SERVICE_ACCOUNT`] (a meshed
///   workload is reached through its node's tunnel, proving that account's identity);
/// - a cluster's filter metadata: [`CLUSTER_TLS_MODE`], [`CLUSTER_TCP_IDLE_TIMEOUT_MS`],
///   [`CLUSTER_CALLER_VARIANTS`];
/// - a route's typed metadata: a [`mesh::RouteSource`] (who the route admits), which
///   mesh-node evaluates against the caller.
pub const METADATA_KEY: &str = "nodemesh.io";
/// `ip:port` of the endpoint's node's HBONE tunnel.
pub const ENDPOINT_TUNNEL: &str = "tunnel";
/// The endpoint workload's service account, whose identity the tunnel's server must prove.
pub const ENDPOINT_SERVICE_ACCOUNT: &str = "service_account";
/// DestinationRule `tls.mode` when set: `ISTIO_MUTUAL` or `DISABLE`.
pub const CLUSTER_TLS_MODE: &str = "tls_mode";
/// DestinationRule `connectionPool.tcp.idleTimeout`, in milliseconds.
pub const CLUSTER_TCP_IDLE_TIMEOUT_MS: &str = "tcp_idle_timeout_ms";
/// Callers (by namespace) that see another DestinationRule and the suffix of their own
/// cluster's name: a list of `{namespaces: [..], suffix}`.
pub const CLUSTER_CALLER_VARIANTS: &str = "caller_variants";

/// Istio's CSR metadata key naming the identity a node asks a certificate for.
pub const IMPERSONATED_IDENTITY: &str = "ImpersonatedIdentity";

/// Virtual-host `typed_per_filter_config` key of a port's [`mesh::RateLimits`].
pub const RATE_LIMIT_FILTER: &str = "nodemesh.io/local_ratelimit";
pub const RATE_LIMITS_TYPE: &str = "type.googleapis.com/nodemesh.mesh.v1.RateLimits";

/// A header no request carries, required (present) by every route that also matches on its
/// source: xDS clients other than mesh-node ignore route metadata, so without it Envoy or a
/// gRPC proxyless client would send *every* caller down a route meant for, say, a sandbox.
/// With it they skip such routes; mesh-node drops this matcher and checks the source itself.
pub const SOURCE_SCOPED_HEADER: &str = "x-nodemesh-source-scoped";

/// `Node.client_features` entry of mesh-node: its clusters and endpoints are exactly those its
/// Address resources use, so the server computes them only once it knows the Address
/// subscription (otherwise a reconnect would first remove what the node holds).
pub const ADDRESS_SCOPED: &str = "nodemesh.io/address-scoped";
