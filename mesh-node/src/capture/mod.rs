//! Traffic capture: the eBPF programs (see `mesh-ebpf`) and the maps mesh-node drives.
//!
//! mesh-node tells the kernel which cgroups are meshed and where their proxy listener is
//! ([`Capture::mesh`]); for every accepted connection it asks where the client was really
//! going ([`Capture::take_orig_dst`]).

#[expect(unsafe_code, reason = "tokio AsyncFd registration for the eBPF log ring buffer")]
mod loader;
pub mod node_addresses;
mod pins;

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::Mutex,
};

use std::os::fd::{AsFd, AsRawFd};

use aya::{
    maps::{HashMap, MapData, SockHash},
    programs::{SkLookup, links::FdLink},
};
use mesh_ebpf_common::{
    ClientTupleKey, DeliveryKey, FAMILY_INET, FAMILY_INET6, MESHED_FAIL_CLOSED, MeshedCgroup, OrigDst,
    PodAddrKey,
};

/// Takes a node's pinned capture away (`mesh-node uninstall`): the links detach, so meshed
/// pods connect directly again, also fail-closed ones; the maps go once no process holds them.
/// Returns whether there was any.
pub fn uninstall(pin_dir: &std::path::Path) -> Result<bool, CaptureError> {
    pins::PinDir::remove_existing(pin_dir)
}

pub use loader::{CaptureError, EbpfLogger, forward_ebpf_logs, is_capture_program, load_and_attach};

/// Where capture sends a meshed cgroup's connects.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct CaptureTarget {
    pub netns_cookie: u64,
    pub proxy_port4: u16,
    pub proxy_port6: u16,
    /// While no mesh-node listens, its connects and connects to it are refused, instead of
    /// going directly (see `MESHED_FAIL_CLOSED`).
    pub fail_closed: bool,
}

/// The loaded programs and their maps. The links that run them are pinned (`pins`): dropping
/// this leaves capture in place; [`uninstall`] takes it away.
pub struct Capture {
    ebpf: Mutex<aya::Ebpf>,
    pins: pins::PinDir,
    meshed: Mutex<HashMap<MapData, u64, MeshedCgroup>>,
    by_tuple: Mutex<HashMap<MapData, ClientTupleKey, OrigDst>>,
    inbound: Mutex<SockHash<MapData, PodAddrKey>>,
    deliveries: Mutex<HashMap<MapData, DeliveryKey, u8>>,
    node_addresses: Mutex<HashMap<MapData, PodAddrKey, u8>>,
    inbound_fail_closed: Mutex<HashMap<MapData, PodAddrKey, u8>>,
}

/// The inbound capture of one pod netns, to undo with [`Capture::release_inbound`].
#[derive(Debug)]
pub struct InboundCapture {
    /// Where its sk_lookup link is pinned.
    link: std::path::PathBuf,
    keys: Vec<PodAddrKey>,
}

impl Capture {
    pub fn mesh(&self, cgroup_id: u64, target: CaptureTarget) -> Result<(), CaptureError> {
        let value = MeshedCgroup {
            netns_cookie: target.netns_cookie,
            proxy_port4: target.proxy_port4,
            proxy_port6: target.proxy_port6,
            flags: if target.fail_closed { MESHED_FAIL_CLOSED } else { 0 },
            _pad: 0,
        };
        self.meshed
            .lock()
            .expect("capture map lock")
            .insert(cgroup_id, value, 0)
            .map_err(|source| CaptureError::Map { map: "MESHED_CGROUPS", source })
    }

