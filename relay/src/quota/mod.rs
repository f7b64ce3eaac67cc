//! Sending quotas (SPEC 3.4): which mail counts, which counters a recipient touches, and
//! reserve, settle, release.
//!
//! Only mail a tenant *sends* counts ([`charged`]): recipients accepted from a session
//! authorised for the tenant (AUTH or an enabled range) whose sender is in the tenant's domains,
//! or that the tenant relays out (its own or a rewritten sender, or the null sender). Inbound
//! mail (external sender, one of the tenant's recipients) never counts and is never refused
//! by a quota, whoever delivers it and whatever it says in EHLO.
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
//! [`QuotaStore`]: [`crate::store::MemoryQuotaStore`] for one relay, Redis
//! ([`crate::store::RedisStore`]) for replicas sharing the counts.

use crate::metrics::{Metrics, QuotaLabels};
use crate::reply::Reply;
pub use crate::store::{BUCKETS, Counter, Hold, Limit, QuotaStore, Reservation, StoreError};
use crate::tenants::{Tenant, TenantId, Tenants};
use mailroute_config::document::Limits;
use mailroute_config::names::{Address, Mailbox};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

const DAY: Duration = Duration::from_secs(24 * 3600);
const TEN_MINUTES: Duration = Duration::from_secs(600);

/// Quota decisions for a configuration.
#[derive(Clone)]
pub struct Quotas {
    store: Arc<dyn QuotaStore>,
    metrics: Arc<Metrics>,
    /// How long a reservation lives without being settled or released.
    pub hold_ttl: Duration,
    /// Longest wait for the store before it counts as unavailable.
    pub store_timeout: Duration,
    /// `--store-failure open`: accept when the store cannot answer.
    pub store_failure_open: bool,
    /// Settlements waiting for the current window to close ([`QuotaStore::settle_window`]).
    settling: Arc<Mutex<Vec<Hold>>>,
}

impl std::fmt::Debug for Quotas {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Quotas")
            .field("hold_ttl", &self.hold_ttl)
            .finish()
    }
}

/// Why a reservation was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exceeded {
    Limit(Limit),
    /// The store could not answer (and `--store-failure` is closed).
    Store,
}

impl Exceeded {
    pub fn reply(self) -> Reply {
        match self {
            Exceeded::Limit(limit) => limit_reply(limit),
            Exceeded::Store => Reply::store_unavailable(),
        }
    }
}

/// The reply when `limit` is reached (the hosted suite's wording).
pub fn limit_reply(limit: Limit) -> Reply {
    match limit {
        Limit::UserMessagesPerDay | Limit::UserUniqueRecipientsPerDay => {
            Reply::new(550, "5.4.5", "Daily SMTP relay limit exceeded for user")
        }
        Limit::CustomerRecipientsPerDay => {
            Reply::new(550, "5.7.1", "Daily SMTP relay limit exceeded for customer")
        }
        Limit::CustomerRecipientsPer10Minutes => {
            Reply::new(450, "4.2.1", "Peak SMTP relay limit exceeded for customer")
        }
        // NB: a route's own reply names it (`crate::delivery::pacing::at_limit`).
        Limit::RouteMessagesPerMinute
        | Limit::RouteRecipientsPerMinute
        | Limit::RouteRecipientsPerDay
        | Limit::RouteConcurrentConnections => Reply::new(
            451,
            "4.4.5",
            "A route is at its rate limit; try again later",
        ),
    }
}

/// Which tenant's quotas a recipient spends, if any (SPEC 3.4, 5.4): the tenant the session is
/// authorised for (`sending`), unless the mail is inbound for it (a sender outside its
/// domains to a recipient inside them).
pub fn charged(
    tenants: &Tenants,
    sending: Option<TenantId>,
    sender: &str,
    recipient: &str,
) -> Option<TenantId> {
    let id = sending?;
    let ours = |address: &str| {
        address
            .parse::<Address>()
            .ok()
            .and_then(|a| tenants.of_address(&a))
            == Some(id)
    };
    let inbound = !ours(sender) && ours(recipient);
    (!inbound).then_some(id)
}

