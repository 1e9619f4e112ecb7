//! Callers that see another DestinationRule than most (`exportTo`, a rule in the caller's own
//! namespace) have clusters of their own: the default cluster's `nodemesh.io` metadata names
//! them (`caller_variants`: calling namespaces and the suffix of their cluster's name), and
//! `Cache::cluster_for` sends each caller to its own.

use std::collections::BTreeSet;

use envoy_types::pb::{envoy::config::cluster::v3::Cluster, google::protobuf::value::Kind};
use nodemesh_api::proto::{CLUSTER_CALLER_VARIANTS, METADATA_KEY};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CallerVariant {
    pub namespaces: BTreeSet<String>,
    /// Appended to the default cluster's name.
    pub suffix: String,
}

/// The variants a Cluster names; an error says what is malformed.
pub fn from_cluster(c: &Cluster) -> Result<Vec<CallerVariant>, String> {
    let Some(value) = c
        .metadata
        .as_ref()
        .and_then(|m| m.filter_metadata.get(METADATA_KEY))
        .and_then(|s| s.fields.get(CLUSTER_CALLER_VARIANTS))
    else {
        return Ok(Vec::new());
    };
    let bad =
        |why: &str| format!("Cluster {}: metadata {METADATA_KEY}.{CLUSTER_CALLER_VARIANTS}: {why}", c.name);
    let Some(Kind::ListValue(list)) = &value.kind else { return Err(bad("not a list")) };
    list.values
        .iter()
        .map(|v| {
            let Some(Kind::StructValue(entry)) = &v.kind else { return Err(bad("an entry is not a struct")) };
            let suffix = match entry.fields.get("suffix").and_then(|s| s.kind.as_ref()) {
                Some(Kind::StringValue(s)) if !s.is_empty() => s.clone(),
                _ => return Err(bad("an entry has no suffix")),
            };
            let namespaces = match entry.fields.get("namespaces").and_then(|n| n.kind.as_ref()) {
                Some(Kind::ListValue(l)) => l
                    .values
                    .iter()
                    .map(|n| match &n.kind {
                        Some(Kind::StringValue(s)) => Ok(s.clone()),
                        _ => Err(bad("a namespace is not a string")),
                    })
                    .collect::<Result<BTreeSet<_>, _>>()?,
                _ => return Err(bad("an entry has no namespaces")),
            };
            Ok(CallerVariant { namespaces, suffix })
        })
        .collect()
}
