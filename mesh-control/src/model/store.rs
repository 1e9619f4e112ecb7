//! The objects in force, where each came from, and what was rejected.
//!
//! Rules: a bad object never half-applies; the last good version of
//! that object stays in force; everything else is unaffected. A source replaces only the
//! objects it owns, so a broken file cannot take down objects from another file or from
//! Kubernetes.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    path::PathBuf,
};

use super::{Kind, Object, ObjectKey, ParseError};

/// Who supplied an object.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub enum Origin {
    File(PathBuf),
    /// One watched resource of the Kubernetes API, by plural name (`pods`, `serviceentries`).
    Kubernetes(String),
    Node(String),
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::File(p) => write!(f, "{}", p.display()),
            Origin::Kubernetes(resource) => write!(f, "kubernetes {resource}"),
            Origin::Node(n) => write!(f, "node {n}"),
        }
    }
}

/// A rejected document or file, as `validate` and the logs show it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct SourceError {
    pub origin: Origin,
    /// Where in the source: `document 2 (line 14)`; empty for the whole file.
    pub location: String,
    pub message: String,
}

impl fmt::Display for SourceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.location.is_empty() {
            write!(f, "{}: {}", self.origin, self.message)
        } else {
            write!(f, "{} {}: {}", self.origin, self.location, self.message)
        }
    }
}

/// One document of a source: the object, or why not, and where it sits.
#[derive(Clone, Debug)]
pub struct Document {
    pub location: String,
    pub result: Result<Object, ParseError>,
}

#[derive(Clone, Debug)]
struct Entry {
    object: Object,
    origin: Origin,
}

#[derive(Default)]
pub struct Store {
    objects: BTreeMap<ObjectKey, Entry>,
    /// Current problems, by source.
    errors: BTreeMap<Origin, Vec<SourceError>>,
    /// Every source that has delivered its set at least once (even an empty one): a node that
    /// runs no workloads has still reported.
    delivered: BTreeSet<Origin>,
    generation: u64,
}

/// What an update did, for logs.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Applied {
    pub changed: usize,
    pub rejected: usize,
}