    pub fn unmesh(&self, cgroup_id: u64) -> Result<(), CaptureError> {
        match self.meshed.lock().expect("capture map lock").remove(&cgroup_id) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(source) => Err(CaptureError::Map { map: "MESHED_CGROUPS", source }),
        }
    }

    /// Steers TCP connections arriving at `ips` from outside their netns (`netns`, a file of
    /// the pod's network namespace) to `listeners` — the IPv4 and the IPv6 one — instead of the
    /// application's sockets.
    pub fn capture_inbound(
        &self,
        netns: &std::fs::File,
        netns_cookie: u64,
        ips: &[IpAddr],
        listener4: &impl AsRawFd,
        listener6: Option<&impl AsRawFd>,
    ) -> Result<InboundCapture, CaptureError> {
        let mut keys = Vec::new();
        {
            let mut map = self.inbound.lock().expect("capture map lock");
            for ip in ips {
                let key = pod_addr_key(*ip);
                let inserted = match (key.family, listener6) {
                    (FAMILY_INET, _) => map.insert(key, listener4.as_raw_fd(), 0),
                    (_, Some(l6)) => map.insert(key, l6.as_raw_fd(), 0),
                    (_, None) => continue,
                };
                inserted.map_err(|source| CaptureError::Map { map: "INBOUND_LISTENERS", source })?;
                keys.push(key);
            }
        }
        let (name, hook) = (loader::SK_LOOKUP_PROGRAM, "sk_lookup");
        let mut ebpf = self.ebpf.lock().expect("capture program lock");
        let program: &mut SkLookup = ebpf
            .program_mut(name)
            .ok_or(CaptureError::Missing(name))?
            .try_into()
            .map_err(|source| CaptureError::Program { name, hook, source })?;
        let fd = loader::owned_fd(program.fd(), name, hook)?;
        let link = self.pins.netns_link(netns_cookie);
        pins::link_program(&link, fd.as_fd(), || {
            let id = program.attach(netns).map_err(|e| format!("{hook}: {e}"))?;
            let link = program.take_link(id).map_err(|e| e.to_string())?;
            Ok(FdLink::from(link))
        })?;
        Ok(InboundCapture { link, keys })
    }

    /// Lets the connection `from` → `to` through `to`'s inbound capture (a delivery by
    /// mesh-node); withdraw it once connected.
    pub fn file_delivery(&self, from: SocketAddr, to: SocketAddr) -> Result<DeliveryKey, CaptureError> {
        let (family, remote) = ip_words(from.ip());
        let (_, local) = ip_words(to.ip());
        let key = DeliveryKey {
            remote,
            local,
            remote_port: from.port().to_be(),
            local_port: to.port(),
            family,
            _pad: 0,
        };
        self.deliveries
            .lock()
            .expect("capture map lock")
            .insert(key, 1, 0)
            .map_err(|source| CaptureError::Map { map: "DELIVERIES", source })?;
        Ok(key)
    }

    /// Makes `addresses` the node's own (see `NODE_ADDRESSES`): connections from them pass
    /// the pods' inbound capture. Returns whether anything changed.
    pub fn set_node_addresses(&self, addresses: &[IpAddr]) -> Result<bool, CaptureError> {
        let wanted: Vec<PodAddrKey> = addresses.iter().map(|ip| pod_addr_key(*ip)).collect();
        let mut map = self.node_addresses.lock().expect("capture map lock");
        let held: Vec<PodAddrKey> = map.keys().filter_map(Result::ok).collect();
        let mut changed = false;
        for stale in held.iter().filter(|k| !wanted.contains(k)) {
            let _ = map.remove(stale);
            changed = true;
        }
        for key in wanted.iter().filter(|k| !held.contains(k)) {
            map.insert(*key, 1, 0).map_err(|source| CaptureError::Map { map: "NODE_ADDRESSES", source })?;
            changed = true;
        }
        Ok(changed)
    }

    /// Whether connections to `ips` are refused while no mesh-node listener takes them,
    /// rather than reaching the pod directly.
    pub fn set_inbound_fail_closed(&self, ips: &[IpAddr], on: bool) -> Result<(), CaptureError> {
        let mut map = self.inbound_fail_closed.lock().expect("capture map lock");
        for key in ips.iter().map(|ip| pod_addr_key(*ip)) {
            if on {
                map.insert(key, 1, 0)
                    .map_err(|source| CaptureError::Map { map: "INBOUND_FAIL_CLOSED", source })?;
            } else {
                let _ = map.remove(&key);
            }
        }
        Ok(())
    }

    pub fn withdraw_delivery(&self, key: DeliveryKey) {
        let _ = self.deliveries.lock().expect("capture map lock").remove(&key);
    }

    /// Undoes [`Capture::capture_inbound`]: the pod's own sockets get its connections again.
    pub fn release_inbound(&self, capture: InboundCapture) {
        self.release_inbound_except(capture, None);
    }

    /// Releases what `old` holds that `kept` (its successor in the same pod, already in
    /// place) does not hold too: a re-registration never leaves the pod's addresses without
    /// inbound capture, not even for a moment (a STRICT pod would take plaintext then).
    pub fn release_inbound_except(&self, old: InboundCapture, kept: Option<&InboundCapture>) {
        let gone: Vec<&PodAddrKey> =
            old.keys.iter().filter(|k| kept.is_none_or(|kept| !kept.keys.contains(k))).collect();
        let mut map = self.inbound.lock().expect("capture map lock");
        for key in &gone {
            let _ = map.remove(key);
        }
        drop(map);
        let mut fail_closed = self.inbound_fail_closed.lock().expect("capture map lock");
        for key in &gone {
            let _ = fail_closed.remove(key);
        }
        drop(fail_closed);
        if kept.is_none_or(|kept| kept.link != old.link) {
            pins::unlink(&old.link);
        }
    }

    /// Drops what a previous mesh-node left pinned for workloads this one no longer has:
    /// capture of cgroups not in `meshed`, inbound links of netns not in `netns_cookies`, and
    /// inbound holds of addresses not in `addresses`. Returns how many entries went.
    pub fn sweep(&self, meshed: &[u64], netns_cookies: &[u64], addresses: &[IpAddr]) -> usize {
        let mut map = self.meshed.lock().expect("capture map lock");
        let stale: Vec<u64> = map.keys().filter_map(Result::ok).filter(|id| !meshed.contains(id)).collect();
        for id in &stale {
            let _ = map.remove(id);
        }
        drop(map);
        let stale_links: Vec<u64> =
            self.pins.netns_links().into_iter().filter(|c| !netns_cookies.contains(c)).collect();
        for cookie in &stale_links {
            pins::unlink(&self.pins.netns_link(*cookie));
        }
        let live: Vec<PodAddrKey> = addresses.iter().map(|ip| pod_addr_key(*ip)).collect();
        let mut holds = self.inbound_fail_closed.lock().expect("capture map lock");
        let stale_holds: Vec<PodAddrKey> =
            holds.keys().filter_map(Result::ok).filter(|k| !live.contains(k)).collect();
        for key in &stale_holds {
            let _ = holds.remove(key);
        }
        stale.len() + stale_links.len() + stale_holds.len()
    }

    /// The destination the client of an accepted connection dialled, removed from the map so
    /// a later connection reusing the same port cannot see it. `None` means the connection did
    /// not come through capture (something dialled the listener directly).
    pub fn take_orig_dst(&self, netns_cookie: u64, peer: SocketAddr) -> Option<SocketAddr> {
        let key = tuple_key(netns_cookie, peer);
        let mut map = self.by_tuple.lock().expect("capture map lock");
        let orig = map.get(&key, 0).ok()?;
        let _ = map.remove(&key);
        Some(orig_to_socket_addr(&orig))
    }
}

