//! Nodemesh capture programs.
//!
//! * `sock4_connect` / `sock6_connect` (cgroup/connect4, connect6): a TCP connect from a meshed
//!   cgroup, or from any cgroup below one (a pod's container scopes), is rewritten to the node proxy's listener inside the caller's own network namespace
//!   (127.0.0.1 / ::1), and the original destination is stored under the socket cookie.
//! * `sock_ops_established` (sockops): once that connect is established its local port is
//!   known, so the original destination is re-filed under (netns cookie, local addr, local port)
//!   — exactly what the proxy sees as the peer of the accepted socket. The ACK that lets the
//!   proxy's accept() return is sent only after this callback, so the entry is always there in
//!   time, however many pods connect at once and however ports are reused.
//! * `sock4_getpeername` / `sock6_getpeername`: the application sees the address it dialled, not
//!   the proxy's.
//! * `inbound_lookup` (sk_lookup, attached to each meshed pod's netns): a TCP connection
//!   arriving at a meshed pod from outside it (not over loopback) is handed to mesh-node's
//!   inbound listener in that netns instead of the application's, so plaintext that did not
//!   come through the tunnel still meets the pod's policy. mesh-node's own connections into
//!   the pod (deliveries) are filed in `DELIVERIES` by their 4-tuple just before they connect,
//!   and pass, as do connections from the node's own addresses (`NODE_ADDRESSES`: the
//!   kubelet's probes).
//!
//! The proxy's own sockets carry `SO_MARK == PROXY_MARK` and are never captured, even when the
//! proxy runs inside a cgroup that is itself meshed.
#![no_std]
#![no_main]

mod addr;

use aya_ebpf::{
    EbpfContext, Global,
    bindings::{
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG, BPF_TCP_CLOSE,
        bpf_sock_addr, bpf_sock_tuple,
    },
    helpers::{
        bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id, bpf_get_netns_cookie,
        bpf_get_socket_cookie, bpf_sk_lookup_tcp, bpf_sk_release,
    },
    macros::{cgroup_sock_addr, map, sk_lookup, sock_ops},
    maps::{HashMap, LpmTrie, LruHashMap, SockHash, lpm_trie::Key},
    programs::{SkLookupContext, SockAddrContext, SockOpsContext},
};
use aya_log_ebpf::{debug, warn};
use mesh_ebpf_common::{
    Cidr4, Cidr6, ClientTupleKey, DELIVERIES_MAX, DeliveryKey, EXCLUDED_CIDRS_MAX, EXCLUDED_PORTS_MAX,
    FAMILY_INET, FAMILY_INET6, INBOUND_FAIL_CLOSED_MAX, INBOUND_LISTENERS_MAX, MESHED_CGROUPS_MAX,
    MESHED_FAIL_CLOSED, MeshedCgroup, NODE_ADDRESSES_MAX, ORIG_DST_BY_COOKIE_MAX, ORIG_DST_BY_TUPLE_MAX,
    OrigDst, PodAddrKey,
};

/// How deep below the cgroup hierarchy's root a meshed cgroup is looked for. kubelet puts a
/// pod's cgroup three or four levels down (`kubepods.slice/kubepods-burstable.slice/…pod<uid>.slice`,
/// more under a nested `--cgroup-root`) and the containers one level below it.
const MAX_CGROUP_LEVEL: i32 = 16;

/// sock_addr verdicts.
const ALLOW: i32 = 1;
/// `SOCK_STREAM`: only TCP is captured; UDP (DNS and friends) passes untouched.
const SOCK_STREAM: u32 = 1;

/// `SO_MARK` the proxy puts on its own upstream sockets; set by mesh-node at load time.
#[unsafe(no_mangle)]
static PROXY_MARK: Global<u32> = Global::new(0);

