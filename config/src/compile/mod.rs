//! The pure compiler (SPEC section 4): the resources of one namespace, with the Secrets and
//! ConfigMaps they reference, in; one relay configuration, its credentials, and every problem
//! found, out. No I/O, no clock, no client: the operator, `render` and `mailroute-relay
//! --manifests` all call [`compile`].
//!
//! Invalid resources are left out and reported, each problem naming the resource and the field;
//! valid resources still compile. A resource that depends on an invalid one (a rule whose route
//! is invalid) is itself left out, with a problem saying why. The output depends only on the
//! set of inputs, never on their order.

mod dkim;
mod limits;
mod policy;
mod route;
mod rule;

pub use limits::effective_limits;

use crate::document::{Credentials, RelayConfig, RelayDocument};
use crate::resources::{KeyRef, MailRouteSpec, RelayPolicySpec, RoutingRuleSpec};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

/// One resource as the compiler sees it: its name, its `metadata.generation`, its spec.
#[derive(Clone, Debug, PartialEq)]
pub struct Object<S> {
    pub name: String,
    pub generation: Option<i64>,
    pub spec: S,
}

impl<S> Object<S> {
    pub fn new(name: impl Into<String>, spec: S) -> Self {
        Self {
            name: name.into(),
            generation: None,
            spec,
        }
    }
}

/// Everything of one namespace the compiler reads.
#[derive(Clone, Debug, Default)]
pub struct Inputs {
    pub namespace: String,
    pub routes: Vec<Object<MailRouteSpec>>,
    pub policies: Vec<Object<RelayPolicySpec>>,
    pub rules: Vec<Object<RoutingRuleSpec>>,
    /// Secret name -> key -> decoded value.
    pub secrets: BTreeMap<String, BTreeMap<String, Vec<u8>>>,
    /// ConfigMap name -> key -> value.
    pub config_maps: BTreeMap<String, BTreeMap<String, String>>,
}

/// The kinds of resource a problem can be about.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    MailRoute,
    RelayPolicy,
    RoutingRule,
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Kind::MailRoute => "MailRoute",
            Kind::RelayPolicy => "RelayPolicy",
            Kind::RoutingRule => "RoutingRule",
        })
    }
}

/// Something wrong with one field of one resource. Displayed as
/// `RoutingRule/split: actions.route: no MailRoute "legacy" in namespace mail`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Problem {
    pub kind: Kind,
    pub name: String,
    /// The field path in the resource's spec, e.g. `authentication.ipRanges[2].cidr`.
    pub field: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}/{}: {}: {}",
            self.kind, self.name, self.field, self.message
        )
    }
}

/// The result of a compile.
#[derive(Debug, Default)]
pub struct Compiled {
    /// What the relay enforces: every valid resource.
    pub config: RelayConfig,
    /// Secret material referenced by `config`.
    pub credentials: Credentials,
    /// Every problem, sorted by kind, name and field.
    pub problems: Vec<Problem>,
}

impl Compiled {
    /// The versioned document for this configuration.
    pub fn document(&self, generation: u64) -> RelayDocument {
        RelayDocument::new(generation, self.config.clone())
    }

    /// The problems of one resource.
    pub fn problems_of<'a>(
        &'a self,
        kind: Kind,
        name: &'a str,
    ) -> impl Iterator<Item = &'a Problem> {
        self.problems
            .iter()
            .filter(move |p| p.kind == kind && p.name == name)
    }
}

/// Problems of the resource being compiled.
struct Report<'a> {
    kind: Kind,
    name: &'a str,
    problems: Vec<Problem>,
}

impl<'a> Report<'a> {
    fn new(kind: Kind, name: &'a str) -> Self {
        Self {
            kind,
            name,
            problems: Vec::new(),
        }
    }

    fn bad(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.problems.push(Problem {
            kind: self.kind,
            name: self.name.to_owned(),
            field: field.into(),
            message: message.into(),
        });
    }

