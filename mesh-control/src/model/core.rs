//! Kubernetes built-in kinds, reduced to what the mesh uses. They are read with k8s-openapi's
//! types (so a file and the API server are parsed by the same code) and then checked here.

use std::net::IpAddr;

use k8s_openapi::{
    api::{core::v1 as corev1, discovery::v1 as discoveryv1},
    apimachinery::pkg::util::intstr::IntOrString,
};

use super::{FieldError, Labels, Locality, Meta, parse_ips};

#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Namespace {
    pub meta: Meta,
}

#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Node {
    pub meta: Meta,
}

impl Node {
    pub fn locality(&self) -> Locality {
        Locality::from_labels(&self.meta.labels)
    }
}

/// A node's proxy, as it reports itself (`meta.name` is the node).
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct NodeProxy {
    pub meta: Meta,
    /// Where other nodes open HBONE tunnels to this node's workloads; `None`: no tunnel.
    pub tunnel: Option<std::net::SocketAddr>,
}

/// A pod, or a workload a node registered locally (same shape).
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Pod {
    pub meta: Meta,
    pub ips: Vec<IpAddr>,
    pub node: String,
    pub service_account: String,
    /// Running and Ready (a pod that is not ready gets no traffic from selector-based services).
    pub ready: bool,
    /// Labels of the pod's namespace, as the node saw them (local mode only).
    pub namespace_labels: Labels,
    /// The name metrics give it: its controller's (see [`workload_name`]).
    pub workload_name: String,
    /// Kubernetes: the address of the pod's node (`status.hostIP`). Where its node's tunnel
    /// is when that node has not reported to this replica (it reports to one replica only).
    pub host_ip: Option<IpAddr>,
}

#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Service {
    pub meta: Meta,
    pub cluster_ips: Vec<IpAddr>,
    pub ports: Vec<ServicePort>,
    /// `None`: endpoints come only from EndpointSlices (a selector-less Service).
    pub selector: Option<Labels>,
    /// Istio's `networking.istio.io/exportTo` annotation (comma-separated): the namespaces
    /// whose workloads see the Service; empty: all.
    pub export_to: Vec<String>,
}

/// The annotation by which Istio exports a Kubernetes Service to some namespaces only.
pub const EXPORT_TO_ANNOTATION: &str = "networking.istio.io/exportTo";

#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct ServicePort {
    pub name: String,
    pub port: u16,
    pub target_port: TargetPort,
    pub protocol: String,
    pub app_protocol: String,
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub enum TargetPort {
    Number(u16),
    /// A named container port; resolved through EndpointSlice port names.
    Name(String),
}

#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct EndpointSlice {
    pub meta: Meta,
    /// From the `kubernetes.io/service-name` label.
    pub service: String,
    pub ports: Vec<EndpointPort>,
    pub endpoints: Vec<Endpoint>,
}

#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct EndpointPort {
    pub name: String,
    pub port: u16,
}

#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Endpoint {
    pub addresses: Vec<IpAddr>,
    pub ready: bool,
    pub node: String,
    pub zone: String,
    /// `namespace/name` of the pod behind it, when known.
    pub target: String,
}

pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

fn port_u16(field: String, value: i32, errors: &mut Vec<FieldError>) -> u16 {
    match u16::try_from(value) {
        Ok(p) if p != 0 => p,
        _ => {
            errors.push(FieldError::new(field, format!("{value} is not a port (1-65535)")));
            0
        }
    }
}

pub fn namespace(meta: Meta, _ns: corev1::Namespace) -> Result<Namespace, Vec<FieldError>> {
    Ok(Namespace { meta })
}

pub fn node(meta: Meta, _node: corev1::Node) -> Result<Node, Vec<FieldError>> {
    Ok(Node { meta })
}

