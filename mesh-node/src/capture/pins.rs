//! Capture pinned on bpffs, so it outlives the mesh-node process that set it up.
//!
//! ```text
//! <bpf-pin-dir>/v<PIN_LAYOUT>/maps/<MAP>            the shared maps (MESHED_CGROUPS, …)
//! <bpf-pin-dir>/v<PIN_LAYOUT>/links/<program>       the cgroup-root hooks (connect4, …)
//! <bpf-pin-dir>/v<PIN_LAYOUT>/links/netns/<cookie>  each meshed pod's inbound sk_lookup
//! ```
//!
//! A link pinned here stays attached when the process exits or is killed; the next mesh-node
//! swaps its own program into the same link (`BPF_LINK_UPDATE`: atomic, no moment with no
//! program and none with two) and reuses the maps, so capture never stops across a restart or
//! an upgrade; while no process runs, the programs decide alone (fail-closed workloads are
//! refused, the others connect directly). Only `mesh-node uninstall` removes the pins.

use std::{
    fs, io,
    os::fd::{AsFd, BorrowedFd},
    path::{Path, PathBuf},
};

use aya::{
    maps::{MapInfo, MapType},
    programs::links::FdLink,
};
use mesh_ebpf_common::{
    ClientTupleKey, DELIVERIES_MAX, DeliveryKey, INBOUND_FAIL_CLOSED_MAX, INBOUND_LISTENERS_MAX,
    MESHED_CGROUPS_MAX, MeshedCgroup, NODE_ADDRESSES_MAX, ORIG_DST_BY_COOKIE_MAX, ORIG_DST_BY_TUPLE_MAX,
    OrigDst, PIN_LAYOUT, PodAddrKey,
};
use nix::sys::statfs::{BPF_FS_MAGIC, statfs};

use super::CaptureError;
use crate::sys;

/// A pinned map and the layout it must have to be adopted.
struct SharedMap {
    name: &'static str,
    map_type: MapType,
    key_size: usize,
    value_size: usize,
    max_entries: u32,
}

/// The maps declared `pinned` in mesh-ebpf, with the layout `PIN_LAYOUT` promises.
const SHARED_MAPS: [SharedMap; 7] = [
    SharedMap {
        name: "MESHED_CGROUPS",
        map_type: MapType::Hash,
        key_size: size_of::<u64>(),
        value_size: size_of::<MeshedCgroup>(),
        max_entries: MESHED_CGROUPS_MAX,
    },
    SharedMap {
        name: "ORIG_DST_BY_COOKIE",
        map_type: MapType::LruHash,
        key_size: size_of::<u64>(),
        value_size: size_of::<OrigDst>(),
        max_entries: ORIG_DST_BY_COOKIE_MAX,
    },
    SharedMap {
        name: "ORIG_DST_BY_TUPLE",
        map_type: MapType::LruHash,
        key_size: size_of::<ClientTupleKey>(),
        value_size: size_of::<OrigDst>(),
        max_entries: ORIG_DST_BY_TUPLE_MAX,
    },
    SharedMap {
        name: "INBOUND_LISTENERS",
        map_type: MapType::SockHash,
        key_size: size_of::<PodAddrKey>(),
        value_size: size_of::<u32>(),
        max_entries: INBOUND_LISTENERS_MAX,
    },
    SharedMap {
        name: "DELIVERIES",
        map_type: MapType::LruHash,
        key_size: size_of::<DeliveryKey>(),
        value_size: size_of::<u8>(),
        max_entries: DELIVERIES_MAX,
    },
    SharedMap {
        name: "INBOUND_FAIL_CLOSED",
        map_type: MapType::Hash,
        key_size: size_of::<PodAddrKey>(),
        value_size: size_of::<u8>(),
        max_entries: INBOUND_FAIL_CLOSED_MAX,
    },
    SharedMap {
        name: "NODE_ADDRESSES",
        map_type: MapType::Hash,
        key_size: size_of::<PodAddrKey>(),
        value_size: size_of::<u8>(),
        max_entries: NODE_ADDRESSES_MAX,
    },
];

/// This node's pinned capture: `<bpf-pin-dir>/v<PIN_LAYOUT>`.
#[derive(Debug)]
pub(super) struct PinDir {
    layout: PathBuf,
}

/// How a hook's link came to run this process's program.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Linked {
    /// A link a previous (or still running) mesh-node pinned now runs our program.
    Adopted,
    /// No link was pinned: a new one is attached and pinned.
    Attached,
}

