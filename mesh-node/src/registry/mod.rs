//! The registry of workloads on this node: registration, capture on/off, listeners,
//! persistence.
//!
//! Adding a meshed workload = a helper thread in its netns, listeners there, then the cgroup
//! goes into `MESHED_CGROUPS` — in that order, so capture never points at a listener that does
//! not exist yet. Replacing a workload builds the new one before tearing down the old one; a
//! failed add leaves whatever was registered before untouched.

use std::{
    collections::{BTreeMap, HashMap},
    io,
    net::IpAddr,
    os::{fd::OwnedFd, unix::fs::MetadataExt},
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use nix::sys::statfs::{CGROUP2_SUPER_MAGIC, statfs};
use nodemesh_api::{
    meshing::MeshDecision,
    workload::{SpecError, WorkloadKey, WorkloadSpec},
};
use tokio::{net::TcpListener, sync::Mutex, task::AbortHandle};

mod listeners;
mod state;

use listeners::Handed;
use state::StateFile;

use crate::{
    capture::{Capture, CaptureError, CaptureTarget, InboundCapture},
    delivery_routing as routing,
    handover::wire::{Described, Role},
    inbound::plaintext::PlaintextInbound,
    netns::{NetnsError, NetnsThread},
    proxy::Outbound,
    telemetry::metrics::Metrics,
    workload::{IpIndex, LocalWorkload, Source},
    xds::cache::Cache,
};

#[derive(Debug, thiserror::Error)]
pub enum WorkloadError {
    #[error("invalid workload: {}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    Invalid(Vec<SpecError>),
    #[error("workload {key}: cgroup {path}: {reason}")]
    Cgroup { key: WorkloadKey, path: PathBuf, reason: String },
    #[error("workload {key}: cgroup {path} is already registered for workload {other}")]
    CgroupTaken { key: WorkloadKey, path: PathBuf, other: WorkloadKey },
    #[error("workload {key}: {source}")]
    Netns { key: WorkloadKey, source: NetnsError },
    #[error("workload {key}: cannot listen inside its network namespace: {source}")]
    Listen { key: WorkloadKey, source: io::Error },
    #[error("workload {key}: {source}")]
    Capture { key: WorkloadKey, source: Box<CaptureError> },
    #[error(
        "workload {key}: cannot set up inbound delivery in its network namespace: {source} \
         (mesh-node needs CAP_NET_ADMIN there)"
    )]
    Routing { key: WorkloadKey, source: Box<routing::RoutingError> },
    #[error("no workload {0} on this node")]
    NotFound(WorkloadKey),
    #[error("this mesh-node is handing over to a new one; ask again in a moment")]
    HandingOver,
    #[error("saving workload state to {path}: {source}")]
    State { path: PathBuf, source: io::Error },
}

impl WorkloadError {
    /// Whether the caller sent something wrong (vs. the node failing).
    pub fn is_client_error(&self) -> bool {
        !matches!(
            self,
            WorkloadError::State { .. }
                | WorkloadError::Capture { .. }
                | WorkloadError::Routing { .. }
                | WorkloadError::HandingOver
        )
    }
}

/// What the node reports about one workload.
#[derive(Clone, Debug, serde::Serialize)]
pub struct WorkloadStatus {
    pub namespace: String,
    pub name: String,
    pub service_account: String,
    pub decision: MeshDecision,
    pub cgroup: PathBuf,
    pub cgroup_id: u64,
    pub netns: PathBuf,
    pub ips: Vec<IpAddr>,
    /// Present when the workload's traffic is captured.
    pub capture: Option<CaptureTarget>,
    /// How inbound connections reach it: `transparent` (delivered inside its netns as the
    /// client's own address), or why not.
    pub inbound: String,
}

