//! Routing (SPEC 6.1-6.3): a pure function from the compiled configuration, the envelope and
//! the session's tenant to a delivery plan. No I/O here; `crate::delivery` carries plans out.
//!
//! - [`Router::route_recipient`] classifies one recipient, runs its tenant's rules and says
//!   where it goes (or why it is refused at RCPT time).
//! - [`Router::plan`] does that for every recipient of a message and groups the deliveries
//!   into legs, one SMTP transaction per (target, options).

mod plan;

pub use plan::{Leg, LegRecipient, Plan};

use crate::reply::Reply;
use crate::tenants::{Tenant, TenantId, Tenants};
use mailroute_config::RelayConfig;
use mailroute_config::document::{Header, Matcher};
use mailroute_config::names::{Address, Domain};
use mailroute_config::resources::{AccountType, DeliveryMode, MessageKind, RuleMode};
use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

/// Where one delivery goes.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Target {
    /// A `MailRoute`, by name.
    Route(Arc<str>),
    /// Direct delivery to the MX hosts of a recipient domain (no outbound route).
    Mx(Domain),
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Route(name) => f.write_str(name),
            Target::Mx(domain) => write!(f, "mx:{domain}"),
        }
    }
}

/// Direction of one recipient relative to its tenant (SPEC 6.1), as metrics label it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Direction {
    /// External sender to one of our recipients.
    Inbound,
    /// Our sender to our recipient: both `InternalSending` and `InternalReceiving`.
    Internal,
    /// To a recipient outside the tenant's domains.
    Outbound,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Inbound => "inbound",
            Direction::Internal => "internal",
            Direction::Outbound => "outbound",
        }
    }

    fn matches(self, kinds: &[MessageKind]) -> bool {
        kinds.iter().any(|k| {
            matches!(
                (self, k),
                (Direction::Inbound, MessageKind::Inbound)
                    | (Direction::Outbound, MessageKind::Outbound)
                    | (
                        Direction::Internal,
                        MessageKind::InternalSending | MessageKind::InternalReceiving
                    )
            )
        })
    }
}

/// A rule that matched a recipient.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuleMatch {
    pub tenant: Arc<str>,
    pub rule: Arc<str>,
    /// `mode: Audit`: matched, changed nothing ("would have").
    pub audit: bool,
}

/// An extra copy asked for by `alsoDeliverTo`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CopyTo {
    pub target: Target,
    pub recipient: String,
    /// Sent with `NOTIFY=NEVER` where the upstream supports DSN.
    pub suppress_bounces: bool,
}

/// Why a recipient has no route.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Unroutable {
    /// A rule's `actions.reject`, with the rule's reply.
    Rejected(Reply),
    /// Neither the recipient nor the session belongs to a tenant.
    NoTenant,
    /// Not an address with a domain, and no outbound route to hand it to.
    NoDomain,
}

impl Unroutable {
    pub fn reply(&self) -> Reply {
        match self {
            Unroutable::Rejected(reply) => reply.clone(),
            Unroutable::NoTenant => Reply::new(
                550,
                "5.7.1",
                "Relaying denied: the recipient belongs to no tenant of this relay",
            ),
            Unroutable::NoDomain => Reply::new(
                550,
                "5.1.3",
                "Cannot route to this address: no domain to look up",
            ),
        }
    }
}

/// Where one recipient goes, after its tenant's rules.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecipientRoute {
    pub tenant: Arc<str>,
    pub direction: Direction,
    /// The primary destination.
    pub target: Target,
    /// The address to deliver to (after `rewriteRecipientDomain`).
    pub deliver_as: String,
    /// `actions.requireTLS`: TLS whatever the route says.
    pub require_tls: bool,
    /// `actions.addHeaders`, for the primary delivery.
    pub headers: Vec<Header>,
    pub copies: Vec<CopyTo>,
    pub matches: Vec<RuleMatch>,
    /// For a recipient in the tenant's domains: a user, a group or neither (what rules'
    /// `accountTypes` select on).
    pub account_type: Option<AccountType>,
}

