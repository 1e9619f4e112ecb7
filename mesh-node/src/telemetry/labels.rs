//! Istio's standard metric labels, derived the way Istio derives them, so that Istio's
//! dashboards, Kiali-style graphs and alerts read Nodemesh's series unchanged.
//!
//! A series is `reporter` + the source's labels + the destination's labels + the service's
//! labels + per-request facts. The peer and service parts are resolved once per connection
//! (or per answering endpoint) and shared behind an `Arc`: recording a request hashes them
//! but never allocates them again.
//!
//! Cardinality is bounded by design: the workload label is the *owner's* name (a Deployment,
//! not its pods: see `workload_name` on the control plane's Workload), services are the
//! Services the control plane knows, and the per-request facts are small enumerations
//! (response code, gRPC status, flags) — never paths, pod names or client addresses.

use std::{collections::BTreeMap, sync::Arc};

use nodemesh_api::{
    proto::mesh,
    workload::{WorkloadKey, WorkloadNames},
};
use prometheus_client::encoding::{EncodeLabelSet, LabelSetEncoder};

pub const UNKNOWN: &str = "unknown";

/// What names a peer beyond its own record: the mesh's trust domain (its principal) and the
/// cluster this node belongs to (`source_cluster` / `destination_cluster`).
#[derive(Clone, Debug)]
pub struct Naming {
    pub trust_domain: String,
    /// Istio's `clusterName`; `Kubernetes` unless set (Istio's default).
    pub cluster: String,
}

impl Default for Naming {
    fn default() -> Self {
        Naming { trust_domain: "cluster.local".into(), cluster: "Kubernetes".into() }
    }
}

/// One side of a connection or request, as Istio labels it.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct Peer {
    /// The owner's name (Deployment, StatefulSet, …), not the pod's.
    pub workload: String,
    pub namespace: String,
    /// `spiffe://<trust domain>/ns/<namespace>/sa/<service account>`.
    pub principal: String,
    /// The `app` label.
    pub app: String,
    /// The `version` label.
    pub version: String,
    pub canonical_service: String,
    pub canonical_revision: String,
    pub cluster: String,
}

impl Peer {
    /// A peer nothing is known about (a client outside the mesh, a destination that is not a
    /// workload).
    pub fn unknown() -> Peer {
        Peer {
            workload: UNKNOWN.into(),
            namespace: UNKNOWN.into(),
            principal: UNKNOWN.into(),
            app: UNKNOWN.into(),
            version: UNKNOWN.into(),
            canonical_service: UNKNOWN.into(),
            canonical_revision: UNKNOWN.into(),
            cluster: UNKNOWN.into(),
        }
    }

    /// A workload as the control plane describes it.
    pub fn of_workload(w: &mesh::Workload, naming: &Naming) -> Peer {
        // A name the control plane derived from the pod's owner; a record without one (an
        // older control plane, a WorkloadEntry) is named by itself.
        let workload = if w.workload_name.is_empty() { &w.name } else { &w.workload_name };
        Peer::new(&w.namespace, workload, Some(&w.service_account), Some(&w.labels), naming)
    }

    /// A workload of this node: its control-plane record when there is one (owner name,
    /// labels), else its key and identity.
    pub fn local(
        record: Option<&mesh::Workload>,
        key: &WorkloadKey,
        service_account: &str,
        naming: &Naming,
    ) -> Peer {
        match record {
            Some(w) => Peer::of_workload(w, naming),
            None => Peer::new(&key.namespace, &key.name, Some(service_account), None, naming),
        }
    }

    /// The workload behind an endpoint: `uid` (`namespace/name`; anything else: unknown)
    /// named as the endpoint's `names` say, else by its key alone.
    pub fn of_endpoint(uid: &str, names: Option<&WorkloadNames>, naming: &Naming) -> Peer {
        match (uid.split_once('/'), names) {
            (Some((namespace, _)), Some(names)) => Peer::of_names(namespace, names, naming),
            (Some((namespace, name)), None) => Peer::new(namespace, name, None, None, naming),
            (None, _) => Peer::unknown(),
        }
    }

