//! The workloads a snapshot's endpoints are chosen from (pods, node-reported workloads,
//! WorkloadEntries), indexed by label and by `namespace/name`.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::IpAddr,
};

use crate::{
    model::{Labels, Locality, Object, selector_matches, store::Store},
    workload::WorkloadNames,
};

/// An endpoint of one service port before grouping.
#[derive(Clone)]
pub(super) struct Ep {
    pub(super) ip: IpAddr,
    pub(super) port: u16,
    pub(super) healthy: bool,
    pub(super) locality: Locality,
    pub(super) weight: u32,
    /// `namespace/name` of the workload, when known.
    pub(super) workload: String,
    /// The workload's labels, for DestinationRule subsets (empty when the workload is unknown).
    pub(super) labels: Labels,
    /// How a meshed peer reaches it through its node's tunnel; `None`: in plaintext.
    pub(super) tunnel: Option<EpTunnel>,
    /// How telemetry names the workload (`None`: no workload known).
    pub(super) names: Option<WorkloadNames>,
}

/// A meshed workload's tunnel, as endpoint metadata carries it (`nodemesh.io` in the
/// LbEndpoint's filter metadata): its node's HBONE address and the workload's service account,
/// whose identity the tunnel's server must prove.
#[derive(Clone)]
pub(super) struct EpTunnel {
    pub(super) address: std::net::SocketAddr,
    pub(super) service_account: String,
}

/// A workload as endpoints selection sees it (pods, node-reported workloads, WorkloadEntries).
pub(super) struct Wl<'a> {
    pub(super) namespace: &'a str,
    pub(super) name: &'a str,
    /// How metrics name it (its owner's name first), derived once per snapshot: every
    /// endpoint of it carries a copy.
    pub(super) names: WorkloadNames,
    pub(super) labels: &'a Labels,
    pub(super) ips: Vec<IpAddr>,
    pub(super) ready: bool,
    pub(super) node: &'a str,
    pub(super) locality: Locality,
    pub(super) service_account: &'a str,
    /// WorkloadEntry port map (name → port).
    pub(super) ports: Option<&'a BTreeMap<String, u16>>,
    pub(super) weight: u32,
    /// Meshed, on a node with a tunnel: its node's tunnel address.
    pub(super) tunnel: Option<std::net::SocketAddr>,
}

impl Wl<'_> {
    /// One endpoint per address of the workload, on `port`.
    pub(super) fn endpoints(&self, port: u16) -> impl Iterator<Item = Ep> + '_ {
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
            names: Some(self.names.clone()),
        })
    }
}

pub(super) struct WorkloadIndex<'a> {
    /// Node name → its locality.
    pub(super) nodes: HashMap<&'a str, Locality>,
    pub(super) workloads: Vec<Wl<'a>>,
    /// (namespace, label key, label value) → indexes into `workloads`, so matching a selector
    /// costs the workloads carrying its first label, not every workload (1,000 Services over
    /// 10,000 workloads would otherwise be 10 million matches per snapshot).
    pub(super) by_label: HashMap<(&'a str, &'a str, &'a str), Vec<usize>>,
    /// `namespace/name` → index into `workloads`.
    pub(super) by_uid: HashMap<String, usize>,
}

impl<'a> WorkloadIndex<'a> {
    pub(super) fn new(store: &'a Store) -> WorkloadIndex<'a> {
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
                    names: WorkloadNames::derive(&p.workload_name, &p.service_account, &p.meta.labels),
                    labels: &p.meta.labels,
                    ips: p.ips.clone(),
                    ready: p.ready,
                    node: &p.node,
                    locality: nodes.get(p.node.as_str()).cloned().unwrap_or_default(),
                    service_account: &p.service_account,
                    ports: None,
                    weight: 1,
                    // The node's own report wins; else, for a pod from the API, its node's
                    // address (the node may have reported to another replica only).
                    tunnel: meshed
                        .then(|| {
                            tunnels.get(p.node.as_str()).copied().or_else(|| {
                                p.host_ip.map(|ip| std::net::SocketAddr::new(ip, nodemesh_api::TUNNEL_PORT))
                            })
                        })
                        .flatten(),
                });
            }
        }
        for o in store.of_kind(crate::model::Kind::WorkloadEntry) {
            if let Object::WorkloadEntry(we) = o {
                workloads.push(Wl {
                    namespace: &we.meta.namespace,
                    name: &we.meta.name,
                    names: WorkloadNames::derive(&we.meta.name, &we.spec.service_account, &we.spec.labels),
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
        WorkloadIndex { nodes, workloads, by_label, by_uid }
    }

    pub(super) fn names_of(&self, uid: &str) -> Option<WorkloadNames> {
        self.by_uid.get(uid).map(|i| self.workloads[*i].names.clone())
    }

    pub(super) fn labels_of(&self, uid: &str) -> Labels {
        self.by_uid.get(uid).map(|i| self.workloads[*i].labels.clone()).unwrap_or_default()
    }

    pub(super) fn tunnel_of(&self, uid: &str) -> Option<EpTunnel> {
        let w = &self.workloads[*self.by_uid.get(uid)?];
        Some(EpTunnel { address: w.tunnel?, service_account: w.service_account.to_string() })
    }

    /// The workloads in `namespace` that `selector` picks, in model order (an empty selector
    /// picks all of them).
    pub(super) fn selected(&self, namespace: &str, selector: &Labels) -> Vec<&Wl<'a>> {
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
}
