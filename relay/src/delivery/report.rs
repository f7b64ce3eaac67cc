//! What delivery tells the operator: the metrics of each leg and transaction, and the one log
//! line of a transaction (SPEC 8).

use super::Forwarder;
use super::outcome::{LegOutcome, RecipientOutcome};
use crate::interfaces::Transaction;
use crate::metrics::{CopyLabels, RouteLabels, RuleLabels, TrafficLabels, UpstreamLabels};
use crate::reply::Reply;
use crate::routing::{Direction, Leg, Plan, Target};
use std::borrow::Cow;
use std::sync::Arc;
use std::time::Duration;

/// Rule matches (and the "would have" line of an audited rule).
pub(super) fn matches(fwd: &Forwarder, tx: &Transaction, plan: &Plan) {
    for (i, m) in &plan.matches {
        fwd.metrics
            .rule_matches
            .get_or_create(&RuleLabels {
                tenant: m.tenant.to_string(),
                rule: m.rule.to_string(),
                mode: if m.audit { "audit" } else { "enforce" }.to_owned(),
            })
            .inc();
        if m.audit {
            tracing::info!(transaction = %tx.id, tenant = %m.tenant, rule = %m.rule, recipient = %tx.recipients[*i].address, "audit: rule would have applied");
        }
    }
    fwd.metrics
        .copies_suppressed
        .inc_by(plan.copies_suppressed as u64);
}

/// One finished leg: its upstream's reply class and delay, and a copy's outcome.
pub(super) fn leg(fwd: &Forwarder, leg: &Leg, outcome: &LegOutcome, delay: Duration) {
    let outcomes = || outcome.recipients.iter().map(|(_, o)| o);
    let route = match &leg.target {
        Target::Route(name) => name.to_string(),
        Target::Mx(_) => "mx".to_owned(),
    };
    if leg.copy {
        let copy = if outcomes().all(|o| *o == RecipientOutcome::AlreadyDelivered) {
            "ledger"
        } else if outcomes().all(RecipientOutcome::is_delivered) {
            "delivered"
        } else if outcomes().any(|o| *o == RecipientOutcome::Withheld) {
            "withheld"
        } else if outcomes().any(|o| matches!(o, RecipientOutcome::Permanent(_))) {
            "refused"
        } else {
            "deferred"
        };
        if copy == "refused" {
            tracing::info!(route = %route, "copy refused permanently; counted, the client is not told");
        }
        fwd.metrics
            .copies
            .get_or_create(&CopyLabels {
                route: route.clone(),
                outcome: copy.to_owned(),
            })
            .inc();
    }
    if outcomes().all(|o| *o == RecipientOutcome::AlreadyDelivered) {
        return;
    }
    let class = if outcomes().all(RecipientOutcome::is_delivered) {
        "2xx"
    } else if outcomes().any(|o| matches!(o, RecipientOutcome::Permanent(_))) {
        "5xx"
    } else if outcomes().any(|o| matches!(o, RecipientOutcome::Temporary(_))) {
        "4xx"
    } else if outcomes().any(|o| *o == RecipientOutcome::Withheld) {
        "withheld"
    } else {
        "error"
    };
    fwd.metrics
        .upstream_replies
        .get_or_create(&UpstreamLabels {
            route: route.clone(),
            class: class.to_owned(),
        })
        .inc();
    fwd.metrics
        .delivery_duration
        .get_or_create(&RouteLabels { route })
        .observe(delay.as_secs_f64());
}

/// The transaction's counters and its one log line, when the client's reply is known.
pub(super) fn transaction(
    fwd: &Forwarder,
    tx: &Transaction,
    plan: &Plan,
    outcomes: &[Option<LegOutcome>],
    delays: &[Duration],
    reply: &Reply,
) {
    count(fwd, tx, plan, reply);
    log(tx, plan, outcomes, delays, reply);
}

fn count(fwd: &Forwarder, tx: &Transaction, plan: &Plan, reply: &Reply) {
    let outcome = match reply.code() / 100 {
        2 => "delivered",
        4 => "deferred",
        _ => "refused",
    };
    let label = |entry: Option<&(Arc<str>, Direction)>| TrafficLabels {
        tenant: entry
            .map(|(t, _)| t.to_string())
            .or_else(|| tx.tenant.as_deref().map(str::to_owned))
            .unwrap_or_else(|| "none".to_owned()),
        direction: entry.map_or("none", |(_, d)| d.as_str()).to_owned(),
        outcome: outcome.to_owned(),
    };
    fwd.metrics
        .messages
        .get_or_create(&label(plan.recipients.iter().flatten().next()))
        .inc();
    for entry in &plan.recipients {
        fwd.metrics
            .recipients
            .get_or_create(&label(entry.as_ref()))
            .inc();
    }
}

/// The one log line of a delivered (or refused, or deferred) transaction: never an address
/// of a recipient, a credential or the body; replies as codes only. Legs still running when
/// the reply was given say `running`.
fn log(
    tx: &Transaction,
    plan: &Plan,
    outcomes: &[Option<LegOutcome>],
    delays: &[Duration],
    reply: &Reply,
) {
    let direction = plan
        .recipients
        .iter()
        .flatten()
        .next()
        .map_or("none", |(_, d)| d.as_str());
    let legs: Vec<String> = plan
        .legs
        .iter()
        .enumerate()
        .map(|(i, leg)| {
            let answer = match outcomes.get(i).and_then(Option::as_ref) {
                None => Cow::Borrowed("running"),
                Some(o) => o
                    .recipients
                    .iter()
                    .find_map(|(_, o)| match o {
                        RecipientOutcome::Delivered => None,
                        RecipientOutcome::AlreadyDelivered => Some(Cow::Borrowed("ledger")),
                        RecipientOutcome::Withheld => Some(Cow::Borrowed("withheld")),
                        RecipientOutcome::Temporary(r)
                        | RecipientOutcome::Unreachable(r)
                        | RecipientOutcome::Permanent(r) => Some(Cow::Owned(format!(
                            "{} {}",
                            r.code(),
                            r.enhanced().unwrap_or_default()
                        ))),
                    })
                    .unwrap_or(Cow::Borrowed("250")),
            };
            let delay = delays.get(i).map_or(0, |d| d.as_millis());
            format!("{}={} {delay}ms", leg.target, answer.trim_end())
        })
        .collect();
    tracing::info!(
        transaction = %tx.id,
        tenant = tx.tenant.as_deref().unwrap_or("none"),
        direction,
        sender = %tx.mail_from,
        original_sender = tx.original_sender.as_deref(),
        recipients = tx.recipients.len(),
        size = tx.content.len() - tx.received_len,
        legs = %legs.join(", "),
        reply = %format_args!("{} {}", reply.code(), reply.enhanced().unwrap_or_default()),
        "transaction"
    );
}
