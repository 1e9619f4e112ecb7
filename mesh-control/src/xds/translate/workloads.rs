//! Workloads as `Workload` resources (and `Address` resources by IP), per node, with the
//! policies each carries: outbound mode and egress hosts (Sidecar, MeshConfig), mTLS mode
//! (PeerAuthentication), authorizations (AuthorizationPolicy), access logs and tracing
//! (Telemetry).

use std::collections::{BTreeMap, BTreeSet};

use super::Translator;
use crate::{
    model::{
        Labels, Object,
        authorization::AuthorizationPolicies,
        istio,
        istio::OutboundMode,
        peer_authentication::{MtlsMode, PeerAuthentications},
        selector_matches,
        telemetry::Telemetries,
    },
    proto::{self, mesh},
    xds::{authorizations, snapshot::Resource},
};

impl Translator<'_> {
    pub(super) fn workloads(&mut self) {
        let store = self.store;
        let mesh_config = store.of_kind(crate::model::Kind::MeshConfig).find_map(|o| match o {
            Object::MeshConfig(m) => Some(&m.spec),
            _ => None,
        });
        let mesh_mode = mesh_config.map(|m| m.outbound_traffic_policy.mode).unwrap_or_default();
        let all_closed = mesh_config.is_some_and(|m| m.node_proxy_down == istio::NodeProxyDown::AllClosed);
        let sidecars: Vec<&istio::Sidecar> = store
            .of_kind(crate::model::Kind::Sidecar)
            .filter_map(|o| match o {
                Object::Sidecar(s) => Some(s),
                _ => None,
            })
            .collect();
        let peer_authentications = PeerAuthentications::new(store);
        let authorization_policies = AuthorizationPolicies::new(store);
        let telemetries = Telemetries::new(store);
        let mut by_node: BTreeMap<String, Vec<Resource>> = BTreeMap::new();
        let mut hints: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        let mut addresses = Vec::new();
        for w in &self.index.workloads {
            let sidecar = sidecar_for(&sidecars, w.namespace, w.labels);
            let mode =
                sidecar.and_then(|s| s.spec.outbound_traffic_policy.as_ref()).map_or(mesh_mode, |p| p.mode);
            let mtls = peer_authentications.resolve(w.namespace, w.labels);
            let workload = mesh::Workload {
                uid: format!("{}/{}", w.namespace, w.name),
                name: w.name.to_string(),
                workload_name: w.names.workload.clone(),
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
                fail_closed: all_closed || mtls.mode == MtlsMode::Strict,
                mtls_mode: mtls_mode(mtls.mode) as i32,
                port_mtls: mtls.ports.iter().map(|(p, m)| (u32::from(*p), mtls_mode(*m) as i32)).collect(),
                authorizations: authorization_policies
                    .for_workload(w.namespace, w.labels)
                    .into_iter()
                    .map(authorizations::authorization)
                    .collect(),
                access_logs: telemetries.access_logs(w.namespace, w.labels),
                tracing: telemetries.tracing(w.namespace, w.labels),
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

fn mtls_mode(mode: MtlsMode) -> mesh::MtlsMode {
    match mode {
        MtlsMode::Strict => mesh::MtlsMode::Strict,
        MtlsMode::Disable => mesh::MtlsMode::Disable,
        MtlsMode::Permissive | MtlsMode::Unset => mesh::MtlsMode::Permissive,
    }
}
