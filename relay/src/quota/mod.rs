//! Sending quotas (SPEC 3.4): which counters a recipient touches, and reserve, settle, release.
//!
//! A recipient is checked at RCPT time against every counter that applies to it: the tenant's
//! recipients per rolling 24 hours and per rolling 10 minutes (every recipient), and, when the
//! envelope sender is one of the tenant's registered users, that user's messages per 24 hours
//! (once per message) and unique recipients per 24 hours. Passing reserves one unit on each
//! counter (a *hold*); the hold is settled into the count when the client is told `250` for the
//! message, and released when the message is refused or deferred, on RSET and on disconnect. A
//! hold expires by itself after [`Quotas::hold_ttl`], so a relay that dies holding reservations
//! does not keep them counted.
//!
//! Windows are rolling, in 24 buckets (1/24 of the window). The counts live in a
//! [`QuotaStore`]: [`memory::MemoryQuotaStore`] for one relay, Redis
//! ([`crate::redis_store::RedisStore`]) for replicas sharing the counts.

pub mod memory;

use crate::delivery::ledger::StoreError;
use crate::metrics::{Metrics, QuotaLabels};
use crate::server::{Admission, BoxFuture};
use crate::smtp::reply::Reply;
use crate::smtp::session::RecipientQuery;
use mailroute_config::RelayConfig;
use mailroute_config::document::Limits;
use mailroute_config::names::Address;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// A rolling window is this many buckets (SPEC 3.4: at most 1/24 of its length).
pub const BUCKETS: u64 = 24;

const DAY: Duration = Duration::from_secs(24 * 3600);
const TEN_MINUTES: Duration = Duration::from_secs(600);

/// The limits of SPEC 3.4.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Limit {
    UserMessagesPerDay,
    UserUniqueRecipientsPerDay,
    CustomerRecipientsPerDay,
    CustomerRecipientsPer10Minutes,
}

impl Limit {
    /// The `limit` label of `mailroute_relay_quota_rejections_total`.
    pub fn as_str(self) -> &'static str {
        match self {
            Limit::UserMessagesPerDay => "user_messages_per_day",
            Limit::UserUniqueRecipientsPerDay => "user_unique_recipients_per_day",
            Limit::CustomerRecipientsPerDay => "customer_recipients_per_day",
            Limit::CustomerRecipientsPer10Minutes => "customer_recipients_per_10_minutes",
        }
    }

    /// The reply when the limit is reached (the hosted suite's wording).
    pub fn reply(self) -> Reply {
        match self {
            Limit::UserMessagesPerDay | Limit::UserUniqueRecipientsPerDay => {
                Reply::new(550, "5.4.5", "Daily SMTP relay limit exceeded for user")
            }
            Limit::CustomerRecipientsPerDay => {
                Reply::new(550, "5.7.1", "Daily SMTP relay limit exceeded for customer")
            }
            Limit::CustomerRecipientsPer10Minutes => {
                Reply::new(450, "4.2.1", "Peak SMTP relay limit exceeded for customer")
            }
        }
    }
}

/// One counter a recipient is checked against.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Counter {
    pub limit: Limit,
    /// The counter's name in the store; the tenant's part is in braces (a Redis hash tag, so
    /// a tenant's counters live together).
    pub key: String,
    pub max: u64,
    pub window: Duration,
    /// For unique counting: the recipient, lowercased. A recipient already counted in the
    /// window does not count again.
    pub member: Option<String>,
    /// `false`: counted but never refused (tenant limits for registered users, unless the
    /// tenant blocks all senders on its limit).
    pub enforce: bool,
}

impl Counter {
    /// Length of one bucket of the rolling window.
    pub fn bucket(&self) -> Duration {
        self.window / BUCKETS as u32
    }
}

/// What one recipient reserved: settled into the counts or released when its transaction ends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hold {
    pub id: String,
    pub counters: Vec<Counter>,
    /// Per counter: whether a unit was reserved (a unique recipient already counted reserves
    /// nothing).
    pub reserved: Vec<bool>,
}

/// A store's answer to a reservation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reservation {
    /// Per counter, whether a unit was reserved.
    Granted(Vec<bool>),
    /// The counter at this index is at its limit; nothing was reserved.
    Exceeded(usize),
}

/// Where the counts live. Every call is atomic: a reservation checks and reserves on all its
/// counters at once, or on none.
pub trait QuotaStore: Send + Sync + 'static {
    /// Reserves one unit on each counter unless one is at its limit (counting what is settled
    /// in the window and what other holds reserve). The hold expires after `ttl`.
    fn reserve<'a>(
        &'a self,
        hold: &'a str,
        counters: &'a [Counter],
        ttl: Duration,
    ) -> BoxFuture<'a, Result<Reservation, StoreError>>;
    /// Ends holds: settled into the counts when `accepted`, otherwise dropped.
    fn finish<'a>(
        &'a self,
        holds: &'a [Hold],
        accepted: bool,
    ) -> BoxFuture<'a, Result<(), StoreError>>;
}

#[derive(Debug)]
struct TenantQuota {
    limits: Limits,
    /// Registered users, lowercased (local parts compared without case, as mail systems do).
    users: HashSet<String>,
}