    /// A workload known by name only: `service_account` (its identity) and `labels` when
    /// known.
    pub fn new(
        namespace: &str,
        workload: &str,
        service_account: Option<&str>,
        labels: Option<&BTreeMap<String, String>>,
        naming: &Naming,
    ) -> Peer {
        let no_labels = BTreeMap::new();
        let names = WorkloadNames::derive(
            workload,
            service_account.unwrap_or_default(),
            labels.unwrap_or(&no_labels),
        );
        Peer::of_names(namespace, &names, naming)
    }

    /// A workload in `namespace` named as `names` says (the control plane's derivation).
    pub fn of_names(namespace: &str, names: &WorkloadNames, naming: &Naming) -> Peer {
        let or_unknown = |v: &str| if v.is_empty() { UNKNOWN.to_string() } else { v.to_string() };
        Peer {
            workload: or_unknown(&names.workload),
            namespace: namespace.to_string(),
            principal: if names.service_account.is_empty() {
                UNKNOWN.to_string()
            } else {
                format!("spiffe://{}/ns/{namespace}/sa/{}", naming.trust_domain, names.service_account)
            },
            app: or_unknown(&names.app),
            version: or_unknown(&names.version),
            canonical_service: or_unknown(&names.canonical_service),
            canonical_revision: or_unknown(&names.canonical_revision),
            cluster: naming.cluster.clone(),
        }
    }

    pub fn as_source(&self) -> Arc<SourceLabels> {
        Arc::new(SourceLabels {
            source_workload: self.workload.clone(),
            source_workload_namespace: self.namespace.clone(),
            source_principal: self.principal.clone(),
            source_app: self.app.clone(),
            source_version: self.version.clone(),
            source_canonical_service: self.canonical_service.clone(),
            source_canonical_revision: self.canonical_revision.clone(),
            source_cluster: self.cluster.clone(),
        })
    }

