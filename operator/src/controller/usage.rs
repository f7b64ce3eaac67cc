//! A route's use of its rate limits (SPEC 11, `MailRoute.rateLimits`) for `status.rateLimits`:
//! read from the shared store the relays count in (the same counters, named by
//! `mailroute_store::route_limits`), never written. Read with each probe of the route.

use mailroute_config::Credentials;
use mailroute_config::document::Route;
use mailroute_config::resources::{RateLimitUsage, RateLimitsStatus};
use mailroute_store::{QuotaStore, route_limits};
use std::time::Duration;

/// How long a read of the store may take before the status is left as it was.
pub const READ_TIMEOUT: Duration = Duration::from_secs(2);

/// The user name route `name` logs in as (what `per: Credential` counts for).
fn username<'a>(name: &str, credentials: &'a Credentials) -> Option<&'a str> {
    credentials
        .routes
        .get(name)
        .map(|account| account.username.as_str())
        .or_else(|| credentials.oauth2.get(name).map(|c| c.username.as_str()))
}

/// Where route `name`'s limits stand, or `None` when it has none or the store did not answer
/// (the status keeps what it last showed).
pub async fn read(
    store: &dyn QuotaStore,
    name: &str,
    route: &Route,
    credentials: &Credentials,
    now: &str,
) -> Option<RateLimitsStatus> {
    let limits = route.rate_limits.as_ref()?;
    let scope = route_limits::scope(name, limits, username(name, credentials));
    let counters = route_limits::all_counters(&scope, limits);
    if counters.is_empty() {
        return None;
    }
    let usage = match tokio::time::timeout(READ_TIMEOUT, store.usage(&counters)).await {
        Ok(Ok(usage)) => usage,
        Ok(Err(e)) => {
            tracing::warn!(route = name, error = %e, "reading the route's rate limits failed");
            return None;
        }
        Err(_) => {
            tracing::warn!(route = name, "reading the route's rate limits timed out");
            return None;
        }
    };
    Some(RateLimitsStatus {
        time: now.to_owned(),
        scope,
        limits: counters
            .iter()
            .zip(usage)
            .map(|(c, used)| RateLimitUsage {
                limit: c.limit.as_str().to_owned(),
                used,
                max: c.max,
            })
            .collect(),
    })
}