impl RecipientRoute {
    /// A recipient of `tenant` going to `target` as written, no rule applied (stand-in
    /// admissions in protocol tests and fuzzing).
    pub fn plain(tenant: &str, direction: Direction, target: Target, recipient: &str) -> Self {
        Self {
            tenant: Arc::from(tenant),
            direction,
            target,
            deliver_as: recipient.to_owned(),
            require_tls: false,
            headers: Vec::new(),
            copies: Vec::new(),
            matches: Vec::new(),
            account_type: None,
        }
    }
}

/// The routing tables built once per configuration.
#[derive(Debug)]
pub struct Router {
    tenants: Arc<Tenants>,
    /// Route name -> whether a failure of its legs holds the client's reply.
    required: HashMap<Arc<str>, bool>,
}

impl Router {
    pub fn new(config: &RelayConfig, tenants: Arc<Tenants>) -> Self {
        let required = config
            .routes
            .iter()
            .map(|(name, route)| {
                (
                    Arc::from(name.as_str()),
                    route.delivery == DeliveryMode::Required,
                )
            })
            .collect();
        Self { tenants, required }
    }

    /// The tenant table the router was built with.
    pub fn tenants(&self) -> &Arc<Tenants> {
        &self.tenants
    }

    /// Whether a failure of a leg to `target` holds the client's reply (SPEC 6.5). Direct MX
    /// delivery is always required: there is nobody else to deliver it.
    pub fn is_required(&self, target: &Target) -> bool {
        match target {
            Target::Route(name) => self.required.get(name).copied().unwrap_or(true),
            Target::Mx(_) => true,
        }
    }

