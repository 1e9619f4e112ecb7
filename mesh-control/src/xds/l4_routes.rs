//! VirtualService `tls` and `tcp` routes → the `mesh::L4Route`s of one service port.
//!
//! tls routes come first: mesh-node takes the first route that matches a connection, and a
//! tls route matches only a TLS connection naming one of its servers, so a TLS connection
//! falls through to the tcp routes when no tls route names it (as Istio's filter chains do).

use super::routes::{self, Ports};
use crate::{
    model::virtual_service::{L4Match, L4RouteDestination, VirtualService},
    proto::mesh,
};

pub fn for_port(v: &VirtualService, port: u16, ports: &dyn Ports) -> Vec<mesh::L4Route> {
    let tls = v.spec.tls.iter().enumerate().map(|(i, r)| (true, i, &r.matches, &r.route));
    let tcp = v.spec.tcp.iter().enumerate().map(|(i, r)| (false, i, &r.matches, &r.route));
    let mut out = Vec::new();
    for (is_tls, i, matches, route) in tls.chain(tcp) {
        let on_port: Vec<&L4Match> = matches.iter().filter(|m| m.port.is_none_or(|p| p == port)).collect();
        if !matches.is_empty() && on_port.is_empty() {
            continue;
        }
        out.push(mesh::L4Route {
            name: format!("{}.{}.{}[{i}]", v.meta.namespace, v.meta.name, if is_tls { "tls" } else { "tcp" }),
            tls: is_tls,
            matches: on_port.into_iter().map(l4_match).collect(),
            destinations: destinations(route, v, port, ports),
        });
    }
    out
}

fn l4_match(m: &L4Match) -> mesh::L4Match {
    mesh::L4Match {
        sni_hosts: m.sni_hosts.clone(),
        source: routes::route_source(&m.source_labels, &m.source_namespace, &m.callers),
    }
}

fn destinations(
    route: &[L4RouteDestination],
    v: &VirtualService,
    port: u16,
    ports: &dyn Ports,
) -> Vec<mesh::L4Destination> {
    route
        .iter()
        .map(|d| mesh::L4Destination {
            cluster: routes::destination_cluster(&d.destination, v, port, ports),
            weight: d.weight.unwrap_or(if route.len() == 1 { 100 } else { 0 }),
        })
        .collect()
}
