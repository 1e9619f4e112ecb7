//! Map keys and values shared between the eBPF programs (`mesh-ebpf`) and mesh-node.
//!
//! Every type is `#[repr(C)]` with explicit padding and no `bool`, so the kernel and user space
//! agree on the layout byte for byte. Addresses are stored as four `u32` words in network byte
//! order; an IPv4 address lives in word 0 and words 1..3 are zero. Ports in [`OrigDst`] are kept
//! in network byte order (as the kernel hands them to sock_addr programs); the port in
//! [`ClientTupleKey`] is in host order because that is how sock_ops reports a local port.
#![no_std]

/// `AF_INET` as the kernel numbers it.
pub const FAMILY_INET: u16 = 2;
/// `AF_INET6` as the kernel numbers it.
pub const FAMILY_INET6: u16 = 10;

/// The layout of the pinned maps (their keys, values and sizes). mesh-node pins them under
/// `<bpf-pin-dir>/v<PIN_LAYOUT>/`: a new mesh-node adopts maps of its own layout only.
/// Raise it with any change to a pinned map's key, value or size.
pub const PIN_LAYOUT: u32 = 1;

/// Meshed cgroups: key is the cgroup v2 id (`bpf_get_current_cgroup_id`).
pub const MESHED_CGROUPS_MAX: u32 = 16_384;
/// Original destination by socket cookie. Sized for 100k+ concurrent captured connections per
/// node; entries are deleted when the client socket closes and the map is LRU as a backstop.
pub const ORIG_DST_BY_COOKIE_MAX: u32 = 262_144;
/// Original destination by the client's (netns, address, port): the proxy's lookup key.
pub const ORIG_DST_BY_TUPLE_MAX: u32 = 262_144;
/// Excluded destination ports.
pub const EXCLUDED_PORTS_MAX: u32 = 1_024;
/// Excluded destination CIDRs, per address family.
pub const EXCLUDED_CIDRS_MAX: u32 = 1_024;

/// Value of `MESHED_CGROUPS`: where the node proxy listens for this workload.
///
/// The netns cookie pins the capture to the network namespace the workload was registered
/// with: a process of a meshed cgroup that enters another netns (e.g. `ip netns exec`) has no
/// proxy listener there, so redirecting it would only produce a refused connect.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MeshedCgroup {
    pub netns_cookie: u64,
    /// Listener port on 127.0.0.1 inside that netns, host order; 0 = IPv4 not captured.
    pub proxy_port4: u16,
    /// Listener port on ::1 inside that netns, host order; 0 = IPv6 not captured.
    pub proxy_port6: u16,
    /// [`MESHED_FAIL_CLOSED`], …
    pub flags: u16,
    pub _pad: u16,
}

/// `MeshedCgroup::flags`: while the proxy listener is gone (no mesh-node runs), the
/// workload's connects still go to it and are refused, instead of going out directly.
pub const MESHED_FAIL_CLOSED: u16 = 1;

/// The destination an application dialled before the connect hook rewrote it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OrigDst {
    /// Network byte order; IPv4 in word 0.
    pub addr: [u32; 4],
    /// Network byte order.
    pub port: u16,
    /// [`FAMILY_INET`] or [`FAMILY_INET6`]. A v4-mapped IPv6 destination is stored as IPv4.
    pub family: u16,
    pub _pad: u32,
}

/// Identifies the client end of a captured connection as the proxy sees it on accept: the
/// network namespace of the listener plus the peer address/port it reports.
///
/// The netns cookie is part of the key because every pod dials the proxy from 127.0.0.1 (or
/// ::1): two pods can use the same ephemeral port at the same time.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ClientTupleKey {
    pub netns_cookie: u64,
    /// Network byte order; IPv4 (including v4-mapped) in word 0.
    pub addr: [u32; 4],
    /// Host byte order.
    pub port: u16,
    pub family: u16,
    pub _pad: u32,
}

/// Pod addresses whose inbound connections are refused while no mesh-node listener takes
/// them, instead of reaching the pod directly. Value unused.
pub const INBOUND_FAIL_CLOSED_MAX: u32 = 65_536;

/// Inbound listeners: one per meshed pod address (a few per pod).
pub const INBOUND_LISTENERS_MAX: u32 = 65_536;

/// Key of `INBOUND_LISTENERS`: a meshed pod's own address, to which inbound connections are
/// addressed; the value is mesh-node's inbound listener inside that pod's netns.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PodAddrKey {
    /// Network byte order; IPv4 in word 0.
    pub addr: [u32; 4],
    pub family: u16,
    pub _pad: u16,
}

/// Deliveries being connected right now (entries live for one connect).
pub const DELIVERIES_MAX: u32 = 65_536;

/// The node's own addresses (host network namespace): connections from them to a meshed pod
/// are the kubelet's probes and node agents, not the mesh's to refuse.
pub const NODE_ADDRESSES_MAX: u32 = 1_024;

/// A connection mesh-node is opening *into* a meshed pod on a client's behalf (the 4-tuple
/// as the pod's netns sees its SYN), filed just before the connect so the pod's inbound
/// capture lets it through instead of taking it back to mesh-node.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct DeliveryKey {
    /// The client's address (network byte order; IPv4 in word 0).
    pub remote: [u32; 4],
    /// The pod's address.
    pub local: [u32; 4],
    /// Network byte order, as sk_lookup reports it.
    pub remote_port: u16,
    /// Host byte order, as sk_lookup reports it.
    pub local_port: u16,
    pub family: u16,
    pub _pad: u16,
}

/// LPM trie key data for an excluded IPv4 CIDR (network byte order).
pub type Cidr4 = [u8; 4];
/// LPM trie key data for an excluded IPv6 CIDR (network byte order).
pub type Cidr6 = [u8; 16];

#[cfg(feature = "user")]
mod pod_impls {
    #![expect(unsafe_code, reason = "aya::Pod is an unsafe marker trait")]
    use super::{ClientTupleKey, DeliveryKey, MeshedCgroup, OrigDst, PodAddrKey};
    // SAFETY: all five are repr(C), contain only integers and have explicit padding fields,
    // so every byte pattern is a valid value.
    unsafe impl aya::Pod for MeshedCgroup {}
    unsafe impl aya::Pod for OrigDst {}
    unsafe impl aya::Pod for ClientTupleKey {}
    unsafe impl aya::Pod for PodAddrKey {}
    unsafe impl aya::Pod for DeliveryKey {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::size_of;

    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(size_of::<MeshedCgroup>(), 16);
        assert_eq!(size_of::<OrigDst>(), 24);
        assert_eq!(size_of::<ClientTupleKey>(), 32);
        assert_eq!(size_of::<PodAddrKey>(), 20);
        assert_eq!(size_of::<DeliveryKey>(), 40);
    }
}
