//! DestinationRule `connectionPool.tcp.maxConnections` and `http.http1MaxPendingRequests`,
//! per cluster on this node (Envoy's circuit-breaker thresholds of the same names).
//!
//! Every upstream connection the proxy opens to a cluster holds a [`ConnectionSlot`] for its
//! whole life, idle pooled HTTP/1 connections included. At the limit, an L4 connection is
//! refused; an HTTP request that needs a new connection waits as *pending* (at most
//! `max_pending` of them, beyond which it is refused at once as overflow) until a connection of
//! the cluster closes. Pools are per source workload (each dials from its own netns), so a
//! waiting request would starve behind other workloads' idle connections: it closes one of
//! them instead, as Envoy's single shared pool would have reused it.

use std::{
    sync::{
        Arc, Mutex, Weak,
        atomic::{AtomicU32, Ordering},
    },
    time::Duration,
};

use tokio::sync::Notify;

/// The connections of one cluster, shared across settings changes.
#[derive(Default)]
pub struct ConnectionLimits {
    open: AtomicU32,
    pending: AtomicU32,
    /// A connection closed, or became idle in a pool (a pending request may close it).
    freed: Notify,
    /// Pooled idle HTTP/1 connections of this cluster, any workload's (only tracked while a
    /// limit is set).
    idle: Mutex<Vec<Weak<dyn Evictable>>>,
}

/// Held by an open upstream connection; gives its place back on drop.
pub struct ConnectionSlot(Arc<ConnectionLimits>);

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
        self.0.freed.notify_waiters();
    }
}

/// Why a request gets no connection.
#[derive(Debug)]
pub enum Refused {
    /// `maxConnections` are open (an L4 connection does not wait).
    AtLimit(u32),
    /// `max_pending` requests already wait.
    PendingFull(u32),
    /// It waited this long and no connection closed.
    Waited(Duration),
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refused::AtLimit(max) => write!(f, "{max} connections are open"),
            Refused::PendingFull(max) => write!(f, "{max} requests already wait for a connection"),
            Refused::Waited(d) => write!(f, "no connection became free within {d:?}"),
        }
    }
}

impl std::error::Error for Refused {}

impl Refused {
    /// Whether a connect error is the cluster's connectionPool refusing (not the endpoint's
    /// fault: no other endpoint would be let in either).
    pub fn caused(e: &std::io::Error) -> bool {
        e.get_ref().is_some_and(|inner| inner.is::<Refused>())
    }
}

impl ConnectionLimits {
    pub fn open(&self) -> u32 {
        self.open.load(Ordering::Acquire)
    }

    pub fn pending(&self) -> u32 {
        self.pending.load(Ordering::Acquire)
    }

    /// A place for one more connection, unless `max` are open.
    pub fn try_admit(self: &Arc<Self>, max: Option<u32>) -> Option<ConnectionSlot> {
        let mut now = self.open.load(Ordering::Acquire);
        loop {
            if max.is_some_and(|m| now >= m) {
                return None;
            }
            match self.open.compare_exchange_weak(now, now + 1, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return Some(ConnectionSlot(Arc::clone(self))),
                Err(actual) => now = actual,
            }
        }
    }