/// Quota decisions for a configuration.
pub struct Quotas {
    tenants: HashMap<String, TenantQuota>,
    store: Arc<dyn QuotaStore>,
    metrics: Arc<Metrics>,
    /// How long a reservation lives without being settled or released.
    pub hold_ttl: Duration,
    /// Longest wait for the store before it counts as unavailable.
    pub store_timeout: Duration,
    /// `--store-failure open`: accept when the store cannot answer.
    pub store_failure_open: bool,
}

impl std::fmt::Debug for Quotas {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Quotas")
            .field("tenants", &self.tenants.len())
            .field("hold_ttl", &self.hold_ttl)
            .finish()
    }
}

/// Distinguishes this process's holds from other replicas' in a shared store.
fn hold_id(transaction: &str) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    static NONCE: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    let nonce = NONCE.get_or_init(|| {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or_default();
        nanos ^ u64::from(std::process::id()).rotate_left(40)
    });
    format!(
        "{nonce:x}:{transaction}:{}",
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

impl Quotas {
    pub fn new(config: &RelayConfig, store: Arc<dyn QuotaStore>, metrics: Arc<Metrics>) -> Self {
        let tenants = config
            .tenants
            .iter()
            .map(|(name, t)| {
                (
                    name.clone(),
                    TenantQuota {
                        limits: t.limits.clone(),
                        users: t
                            .users
                            .iter()
                            .map(|u| u.to_string().to_ascii_lowercase())
                            .collect(),
                    },
                )
            })
            .collect();
        Self {
            tenants,
            store,
            metrics,
            hold_ttl: Duration::from_secs(900),
            store_timeout: Duration::from_secs(2),
            store_failure_open: false,
        }
    }

    /// The counters a recipient touches (pure: SPEC 3.4's counting rules). Empty when the
    /// session is bound to no tenant (inbound mail from the Internet is not relayed mail).
    pub fn counters(&self, query: &RecipientQuery) -> Vec<Counter> {
        let Some((name, tenant)) = query
            .tenant
            .as_deref()
            .and_then(|n| self.tenants.get_key_value(n))
        else {
            return Vec::new();
        };
        counters(name, &tenant.limits, &tenant.users, query)
    }

    /// Checks one recipient and reserves for it.
    pub async fn admit(&self, query: &RecipientQuery) -> Admission {
        let counters = self.counters(query);
        if counters.is_empty() {
            return Admission {
                verdict: Ok(()),
                hold: None,
            };
        }
        let id = hold_id(&query.transaction);
        let answer = tokio::time::timeout(
            self.store_timeout,
            self.store.reserve(&id, &counters, self.hold_ttl),
        )
        .await
        .unwrap_or_else(|_| Err(StoreError("timed out".to_owned())));
        match answer {
            Ok(Reservation::Granted(reserved)) => Admission {
                verdict: Ok(()),
                hold: Some(Hold {
                    id,
                    counters,
                    reserved,
                }),
            },
            Ok(Reservation::Exceeded(i)) => {
                let limit = counters
                    .get(i)
                    .map_or(Limit::CustomerRecipientsPerDay, |c| c.limit);
                self.metrics
                    .quota_rejections
                    .get_or_create(&QuotaLabels {
                        tenant: query.tenant.as_deref().unwrap_or_default().to_owned(),
                        limit: limit.as_str().to_owned(),
                    })
                    .inc();
                tracing::info!(transaction = %query.transaction, tenant = ?query.tenant, limit = limit.as_str(), "quota reached");
                Admission {
                    verdict: Err(limit.reply()),
                    hold: None,
                }
            }
            Err(e) => {
                self.metrics.store_errors.inc();
                tracing::warn!(transaction = %query.transaction, error = %e, open = self.store_failure_open, "quota store unavailable");
                let verdict = if self.store_failure_open {
                    Ok(())
                } else {
                    Err(Reply::store_unavailable())
                };
                Admission {
                    verdict,
                    hold: None,
                }
            }
        }
    }

    /// Settles or releases holds. A failure here is logged: a release that fails expires with
    /// its hold; a settlement that fails under-counts (it cannot be retried without risking a
    /// double count).
    pub async fn finish(&self, holds: Vec<Hold>, accepted: bool) {
        if holds.is_empty() {
            return;
        }
        let result = tokio::time::timeout(self.store_timeout, self.store.finish(&holds, accepted))
            .await
            .unwrap_or_else(|_| Err(StoreError("timed out".to_owned())));
        if let Err(e) = result {
            self.metrics.store_errors.inc();
            tracing::warn!(error = %e, accepted, holds = holds.len(), "quota store: ending holds failed");
        }
    }
}

/// SPEC 3.4's counting rules for one recipient of a session bound to tenant `name`.
pub fn counters(
    name: &str,
    limits: &Limits,
    users: &HashSet<String>,
    query: &RecipientQuery,
) -> Vec<Counter> {
    let registered = query
        .sender
        .parse::<Address>()
        .ok()
        .map(|a| a.to_string().to_ascii_lowercase())
        .filter(|a| users.contains(a));
    let mut out = Vec::with_capacity(4);
    if let Some(user) = &registered {
        if query.accepted == 0 {
            out.push(Counter {
                limit: Limit::UserMessagesPerDay,
                key: format!("{{{name}}}:user:{user}:messages"),
                max: limits.per_user_messages_per_day,
                window: DAY,
                member: None,
                enforce: true,
            });
        }
        out.push(Counter {
            limit: Limit::UserUniqueRecipientsPerDay,
            key: format!("{{{name}}}:user:{user}:recipients"),
            max: limits.per_user_unique_recipients_per_day,
            window: DAY,
            member: Some(query.recipient.to_ascii_lowercase()),
            enforce: true,
        });
    }
    // NB: a tenant limit refuses senders that are not registered users (devices, applications,
    // senders identified by EHLO); registered users are held to their own limits unless the
    // tenant blocks all senders on its limit. Their recipients count towards it either way.
    let enforce = limits.block_all_senders_on_customer_limit || registered.is_none();
    out.push(Counter {
        limit: Limit::CustomerRecipientsPerDay,
        key: format!("{{{name}}}:customer:day"),
        max: limits.per_customer_recipients_per_day,
        window: DAY,
        member: None,
        enforce,
    });
    out.push(Counter {
        limit: Limit::CustomerRecipientsPer10Minutes,
        key: format!("{{{name}}}:customer:10m"),
        max: limits.per_customer_recipients_per_10_minutes,
        window: TEN_MINUTES,
        member: None,
        enforce,
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query(sender: &str, recipient: &str, accepted: usize) -> RecipientQuery {
        RecipientQuery {
            transaction: "s.1".into(),
            tenant: Some(Arc::from("acme")),
            sender: sender.into(),
            recipient: recipient.into(),
            accepted,
        }
    }

    fn limits(block_all: bool) -> Limits {
        Limits {
            per_user_messages_per_day: 10_000,
            per_user_unique_recipients_per_day: 130,
            per_customer_recipients_per_day: 100,
            per_customer_recipients_per_10_minutes: 50,
            block_all_senders_on_customer_limit: block_all,
        }
    }

    fn users() -> HashSet<String> {
        ["alice@acme.example".to_owned()].into_iter().collect()
    }

    fn kinds(counters: &[Counter]) -> Vec<(Limit, bool)> {
        counters.iter().map(|c| (c.limit, c.enforce)).collect()
    }

    #[test]
    fn a_registered_user_counts_the_message_once_and_each_recipient_uniquely() {
        let first = counters(
            "acme",
            &limits(false),
            &users(),
            &query("Alice@acme.example", "Bob@Other.example", 0),
        );
        assert_eq!(
            kinds(&first),
            vec![
                (Limit::UserMessagesPerDay, true),
                (Limit::UserUniqueRecipientsPerDay, true),
                (Limit::CustomerRecipientsPerDay, false),
                (Limit::CustomerRecipientsPer10Minutes, false),
            ]
        );
        assert_eq!(first[1].member.as_deref(), Some("bob@other.example"));
        let second = counters(
            "acme",
            &limits(false),
            &users(),
            &query("alice@acme.example", "carol@other.example", 1),
        );
        assert_eq!(second[0].limit, Limit::UserUniqueRecipientsPerDay);
        assert_eq!(second.len(), 3);
    }

    #[test]
    fn other_senders_have_no_user_limits_and_meet_the_tenant_limits() {
        let c = counters(
            "acme",
            &limits(false),
            &users(),
            &query("app@acme.example", "bob@other.example", 0),
        );
        assert_eq!(
            kinds(&c),
            vec![
                (Limit::CustomerRecipientsPerDay, true),
                (Limit::CustomerRecipientsPer10Minutes, true),
            ]
        );
        assert_eq!(c[1].max, 50);
        assert_eq!(c[1].bucket(), Duration::from_secs(25));
        assert_eq!(c[0].bucket(), Duration::from_secs(3600));
    }

    #[test]
    fn blocking_all_senders_enforces_tenant_limits_on_registered_users() {
        let c = counters(
            "acme",
            &limits(true),
            &users(),
            &query("alice@acme.example", "bob@other.example", 3),
        );
        assert_eq!(
            kinds(&c),
            vec![
                (Limit::UserUniqueRecipientsPerDay, true),
                (Limit::CustomerRecipientsPerDay, true),
                (Limit::CustomerRecipientsPer10Minutes, true),
            ]
        );
    }

    #[test]
    fn the_replies_are_the_hosted_suites() {
        assert_eq!(
            Limit::UserUniqueRecipientsPerDay.reply().to_string(),
            "550 5.4.5 Daily SMTP relay limit exceeded for user"
        );
        assert_eq!(
            Limit::CustomerRecipientsPerDay.reply().to_string(),
            "550 5.7.1 Daily SMTP relay limit exceeded for customer"
        );
        assert_eq!(
            Limit::CustomerRecipientsPer10Minutes.reply().to_string(),
            "450 4.2.1 Peak SMTP relay limit exceeded for customer"
        );
    }
}
