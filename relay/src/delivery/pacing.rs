//! A route's sending limits (SPEC 11, `MailRoute.rateLimits`): messages and recipients per
//! rolling minute, recipients per rolling day and connections open at once, kept by every
//! replica together in the shared store, so three relays never send a provider more than its
//! published limits. The counts belong to the route, or, with `per: Credential`, to the user
//! name it authenticates as (every route logging in as that mailbox shares them).
//!
//! - Before a leg is tried, each of its recipients reserves one unit on the recipient
//!   counters, and the first also one on the message counter, in the quota store's atomic
//!   reservations (gathered into one script with Redis). One at its limit: what was reserved
//!   is released, the leg is not tried, and it fails with `451 4.4.5` naming the route and the
//!   limit (a required leg's client retries; a best-effort copy is counted as deferred).
//! - When the attempt ends, what the upstream accepted is settled into the counts (the
//!   message, the recipients it took); the rest is released. A relay that dies in between
//!   loses its holds when they expire.
//! - A connection opened to a route with `maxConcurrentConnections` holds a [`Lease`] on the
//!   connection counter for as long as it is open (in use or idle in the pool), renewed in
//!   the background; a relay that dies frees its leases when they expire ([`LEASE_TTL`]).
//! - At RCPT, a recipient whose primary route is already at a limit is refused at once
//!   ([`Pacing::check`]): the client does not send a message that could not be delivered.
//! - The store not answering: `451 4.3.0`, or, with `--store-failure open`, the leg is tried
//!   uncounted (as quotas do, SPEC 5.3a). At RCPT the check is skipped (the reservation at
//!   the end of data decides).

use crate::metrics::{Metrics, RateLimitLabels};
use crate::quota::hold_id;
use crate::reply::Reply;
use crate::store::{Counter, Hold, Limit, QuotaStore, Reservation, StoreError, route_limits};
use mailroute_config::resources::RateLimits;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

/// How long a connection's lease lives without renewal: what a relay that dies keeps of a
/// route's connection limit.
pub const LEASE_TTL: Duration = Duration::from_secs(90);
/// How often an open connection renews its lease.
const LEASE_RENEWAL: Duration = Duration::from_secs(30);

/// A route's limits as the relay keeps them.
#[derive(Clone, Debug)]
pub struct Paced {
    /// What the counts belong to, the counters' hash tag: `route:NAME` or
    /// `credential:USER` (lowercased).
    pub scope: Arc<str>,
    pub limits: RateLimits,
    /// Connections this relay has open on the route's connection limit.
    leased: Arc<AtomicUsize>,
}

impl PartialEq for Paced {
    fn eq(&self, other: &Self) -> bool {
        self.scope == other.scope && self.limits == other.limits
    }
}

impl Paced {
    /// The limits of route `name`, counted for the route or for `username` (the credential
    /// it logs in as) as `per` says; without a user name they stay the route's.
    pub fn new(name: &str, limits: &RateLimits, username: Option<&str>) -> Self {
        Self {
            scope: Arc::from(route_limits::scope(name, limits, username)),
            limits: limits.clone(),
            leased: Arc::default(),
        }
    }

    fn connections(&self) -> Option<Counter> {
        route_limits::connection_counter(&self.scope, &self.limits)
    }

    /// Whether this relay has a connection open on the route's connection limit (one that
    /// goes back to the pool is worth waiting for when the limit is reached).
    pub fn holds_leases(&self) -> bool {
        self.leased.load(Ordering::SeqCst) > 0
    }
}

/// Where the routes' counts live, and how long a hold lives unsettled.
pub struct Pacing {
    pub store: Arc<dyn QuotaStore>,
    pub store_timeout: Duration,
    pub hold_ttl: Duration,
    pub store_failure_open: bool,
}

impl std::fmt::Debug for Pacing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pacing")
            .field("store_timeout", &self.store_timeout)
            .field("store_failure_open", &self.store_failure_open)
            .finish_non_exhaustive()
    }
}

/// What one attempt holds (settled or released by [`Pacing::end`]).
#[derive(Debug, Default)]
pub struct Held {
    /// One per recipient, in the leg's order; the first also holds the message.
    holds: Vec<Hold>,
}

/// The counters of the `first` recipient of a message, or of the others.
pub fn counters(paced: &Paced, first: bool) -> Vec<Counter> {
    route_limits::recipient_counters(&paced.scope, &paced.limits, first)
}

/// What the client hears when `route` is at `limit`.
pub fn at_limit(route: &str, limit: Limit, max: u64) -> Reply {
    let what = match limit {
        Limit::RouteMessagesPerMinute => format!("{max} messages a minute"),
        Limit::RouteRecipientsPerMinute => format!("{max} recipients a minute"),
        Limit::RouteConcurrentConnections => format!("{max} connections at once"),
        _ => format!("{max} recipients a day"),
    };
    Reply::new(
        451,
        "4.4.5",
        format!("Route {route} is at its rate limit ({what}); try again later"),
    )
}