// Maps made with `pinned` hold state every mesh-node process shares (mesh-node pins them
// under --bpf-pin-dir): an upgraded process adopts them and keeps their entries. Changing the
// key, value or size of one is a new layout (`mesh_ebpf_common::PIN_LAYOUT`). The exclusion
// maps are each process's own configuration.
#[map]
static MESHED_CGROUPS: HashMap<u64, MeshedCgroup> = HashMap::pinned(MESHED_CGROUPS_MAX, 0);

#[map]
static ORIG_DST_BY_COOKIE: LruHashMap<u64, OrigDst> = LruHashMap::pinned(ORIG_DST_BY_COOKIE_MAX, 0);

#[map]
static ORIG_DST_BY_TUPLE: LruHashMap<ClientTupleKey, OrigDst> = LruHashMap::pinned(ORIG_DST_BY_TUPLE_MAX, 0);

/// Destination ports (host order) that are never captured.
#[map]
static EXCLUDED_PORTS: HashMap<u16, u8> = HashMap::with_max_entries(EXCLUDED_PORTS_MAX, 0);

#[map]
static EXCLUDED_CIDRS4: LpmTrie<Cidr4, u8> = LpmTrie::with_max_entries(EXCLUDED_CIDRS_MAX, 0);

#[map]
static EXCLUDED_CIDRS6: LpmTrie<Cidr6, u8> = LpmTrie::with_max_entries(EXCLUDED_CIDRS_MAX, 0);

/// mesh-node's inbound listener in each meshed pod's netns, by the pod's address.
#[map]
static INBOUND_LISTENERS: SockHash<PodAddrKey> = SockHash::pinned(INBOUND_LISTENERS_MAX, 0);

/// Meshed pods' addresses whose inbound traffic must not reach them directly when no
/// mesh-node listener is there (STRICT): their SYNs are dropped (the kernel then answers with
/// a reset, as if nothing listened).
#[map]
static INBOUND_FAIL_CLOSED: HashMap<PodAddrKey, u8> = HashMap::pinned(INBOUND_FAIL_CLOSED_MAX, 0);

/// mesh-node's own connections into meshed pods, while they connect.
#[map]
static DELIVERIES: LruHashMap<DeliveryKey, u8> = LruHashMap::pinned(DELIVERIES_MAX, 0);

/// The node's own addresses (key: address and family; value unused). A connection from one
/// of them — the kubelet's probes, node agents, hostNetwork pods — reaches the pod directly,
/// as it does in Istio's ambient mode: the node is the trust boundary.
#[map]
static NODE_ADDRESSES: HashMap<PodAddrKey, u8> = HashMap::pinned(NODE_ADDRESSES_MAX, 0);

/// sk_lookup verdicts: carry on (with the socket selected, if one was); drop the packet.
const SK_PASS: u32 = 1;
const SK_DROP: u32 = 0;
const IPPROTO_TCP: u32 = 6;

