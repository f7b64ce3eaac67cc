//! Failed AUTH attempts per client address: slowed after a few, refused without checking
//! after more (SPEC section 5.3), forgotten after a quiet window.
//!
//! An attempt is counted as a failure *before* its password is checked, in the same step that
//! reads the count, and forgiven only when it succeeds: parallel attempts from one address
//! cannot all pass the threshold between a read and a write.

use crate::interfaces::{AuthCheck, Authenticator, BoxFuture};
use crate::smtp::session::AuthOutcome;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Duration;
use tokio::time::Instant;

/// Thresholds of the throttle.
#[derive(Clone, Debug)]
pub struct ThrottleConfig {
    /// Failures after which each further attempt is delayed.
    pub slow_after: u32,
    /// Failures after which attempts are refused without checking.
    pub refuse_after: u32,
    /// Added delay per failure beyond `slow_after`.
    pub delay_step: Duration,
    /// Failures are forgotten this long after the last one.
    pub window: Duration,
}

impl Default for ThrottleConfig {
    fn default() -> Self {
        Self {
            slow_after: 3,
            refuse_after: 10,
            delay_step: Duration::from_secs(1),
            window: Duration::from_secs(15 * 60),
        }
    }
}

/// Counts failures per client address.
#[derive(Debug)]
pub struct AuthThrottle {
    config: ThrottleConfig,
    failures: Mutex<HashMap<IpAddr, (u32, Instant)>>,
}

/// Addresses remembered at most; beyond this, expired entries are pruned first.
const MAX_TRACKED: usize = 100_000;

impl AuthThrottle {
    pub fn new(config: ThrottleConfig) -> Self {
        Self {
            config,
            failures: Mutex::new(HashMap::new()),
        }
    }

    /// Counts an attempt as a failure; returns the failures before it, or `None` when the
    /// address is over the limit (nothing counted, nothing to check).
    fn begin(&self, ip: IpAddr) -> Option<u32> {
        let Ok(mut map) = self.failures.lock() else {
            return None;
        };
        if map.len() >= MAX_TRACKED {
            let window = self.config.window;
            map.retain(|_, (_, last)| last.elapsed() < window);
        }
        let entry = map.entry(ip).or_insert((0, Instant::now()));
        if entry.1.elapsed() >= self.config.window {
            entry.0 = 0;
        }
        if entry.0 >= self.config.refuse_after {
            return None;
        }
        let before = entry.0;
        entry.0 += 1;
        entry.1 = Instant::now();
        Some(before)
    }

    /// Takes back the failure [`Self::begin`] counted: the attempt succeeded, or was never
    /// checked (busy).
    fn forgive(&self, ip: IpAddr, all: bool) {
        let Ok(mut map) = self.failures.lock() else {
            return;
        };
        if all {
            map.remove(&ip);
        } else if let Some(entry) = map.get_mut(&ip) {
            entry.0 = entry.0.saturating_sub(1);
        }
    }

    /// Checks credentials for a client, applying the throttle.
    pub fn check<'a>(
        &'a self,
        ip: IpAddr,
        username: &'a str,
        password: &'a str,
        auth: &'a dyn Authenticator,
    ) -> BoxFuture<'a, AuthOutcome> {
        self.attempt(ip, auth.check(username, password))
    }

    /// Runs one check of a client's credentials (a password, a token), applying the throttle:
    /// not run at all over the limit, its refusal slowed after a few.
    pub fn attempt<'a>(
        &'a self,
        ip: IpAddr,
        check: impl Future<Output = AuthCheck> + Send + 'a,
    ) -> BoxFuture<'a, AuthOutcome> {
        Box::pin(async move {
            let Some(failures) = self.begin(ip) else {
                return AuthOutcome::Throttled;
            };
            match check.await {
                AuthCheck::Accepted => {
                    self.forgive(ip, true);
                    AuthOutcome::Accepted
                }
                AuthCheck::Busy => {
                    self.forgive(ip, false);
                    AuthOutcome::Busy
                }
                AuthCheck::Refused => {
                    if failures >= self.config.slow_after {
                        // Slow the reply, not the check: an attacker learns nothing earlier.
                        tokio::time::sleep(
                            self.config.delay_step * (failures - self.config.slow_after + 1),
                        )
                        .await;
                    }
                    AuthOutcome::Refused
                }
            }
        })
    }
}
