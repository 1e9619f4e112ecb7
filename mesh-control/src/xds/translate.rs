//! The model → xDS resources: Services and ServiceEntries become `Address` resources (one per
//! VIP) whose ports name Envoy `Cluster`s; endpoints become `ClusterLoadAssignment`s grouped by
//! locality; workloads become `Workload` (and `Address`) resources.
//!
//! Recomputed whole on each config generation: at 1k services / 10k endpoints that takes
//! milliseconds, and a pure function of the store is easy to trust. Diffing against what each
//! node already has is the server's job (versions are content hashes).

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::IpAddr,
    sync::Arc,
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
use prost::Message;

use super::{
    authorizations, l4_routes, listeners, rate_limits, routes,
    snapshot::{Resource, Snapshot},
};
use crate::{
    model::{
        CLUSTER_DOMAIN, Labels, Locality, Object,
        authorization::AuthorizationPolicies,
        core,
        destination_rules::DestinationRules,
        istio,
        istio::{OutboundMode, Resolution},
        peer_authentication::{MtlsMode, PeerAuthentications},
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

/// An endpoint of one service port before grouping.
#[derive(Clone)]
struct Ep {
    ip: IpAddr,
    port: u16,
    healthy: bool,
    locality: Locality,
    weight: u32,
    /// `namespace/name` of the workload, when known.
    workload: String,
    /// The workload's labels, for DestinationRule subsets (empty when the workload is unknown).
    labels: Labels,
    /// How a meshed peer reaches it through its node's tunnel; `None`: in plaintext.
    tunnel: Option<EpTunnel>,
}

/// A meshed workload's tunnel, as endpoint metadata carries it (`nodemesh.io` in the
/// LbEndpoint's filter metadata): its node's HBONE address and the workload's service account,
/// whose identity the tunnel's server must prove.
#[derive(Clone)]
struct EpTunnel {
    address: std::net::SocketAddr,
    service_account: String,
}

/// A workload as endpoints selection sees it (pods, node-reported workloads, WorkloadEntries).
struct Wl<'a> {
    namespace: &'a str,
    name: &'a str,
    labels: &'a Labels,
    ips: Vec<IpAddr>,
    ready: bool,
    node: &'a str,
    locality: Locality,
    service_account: &'a str,
    /// WorkloadEntry port map (name → port).
    ports: Option<&'a BTreeMap<String, u16>>,
    weight: u32,
    /// Meshed, on a node with a tunnel: its node's tunnel address.
    tunnel: Option<std::net::SocketAddr>,
}

impl Wl<'_> {
    /// One endpoint per address of the workload, on `port`.
    fn endpoints(&self, port: u16) -> impl Iterator<Item = Ep> + '_ {
        self.ips.iter().map(move |ip| Ep {
            ip: *ip,
            port,
            healthy: self.ready,
            locality: self.locality.clone(),
            weight: self.weight,
            workload: format!("{}/{}", self.namespace, self.name),
            labels: self.labels.clone(),
            tunnel: self
                .tunnel
                .map(|address| EpTunnel { address, service_account: self.service_account.to_string() }),
        })
    }
}

