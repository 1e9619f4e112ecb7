//! Listeners for gRPC's proxyless xDS client: a channel dialling `xds:///<hostname>:<port>`
//! asks for the Listener of that name and expects an `api_listener` holding an
//! HttpConnectionManager (with the router as its last filter) that names its routes. The route
//! is the port's RouteConfiguration over RDS when it has one, else its catch-all route table
//! inline — every service port is dialable, as with Istio's proxyless mode.
//!
//! These are served only to clients that name them: a wildcard Listener subscription (an Envoy
//! with LDS) gets none, since an `api_listener` is meaningless to a proxy.

use envoy_types::pb::{
    envoy::{
        config::{
            core::v3::{
                AggregatedConfigSource, ApiVersion, ConfigSource, config_source::ConfigSourceSpecifier,
            },
            listener::v3::{ApiListener, Listener},
            route::v3::RouteConfiguration,
        },
        extensions::filters::{
            http::{fault::v3::HttpFault, router::v3::Router},
            network::http_connection_manager::v3::{
                HttpConnectionManager, HttpFilter, Rds, http_connection_manager::RouteSpecifier,
                http_filter::ConfigType,
            },
        },
    },
    google::protobuf::Any,
};

use super::{
    encode::to_any,
    routes::{FAULT_FILTER, FAULT_TYPE},
};

const HCM_TYPE: &str =
    "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager";
const ROUTER_FILTER: &str = "envoy.filters.http.router";
const ROUTER_TYPE: &str = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router";

/// Where a listener's routes come from.
pub enum Routes<'a> {
    /// The port's RouteConfiguration of this name, over RDS.
    Rds(&'a str),
    /// A port without one: its catch-all route table, inline.
    Inline(Box<RouteConfiguration>),
}

/// The Listener named `name` (`<hostname>:<port>`).
pub fn api_listener(name: &str, routes: Routes<'_>) -> Listener {
    let route_specifier = match routes {
        Routes::Rds(route) => RouteSpecifier::Rds(Rds {
            config_source: Some(ConfigSource {
                resource_api_version: ApiVersion::V3 as i32,
                config_source_specifier: Some(ConfigSourceSpecifier::Ads(AggregatedConfigSource::default())),
                ..Default::default()
            }),
            route_config_name: route.to_string(),
        }),
        Routes::Inline(config) => RouteSpecifier::RouteConfig(*config),
    };
    // The fault filter comes first so a VirtualService's per-route faults apply, as in Istio.
    let filter = |name: &str, config: Any| HttpFilter {
        name: name.to_string(),
        config_type: Some(ConfigType::TypedConfig(config)),
        ..Default::default()
    };
    let hcm = HttpConnectionManager {
        stat_prefix: name.to_string(),
        route_specifier: Some(route_specifier),
        http_filters: vec![
            filter(FAULT_FILTER, to_any(FAULT_TYPE, &HttpFault::default())),
            filter(ROUTER_FILTER, to_any(ROUTER_TYPE, &Router::default())),
        ],
        ..Default::default()
    };
    Listener {
        name: name.to_string(),
        api_listener: Some(ApiListener { api_listener: Some(to_any(HCM_TYPE, &hcm)) }),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use envoy_types::pb::envoy::config::route::v3::{RouteAction, VirtualHost, route, route_action};
    use prost::Message;

    use super::*;
    use crate::xds::routes;

    fn hcm(l: &Listener) -> HttpConnectionManager {
        let any = l.api_listener.as_ref().and_then(|a| a.api_listener.as_ref()).expect("api_listener");
        assert_eq!(any.type_url, HCM_TYPE);
        HttpConnectionManager::decode(any.value.as_slice()).unwrap()
    }

    #[test]
    fn a_port_with_routes_points_at_them_and_one_without_routes_to_its_cluster() {
        const CLUSTER: &str = "outbound|80||web.shop.svc.cluster.local";
        let routed =
            hcm(&api_listener("web.shop.svc.cluster.local:80", Routes::Rds("web.shop.svc.cluster.local:80")));
        let Some(RouteSpecifier::Rds(rds)) = routed.route_specifier else { panic!("RDS expected") };
        assert_eq!(rds.route_config_name, "web.shop.svc.cluster.local:80");
        // gRPC NACKs a listener whose last filter is not the router.
        assert_eq!(routed.http_filters.last().unwrap().name, ROUTER_FILTER);

        let catch_all = RouteConfiguration {
            virtual_hosts: vec![VirtualHost {
                routes: vec![routes::catch_all(CLUSTER)],
                ..Default::default()
            }],
            ..Default::default()
        };
        let plain = hcm(&api_listener("web.shop.svc.cluster.local:80", Routes::Inline(Box::new(catch_all))));
        let Some(RouteSpecifier::RouteConfig(config)) = plain.route_specifier else {
            panic!("inline expected")
        };
        let action = config.virtual_hosts[0].routes[0].action.clone();
        let Some(route::Action::Route(RouteAction { cluster_specifier: Some(c), .. })) = action else {
            panic!("route action expected")
        };
        assert_eq!(c, route_action::ClusterSpecifier::Cluster(CLUSTER.into()));
    }
}
