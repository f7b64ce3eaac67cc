//! RelayPolicy -> [`Tenant`].

use super::{Inputs, Object, Refs, Report, config_map_value, effective_limits, secret_value};
use crate::document::{Group, Tenant};
use crate::names::{Address, Domain};
use crate::net::parse_range;
use crate::resources::RelayPolicySpec;
use ipnet::IpNet;
use std::collections::{BTreeMap, BTreeSet};

/// At most this many bad lines of a users directory are reported one by one.
const MAX_LINE_PROBLEMS: usize = 20;

/// Domains and IP ranges already owned by a tenant compiled earlier (in name order).
#[derive(Default)]
pub(super) struct Claims {
    domains: BTreeMap<Domain, String>,
    ranges: BTreeMap<IpNet, String>,
    usernames: BTreeMap<String, String>,
    service_accounts: BTreeMap<String, String>,
}

impl Claims {
    pub(super) fn commit(
        &mut self,
        tenant_name: &str,
        tenant: &Tenant,
        accounts: Option<&BTreeMap<String, String>>,
    ) {
        for username in accounts.into_iter().flat_map(BTreeMap::keys) {
            self.usernames
                .insert(username.clone(), tenant_name.to_owned());
        }
        for d in &tenant.domains {
            self.domains.insert(d.clone(), tenant_name.to_owned());
        }
        for r in &tenant.ip_ranges {
            self.ranges.insert(*r, tenant_name.to_owned());
        }
        for subject in &tenant.service_accounts {
            self.service_accounts
                .insert(subject.clone(), tenant_name.to_owned());
        }
    }
}

/// A DNS-1123 label (a namespace's name): at most 63 of `a-z0-9-`, alphanumeric at both ends.
fn is_label(name: &str) -> bool {
    (1..=63).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-')
}

/// A DNS-1123 subdomain (a service account's name): dot-separated labels, at most 253.
fn is_subdomain(name: &str) -> bool {
    name.len() <= 253 && name.split('.').all(is_label)
}

/// A policy that compiled: its tenant, its SMTP AUTH accounts (username -> password or hash),
/// and its DKIM private keys by record name.
pub(super) struct CompiledPolicy {
    pub tenant: Tenant,
    pub accounts: Option<BTreeMap<String, String>>,
    pub dkim_keys: BTreeMap<String, String>,
}

