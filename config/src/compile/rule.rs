//! RoutingRule -> [`Rule`] of its tenant.

use super::{Names, Object, Refs, Report};
use crate::document::{Actions, Copy, Header, Matcher, Pattern, Reject, Rule, Tenant};
use crate::names::{Address, Domain};
use crate::resources::{AccountType, AddressMatcher, RoutingRuleSpec};
use std::collections::{BTreeMap, BTreeSet};

/// The compiled tenant a rule belongs to, or a problem on `policyRef`.
pub(super) fn tenant_of<'t>(
    object: &Object<RoutingRuleSpec>,
    policies: &Names<'_>,
    tenants: &'t BTreeMap<String, Tenant>,
    report: &mut Report<'_>,
) -> Option<&'t Tenant> {
    let name = &object.spec.policy_ref;
    let tenant = tenants.get(name);
    if let Some(why) = policies.why_unusable(name, tenant.is_some()) {
        report.bad("policyRef", why);
    }
    tenant
}

pub(super) fn compile(
    object: &Object<RoutingRuleSpec>,
    tenant: &Tenant,
    refs: &Refs<'_>,
    report: &mut Report<'_>,
) -> Option<Rule> {
    let spec = &object.spec;
    let messages: BTreeSet<_> = spec.messages.iter().copied().collect();
    if messages.is_empty() {
        report.bad(
            "messages",
            "needs at least one of Inbound, InternalReceiving, Outbound, InternalSending",
        );
    }
    let account_types: BTreeSet<_> = match &spec.account_types {
        Some(types) if types.is_empty() => {
            report.bad(
                "accountTypes",
                "must not be empty: leave it out to mean all account types",
            );
            BTreeSet::new()
        }
        Some(types) => types.iter().copied().collect(),
        None => [
            AccountType::Users,
            AccountType::Groups,
            AccountType::Unrecognized,
        ]
        .into(),
    };

    let filter = spec.envelope_filter.clone().unwrap_or_default();
    let senders = matchers(&filter.senders, "envelopeFilter.senders", tenant, report);
    let recipients = matchers(
        &filter.recipients,
        "envelopeFilter.recipients",
        tenant,
        report,
    );

    let a = &spec.actions;
    if let Some(route) = &a.route {
        refs.route(route, "actions.route", report);
    }
    let mut copies = Vec::with_capacity(a.also_deliver_to.len());
    let mut seen = BTreeSet::new();
    for (i, c) in a.also_deliver_to.iter().enumerate() {
        let field = format!("actions.alsoDeliverTo[{i}]");
        if let Some(route) = &c.route {
            refs.route(route, &format!("{field}.route"), report);
        }
        if c.route.is_none() && c.recipient.is_none() {
            report.bad(field, "set route, recipient, or both");
            continue;
        }
        let recipient = match &c.recipient {
            Some(text) => match text.parse::<Address>() {
                Ok(a) => Some(a),
                Err(e) => {
                    report.bad(format!("{field}.recipient"), format!("{text:?} {e}"));
                    continue;
                }
            },
            None => None,
        };
        // A copy never goes twice to the same place (SPEC section 6.3).
        if !seen.insert((c.route.clone(), recipient.clone())) {
            report.bad(field, "the same copy is listed twice");
            continue;
        }
        copies.push(Copy {
            route: c.route.clone(),
            recipient,
            suppress_bounces: c.suppress_bounces,
        });
    }
    let rewrite = match &a.rewrite_recipient_domain {
        Some(text) => match text.parse::<Domain>() {
            Ok(d) => Some(d),
            Err(e) => {
                report.bad("actions.rewriteRecipientDomain", format!("{text:?} {e}"));
                None
            }
        },
        None => None,
    };
    let mut headers = Vec::with_capacity(a.add_headers.len());
    for (i, h) in a.add_headers.iter().enumerate() {
        let name_ok = h.name.len() > 2
            && h.name[..2].eq_ignore_ascii_case("x-")
            && h.name.bytes().all(|b| (33..=126).contains(&b) && b != b':');
        if !name_ok {
            report.bad(
                format!("actions.addHeaders[{i}].name"),
                format!(
                    "{:?} must start with X- and contain only printable ASCII without ':'",
                    h.name
                ),
            );
        }
        if h.value
            .chars()
            .any(|c| c == '\r' || c == '\n' || (c.is_control() && c != '\t'))
        {
            report.bad(
                format!("actions.addHeaders[{i}].value"),
                "must be one line: no CR, LF or control characters",
            );
        }
        headers.push(Header {
            name: h.name.clone(),
            value: h.value.clone(),
        });
    }
    let reject = a.reject.as_ref().map(|r| {
        if !(400..=599).contains(&r.code) {
            report.bad(
                "actions.reject.code",
                format!("{} is not a 4xx or 5xx reply code", r.code),
            );
        }
        let class_ok = r.enhanced_code.split('.').count() == 3
            && r.enhanced_code
                .split('.')
                .all(|p| !p.is_empty() && p.len() <= 3 && p.bytes().all(|b| b.is_ascii_digit()))
            && r.enhanced_code.starts_with(&format!("{}.", r.code / 100));
        if !class_ok {
            report.bad(
                "actions.reject.enhancedCode",
                format!(
                    "{:?} must look like {}.x.y, of the same class as code {}",
                    r.enhanced_code,
                    r.code / 100,
                    r.code
                ),
            );
        }
        if r.text.is_empty() || !r.text.bytes().all(|b| (32..=126).contains(&b)) {
            report.bad(
                "actions.reject.text",
                "must be one non-empty line of printable ASCII",
            );
        }
        Reject {
            code: r.code,
            enhanced_code: r.enhanced_code.clone(),
            text: r.text.clone(),
        }
    });
    if reject.is_some()
        && (a.route.is_some()
            || !a.also_deliver_to.is_empty()
            || a.rewrite_recipient_domain.is_some())
    {
        report.bad(
            "actions.reject",
            "cannot be combined with route, alsoDeliverTo or rewriteRecipientDomain",
        );
    }

    Some(Rule {
        name: object.name.clone(),
        priority: spec.priority,
        messages: messages.into_iter().collect(),
        senders,
        recipients,
        account_types: account_types.into_iter().collect(),
        actions: Actions {
            route: a.route.clone(),
            also_deliver_to: copies,
            rewrite_recipient_domain: rewrite,
            require_tls: a.require_tls,
            add_headers: headers,
            reject,
        },
        stop_processing: spec.stop_processing,
        mode: spec.mode,
    })
}