/// Counts a refusal at `limit` and says it to the client.
fn refused(route: &str, limit: Limit, max: u64, metrics: &Metrics) -> Reply {
    metrics
        .route_rate_limited
        .get_or_create(&RateLimitLabels {
            route: route.to_owned(),
            limit: limit.as_str().to_owned(),
        })
        .inc();
    at_limit(route, limit, max)
}

/// An open connection's place in its route's `maxConcurrentConnections`: renewed every
/// [`LEASE_RENEWAL`] while it lives, released when it is dropped.
pub struct Lease {
    hold: Option<Hold>,
    store: Arc<dyn QuotaStore>,
    store_timeout: Duration,
    /// Set when a renewal found the lease gone (it expired while the store was away): the
    /// connection must not be reused, another relay may hold its place.
    lost: Arc<AtomicBool>,
    renewer: tokio::task::JoinHandle<()>,
    open: Arc<AtomicUsize>,
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease")
            .field("lost", &self.is_lost())
            .finish_non_exhaustive()
    }
}

impl Lease {
    fn start(
        hold: Hold,
        store: Arc<dyn QuotaStore>,
        store_timeout: Duration,
        open: Arc<AtomicUsize>,
    ) -> Self {
        open.fetch_add(1, Ordering::SeqCst);
        let lost = Arc::new(AtomicBool::new(false));
        let renewer = {
            let (hold, store, lost) = (hold.clone(), Arc::clone(&store), Arc::clone(&lost));
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(LEASE_RENEWAL);
                tick.tick().await;
                loop {
                    tick.tick().await;
                    match tokio::time::timeout(store_timeout, store.renew(&hold, LEASE_TTL)).await {
                        Ok(Ok(true)) => {}
                        Ok(Ok(false)) => {
                            tracing::warn!(hold = %hold.id, "connection lease expired; the connection will not be reused");
                            lost.store(true, Ordering::SeqCst);
                            return;
                        }
                        Ok(Err(e)) => {
                            tracing::warn!(error = %e, "renewing a connection lease failed; retrying")
                        }
                        Err(_) => tracing::warn!("renewing a connection lease timed out; retrying"),
                    }
                }
            })
        };
        Self {
            hold: Some(hold),
            store,
            store_timeout,
            lost,
            renewer,
            open,
        }
    }

    /// The lease expired under the connection: close it rather than reuse it.
    pub fn is_lost(&self) -> bool {
        self.lost.load(Ordering::SeqCst)
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.renewer.abort();
        self.open.fetch_sub(1, Ordering::SeqCst);
        let Some(hold) = self.hold.take() else {
            return;
        };
        let (store, timeout) = (Arc::clone(&self.store), self.store_timeout);
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(async move {
                if let Ok(Err(e)) | Err(e) = tokio::time::timeout(timeout, store.finish(&[hold], false))
                    .await
                    .map_err(|_| StoreError("timed out".to_owned()))
                {
                    tracing::warn!(error = %e, "releasing a connection lease failed; it expires by itself");
                }
            });
        }
    }
}

impl Pacing {
    /// Reserves for a leg of `recipients` to `route`, or says why it may not be tried.
    pub async fn admit(
        &self,
        route: &str,
        paced: &Paced,
        recipients: usize,
        transaction: &str,
        metrics: &Metrics,
    ) -> Result<Held, Reply> {
        let asks: Vec<(String, Vec<Counter>)> = (0..recipients.max(1))
            .map(|i| (hold_id(transaction), counters(paced, i == 0)))
            .filter(|(_, c)| !c.is_empty())
            .collect();
        let answers = futures_util::future::join_all(asks.iter().map(|(id, counters)| {
            let reserve = self.store.reserve(id, counters, self.hold_ttl);
            async move {
                tokio::time::timeout(self.store_timeout, reserve)
                    .await
                    .unwrap_or_else(|_| Err(StoreError("timed out".to_owned())))
            }
        }))
        .await;
        let mut held = Held::default();
        let mut refusal = None;
        for ((id, counters), answer) in asks.into_iter().zip(answers) {
            match answer {
                Ok(Reservation::Granted(reserved)) => held.holds.push(Hold {
                    id,
                    counters,
                    reserved,
                }),
                Ok(Reservation::Exceeded(i)) => {
                    if refusal.is_none()
                        && let Some(c) = counters.get(i)
                    {
                        refusal = Some((c.limit, c.max));
                    }
                }
                Err(e) => {
                    metrics.store_errors.inc();
                    tracing::warn!(%transaction, %route, error = %e, open = self.store_failure_open, "rate limit store unavailable");
                    if !self.store_failure_open {
                        self.end(held, 0).await;
                        return Err(Reply::store_unavailable());
                    }
                }
            }
        }
        match refusal {
            None => Ok(held),
            Some((limit, max)) => {
                self.end(held, 0).await;
                tracing::info!(%transaction, %route, limit = limit.as_str(), "route at its rate limit; leg not tried");
                Err(refused(route, limit, max, metrics))
            }
        }
    }