impl PinDir {
    /// Makes the directories under `root` (which must be on bpffs). Refuses pinned state of
    /// another layout: this mesh-node cannot read those maps, and attaching beside their links
    /// would run two captures on every connect.
    pub(super) fn open(root: &Path) -> Result<PinDir, CaptureError> {
        let layout = root.join(format!("v{PIN_LAYOUT}"));
        let fail = |reason: String| CaptureError::Pin { path: root.display().to_string(), reason };
        fs::create_dir_all(root).map_err(|e| {
            fail(format!("{e} (is bpffs mounted at /sys/fs/bpf? mount -t bpf bpf /sys/fs/bpf)"))
        })?;
        match statfs(root) {
            Ok(fs) if fs.filesystem_type() == BPF_FS_MAGIC => {}
            Ok(_) => return Err(fail("not on a bpf filesystem (mount -t bpf bpf /sys/fs/bpf)".into())),
            Err(e) => return Err(fail(e.to_string())),
        }
        let others: Vec<String> = fs::read_dir(root)
            .map_err(|e| fail(e.to_string()))?
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|name| name.starts_with('v') && *name != format!("v{PIN_LAYOUT}"))
            .collect();
        if !others.is_empty() {
            return Err(fail(format!(
                "holds pinned capture state of map layout {} while this mesh-node uses v{PIN_LAYOUT}; \
                 it cannot adopt it without a gap in capture. Drain the node, stop the old mesh-node, \
                 remove {} and start this one",
                others.join(", "),
                others.iter().map(|o| root.join(o).display().to_string()).collect::<Vec<_>>().join(" ")
            )));
        }
        let dir = PinDir { layout };
        for sub in [dir.maps_dir(), dir.netns_dir()] {
            fs::create_dir_all(&sub)
                .map_err(|e| CaptureError::Pin { path: sub.display().to_string(), reason: e.to_string() })?;
        }
        Ok(dir)
    }

    pub(super) fn maps_dir(&self) -> PathBuf {
        self.layout.join("maps")
    }

    fn links_dir(&self) -> PathBuf {
        self.layout.join("links")
    }

    fn netns_dir(&self) -> PathBuf {
        self.links_dir().join("netns")
    }

    pub(super) fn hook_link(&self, program: &str) -> PathBuf {
        self.links_dir().join(program)
    }

    /// The inbound sk_lookup link of the pod netns with this cookie.
    pub(super) fn netns_link(&self, netns_cookie: u64) -> PathBuf {
        self.netns_dir().join(netns_cookie.to_string())
    }

    /// The netns cookies that have an inbound link pinned.
    pub(super) fn netns_links(&self) -> Vec<u64> {
        let Ok(entries) = fs::read_dir(self.netns_dir()) else { return Vec::new() };
        entries.flatten().filter_map(|e| e.file_name().to_str()?.parse().ok()).collect()
    }

    /// Checks every map already pinned against the layout this binary uses, before loading
    /// adopts them: a mismatch would have the programs read entries of another shape.
    pub(super) fn check_maps(&self) -> Result<(), CaptureError> {
        for map in &SHARED_MAPS {
            let path = self.maps_dir().join(map.name);
            if !path.exists() {
                continue;
            }
            let mismatch = |reason: String| CaptureError::Pin { path: path.display().to_string(), reason };
            let info = MapInfo::from_pin(&path).map_err(|e| mismatch(e.to_string()))?;
            let found = (
                info.map_type().map_err(|e| mismatch(e.to_string()))?,
                info.key_size() as usize,
                info.value_size() as usize,
                info.max_entries(),
            );
            let ours = (map.map_type, map.key_size, map.value_size, map.max_entries);
            if found != ours {
                return Err(mismatch(format!(
                    "pinned map has (type, key size, value size, max entries) {found:?}, this \
                     mesh-node's map layout v{PIN_LAYOUT} needs {ours:?}: the layout changed without \
                     PIN_LAYOUT being raised"
                )));
            }
        }
        Ok(())
    }

    /// Unpins everything under `root`, every layout: the links detach (capture stops; pods
    /// connect directly) and the maps go once no process holds them. Whether there was any.
    pub(super) fn remove_existing(root: &Path) -> Result<bool, CaptureError> {
        match fs::remove_dir_all(root) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(CaptureError::Pin { path: root.display().to_string(), reason: e.to_string() }),
        }
    }
}

/// Runs `program` on the hook whose link is pinned at `pin`: swapped into that link if one is
/// pinned, else through a new link from `attach`, pinned there.
pub(super) fn link_program(
    pin: &Path,
    program: BorrowedFd<'_>,
    attach: impl FnOnce() -> Result<FdLink, String>,
) -> Result<Linked, CaptureError> {
    let fail = |reason: String| CaptureError::Pin { path: pin.display().to_string(), reason };
    match sys::bpf_obj_get(pin) {
        Ok(link) => match sys::bpf_link_update(link.as_fd(), program) {
            Ok(()) => return Ok(Linked::Adopted),
            // The link's target is gone (a netns that was deleted): replace the link.
            Err(e) if e.raw_os_error() == Some(libc::ENOLINK) => {
                fs::remove_file(pin).map_err(|e| fail(e.to_string()))?;
            }
            Err(e) => return Err(fail(format!("BPF_LINK_UPDATE: {e}"))),
        },
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(fail(format!("BPF_OBJ_GET: {e}"))),
    }
    let link = attach().map_err(fail)?;
    link.pin(pin).map_err(|e| fail(format!("pinning: {e}")))?;
    Ok(Linked::Attached)
}

/// Unpins one link: its program stops running on that hook.
pub(super) fn unlink(pin: &Path) {
    match fs::remove_file(pin) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => tracing::warn!(pin = %pin.display(), "cannot unpin: {e}"),
    }
}