    pub fn as_destination(&self) -> Arc<DestinationLabels> {
        Arc::new(DestinationLabels {
            destination_workload: self.workload.clone(),
            destination_workload_namespace: self.namespace.clone(),
            destination_principal: self.principal.clone(),
            destination_app: self.app.clone(),
            destination_version: self.version.clone(),
            destination_canonical_service: self.canonical_service.clone(),
            destination_canonical_revision: self.canonical_revision.clone(),
            destination_cluster: self.cluster.clone(),
        })
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
pub struct SourceLabels {
    pub source_workload: String,
    pub source_workload_namespace: String,
    pub source_principal: String,
    pub source_app: String,
    pub source_version: String,
    pub source_canonical_service: String,
    pub source_canonical_revision: String,
    pub source_cluster: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
pub struct DestinationLabels {
    pub destination_workload: String,
    pub destination_workload_namespace: String,
    pub destination_principal: String,
    pub destination_app: String,
    pub destination_version: String,
    pub destination_canonical_service: String,
    pub destination_canonical_revision: String,
    pub destination_cluster: String,
}

/// Who connects (the source workload's labels) to which Service: resolved once per client
/// connection; the tunnel carries it to the serving node for its `reporter="destination"`
/// series.
#[derive(Clone, Debug)]
pub struct Caller {
    /// The client pod's own name (the tunnel's baggage carries it beside the workload's).
    pub pod: String,
    pub source: Arc<SourceLabels>,
    pub service: Arc<ServiceLabels>,
    /// HTTP on this connection (`http/1.1` or `h2`), so the serving node reports its requests
    /// too; `None`: TCP.
    pub http: Option<&'static str>,
}

/// The Service a client dialled.
#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
pub struct ServiceLabels {
    /// Its hostname (`reviews.shop.svc.cluster.local`, or a ServiceEntry's host).
    pub destination_service: String,
    /// `reviews` for a Kubernetes Service; the host itself for a ServiceEntry.
    pub destination_service_name: String,
    pub destination_service_namespace: String,
}

impl ServiceLabels {
    pub fn unknown() -> Arc<ServiceLabels> {
        Arc::new(ServiceLabels {
            destination_service: UNKNOWN.into(),
            destination_service_name: UNKNOWN.into(),
            destination_service_namespace: UNKNOWN.into(),
        })
    }

    /// A connection to an address no Service owns, passed through as dialled (Istio's name).
    pub fn passthrough() -> Arc<ServiceLabels> {
        Arc::new(ServiceLabels {
            destination_service: UNKNOWN.into(),
            destination_service_name: "PassthroughCluster".into(),
            destination_service_namespace: UNKNOWN.into(),
        })
    }

    /// `hostname` of a service defined in `namespace` (empty: not known).
    pub fn of(hostname: &str, namespace: &str) -> Arc<ServiceLabels> {
        if hostname.is_empty() {
            return ServiceLabels::unknown();
        }
        let namespace = if namespace.is_empty() { UNKNOWN } else { namespace };
        let short = hostname
            .strip_suffix('.')
            .unwrap_or(hostname)
            .split_once('.')
            .filter(|(_, rest)| rest.starts_with(&format!("{namespace}.svc")))
            .map_or(hostname, |(name, _)| name);
        Arc::new(ServiceLabels {
            destination_service: hostname.to_string(),
            destination_service_name: short.to_string(),
            destination_service_namespace: namespace.to_string(),
        })
    }
}

/// A label set shared between many series: encodes as the set it points to.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct Shared<T>(pub Arc<T>);

impl<T: EncodeLabelSet> EncodeLabelSet for Shared<T> {
    fn encode(&self, encoder: &mut LabelSetEncoder<'_>) -> Result<(), std::fmt::Error> {
        self.0.encode(encoder)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn istio_derivations() {
        let naming = Naming::default();
        let labels: BTreeMap<String, String> =
            [("app", "reviews"), ("version", "v2")].map(|(k, v)| (k.to_string(), v.to_string())).into();
        let p = Peer::new("shop", "reviews-v2", Some("bookinfo-reviews"), Some(&labels), &naming);
        assert_eq!(p.principal, "spiffe://cluster.local/ns/shop/sa/bookinfo-reviews");
        assert_eq!((p.app.as_str(), p.version.as_str()), ("reviews", "v2"));
        assert_eq!((p.canonical_service.as_str(), p.canonical_revision.as_str()), ("reviews", "v2"));
        assert_eq!(p.cluster, "Kubernetes");

        let bare = Peer::new("shop", "batch", None, None, &naming);
        assert_eq!((bare.app.as_str(), bare.principal.as_str()), (UNKNOWN, UNKNOWN));
        assert_eq!((bare.canonical_service.as_str(), bare.canonical_revision.as_str()), ("batch", "latest"));

        let canonical: BTreeMap<String, String> = [
            ("app", "a"),
            ("app.kubernetes.io/name", "k"),
            ("service.istio.io/canonical-name", "c"),
            ("app.kubernetes.io/version", "7"),
        ]
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .into();
        let p = Peer::new("shop", "w", Some("sa"), Some(&canonical), &naming);
        assert_eq!((p.canonical_service.as_str(), p.canonical_revision.as_str()), ("c", "7"));
        assert_eq!(p.version, UNKNOWN, "version is the plain label only");
    }

    #[test]
    fn service_names() {
        let s = ServiceLabels::of("reviews.shop.svc.cluster.local", "shop");
        assert_eq!(
            (s.destination_service_name.as_str(), s.destination_service_namespace.as_str()),
            ("reviews", "shop")
        );
        let s = ServiceLabels::of("api.example.com", "egress");
        assert_eq!(
            (s.destination_service_name.as_str(), s.destination_service_namespace.as_str()),
            ("api.example.com", "egress")
        );
        assert_eq!(ServiceLabels::of("", "shop").destination_service, UNKNOWN);
    }
}