#[sk_lookup]
pub fn inbound_lookup(ctx: SkLookupContext) -> u32 {
    let l = ctx.lookup;
    // SAFETY: `lookup` is the kernel's context pointer, valid and readable for the program's run.
    let (protocol, family) = unsafe { ((*l).protocol, (*l).family) };
    if protocol != IPPROTO_TCP {
        return SK_PASS;
    }
    // SAFETY: as above. The verifier wants each context word read on its own (no copy of an
    // array through a moved context pointer).
    let (family, local, remote) = unsafe {
        if family == u32::from(FAMILY_INET) {
            (FAMILY_INET, [(*l).local_ip4, 0, 0, 0], [(*l).remote_ip4, 0, 0, 0])
        } else {
            let local = [
                core::ptr::read_volatile(&raw const (*l).local_ip6[0]),
                core::ptr::read_volatile(&raw const (*l).local_ip6[1]),
                core::ptr::read_volatile(&raw const (*l).local_ip6[2]),
                core::ptr::read_volatile(&raw const (*l).local_ip6[3]),
            ];
            let remote = [
                core::ptr::read_volatile(&raw const (*l).remote_ip6[0]),
                core::ptr::read_volatile(&raw const (*l).remote_ip6[1]),
                core::ptr::read_volatile(&raw const (*l).remote_ip6[2]),
                core::ptr::read_volatile(&raw const (*l).remote_ip6[3]),
            ];
            (FAMILY_INET6, local, remote)
        }
    };
    // The pod talking to itself through its own address (a spoofed outside SYN with that
    // source could never complete: the answer stays in the pod).
    if remote == local {
        return SK_PASS;
    }
    if NODE_ADDRESSES.get_ptr(&PodAddrKey { addr: remote, family, _pad: 0 }).is_some() {
        return SK_PASS;
    }
    // SAFETY: as above.
    let (remote_port, local_port) = unsafe { ((*l).remote_port, (*l).local_port) };
    let delivery = DeliveryKey { remote, local, remote_port, local_port: local_port as u16, family, _pad: 0 };
    if DELIVERIES.get_ptr(&delivery).is_some() {
        return SK_PASS;
    }
    let key = PodAddrKey { addr: local, family, _pad: 0 };
    if INBOUND_LISTENERS.redirect_sk_lookup(&ctx, key, 0).is_ok() {
        return SK_PASS;
    }
    // No listener for the address: not a meshed pod's (the application's socket, as always),
    // or its mesh-node is not running — then a pod that only takes mTLS is not reached in
    // plaintext: dropped here, the SYN is answered as if nothing listened (a reset).
    if INBOUND_FAIL_CLOSED.get_ptr(&key).is_some() {
        return SK_DROP;
    }
    SK_PASS
}

#[cgroup_sock_addr(connect4)]
pub fn sock4_connect(ctx: SockAddrContext) -> i32 {
    match try_sock4_connect(&ctx) {
        Ok(v) | Err(v) => v,
    }
}

#[cgroup_sock_addr(connect6)]
pub fn sock6_connect(ctx: SockAddrContext) -> i32 {
    match try_sock6_connect(&ctx) {
        Ok(v) | Err(v) => v,
    }
}

#[cgroup_sock_addr(getpeername4)]
pub fn sock4_getpeername(ctx: SockAddrContext) -> i32 {
    sock_getpeername(&ctx, FAMILY_INET);
    ALLOW
}

#[cgroup_sock_addr(getpeername6)]
pub fn sock6_getpeername(ctx: SockAddrContext) -> i32 {
    sock_getpeername(&ctx, FAMILY_INET6);
    ALLOW
}

#[sock_ops]
pub fn sock_ops_established(ctx: SockOpsContext) -> u32 {
    match ctx.op() {
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => sock_ops_file_by_tuple(&ctx),
        // args[1] is the new TCP state.
        BPF_SOCK_OPS_STATE_CB if ctx.arg(1) == BPF_TCP_CLOSE => {
            // SAFETY: the helper only reads the socket the program runs for.
            let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
            let _ = ORIG_DST_BY_COOKIE.remove(&cookie);
        }
        _ => {}
    }
    0
}

/// The meshed workload the current task belongs to, if its connect should be captured.
fn meshed_caller(ctx: &SockAddrContext) -> Option<MeshedCgroup> {
    let sa = ctx.sock_addr;
    // SAFETY: `sock_addr` is the kernel's context pointer, valid for the program's run.
    unsafe {
        if (*sa).type_ != SOCK_STREAM {
            return None;
        }
        let sk = (*sa).__bindgen_anon_1.sk;
        let proxy_mark = PROXY_MARK.load();
        if proxy_mark != 0 && (*sk).mark == proxy_mark {
            return None;
        }
    }
    let meshed = meshed_cgroup_of_current_task()?;
    // SAFETY: the helper only reads the context's socket.
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    (netns == meshed.netns_cookie).then_some(meshed)
}