struct Translator<'a> {
    store: &'a Store,
    nodes: HashMap<&'a str, Locality>,
    workloads: Vec<Wl<'a>>,
    /// (namespace, label key, label value) → indexes into `workloads`, so matching a selector
    /// costs the workloads carrying its first label, not every workload (1,000 Services over
    /// 10,000 workloads would otherwise be 10 million matches per snapshot).
    by_label: HashMap<(&'a str, &'a str, &'a str), Vec<usize>>,
    /// `namespace/name` → index into `workloads`.
    by_uid: HashMap<String, usize>,
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
        let nodes = store
            .of_kind(crate::model::Kind::Node)
            .filter_map(|o| match o {
                Object::Node(n) => Some((n.meta.name.as_str(), n.locality())),
                _ => None,
            })
            .collect::<HashMap<_, _>>();
        let tunnels: HashMap<&str, std::net::SocketAddr> = store
            .of_kind(crate::model::Kind::NodeProxy)
            .filter_map(|o| match o {
                Object::NodeProxy(p) => p.tunnel.map(|t| (p.meta.name.as_str(), t)),
                _ => None,
            })
            .collect();
        let namespace_labels: HashMap<&str, &Labels> = store
            .of_kind(crate::model::Kind::Namespace)
            .map(|o| (o.meta().name.as_str(), &o.meta().labels))
            .collect();
        let no_labels = Labels::new();
        let mut workloads = Vec::new();
        // With Kubernetes, a pod is also reported by its node: the API's copy wins.
        let api_pods: BTreeSet<(&str, &str)> = store
            .of_kind(crate::model::Kind::Pod)
            .map(|o| (o.meta().namespace.as_str(), o.meta().name.as_str()))
            .collect();
        let reported = store
            .of_kind(crate::model::Kind::NodeWorkload)
            .filter(|o| !api_pods.contains(&(o.meta().namespace.as_str(), o.meta().name.as_str())));
        for o in store.of_kind(crate::model::Kind::Pod).chain(reported) {
            if let Object::Pod(p) | Object::NodeWorkload(p) = o {
                // A node reports the labels its workload's namespace had; the API has them.
                let ns_labels = match o {
                    Object::Pod(_) => {
                        namespace_labels.get(p.meta.namespace.as_str()).copied().unwrap_or(&no_labels)
                    }
                    _ => &p.namespace_labels,
                };
                let meshed = crate::meshing::decide(ns_labels, &p.meta.labels).is_meshed();
                workloads.push(Wl {
                    namespace: &p.meta.namespace,
                    name: &p.meta.name,
                    labels: &p.meta.labels,
                    ips: p.ips.clone(),
                    ready: p.ready,
                    node: &p.node,
                    locality: nodes.get(p.node.as_str()).cloned().unwrap_or_default(),
                    service_account: &p.service_account,
                    ports: None,
                    weight: 1,
                    tunnel: if meshed { tunnels.get(p.node.as_str()).copied() } else { None },
                });
            }
        }
        for o in store.of_kind(crate::model::Kind::WorkloadEntry) {
            if let Object::WorkloadEntry(we) = o {
                workloads.push(Wl {
                    namespace: &we.meta.namespace,
                    name: &we.meta.name,
                    labels: &we.spec.labels,
                    ips: we.spec.address.parse().into_iter().collect(),
                    ready: true,
                    node: "",
                    locality: Locality::parse(&we.spec.locality),
                    service_account: &we.spec.service_account,
                    ports: Some(&we.spec.ports),
                    weight: we.spec.weight.max(1),
                    tunnel: None,
                });
            }
        }
        let mut by_label: HashMap<(&str, &str, &str), Vec<usize>> = HashMap::new();
        for (i, w) in workloads.iter().enumerate() {
            for (k, v) in w.labels {
                by_label.entry((w.namespace, k.as_str(), v.as_str())).or_default().push(i);
            }
        }
        let by_uid =
            workloads.iter().enumerate().map(|(i, w)| (format!("{}/{}", w.namespace, w.name), i)).collect();
        let composed = crate::model::layering::compose(store);
        let rules = DestinationRules::new(store);
        let mut snap = Snapshot::new(store.generation());
        snap.conflicts = composed.conflicts;
        Translator {
            store,
            nodes,
            workloads,
            by_label,
            by_uid,
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

    fn labels_of(&self, uid: &str) -> Labels {
        self.by_uid.get(uid).map(|i| self.workloads[*i].labels.clone()).unwrap_or_default()
    }

    fn tunnel_of(&self, uid: &str) -> Option<EpTunnel> {
        let w = &self.workloads[*self.by_uid.get(uid)?];
        Some(EpTunnel { address: w.tunnel?, service_account: w.service_account.to_string() })
    }

    /// The workloads in `namespace` that `selector` picks, in model order (an empty selector
    /// picks all of them).
    fn selected(&self, namespace: &str, selector: &Labels) -> Vec<&Wl<'a>> {
        match selector.iter().next() {
            None => self.workloads.iter().filter(|w| w.namespace == namespace).collect(),
            Some((k, v)) => self
                .by_label
                .get(&(namespace, k.as_str(), v.as_str()))
                .into_iter()
                .flatten()
                .map(|i| &self.workloads[*i])
                .filter(|w| selector_matches(selector, w.labels))
                .collect(),
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
                            labels: self.labels_of(&e.target),
                            tunnel: self.tunnel_of(&e.target),
                        });
                    }
                }
            }
            // Workloads the selector picks that no EndpointSlice lists (local mode: nodes report
            // workloads, there is no endpoints controller; WorkloadEntries join Services too).
            if let Some(selector) = &svc.selector {
                let listed: BTreeSet<IpAddr> = eps.iter().map(|e| e.ip).collect();
                for w in self.selected(&svc.meta.namespace, selector) {
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
                                })
                            })
                            .collect();
                        if let Some(sel) = &spec.workload_selector {
                            for w in self.selected(&se.meta.namespace, &sel.labels) {
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

    fn workloads(&mut self) {
        let store = self.store;
        let mesh_mode = store
            .of_kind(crate::model::Kind::MeshConfig)
            .find_map(|o| match o {
                Object::MeshConfig(m) => Some(m.spec.outbound_traffic_policy.mode),
                _ => None,
            })
            .unwrap_or_default();
        let sidecars: Vec<&istio::Sidecar> = store
            .of_kind(crate::model::Kind::Sidecar)
            .filter_map(|o| match o {
                Object::Sidecar(s) => Some(s),
                _ => None,
            })
            .collect();
        let peer_authentications = PeerAuthentications::new(store);
        let authorization_policies = AuthorizationPolicies::new(store);
        let mut by_node: BTreeMap<String, Vec<Resource>> = BTreeMap::new();
        let mut hints: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        let mut addresses = Vec::new();
        for w in &self.workloads {
            let sidecar = sidecar_for(&sidecars, w.namespace, w.labels);
            let mode =
                sidecar.and_then(|s| s.spec.outbound_traffic_policy.as_ref()).map_or(mesh_mode, |p| p.mode);
            let mtls = peer_authentications.resolve(w.namespace, w.labels);
            let workload = mesh::Workload {
                uid: format!("{}/{}", w.namespace, w.name),
                name: w.name.to_string(),
                namespace: w.namespace.to_string(),
                service_account: w.service_account.to_string(),
                node: w.node.to_string(),
                addresses: w.ips.iter().map(ToString::to_string).collect(),
                labels: w.labels.clone().into_iter().collect(),
                locality: Some(mesh::Locality {
                    region: w.locality.region.clone(),
                    zone: w.locality.zone.clone(),
                    subzone: w.locality.subzone.clone(),
                }),
                outbound_policy: match mode {
                    OutboundMode::AllowAny => mesh::OutboundTrafficPolicy::AllowAny,
                    OutboundMode::RegistryOnly => mesh::OutboundTrafficPolicy::RegistryOnly,
                } as i32,
                egress_hosts: sidecar
                    .map(|s| s.egress_patterns())
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(namespace, host)| mesh::EgressHost { namespace, host })
                    .collect(),
                tunnel_address: w.tunnel.map(|t| t.to_string()).unwrap_or_default(),
                mtls_mode: mtls_mode(mtls.mode) as i32,
                port_mtls: mtls.ports.iter().map(|(p, m)| (u32::from(*p), mtls_mode(*m) as i32)).collect(),
                authorizations: authorization_policies
                    .for_workload(w.namespace, w.labels)
                    .into_iter()
                    .map(authorizations::authorization)
                    .collect(),
            };
            if !w.node.is_empty() {
                let uid = workload.uid.clone();
                by_node.entry(w.node.to_string()).or_default().push(Resource::new(
                    &uid,
                    proto::WORKLOAD_TYPE,
                    &workload,
                ));
                if let Some(s) = sidecar {
                    hints.entry(w.node.to_string()).or_default().extend(self.hinted_addresses(s));
                }
            }
            for ip in &w.ips {
                addresses.push((*ip, workload.clone()));
            }
        }
        for (ip, workload) in addresses {
            // A VIP and a workload never share an IP; if config says so, the Service wins.
            if !self.snap.addresses.contains_key(&ip.to_string()) {
                self.add_address(ip, mesh::address::Kind::Workload(workload));
            }
        }
        self.snap.workloads_by_node = by_node;
        self.snap.hints_by_node = hints;
    }

    /// Address names of the services a Sidecar's egress hosts name (`ns/host`, `*/host`, `./*`).
    fn hinted_addresses(&self, sidecar: &istio::Sidecar) -> BTreeSet<String> {
        let mut out = BTreeSet::new();
        let hosts = sidecar.egress_patterns();
        for (name, res) in &self.snap.addresses {
            let Some(svc) = &res.service else { continue };
            let wanted =
                hosts.iter().any(|(ns, host)| istio::egress_allows(ns, host, &svc.namespace, &svc.hostname));
            if wanted {
                out.insert(name.clone());
            }
        }
        out
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

/// Every host's callers that see another DestinationRule than most.
fn caller_variants(rules: &DestinationRules<'_>, store: &Store) -> HashMap<String, Vec<CallerVariant>> {
    host_namespaces(store)
        .into_iter()
        .filter_map(|(host, namespace)| {
            let variants: Vec<CallerVariant> = rules
                .variants(&host, &namespace)
                .1
                .into_iter()
                .map(|v| CallerVariant { namespaces: v.namespaces, suffix: variant_suffix(v.rule) })
                .collect();
            (!variants.is_empty()).then_some((host, variants))
        })
        .collect()
}

/// Qualified hostname → the namespace of its Service or ServiceEntry.
fn host_namespaces(store: &Store) -> HashMap<String, String> {
    let mut out = HashMap::new();
    for o in store.of_kind(crate::model::Kind::Service) {
        if let Object::Service(s) = o {
            let host = format!("{}.{}.svc.{CLUSTER_DOMAIN}", s.meta.name, s.meta.namespace);
            out.insert(host, s.meta.namespace.clone());
        }
    }
    for o in store.of_kind(crate::model::Kind::ServiceEntry) {
        if let Object::ServiceEntry(se) = o {
            for host in &se.spec.hosts {
                out.entry(host.clone()).or_insert_with(|| se.meta.namespace.clone());
            }
        }
    }
    out
}

/// Callers in `namespaces` see another DestinationRule than most: their clusters are the
/// default ones' names plus `suffix`.
#[derive(Clone, Debug)]
struct CallerVariant {
    namespaces: BTreeSet<String>,
    suffix: String,
}

/// The suffix of the clusters made for callers that see `rule` (`None`: no rule at all).
fn variant_suffix(rule: Option<&istio::DestinationRule>) -> String {
    match rule {
        Some(dr) => format!("~{}.{}", dr.meta.namespace, dr.meta.name),
        None => "~no-rule".to_string(),
    }
}

/// Names, in a default cluster's `nodemesh.io` metadata (`caller_variants`), the callers that
/// have clusters of their own: mesh-node sends a caller in one of `namespaces` to the cluster
/// of the same name plus `suffix`. Envoy and gRPC clients use the default clusters.
fn add_caller_variants(cluster: &mut Cluster, callers: &[CallerVariant]) {
    if callers.is_empty() {
        return;
    }
    let string = |s: &str| string_value(s.to_string());
    let list = |values: Vec<pbuf::Value>| pbuf::Value {
        kind: Some(pbuf::value::Kind::ListValue(pbuf::ListValue { values })),
    };
    let variants = callers
        .iter()
        .map(|c| pbuf::Value {
            kind: Some(pbuf::value::Kind::StructValue(pbuf::Struct {
                fields: [
                    ("namespaces".to_string(), list(c.namespaces.iter().map(|n| string(n)).collect())),
                    ("suffix".to_string(), string(&c.suffix)),
                ]
                .into(),
            })),
        })
        .collect();
    let metadata = cluster.metadata.get_or_insert_with(Default::default);
    metadata
        .filter_metadata
        .entry(proto::METADATA_KEY.to_string())
        .or_default()
        .fields
        .insert(proto::CLUSTER_CALLER_VARIANTS.to_string(), list(variants));
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

/// A DestinationRule as one of its subsets sees it: the subset's traffic policy over the rule's.
fn subset_rule(dr: &istio::DestinationRule, subset: &istio::Subset) -> istio::DestinationRule {
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

fn sidecar_for<'s>(
    sidecars: &[&'s istio::Sidecar],
    namespace: &str,
    labels: &Labels,
) -> Option<&'s istio::Sidecar> {
    let in_ns = sidecars.iter().filter(|s| s.meta.namespace == namespace);
    in_ns
        .clone()
        .find(|s| s.spec.workload_selector.as_ref().is_some_and(|sel| selector_matches(&sel.labels, labels)))
        .or_else(|| in_ns.clone().find(|s| s.spec.workload_selector.is_none()))
        .copied()
}

/// The effective policy for one port: port-level settings override the rule's top level.
struct PortPolicy {
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

fn port_policy(dr: &istio::DestinationRule, port: u16) -> PortPolicy {
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
pub const HTTP_PROTOCOL_OPTIONS: &str = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions";
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

fn pb_duration(d: Duration) -> pbuf::Duration {
    pbuf::Duration { seconds: d.as_secs() as i64, nanos: d.subsec_nanos() as i32 }
}

fn build_cluster(
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
    if fields.is_empty() {
        return None;
    }
    Some(envoy_core::Metadata {
        filter_metadata: [(
            proto::METADATA_KEY.to_string(),
            pbuf::Struct { fields: fields.into_iter().collect() },
        )]
        .into_iter()
        .collect(),
        ..Default::default()
    })
}

fn string_value(s: String) -> pbuf::Value {
    pbuf::Value { kind: Some(pbuf::value::Kind::StringValue(s)) }
}

fn build_load_assignment(name: &str, eps: Vec<Ep>) -> endpoint::ClusterLoadAssignment {
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
            metadata: e.tunnel.map(tunnel_metadata),
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
                // gRPC's xDS client drops localities without a weight (TOOLCHAIN.md).
                load_balancing_weight: Some(pbuf::UInt32Value { value: lb_endpoints.len() as u32 }),
                lb_endpoints,
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    }
}

fn mtls_mode(mode: MtlsMode) -> mesh::MtlsMode {
    match mode {
        MtlsMode::Strict => mesh::MtlsMode::Strict,
        MtlsMode::Disable => mesh::MtlsMode::Disable,
        MtlsMode::Permissive | MtlsMode::Unset => mesh::MtlsMode::Permissive,
    }
}

/// `filter_metadata["nodemesh.io"] = {tunnel, service_account}`.
fn tunnel_metadata(t: EpTunnel) -> envoy_core::Metadata {
    let string = |s: String| pbuf::Value { kind: Some(pbuf::value::Kind::StringValue(s)) };
    let fields = [
        (proto::ENDPOINT_TUNNEL.to_string(), string(t.address.to_string())),
        (proto::ENDPOINT_SERVICE_ACCOUNT.to_string(), string(t.service_account)),
    ];
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

pub fn socket_address(ip: IpAddr, port: u16) -> envoy_core::Address {
    envoy_core::Address {
        address: Some(envoy_core::address::Address::SocketAddress(envoy_core::SocketAddress {
            address: ip.to_string(),
            port_specifier: Some(envoy_core::socket_address::PortSpecifier::PortValue(u32::from(port))),
            ..Default::default()
        })),
    }
}

/// Content hash, used as the resource version: equal content ⇒ equal version, also across a
/// control-plane restart (so a reconnecting node is not resent what it has).
pub fn content_version(bytes: &[u8]) -> String {
    format!("{:016x}", crate::hash::fnv1a64(bytes))
}

/// Encodes a message as the `Any` a DiscoveryResponse carries.
pub fn to_any(type_url: &str, msg: &impl Message) -> pbuf::Any {
    pbuf::Any { type_url: type_url.to_string(), value: msg.encode_to_vec() }
}

#[cfg(test)]
mod tests {
    use envoy_types::pb::envoy::config::cluster::v3::Cluster;
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
