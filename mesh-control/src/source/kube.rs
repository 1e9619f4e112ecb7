//! The Kubernetes source: one kube-runtime watcher per resource (list, then watch from the
//! list's resourceVersion, with bookmarks; a 410 Gone relists), feeding the same store and the
//! same parser as the file source, so a cluster and a directory holding the same objects
//! yield the same model.
//!
//! Objects come as `DynamicObject`s and are parsed by [`object_from_value`]: one parser for
//! every source, with the same field-path errors. A resource the API server does not serve
//! (an Istio CRD not installed) counts as empty and is retried in the background.

use std::sync::{Arc, Mutex};

use futures::StreamExt;
use kube::{
    Api, Client,
    api::{ApiResource, DynamicObject, GroupVersionKind},
    runtime::{WatchStreamExt, watcher},
};
use tokio::sync::Notify;

use crate::model::{
    Kind, ObjectKey, object_from_value,
    store::{Document, Origin, Store},
};

/// One watched resource.
struct Watched {
    group: &'static str,
    version: &'static str,
    kind: &'static str,
    plural: &'static str,
    model: Kind,
}

/// Every resource the model reads from a cluster.
const RESOURCES: [Watched; 15] = [
    Watched { group: "", version: "v1", kind: "Namespace", plural: "namespaces", model: Kind::Namespace },
    Watched { group: "", version: "v1", kind: "Node", plural: "nodes", model: Kind::Node },
    Watched { group: "", version: "v1", kind: "Pod", plural: "pods", model: Kind::Pod },
    Watched { group: "", version: "v1", kind: "Service", plural: "services", model: Kind::Service },
    Watched {
        group: "discovery.k8s.io",
        version: "v1",
        kind: "EndpointSlice",
        plural: "endpointslices",
        model: Kind::EndpointSlice,
    },
    Watched {
        group: "networking.istio.io",
        version: "v1",
        kind: "ServiceEntry",
        plural: "serviceentries",
        model: Kind::ServiceEntry,
    },
    Watched {
        group: "networking.istio.io",
        version: "v1",
        kind: "WorkloadEntry",
        plural: "workloadentries",
        model: Kind::WorkloadEntry,
    },
    Watched {
        group: "networking.istio.io",
        version: "v1",
        kind: "DestinationRule",
        plural: "destinationrules",
        model: Kind::DestinationRule,
    },
    Watched {
        group: "networking.istio.io",
        version: "v1",
        kind: "Sidecar",
        plural: "sidecars",
        model: Kind::Sidecar,
    },
    Watched {
        group: "networking.istio.io",
        version: "v1",
        kind: "VirtualService",
        plural: "virtualservices",
        model: Kind::VirtualService,
    },
    Watched {
        group: "security.istio.io",
        version: "v1",
        kind: "AuthorizationPolicy",
        plural: "authorizationpolicies",
        model: Kind::AuthorizationPolicy,
    },
    Watched {
        group: "security.istio.io",
        version: "v1",
        kind: "PeerAuthentication",
        plural: "peerauthentications",
        model: Kind::PeerAuthentication,
    },
    Watched {
        group: "telemetry.istio.io",
        version: "v1",
        kind: "Telemetry",
        plural: "telemetries",
        model: Kind::Telemetry,
    },
    Watched {
        group: "nodemesh.io",
        version: "v1alpha1",
        kind: "RateLimitPolicy",
        plural: "ratelimitpolicies",
        model: Kind::RateLimitPolicy,
    },
    Watched {
        group: "nodemesh.io",
        version: "v1alpha1",
        kind: "MeshConfig",
        plural: "meshconfigs",
        model: Kind::MeshConfig,
    },
];

/// (API group, plural) of every resource read: what mesh-control's ClusterRole must allow to
/// list and watch.
pub fn watched_resources() -> Vec<(&'static str, &'static str)> {
    RESOURCES.iter().map(|r| (r.group, r.plural)).collect()
}

pub use nodemesh_api::kube_client::{Connection, client};

/// Starts a watcher per resource; each fills the store under `Origin::Kubernetes(<plural>)`.
pub fn start(client: Client, store: Arc<Mutex<Store>>, changed: Arc<Notify>) {
    for resource in &RESOURCES {
        tokio::spawn(watch_resource(client.clone(), resource, Arc::clone(&store), Arc::clone(&changed)));
    }
}