pub fn pod(meta: Meta, pod: corev1::Pod) -> Result<Pod, Vec<FieldError>> {
    let mut errors = Vec::new();
    let workload_name = workload_name(&pod.metadata);
    let spec = pod.spec.unwrap_or_default();
    let status = pod.status.unwrap_or_default();
    let mut ip_strings: Vec<String> = status.pod_ips.unwrap_or_default().into_iter().map(|p| p.ip).collect();
    if ip_strings.is_empty()
        && let Some(ip) = status.pod_ip
    {
        ip_strings.push(ip);
    }
    let ips = parse_ips("status.podIPs", &ip_strings, &mut errors);
    let host_ip = parse_ips("status.hostIP", &status.host_ip.into_iter().collect::<Vec<_>>(), &mut errors)
        .into_iter()
        .next();
    let ready = status.phase.as_deref() == Some("Running")
        && status.conditions.unwrap_or_default().iter().any(|c| c.type_ == "Ready" && c.status == "True");
    if !errors.is_empty() {
        return Err(errors);
    }
    Ok(Pod {
        meta,
        ips,
        node: spec.node_name.unwrap_or_default(),
        service_account: spec.service_account_name.unwrap_or_else(|| "default".into()),
        ready,
        namespace_labels: Labels::new(),
        workload_name,
        host_ip,
    })
}

