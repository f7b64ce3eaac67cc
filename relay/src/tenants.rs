//! The tenants of one configuration generation, built once and shared by admission, routing and
//! quotas: each tenant's facts by name in O(1), which tenant a domain belongs to, which tenant
//! an enabled client range belongs to. Addresses are compared by their
//! [`Mailbox`](mailroute_config::names::Mailbox) everywhere (one normalisation).

use ipnet::IpNet;
use mailroute_config::RelayConfig;
use mailroute_config::document::{Limits, Rule};
use mailroute_config::names::{Address, Domain, Mailbox};
use mailroute_config::net::canonical_client;
use mailroute_config::resources::AllowedSenders;
use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;

/// A group of a tenant.
#[derive(Debug)]
pub struct Group {
    pub address: Mailbox,
    pub members: HashSet<Mailbox>,
}

/// One tenant (a `RelayPolicy`), as every part of the relay sees it.
#[derive(Debug)]
pub struct Tenant {
    pub name: Arc<str>,
    /// Sorted; the first is the default for `postmaster@` rewrites.
    pub domains: Vec<Domain>,
    pub ranges: Vec<IpNet>,
    pub require_smtp_auth: bool,
    pub require_tls: bool,
    pub allowed_senders: AllowedSenders,
    pub users: HashSet<Mailbox>,
    pub groups: HashMap<String, Group>,
    pub group_addresses: HashSet<Mailbox>,
    pub limits: Limits,
    pub inbound_route: Option<Arc<str>>,
    pub outbound_route: Option<Arc<str>>,
    /// In evaluation order.
    pub rules: Vec<(Arc<str>, Rule)>,
}

impl Tenant {
    pub fn is_user(&self, mailbox: &Mailbox) -> bool {
        self.users.contains(mailbox)
    }

    /// The tenant domain `name` is, or lies in (`mta1.example.com` lies in `example.com`).
    pub fn domain_holding(&self, name: &Domain) -> Option<&Domain> {
        self.domains.iter().find(|d| name.is_within(d))
    }
}

/// Index of a tenant in a [`Tenants`] table.
pub type TenantId = usize;

/// Every tenant of a generation.
#[derive(Debug, Default)]
pub struct Tenants {
    list: Vec<Tenant>,
    by_name: HashMap<Arc<str>, TenantId>,
    /// Domain -> tenant (with every subdomain).
    domains: HashMap<String, TenantId>,
    /// Parent domains up to the registrable one -> tenant (exactly, not their subdomains).
    parents: HashMap<String, TenantId>,
    /// Enabled ranges grouped by prefix length, longest first: the most specific range wins
    /// with one hash lookup per distinct prefix length.
    ranges: Vec<(u8, HashMap<IpNet, TenantId>)>,
}

impl Tenants {
    pub fn new(config: &RelayConfig) -> Self {
        let mut table = Tenants::default();
        let mut ranges: HashMap<u8, HashMap<IpNet, TenantId>> = HashMap::new();
        for (id, (name, t)) in config.tenants.iter().enumerate() {
            let name: Arc<str> = Arc::from(name.as_str());
            let groups: HashMap<String, Group> = t
                .groups
                .iter()
                .map(|g| {
                    let group = Group {
                        address: g.address.mailbox(),
                        members: g.members.iter().map(Address::mailbox).collect(),
                    };
                    (g.name.clone(), group)
                })
                .collect();
            for d in &t.domains {
                table.domains.insert(d.as_str().to_owned(), id);
            }
            for p in &t.parent_domains {
                table.parents.insert(p.as_str().to_owned(), id);
            }
            for r in &t.ip_ranges {
                let r = r.trunc();
                ranges.entry(r.prefix_len()).or_default().insert(r, id);
            }
            table.by_name.insert(Arc::clone(&name), id);
            table.list.push(Tenant {
                name,
                domains: t.domains.clone(),
                ranges: t.ip_ranges.clone(),
                require_smtp_auth: t.require_smtp_auth,
                require_tls: t.require_tls,
                allowed_senders: t.allowed_senders,
                users: t.users.iter().map(Address::mailbox).collect(),
                group_addresses: groups.values().map(|g| g.address.clone()).collect(),
                groups,
                limits: t.limits.clone(),
                inbound_route: t.inbound_route.as_deref().map(Arc::from),
                outbound_route: t.outbound_route.as_deref().map(Arc::from),
                rules: t
                    .rules
                    .iter()
                    .map(|r| (Arc::from(r.name.as_str()), r.clone()))
                    .collect(),
            });
        }
        table.ranges = ranges.into_iter().collect();
        table.ranges.sort_by_key(|(len, _)| std::cmp::Reverse(*len));
        table
    }

    pub fn get(&self, id: TenantId) -> &Tenant {
        &self.list[id]
    }

    pub fn id(&self, name: &str) -> Option<TenantId> {
        self.by_name.get(name).copied()
    }

