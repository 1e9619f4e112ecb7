//! Loads the embedded eBPF object, configures it and attaches it to the cgroup root.

use std::{fs::File, net::IpAddr, os::fd::AsFd, path::Path, sync::Mutex};

use aya::{
    EbpfLoader,
    maps::SockHash,
    maps::{HashMap, LpmTrie, MapData, MapError, lpm_trie::Key},
    programs::{CgroupAttachMode, CgroupSockAddr, ProgramError, ProgramFd, SkLookup, SockOps, links::FdLink},
};
use mesh_ebpf_common::{Cidr4, Cidr6};
use tokio::io::{Interest, unix::AsyncFd};

/// aya-log's logger, writing through the `log` facade (bridged into our tracing output).
pub type EbpfLogger = aya_log::EbpfLogger<&'static dyn log::Log>;

use super::{
    Capture,
    pins::{self, Linked, PinDir},
};
use crate::config::Config;

/// The object built from `mesh-ebpf/` by build.rs.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/mesh-ebpf"));

/// Program names in the object, with the hook each serves (for error messages).
const SOCK_ADDR_PROGRAMS: [(&str, &str); 4] = [
    ("sock4_connect", "cgroup/connect4"),
    ("sock6_connect", "cgroup/connect6"),
    ("sock4_getpeername", "cgroup/getpeername4"),
    ("sock6_getpeername", "cgroup/getpeername6"),
];
const SOCK_OPS_PROGRAM: &str = "sock_ops_established";
/// Loaded at start, attached to each meshed pod's netns as it registers.
pub(super) const SK_LOOKUP_PROGRAM: &str = "inbound_lookup";

/// Whether a program the kernel lists by `name` (it keeps the first 15 bytes) is one of the
/// cgroup programs this object attaches.
pub fn is_capture_program(name: &str) -> bool {
    !name.is_empty()
        && SOCK_ADDR_PROGRAMS.iter().map(|(p, _)| *p).chain([SOCK_OPS_PROGRAM]).any(|p| p.starts_with(name))
}

