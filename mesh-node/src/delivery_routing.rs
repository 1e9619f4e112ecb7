//! Policy routing inside a meshed pod's network namespace, so that the connections mesh-node
//! opens *to* the pod on a client's behalf can carry that client's own address.
//!
//! mesh-node delivers an inbound connection from inside the pod's netns with a socket bound
//! (IP_TRANSPARENT) to the client pod's address and marked with the delivery mark. The
//! application's answers are addressed to that client, which is not in this netns: left to
//! the main table they would leave through the pod's interface. Two things bring them back:
//!
//! - `net.ipv4.tcp_fwmark_accept=1`: a socket the application accepts takes the mark of the
//!   SYN that created it (the delivery mark), so everything it sends is marked;
//! - a rule `fwmark <delivery mark> lookup 15008` before the main table, and in table 15008 a
//!   `local` default route: marked packets are delivered locally, to mesh-node's socket.
//!
//! Only sockets mesh-node marks, and the connections they open, are affected; the pod's own
//! traffic and connections from anywhere else route as before. No iptables.
//!
//! The routing of one netns is shared ([`DeliveryRoutes`]): by every registration of the pod
//! and by every connection delivered into it. Removing or re-registering the pod retires it,
//! but it comes out only when the last delivered connection has ended — a pod that is
//! unregistered while it still runs (terminating, unlabelled, re-registered) keeps answering
//! the connections it already has.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::AsRawFd,
    sync::{
        Arc, Weak,
        atomic::{AtomicBool, Ordering},
    },
};

use rtnetlink::{
    Handle, RouteMessageBuilder,
    packet_route::{
        route::{RouteScope, RouteType},
        rule::RuleAction,
    },
};

use crate::netns::{NetnsError, NetnsThread};

