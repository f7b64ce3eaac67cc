//! Upstream connections kept open and reused across messages (SPEC 3.1 `connectionPool`): at
//! most `maxConnections` per route in this process (in use or idle), at most
//! `maxMessagesPerConnection` messages each, closed after `idleTimeout` unused.

use super::pacing::Lease;
use super::upstream::Upstream;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Connections are shared only between legs that agree on all of this.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PoolKey {
    pub route: Arc<str>,
    pub addr: SocketAddr,
    /// The connection must be encrypted (route policy or a rule's `requireTLS`).
    pub tls_required: bool,
    /// Opened with the certificate checked for the host's name (an `enforce` MTA-STS policy).
    pub verified: bool,
}

/// A connection with the permit that counts it against its route's `maxConnections`.
#[derive(Debug)]
pub struct Pooled {
    pub upstream: Upstream,
    /// Taken from the pool rather than opened for this leg: it may have been closed by the
    /// upstream meanwhile.
    pub reused: bool,
    _permit: OwnedSemaphorePermit,
    /// Its place in the route's `maxConcurrentConnections` over every replica (boxed: only
    /// connections of such routes have one).
    lease: Option<Box<Lease>>,
}

impl Pooled {
    /// The connection lost its lease on the route's connection limit: not to be reused.
    fn unleased(&self) -> bool {
        self.lease.as_ref().is_some_and(|l| l.is_lost())
    }
}

/// The pool's settings for one route.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub max_messages: u32,
    pub idle_timeout: Duration,
}

#[derive(Debug, Default)]
pub struct Pool {
    idle: Mutex<HashMap<PoolKey, Vec<Pooled>>>,
    /// Woken when a connection goes back to the pool: a leg waiting for a slot can reuse it.
    returned: tokio::sync::Notify,
}

/// A way to run a transaction on a route: a pooled connection, or a slot to open one.
#[derive(Debug)]
pub enum Checkout {
    Reused(Pooled),
    Fresh(OwnedSemaphorePermit),
}

/// Why no connection slot could be had.
#[derive(Debug, thiserror::Error)]
#[error("all {max} connections of route {route} are busy")]
pub struct Busy {
    pub route: Arc<str>,
    pub max: u32,
}

impl Pool {
    /// An idle connection for `key`, if one is fresh enough. Stale ones are closed.
    pub fn take(&self, key: &PoolKey, limits: Limits) -> Option<Pooled> {
        let mut stale = Vec::new();
        let found = {
            let Ok(mut idle) = self.idle.lock() else {
                return None;
            };
            let list = idle.get_mut(key)?;
            let mut found = None;
            while let Some(mut conn) = list.pop() {
                if conn.upstream.idle_since.elapsed() < limits.idle_timeout && !conn.unleased() {
                    conn.reused = true;
                    found = Some(conn);
                    break;
                }
                stale.push(conn);
            }
            found
        };
        close_all(stale);
        found
    }

