//! mesh-node: the Nodemesh per-node proxy.
//!
//! Data path (see ARCHITECTURE.md): eBPF programs on the cgroup root redirect each meshed
//! workload's TCP connects to a listener mesh-node keeps inside that workload's own network
//! namespace; mesh-node recovers the original destination from the capture maps and proxies
//! to it from the same namespace.
#![deny(unsafe_code)]

pub mod admin;
pub mod api;
pub mod authz;
pub mod capture;
pub mod config;
pub mod conn;
pub mod control_plane;
pub mod delivery_routing;
#[cfg(feature = "kubernetes")]
pub mod discovery;
pub mod drain;
pub mod handover;
pub mod identity;
pub mod inbound;
pub mod lifecycle;
/// HTTP plumbing shared with mesh-control's admin endpoint.
pub use nodemesh_api::http;
pub mod netns;
pub mod policy;
pub mod precheck;
pub mod proxy;
pub mod registry;
pub mod run;
pub mod sys;
pub mod telemetry;
pub mod tunnel;
pub mod workload;
pub mod xds;

/// The cgroup v2 mount point, from /proc/self/mounts (hybrid hosts mount it at
/// /sys/fs/cgroup/unified, pure v2 hosts at /sys/fs/cgroup).
pub fn cgroup2_mount() -> Result<std::path::PathBuf, String> {
    let mounts = std::fs::read_to_string("/proc/self/mounts")
        .map_err(|e| format!("cannot read /proc/self/mounts: {e}"))?;
    mounts
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let (_, dir, fstype) = (fields.next()?, fields.next()?, fields.next()?);
            (fstype == "cgroup2").then(|| dir.into())
        })
        .next()
        .ok_or_else(|| "no cgroup v2 filesystem is mounted (kernel needs CONFIG_CGROUPS with cgroup2)".into())
}
