//! The model → xDS resources: Services and ServiceEntries become `Address` resources (one per
//! VIP) whose ports name Envoy `Cluster`s; endpoints become `ClusterLoadAssignment`s grouped by
//! locality; workloads become `Workload` (and `Address`) resources.
//!
//! Recomputed whole on each config generation: at 1k services / 10k endpoints that takes
//! milliseconds, and a pure function of the store is easy to trust. Diffing against what each
//! node already has is the server's job (versions are content hashes).

mod caller_variants;
mod clusters;
mod index;
mod workloads;

use caller_variants::{CallerVariant, add_caller_variants, caller_variants, variant_suffix};
use clusters::{build_cluster, build_load_assignment, port_policy, subset_rule};
use index::{Ep, WorkloadIndex};

use std::{
    collections::{BTreeSet, HashMap},
    net::IpAddr,
    sync::Arc,
};

use super::{
    l4_routes, listeners, rate_limits, routes,
    snapshot::{Resource, Snapshot},
};
use crate::{
    model::{
        CLUSTER_DOMAIN, Locality, Object, core,
        destination_rules::DestinationRules,
        istio,
        istio::Resolution,
        rate_limit::RateLimitPolicy,
        selector_matches,
        store::Store,
        virtual_service::{Callers, VirtualService},
    },
    proto::{self, mesh},
};

/// Builds the snapshot for the store's current generation.
pub fn snapshot(store: &Store) -> Snapshot {
    let mut t = Translator::new(store);
    t.services();
    t.finish_routes();
    t.workloads();
    t.snap
}

struct Translator<'a> {
    store: &'a Store,
    index: WorkloadIndex<'a>,
    /// Qualified hostname → the VirtualService that routes it.
    /// The composed VirtualService of each host (every object routing it, by precedence).
    virtual_services: HashMap<String, VirtualService>,
    /// Qualified hostname → the RateLimitPolicies limiting it.
    rate_limits: HashMap<String, Vec<&'a RateLimitPolicy>>,
    /// Qualified hostname → the ports it serves (to resolve route destinations without one).
    ports_by_host: HashMap<String, Vec<u16>>,
    /// Which DestinationRule each caller sees for each host.
    rules: DestinationRules<'a>,
    /// Qualified hostname → the callers that see another DestinationRule than most (hosts
    /// where all see the same one are absent).
    caller_variants: HashMap<String, Vec<CallerVariant>>,
    /// Cluster → its consistent-hash policy, for routes that send to it.
    hash_by_cluster: HashMap<String, mesh::HashPolicy>,
    /// (hostname, port, the port's cluster, its rate limits) of each route to build once
    /// every service's clusters are known.
    routes_to_finish: Vec<(String, u16, String, Vec<mesh::RateLimit>)>,
    snap: Snapshot,
}

