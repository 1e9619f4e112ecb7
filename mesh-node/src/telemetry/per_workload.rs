//! Settings held per workload of this node and switched at runtime as the workloads' records
//! change (access logs, tracing), with the one check a request pays when no workload has any.

use std::{
    collections::HashMap,
    sync::{
        Arc, RwLock,
        atomic::{AtomicBool, Ordering},
    },
};

use nodemesh_api::workload::WorkloadKey;

pub struct PerWorkload<T> {
    /// Whether any workload has settings: checked before the map is.
    any: AtomicBool,
    by_workload: RwLock<HashMap<String, Arc<T>>>,
}

impl<T> Default for PerWorkload<T> {
    fn default() -> PerWorkload<T> {
        PerWorkload { any: AtomicBool::new(false), by_workload: RwLock::default() }
    }
}

impl<T> PerWorkload<T> {
    /// Workload `uid`'s (`namespace/name`) settings, if it has any.
    pub fn get(&self, uid: &str) -> Option<Arc<T>> {
        if !self.any.load(Ordering::Relaxed) {
            return None;
        }
        self.by_workload.read().expect("per-workload lock").get(uid).cloned()
    }

    /// [`PerWorkload::get`] by key: nothing is formatted unless some workload has settings.
    pub fn get_key(&self, key: &WorkloadKey) -> Option<Arc<T>> {
        if !self.any.load(Ordering::Relaxed) {
            return None;
        }
        self.get(&key.to_string())
    }

    /// Sets (`Some`) or clears (`None`) the settings of each workload in `compiled`, and
    /// clears those of `removed` workloads.
    pub fn apply(&self, compiled: Vec<(String, Option<T>)>, removed: &[String]) {
        let mut by_workload = self.by_workload.write().expect("per-workload lock");
        for uid in removed {
            by_workload.remove(uid);
        }
        for (uid, settings) in compiled {
            match settings {
                Some(s) => by_workload.insert(uid, Arc::new(s)),
                None => by_workload.remove(&uid),
            };
        }
        self.any.store(!by_workload.is_empty(), Ordering::Relaxed);
    }

    /// How many workloads have settings.
    pub fn len(&self) -> usize {
        self.by_workload.read().expect("per-workload lock").len()
    }

    /// Whether no workload has settings.
    pub fn is_empty(&self) -> bool {
        !self.any.load(Ordering::Relaxed)
    }
}
