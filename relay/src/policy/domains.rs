//! Which tenant a domain belongs to (SPEC 3.3): a tenant's domains with all their subdomains,
//! and their parent domains up to the registrable domain (those exactly, not their other
//! subdomains).

use mailroute_config::RelayConfig;
use std::collections::HashMap;

/// Domain -> index of the tenant in `RelayConfig::tenants` order.
#[derive(Debug, Default)]
pub struct DomainIndex {
    domains: HashMap<String, usize>,
    parents: HashMap<String, usize>,
}

impl DomainIndex {
    pub fn new(config: &RelayConfig) -> Self {
        let mut index = Self::default();
        for (i, tenant) in config.tenants.values().enumerate() {
            for d in &tenant.domains {
                index.domains.insert(d.as_str().to_owned(), i);
            }
            for p in &tenant.parent_domains {
                index.parents.insert(p.as_str().to_owned(), i);
            }
        }
        index
    }

    /// The tenant whose domains hold `domain` (lower case); the most specific domain wins.
    pub fn tenant_of(&self, domain: &str) -> Option<usize> {
        let mut rest = domain;
        loop {
            if let Some(i) = self.domains.get(rest) {
                return Some(*i);
            }
            match rest.split_once('.') {
                Some((_, parent)) => rest = parent,
                None => break,
            }
        }
        self.parents.get(domain).copied()
    }

    /// The tenant of exactly this domain (no subdomain or parent match): the EHLO binding.
    pub fn exact(&self, domain: &str) -> Option<usize> {
        self.domains.get(domain).copied()
    }
}