/// Whether every resource has been listed once (or found not served): until then the model
/// lacks part of the cluster.
pub fn synced(store: &Store) -> bool {
    RESOURCES.iter().all(|r| store.has_delivered(&Origin::Kubernetes(r.plural.to_string())))
}

/// Follows one resource for ever; the watcher re-lists and re-watches on its own, with backoff.
async fn watch_resource(
    client: Client,
    resource: &'static Watched,
    store: Arc<Mutex<Store>>,
    changed: Arc<Notify>,
) {
    let gvk = GroupVersionKind::gvk(resource.group, resource.version, resource.kind);
    let ar = ApiResource::from_gvk_with_plural(&gvk, resource.plural);
    let api: Api<DynamicObject> = Api::all_with(client, &ar);
    let origin = Origin::Kubernetes(resource.plural.to_string());
    let mut listing: Vec<Document> = Vec::new();
    let mut absent_logged = false;
    let mut events = std::pin::pin!(watcher(api, watcher::Config::default()).default_backoff());
    while let Some(event) = events.next().await {
        let applied = match event {
            Ok(watcher::Event::Init) => {
                listing.clear();
                continue;
            }
            Ok(watcher::Event::InitApply(o)) => {
                listing.push(document(&ar, resource, o));
                continue;
            }
            Ok(watcher::Event::InitDone) => {
                let docs = std::mem::take(&mut listing);
                let count = docs.len();
                let applied = store.lock().expect("store lock").replace_source(&origin, docs);
                tracing::info!(
                    resource = resource.plural,
                    objects = count,
                    changed = applied.changed,
                    "kubernetes: listed"
                );
                absent_logged = false;
                // Even if this list changed nothing, it may complete the first sync.
                changed.notify_one();
                applied
            }
            Ok(watcher::Event::Apply(o)) => {
                let doc = document(&ar, resource, o);
                store.lock().expect("store lock").upsert(&origin, doc)
            }
            Ok(watcher::Event::Delete(o)) => {
                let (key, location) = key_of(resource, &o);
                store.lock().expect("store lock").delete(&origin, &key, &location)
            }
            Err(e) if not_served(&e) => {
                // A CRD that is not installed: nothing of this kind exists. Keep asking (it may
                // be installed later) without holding up readiness or repeating the warning.
                if !absent_logged {
                    tracing::warn!(
                        resource = resource.plural,
                        "kubernetes: {}/{} {} is not served by the API server (CRD not installed?); treated as empty",
                        resource.group,
                        resource.version,
                        resource.plural
                    );
                    absent_logged = true;
                }
                let applied = store.lock().expect("store lock").replace_source(&origin, Vec::new());
                changed.notify_one();
                applied
            }
            Err(e) => {
                tracing::warn!(resource = resource.plural, "kubernetes: {e}; retrying with backoff");
                continue;
            }
        };
        if applied.changed > 0 || applied.rejected > 0 {
            changed.notify_one();
        }
    }
}

fn not_served(e: &watcher::Error) -> bool {
    matches!(e, watcher::Error::InitialListFailed(kube::Error::Api(s)) if s.code == 404)
}

/// One API object as a store document. List items carry no `apiVersion`/`kind` (the API server
/// leaves them out), so they are set from the resource being watched.
fn document(ar: &ApiResource, resource: &Watched, o: DynamicObject) -> Document {
    let (_, location) = key_of(resource, &o);
    let mut value = serde_json::to_value(&o).unwrap_or_default();
    if let Some(map) = value.as_object_mut() {
        map.insert("apiVersion".into(), ar.api_version.clone().into());
        map.insert("kind".into(), ar.kind.clone().into());
    }
    Document { location, result: object_from_value(value) }
}

/// The store key of an API object and its location for messages (`namespace/name`).
fn key_of(resource: &Watched, o: &DynamicObject) -> (ObjectKey, String) {
    let name = o.metadata.name.clone().unwrap_or_default();
    let namespace = if resource.model.is_namespaced() {
        o.metadata.namespace.clone().filter(|n| !n.is_empty()).unwrap_or_else(|| "default".into())
    } else {
        String::new()
    };
    let location = if namespace.is_empty() { name.clone() } else { format!("{namespace}/{name}") };
    (ObjectKey { kind: resource.model, namespace, name }, location)
}