    /// At RCPT: whether the route is already at one of its limits for another message, so
    /// the recipient is refused before the client sends the message. Reads only; the store
    /// not answering passes (the reservation at the end of data decides).
    pub async fn check(&self, route: &str, paced: &Paced, metrics: &Metrics) -> Result<(), Reply> {
        let counters = counters(paced, true);
        if counters.is_empty() {
            return Ok(());
        }
        let usage =
            match tokio::time::timeout(self.store_timeout, self.store.usage(&counters)).await {
                Ok(Ok(usage)) => usage,
                Ok(Err(e)) => {
                    metrics.store_errors.inc();
                    tracing::debug!(%route, error = %e, "rate limit store unavailable at RCPT");
                    return Ok(());
                }
                Err(_) => return Ok(()),
            };
        match counters.iter().zip(usage).find(|(c, used)| *used >= c.max) {
            Some((c, _)) => Err(refused(route, c.limit, c.max, metrics)),
            None => Ok(()),
        }
    }

    /// A connection's lease on the route's `maxConcurrentConnections`, held until it is
    /// dropped (`None`: the route has no such limit, or the store is away and
    /// `--store-failure open`).
    pub async fn lease(
        &self,
        route: &str,
        paced: &Paced,
        metrics: &Metrics,
    ) -> Result<Option<Lease>, Reply> {
        let open = Arc::clone(&paced.leased);
        let Some(counter) = paced.connections() else {
            return Ok(None);
        };
        let id = hold_id(&paced.scope);
        let counters = vec![counter];
        let reserve = self.store.reserve(&id, &counters, LEASE_TTL);
        let answer = tokio::time::timeout(self.store_timeout, reserve).await;
        let max = counters.first().map_or(0, |c| c.max);
        match answer {
            Ok(Ok(Reservation::Granted(reserved))) => Ok(Some(Lease::start(
                Hold {
                    id,
                    counters,
                    reserved,
                },
                Arc::clone(&self.store),
                self.store_timeout,
                open,
            ))),
            Ok(Ok(Reservation::Exceeded(_))) => {
                tracing::info!(%route, max, "route at its connection limit; leg not tried");
                Err(refused(
                    route,
                    Limit::RouteConcurrentConnections,
                    max,
                    metrics,
                ))
            }
            answer => {
                let error = match answer {
                    Ok(Err(e)) => e.to_string(),
                    _ => "timed out".to_owned(),
                };
                metrics.store_errors.inc();
                tracing::warn!(%route, error = %error, open = self.store_failure_open, "rate limit store unavailable for a connection lease");
                if self.store_failure_open {
                    Ok(None)
                } else {
                    Err(Reply::store_unavailable())
                }
            }
        }
    }

    /// Sets the gauges of each of the route's limits: its use now, over every replica, and
    /// its maximum.
    pub async fn observe(&self, route: &str, paced: &Paced, metrics: &Metrics) {
        let counters = route_limits::all_counters(&paced.scope, &paced.limits);
        let Ok(Ok(usage)) =
            tokio::time::timeout(self.store_timeout, self.store.usage(&counters)).await
        else {
            return;
        };
        for (c, used) in counters.iter().zip(usage) {
            let labels = RateLimitLabels {
                route: route.to_owned(),
                limit: c.limit.as_str().to_owned(),
            };
            metrics
                .route_rate_used
                .get_or_create(&labels)
                .set(i64::try_from(used).unwrap_or(i64::MAX));
            metrics
                .route_rate_max
                .get_or_create(&labels)
                .set(i64::try_from(c.max).unwrap_or(i64::MAX));
        }
    }

    /// Ends an attempt that delivered to its first `accepted` recipients' worth: that many
    /// holds (the first with the message) are settled, the rest released.
    pub async fn end(&self, held: Held, accepted: usize) {
        let mut holds = held.holds;
        let released = holds.split_off(accepted.min(holds.len()));
        for (part, settle) in [(holds, true), (released, false)] {
            if part.is_empty() {
                continue;
            }
            let finish = self.store.finish(&part, settle);
            if let Ok(Err(e)) | Err(e) = tokio::time::timeout(self.store_timeout, finish)
                .await
                .map_err(|_| StoreError("timed out".to_owned()))
            {
                tracing::warn!(error = %e, settle, "rate limit store: ending holds failed");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reply_names_the_route_and_the_limit() {
        assert_eq!(
            at_limit("m365", Limit::RouteMessagesPerMinute, 30).to_string(),
            "451 4.4.5 Route m365 is at its rate limit (30 messages a minute); try again later"
        );
        assert_eq!(
            at_limit("m365", Limit::RouteConcurrentConnections, 3).to_string(),
            "451 4.4.5 Route m365 is at its rate limit (3 connections at once); try again later"
        );
    }
}