/// Distinguishes this process's holds from other replicas' in a shared store.
pub(crate) fn hold_id(transaction: &str) -> String {
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
    pub fn new(store: Arc<dyn QuotaStore>, metrics: Arc<Metrics>) -> Self {
        Self {
            store,
            metrics,
            hold_ttl: Duration::from_secs(900),
            store_timeout: Duration::from_secs(2),
            store_failure_open: false,
            settling: Arc::default(),
        }
    }

    /// Checks one recipient against `tenant`'s counters and reserves for it. `Ok(None)`: the
    /// store could not answer and `--store-failure open` lets it through uncounted.
    pub async fn reserve(
        &self,
        transaction: &str,
        tenant: &Tenant,
        sender: &str,
        recipient: &str,
        accepted: usize,
    ) -> Result<Option<Hold>, Exceeded> {
        let counters = counters(tenant, sender, recipient, accepted);
        let id = hold_id(transaction);
        let answer = tokio::time::timeout(
            self.store_timeout,
            self.store.reserve(&id, &counters, self.hold_ttl),
        )
        .await
        .unwrap_or_else(|_| Err(StoreError("timed out".to_owned())));
        match answer {
            Ok(Reservation::Granted(reserved)) => Ok(Some(Hold {
                id,
                counters,
                reserved,
            })),
            Ok(Reservation::Exceeded(i)) => {
                let limit = counters
                    .get(i)
                    .map_or(Limit::CustomerRecipientsPerDay, |c| c.limit);
                self.metrics
                    .quota_rejections
                    .get_or_create(&QuotaLabels {
                        tenant: tenant.name.to_string(),
                        limit: limit.as_str().to_owned(),
                    })
                    .inc();
                tracing::info!(%transaction, tenant = %tenant.name, limit = limit.as_str(), "quota reached");
                Err(Exceeded::Limit(limit))
            }
            Err(e) => {
                self.metrics.store_errors.inc();
                tracing::warn!(%transaction, error = %e, open = self.store_failure_open, "quota store unavailable");
                if self.store_failure_open {
                    Ok(None)
                } else {
                    Err(Exceeded::Store)
                }
            }
        }
    }

    /// Settles or releases holds. A failure here is logged: a release that fails expires with
    /// its hold; a settlement that fails under-counts (it cannot be retried without risking a
    /// double count).
    ///
    /// NB: settling is off the client's path: a hold already counts like a settled unit, so
    /// no decision changes while it is in flight, and the client's 250 does not wait a store
    /// round trip. A remote store's settlements are gathered for its
    /// [`QuotaStore::settle_window`] and sent together (one task and one round trip per
    /// window, not per message); a hold on a unique-recipient counter is settled at once. A
    /// release (refused, deferred) is awaited: until it lands, the next transaction's
    /// reservation would still see it.
    pub async fn finish(&self, holds: Vec<Hold>, accepted: bool) {
        if holds.is_empty() {
            return;
        }
        let window = self.store.settle_window();
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return self.settle_or_release(holds, accepted).await;
        };
        if !accepted || window.is_zero() {
            return self.settle_or_release(holds, accepted).await;
        }
        // NB: a unique-recipient counter tells a repeated recipient by the members settled
        // into it; a held one is not among them, so such holds settle at once, the others
        // wait for the window.
        let (now, later): (Vec<Hold>, Vec<Hold>) = holds
            .into_iter()
            .partition(|h| h.counters.iter().any(|c| c.member.is_some()));
        if !now.is_empty() {
            let quotas = self.clone();
            runtime.spawn(async move { quotas.settle_or_release(now, true).await });
        }
        if later.is_empty() {
            return;
        }
        let opens = {
            let mut settling = self.settling.lock().unwrap_or_else(PoisonError::into_inner);
            let opens = settling.is_empty();
            settling.extend(later);
            opens
        };
        if opens {
            let quotas = self.clone();
            runtime.spawn(async move {
                tokio::time::sleep(window).await;
                let holds = std::mem::take(
                    &mut *quotas
                        .settling
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner),
                );
                quotas.settle_or_release(holds, true).await;
            });
        }
    }

    async fn settle_or_release(&self, holds: Vec<Hold>, accepted: bool) {
        let result = tokio::time::timeout(self.store_timeout, self.store.finish(&holds, accepted))
            .await
            .unwrap_or_else(|_| Err(StoreError("timed out".to_owned())));
        if let Err(e) = result {
            self.metrics.store_errors.inc();
            tracing::warn!(error = %e, accepted, holds = holds.len(), "quota store: ending holds failed");
        }
    }
}