fn ip_words(ip: IpAddr) -> (u16, [u32; 4]) {
    match ip {
        IpAddr::V4(v4) => (FAMILY_INET, [u32::from_ne_bytes(v4.octets()), 0, 0, 0]),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => (FAMILY_INET, [u32::from_ne_bytes(v4.octets()), 0, 0, 0]),
            None => {
                let o = v6.octets();
                let w = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
                (FAMILY_INET6, [w(0), w(4), w(8), w(12)])
            }
        },
    }
}

fn pod_addr_key(ip: IpAddr) -> PodAddrKey {
    let (family, addr) = ip_words(ip);
    PodAddrKey { addr, family, _pad: 0 }
}

fn tuple_key(netns_cookie: u64, peer: SocketAddr) -> ClientTupleKey {
    let (family, addr) = ip_words(peer.ip());
    ClientTupleKey { netns_cookie, addr, port: peer.port(), family, _pad: 0 }
}

fn orig_to_socket_addr(orig: &OrigDst) -> SocketAddr {
    let port = u16::from_be(orig.port);
    if orig.family == FAMILY_INET {
        SocketAddr::new(Ipv4Addr::from(orig.addr[0].to_ne_bytes()).into(), port)
    } else {
        let mut octets = [0u8; 16];
        for (i, w) in orig.addr.iter().enumerate() {
            octets[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
        }
        SocketAddr::new(Ipv6Addr::from(octets).into(), port)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_match_what_sockops_files() {
        // sockops stores the local address in network order, IPv4 in word 0, port host order.
        let key = tuple_key(7, "127.0.0.1:40000".parse().unwrap());
        assert_eq!(key.addr, [u32::from_ne_bytes([127, 0, 0, 1]), 0, 0, 0]);
        assert_eq!((key.port, key.family, key.netns_cookie), (40000, FAMILY_INET, 7));
        // A v4-mapped peer on a dual-stack listener is filed as IPv4.
        let mapped = tuple_key(7, "[::ffff:127.0.0.1]:40000".parse().unwrap());
        assert_eq!(mapped, key);
        let v6 = tuple_key(7, "[::1]:5".parse().unwrap());
        assert_eq!(v6.addr, [0, 0, 0, u32::from_ne_bytes([0, 0, 0, 1])]);
    }

    #[test]
    fn orig_dst_round_trips() {
        for s in ["10.1.2.3:8080", "[fd00::2]:443"] {
            let addr: SocketAddr = s.parse().unwrap();
            let (family, words) = ip_words(addr.ip());
            let orig = OrigDst { addr: words, port: addr.port().to_be(), family, _pad: 0 };
            assert_eq!(orig_to_socket_addr(&orig), addr);
        }
    }
}