struct Entry {
    spec: WorkloadSpec,
    status: WorkloadStatus,
    listener_tasks: Vec<AbortHandle>,
    local: Arc<LocalWorkload>,
    /// Its inbound capture (sk_lookup link, listener map entries), released with it.
    inbound: std::sync::Mutex<Option<InboundCapture>>,
    /// Its listeners (descriptors of our own), for a handover to a new mesh-node.
    sockets: Vec<(Role, OwnedFd)>,
}

impl Entry {
    fn stop(&self, capture: &Capture) -> Result<(), CaptureError> {
        for task in &self.listener_tasks {
            task.abort();
        }
        if let Some(inbound) = self.inbound.lock().expect("inbound lock").take() {
            capture.release_inbound(inbound);
        }
        if self.status.capture.is_some() { capture.unmesh(self.status.cgroup_id) } else { Ok(()) }
    }

    /// Its delivery routing comes out once the connections delivered into the pod have ended
    /// (unless `successor`, the registration replacing it, holds the same).
    fn retire_routes(&self, successor: Option<&Entry>) {
        let Some(routes) = self.local.delivery.as_ref().and_then(|pod| pod.routes.as_ref()) else { return };
        let kept = successor
            .and_then(|e| e.local.delivery.as_ref())
            .and_then(|pod| pod.routes.as_ref())
            .is_some_and(|next| Arc::ptr_eq(next, routes));
        if !kept {
            routes.retire();
        }
    }
}

pub struct Registry {
    workloads: Mutex<BTreeMap<WorkloadKey, Entry>>,
    capture: Arc<Capture>,
    outbound: Arc<Outbound>,
    index: Arc<IpIndex>,
    metrics: Arc<Metrics>,
    state: StateFile,
    cgroup_root: PathBuf,
    /// Serves what each meshed pod's inbound capture hands over.
    plaintext: Arc<PlaintextInbound>,
    /// mesh-node's own netns: a workload sharing it gets no delivery routing.
    own_netns_cookie: Option<u64>,
    /// Delivery routing in each pod netns, shared by its registrations and connections.
    routes: Arc<routing::RoutesByNetns>,
    /// Every registered spec, republished on each change (the xDS client reports them).
    specs: tokio::sync::watch::Sender<Vec<WorkloadSpec>>,
    /// Set while a new mesh-node takes over: it reads the capture maps and the state file,
    /// so nothing here changes them.
    frozen: AtomicBool,
    /// Listeners the previous mesh-node handed over, by `namespace/name`, until the workload
    /// registers again (or [`Registry::drop_handed`]).
    handed: std::sync::Mutex<HashMap<String, Vec<(Role, std::net::TcpListener)>>>,
    /// The control plane's view of each workload (`fail_closed`); `None`: no control plane,
    /// nothing is fail-closed.
    policy: Option<Arc<Cache>>,
}