    /// A place for one more connection, waiting (as one of at most `max_pending`) up to
    /// `wait` for one to close, and closing an idle pooled one to make room.
    pub async fn admit_waiting(
        self: &Arc<Self>,
        max: Option<u32>,
        max_pending: Option<u32>,
        wait: Duration,
    ) -> Result<ConnectionSlot, Refused> {
        if let Some(slot) = self.try_admit(max) {
            return Ok(slot);
        }
        let pending = self.pending.fetch_add(1, Ordering::AcqRel);
        let _pending = PendingGuard(self);
        if let Some(max_pending) = max_pending
            && pending >= max_pending
        {
            return Err(Refused::PendingFull(max_pending));
        }
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let freed = self.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            if let Some(slot) = self.try_admit(max) {
                return Ok(slot);
            }
            self.evict_idle();
            if tokio::time::timeout_at(deadline, freed).await.is_err() {
                return Err(Refused::Waited(wait));
            }
        }
    }

    /// Tracks a pooled HTTP/1 connection that just became idle, so a pending request can close
    /// it; wakes the pending requests to do so.
    pub fn track_idle(&self, conn: Arc<dyn Evictable>) {
        {
            let mut idle = self.idle.lock().expect("idle lock");
            idle.retain(|w| w.upgrade().is_some_and(|s| s.is_idle()));
            idle.push(Arc::downgrade(&conn));
        }
        if self.pending() > 0 {
            self.freed.notify_waiters();
        }
    }

    /// Closes one idle pooled connection of the cluster, if there is one.
    fn evict_idle(&self) -> bool {
        let mut idle = self.idle.lock().expect("idle lock");
        while let Some(weak) = idle.pop() {
            if let Some(state) = weak.upgrade()
                && state.evict()
            {
                return true;
            }
        }
        false
    }
}

struct PendingGuard<'a>(&'a ConnectionLimits);

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        self.0.pending.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A pooled idle connection that a request waiting for a place may close. Closing must be
/// graceful (a response still streaming on it finishes) and must race safely with its pool
/// handing it out: exactly one of the two wins.
pub trait Evictable: Send + Sync {
    fn is_idle(&self) -> bool;
    /// Closes it if it is still idle; whether it did.
    fn evict(&self) -> bool;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn connections_beyond_the_limit_wait_then_take_a_freed_place() {
        let limits = Arc::new(ConnectionLimits::default());
        let first = limits.try_admit(Some(1)).unwrap();
        assert!(limits.try_admit(Some(1)).is_none());
        // One may wait; a second waiter is over max_pending (1) and refused at once.
        let waiter = {
            let limits = Arc::clone(&limits);
            tokio::spawn(async move { limits.admit_waiting(Some(1), Some(1), Duration::from_secs(5)).await })
        };
        while limits.pending() == 0 {
            tokio::task::yield_now().await;
        }
        let refused = limits.admit_waiting(Some(1), Some(1), Duration::from_secs(5)).await;
        assert!(matches!(refused, Err(Refused::PendingFull(1))));
        drop(first);
        let slot = waiter.await.unwrap().unwrap();
        assert_eq!((limits.open(), limits.pending()), (1, 0));
        drop(slot);
        assert_eq!(limits.open(), 0);
    }

    /// An idle connection for the tests: evicting it drops its slot (the connection closes).
    struct Idle(Mutex<Option<ConnectionSlot>>);

    impl Evictable for Idle {
        fn is_idle(&self) -> bool {
            self.0.lock().unwrap().is_some()
        }
        fn evict(&self) -> bool {
            self.0.lock().unwrap().take().is_some()
        }
    }

    #[tokio::test]
    async fn a_waiting_request_closes_an_idle_pooled_connection() {
        let limits = Arc::new(ConnectionLimits::default());
        let busy = limits.try_admit(Some(1)).unwrap();
        let waiter = {
            let limits = Arc::clone(&limits);
            tokio::spawn(async move { limits.admit_waiting(Some(1), None, Duration::from_secs(5)).await })
        };
        while limits.pending() == 0 {
            tokio::task::yield_now().await;
        }
        // The busy connection goes idle in its pool: the waiter closes it and takes its place.
        let idle: Arc<dyn Evictable> = Arc::new(Idle(Mutex::new(Some(busy))));
        limits.track_idle(Arc::clone(&idle));
        assert!(waiter.await.unwrap().is_ok());
        assert!(!idle.is_idle() && !idle.evict(), "evicted once, never handed out again");
    }

    #[tokio::test]
    async fn without_a_free_place_a_request_waits_no_longer_than_asked() {
        let limits = Arc::new(ConnectionLimits::default());
        let _held = limits.try_admit(Some(1)).unwrap();
        let got = limits.admit_waiting(Some(1), None, Duration::from_millis(50)).await;
        assert!(matches!(got, Err(Refused::Waited(_))));
        assert_eq!(limits.pending(), 0);
    }
}
