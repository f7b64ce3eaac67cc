//! Tenants as the relay sees them (SPEC 5.4): which tenant a session belongs to, and whether a
//! recipient may be accepted from it. Pure functions over the compiled configuration.

use super::accounts::Accounts;
use super::domains::DomainIndex;
use crate::smtp::reply::Reply;
use ipnet::IpNet;
use mailroute_config::RelayConfig;
use mailroute_config::names::{Address, Domain};
use mailroute_config::net::canonical_client;
use mailroute_config::resources::AllowedSenders;
use std::collections::HashSet;
use std::net::IpAddr;
use std::sync::Arc;

/// Which tenant a session belongs to, and whether it may relay outbound mail for it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Binding {
    pub tenant: Option<Arc<str>>,
    /// The tenant's authentication conditions are met (SPEC 3.3): relaying is allowed.
    pub authorised: bool,
}

#[derive(Debug)]
struct TenantFacts {
    name: Arc<str>,
    ranges: Vec<IpNet>,
    require_smtp_auth: bool,
    require_tls: bool,
    allowed_senders: AllowedSenders,
    users: HashSet<Address>,
    /// The tenant's first domain: the default for `postmaster@` rewrites.
    primary_domain: Option<Domain>,
}

/// The lookup tables built once per configuration.
#[derive(Debug)]
pub struct Directory {
    tenants: Vec<TenantFacts>,
    domains: DomainIndex,
    /// Enabled ranges, most specific first.
    ranges: Vec<(IpNet, usize)>,
    accounts: Accounts,
}

impl Directory {
    pub fn new(config: &RelayConfig, accounts: Accounts) -> Self {
        let mut tenants = Vec::new();
        let mut ranges = Vec::new();
        for (i, (name, tenant)) in config.tenants.iter().enumerate() {
            tenants.push(TenantFacts {
                name: Arc::from(name.as_str()),
                ranges: tenant.ip_ranges.clone(),
                require_smtp_auth: tenant.require_smtp_auth,
                require_tls: tenant.require_tls,
                allowed_senders: tenant.allowed_senders,
                users: tenant.users.iter().cloned().collect(),
                primary_domain: tenant.domains.first().cloned(),
            });
            for r in &tenant.ip_ranges {
                ranges.push((*r, i));
            }
        }
        ranges.sort_by_key(|(net, _)| std::cmp::Reverse(net.prefix_len()));
        Self {
            tenants,
            domains: DomainIndex::new(config),
            ranges,
            accounts,
        }
    }

    /// The tenant whose domains hold `domain` (most specific domain wins).
    fn tenant_of_domain(&self, domain: &str) -> Option<usize> {
        self.domains.tenant_of(domain)
    }

    fn tenant_of_ip(&self, ip: IpAddr) -> Option<usize> {
        let ip = canonical_client(ip);
        self.ranges
            .iter()
            .find(|(net, _)| net.contains(&ip))
            .map(|(_, i)| *i)
    }

    /// Binds a session: SMTP AUTH identity first, then the most specific enabled IP range,
    /// then the EHLO domain (which counts mail for the tenant but never authorises relaying).
    pub fn bind(&self, authenticated: Option<&str>, client: IpAddr, helo: Option<&str>) -> Binding {
        let from_ip = self.tenant_of_ip(client);
        if let Some(tenant) = authenticated.and_then(|u| self.accounts.tenant_of(u))
            && let Some(i) = self.tenants.iter().position(|t| &*t.name == tenant)
        {
            let facts = &self.tenants[i];
            // Both conditions when both are set (SPEC 3.3).
            let ip_ok = facts.ranges.is_empty()
                || facts
                    .ranges
                    .iter()
                    .any(|r| r.contains(&canonical_client(client)));
            return Binding {
                tenant: Some(Arc::clone(&facts.name)),
                authorised: ip_ok,
            };
        }
        if let Some(i) = from_ip {
            let facts = &self.tenants[i];
            return Binding {
                tenant: Some(Arc::clone(&facts.name)),
                authorised: !facts.require_smtp_auth,
            };
        }
        let by_helo = helo
            .and_then(|h| h.parse::<Domain>().ok())
            .and_then(|d| self.domains.exact(d.as_str()));
        Binding {
            tenant: by_helo.map(|i| Arc::clone(&self.tenants[i].name)),
            authorised: false,
        }
    }