    fn is_clean(&self) -> bool {
        self.problems.is_empty()
    }
}

/// Looks up a Secret key, or says precisely what is missing.
fn secret_value<'i>(inputs: &'i Inputs, r: &KeyRef) -> Result<&'i [u8], String> {
    let secret = inputs
        .secrets
        .get(&r.name)
        .ok_or_else(|| format!("no Secret {:?} in namespace {}", r.name, inputs.namespace))?;
    secret
        .get(&r.key)
        .map(Vec::as_slice)
        .ok_or_else(|| format!("Secret {:?} has no key {:?}", r.name, r.key))
}

/// Looks up a ConfigMap key, or says precisely what is missing.
fn config_map_value<'i>(inputs: &'i Inputs, r: &KeyRef) -> Result<&'i str, String> {
    let map = inputs.config_maps.get(&r.name).ok_or_else(|| {
        format!(
            "no ConfigMap {:?} in namespace {}",
            r.name, inputs.namespace
        )
    })?;
    map.get(&r.key)
        .map(String::as_str)
        .ok_or_else(|| format!("ConfigMap {:?} has no key {:?}", r.name, r.key))
}

/// Parses a duration such as `30s`, `5m`, `1m30s`, `500ms` into milliseconds.
fn duration_ms(text: &str) -> Result<u64, String> {
    let duration = humantime::parse_duration(text.trim())
        .map_err(|_| format!("{text:?} is not a duration such as 500ms, 30s, 5m or 1m30s"))?;
    u64::try_from(duration.as_millis()).map_err(|_| format!("{text:?} is too long"))
}

/// Names that occur more than once, with the objects of unique names in name order. A name
/// given twice is ambiguous, so every object of that name is left out.
fn unique_by_name<S>(objects: &[Object<S>]) -> (Vec<&Object<S>>, BTreeSet<&str>) {
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for o in objects {
        *counts.entry(o.name.as_str()).or_default() += 1;
    }
    let duplicates: BTreeSet<&str> = counts
        .iter()
        .filter(|(_, n)| **n > 1)
        .map(|(name, _)| *name)
        .collect();
    let mut unique: Vec<&Object<S>> = objects
        .iter()
        .filter(|o| !duplicates.contains(o.name.as_str()))
        .collect();
    unique.sort_by(|a, b| a.name.cmp(&b.name));
    (unique, duplicates)
}