/// Why delivery routing could not be set up in a pod's netns.
#[derive(Debug, thiserror::Error)]
pub enum RoutingError {
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error("{what} {FWMARK_ACCEPT}: {source}")]
    Sysctl { what: &'static str, source: std::io::Error },
    #[error("netlink socket: {0}")]
    Socket(std::io::Error),
    /// `ip rule add` / `ip route add` refused.
    #[error("{family} delivery routing: {command}: {source}")]
    Netlink { family: &'static str, command: String, source: rtnetlink::Error },
}

impl RoutingError {
    /// The netns has no such address family (IPv6 disabled): nothing to route back over it.
    fn family_unsupported(&self) -> bool {
        matches!(self, RoutingError::Netlink { source: rtnetlink::Error::NetlinkError(m), .. }
            if m.raw_code() == -libc::EAFNOSUPPORT)
    }
}

/// The routing table holding the local default routes (named after the HBONE port).
pub const TABLE: u32 = 15008;
/// Before the main table's rule (32766), after the local table's (0).
const PRIORITY: u32 = 100;
/// The loopback interface: index 1 in every network namespace.
const LOOPBACK: u32 = 1;
const FWMARK_ACCEPT: &str = "/proc/sys/net/ipv4/tcp_fwmark_accept";

/// What [`install`] changed, so [`remove`] can put it back.
#[derive(Debug, Clone, Copy)]
struct Installed {
    /// `tcp_fwmark_accept` was already on before mesh-node set it.
    fwmark_accept_was_on: bool,
}

/// The delivery routing of every pod netns, by netns cookie.
#[derive(Default)]
pub struct RoutesByNetns {
    /// Held across each install and removal, so a removal never undoes an install that
    /// followed it.
    installed: tokio::sync::Mutex<HashMap<u64, Weak<DeliveryRoutes>>>,
    /// A new mesh-node is taking over (or has): it relies on the same rules, so nothing is
    /// removed from here on.
    handing_over: AtomicBool,
}

impl RoutesByNetns {
    /// The routing in the netns with `cookie` (reached through `netns`): the one already in
    /// place (and no longer retired), or installed now.
    pub async fn hold(
        self: &Arc<Self>,
        netns: &NetnsThread,
        cookie: u64,
        mark: u32,
    ) -> Result<Arc<DeliveryRoutes>, RoutingError> {
        let mut installed = self.installed.lock().await;
        if let Some(routes) = installed.get(&cookie).and_then(Weak::upgrade) {
            routes.retired.store(false, Ordering::Relaxed);
            return Ok(routes);
        }
        // Entries of netns nobody holds (and nobody retired: a failed registration) go.
        installed.retain(|_, routes| routes.strong_count() > 0);
        // The netns by descriptor, not by thread: it costs one descriptor per pod while held,
        // and a path (`/proc/<pid>/ns/net`) could name another netns by the time it goes.
        let file = std::fs::File::open(netns.path()).map_err(|source| {
            RoutingError::Netns(NetnsError::Open { path: netns.path().to_path_buf(), source })
        })?;
        let changed = install(netns, mark).await?;
        let routes = Arc::new(DeliveryRoutes {
            rules: Rules { cookie, netns: Arc::new(file), mark, changed },
            retired: AtomicBool::new(false),
            by_netns: Arc::clone(self),
        });
        installed.insert(cookie, Arc::downgrade(&routes));
        Ok(routes)
    }

    /// While set, retired routing stays in place (see `handing_over`).
    pub fn set_handing_over(&self, on: bool) {
        self.handing_over.store(on, Ordering::Release);
    }

    /// Takes `gone` out, unless its netns is held again meanwhile.
    async fn remove_unless_held(&self, gone: Rules) {
        let mut installed = self.installed.lock().await;
        if self.handing_over.load(Ordering::Acquire)
            || installed.get(&gone.cookie).and_then(Weak::upgrade).is_some()
        {
            return;
        }
        installed.remove(&gone.cookie);
        // The descriptor names the netns for as long as it is open.
        let path = std::path::PathBuf::from(format!("/proc/self/fd/{}", gone.netns.as_raw_fd()));
        match NetnsThread::spawn(&path) {
            Ok(netns) => remove(&netns, gone.mark, gone.changed).await,
            Err(e) => tracing::debug!(netns_cookie = gone.cookie, "delivery routing not removed: {e}"),
        }
    }
}

/// Delivery routing in place in one pod netns, while anything holds it.
pub struct DeliveryRoutes {
    rules: Rules,
    /// No registration needs it any more: it comes out when the last holder lets go.
    /// Unretired (a registration or process that never retires it), it stays for the netns's
    /// life; after a handover the new mesh-node relies on it.
    retired: AtomicBool,
    by_netns: Arc<RoutesByNetns>,
}

/// What was installed where, and how to take it out.
#[derive(Clone)]
struct Rules {
    cookie: u64,
    netns: Arc<std::fs::File>,
    mark: u32,
    changed: Installed,
}

impl DeliveryRoutes {
    /// No registration of the pod needs it any more.
    pub fn retire(&self) {
        self.retired.store(true, Ordering::Relaxed);
    }
}

impl std::fmt::Debug for DeliveryRoutes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeliveryRoutes").field("netns_cookie", &self.rules.cookie).finish()
    }
}

impl Drop for DeliveryRoutes {
    fn drop(&mut self) {
        if !self.retired.load(Ordering::Relaxed) {
            return;
        }
        // In the background (the netns may be going away); outside a runtime (process exit)
        // the rules stay, inert without mesh-node's marked sockets.
        let Ok(runtime) = tokio::runtime::Handle::try_current() else { return };
        let (rules, by_netns) = (self.rules.clone(), Arc::clone(&self.by_netns));
        runtime.spawn(async move { by_netns.remove_unless_held(rules).await });
    }
}