pub(super) fn compile(
    object: &Object<RelayPolicySpec>,
    inputs: &Inputs,
    refs: &Refs<'_>,
    claims: &mut Claims,
    report: &mut Report<'_>,
) -> Option<CompiledPolicy> {
    let spec = &object.spec;

    let mut domains = BTreeSet::new();
    if spec.domains.is_empty() {
        report.bad("domains", "needs at least one domain");
    }
    for (i, text) in spec.domains.iter().enumerate() {
        match text.parse::<Domain>() {
            // NB: a public suffix (`com`, `co.uk`) would make every address under it "ours":
            // inbound, and accepted from anyone.
            Ok(domain) if psl::suffix_str(domain.as_str()) == Some(domain.as_str()) => {
                report.bad(
                    format!("domains[{i}]"),
                    format!(
                        "{domain} is a public suffix (many unrelated owners register under it); name the tenant's own registrable domain, e.g. example.{domain}"
                    ),
                );
            }
            Ok(domain) => {
                if let Some(owner) = claims.domains.get(&domain) {
                    report.bad(
                        format!("domains[{i}]"),
                        format!("{domain} already belongs to RelayPolicy {owner:?}"),
                    );
                }
                domains.insert(domain);
            }
            Err(e) => report.bad(format!("domains[{i}]"), format!("{text:?} {e}")),
        }
    }
    let parent_domains: BTreeSet<Domain> = domains
        .iter()
        .flat_map(Domain::parents_to_registrable)
        .filter(|p| !domains.iter().any(|d| p.is_within(d)))
        .collect();

    let mut users = BTreeSet::new();
    for (i, text) in spec.users.iter().enumerate() {
        match text.parse::<Address>() {
            Ok(a) => {
                users.insert(a);
            }
            Err(e) => report.bad(format!("users[{i}]"), format!("{text:?} {e}")),
        }
    }
    if let Some(from) = &spec.users_from {
        let (field, directory) = match (&from.config_map_ref, &from.secret_ref) {
            (Some(r), None) => (
                "usersFrom.configMapRef",
                config_map_value(inputs, r).map(str::to_owned),
            ),
            (None, Some(r)) => (
                "usersFrom.secretRef",
                secret_value(inputs, r).and_then(|bytes| {
                    String::from_utf8(bytes.to_vec()).map_err(|_| {
                        format!("Secret {:?} key {:?} is not UTF-8 text", r.name, r.key)
                    })
                }),
            ),
            _ => (
                "usersFrom",
                Err("set exactly one of configMapRef or secretRef".to_owned()),
            ),
        };
        match directory {
            Ok(text) => read_directory(&text, field, &mut users, report),
            Err(why) => report.bad(field, why),
        }
    }

    let mut groups: BTreeMap<String, Group> = BTreeMap::new();
    for (i, g) in spec.groups.iter().enumerate() {
        let address = match g.address.parse::<Address>() {
            Ok(a) => Some(a),
            Err(e) => {
                report.bad(
                    format!("groups[{i}].address"),
                    format!("{:?} {e}", g.address),
                );
                None
            }
        };
        let mut members = BTreeSet::new();
        for (j, m) in g.members.iter().enumerate() {
            match m.parse::<Address>() {
                Ok(a) => {
                    members.insert(a);
                }
                Err(e) => report.bad(format!("groups[{i}].members[{j}]"), format!("{m:?} {e}")),
            }
        }
        if g.name.is_empty() {
            report.bad(format!("groups[{i}].name"), "must not be empty");
        } else if groups.contains_key(&g.name) {
            report.bad(
                format!("groups[{i}].name"),
                format!("group {:?} is defined twice", g.name),
            );
        } else if let Some(address) = address {
            groups.insert(
                g.name.clone(),
                Group {
                    name: g.name.clone(),
                    address,
                    members: members.into_iter().collect(),
                },
            );
        }
    }

    if spec.licenses == 0 {
        report.bad("licenses", "must be at least 1");
    }

    let auth = &spec.authentication;
    let mut ranges = BTreeSet::new();
    for (i, range) in auth.ip_ranges.iter().enumerate() {
        match parse_range(&range.cidr) {
            Ok(net) if range.enabled => {
                if let Some(owner) = claims.ranges.get(&net) {
                    report.bad(
                        format!("authentication.ipRanges[{i}].cidr"),
                        format!("{net} already belongs to RelayPolicy {owner:?}"),
                    );
                }
                ranges.insert(net);
            }
            // NB: a disabled range is still checked, so enabling it later cannot fail.
            Ok(_) => {}
            Err(e) => report.bad(format!("authentication.ipRanges[{i}].cidr"), e.to_string()),
        }
    }
    let accounts = match &auth.credentials_secret_ref {
        Some(r) => match inputs.secrets.get(&r.name) {
            None => {
                report.bad(
                    "authentication.credentialsSecretRef",
                    format!("no Secret {:?} in namespace {}", r.name, inputs.namespace),
                );
                None
            }
            Some(secret) if secret.is_empty() => {
                report.bad(
                    "authentication.credentialsSecretRef",
                    format!("Secret {:?} has no keys: add one key per username", r.name),
                );
                None
            }
            Some(secret) => {
                let mut accounts = BTreeMap::new();
                for (username, value) in secret {
                    // An AUTH identity binds the session to one tenant, so it must be unique.
                    if let Some(owner) = claims.usernames.get(username) {
                        report.bad(
                            "authentication.credentialsSecretRef",
                            format!(
                                "Secret {:?}: username {username:?} already belongs to RelayPolicy {owner:?}",
                                r.name
                            ),
                        );
                    }
                    match std::str::from_utf8(value).map(|v| v.trim_end_matches(['\r', '\n'])) {
                        Ok(v) if !v.is_empty() => {
                            accounts.insert(username.clone(), v.to_owned());
                        }
                        _ => report.bad(
                            "authentication.credentialsSecretRef",
                            format!(
                                "Secret {:?} key {username:?} must hold a password or an $argon2id$ or bcrypt hash",
                                r.name
                            ),
                        ),
                    }
                }
                Some(accounts)
            }
        },
        None => {
            if auth.require_smtp_auth && auth.service_accounts.is_empty() {
                report.bad(
                    "authentication.credentialsSecretRef",
                    "requireSMTPAuth is true but neither a credentials Secret nor serviceAccounts is given",
                );
            }
            None
        }
    };

    let mut service_accounts = BTreeSet::new();
    for (i, account) in auth.service_accounts.iter().enumerate() {
        let namespace = account.namespace.as_deref().unwrap_or(&inputs.namespace);
        if !is_label(namespace) {
            report.bad(
                format!("authentication.serviceAccounts[{i}].namespace"),
                format!("{namespace:?} is not a namespace name (lowercase letters, digits and '-', at most 63)"),
            );
            continue;
        }
        if !is_subdomain(&account.name) {
            report.bad(
                format!("authentication.serviceAccounts[{i}].name"),
                format!(
                    "{:?} is not a service account name (lowercase letters, digits, '-' and '.')",
                    account.name
                ),
            );
            continue;
        }
        let subject = format!("system:serviceaccount:{namespace}:{}", account.name);
        // A token binds the session to one tenant, so a service account belongs to one.
        if let Some(owner) = claims.service_accounts.get(&subject) {
            report.bad(
                format!("authentication.serviceAccounts[{i}]"),
                format!(
                    "{namespace}/{} already belongs to RelayPolicy {owner:?}",
                    account.name
                ),
            );
        }
        service_accounts.insert(subject);
    }
    for (field, route) in [
        ("outboundRoute", &spec.outbound_route),
        ("inboundRoute", &spec.inbound_route),
    ] {
        if let Some(route) = route {
            refs.route(route, field, report);
        }
    }

    let (dkim, dkim_keys) = super::dkim::compile(&spec.dkim, &domains, inputs, report);
    let tenant = Tenant {
        domains: domains.into_iter().collect(),
        parent_domains: parent_domains.into_iter().collect(),
        users: users.into_iter().collect(),
        groups: groups.into_values().collect(),
        licenses: spec.licenses,
        tier: spec.tier,
        limits: effective_limits(spec.licenses, spec.tier, spec.limits.as_ref()),
        allowed_senders: spec.allowed_senders,
        ip_ranges: ranges.into_iter().collect(),
        require_smtp_auth: auth.require_smtp_auth,
        service_accounts: service_accounts.into_iter().collect(),
        require_tls: spec.require_tls,
        outbound_route: spec.outbound_route.clone(),
        inbound_route: spec.inbound_route.clone(),
        rules: Vec::new(),
        dkim,
    };
    Some(CompiledPolicy {
        tenant,
        accounts,
        dkim_keys,
    })
}

/// Reads one address per line; blank lines and `#` comments are skipped.
fn read_directory(text: &str, field: &str, users: &mut BTreeSet<Address>, report: &mut Report<'_>) {
    let mut bad = 0usize;
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        match line.parse::<Address>() {
            Ok(a) => {
                users.insert(a);
            }
            Err(e) => {
                bad += 1;
                if bad <= MAX_LINE_PROBLEMS {
                    report.bad(field, format!("line {}: {line:?} {e}", n + 1));
                }
            }
        }
    }
    if bad > MAX_LINE_PROBLEMS {
        report.bad(field, format!("{} more bad lines", bad - MAX_LINE_PROBLEMS));
    }
}
