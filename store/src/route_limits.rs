//! The counters of a route's `rateLimits` (SPEC 11): named once here, so the relay reserves on
//! the same keys the operator reads for the route's status. The counts belong to the route
//! (`{route:NAME}`), or with `per: Credential` to the user name it logs in as
//! (`{credential:USER}`, lowercased), every route using it sharing them; the braces are the
//! Redis hash tag, so one scope's counters live in one Cluster slot.

use crate::{Counter, Limit};
use mailroute_config::resources::{RateLimitScope, RateLimits};
use std::time::Duration;

const MINUTE: Duration = Duration::from_secs(60);
const DAY: Duration = Duration::from_secs(24 * 3600);

/// What route `name`'s limits are counted for: the route, or `username` (the credential it
/// logs in as) when `per: Credential` says so; without a user name they stay the route's.
pub fn scope(name: &str, limits: &RateLimits, username: Option<&str>) -> String {
    match (limits.per, username) {
        (RateLimitScope::Credential, Some(user)) => {
            format!("credential:{}", user.to_ascii_lowercase())
        }
        _ => format!("route:{name}"),
    }
}

fn counter(scope: &str, limit: Limit, max: u32, window: Duration) -> Counter {
    Counter {
        limit,
        key: format!("{{{scope}}}:rate:{}", limit.as_str()),
        max: u64::from(max),
        window,
        member: None,
        enforce: true,
    }
}

/// The counters one recipient reserves on: the `first` of a message also on the message
/// counter.
pub fn recipient_counters(scope: &str, limits: &RateLimits, first: bool) -> Vec<Counter> {
    let mut out = Vec::with_capacity(3);
    if first && let Some(max) = limits.messages_per_minute {
        out.push(counter(scope, Limit::RouteMessagesPerMinute, max, MINUTE));
    }
    if let Some(max) = limits.recipients_per_minute {
        out.push(counter(scope, Limit::RouteRecipientsPerMinute, max, MINUTE));
    }
    if let Some(max) = limits.recipients_per_day {
        out.push(counter(scope, Limit::RouteRecipientsPerDay, max, DAY));
    }
    out
}

/// The counter of connections open at once (leases only, never settled).
pub fn connection_counter(scope: &str, limits: &RateLimits) -> Option<Counter> {
    limits
        .max_concurrent_connections
        .map(|max| counter(scope, Limit::RouteConcurrentConnections, max, MINUTE))
}

/// Every counter of the limits, for reading their use.
pub fn all_counters(scope: &str, limits: &RateLimits) -> Vec<Counter> {
    let mut out = recipient_counters(scope, limits, true);
    out.extend(connection_counter(scope, limits));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_holds_its_counter_once_and_each_recipient_its_own() {
        let limits = RateLimits {
            messages_per_minute: Some(30),
            recipients_per_day: Some(10_000),
            ..RateLimits::default()
        };
        let scope = scope("m365", &limits, Some("Mailer@Contoso.com"));
        let keys = |c: &[Counter]| c.iter().map(|c| c.key.clone()).collect::<Vec<_>>();
        let first = recipient_counters(&scope, &limits, true);
        assert_eq!(
            keys(&first),
            [
                "{route:m365}:rate:messages_per_minute",
                "{route:m365}:rate:recipients_per_day"
            ]
        );
        assert_eq!(
            keys(&recipient_counters(&scope, &limits, false)),
            ["{route:m365}:rate:recipients_per_day"]
        );
        assert_eq!(first[0].window, MINUTE);
    }

    #[test]
    fn limits_per_credential_are_shared_by_every_route_logging_in_as_the_same_user() {
        let limits = RateLimits {
            messages_per_minute: Some(30),
            max_concurrent_connections: Some(3),
            per: RateLimitScope::Credential,
            ..RateLimits::default()
        };
        let a = scope("m365-sales", &limits, Some("Mailer@Contoso.com"));
        let b = scope("m365-support", &limits, Some("mailer@contoso.com"));
        assert_eq!(a, b);
        assert_eq!(
            recipient_counters(&a, &limits, true)[0].key,
            "{credential:mailer@contoso.com}:rate:messages_per_minute"
        );
        assert_eq!(
            connection_counter(&a, &limits).map(|c| (c.key, c.max)),
            Some((
                "{credential:mailer@contoso.com}:rate:concurrent_connections".to_owned(),
                3
            ))
        );
        assert_eq!(all_counters(&a, &limits).len(), 2);
        // Without a credential the limits stay the route's own.
        assert_eq!(scope("plain", &limits, None), "route:plain");
    }
}
