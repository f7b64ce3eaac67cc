//! A route's sending limits (SPEC 11, `MailRoute.rateLimits`): messages and recipients per
//! rolling minute, recipients per rolling day, kept by every replica together in the shared
//! store, so three relays never send a provider more than its published limits.
//!
//! - Before a leg is tried, each of its recipients reserves one unit on the route's recipient
//!   counters, and the first also one on its message counter, in the quota store's atomic
//!   reservations (gathered into one script with Redis). One at its limit: what was reserved
//!   is released, the leg is not tried, and it fails with `451 4.4.5` naming the route and the
//!   limit (a required leg's client retries; a best-effort copy is counted as deferred).
//! - When the attempt ends, what the upstream accepted is settled into the counts (the
//!   message, the recipients it took); the rest is released. A relay that dies in between
//!   loses its holds when they expire.
//! - The store not answering: `451 4.3.0`, or, with `--store-failure open`, the leg is tried
//!   uncounted (as quotas do, SPEC 5.3a).

use crate::metrics::{Metrics, RateLimitLabels};
use crate::quota::hold_id;
use crate::reply::Reply;
use crate::store::{Counter, Hold, Limit, QuotaStore, Reservation, StoreError};
use mailroute_config::resources::RateLimits;
use std::sync::Arc;
use std::time::Duration;

const MINUTE: Duration = Duration::from_secs(60);
const DAY: Duration = Duration::from_secs(24 * 3600);

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

fn counter(route: &str, limit: Limit, max: u32, window: Duration) -> Counter {
    Counter {
        limit,
        key: format!("{{route:{route}}}:rate:{}", limit.as_str()),
        max: u64::from(max),
        window,
        member: None,
        enforce: true,
    }
}

/// The counters of the `first` recipient of a message, or of the others.
pub fn counters(route: &str, limits: &RateLimits, first: bool) -> Vec<Counter> {
    let mut out = Vec::with_capacity(3);
    if first && let Some(max) = limits.messages_per_minute {
        out.push(counter(route, Limit::RouteMessagesPerMinute, max, MINUTE));
    }
    if let Some(max) = limits.recipients_per_minute {
        out.push(counter(route, Limit::RouteRecipientsPerMinute, max, MINUTE));
    }
    if let Some(max) = limits.recipients_per_day {
        out.push(counter(route, Limit::RouteRecipientsPerDay, max, DAY));
    }
    out
}

/// What the client hears when `route` is at `limit`.
pub fn at_limit(route: &str, limit: Limit, max: u64) -> Reply {
    let what = match limit {
        Limit::RouteMessagesPerMinute => format!("{max} messages a minute"),
        Limit::RouteRecipientsPerMinute => format!("{max} recipients a minute"),
        _ => format!("{max} recipients a day"),
    };
    Reply::new(
        451,
        "4.4.5",
        format!("Route {route} is at its rate limit ({what}); try again later"),
    )
}

impl Pacing {
    /// Reserves for a leg of `recipients` to `route`, or says why it may not be tried.
    pub async fn admit(
        &self,
        route: &str,
        limits: &RateLimits,
        recipients: usize,
        transaction: &str,
        metrics: &Metrics,
    ) -> Result<Held, Reply> {
        let asks: Vec<(String, Vec<Counter>)> = (0..recipients.max(1))
            .map(|i| (hold_id(transaction), counters(route, limits, i == 0)))
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
                metrics
                    .route_rate_limited
                    .get_or_create(&RateLimitLabels {
                        route: route.to_owned(),
                        limit: limit.as_str().to_owned(),
                    })
                    .inc();
                tracing::info!(%transaction, %route, limit = limit.as_str(), "route at its rate limit; leg not tried");
                Err(at_limit(route, limit, max))
            }
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
    fn a_message_holds_its_counter_once_and_each_recipient_its_own() {
        let limits = RateLimits {
            messages_per_minute: Some(30),
            recipients_per_minute: None,
            recipients_per_day: Some(10_000),
        };
        let first = counters("m365", &limits, true);
        let later = counters("m365", &limits, false);
        let keys = |c: &[Counter]| c.iter().map(|c| c.key.clone()).collect::<Vec<_>>();
        assert_eq!(
            keys(&first),
            [
                "{route:m365}:rate:messages_per_minute",
                "{route:m365}:rate:recipients_per_day"
            ]
        );
        assert_eq!(keys(&later), ["{route:m365}:rate:recipients_per_day"]);
        assert_eq!(first[0].window, MINUTE);
        assert_eq!(
            at_limit("m365", Limit::RouteMessagesPerMinute, 30).to_string(),
            "451 4.4.5 Route m365 is at its rate limit (30 messages a minute); try again later"
        );
    }
}
