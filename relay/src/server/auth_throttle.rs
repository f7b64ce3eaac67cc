//! Failed AUTH attempts per client address: slowed after a few, refused without checking
//! after more (SPEC section 5.3), forgotten after a quiet window.

use super::{Authenticator, BoxFuture};
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

    fn failures(&self, ip: IpAddr) -> u32 {
        let Ok(map) = self.failures.lock() else {
            return 0;
        };
        match map.get(&ip) {
            Some((n, last)) if last.elapsed() < self.config.window => *n,
            _ => 0,
        }
    }

    fn record(&self, ip: IpAddr, ok: bool) {
        let Ok(mut map) = self.failures.lock() else {
            return;
        };
        if ok {
            map.remove(&ip);
            return;
        }
        if map.len() >= MAX_TRACKED {
            let window = self.config.window;
            map.retain(|_, (_, last)| last.elapsed() < window);
        }
        let entry = map.entry(ip).or_insert((0, Instant::now()));
        if entry.1.elapsed() >= self.config.window {
            entry.0 = 0;
        }
        entry.0 += 1;
        entry.1 = Instant::now();
    }

    /// Checks credentials for a client, applying the throttle.
    pub fn check<'a>(
        &'a self,
        ip: IpAddr,
        username: &'a str,
        password: &'a str,
        auth: &'a dyn Authenticator,
    ) -> BoxFuture<'a, AuthOutcome> {
        Box::pin(async move {
            let failures = self.failures(ip);
            if failures >= self.config.refuse_after {
                return AuthOutcome::Throttled;
            }
            let ok = auth.check(username, password).await;
            if !ok && failures >= self.config.slow_after {
                // Slow the reply, not the check: an attacker learns nothing earlier.
                tokio::time::sleep(
                    self.config.delay_step * (failures - self.config.slow_after + 1),
                )
                .await;
            }
            self.record(ip, ok);
            if ok {
                AuthOutcome::Accepted
            } else {
                AuthOutcome::Refused
            }
        })
    }
}