    /// A connection for `key`: an idle one (when `reuse`), else a slot to open one: a free
    /// slot, else one freed by closing an idle connection of the route to another host (or
    /// to this host, when a fresh connection is wanted), else whichever comes first within
    /// `wait`: a connection given back to the pool or a slot set free.
    pub async fn checkout(
        &self,
        key: &PoolKey,
        limits: Limits,
        permits: &Arc<Semaphore>,
        max: u32,
        wait: Duration,
        reuse: bool,
    ) -> Result<Checkout, Busy> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            // NB: registered before looking, so a connection given back meanwhile wakes us.
            let returned = self.returned.notified();
            tokio::pin!(returned);
            returned.as_mut().enable();
            if reuse && let Some(conn) = self.take(key, limits) {
                return Ok(Checkout::Reused(conn));
            }
            if let Ok(p) = Arc::clone(permits).try_acquire_owned() {
                return Ok(Checkout::Fresh(p));
            }
            let victim = self.idle.lock().ok().and_then(|mut idle| {
                idle.iter_mut()
                    .filter(|(k, list)| {
                        k.route == key.route && (!reuse || *k != key) && !list.is_empty()
                    })
                    .find_map(|(_, list)| list.pop())
            });
            if let Some(conn) = victim {
                close_now(conn);
                if let Ok(p) = Arc::clone(permits).try_acquire_owned() {
                    return Ok(Checkout::Fresh(p));
                }
            }
            tokio::select! {
                p = Arc::clone(permits).acquire_owned() => {
                    return p.map(Checkout::Fresh).map_err(|_| Busy {
                        route: Arc::clone(&key.route),
                        max,
                    });
                }
                () = &mut returned => {}
                () = tokio::time::sleep_until(deadline) => {
                    return Err(Busy {
                        route: Arc::clone(&key.route),
                        max,
                    });
                }
            }
        }
    }

    /// A connection for `key` given back to the pool within `wait`, if one is.
    pub async fn returned_within(
        &self,
        key: &PoolKey,
        limits: Limits,
        wait: Duration,
    ) -> Option<Pooled> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let returned = self.returned.notified();
            tokio::pin!(returned);
            returned.as_mut().enable();
            if let Some(conn) = self.take(key, limits) {
                return Some(conn);
            }
            tokio::select! {
                () = &mut returned => {}
                () = tokio::time::sleep_until(deadline) => return None,
            }
        }
    }

    pub fn wrap(upstream: Upstream, permit: OwnedSemaphorePermit, lease: Option<Lease>) -> Pooled {
        Pooled {
            upstream,
            reused: false,
            _permit: permit,
            lease: lease.map(Box::new),
        }
    }

    /// Gives a connection back after a transaction; closes it when it is spent or broken.
    pub fn put(&self, key: PoolKey, conn: Pooled, limits: Limits) {
        if conn.upstream.poisoned {
            return;
        }
        if conn.unleased() {
            close_all(vec![conn]);
            return;
        }
        if conn.upstream.messages >= limits.max_messages {
            close_all(vec![conn]);
            return;
        }
        if let Ok(mut idle) = self.idle.lock() {
            idle.entry(key).or_default().push(conn);
        }
        self.returned.notify_waiters();
    }

    /// Closes connections idle longer than their route allows (`idle_timeout` per route name).
    pub fn sweep(&self, idle_timeout: impl Fn(&str) -> Duration) {
        let mut stale = Vec::new();
        if let Ok(mut idle) = self.idle.lock() {
            for (key, list) in idle.iter_mut() {
                let limit = idle_timeout(&key.route);
                let (old, fresh): (Vec<_>, Vec<_>) = list
                    .drain(..)
                    .partition(|c| c.upstream.idle_since.elapsed() >= limit);
                *list = fresh;
                stale.extend(old);
            }
            idle.retain(|_, list| !list.is_empty());
        }
        close_all(stale);
    }

    /// Idle connections, for tests and metrics.
    pub fn idle_count(&self) -> usize {
        self.idle
            .lock()
            .map(|idle| idle.values().map(Vec::len).sum())
            .unwrap_or(0)
    }
}

/// Frees the connection's slot at once and QUITs it in the background.
fn close_now(conn: Pooled) {
    let Pooled {
        upstream,
        _permit,
        lease,
        ..
    } = conn;
    drop(_permit);
    drop(lease);
    if let Ok(handle) = tokio::runtime::Handle::try_current() {
        handle.spawn(async move {
            let _ = tokio::time::timeout(Duration::from_secs(5), upstream.quit()).await;
        });
    }
}

/// QUITs connections in the background (their permits are released when they are dropped).
fn close_all(conns: Vec<Pooled>) {
    if conns.is_empty() {
        return;
    }
    if let Ok(handle) = tokio::runtime::Handle::try_current() {
        handle.spawn(async move {
            for conn in conns {
                let _ = tokio::time::timeout(Duration::from_secs(5), conn.upstream.quit()).await;
            }
        });
    }
}