impl<'a> Translator<'a> {
    fn new(store: &'a Store) -> Translator<'a> {
        let index = WorkloadIndex::new(store);
        let composed = crate::model::layering::compose(store);
        let rules = DestinationRules::new(store);
        let mut snap = Snapshot::new(store.generation());
        snap.conflicts = composed.conflicts;
        Translator {
            store,
            index,
            virtual_services: composed.by_host,
            rate_limits: rate_limits::policies_by_host(store),
            ports_by_host: ports_by_host(store),
            caller_variants: caller_variants(&rules, store),
            rules,
            hash_by_cluster: HashMap::new(),
            routes_to_finish: Vec::new(),
            snap,
        }
    }

    fn services(&mut self) {
        let store = self.store;
        for o in store.of_kind(crate::model::Kind::Service) {
            if let Object::Service(s) = o {
                self.kube_service(s);
            }
        }
        for o in store.of_kind(crate::model::Kind::ServiceEntry) {
            if let Object::ServiceEntry(se) = o {
                self.service_entry(se);
            }
        }
    }

    fn kube_service(&mut self, svc: &core::Service) {
        let hostname = format!("{}.{}.svc.{CLUSTER_DOMAIN}", svc.meta.name, svc.meta.namespace);
        let slices: Vec<&core::EndpointSlice> = self
            .store
            .of_kind(crate::model::Kind::EndpointSlice)
            .filter_map(|o| match o {
                Object::EndpointSlice(s)
                    if s.meta.namespace == svc.meta.namespace && s.service == svc.meta.name =>
                {
                    Some(s)
                }
                _ => None,
            })
            .collect();
        // Endpoints of the service's own IP families only (Kubernetes: a v4-only Service has
        // v4 endpoints even when its pods are dual-stack).
        let families: BTreeSet<bool> = svc.cluster_ips.iter().map(IpAddr::is_ipv4).collect();
        let same_family = |ip: &IpAddr| families.is_empty() || families.contains(&ip.is_ipv4());
        let mut ports = Vec::new();
        for sp in svc.ports.iter().filter(|p| p.protocol == "TCP") {
            let mut eps = Vec::new();
            for slice in &slices {
                let Some(port) = slice.ports.iter().find(|p| p.name == sp.name).map(|p| p.port) else {
                    continue;
                };
                for e in &slice.endpoints {
                    let locality = self
                        .index
                        .nodes
                        .get(e.node.as_str())
                        .cloned()
                        .unwrap_or_else(|| Locality { zone: e.zone.clone(), ..Locality::default() });
                    for ip in e.addresses.iter().filter(|ip| same_family(ip)) {
                        eps.push(Ep {
                            ip: *ip,
                            port,
                            healthy: e.ready,
                            locality: locality.clone(),
                            weight: 1,
                            workload: e.target.clone(),
                            labels: self.index.labels_of(&e.target),
                            tunnel: self.index.tunnel_of(&e.target),
                            names: self.index.names_of(&e.target),
                        });
                    }
                }
            }
            // Workloads the selector picks that no EndpointSlice lists (local mode: nodes report
            // workloads, there is no endpoints controller; WorkloadEntries join Services too).
            if let Some(selector) = &svc.selector {
                let listed: BTreeSet<IpAddr> = eps.iter().map(|e| e.ip).collect();
                for w in self.index.selected(&svc.meta.namespace, selector) {
                    if w.ips.iter().any(|ip| listed.contains(ip)) {
                        continue;
                    }
                    let port = match (&sp.target_port, w.ports) {
                        (_, Some(map)) if map.contains_key(&sp.name) => map[&sp.name],
                        (core::TargetPort::Number(n), _) => *n,
                        (core::TargetPort::Name(name), Some(map)) if map.contains_key(name) => map[name],
                        (core::TargetPort::Name(_), _) => continue,
                    };
                    eps.extend(w.endpoints(port).filter(|e| same_family(&e.ip)));
                }
            }
            let app_protocol = if sp.app_protocol.is_empty() {
                sp.name.split('-').next().unwrap_or_default().to_string()
            } else {
                sp.app_protocol.clone()
            };
            ports.push(self.service_port(
                &hostname,
                &svc.meta.namespace,
                sp.port,
                &sp.name,
                app_protocol,
                Some(eps),
            ));
        }
        let service = mesh::Service {
            hostname,
            namespace: svc.meta.namespace.clone(),
            vips: svc.cluster_ips.iter().map(ToString::to_string).collect(),
            ports,
            external: false,
            ..visibility(&svc.export_to, &svc.meta.namespace)
        };
        for vip in &svc.cluster_ips {
            self.add_address(*vip, mesh::address::Kind::Service(service.clone()));
        }
    }

    fn service_entry(&mut self, se: &istio::ServiceEntry) {
        let spec = &se.spec;
        for host in &spec.hosts {
            let mut ports = Vec::new();
            for p in &spec.ports {
                let eps = match spec.resolution {
                    Resolution::None => None,
                    _ => {
                        let mut eps: Vec<Ep> = spec
                            .endpoints
                            .iter()
                            .filter_map(|e| {
                                Some(Ep {
                                    ip: e.address.parse().ok()?,
                                    port: e.ports.get(&p.name).copied().or(p.target_port).unwrap_or(p.number),
                                    healthy: true,
                                    locality: Locality::parse(&e.locality),
                                    weight: e.weight.max(1),
                                    workload: String::new(),
                                    labels: e.labels.clone(),
                                    tunnel: None,
                                    names: None,
                                })
                            })
                            .collect();
                        if let Some(sel) = &spec.workload_selector {
                            for w in self.index.selected(&se.meta.namespace, &sel.labels) {
                                let port = w
                                    .ports
                                    .and_then(|m| m.get(&p.name).copied())
                                    .or(p.target_port)
                                    .unwrap_or(p.number);
                                eps.extend(w.endpoints(port));
                            }
                        }
                        Some(eps)
                    }
                };
                ports.push(self.service_port(
                    host,
                    &se.meta.namespace,
                    p.number,
                    &p.name,
                    p.protocol.to_lowercase(),
                    eps,
                ));
            }
            let service = mesh::Service {
                hostname: host.clone(),
                namespace: se.meta.namespace.clone(),
                vips: spec.addresses.clone(),
                ports,
                external: spec.location == istio::Location::MeshExternal,
                ..visibility(&spec.export_to, &se.meta.namespace)
            };
            for a in &spec.addresses {
                match a.split_once('/') {
                    None => {
                        if let Ok(ip) = a.parse() {
                            self.add_address(ip, mesh::address::Kind::Service(service.clone()));
                        }
                    }
                    Some((ip, len)) => {
                        if let (Ok(ip), Ok(len)) = (ip.parse::<IpAddr>(), len.parse::<u8>()) {
                            self.snap.add_cidr(ip, len, Arc::new(service.clone()));
                        }
                    }
                }
            }
        }
    }

    /// Builds the Cluster (and, unless passthrough, the ClusterLoadAssignment) of one port.
    fn service_port(
        &mut self,
        hostname: &str,
        namespace: &str,
        port: u16,
        port_name: &str,
        app_protocol: String,
        endpoints: Option<Vec<Ep>>,
    ) -> mesh::ServicePort {
        let name = routes::cluster_name(port, "", hostname);
        let passthrough = endpoints.is_none();
        // The rule most callers see makes the clusters every client knows; callers whose
        // namespace sees another rule (exportTo, client-side rules) get clusters of their own,
        // named with a suffix, which the default ones point them to.
        let (rule, variants) = self.rules.variants(hostname, namespace);
        let variants: Vec<(CallerVariant, Option<&istio::DestinationRule>)> = variants
            .into_iter()
            .map(|v| (CallerVariant { namespaces: v.namespaces, suffix: variant_suffix(v.rule) }, v.rule))
            .collect();
        let callers: Vec<CallerVariant> = variants.iter().map(|(c, _)| c.clone()).collect();
        // Every subset some caller's rule defines has a default cluster (empty where the
        // default rule lacks it), so a route to it can point each caller to its own.
        let mut subsets: Vec<String> = Vec::new();
        for dr in rule.into_iter().chain(variants.iter().filter_map(|(_, r)| *r)) {
            for subset in &dr.spec.subsets {
                if !subsets.contains(&subset.name) {
                    subsets.push(subset.name.clone());
                }
            }
        }
        let hash_policy =
            self.port_clusters(hostname, port, rule, &subsets, endpoints.as_deref(), "", &callers);
        for (variant, variant_rule) in &variants {
            let own: Vec<String> = variant_rule
                .map(|dr| dr.spec.subsets.iter().map(|s| s.name.clone()).collect())
                .unwrap_or_default();
            self.port_clusters(
                hostname,
                port,
                *variant_rule,
                &own,
                endpoints.as_deref(),
                &variant.suffix,
                &[],
            );
        }
        let virtual_service = self.virtual_services.get(hostname);
        let limits =
            self.rate_limits.get(hostname).map(|p| rate_limits::for_port(p, port)).unwrap_or_default();
        let l4_routes = virtual_service.map(|v| l4_routes::for_port(v, port, self)).unwrap_or_default();
        let has_http = virtual_service.is_some_and(|v| !v.spec.http.is_empty()) || !limits.is_empty();
        // Every cluster the port's routes can send to, HTTP and L4 (the Service resource lists
        // them); the HTTP route itself is built once every cluster's hash policy is known
        // (see `finish_routes`).
        let mut clusters = routes::clusters(virtual_service, port, &name, self);
        clusters.extend(l4_routes.iter().flat_map(|r| &r.destinations).map(|d| d.cluster.clone()));
        let route = if has_http {
            let route_name = routes::route_name(hostname, port);
            self.routes_to_finish.push((hostname.to_string(), port, name.clone(), limits));
            self.snap.route_clusters.insert(route_name.clone(), clusters.iter().cloned().collect());
            route_name
        } else {
            // No HTTP route (HTTP goes to the port's own cluster); tcp/tls routes' clusters
            // still travel with the port.
            String::new()
        };
        // The clusters of callers that see other DestinationRules travel along.
        let with_variants: BTreeSet<String> = clusters
            .iter()
            .chain(std::iter::once(&name))
            .flat_map(|c| {
                let variants = self.variants_of(c);
                std::iter::once(c.clone())
                    .chain(variants.into_iter().map(move |v| format!("{c}{}", v.suffix)))
            })
            .collect();
        let route_clusters = with_variants.into_iter().filter(|c| *c != name).collect();
        // gRPC's proxyless client can only dial endpoints it is told (no original destination).
        if !passthrough {
            let listener_name = routes::route_name(hostname, port);
            let routes = if route.is_empty() {
                listeners::Routes::Inline(Box::new(routes::build(
                    None,
                    Vec::new(),
                    hostname,
                    port,
                    &name,
                    self,
                )))
            } else {
                listeners::Routes::Rds(&route)
            };
            let listener = listeners::api_listener(&listener_name, routes);
            self.snap.listeners.insert(
                listener_name.clone(),
                Resource::new(&listener_name, proto::LISTENER_TYPE, &listener),
            );
        }
        mesh::ServicePort {
            port: u32::from(port),
            cluster: name,
            name: port_name.to_string(),
            app_protocol,
            hash_policy,
            route,
            route_clusters,
            l4_routes,
        }
    }

    /// Builds the routes of every service port that has one. Last, so that a route sending to
    /// another service's subset gets that subset's hash policy whichever service came first.
    fn finish_routes(&mut self) {
        for (hostname, port, cluster, limits) in std::mem::take(&mut self.routes_to_finish) {
            let v = self.virtual_services.get(&hostname);
            let config = routes::build(v, limits, &hostname, port, &cluster, self);
            let name = config.name.clone();
            self.snap.routes.insert(name.clone(), Resource::new(&name, proto::ROUTE_TYPE, &config));
        }
    }

    /// Builds the port's cluster and one per subset in `subsets` (those `rule` lacks hold no
    /// endpoints), named with `suffix`, with their load assignments; the default ones (empty
    /// suffix) name the `callers` that have clusters of their own. Returns the port cluster's
    /// hash policy.
    #[allow(clippy::too_many_arguments, reason = "one call per variant; the arguments are the variant")]
    fn port_clusters(
        &mut self,
        hostname: &str,
        port: u16,
        rule: Option<&istio::DestinationRule>,
        subsets: &[String],
        endpoints: Option<&[Ep]>,
        suffix: &str,
        callers: &[CallerVariant],
    ) -> Option<mesh::HashPolicy> {
        let passthrough = endpoints.is_none();
        let name = format!("{}{suffix}", routes::cluster_name(port, "", hostname));
        let policy = rule.map(|dr| port_policy(dr, port));
        let (mut cluster, hash_policy) = build_cluster(&name, policy.as_ref(), passthrough);
        add_caller_variants(&mut cluster, callers);
        self.snap.clusters.insert(name.clone(), Resource::new(&name, proto::CLUSTER_TYPE, &cluster));
        if let Some(h) = &hash_policy {
            self.hash_by_cluster.insert(name.clone(), h.clone());
        }
        // One cluster per DestinationRule subset, holding the endpoints whose labels it selects.
        for subset_name in subsets {
            let subset =
                rule.and_then(|dr| dr.spec.subsets.iter().find(|s| &s.name == subset_name).map(|s| (dr, s)));
            let cluster_name = format!("{}{suffix}", routes::cluster_name(port, subset_name, hostname));
            let subset_policy = subset.map(|(dr, s)| port_policy(&subset_rule(dr, s), port));
            let (mut c, subset_hash) = build_cluster(&cluster_name, subset_policy.as_ref(), passthrough);
            add_caller_variants(&mut c, callers);
            if let Some(h) = subset_hash {
                self.hash_by_cluster.insert(cluster_name.clone(), h);
            }
            self.snap
                .clusters
                .insert(cluster_name.clone(), Resource::new(&cluster_name, proto::CLUSTER_TYPE, &c));
            if let Some(eps) = endpoints {
                let picked: Vec<Ep> = match subset {
                    Some((_, s)) => {
                        eps.iter().filter(|e| selector_matches(&s.labels, &e.labels)).cloned().collect()
                    }
                    None => Vec::new(),
                };
                let cla = build_load_assignment(&cluster_name, picked);
                self.snap
                    .endpoints
                    .insert(cluster_name.clone(), Resource::new(&cluster_name, proto::ENDPOINT_TYPE, &cla));
            }
        }
        if let Some(eps) = endpoints {
            let cla = build_load_assignment(&name, eps.to_vec());
            self.snap.endpoints.insert(name.clone(), Resource::new(&name, proto::ENDPOINT_TYPE, &cla));
        }
        hash_policy
    }

    /// The callers with clusters of their own for the host of default cluster `cluster`.
    fn variants_of(&self, cluster: &str) -> Vec<CallerVariant> {
        let host = cluster.rsplit('|').next().unwrap_or_default();
        self.caller_variants.get(host).cloned().unwrap_or_default()
    }

    fn add_address(&mut self, ip: IpAddr, kind: mesh::address::Kind) {
        let name = ip.to_string();
        let service = match &kind {
            mesh::address::Kind::Service(s) => Some(Arc::new(s.clone())),
            mesh::address::Kind::Workload(_) => None,
        };
        let address = mesh::Address { kind: Some(kind) };
        let mut res = Resource::new(&name, proto::ADDRESS_TYPE, &address);
        res.service = service;
        self.snap.addresses.entry(name).or_insert(res);
    }
}

impl routes::Ports for Translator<'_> {
    fn ports_of(&self, hostname: &str) -> Vec<u16> {
        self.ports_by_host.get(hostname).cloned().unwrap_or_default()
    }

