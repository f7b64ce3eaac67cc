//! Step 1 of the RCPT decision: which tenant the session belongs to, and whether it is
//! authorised to relay for it (SPEC 5.4).

use crate::auth::accounts::Accounts;
use crate::interfaces::SessionFacts;
use crate::tenants::{TenantId, Tenants};
use mailroute_config::names::Domain;
use mailroute_config::net::canonical_client;

/// How a session came to be bound to its tenant.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BoundBy {
    /// SMTP AUTH with one of the tenant's accounts.
    Auth,
    /// The client address lies in one of the tenant's enabled ranges.
    Range,
    /// The EHLO name is one of the tenant's domains: named for logs and metrics only.
    Ehlo,
}

impl BoundBy {
    pub fn as_str(self) -> &'static str {
        match self {
            BoundBy::Auth => "auth",
            BoundBy::Range => "range",
            BoundBy::Ehlo => "ehlo",
        }
    }
}

/// The session's tenant.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Binding {
    pub tenant: Option<TenantId>,
    pub by: Option<BoundBy>,
    /// The tenant's authentication conditions are met (SPEC 3.3): the session relays and
    /// sends for it. Only an authorised session's mail is counted by the tenant's quotas.
    pub authorised: bool,
}

impl Binding {
    /// The tenant this session sends for, if it is authorised.
    pub fn sender_tenant(&self) -> Option<TenantId> {
        self.tenant.filter(|_| self.authorised)
    }
}

/// Binds a session: SMTP AUTH identity first, then the most specific enabled range, then the
/// EHLO domain (which names the tenant but never authorises anything).
pub fn bind(tenants: &Tenants, accounts: &Accounts, session: &SessionFacts) -> Binding {
    if let Some(id) = session
        .authenticated
        .as_deref()
        .and_then(|user| accounts.tenant_of(user))
        .and_then(|name| tenants.id(name))
    {
        // Both conditions when both are set (SPEC 3.3).
        let tenant = tenants.get(id);
        let client = canonical_client(session.client);
        let in_range =
            tenant.ranges.is_empty() || tenant.ranges.iter().any(|r| r.contains(&client));
        return Binding {
            tenant: Some(id),
            by: Some(BoundBy::Auth),
            authorised: in_range,
        };
    }
    if let Some(id) = tenants.of_client(session.client) {
        return Binding {
            tenant: Some(id),
            by: Some(BoundBy::Range),
            authorised: !tenants.get(id).require_smtp_auth,
        };
    }
    let by_helo = session
        .helo
        .as_deref()
        .and_then(|h| h.parse::<Domain>().ok())
        .and_then(|d| tenants.of_exact_domain(&d));
    Binding {
        tenant: by_helo,
        by: by_helo.map(|_| BoundBy::Ehlo),
        authorised: false,
    }
}