/// SPEC 3.4's counting rules for one recipient that `tenant` sends (see [`charged`]):
/// `accepted` recipients of the message were accepted before it.
pub fn counters(tenant: &Tenant, sender: &str, recipient: &str, accepted: usize) -> Vec<Counter> {
    let name = &*tenant.name;
    let limits: &Limits = &tenant.limits;
    let registered = Mailbox::parse(sender).filter(|m| tenant.is_user(m));
    let mut out = Vec::with_capacity(4);
    if let Some(user) = &registered {
        if accepted == 0 {
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
            member: Some(
                Mailbox::parse(recipient)
                    .map_or_else(|| recipient.to_lowercase(), |m| m.as_str().to_owned()),
            ),
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

    use mailroute_config::{Manifests, compile};

    /// A Trial tenant `acme` (100 a day, 50 per 10 minutes) with one registered user.
    fn tenants(block_all: bool) -> Tenants {
        let yaml = format!(
            "apiVersion: mailroute.io/v1alpha1\nkind: RelayPolicy\nmetadata: {{name: acme, namespace: mail}}\nspec:\n  domains: [acme.example]\n  licenses: 1\n  tier: Trial\n  users: [Alice@acme.example]\n  limits: {{blockAllSendersOnCustomerLimit: {block_all}}}\n  authentication:\n    ipRanges: [{{cidr: 10.1.0.0/16}}]\n"
        );
        let mut m = Manifests::default();
        m.add_yaml(std::path::Path::new("t.yaml"), &yaml)
            .unwrap_or_else(|e| panic!("{e}"));
        let compiled = compile(&m.namespaces.remove("mail").unwrap_or_default());
        assert!(compiled.problems.is_empty(), "{:?}", compiled.problems);
        Tenants::new(&compiled.config)
    }

    fn acme(tenants: &Tenants) -> &Tenant {
        tenants.by_name("acme").unwrap_or_else(|| panic!("acme"))
    }

    fn kinds(counters: &[Counter]) -> Vec<(Limit, bool)> {
        counters.iter().map(|c| (c.limit, c.enforce)).collect()
    }

    #[test]
    fn a_registered_user_counts_the_message_once_and_each_recipient_uniquely() {
        let first = counters(
            acme(&tenants(false)),
            "Alice@acme.example",
            "Bob@Other.example",
            0,
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
            acme(&tenants(false)),
            "alice@acme.example",
            "carol@other.example",
            1,
        );
        assert_eq!(second[0].limit, Limit::UserUniqueRecipientsPerDay);
        assert_eq!(second.len(), 3);
    }

    #[test]
    fn other_senders_have_no_user_limits_and_meet_the_tenant_limits() {
        let c = counters(
            acme(&tenants(false)),
            "app@acme.example",
            "bob@other.example",
            0,
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
            acme(&tenants(true)),
            "alice@acme.example",
            "bob@other.example",
            3,
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
    fn only_mail_the_tenant_sends_is_charged() {
        let t = tenants(false);
        let acme = t.id("acme");
        // An outsider (no authorised session) is charged nothing, whatever it sends.
        assert_eq!(
            charged(&t, None, "alice@acme.example", "postmaster@acme.example"),
            None
        );
        // Inbound through the tenant's own authorised server (a legacy primary forwarding).
        assert_eq!(
            charged(&t, acme, "news@outside.example", "bob@acme.example"),
            None
        );
        // Sent: internal, outbound, a bounce out, a foreign sender relayed out (rewritten).
        for (from, to) in [
            ("alice@acme.example", "bob@acme.example"),
            ("app@sub.acme.example", "x@outside.example"),
            ("", "x@outside.example"),
            ("vendor@outside.example", "x@outside.example"),
        ] {
            assert_eq!(charged(&t, acme, from, to), acme, "{from} -> {to}");
        }
    }

    #[test]
    fn the_replies_are_the_hosted_suites() {
        assert_eq!(
            limit_reply(Limit::UserUniqueRecipientsPerDay).to_string(),
            "550 5.4.5 Daily SMTP relay limit exceeded for user"
        );
        assert_eq!(
            limit_reply(Limit::CustomerRecipientsPerDay).to_string(),
            "550 5.7.1 Daily SMTP relay limit exceeded for customer"
        );
        assert_eq!(
            limit_reply(Limit::CustomerRecipientsPer10Minutes).to_string(),
            "450 4.2.1 Peak SMTP relay limit exceeded for customer"
        );
    }
}