impl Store {
    /// Bumped on every change to the objects in force.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    pub fn of_kind(&self, kind: Kind) -> impl Iterator<Item = &Object> {
        let start = ObjectKey { kind, namespace: String::new(), name: String::new() };
        self.objects.range(start..).take_while(move |(k, _)| k.kind == kind).map(|(_, e)| &e.object)
    }

    pub fn errors(&self) -> impl Iterator<Item = &SourceError> {
        self.errors.values().flatten()
    }

    pub fn len(&self) -> usize {
        self.objects.len()
    }

    pub fn is_empty(&self) -> bool {
        self.objects.is_empty()
    }

    /// Whether `origin` has delivered its set since this store was created.
    pub fn has_delivered(&self, origin: &Origin) -> bool {
        self.delivered.contains(origin)
    }

    /// Replaces everything `origin` supplies with `documents`. A document that fails keeps the
    /// previous version of the object it names (if `origin` supplied one) in force.
    pub fn replace_source(&mut self, origin: &Origin, documents: Vec<Document>) -> Applied {
        let mut applied = Applied::default();
        self.delivered.insert(origin.clone());
        let mut errors = Vec::new();
        let mut keep: BTreeSet<ObjectKey> = BTreeSet::new();
        let mut next: BTreeMap<ObjectKey, Object> = BTreeMap::new();
        for doc in documents {
            match doc.result {
                Ok(object) => {
                    let key = object.key();
                    let refused = if let Some(owner) = self.owner_other_than(&key, origin) {
                        Some(format!("{key}: already defined by {owner}; this copy is ignored"))
                    } else if let std::collections::btree_map::Entry::Vacant(slot) = next.entry(key.clone()) {
                        slot.insert(object);
                        None
                    } else {
                        Some(format!("{key}: defined twice in this source; the first one is used"))
                    };
                    if let Some(message) = refused {
                        applied.rejected += 1;
                        errors.push(SourceError { origin: origin.clone(), location: doc.location, message });
                    }
                }
                Err(e) => {
                    applied.rejected += 1;
                    if let Some(k) = &e.key {
                        keep.insert(k.clone());
                    }
                    errors.push(self.rejection(origin, doc.location, &e));
                }
            }
        }
        let stale: Vec<ObjectKey> = self
            .objects
            .iter()
            .filter(|(k, e)| &e.origin == origin && !next.contains_key(*k) && !keep.contains(*k))
            .map(|(k, _)| k.clone())
            .collect();
        for key in stale {
            self.objects.remove(&key);
            applied.changed += 1;
        }
        for (key, object) in next {
            let same = self.objects.get(&key).is_some_and(|e| e.object == object);
            if !same {
                self.objects.insert(key, Entry { object, origin: origin.clone() });
                applied.changed += 1;
            }
        }
        self.set_errors(origin, errors);
        if applied.changed > 0 {
            self.generation += 1;
        }
        applied
    }

    /// Adds or replaces one object of `origin` (a watch event). A document that fails keeps the
    /// previous version of the object in force; its error replaces any earlier error reported
    /// at the same location (an object's location must stay the same across updates).
    pub fn upsert(&mut self, origin: &Origin, doc: Document) -> Applied {
        let mut errors = self.errors.remove(origin).unwrap_or_default();
        errors.retain(|e| e.location != doc.location);
        let mut applied = Applied::default();
        self.delivered.insert(origin.clone());
        match doc.result {
            Ok(object) => {
                let key = object.key();
                if let Some(owner) = self.owner_other_than(&key, origin) {
                    applied.rejected += 1;
                    let message = format!("{key}: already defined by {owner}; this copy is ignored");
                    let error = SourceError { origin: origin.clone(), location: doc.location, message };
                    tracing::warn!("rejected: {error}");
                    errors.push(error);
                } else if self.objects.get(&key).is_none_or(|e| e.object != object) {
                    self.objects.insert(key, Entry { object, origin: origin.clone() });
                    applied.changed += 1;
                }
            }
            Err(e) => {
                applied.rejected += 1;
                let error = self.rejection(origin, doc.location, &e);
                tracing::warn!("rejected: {error}");
                errors.push(error);
            }
        }
        if !errors.is_empty() {
            self.errors.insert(origin.clone(), errors);
        }
        if applied.changed > 0 {
            self.generation += 1;
        }
        applied
    }

    /// Removes one object of `origin` (a watch event), and any error reported at `location`.
    pub fn delete(&mut self, origin: &Origin, key: &ObjectKey, location: &str) -> Applied {
        let mut applied = Applied::default();
        if let Some(errors) = self.errors.get_mut(origin) {
            errors.retain(|e| e.location != location);
            if errors.is_empty() {
                self.errors.remove(origin);
            }
        }
        if self.objects.get(key).is_some_and(|e| &e.origin == origin) {
            self.objects.remove(key);
            applied.changed += 1;
            self.generation += 1;
        }
        applied
    }

    /// A source that cannot be read at all (say, a YAML syntax error): keep all it supplied.
    pub fn source_failed(&mut self, origin: &Origin, error: SourceError) {
        self.set_errors(origin, vec![error]);
    }

    /// The source is gone (file deleted): its objects go too.
    pub fn remove_source(&mut self, origin: &Origin) -> Applied {
        let applied = self.replace_source(origin, Vec::new());
        self.errors.remove(origin);
        self.delivered.remove(origin);
        applied
    }

    /// The error for a document of `origin` that failed to parse, saying whether the object's
    /// previous version (from the same origin) stays in force.
    fn rejection(&self, origin: &Origin, location: String, e: &ParseError) -> SourceError {
        let kept =
            e.key.as_ref().is_some_and(|k| self.objects.get(k).is_some_and(|entry| &entry.origin == origin));
        let suffix = if kept { " (the previous version stays in force)" } else { "" };
        SourceError { origin: origin.clone(), location, message: format!("{e}{suffix}") }
    }

    fn owner_other_than(&self, key: &ObjectKey, origin: &Origin) -> Option<&Origin> {
        self.objects.get(key).map(|e| &e.origin).filter(|o| *o != origin)
    }

    fn set_errors(&mut self, origin: &Origin, errors: Vec<SourceError>) {
        for e in &errors {
            tracing::warn!("rejected: {e}");
        }
        if errors.is_empty() {
            self.errors.remove(origin);
        } else {
            self.errors.insert(origin.clone(), errors);
        }
    }
}