impl Registry {
    pub fn new(
        capture: Arc<Capture>,
        outbound: Arc<Outbound>,
        index: Arc<IpIndex>,
        metrics: Arc<Metrics>,
        state_dir: &Path,
        cgroup_root: &Path,
        plaintext: Arc<PlaintextInbound>,
    ) -> Registry {
        let own_netns_cookie =
            std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| crate::sys::netns_cookie(&l)).ok();
        Registry {
            plaintext,
            own_netns_cookie,
            routes: Default::default(),
            workloads: Mutex::new(BTreeMap::new()),
            capture,
            outbound,
            index,
            metrics,
            state: StateFile::new(state_dir),
            cgroup_root: cgroup_root.canonicalize().unwrap_or_else(|_| cgroup_root.to_path_buf()),
            specs: tokio::sync::watch::Sender::new(Vec::new()),
            frozen: AtomicBool::new(false),
            handed: Default::default(),
            policy: None,
        }
    }

    /// Workloads take their fail-closed mark from the control plane's view in `cache`.
    pub fn with_fail_closed_policy(mut self, cache: Arc<Cache>) -> Registry {
        self.policy = Some(cache);
        self
    }

    /// Whether the control plane marks `key` fail-closed (its PeerAuthentication is STRICT,
    /// or MeshConfig says every meshed pod is).
    fn fail_closed(&self, key: &WorkloadKey) -> bool {
        self.policy.as_ref().and_then(|c| c.workload(&key.to_string())).is_some_and(|w| w.fail_closed)
    }

    /// Keeps each captured workload's fail-closed marks (`MESHED_FAIL_CLOSED`,
    /// INBOUND_FAIL_CLOSED) in step with the control plane's workloads. Runs forever.
    pub async fn follow_fail_closed(self: Arc<Self>) {
        let Some(cache) = self.policy.clone() else { return };
        loop {
            let changed = cache.workloads_changed.notified();
            self.apply_fail_closed().await;
            changed.await;
        }
    }

    async fn apply_fail_closed(&self) {
        let mut workloads = self.workloads.lock().await;
        // A successor owns the maps now (or is about to).
        if self.frozen.load(Ordering::Acquire) {
            return;
        }
        for (key, entry) in workloads.iter_mut() {
            let Some(mut target) = entry.status.capture else { continue };
            let wanted = self.fail_closed(key);
            if target.fail_closed == wanted {
                continue;
            }
            target.fail_closed = wanted;
            let inbound = entry.inbound.lock().expect("inbound lock").is_some();
            let applied = self.capture.mesh(entry.status.cgroup_id, target).and_then(|()| {
                if inbound { self.capture.set_inbound_fail_closed(&entry.status.ips, wanted) } else { Ok(()) }
            });
            match applied {
                Ok(()) => {
                    entry.status.capture = Some(target);
                    tracing::info!(workload = %key, fail_closed = wanted, "while no mesh-node runs, its traffic {}",
                        if wanted { "is refused both ways" } else { "goes directly" });
                }
                Err(e) => tracing::warn!(workload = %key, "cannot mark fail-closed: {e}"),
            }
        }
    }

    /// Listeners a previous mesh-node handed over: workloads registering from now on use
    /// them instead of binding new ones.
    pub fn inherit(&self, workloads: HashMap<String, Vec<(Role, std::net::TcpListener)>>) {
        *self.handed.lock().expect("handed lock") = workloads;
    }

    /// Closes handed-over listeners no workload took (pods gone meanwhile).
    pub fn drop_handed(&self) -> usize {
        let left = std::mem::take(&mut *self.handed.lock().expect("handed lock"));
        left.values().map(Vec::len).sum()
    }

    /// Offers `old`'s listeners to its re-registration (as a handover would): the same sockets
    /// go on, so connections queued on them are accepted, not reset, and the capture maps keep
    /// pointing at live sockets. [`listeners::bind_in`] takes them only if they live in the new
    /// registration's netns. Not when listeners a predecessor handed over wait for `key`.
    fn offer_listeners(&self, key: &WorkloadKey, old: &Entry) -> Option<Offered<'_>> {
        let mut handed = self.handed.lock().expect("handed lock");
        if old.sockets.is_empty() || handed.contains_key(&key.to_string()) {
            return None;
        }
        let offered = old
            .sockets
            .iter()
            .filter_map(|(role, fd)| fd.try_clone().ok().map(|fd| (*role, std::net::TcpListener::from(fd))))
            .collect();
        handed.insert(key.to_string(), offered);
        Some(Offered { handed: &self.handed, key: key.to_string() })
    }

    /// The handed-over listeners of `key` for one direction.
    fn take_handed(&self, key: &WorkloadKey, roles: [Role; 2]) -> Handed {
        let mut handed = self.handed.lock().expect("handed lock");
        let Some(listeners) = handed.get_mut(&key.to_string()) else { return Handed::default() };
        let mut take = |role| {
            let i = listeners.iter().position(|(r, _)| *r == role)?;
            Some(listeners.swap_remove(i).1)
        };
        Handed { v4: take(roles[0]), v6: take(roles[1]) }
    }

    /// Stops registration changes and returns every workload's listeners, for a handover.
    pub async fn freeze(&self) -> Vec<(Described, OwnedFd)> {
        let workloads = self.workloads.lock().await;
        self.frozen.store(true, Ordering::Release);
        self.routes.set_handing_over(true);
        let mut sockets = Vec::new();
        for (key, entry) in workloads.iter() {
            for (role, fd) in &entry.sockets {
                match fd.try_clone() {
                    Ok(fd) => sockets.push((Described { role: *role, workload: Some(key.to_string()) }, fd)),
                    Err(e) => tracing::warn!(workload = %key, ?role, "cannot hand over a listener: {e}"),
                }
            }
        }
        sockets
    }

    pub fn thaw(&self) {
        self.frozen.store(false, Ordering::Release);
        self.routes.set_handing_over(false);
    }

    /// Ends every accept loop (the successor accepts on the same sockets now); connections
    /// already accepted carry on.
    pub async fn stop_accepting(&self) {
        for entry in self.workloads.lock().await.values() {
            entry.listener_tasks.iter().for_each(AbortHandle::abort);
        }
    }

    /// What every captured workload holds, for [`Capture::sweep`]: its cgroup, its netns
    /// (inbound link) and its addresses (inbound holds).
    pub async fn captured(&self) -> (Vec<u64>, Vec<u64>, Vec<IpAddr>) {
        let workloads = self.workloads.lock().await;
        let captured = || workloads.values().filter(|e| e.status.capture.is_some());
        let cgroups = captured().map(|e| e.status.cgroup_id).collect();
        let netns = captured().filter_map(|e| e.status.capture.map(|c| c.netns_cookie)).collect();
        let ips = captured().flat_map(|e| e.status.ips.iter().copied()).collect();
        (cgroups, netns, ips)
    }

    fn check_not_frozen(&self) -> Result<(), WorkloadError> {
        if self.frozen.load(Ordering::Acquire) { Err(WorkloadError::HandingOver) } else { Ok(()) }
    }

    /// The registered specs now and after every change.
    pub fn watch_specs(&self) -> tokio::sync::watch::Receiver<Vec<WorkloadSpec>> {
        self.specs.subscribe()
    }

    /// Re-registers the workloads saved by a previous run. Ones that no longer exist (their
    /// netns or cgroup is gone) are logged and dropped.
    pub async fn restore(&self) -> io::Result<usize> {
        let specs = self.state.load()?;
        let mut workloads = self.workloads.lock().await;
        let mut restored = 0;
        for spec in specs {
            let key = spec.key();
            match self.insert(&mut workloads, spec).await {
                Ok(_) => restored += 1,
                Err(e) => tracing::warn!(workload = %key, "not restored: {e}"),
            }
        }
        // One write for the whole restore; it also drops workloads that could not come back.
        self.persist(&workloads)?;
        Ok(restored)
    }

    pub async fn add(&self, spec: WorkloadSpec) -> Result<WorkloadStatus, WorkloadError> {
        let mut workloads = self.workloads.lock().await;
        self.check_not_frozen()?;
        let status = self.insert(&mut workloads, spec).await?;
        self.persist(&workloads)
            .map_err(|source| WorkloadError::State { path: self.state.path().to_path_buf(), source })?;
        Ok(status)
    }

    /// Registers (or replaces) one workload in `workloads`; the caller persists.
    async fn insert(
        &self,
        workloads: &mut BTreeMap<WorkloadKey, Entry>,
        spec: WorkloadSpec,
    ) -> Result<WorkloadStatus, WorkloadError> {
        spec.validate().map_err(WorkloadError::Invalid)?;
        let key = spec.key();
        let (cgroup, cgroup_id) = self.check_cgroup(&key, &spec.cgroup)?;
        if let Some((other, _)) =
            workloads.iter().find(|(k, e)| **k != key && e.status.cgroup_id == cgroup_id)
        {
            return Err(WorkloadError::CgroupTaken { key, path: cgroup, other: other.clone() });
        }
        let decision = spec.mesh_decision();
        let mut status = WorkloadStatus {
            namespace: spec.namespace.clone(),
            name: spec.name.clone(),
            service_account: spec.service_account.clone(),
            decision,
            cgroup,
            cgroup_id,
            netns: spec.netns.clone(),
            ips: spec.ips.clone(),
            capture: None,
            inbound: String::new(),
        };
        let mut listener_tasks = Vec::new();
        let mut sockets = Vec::new();
        let mut delivery = None;
        let mut inbound = None;
        status.inbound = decision_text(decision);
        let _offered = workloads.get(&key).and_then(|old| self.offer_listeners(&key, old));
        if decision.is_meshed() {
            let (mut target, mut tasks, source, outbound_sockets) = self.start_capture(&key, &spec).await?;
            target.fail_closed = self.fail_closed(&key);
            sockets = outbound_sockets;
            if source.routes.is_none() {
                status.inbound = "direct: shares mesh-node's network namespace".into();
            } else {
                delivery = Some(Arc::clone(&source));
                status.inbound = "transparent".into();
                // The new capture replaces the old one's map entries and program in place; the
                // old registration releases only what is left over (below).
                match self.start_inbound(&key, &spec, &source).await {
                    Ok((capture, accept_tasks, inbound_sockets)) => {
                        if let Err(source) =
                            self.capture.set_inbound_fail_closed(&spec.ips, target.fail_closed)
                        {
                            tasks.iter().for_each(AbortHandle::abort);
                            let old = workloads.get(&key).map(|e| e.inbound.lock().expect("inbound lock"));
                            self.capture
                                .release_inbound_except(capture, old.as_ref().and_then(|o| o.as_ref()));
                            return Err(WorkloadError::Capture { key, source: Box::new(source) });
                        }
                        inbound = Some(capture);
                        tasks.extend(accept_tasks);
                        sockets.extend(inbound_sockets);
                    }
                    Err(e) => {
                        tasks.iter().for_each(AbortHandle::abort);
                        return Err(e);
                    }
                }
            }
            if let Err(source) = self.capture.mesh(cgroup_id, target) {
                tasks.iter().for_each(AbortHandle::abort);
                return Err(WorkloadError::Capture { key, source: Box::new(source) });
            }
            status.capture = Some(target);
            listener_tasks = tasks;
        }
        let local = Arc::new(LocalWorkload {
            key: key.clone(),
            service_account: spec.service_account.clone(),
            delivery,
        });
        let entry = Entry {
            spec,
            status: status.clone(),
            listener_tasks,
            local: Arc::clone(&local),
            inbound: std::sync::Mutex::new(inbound),
            sockets,
        };
        if let Some(old) = workloads.insert(key.clone(), entry) {
            self.forget_ips(&old.status.ips);
            // Its accept loops end; connections they accepted run on tasks of their own and
            // carry on.
            old.listener_tasks.iter().for_each(AbortHandle::abort);
            // Connections delivered before keep their routing until they end.
            old.retire_routes(workloads.get(&key));
            // Still meshed in the same cgroup: the new MESHED_CGROUPS value already replaced
            // the old one. Otherwise the old entry goes, and with it capture of new connects.
            let replaced = status.capture.is_some() && old.status.cgroup_id == cgroup_id;
            if old.status.capture.is_some() && !replaced {
                let _ = self.capture.unmesh(old.status.cgroup_id);
            }
            if let Some(old_inbound) = old.inbound.lock().expect("inbound lock").take() {
                let new = workloads.get(&key).expect("just inserted");
                let kept = new.inbound.lock().expect("inbound lock");
                self.capture.release_inbound_except(old_inbound, kept.as_ref());
            }
        }
        {
            self.index.insert(&status.ips, &local);
        }
        self.update_gauge(workloads);
        tracing::info!(workload = %key, ?decision, capture = ?status.capture, "workload registered");
        Ok(status)
    }

    pub async fn remove(&self, key: &WorkloadKey) -> Result<(), WorkloadError> {
        let mut workloads = self.workloads.lock().await;
        self.check_not_frozen()?;
        let entry = workloads.remove(key).ok_or_else(|| WorkloadError::NotFound(key.clone()))?;
        let stopped = entry.stop(&self.capture);
        // The pod may still run (terminating, or registered again in a moment): connections
        // delivered into it keep their routing until they end.
        entry.retire_routes(None);
        self.forget_ips(&entry.status.ips);
        self.update_gauge(&workloads);
        self.persist(&workloads)
            .map_err(|source| WorkloadError::State { path: self.state.path().to_path_buf(), source })?;
        stopped.map_err(|source| WorkloadError::Capture { key: key.clone(), source: Box::new(source) })?;
        tracing::info!(workload = %key, "workload removed; its established connections continue");
        Ok(())
    }

    pub async fn list(&self) -> Vec<WorkloadStatus> {
        self.workloads.lock().await.values().map(|e| e.status.clone()).collect()
    }

    /// Netns helper, listeners, delivery routing, accept tasks: everything but the capture map
    /// entry.
    async fn start_capture(
        &self,
        key: &WorkloadKey,
        spec: &WorkloadSpec,
    ) -> Result<(CaptureTarget, Vec<AbortHandle>, Arc<Source>, Vec<(Role, OwnedFd)>), WorkloadError> {
        let netns = NetnsThread::spawn(&spec.netns)
            .map_err(|source| WorkloadError::Netns { key: key.clone(), source })?;
        let handed = self.take_handed(key, [Role::Outbound4, Role::Outbound6]);
        let bound = listeners::bind_in(&netns, handed)
            .await
            .map_err(|source| WorkloadError::Netns { key: key.clone(), source })?
            .map_err(|source| WorkloadError::Listen { key: key.clone(), source })?;
        let listen_err = |source| WorkloadError::Listen { key: key.clone(), source };
        let sockets = bound.own_fds([Role::Outbound4, Role::Outbound6]).map_err(listen_err)?;
        let v4 = TcpListener::from_std(bound.v4).map_err(listen_err)?;
        let v6 = bound.v6.map(TcpListener::from_std).transpose().map_err(listen_err)?;
        let target = CaptureTarget {
            fail_closed: false,
            netns_cookie: bound.netns_cookie,
            proxy_port4: v4.local_addr().map_err(listen_err)?.port(),
            proxy_port6: match &v6 {
                Some(l) => l.local_addr().map_err(listen_err)?.port(),
                None => 0,
            },
        };
        // A pod sharing mesh-node's own netns is reached directly: no delivery routing.
        let routes = if Some(bound.netns_cookie) == self.own_netns_cookie {
            None
        } else {
            let routes = self.routes.hold(&netns, bound.netns_cookie, self.plaintext.delivery.mark).await;
            Some(routes.map_err(|e| WorkloadError::Routing { key: key.clone(), source: Box::new(e) })?)
        };
        let source = Arc::new(Source {
            key: key.clone(),
            netns,
            netns_cookie: bound.netns_cookie,
            ips: spec.ips.clone(),
            service_account: spec.service_account.clone(),
            http_pool: Default::default(),
            routes,
        });
        let tasks = std::iter::once(v4)
            .chain(v6)
            .map(|listener| {
                let serve = Arc::clone(&self.outbound).serve(listener, Arc::clone(&source));
                tokio::spawn(serve).abort_handle()
            })
            .collect();
        Ok((target, tasks, source, sockets))
    }

    /// Inbound listeners in the pod's netns, its sk_lookup capture, and their accept tasks.
    async fn start_inbound(
        &self,
        key: &WorkloadKey,
        spec: &WorkloadSpec,
        source: &Arc<Source>,
    ) -> Result<(InboundCapture, Vec<AbortHandle>, Vec<(Role, OwnedFd)>), WorkloadError> {
        let listen_err = |source| WorkloadError::Listen { key: key.clone(), source };
        let handed = self.take_handed(key, [Role::Inbound4, Role::Inbound6]);
        let bound = listeners::bind_inbound(&source.netns, handed)
            .await
            .map_err(|source| WorkloadError::Netns { key: key.clone(), source })?
            .map_err(listen_err)?;
        let sockets = bound.own_fds([Role::Inbound4, Role::Inbound6]).map_err(listen_err)?;
        let netns = std::fs::File::open(&spec.netns).map_err(listen_err)?;
        let capture = self
            .capture
            .capture_inbound(&netns, source.netns_cookie, &spec.ips, &bound.v4, bound.v6.as_ref())
            .map_err(|source| WorkloadError::Capture { key: key.clone(), source: Box::new(source) })?;
        let v4 = TcpListener::from_std(bound.v4).map_err(listen_err)?;
        let v6 = bound.v6.map(TcpListener::from_std).transpose().map_err(listen_err)?;
        let tasks = std::iter::once(v4)
            .chain(v6)
            .map(|l| tokio::spawn(Arc::clone(&self.plaintext).serve(l, Arc::clone(source))).abort_handle())
            .collect();
        Ok((capture, tasks, sockets))
    }

    fn check_cgroup(&self, key: &WorkloadKey, path: &Path) -> Result<(PathBuf, u64), WorkloadError> {
        let bad =
            |reason: String| WorkloadError::Cgroup { key: key.clone(), path: path.to_path_buf(), reason };
        let canonical = path.canonicalize().map_err(|e| bad(e.to_string()))?;
        match statfs(&canonical) {
            Ok(fs) if fs.filesystem_type() == CGROUP2_SUPER_MAGIC => {}
            Ok(_) => return Err(bad("not on a cgroup v2 filesystem".into())),
            Err(e) => return Err(bad(e.to_string())),
        }
        if !canonical.starts_with(&self.cgroup_root) {
            return Err(bad(format!(
                "outside mesh-node's cgroup root {}; its connects would never be captured",
                self.cgroup_root.display()
            )));
        }
        // On cgroup v2 the directory's inode number is the id bpf_get_current_cgroup_id returns.
        let id = std::fs::metadata(&canonical).map_err(|e| bad(e.to_string()))?.ino();
        Ok((canonical, id))
    }

    fn forget_ips(&self, ips: &[IpAddr]) {
        self.index.remove(ips);
    }

    fn update_gauge(&self, workloads: &BTreeMap<WorkloadKey, Entry>) {
        let meshed = workloads.values().filter(|e| e.status.capture.is_some()).count();
        self.metrics.meshed_workloads.set(meshed as i64);
    }

    fn persist(&self, workloads: &BTreeMap<WorkloadKey, Entry>) -> io::Result<()> {
        let specs: Vec<WorkloadSpec> = workloads.values().map(|e| e.spec.clone()).collect();
        self.specs.send_replace(specs.clone());
        self.state.save(&specs)
    }
}

/// Listeners offered to a re-registration; what it did not take is closed with the old
/// registration when this goes.
struct Offered<'a> {
    handed: &'a std::sync::Mutex<HashMap<String, Vec<(Role, std::net::TcpListener)>>>,
    key: String,
}

impl Drop for Offered<'_> {
    fn drop(&mut self) {
        self.handed.lock().expect("handed lock").remove(&self.key);
    }
}

/// What `inbound` says of a workload that is not meshed.
fn decision_text(decision: MeshDecision) -> String {
    match decision {
        MeshDecision::Meshed => "transparent".into(),
        MeshDecision::NamespaceNotEnabled => "direct: namespace not in the mesh".into(),
        MeshDecision::PodOptedOut => "direct: opted out of the mesh".into(),
    }
}
