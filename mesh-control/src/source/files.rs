//! The embedded default source: a directory of YAML (or JSON) files, multi-document, watched.
//!
//! Each file is one source in the store: editing a file replaces exactly the objects it holds;
//! a file that does not parse at all keeps what it held before; deleting a file removes them.

use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use notify::Watcher;
use serde_json::Value;
use tokio::sync::Notify;

use crate::model::{
    object_from_value,
    store::{Document, Origin, SourceError, Store},
};

/// Files the source reads: `*.yaml`, `*.yml`, `*.json`, not hidden (editors' swap files are).
pub fn is_config_file(path: &Path) -> bool {
    let hidden = path.file_name().and_then(|n| n.to_str()).is_none_or(|n| n.starts_with('.'));
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or_default();
    !hidden && matches!(ext, "yaml" | "yml" | "json")
}

/// Every config file under `dir`, recursively, sorted.
pub fn list_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in fs::read_dir(&d)? {
            let entry = entry?;
            let path = entry.path();
            let hidden = entry.file_name().to_string_lossy().starts_with('.');
            if entry.file_type()?.is_dir() {
                if !hidden {
                    stack.push(path);
                }
            } else if is_config_file(&path) {
                out.push(path);
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Reads one file into documents; `Err` when the file as a whole cannot be read.
pub fn load_file(path: &Path) -> Result<Vec<Document>, SourceError> {
    let origin = Origin::File(path.to_path_buf());
    let text = fs::read_to_string(path).map_err(|e| SourceError {
        origin: origin.clone(),
        location: String::new(),
        message: format!("cannot read: {e}"),
    })?;
    Ok(parse_documents(&text))
}

/// Splits on `---` lines and parses each document; `kind: List` is expanded.
pub fn parse_documents(text: &str) -> Vec<Document> {
    let mut docs = Vec::new();
    for (index, (line, body)) in split_documents(text).into_iter().enumerate() {
        let location = format!("document {} (line {line})", index + 1);
        if body.lines().all(|l| l.trim().is_empty() || l.trim_start().starts_with('#')) {
            continue;
        }
        let value: Value = match serde_saphyr::from_str(&body) {
            Ok(v) => v,
            Err(e) => {
                docs.push(Document { location, result: Err(syntax_error(e.to_string())) });
                continue;
            }
        };
        if value.get("kind").and_then(Value::as_str) == Some("List") {
            let items = value.get("items").and_then(Value::as_array).cloned().unwrap_or_default();
            for (i, item) in items.into_iter().enumerate() {
                docs.push(Document {
                    location: format!("{location} items[{i}]"),
                    result: object_from_value(item),
                });
            }
        } else if value.is_object() {
            docs.push(Document { location, result: object_from_value(value) });
        } else {
            docs.push(Document { location, result: Err(syntax_error("not a mapping (an object)".into())) });
        }
    }
    docs
}

fn syntax_error(reason: String) -> crate::model::ParseError {
    crate::model::ParseError {
        key: None,
        object: "document".into(),
        errors: vec![crate::model::FieldError::new("", format!("not valid YAML: {reason}"))],
    }
}

/// (first line number, text) of each `---`-separated document.
fn split_documents(text: &str) -> Vec<(usize, String)> {
    let mut docs = vec![(1, String::new())];
    for (i, line) in text.lines().enumerate() {
        if line == "---" || line.starts_with("--- ") || line == "..." {
            docs.push((i + 2, String::new()));
        } else {
            let body = &mut docs.last_mut().expect("one document").1;
            body.push_str(line);
            body.push('\n');
        }
    }
    docs
}

/// Watches `dir` and keeps the store in step with it; `changed` is notified after each applied
/// batch. Runs until the process ends.
pub struct DirectorySource {
    dir: PathBuf,
    store: Arc<Mutex<Store>>,
    changed: Arc<Notify>,
    /// (mtime, len) per file at the last load, to skip unchanged files.
    seen: BTreeMap<PathBuf, (SystemTime, u64)>,
}

impl DirectorySource {
    pub fn new(dir: PathBuf, store: Arc<Mutex<Store>>, changed: Arc<Notify>) -> DirectorySource {
        DirectorySource { dir, store, changed, seen: BTreeMap::new() }
    }

    /// Loads every file once (synchronously, so the first xDS answer has the full config).
    pub fn load_all(&mut self) -> anyhow::Result<()> {
        if !self.dir.is_dir() {
            anyhow::bail!("config directory {} does not exist or is not a directory", self.dir.display());
        }
        self.rescan();
        Ok(())
    }

    /// Compares the directory with what was loaded and applies the differences.
    pub fn rescan(&mut self) -> usize {
        let files = match list_files(&self.dir) {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!("cannot list {}: {e}; keeping the current config", self.dir.display());
                return 0;
            }
        };
        let current: BTreeMap<PathBuf, (SystemTime, u64)> = files
            .iter()
            .filter_map(|p| {
                let m = fs::metadata(p).ok()?;
                Some((p.clone(), (m.modified().ok()?, m.len())))
            })
            .collect();
        // Read and parse before taking the store lock: xDS, reports and the admin endpoint
        // keep going while a big directory loads.
        let loaded: Vec<(Origin, Result<_, _>)> = current
            .iter()
            .filter(|(path, stamp)| self.seen.get(*path) != Some(*stamp))
            .map(|(path, _)| (Origin::File(path.clone()), load_file(path)))
            .collect();
        let mut changed = 0;
        let mut store = self.store.lock().expect("store lock");
        for gone in self.seen.keys().filter(|p| !current.contains_key(*p)) {
            let applied = store.remove_source(&Origin::File(gone.clone()));
            tracing::info!(file = %gone.display(), removed = applied.changed, "config file removed");
            changed += applied.changed;
        }
        for (origin, result) in loaded {
            match result {
                Ok(docs) => {
                    let applied = store.replace_source(&origin, docs);
                    tracing::info!(
                        file = %origin, changed = applied.changed, rejected = applied.rejected,
                        "config file loaded"
                    );
                    changed += applied.changed;
                }
                Err(e) => store.source_failed(&origin, e),
            }
        }
        self.seen = current;
        drop(store);
        if changed > 0 {
            self.changed.notify_one();
        }
        changed
    }

    /// Rescans on every filesystem event (coalesced over `settle`), and every `poll` as a
    /// safety net for filesystems without inotify.
    pub async fn watch(mut self, settle: Duration, poll: Duration) {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
            let _ = tx.send(event.is_ok());
        })
        .and_then(|mut w| w.watch(&self.dir, notify::RecursiveMode::Recursive).map(|()| w));
        let _watcher = match watcher {
            Ok(w) => Some(w),
            Err(e) => {
                tracing::warn!("cannot watch {} ({e}); polling every {poll:?}", self.dir.display());
                None
            }
        };
        loop {
            tokio::select! {
                Some(_) = rx.recv() => {
                    tokio::time::sleep(settle).await;
                    while rx.try_recv().is_ok() {}
                }
                _ = tokio::time::sleep(poll) => {}
            }
            // Blocking file I/O: keep the runtime's other tasks moving.
            tokio::task::block_in_place(|| self.rescan());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documents_are_split_with_locations() {
        let text = "\
apiVersion: v1
kind: Namespace
metadata: {name: shop}
---
# only a comment
---
apiVersion: v1
kind: Service
metadata: {name: bad, namespace: shop}
spec: {ports: [{port: 99999}]}
---
: : not yaml [
";
        let docs = parse_documents(text);
        assert_eq!(docs.len(), 3);
        assert!(docs[0].result.is_ok());
        assert_eq!(docs[1].location, "document 3 (line 7)");
        let e = docs[1].result.as_ref().unwrap_err();
        assert_eq!(e.errors[0].field, "spec.ports[0].port");
        assert!(docs[2].result.as_ref().unwrap_err().errors[0].reason.starts_with("not valid YAML"));
    }
}