    fn hash_policy(&self, cluster: &str) -> Option<mesh::HashPolicy> {
        self.hash_by_cluster.get(cluster).cloned()
    }
}

/// Who sees a service (`restricted`, `visible_to` of a `mesh::Service`), from its exportTo.
fn visibility(export_to: &[String], namespace: &str) -> mesh::Service {
    match Callers::exported(export_to, namespace) {
        Callers::In(set) => {
            mesh::Service { restricted: true, visible_to: set.into_iter().collect(), ..Default::default() }
        }
        Callers::All | Callers::NotIn(_) => mesh::Service::default(),
    }
}

fn ports_by_host(store: &Store) -> HashMap<String, Vec<u16>> {
    let mut out: HashMap<String, Vec<u16>> = HashMap::new();
    for o in store.of_kind(crate::model::Kind::Service) {
        if let Object::Service(s) = o {
            let host = format!("{}.{}.svc.{CLUSTER_DOMAIN}", s.meta.name, s.meta.namespace);
            out.entry(host).or_default().extend(s.ports.iter().map(|p| p.port));
        }
    }
    for o in store.of_kind(crate::model::Kind::ServiceEntry) {
        if let Object::ServiceEntry(se) = o {
            for host in &se.spec.hosts {
                out.entry(host.clone()).or_default().extend(se.spec.ports.iter().map(|p| p.number));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use envoy_types::pb::{envoy::config::cluster::v3::Cluster, google::protobuf as pbuf};
    use prost::Message;

    use super::*;
    use crate::{model::store::Origin, source::files::parse_documents};

    /// A DestinationRule's traffic policy per port (`portLevelSettings` over the rule's own) and
    /// per subset (the subset's over the rule's), as each cluster's circuit breakers carry it.
    #[test]
    fn connection_pool_limits_apply_per_port_and_per_subset() {
        let yaml = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec: {clusterIP: 10.96.0.10, ports: [{name: a, port: 80}, {name: b, port: 81}]}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: web, namespace: shop}
spec:
  host: web
  trafficPolicy:
    connectionPool: {tcp: {maxConnections: 9, connectTimeout: 2s}}
    portLevelSettings:
    - port: {number: 81}
      connectionPool: {tcp: {maxConnections: 5}, http: {http1MaxPendingRequests: 3}}
  subsets:
  - name: v2
    labels: {version: v2}
    trafficPolicy: {connectionPool: {tcp: {maxConnections: 1}}}
"#;
        let mut store = Store::default();
        store.replace_source(&Origin::File("t.yaml".into()), parse_documents(yaml));
        assert_eq!(store.errors().count(), 0);
        let snap = snapshot(&store);
        let limits = |name: &str| {
            let c = Cluster::decode(snap.clusters[name].any.value.as_slice()).unwrap();
            let t = c.circuit_breakers.unwrap().thresholds.remove(0);
            let v = |x: Option<pbuf::UInt32Value>| x.map(|v| v.value);
            (v(t.max_connections), v(t.max_pending_requests), c.connect_timeout.map(|d| d.seconds))
        };
        let host = "web.shop.svc.cluster.local";
        assert_eq!(limits(&format!("outbound|80||{host}")), (Some(9), None, Some(2)));
        assert_eq!(limits(&format!("outbound|81||{host}")), (Some(5), Some(3), Some(10)));
        assert_eq!(limits(&format!("outbound|80|v2|{host}")), (Some(1), None, Some(10)));
    }
}