    pub fn by_name(&self, name: &str) -> Option<&Tenant> {
        self.id(name).map(|id| &self.list[id])
    }

    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    pub fn len(&self) -> usize {
        self.list.len()
    }

    /// The tenant whose domains hold `domain` (SPEC 3.3): a domain with its subdomains (the
    /// most specific wins), or exactly one of its parents up to the registrable domain.
    pub fn of_domain(&self, domain: &Domain) -> Option<TenantId> {
        let domain = domain.as_str();
        let mut rest = domain;
        loop {
            if let Some(id) = self.domains.get(rest) {
                return Some(*id);
            }
            match rest.split_once('.') {
                Some((_, parent)) => rest = parent,
                None => break,
            }
        }
        self.parents.get(domain).copied()
    }

    /// The tenant of exactly this domain (no subdomain or parent): the EHLO binding.
    pub fn of_exact_domain(&self, domain: &Domain) -> Option<TenantId> {
        self.domains.get(domain.as_str()).copied()
    }

    /// The tenant of the most specific enabled range holding `client`.
    pub fn of_client(&self, client: IpAddr) -> Option<TenantId> {
        let client = canonical_client(client);
        for (len, nets) in &self.ranges {
            let Ok(net) = IpNet::new(client, *len) else {
                continue;
            };
            if let Some(id) = nets.get(&net.trunc()) {
                return Some(*id);
            }
        }
        None
    }

    /// The tenant `address` belongs to by its domain.
    pub fn of_address(&self, address: &Address) -> Option<TenantId> {
        self.of_domain(address.domain())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mailroute_config::{Manifests, compile};

    fn table(yaml: &str) -> Tenants {
        let mut m = Manifests::default();
        m.add_yaml(std::path::Path::new("t.yaml"), yaml)
            .unwrap_or_else(|e| panic!("{e}"));
        let compiled = compile(&m.namespaces.remove("mail").unwrap_or_default());
        assert!(compiled.problems.is_empty(), "{:?}", compiled.problems);
        Tenants::new(&compiled.config)
    }

    const TWO: &str = "apiVersion: mailroute.io/v1alpha1\nkind: RelayPolicy\nmetadata: {name: acme, namespace: mail}\nspec:\n  domains: [acme.example, eu.mail.acme.co.uk]\n  licenses: 1\n  users: [Alice@Acme.example]\n  authentication:\n    ipRanges: [{cidr: 10.1.0.0/16}, {cidr: \"2001:db8::/112\"}]\n---\napiVersion: mailroute.io/v1alpha1\nkind: RelayPolicy\nmetadata: {name: zeta, namespace: mail}\nspec:\n  domains: [zeta.example]\n  licenses: 1\n  authentication:\n    ipRanges: [{cidr: 10.1.2.0/24}]\n";

    #[test]
    fn the_most_specific_range_wins_and_mapped_v4_clients_match() {
        let t = table(TWO);
        let name = |ip: &str| {
            t.of_client(ip.parse().unwrap_or_else(|e| panic!("{e}")))
                .map(|id| t.get(id).name.to_string())
        };
        assert_eq!(name("10.1.9.9").as_deref(), Some("acme"));
        assert_eq!(name("10.1.2.3").as_deref(), Some("zeta"));
        assert_eq!(name("::ffff:10.1.0.1").as_deref(), Some("acme"));
        assert_eq!(name("2001:db8::5").as_deref(), Some("acme"));
        assert_eq!(name("192.0.2.1"), None);
    }

    #[test]
    fn domains_subdomains_and_parents_up_to_the_registrable_domain() {
        let t = table(TWO);
        let of = |d: &str| {
            t.of_domain(&d.parse().unwrap_or_else(|e| panic!("{e}")))
                .map(|id| t.get(id).name.to_string())
        };
        assert_eq!(of("ACME.example").as_deref(), Some("acme"));
        assert_eq!(of("sub.acme.example").as_deref(), Some("acme"));
        assert_eq!(of("mail.acme.co.uk").as_deref(), Some("acme"));
        assert_eq!(of("acme.co.uk").as_deref(), Some("acme"));
        assert_eq!(of("other.acme.co.uk"), None);
        assert_eq!(of("co.uk"), None);
    }

    #[test]
    fn a_user_is_the_same_whatever_the_case_it_is_written_in() {
        let t = table(TWO);
        let acme = t.by_name("acme").unwrap_or_else(|| panic!("acme"));
        for written in [
            "alice@acme.example",
            "Alice@Example.COM",
            "ALICE@ACME.EXAMPLE",
        ] {
            let written = written.replace("Example.COM", "Acme.Example");
            let mailbox = Mailbox::parse(&written).unwrap_or_else(|| panic!("{written}"));
            assert!(acme.is_user(&mailbox), "{written}");
        }
        let helo: Domain = "mta1.acme.example"
            .parse()
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            acme.domain_holding(&helo).map(Domain::as_str),
            Some("acme.example")
        );
    }
}
