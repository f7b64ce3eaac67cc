//! Upstream connections kept open and reused across messages (SPEC 3.1 `connectionPool`): at
//! most `maxConnections` per route in this process (in use or idle), at most
//! `maxMessagesPerConnection` messages each, closed after `idleTimeout` unused.

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
}

/// A connection with the permit that counts it against its route's `maxConnections`.
#[derive(Debug)]
pub struct Pooled {
    pub upstream: Upstream,
    /// Taken from the pool rather than opened for this leg: it may have been closed by the
    /// upstream meanwhile.
    pub reused: bool,
    _permit: OwnedSemaphorePermit,
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
                if conn.upstream.idle_since.elapsed() < limits.idle_timeout {
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

    /// A permit to open a connection for `key`'s route: a free one, else one freed by closing
    /// an idle connection of the route to another host, else the first to come free within
    /// `wait`.
    pub async fn permit(
        &self,
        key: &PoolKey,
        permits: &Arc<Semaphore>,
        max: u32,
        wait: Duration,
    ) -> Result<OwnedSemaphorePermit, Busy> {
        if let Ok(p) = Arc::clone(permits).try_acquire_owned() {
            return Ok(p);
        }
        let victim = self.idle.lock().ok().and_then(|mut idle| {
            idle.iter_mut()
                .filter(|(k, list)| k.route == key.route && !list.is_empty())
                .find_map(|(_, list)| list.pop())
        });
        if let Some(conn) = victim {
            close_all(vec![conn]);
        }
        tokio::time::timeout(wait, Arc::clone(permits).acquire_owned())
            .await
            .ok()
            .and_then(Result::ok)
            .ok_or_else(|| Busy {
                route: Arc::clone(&key.route),
                max,
            })
    }

    pub fn wrap(upstream: Upstream, permit: OwnedSemaphorePermit) -> Pooled {
        Pooled {
            upstream,
            reused: false,
            _permit: permit,
        }
    }

    /// Gives a connection back after a transaction; closes it when it is spent or broken.
    pub fn put(&self, key: PoolKey, conn: Pooled, limits: Limits) {
        if conn.upstream.poisoned {
            return;
        }
        if conn.upstream.messages >= limits.max_messages {
            close_all(vec![conn]);
            return;
        }
        if let Ok(mut idle) = self.idle.lock() {
            idle.entry(key).or_default().push(conn);
        }
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
