//! The RCPT decision, in one place and one order (docs/admission.md has it as a table):
//!
//! 1. [`binding`]: the session's facts bind it to a tenant (AUTH, then range, then EHLO), and
//!    say whether it is authorised to send for it.
//! 2. [`relay`]: relay policy: no open relay, `requireTLS`, `allowedSenders` and the `Any`
//!    rewrite.
//! 3. Routing rules (`crate::routing`): a rule's `reject`, and otherwise where the recipient
//!    goes: that decision is made here once, and delivery carries it out.
//! 4. Quotas (`crate::quota`): only mail the tenant sends, reserved until the transaction ends.
//! 5. Recipient verification with the primary upstream (`crate::delivery`), where the route
//!    asks for it.
//!
//! The session (`crate::smtp::session`) keeps the protocol's own checks (sequence, syntax,
//! recipients per message); the connection driver asks [`Gate::admit`] about every recipient
//! that passes them and says when the transaction ended ([`Gate::end`]).

pub mod binding;
pub mod relay;

use crate::auth::accounts::Accounts;
use crate::delivery::Forwarder;
use crate::interfaces::{
    Admit, Admitted, BoxFuture, RecipientQuery, Refusal, RefusalReason, SessionFacts,
};
use crate::quota::{self, Exceeded, Hold, Quotas};
use crate::reply::Reply;
use crate::routing::{Router, Unroutable};
use crate::tenants::Tenants;
use binding::Binding;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// The relay's [`Admit`] for one configuration generation.
pub struct Gate {
    tenants: Arc<Tenants>,
    accounts: Accounts,
    router: Arc<Router>,
    quotas: Quotas,
    /// Present when some route is checked at RCPT (recipient verification, rate limits).
    verifier: Option<Arc<Forwarder>>,
    /// What each open transaction reserved, by transaction id.
    holds: Mutex<HashMap<Arc<str>, Vec<Hold>>>,
}

impl std::fmt::Debug for Gate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gate")
            .field("verifies", &self.verifier.is_some())
            .finish_non_exhaustive()
    }
}

impl Gate {
    pub fn new(
        config: &mailroute_config::RelayConfig,
        router: Arc<Router>,
        accounts: Accounts,
        quotas: Quotas,
        forwarder: &Arc<Forwarder>,
        ask_upstreams: bool,
    ) -> Self {
        let verifies = ask_upstreams && Forwarder::checks_at_rcpt(config);
        Self {
            tenants: Arc::clone(router.tenants()),
            accounts,
            router,
            quotas,
            verifier: verifies.then(|| Arc::clone(forwarder)),
            holds: Mutex::new(HashMap::new()),
        }
    }

    /// How a session is bound (step 1), as [`Gate::admit`] binds it: for `explain`.
    pub fn binding(&self, facts: &SessionFacts) -> (Option<Arc<str>>, Binding) {
        let binding = binding::bind(&self.tenants, &self.accounts, facts);
        let name = binding
            .tenant
            .map(|id| Arc::clone(&self.tenants.get(id).name));
        (name, binding)
    }

    /// The quota counters a recipient spends (step 4), as [`Gate::admit`] reserves them: for
    /// `explain`. Empty when the recipient is not charged to a tenant (inbound mail, a session
    /// not authorised to send).
    pub fn counters(
        &self,
        binding: &Binding,
        sender: &str,
        recipient: &str,
        accepted: usize,
    ) -> Vec<mailroute_store::Counter> {
        quota::charged(&self.tenants, binding.sender_tenant(), sender, recipient)
            .map(|id| quota::counters(self.tenants.get(id), sender, recipient, accepted))
            .unwrap_or_default()
    }

    /// Transactions holding quota reservations now (tests and leaks).
    pub fn open_transactions(&self) -> usize {
        self.holds.lock().map(|h| h.len()).unwrap_or(0)
    }

    async fn decide(&self, query: &RecipientQuery) -> Result<Admitted, Refusal> {
        let binding = binding::bind(&self.tenants, &self.accounts, &query.session);
        let tenant = binding
            .tenant
            .map(|id| Arc::clone(&self.tenants.get(id).name));
        self.steps(query, &binding, tenant.clone())
            .await
            .map_err(|refusal| Refusal { tenant, ..refusal })
    }