    /// Where `recipient` goes for a message from `sender` in a session bound to `bound`
    /// (SPEC 6.1-6.2), or the reply refusing it at RCPT time (a rule's `reject`).
    ///
    /// The tenant is the recipient's (its domain is one of a tenant's), else the session's.
    /// Rules run in priority order; every enforced match applies its actions, the first route
    /// and the first domain rewrite win, `stopProcessing` ends the evaluation, and an audited
    /// match is only recorded.
    pub fn route_recipient(
        &self,
        bound: Option<TenantId>,
        sender: &str,
        recipient: &str,
    ) -> Result<RecipientRoute, Unroutable> {
        let address = recipient.parse::<Address>().ok();
        let recipient_tenant = address.as_ref().and_then(|a| self.tenants.of_address(a));
        let Some(index) = recipient_tenant.or(bound) else {
            return Err(Unroutable::NoTenant);
        };
        let tenant = self.tenants.get(index);
        let sender_address = sender.parse::<Address>().ok();
        let sender_internal = sender_address
            .as_ref()
            .and_then(|a| self.tenants.of_address(a))
            == Some(index);
        let recipient_internal = recipient_tenant == Some(index);
        let direction = match (recipient_internal, sender_internal) {
            (true, true) => Direction::Internal,
            (true, false) => Direction::Inbound,
            (false, _) => Direction::Outbound,
        };
        let account_type = address.as_ref().map(|a| {
            let mailbox = a.mailbox();
            if tenant.users.contains(&mailbox) {
                AccountType::Users
            } else if tenant.group_addresses.contains(&mailbox) {
                AccountType::Groups
            } else {
                AccountType::Unrecognized
            }
        });

        let mut route: Option<Arc<str>> = None;
        let mut rewrite: Option<Domain> = None;
        let mut require_tls = false;
        let mut headers: Vec<Header> = Vec::new();
        let mut copies: Vec<CopyTo> = Vec::new();
        let mut matches = Vec::new();
        for (rule_name, rule) in &tenant.rules {
            if !direction.matches(&rule.messages) {
                continue;
            }
            if recipient_internal
                && let Some(kind) = account_type
                && !rule.account_types.contains(&kind)
            {
                continue;
            }
            let senders_ok = rule.senders.is_empty()
                || rule
                    .senders
                    .iter()
                    .any(|m| self.matcher(tenant, m, sender_address.as_ref(), sender));
            let recipients_ok = rule.recipients.is_empty()
                || rule
                    .recipients
                    .iter()
                    .any(|m| self.matcher(tenant, m, address.as_ref(), recipient));
            if !senders_ok || !recipients_ok {
                continue;
            }
            let audit = rule.mode == RuleMode::Audit;
            matches.push(RuleMatch {
                tenant: Arc::clone(&tenant.name),
                rule: Arc::clone(rule_name),
                audit,
            });
            if audit {
                continue;
            }
            let actions = &rule.actions;
            if let Some(reject) = &actions.reject {
                return Err(Unroutable::Rejected(Reply::relayed(
                    reject.code,
                    Some(&reject.enhanced_code),
                    reject.text.clone(),
                )));
            }
            if route.is_none() {
                route = actions.route.as_deref().map(Arc::from);
            }
            if rewrite.is_none() {
                rewrite = actions.rewrite_recipient_domain.clone();
            }
            require_tls |= actions.require_tls;
            for header in &actions.add_headers {
                if !headers.contains(header) {
                    headers.push(header.clone());
                }
            }
            for copy in &actions.also_deliver_to {
                let (target, to) = match (&copy.recipient, &copy.route) {
                    (Some(extra), Some(via)) => (Target::Route(Arc::from(via.as_str())), extra),
                    (Some(extra), None) => (self.default_target(index, extra), extra),
                    (None, Some(via)) => {
                        copies.push(CopyTo {
                            target: Target::Route(Arc::from(via.as_str())),
                            recipient: recipient.to_owned(),
                            suppress_bounces: copy.suppress_bounces,
                        });
                        continue;
                    }
                    (None, None) => continue,
                };
                copies.push(CopyTo {
                    target,
                    recipient: to.to_string(),
                    suppress_bounces: copy.suppress_bounces,
                });
            }
            if rule.stop_processing {
                break;
            }
        }

        let target = match (route, &address) {
            (Some(name), _) => Target::Route(name),
            (None, Some(a)) => self.default_target(index, a),
            (None, None) => match &tenant.outbound_route {
                Some(name) => Target::Route(Arc::clone(name)),
                None => return Err(Unroutable::NoDomain),
            },
        };
        let deliver_as = match (&address, rewrite) {
            (Some(a), Some(domain)) => a.with_domain(domain).to_string(),
            _ => recipient.to_owned(),
        };
        Ok(RecipientRoute {
            tenant: Arc::clone(&tenant.name),
            direction,
            target,
            deliver_as,
            require_tls,
            headers,
            copies,
            matches,
            account_type: account_type.filter(|_| recipient_internal),
        })
    }

    /// The normal destination of an address for a tenant: its `inboundRoute` when the address
    /// is in its domains, else its `outboundRoute`, else the address's MX hosts.
    fn default_target(&self, tenant: usize, address: &Address) -> Target {
        let facts = self.tenants.get(tenant);
        let internal = self.tenants.of_address(address) == Some(tenant);
        let route = if internal {
            facts.inbound_route.as_ref()
        } else {
            facts.outbound_route.as_ref()
        };
        match route {
            Some(name) => Target::Route(Arc::clone(name)),
            None => Target::Mx(address.domain().clone()),
        }
    }

    fn matcher(
        &self,
        tenant: &Tenant,
        matcher: &Matcher,
        address: Option<&Address>,
        raw: &str,
    ) -> bool {
        match matcher {
            Matcher::Address(expected) => address.is_some_and(|a| a.same_mailbox(expected)),
            Matcher::Pattern(pattern) => match address {
                Some(a) => pattern.is_match(&a.to_string()),
                None => pattern.is_match(raw),
            },
            Matcher::Domain(domain) => address.is_some_and(|a| a.domain().is_within(domain)),
            Matcher::Group(name) => match (tenant.groups.get(name), address) {
                (Some(group), Some(a)) => {
                    let mailbox = a.mailbox();
                    group.address == mailbox || group.members.contains(&mailbox)
                }
                _ => false,
            },
        }
    }
}