#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error(
        "loading the eBPF object failed: {0} (needs a kernel with BPF_SYSCALL and BTF, and \
         CAP_BPF/CAP_SYS_ADMIN; is mesh-node running as root?)"
    )]
    Load(#[from] aya::EbpfError),
    #[error("eBPF program {name} ({hook}): {source} (needs CONFIG_CGROUP_BPF; kernel 5.15+)")]
    Program { name: &'static str, hook: &'static str, source: ProgramError },
    #[error("cannot open cgroup root {path}: {source}")]
    CgroupRoot { path: String, source: std::io::Error },
    #[error("eBPF map {map}: {source}")]
    Map { map: &'static str, source: MapError },
    #[error("eBPF object has no map or program named {0}; the embedded object is out of date")]
    Missing(&'static str),
    #[error("pinned capture state {path}: {reason}")]
    Pin { path: String, reason: String },
}

/// Loads, configures and attaches the capture programs to `config.cgroup_root`.
///
/// The maps and links are pinned under `config.bpf_pin_dir` ([`pins`](super::pins)): capture
/// outlives this process, and a mesh-node that finds them pinned (after a restart, or taking
/// over from a running one) swaps its programs into the same links and keeps the maps. The
/// kernel always attaches cgroup links in multi mode (and rejects attach flags on
/// `BPF_LINK_CREATE`), so other cgroup-BPF users (a CNI, systemd) keep working beside us.
pub fn load_and_attach(
    config: &Config,
    log_level: aya_log::Level,
) -> Result<(Capture, Option<EbpfLogger>), CaptureError> {
    let pins = PinDir::open(&config.bpf_pin_dir)?;
    pins.check_maps()?;
    let level = log_level as u8;
    let mut ebpf = EbpfLoader::new()
        .default_map_pin_directory(pins.maps_dir())
        .override_global("PROXY_MARK", &config.proxy_mark, true)
        .override_global(aya_log::LEVEL, &level, false)
        .load(EBPF_OBJECT)?;
    // aya-log is best effort: capture works without it.
    let logger = match aya_log::EbpfLogger::init(&mut ebpf) {
        Ok(logger) => Some(logger),
        Err(e) => {
            tracing::warn!("eBPF log forwarding unavailable: {e}");
            None
        }
    };

    let root = open_cgroup(&config.cgroup_root)?;
    let mut adopted = 0;
    for (name, hook) in SOCK_ADDR_PROGRAMS {
        let program: &mut CgroupSockAddr = ebpf
            .program_mut(name)
            .ok_or(CaptureError::Missing(name))?
            .try_into()
            .map_err(|source| CaptureError::Program { name, hook, source })?;
        program.load().map_err(|source| CaptureError::Program { name, hook, source })?;
        let fd = owned_fd(program.fd(), name, hook)?;
        let linked = pins::link_program(&pins.hook_link(name), fd.as_fd(), || {
            let id =
                program.attach(&root, CgroupAttachMode::default()).map_err(|e| format!("{hook}: {e}"))?;
            let link = program.take_link(id).map_err(|e| e.to_string())?;
            FdLink::try_from(link).map_err(|e| e.to_string())
        })?;
        adopted += usize::from(linked == Linked::Adopted);
    }
    let (name, hook) = (SOCK_OPS_PROGRAM, "sockops");
    let sock_ops: &mut SockOps = ebpf
        .program_mut(name)
        .ok_or(CaptureError::Missing(name))?
        .try_into()
        .map_err(|source| CaptureError::Program { name, hook, source })?;
    sock_ops.load().map_err(|source| CaptureError::Program { name, hook, source })?;
    let fd = owned_fd(sock_ops.fd(), name, hook)?;
    let linked = pins::link_program(&pins.hook_link(name), fd.as_fd(), || {
        let id = sock_ops.attach(&root, CgroupAttachMode::default()).map_err(|e| format!("{hook}: {e}"))?;
        let link = sock_ops.take_link(id).map_err(|e| e.to_string())?;
        FdLink::try_from(link).map_err(|e| e.to_string())
    })?;
    adopted += usize::from(linked == Linked::Adopted);

    let (name, hook) = (SK_LOOKUP_PROGRAM, "sk_lookup");
    let sk_lookup: &mut SkLookup = ebpf
        .program_mut(name)
        .ok_or(CaptureError::Missing(name))?
        .try_into()
        .map_err(|source| CaptureError::Program { name, hook, source })?;
    sk_lookup.load().map_err(|source| CaptureError::Program { name, hook, source })?;

    fill_exclusions(&mut ebpf, config)?;
    let inbound = SockHash::try_from(take_map(&mut ebpf, "INBOUND_LISTENERS")?)
        .map_err(|source| CaptureError::Map { map: "INBOUND_LISTENERS", source })?;
    let deliveries = HashMap::try_from(take_map(&mut ebpf, "DELIVERIES")?)
        .map_err(|source| CaptureError::Map { map: "DELIVERIES", source })?;
    let node_addresses = HashMap::try_from(take_map(&mut ebpf, "NODE_ADDRESSES")?)
        .map_err(|source| CaptureError::Map { map: "NODE_ADDRESSES", source })?;
    let meshed = HashMap::try_from(take_map(&mut ebpf, "MESHED_CGROUPS")?)
        .map_err(|source| CaptureError::Map { map: "MESHED_CGROUPS", source })?;
    let by_tuple = HashMap::try_from(take_map(&mut ebpf, "ORIG_DST_BY_TUPLE")?)
        .map_err(|source| CaptureError::Map { map: "ORIG_DST_BY_TUPLE", source })?;
    let inbound_fail_closed = HashMap::try_from(take_map(&mut ebpf, "INBOUND_FAIL_CLOSED")?)
        .map_err(|source| CaptureError::Map { map: "INBOUND_FAIL_CLOSED", source })?;
    tracing::info!(
        cgroup_root = %config.cgroup_root.display(),
        pinned = %config.bpf_pin_dir.display(),
        "capture attached: connect4/6, getpeername4/6, sockops ({})",
        if adopted > 0 { "adopted the pinned links: capture never stopped" } else { "new links" }
    );
    let capture = Capture {
        ebpf: Mutex::new(ebpf),
        pins,
        meshed: Mutex::new(meshed),
        by_tuple: Mutex::new(by_tuple),
        inbound: Mutex::new(inbound),
        deliveries: Mutex::new(deliveries),
        node_addresses: Mutex::new(node_addresses),
        inbound_fail_closed: Mutex::new(inbound_fail_closed),
    };
    Ok((capture, logger))
}

/// A program's fd of our own, so the program can be borrowed again to attach it.
pub(super) fn owned_fd(
    fd: Result<&ProgramFd, ProgramError>,
    name: &'static str,
    hook: &'static str,
) -> Result<ProgramFd, CaptureError> {
    let fd = fd.map_err(|source| CaptureError::Program { name, hook, source })?;
    fd.try_clone().map_err(|e| CaptureError::Pin {
        path: name.to_string(),
        reason: format!("dup of the program fd: {e}"),
    })
}

fn open_cgroup(path: &Path) -> Result<File, CaptureError> {
    File::open(path).map_err(|source| CaptureError::CgroupRoot { path: path.display().to_string(), source })
}

fn take_map(ebpf: &mut aya::Ebpf, name: &'static str) -> Result<aya::maps::Map, CaptureError> {
    ebpf.take_map(name).ok_or(CaptureError::Missing(name))
}

fn fill_exclusions(ebpf: &mut aya::Ebpf, config: &Config) -> Result<(), CaptureError> {
    let mut ports: HashMap<MapData, u16, u8> = HashMap::try_from(take_map(ebpf, "EXCLUDED_PORTS")?)
        .map_err(|source| CaptureError::Map { map: "EXCLUDED_PORTS", source })?;
    for port in &config.exclude_ports {
        ports.insert(port, 1, 0).map_err(|source| CaptureError::Map { map: "EXCLUDED_PORTS", source })?;
    }
    let mut v4: LpmTrie<MapData, Cidr4, u8> = LpmTrie::try_from(take_map(ebpf, "EXCLUDED_CIDRS4")?)
        .map_err(|source| CaptureError::Map { map: "EXCLUDED_CIDRS4", source })?;
    let mut v6: LpmTrie<MapData, Cidr6, u8> = LpmTrie::try_from(take_map(ebpf, "EXCLUDED_CIDRS6")?)
        .map_err(|source| CaptureError::Map { map: "EXCLUDED_CIDRS6", source })?;
    for cidr in &config.exclude_cidrs {
        let len = u32::from(cidr.prefix_len);
        match cidr.addr {
            IpAddr::V4(a) => v4.insert(&Key::new(len, a.octets()), 1, 0),
            IpAddr::V6(a) => v6.insert(&Key::new(len, a.octets()), 1, 0),
        }
        .map_err(|source| CaptureError::Map { map: "EXCLUDED_CIDRS", source })?;
    }
    Ok(())
}

/// aya-log does not run by itself: its ring buffer fd is polled here and records are emitted
/// into mesh-node's log.
pub async fn forward_ebpf_logs(logger: EbpfLogger) {
    // SAFETY: the fd belongs to the logger's ring buffer map, which the AsyncFd owns from here
    // on; it stays open and unchanged until the AsyncFd is dropped.
    let registered = unsafe { AsyncFd::register_with_interest(logger, Interest::READABLE) };
    let mut fd = match registered {
        Ok(fd) => fd,
        Err(e) => {
            tracing::warn!("eBPF log forwarding unavailable: {e}");
            return;
        }
    };
    loop {
        let Ok(mut guard) = fd.readable_mut().await else { return };
        guard.get_inner_mut().flush();
        guard.clear_ready();
    }
}