/// Compiles one namespace. Never fails: what cannot be compiled is in `problems`.
pub fn compile(inputs: &Inputs) -> Compiled {
    let mut out = Compiled {
        config: RelayConfig {
            namespace: inputs.namespace.clone(),
            ..RelayConfig::default()
        },
        ..Compiled::default()
    };

    let (routes, duplicate_routes) = unique_by_name(&inputs.routes);
    let (policies, duplicate_policies) = unique_by_name(&inputs.policies);
    let (rules, duplicate_rules) = unique_by_name(&inputs.rules);
    for (kind, names) in [
        (Kind::MailRoute, &duplicate_routes),
        (Kind::RelayPolicy, &duplicate_policies),
        (Kind::RoutingRule, &duplicate_rules),
    ] {
        for name in names {
            out.problems.push(Problem {
                kind,
                name: (*name).to_owned(),
                field: "metadata.name".to_owned(),
                message: "defined more than once; every definition is left out".to_owned(),
            });
        }
    }

    // Names of every resource given, valid or not, so a reference to an invalid resource is
    // told apart from a reference to a missing one.
    let route_names = Names::new(Kind::MailRoute, &inputs.routes, &inputs.namespace);
    for object in routes {
        let mut report = Report::new(Kind::MailRoute, &object.name);
        let compiled = route::compile(object, inputs, &mut report, &mut out.credentials);
        match compiled {
            Some(route) if report.is_clean() => {
                out.config.routes.insert(object.name.clone(), route);
            }
            _ => {
                out.credentials.routes.remove(&object.name);
                out.credentials.ca_bundles.remove(&object.name);
            }
        }
        out.problems.extend(report.problems);
    }

    let mut claims = policy::Claims::default();
    for object in policies {
        let mut report = Report::new(Kind::RelayPolicy, &object.name);
        let refs = Refs {
            routes: &route_names,
            valid_routes: &out.config.routes,
        };
        let compiled = policy::compile(object, inputs, &refs, &mut claims, &mut report);
        if let Some(policy::CompiledPolicy {
            tenant,
            accounts,
            dkim_keys,
        }) = compiled
            && report.is_clean()
        {
            claims.commit(&object.name, &tenant, accounts.as_ref());
            if let Some(accounts) = accounts {
                out.credentials
                    .tenants
                    .insert(object.name.clone(), accounts);
            }
            out.credentials.dkim.extend(dkim_keys);
            out.config.tenants.insert(object.name.clone(), tenant);
        }
        out.problems.extend(report.problems);
    }

    let policy_names = Names::new(Kind::RelayPolicy, &inputs.policies, &inputs.namespace);
    for object in rules {
        let mut report = Report::new(Kind::RoutingRule, &object.name);
        let refs = Refs {
            routes: &route_names,
            valid_routes: &out.config.routes,
        };
        let tenant = rule::tenant_of(object, &policy_names, &out.config.tenants, &mut report);
        if let Some(tenant) = tenant {
            let compiled = rule::compile(object, tenant, &refs, &mut report);
            if let Some(compiled) = compiled
                && report.is_clean()
                && let Some(tenant) = out.config.tenants.get_mut(&object.spec.policy_ref)
            {
                tenant.rules.push(compiled);
            }
        }
        out.problems.extend(report.problems);
    }
    for tenant in out.config.tenants.values_mut() {
        tenant
            .rules
            .sort_by(|a, b| (a.priority, &a.name).cmp(&(b.priority, &b.name)));
    }

    // The relay runs these same checks on load; the compiler must never produce a document
    // the relay refuses.
    if let Err(inconsistencies) = out.config.check() {
        for message in inconsistencies {
            tracing::error!(%message, "compiler produced an inconsistent document");
            out.problems.push(Problem {
                kind: Kind::RelayPolicy,
                name: "-".to_owned(),
                field: "-".to_owned(),
                message: format!("internal error, please report: {message}"),
            });
        }
    }
    out.problems.sort();
    out
}

/// The names given for one kind (valid or not).
struct Names<'a> {
    kind: Kind,
    namespace: &'a str,
    given: BTreeSet<&'a str>,
}

impl<'a> Names<'a> {
    fn new<S>(kind: Kind, objects: &'a [Object<S>], namespace: &'a str) -> Self {
        Self {
            kind,
            namespace,
            given: objects.iter().map(|o| o.name.as_str()).collect(),
        }
    }

    /// Why `name` cannot be used, given whether it compiled.
    fn why_unusable(&self, name: &str, valid: bool) -> Option<String> {
        if valid {
            None
        } else if self.given.contains(name) {
            Some(format!(
                "{} {name:?} is invalid (see its status)",
                self.kind
            ))
        } else {
            Some(format!(
                "no {} {name:?} in namespace {}",
                self.kind, self.namespace
            ))
        }
    }
}

/// What a policy or rule may refer to.
struct Refs<'a> {
    routes: &'a Names<'a>,
    valid_routes: &'a BTreeMap<String, crate::document::Route>,
}

impl Refs<'_> {
    /// Checks a route reference, reporting it on `field` when unusable.
    fn route(&self, name: &str, field: &str, report: &mut Report<'_>) -> bool {
        match self
            .routes
            .why_unusable(name, self.valid_routes.contains_key(name))
        {
            None => true,
            Some(why) => {
                report.bad(field, why);
                false
            }
        }
    }
}