    /// Whether a recipient may be accepted at RCPT time. Recipients in a tenant's domains are
    /// inbound and accepted from anyone (unless that tenant requires TLS); any other recipient
    /// is relaying and needs an authorised client whose envelope sender the tenant's
    /// `allowedSenders` permits. Sender-specified routing in the local part (`%`, `!`, a quoted
    /// `@`) is refused from unauthorised clients even for our domains, as the next hop might
    /// honour it.
    pub fn check_recipient(
        &self,
        binding: &Binding,
        tls: bool,
        sender: &str,
        recipient: &str,
    ) -> Result<(), Reply> {
        let relaying_denied = || {
            Reply::new(
                550,
                "5.7.1",
                "Relaying denied: authenticate or connect from an authorised network",
            )
        };
        let Ok(address) = recipient.parse::<Address>() else {
            // Not an address we could be the destination of (trailing dot...): relaying.
            return if binding.authorised {
                self.check_sender(binding, sender)
            } else {
                Err(relaying_denied())
            };
        };
        match self.tenant_of_domain(address.domain().as_str()) {
            Some(i) => {
                let local = address.local_part();
                if !binding.authorised && local.contains(['%', '!', '@']) {
                    return Err(relaying_denied());
                }
                if self.tenants[i].require_tls && !tls {
                    return Err(Reply::new(
                        530,
                        "5.7.0",
                        "Must issue a STARTTLS command first",
                    ));
                }
                Ok(())
            }
            None if binding.authorised => self.check_sender(binding, sender),
            None => Err(relaying_denied()),
        }
    }

    /// The envelope sender to use for a message, when `allowedSenders: Any` requires a rewrite
    /// (SPEC 5.4): an authorised client relaying to at least one external recipient with a
    /// sender outside its tenant's domains, or the null sender, sends as `postmaster@` the
    /// tenant domain it identified with in EHLO, or else the tenant's first domain.
    pub fn rewritten_sender(
        &self,
        binding: &Binding,
        helo: Option<&str>,
        sender: &str,
        recipients: &[String],
    ) -> Option<String> {
        if !binding.authorised {
            return None;
        }
        let facts = binding
            .tenant
            .as_deref()
            .and_then(|name| self.tenants.iter().find(|t| &*t.name == name))?;
        if facts.allowed_senders != AllowedSenders::Any {
            return None;
        }
        let ours = |domain: &str| {
            self.tenant_of_domain(domain)
                .is_some_and(|i| self.tenants[i].name == facts.name)
        };
        let relaying = recipients.iter().any(|r| match r.parse::<Address>() {
            Ok(a) => self.tenant_of_domain(a.domain().as_str()).is_none(),
            Err(_) => true,
        });
        let foreign = match sender.parse::<Address>() {
            Ok(a) => !ours(a.domain().as_str()),
            Err(_) => true,
        };
        if !relaying || !foreign {
            return None;
        }
        let domain = helo
            .and_then(|h| h.parse::<Domain>().ok())
            .filter(|d| ours(d.as_str()))
            .or_else(|| facts.primary_domain.clone())?;
        Some(format!("postmaster@{domain}"))
    }

