//! DestinationRule exportTo: the callers of a host that see another rule than most get
//! clusters of their own, named in the default clusters' metadata.

use std::collections::{BTreeSet, HashMap};

use envoy_types::pb::{envoy::config::cluster::v3::Cluster, google::protobuf as pbuf};

use crate::{
    model::{CLUSTER_DOMAIN, Object, destination_rules::DestinationRules, istio, store::Store},
    proto,
    xds::encode::string_value,
};

/// Every host's callers that see another DestinationRule than most.
pub(super) fn caller_variants(
    rules: &DestinationRules<'_>,
    store: &Store,
) -> HashMap<String, Vec<CallerVariant>> {
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
pub(super) struct CallerVariant {
    pub(super) namespaces: BTreeSet<String>,
    pub(super) suffix: String,
}

/// The suffix of the clusters made for callers that see `rule` (`None`: no rule at all).
pub(super) fn variant_suffix(rule: Option<&istio::DestinationRule>) -> String {
    match rule {
        Some(dr) => format!("~{}.{}", dr.meta.namespace, dr.meta.name),
        None => "~no-rule".to_string(),
    }
}

/// Names, in a default cluster's `nodemesh.io` metadata (`caller_variants`), the callers that
/// have clusters of their own: mesh-node sends a caller in one of `namespaces` to the cluster
/// of the same name plus `suffix`. Envoy and gRPC clients use the default clusters.
pub(super) fn add_caller_variants(cluster: &mut Cluster, callers: &[CallerVariant]) {
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