/// Sets up the rule, the routes and `tcp_fwmark_accept` in `netns`; idempotent.
async fn install(netns: &NetnsThread, mark: u32) -> Result<Installed, RoutingError> {
    let was = netns
        .run(|| -> Result<bool, RoutingError> {
            let was = std::fs::read_to_string(FWMARK_ACCEPT)
                .map_err(|source| RoutingError::Sysctl { what: "reading", source })?
                .trim()
                == "1";
            if !was {
                std::fs::write(FWMARK_ACCEPT, "1")
                    .map_err(|source| RoutingError::Sysctl { what: "writing", source })?;
            }
            Ok(was)
        })
        .await??;
    let handle = connect(netns).await?;
    for v6 in [false, true] {
        match add(&handle, v6, mark).await {
            Ok(()) => {}
            // A netns with IPv6 disabled has nothing to route back over IPv6.
            Err(e) if v6 && e.family_unsupported() => {
                tracing::debug!(netns = %netns.path().display(), "no IPv6 delivery routing: {e}");
            }
            Err(e) => return Err(e),
        }
    }
    Ok(Installed { fwmark_accept_was_on: was })
}

/// Undoes [`install`] (best effort: the netns may be going away).
async fn remove(netns: &NetnsThread, mark: u32, installed: Installed) {
    if let Ok(handle) = connect(netns).await {
        for v6 in [false, true] {
            let rule = rule(&handle, v6, mark).message_mut().clone();
            let _ = handle.rule().del(rule).execute().await;
            let _ = handle.route().del(local_default(v6)).execute().await;
        }
    }
    if !installed.fwmark_accept_was_on {
        let _ = netns.run(|| std::fs::write(FWMARK_ACCEPT, "0")).await;
    }
}

/// A netlink connection whose socket lives in `netns` (created on its helper thread; the
/// runtime is entered there so the socket registers with tokio's reactor).
async fn connect(netns: &NetnsThread) -> Result<Handle, RoutingError> {
    let runtime = tokio::runtime::Handle::current();
    let (connection, handle, _) = netns
        .run(move || {
            let _entered = runtime.enter();
            rtnetlink::new_connection()
        })
        .await?
        .map_err(RoutingError::Socket)?;
    // Ends when the last handle is dropped.
    tokio::spawn(connection);
    Ok(handle)
}

fn rule(handle: &Handle, v6: bool, mark: u32) -> rtnetlink::RuleAddRequest {
    let base =
        handle.rule().add().fw_mark(mark).table_id(TABLE).priority(PRIORITY).action(RuleAction::ToTable);
    let mut request = base.clone();
    // v4()/v6() only set the family; keep the untyped request so both share one shape.
    *request.message_mut() =
        if v6 { base.v6().message_mut().clone() } else { base.v4().message_mut().clone() };
    request
}

fn local_default(v6: bool) -> rtnetlink::packet_route::route::RouteMessage {
    let any = if v6 { IpAddr::V6(Ipv6Addr::UNSPECIFIED) } else { IpAddr::V4(Ipv4Addr::UNSPECIFIED) };
    RouteMessageBuilder::<IpAddr>::new()
        .destination_prefix(any, 0)
        .expect("an unspecified address with prefix 0 is a valid destination")
        .kind(RouteType::Local)
        .scope(RouteScope::Host)
        .table_id(TABLE)
        .output_interface(LOOPBACK)
        .build()
}

async fn add(handle: &Handle, v6: bool, mark: u32) -> Result<(), RoutingError> {
    let family = if v6 { "IPv6" } else { "IPv4" };
    match rule(handle, v6, mark).execute().await {
        Ok(()) => {}
        Err(e) if exists(&e) => {}
        Err(source) => {
            let command = format!("ip rule add fwmark {mark:#x} lookup {TABLE}");
            return Err(RoutingError::Netlink { family, command, source });
        }
    }
    handle.route().add(local_default(v6)).replace().execute().await.map_err(|source| RoutingError::Netlink {
        family,
        command: format!("ip route add local default dev lo table {TABLE}"),
        source,
    })
}

fn exists(e: &rtnetlink::Error) -> bool {
    matches!(e, rtnetlink::Error::NetlinkError(m) if m.raw_code() == -libc::EEXIST)
}