fn matchers(
    given: &[AddressMatcher],
    field: &str,
    tenant: &Tenant,
    report: &mut Report<'_>,
) -> Vec<Matcher> {
    let mut out = Vec::with_capacity(given.len());
    for (i, m) in given.iter().enumerate() {
        let field = format!("{field}[{i}]");
        let set = [
            m.address.is_some(),
            m.pattern.is_some(),
            m.domain.is_some(),
            m.group.is_some(),
        ];
        if set.iter().filter(|s| **s).count() != 1 {
            report.bad(
                field,
                "set exactly one of address, pattern, domain or group",
            );
            continue;
        }
        let matcher = if let Some(text) = &m.address {
            text.parse::<Address>()
                .map(Matcher::Address)
                .map_err(|e| (format!("{field}.address"), format!("{text:?} {e}")))
        } else if let Some(text) = &m.pattern {
            Pattern::new(text).map(Matcher::Pattern).map_err(|e| {
                (
                    format!("{field}.pattern"),
                    format!("invalid regular expression: {}", first_line(&e.to_string())),
                )
            })
        } else if let Some(text) = &m.domain {
            text.parse::<Domain>()
                .map(Matcher::Domain)
                .map_err(|e| (format!("{field}.domain"), format!("{text:?} {e}")))
        } else if let Some(name) = &m.group {
            if tenant.groups.iter().any(|g| &g.name == name) {
                Ok(Matcher::Group(name.clone()))
            } else {
                Err((
                    format!("{field}.group"),
                    format!("no group {name:?} in the rule's RelayPolicy"),
                ))
            }
        } else {
            continue;
        };
        match matcher {
            Ok(m) => out.push(m),
            Err((field, why)) => report.bad(field, why),
        }
    }
    out
}

/// regex errors span several lines with a caret diagram; a status message wants the gist.
fn first_line(text: &str) -> String {
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    match lines.iter().rev().find(|l| l.starts_with("error:")) {
        Some(last) => last.trim_start_matches("error:").trim().to_owned(),
        None => lines.join(" "),
    }
}