/// The meshed cgroup the current task is in: its own cgroup (a workload registered by its
/// exact cgroup, one lookup), else the nearest ancestor that is meshed. A Kubernetes pod is
/// registered by its pod cgroup while its processes run in container scopes below it
/// (`cri-containerd-<id>.scope`), so one entry per pod covers every container, including ones
/// started after registration.
fn meshed_cgroup_of_current_task() -> Option<MeshedCgroup> {
    // SAFETY: plain helper calls without pointer arguments.
    let current = unsafe { bpf_get_current_cgroup_id() };
    // SAFETY (both lookups): the value is copied out immediately; a concurrent delete at worst
    // yields a stale copy.
    if let Some(meshed) = unsafe { MESHED_CGROUPS.get(&current) } {
        return Some(*meshed);
    }
    // Level 0 is the hierarchy's root, never a pod. An ancestor level past the task's own
    // level answers 0; the task's own level answers `current`, already looked up.
    for level in 1..MAX_CGROUP_LEVEL {
        // SAFETY: as above.
        let id = unsafe { bpf_get_current_ancestor_cgroup_id(level) };
        if id == 0 || id == current {
            return None;
        }
        if let Some(meshed) = unsafe { MESHED_CGROUPS.get(&id) } {
            return Some(*meshed);
        }
    }
    None
}

fn port_excluded(port_be: u16) -> bool {
    EXCLUDED_PORTS.get_ptr(&u16::from_be(port_be)).is_some()
}

fn try_sock4_connect(ctx: &SockAddrContext) -> Result<i32, i32> {
    let Some(meshed) = meshed_caller(ctx) else { return Ok(ALLOW) };
    if meshed.proxy_port4 == 0 {
        return Ok(ALLOW);
    }
    let sa: *mut bpf_sock_addr = ctx.sock_addr;
    // SAFETY: context fields are readable and writable for connect4 programs.
    let (ip_be, port_be) = unsafe { ((*sa).user_ip4, (*sa).user_port as u16) };
    if addr::is_loopback4(ip_be) || port_excluded(port_be) {
        return Ok(ALLOW);
    }
    let octets = ip_be.to_ne_bytes();
    if EXCLUDED_CIDRS4.get(Key::new(32, octets)).is_some() {
        return Ok(ALLOW);
    }
    if !proxy_listening(ctx, &ProxyAddr::V4(addr::LOOPBACK4_BE), meshed.proxy_port4, meshed.flags) {
        return Ok(ALLOW);
    }
    let orig = OrigDst { addr: [ip_be, 0, 0, 0], port: port_be, family: FAMILY_INET, _pad: 0 };
    redirect(ctx, &orig, ProxyAddr::V4(addr::LOOPBACK4_BE), meshed.proxy_port4)
}

fn try_sock6_connect(ctx: &SockAddrContext) -> Result<i32, i32> {
    let Some(meshed) = meshed_caller(ctx) else { return Ok(ALLOW) };
    let sa: *mut bpf_sock_addr = ctx.sock_addr;
    // SAFETY: context fields are readable and writable for connect6 programs.
    let (ip6, port_be) = unsafe { (read_user_ip6(sa), (*sa).user_port as u16) };
    if port_excluded(port_be) {
        return Ok(ALLOW);
    }
    if let Some(ip4_be) = addr::v4_mapped(&ip6) {
        // A dual-stack socket dialling an IPv4 address: capture it like connect4 would, but
        // the rewritten address must stay v4-mapped for this AF_INET6 socket.
        if meshed.proxy_port4 == 0 || addr::is_loopback4(ip4_be) {
            return Ok(ALLOW);
        }
        if EXCLUDED_CIDRS4.get(Key::new(32, ip4_be.to_ne_bytes())).is_some() {
            return Ok(ALLOW);
        }
        // The listener a v4-mapped connect reaches is the IPv4 one.
        if !proxy_listening(ctx, &ProxyAddr::V4(addr::LOOPBACK4_BE), meshed.proxy_port4, meshed.flags) {
            return Ok(ALLOW);
        }
        let orig = OrigDst { addr: [ip4_be, 0, 0, 0], port: port_be, family: FAMILY_INET, _pad: 0 };
        let mapped = addr::v4_mapped_words(addr::LOOPBACK4_BE);
        return redirect(ctx, &orig, ProxyAddr::V6(mapped), meshed.proxy_port4);
    }
    if meshed.proxy_port6 == 0 || addr::is_loopback6(&ip6) {
        return Ok(ALLOW);
    }
    if EXCLUDED_CIDRS6.get(Key::new(128, addr::words_to_bytes(&ip6))).is_some() {
        return Ok(ALLOW);
    }
    if !proxy_listening(ctx, &ProxyAddr::V6(addr::LOOPBACK6_WORDS), meshed.proxy_port6, meshed.flags) {
        return Ok(ALLOW);
    }
    let orig = OrigDst { addr: ip6, port: port_be, family: FAMILY_INET6, _pad: 0 };
    redirect(ctx, &orig, ProxyAddr::V6(addr::LOOPBACK6_WORDS), meshed.proxy_port6)
}