    /// `allowedSenders` of the bound tenant, for mail relayed outbound. The null sender is
    /// allowed (bounces from the tenant's own MTAs must flow; it is limited to one recipient).
    fn check_sender(&self, binding: &Binding, sender: &str) -> Result<(), Reply> {
        let Some(facts) = binding
            .tenant
            .as_deref()
            .and_then(|name| self.tenants.iter().find(|t| &*t.name == name))
        else {
            return Ok(());
        };
        if sender.is_empty() || facts.allowed_senders == AllowedSenders::Any {
            return Ok(());
        }
        let refused = |why: &str| {
            Err(Reply::new(
                550,
                "5.7.1",
                format!("Sender address not allowed: {why}"),
            ))
        };
        let Ok(address) = sender.parse::<Address>() else {
            return refused("not a valid address");
        };
        match facts.allowed_senders {
            AllowedSenders::RegisteredUsers if facts.users.contains(&address) => Ok(()),
            AllowedSenders::RegisteredUsers => refused("not a registered user"),
            AllowedSenders::OwnDomains => {
                let own = self
                    .tenant_of_domain(address.domain().as_str())
                    .is_some_and(|i| self.tenants[i].name == facts.name);
                if own {
                    Ok(())
                } else {
                    refused("not in the tenant's domains")
                }
            }
            AllowedSenders::Any => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mailroute_config::{Manifests, compile};

    fn directory() -> Directory {
        let yaml = r#"
apiVersion: v1
kind: Secret
metadata: {name: accounts, namespace: mail}
stringData: {app: secret}
---
apiVersion: mailroute.io/v1alpha1
kind: RelayPolicy
metadata: {name: acme, namespace: mail}
spec:
  domains: [acme.example, eu.mail.acme.co.uk]
  licenses: 5
  users: [dev@acme.example]
  authentication:
    ipRanges: [{cidr: 10.1.0.0/16}, {cidr: "2001:db8::/112"}]
    requireSMTPAuth: false
---
apiVersion: mailroute.io/v1alpha1
kind: RelayPolicy
metadata: {name: zeta, namespace: mail}
spec:
  domains: [zeta.example]
  licenses: 5
  requireTLS: true
  allowedSenders: RegisteredUsers
  users: [app@zeta.example]
  authentication:
    ipRanges: [{cidr: 10.1.2.0/24}]
    requireSMTPAuth: true
    credentialsSecretRef: {name: accounts}
"#;
        let mut m = Manifests::default();
        m.add_yaml(std::path::Path::new("t.yaml"), yaml)
            .unwrap_or_else(|e| panic!("{e}"));
        let inputs = m.namespaces.remove("mail").unwrap_or_default();
        let compiled = compile(&inputs);
        assert!(compiled.problems.is_empty(), "{:?}", compiled.problems);
        Directory::new(
            &compiled.config,
            Accounts::from_credentials(&compiled.credentials),
        )
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn binding_prefers_auth_then_the_most_specific_range_then_helo() {
        let d = directory();
        let b = d.bind(None, ip("10.1.9.9"), None);
        assert_eq!((b.tenant.as_deref(), b.authorised), (Some("acme"), true));
        // 10.1.2.0/24 (zeta) is more specific than 10.1.0.0/16 (acme), and zeta needs AUTH.
        let b = d.bind(None, ip("10.1.2.3"), None);
        assert_eq!((b.tenant.as_deref(), b.authorised), (Some("zeta"), false));
        let b = d.bind(Some("app"), ip("10.1.2.3"), None);
        assert_eq!((b.tenant.as_deref(), b.authorised), (Some("zeta"), true));
        // AUTH alone is not enough when the tenant also lists ranges.
        let b = d.bind(Some("app"), ip("192.0.2.1"), None);
        assert_eq!((b.tenant.as_deref(), b.authorised), (Some("zeta"), false));
        let b = d.bind(None, ip("::ffff:10.1.0.1"), None);
        assert_eq!(
            b.tenant.as_deref(),
            Some("acme"),
            "IPv4-mapped clients match IPv4 ranges"
        );
        let b = d.bind(None, ip("2001:db8::5"), None);
        assert_eq!(b.tenant.as_deref(), Some("acme"));
        let b = d.bind(None, ip("192.0.2.1"), Some("ACME.example"));
        assert_eq!(
            (b.tenant.as_deref(), b.authorised),
            (Some("acme"), false),
            "EHLO counts, never authorises"
        );
    }

    #[test]
    fn recipients_in_our_domains_are_inbound_and_others_need_authorisation() {
        let d = directory();
        let outsider = d.bind(None, ip("192.0.2.1"), None);
        let insider = d.bind(None, ip("10.1.9.9"), None);
        assert!(
            d.check_recipient(&outsider, false, "a@x.example", "alice@acme.example")
                .is_ok()
        );
        assert!(
            d.check_recipient(&outsider, false, "a@x.example", "bob@sub.acme.example")
                .is_ok()
        );
        assert!(
            d.check_recipient(&outsider, false, "a@x.example", "x@mail.acme.co.uk")
                .is_ok(),
            "parent up to registrable"
        );
        assert!(
            d.check_recipient(&outsider, false, "a@x.example", "x@acme.co.uk")
                .is_ok(),
            "parent up to registrable"
        );
        assert!(
            d.check_recipient(&outsider, false, "a@x.example", "x@co.uk")
                .is_err()
        );
        let code = |r: Result<(), Reply>| r.err().map(|r| r.to_string()).unwrap_or_default();
        assert!(
            code(d.check_recipient(&outsider, false, "a@x.example", "victim@external.example"))
                .starts_with("550 5.7.1")
        );
        assert!(
            d.check_recipient(
                &insider,
                false,
                "dev@acme.example",
                "victim@external.example"
            )
            .is_ok()
        );
        assert!(
            code(d.check_recipient(&outsider, false, "a@x.example", "carol@zeta.example"))
                .starts_with("530 5.7.0")
        );
        assert!(
            d.check_recipient(&outsider, true, "a@x.example", "carol@zeta.example")
                .is_ok()
        );
        for probe in [
            "victim%external.example@acme.example",
            "external.example!victim@acme.example",
            "\"victim@external.example\"@acme.example",
            "victim@[192.0.2.7]",
            "victim@external.example.",
            "victim@EXTERNAL.example",
        ] {
            assert!(
                code(d.check_recipient(&outsider, false, "a@x.example", probe))
                    .starts_with("550 5.7.1"),
                "{probe}"
            );
        }
    }

    #[test]
    fn relayed_mail_needs_a_sender_the_tenant_allows() {
        let d = directory();
        let code = |r: Result<(), Reply>| r.err().map(|r| r.to_string()).unwrap_or_default();
        // acme: OwnDomains (the default).
        let acme = d.bind(None, ip("10.1.9.9"), None);
        assert!(
            d.check_recipient(&acme, false, "dev@acme.example", "x@external.example")
                .is_ok()
        );
        assert!(
            d.check_recipient(
                &acme,
                false,
                "noreply@sub.acme.example",
                "x@external.example"
            )
            .is_ok()
        );
        assert!(
            d.check_recipient(&acme, false, "", "x@external.example")
                .is_ok(),
            "bounces flow"
        );
        assert!(
            code(d.check_recipient(&acme, false, "ceo@zeta.example", "x@external.example"))
                .starts_with("550 5.7.1 Sender address not allowed")
        );
        assert!(
            code(d.check_recipient(&acme, false, "spoof@gmail.example", "x@external.example"))
                .starts_with("550 5.7.1")
        );
        // zeta: RegisteredUsers.
        let zeta = d.bind(Some("app"), ip("10.1.2.3"), None);
        assert!(
            d.check_recipient(&zeta, true, "app@zeta.example", "x@external.example")
                .is_ok()
        );
        assert!(
            code(d.check_recipient(&zeta, true, "other@zeta.example", "x@external.example"))
                .contains("not a registered user")
        );
        // Inbound mail is not subject to allowedSenders.
        assert!(
            d.check_recipient(&zeta, true, "anyone@else.example", "dev@acme.example")
                .is_ok()
        );
    }

    #[test]
    fn any_senders_are_rewritten_to_postmaster_only_when_relaying() {
        let yaml = "apiVersion: mailroute.io/v1alpha1\nkind: RelayPolicy\nmetadata: {name: any, namespace: mail}\nspec:\n  domains: [b.example, a.example]\n  licenses: 1\n  allowedSenders: Any\n  authentication:\n    ipRanges: [{cidr: 10.9.0.0/16}]\n";
        let mut m = Manifests::default();
        m.add_yaml(std::path::Path::new("t.yaml"), yaml)
            .unwrap_or_else(|e| panic!("{e}"));
        let compiled = compile(&m.namespaces.remove("mail").unwrap_or_default());
        let d = Directory::new(&compiled.config, Accounts::default());
        let b = d.bind(None, ip("10.9.0.1"), None);
        let out = vec!["x@external.example".to_owned()];
        let inbound = vec!["x@a.example".to_owned()];
        assert_eq!(
            d.rewritten_sender(&b, None, "app@vendor.example", &out)
                .as_deref(),
            Some("postmaster@a.example"),
            "first domain (sorted)"
        );
        assert_eq!(
            d.rewritten_sender(&b, Some("B.example"), "", &out)
                .as_deref(),
            Some("postmaster@b.example"),
            "EHLO domain, null sender"
        );
        assert_eq!(
            d.rewritten_sender(&b, Some("mta.vendor.example"), "", &out)
                .as_deref(),
            Some("postmaster@a.example")
        );
        assert_eq!(
            d.rewritten_sender(&b, None, "me@sub.a.example", &out),
            None,
            "own domains are kept"
        );
        assert_eq!(
            d.rewritten_sender(&b, None, "app@vendor.example", &inbound),
            None,
            "inbound only: no rewrite"
        );
        let outsider = d.bind(None, ip("192.0.2.1"), None);
        assert_eq!(
            d.rewritten_sender(&outsider, None, "app@vendor.example", &out),
            None
        );
    }
}