/// Istio's workload name for a pod: a Deployment's name for the pods of its ReplicaSets
/// (the ReplicaSet's name less its `pod-template-hash`), a CronJob's for its Jobs' pods (the
/// Job's name less its scheduled-time suffix), another controller's own name, else the
/// `generateName` stem, else the pod's name. Bounded: pods come and go, their owners stay.
pub fn workload_name(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> String {
    let own = meta.name.clone().unwrap_or_default();
    let controller = meta.owner_references.iter().flatten().find(|o| o.controller == Some(true));
    let Some(controller) = controller else {
        return meta
            .generate_name
            .as_deref()
            .map(|g| g.trim_end_matches('-'))
            .filter(|g| !g.is_empty())
            .map_or(own, str::to_string);
    };
    let name = controller.name.as_str();
    let hash = meta.labels.as_ref().and_then(|l| l.get("pod-template-hash"));
    match (controller.kind.as_str(), hash) {
        ("ReplicaSet", Some(hash)) => name.strip_suffix(&format!("-{hash}")).unwrap_or(name).to_string(),
        ("Job", _) => match name.rsplit_once('-') {
            // CronJob-made Jobs end in the scheduled time in minutes.
            Some((cron, stamp)) if stamp.len() >= 8 && stamp.bytes().all(|b| b.is_ascii_digit()) => {
                cron.to_string()
            }
            _ => name.to_string(),
        },
        _ => name.to_string(),
    }
}

pub fn service(meta: Meta, svc: corev1::Service) -> Result<Service, Vec<FieldError>> {
    let mut errors = Vec::new();
    let spec = svc.spec.unwrap_or_default();
    let export_to: Vec<String> = svc
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(EXPORT_TO_ANNOTATION))
        .map(|v| v.split(',').map(|e| e.trim().to_string()).filter(|e| !e.is_empty()).collect())
        .unwrap_or_default();
    super::istio::check_export_to(
        &format!("metadata.annotations.{EXPORT_TO_ANNOTATION}"),
        &export_to,
        &mut errors,
    );
    let mut ip_strings = spec.cluster_ips.unwrap_or_default();
    if ip_strings.is_empty()
        && let Some(ip) = spec.cluster_ip.clone()
    {
        ip_strings.push(ip);
    }
    // Headless services ("None") have no VIP; clients dial pod IPs, which resolve as workloads.
    ip_strings.retain(|ip| ip != "None" && !ip.is_empty());
    let cluster_ips = parse_ips("spec.clusterIPs", &ip_strings, &mut errors);
    let mut ports = Vec::new();
    for (i, p) in spec.ports.unwrap_or_default().into_iter().enumerate() {
        let port = port_u16(format!("spec.ports[{i}].port"), p.port, &mut errors);
        let target_port = match p.target_port {
            None => TargetPort::Number(port),
            Some(IntOrString::Int(n)) => {
                TargetPort::Number(port_u16(format!("spec.ports[{i}].targetPort"), n, &mut errors))
            }
            Some(IntOrString::String(s)) => match s.parse::<i32>() {
                Ok(n) => TargetPort::Number(port_u16(format!("spec.ports[{i}].targetPort"), n, &mut errors)),
                Err(_) => TargetPort::Name(s),
            },
        };
        let protocol = p.protocol.unwrap_or_else(|| "TCP".into());
        if !matches!(protocol.as_str(), "TCP" | "UDP" | "SCTP") {
            errors.push(FieldError::new(
                format!("spec.ports[{i}].protocol"),
                format!("`{protocol}` is not one of TCP, UDP, SCTP"),
            ));
        }
        ports.push(ServicePort {
            name: p.name.unwrap_or_default(),
            port,
            target_port,
            protocol,
            app_protocol: p.app_protocol.unwrap_or_default(),
        });
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    Ok(Service { meta, cluster_ips, ports, selector: spec.selector, export_to })
}

pub fn endpoint_slice(
    meta: Meta,
    slice: discoveryv1::EndpointSlice,
) -> Result<EndpointSlice, Vec<FieldError>> {
    let mut errors = Vec::new();
    let Some(service) = meta.labels.get(SERVICE_NAME_LABEL).cloned() else {
        return Err(vec![FieldError::new(
            format!("metadata.labels.{SERVICE_NAME_LABEL}"),
            "missing: an EndpointSlice names its Service with this label",
        )]);
    };
    if !matches!(slice.address_type.as_str(), "IPv4" | "IPv6") {
        errors.push(FieldError::new(
            "addressType",
            format!("`{}` is not supported (IPv4 or IPv6)", slice.address_type),
        ));
    }
    let ports = slice
        .ports
        .unwrap_or_default()
        .into_iter()
        .enumerate()
        .filter_map(|(i, p)| {
            let port = port_u16(format!("ports[{i}].port"), p.port?, &mut errors);
            Some(EndpointPort { name: p.name.unwrap_or_default(), port })
        })
        .collect();
    let endpoints = slice
        .endpoints
        .into_iter()
        .enumerate()
        .map(|(i, e)| {
            let conditions = e.conditions.unwrap_or_default();
            Endpoint {
                addresses: parse_ips(&format!("endpoints[{i}].addresses"), &e.addresses, &mut errors),
                // Kubernetes: a nil `ready` means ready.
                ready: conditions.ready.unwrap_or(true),
                node: e.node_name.unwrap_or_default(),
                zone: e.zone.unwrap_or_default(),
                target: e
                    .target_ref
                    .and_then(|t| Some(format!("{}/{}", t.namespace.unwrap_or_default(), t.name?)))
                    .unwrap_or_default(),
            }
        })
        .collect();
    if !errors.is_empty() {
        return Err(errors);
    }
    Ok(EndpointSlice { meta, service, ports, endpoints })
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};

    use super::workload_name;

    fn owned_by(kind: &str, owner: &str, pod: &str, hash: Option<&str>) -> ObjectMeta {
        ObjectMeta {
            name: Some(pod.into()),
            labels: hash.map(|h| [("pod-template-hash".to_string(), h.to_string())].into()),
            owner_references: Some(vec![OwnerReference {
                kind: kind.into(),
                name: owner.into(),
                controller: Some(true),
                ..OwnerReference::default()
            }]),
            ..ObjectMeta::default()
        }
    }

    #[test]
    fn pods_are_named_by_their_owners() {
        let deployment =
            owned_by("ReplicaSet", "reviews-v1-7d8f9c", "reviews-v1-7d8f9c-x2x7q", Some("7d8f9c"));
        assert_eq!(workload_name(&deployment), "reviews-v1");
        let bare_rs = owned_by("ReplicaSet", "cache-rs", "cache-rs-abcde", None);
        assert_eq!(workload_name(&bare_rs), "cache-rs");
        let cron = owned_by("Job", "backup-28912345", "backup-28912345-q9z", None);
        assert_eq!(workload_name(&cron), "backup");
        let job = owned_by("Job", "migrate-v2", "migrate-v2-q9z", None);
        assert_eq!(workload_name(&job), "migrate-v2");
        let sts = owned_by("StatefulSet", "db", "db-0", None);
        assert_eq!(workload_name(&sts), "db");
        let generated = ObjectMeta {
            name: Some("tool-8k2f".into()),
            generate_name: Some("tool-".into()),
            ..ObjectMeta::default()
        };
        assert_eq!(workload_name(&generated), "tool");
        let plain = ObjectMeta { name: Some("debug".into()), ..ObjectMeta::default() };
        assert_eq!(workload_name(&plain), "debug");
    }
}