/// `bpf_sk_lookup_tcp`'s netns argument for "the socket's own netns" (BPF_F_CURRENT_NETNS).
const CURRENT_NETNS: u64 = u64::MAX;

/// Whether the connect should go to the proxy listener: yes while mesh-node listens there (the
/// pod's own netns); with no mesh-node running, only for a fail-closed workload (the connect
/// is then refused), while the others connect directly.
#[inline(always)]
fn proxy_listening(ctx: &SockAddrContext, proxy_addr: &ProxyAddr, port: u16, flags: u16) -> bool {
    if flags & MESHED_FAIL_CLOSED != 0 {
        return true;
    }
    // SAFETY: an all-zero tuple is valid; the union member written matches the size passed.
    let found = unsafe {
        let mut tuple: bpf_sock_tuple = core::mem::zeroed();
        let size = match proxy_addr {
            ProxyAddr::V4(ip4_be) => {
                tuple.__bindgen_anon_1.ipv4.daddr = *ip4_be;
                tuple.__bindgen_anon_1.ipv4.dport = port.to_be();
                core::mem::size_of_val(&tuple.__bindgen_anon_1.ipv4)
            }
            ProxyAddr::V6(words) => {
                tuple.__bindgen_anon_1.ipv6.daddr = *words;
                tuple.__bindgen_anon_1.ipv6.dport = port.to_be();
                core::mem::size_of_val(&tuple.__bindgen_anon_1.ipv6)
            }
        };
        bpf_sk_lookup_tcp(ctx.as_ptr(), &mut tuple, size as u32, CURRENT_NETNS, 0)
    };
    if found.is_null() {
        return false;
    }
    // SAFETY: `found` is the non-null socket the lookup took a reference on.
    unsafe { bpf_sk_release(found.cast()) };
    true
}

/// The proxy listener address written into the socket: its form follows the socket's family.
enum ProxyAddr {
    V4(u32),
    V6([u32; 4]),
}

/// Remember `orig` under the socket cookie and point the connect at the proxy listener.
///
/// If the map is full the connect is left alone rather than redirected without a way back to
/// its destination: an uncaptured connection beats a broken one.
#[inline(always)]
fn redirect(
    ctx: &SockAddrContext,
    orig: &OrigDst,
    proxy_addr: ProxyAddr,
    proxy_port: u16,
) -> Result<i32, i32> {
    // SAFETY: the helper only reads the socket the program runs for.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    if let Err(e) = ORIG_DST_BY_COOKIE.insert(&cookie, orig, 0) {
        warn!(ctx, "nodemesh: ORIG_DST_BY_COOKIE insert failed ({}); connect not captured", e);
        return Ok(ALLOW);
    }
    let sa = ctx.sock_addr;
    // SAFETY: user_ip4/user_ip6/user_port are writable in connect programs.
    unsafe {
        match proxy_addr {
            ProxyAddr::V6(words) => write_user_ip6(sa, &words),
            ProxyAddr::V4(ip4_be) => (*sa).user_ip4 = ip4_be,
        }
        (*sa).user_port = u32::from(proxy_port.to_be());
    }
    debug!(ctx, "nodemesh: captured connect, cookie {} -> proxy port {}", cookie, proxy_port);
    Ok(ALLOW)
}