    /// Steps 2 to 5, for a bound session.
    async fn steps(
        &self,
        query: &RecipientQuery,
        binding: &Binding,
        tenant_name: Option<Arc<str>>,
    ) -> Result<Admitted, Refusal> {
        let facts = &query.session;
        let refuse = |reason, reply| Refusal::new(reason, reply);
        let postmaster;
        let recipient = if query.recipient.eq_ignore_ascii_case("postmaster") {
            postmaster = self.postmaster(binding).ok_or_else(|| {
                refuse(
                    RefusalReason::Syntax,
                    Reply::new(
                        550,
                        "5.1.1",
                        "Several tenants share this relay: write postmaster@ their domain",
                    ),
                )
            })?;
            postmaster.as_str()
        } else {
            query.recipient.as_str()
        };

        let permit = relay::check(
            &self.tenants,
            binding,
            facts.tls,
            facts.helo.as_deref(),
            &query.sender,
            recipient,
        )?;

        let route = self
            .router
            .route_recipient(binding.tenant, &query.sender, recipient)
            .map_err(|unroutable| {
                let reason = match unroutable {
                    Unroutable::Rejected(_) => RefusalReason::Rule,
                    Unroutable::NoTenant => RefusalReason::RelayDenied,
                    Unroutable::NoDomain => RefusalReason::Syntax,
                };
                refuse(reason, unroutable.reply())
            })?;

        let hold = match quota::charged(
            &self.tenants,
            binding.sender_tenant(),
            &query.sender,
            recipient,
        ) {
            None => None,
            Some(id) => self
                .quotas
                .reserve(
                    &query.transaction,
                    self.tenants.get(id),
                    &query.sender,
                    recipient,
                    query.accepted,
                )
                .await
                .map_err(|exceeded| {
                    let reason = match exceeded {
                        Exceeded::Limit(_) => RefusalReason::Quota,
                        Exceeded::Store => RefusalReason::Store,
                    };
                    refuse(reason, exceeded.reply())
                })?,
        };

        if let Some(verifier) = &self.verifier {
            let checked = match verifier.check_rate_limits(&route).await {
                Err(reply) => Err(refuse(RefusalReason::RateLimit, reply)),
                Ok(()) => verifier
                    .verify_recipient(query, &route)
                    .await
                    .map_err(|reply| refuse(RefusalReason::Upstream, reply)),
            };
            if let Err(refusal) = checked {
                // Nothing of a refused recipient stays reserved.
                if let Some(hold) = hold {
                    self.quotas.finish(vec![hold], false).await;
                }
                return Err(refusal);
            }
        }

        if let Some(hold) = hold
            && let Ok(mut holds) = self.holds.lock()
        {
            holds
                .entry(Arc::clone(&query.transaction))
                .or_default()
                .push(hold);
        }
        Ok(Admitted {
            tenant: tenant_name,
            route,
            rewrite_sender: permit.rewrite_sender,
            authorised: binding.sender_tenant().is_some(),
        })
    }
}

impl Gate {
    /// Where `RCPT TO:<postmaster>` (RFC 5321 section 4.5.1, no domain) goes: the postmaster
    /// of the session's tenant (however it was bound), or of the only tenant there is.
    fn postmaster(&self, binding: &Binding) -> Option<String> {
        let id = binding
            .tenant
            .or_else(|| (self.tenants.len() == 1).then_some(0))?;
        let domain = self.tenants.get(id).domains.first()?;
        Some(format!("postmaster@{domain}"))
    }
}

impl Admit for Gate {
    fn admit<'a>(&'a self, query: &'a RecipientQuery) -> BoxFuture<'a, Result<Admitted, Refusal>> {
        Box::pin(self.decide(query))
    }

    fn end<'a>(&'a self, transaction: &'a str, accepted: bool) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            let holds = self
                .holds
                .lock()
                .ok()
                .and_then(|mut h| h.remove(transaction))
                .unwrap_or_default();
            self.quotas.finish(holds, accepted).await;
        })
    }
}

#[cfg(test)]
mod tests;