/// For unit tests across the model: a store holding `yaml`, which must be valid.
#[cfg(test)]
impl Store {
    pub(crate) fn from_valid_yaml(yaml: &str) -> Store {
        let mut store = Store::default();
        store.replace_source(&Origin::File("test.yaml".into()), crate::source::files::parse_documents(yaml));
        let errors: Vec<String> = store.errors().map(ToString::to_string).collect();
        assert!(errors.is_empty(), "{errors:?}");
        store
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::model::object_from_value;

    fn doc(v: serde_json::Value) -> Document {
        Document { location: "document 1".into(), result: object_from_value(v) }
    }

    fn dr(name: &str, simple: &str) -> serde_json::Value {
        json!({"apiVersion": "networking.istio.io/v1", "kind": "DestinationRule",
               "metadata": {"name": name, "namespace": "shop"},
               "spec": {"host": name, "trafficPolicy": {"loadBalancer": {"simple": simple}}}})
    }

    #[test]
    fn bad_version_keeps_last_good_and_other_objects() {
        let file = Origin::File("a.yaml".into());
        let mut store = Store::default();
        store.replace_source(&file, vec![doc(dr("r", "RANDOM")), doc(dr("s", "RANDOM"))]);
        assert_eq!(store.len(), 2);
        let g = store.generation();
        let applied = store.replace_source(&file, vec![doc(dr("r", "NOPE")), doc(dr("s", "RANDOM"))]);
        assert_eq!(applied, Applied { changed: 0, rejected: 1 });
        assert_eq!(store.generation(), g);
        assert_eq!(store.len(), 2, "the broken object's last good version stays");
        let errors: Vec<String> = store.errors().map(ToString::to_string).collect();
        assert!(errors[0].contains("previous version stays in force"), "{errors:?}");
        // Fixed: error cleared.
        store.replace_source(&file, vec![doc(dr("r", "ROUND_ROBIN")), doc(dr("s", "RANDOM"))]);
        assert_eq!(store.errors().count(), 0);
    }

    #[test]
    fn removed_document_deletes_its_object_and_other_files_are_untouched() {
        let (a, b) = (Origin::File("a.yaml".into()), Origin::File("b.yaml".into()));
        let mut store = Store::default();
        store.replace_source(&a, vec![doc(dr("r", "RANDOM"))]);
        store.replace_source(&b, vec![doc(dr("s", "RANDOM"))]);
        // The same object from another file is refused, not overwritten.
        let applied = store.replace_source(&b, vec![doc(dr("s", "RANDOM")), doc(dr("r", "ROUND_ROBIN"))]);
        assert_eq!(applied.rejected, 1);
        store.remove_source(&a);
        assert_eq!(store.len(), 1);
    }

    #[test]
    fn watch_events_upsert_and_delete_single_objects() {
        let api = Origin::Kubernetes("destinationrules".into());
        let mut store = Store::default();
        let at = |loc: &str, v| Document { location: loc.into(), result: object_from_value(v) };
        store.upsert(&api, at("shop/r", dr("r", "RANDOM")));
        store.upsert(&api, at("shop/s", dr("s", "RANDOM")));
        let applied = store.upsert(&api, at("shop/r", dr("r", "NOPE")));
        assert_eq!(applied, Applied { changed: 0, rejected: 1 });
        assert_eq!(store.len(), 2, "a bad update keeps the last good version");
        assert_eq!(store.errors().count(), 1);
        // Fixing one object clears its error only; deleting it removes it.
        store.upsert(&api, at("shop/r", dr("r", "ROUND_ROBIN")));
        assert_eq!(store.errors().count(), 0);
        let key = object_from_value(dr("r", "RANDOM")).unwrap().key();
        assert_eq!(store.delete(&api, &key, "shop/r").changed, 1);
        assert_eq!(store.len(), 1);
        assert!(store.has_delivered(&api));
    }
}