fn sock_ops_file_by_tuple(ctx: &SockOpsContext) {
    // SAFETY: the helper only reads the socket the program runs for.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: copied out at once.
    let Some(orig) = (unsafe { ORIG_DST_BY_COOKIE.get(&cookie).copied() }) else { return };
    let netns_cookie = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    let (family, addr) = if ctx.family() == u32::from(FAMILY_INET) {
        (FAMILY_INET, [ctx.local_ip4(), 0, 0, 0])
    } else {
        let ip6 = ctx.local_ip6();
        match addr::v4_mapped(&ip6) {
            // The proxy's IPv4 listener sees a v4-mapped client as plain IPv4.
            Some(ip4) => (FAMILY_INET, [ip4, 0, 0, 0]),
            None => (FAMILY_INET6, ip6),
        }
    };
    let key = ClientTupleKey { netns_cookie, addr, port: ctx.local_port() as u16, family, _pad: 0 };
    if let Err(e) = ORIG_DST_BY_TUPLE.insert(&key, &orig, 0) {
        warn!(ctx, "nodemesh: ORIG_DST_BY_TUPLE insert failed ({})", e);
        return;
    }
    // Ask for state callbacks so the cookie entry (kept for getpeername) goes away on close.
    let _ = ctx.set_cb_flags(BPF_SOCK_OPS_STATE_CB_FLAG as i32);
}

fn sock_getpeername(ctx: &SockAddrContext, family: u16) {
    // SAFETY: the helper only reads the socket the program runs for.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: copied out at once.
    let Some(orig) = (unsafe { ORIG_DST_BY_COOKIE.get(&cookie).copied() }) else { return };
    let sa = ctx.sock_addr;
    // SAFETY: user_ip4/user_ip6/user_port are writable in getpeername programs.
    unsafe {
        if family == FAMILY_INET {
            (*sa).user_ip4 = orig.addr[0];
        } else if orig.family == FAMILY_INET {
            write_user_ip6(sa, &addr::v4_mapped_words(orig.addr[0]));
        } else {
            write_user_ip6(sa, &orig.addr);
        }
        (*sa).user_port = u32::from(orig.port);
    }
}

/// The verifier only accepts context accesses at a constant offset from the context pointer
/// itself; a plain array copy lets LLVM form `ctx + 12` first and is rejected ("dereference of
/// modified ctx ptr"). Word-by-word volatile accesses keep every offset constant.
#[inline(always)]
unsafe fn read_user_ip6(sa: *mut bpf_sock_addr) -> [u32; 4] {
    // SAFETY: the caller passes the program's context pointer.
    unsafe {
        [
            core::ptr::read_volatile(&raw const (*sa).user_ip6[0]),
            core::ptr::read_volatile(&raw const (*sa).user_ip6[1]),
            core::ptr::read_volatile(&raw const (*sa).user_ip6[2]),
            core::ptr::read_volatile(&raw const (*sa).user_ip6[3]),
        ]
    }
}

#[inline(always)]
unsafe fn write_user_ip6(sa: *mut bpf_sock_addr, words: &[u32; 4]) {
    // SAFETY: the caller passes the program's context pointer.
    unsafe {
        core::ptr::write_volatile(&raw mut (*sa).user_ip6[0], words[0]);
        core::ptr::write_volatile(&raw mut (*sa).user_ip6[1], words[1]);
        core::ptr::write_volatile(&raw mut (*sa).user_ip6[2], words[2]);
        core::ptr::write_volatile(&raw mut (*sa).user_ip6[3], words[3]);
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo<'_>) -> ! {
    // SAFETY: the verifier rejects any program that could reach a panic.
    unsafe { core::hint::unreachable_unchecked() }
}
