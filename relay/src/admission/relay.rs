//! Step 2 of the RCPT decision: the tenants' relay policy (SPEC 5.3-5.4): no open relay,
//! `requireTLS`, `allowedSenders` and the `Any` rewrite. Pure.

use super::binding::Binding;
use crate::interfaces::{Refusal, RefusalReason};
use crate::reply::Reply;
use crate::tenants::{Tenant, Tenants};
use mailroute_config::names::{Address, Domain, Mailbox};
use mailroute_config::resources::AllowedSenders;

/// What relay policy says of an acceptable recipient.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Permit {
    /// The envelope sender the message is relayed with (`allowedSenders: Any`).
    pub rewrite_sender: Option<String>,
}

fn relaying_denied() -> Refusal {
    Refusal::new(
        RefusalReason::RelayDenied,
        Reply::new(
            550,
            "5.7.1",
            "Relaying denied: authenticate or connect from an authorised network",
        ),
    )
}

fn tls_required() -> Refusal {
    Refusal::new(
        RefusalReason::TlsRequired,
        Reply::new(530, "5.7.0", "Must issue a STARTTLS command first"),
    )
}

/// Whether `recipient` may be accepted from this session for a message from `sender`.
///
/// - A recipient in a tenant's domains is inbound (or internal) and accepted from anyone,
///   unless that tenant requires TLS. Sender-specified routing in its local part (`%`, `!`, a
///   quoted `@`) is relaying, refused from unauthorised clients, as the next hop might honour it.
/// - Any other recipient is relaying: it needs a session authorised for a tenant, and an
///   envelope sender the tenant's `allowedSenders` permits (or rewrites).
/// - `requireTLS` binds every transaction of the tenant: its inbound mail and everything a
///   session authorised for it relays.
pub fn check(
    tenants: &Tenants,
    binding: &Binding,
    tls: bool,
    helo: Option<&str>,
    sender: &str,
    recipient: &str,
) -> Result<Permit, Refusal> {
    let sending = binding.sender_tenant().map(|id| tenants.get(id));
    if let Some(tenant) = sending
        && tenant.require_tls
        && !tls
    {
        return Err(tls_required());
    }
    let address = recipient.parse::<Address>().ok();
    if let Some(address) = &address
        && let Some(owner) = tenants.of_address(address)
    {
        if !binding.authorised && address.local_part().contains(['%', '!', '@']) {
            return Err(relaying_denied());
        }
        if tenants.get(owner).require_tls && !tls {
            return Err(tls_required());
        }
        return Ok(Permit::default());
    }
    // Relaying: not an address in any tenant's domains (or not one we could be the
    // destination of: a trailing dot, an address literal).
    let Some(tenant) = sending else {
        return Err(relaying_denied());
    };
    allowed_sender(tenants, tenant, helo, sender)
}

/// `allowedSenders` of the sending tenant, for relayed mail. The null sender is allowed
/// (bounces from the tenant's own MTAs must flow; it is limited to one recipient) and, with
/// `Any`, rewritten like a foreign sender.
fn allowed_sender(
    tenants: &Tenants,
    tenant: &Tenant,
    helo: Option<&str>,
    sender: &str,
) -> Result<Permit, Refusal> {
    let refused = |why: &str| {
        Err(Refusal::new(
            RefusalReason::Sender,
            Reply::new(550, "5.7.1", format!("Sender address not allowed: {why}")),
        ))
    };
    let address = sender.parse::<Address>().ok();
    let own = address
        .as_ref()
        .and_then(|a| tenants.of_address(a))
        .is_some_and(|id| tenants.get(id).name == tenant.name);
    match tenant.allowed_senders {
        AllowedSenders::Any if own => Ok(Permit::default()),
        AllowedSenders::Any => Ok(Permit {
            rewrite_sender: Some(postmaster(tenant, helo)),
        }),
        _ if sender.is_empty() => Ok(Permit::default()),
        _ if address.is_none() => refused("not a valid address"),
        AllowedSenders::RegisteredUsers => {
            let registered = address
                .as_ref()
                .map(Address::mailbox)
                .is_some_and(|m: Mailbox| tenant.is_user(&m));
            if registered {
                Ok(Permit::default())
            } else {
                refused("not a registered user")
            }
        }
        AllowedSenders::OwnDomains if own => Ok(Permit::default()),
        AllowedSenders::OwnDomains => refused("not in the tenant's domains"),
    }
}

/// `postmaster@` the tenant domain the EHLO name is or lies in (`mta1.example.com` gives
/// `example.com`), else the tenant's first domain (SPEC 5.4).
fn postmaster(tenant: &Tenant, helo: Option<&str>) -> String {
    let from_helo = helo
        .and_then(|h| h.parse::<Domain>().ok())
        .and_then(|h| tenant.domain_holding(&h).cloned());
    match from_helo.or_else(|| tenant.domains.first().cloned()) {
        Some(domain) => format!("postmaster@{domain}"),
        // NB: the compiler refuses a tenant without domains; keep the null sender then.
        None => String::new(),
    }
}
