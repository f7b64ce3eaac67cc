//! Status conditions (SPEC 3, 7): `Ready` on every resource, from the compiler's problems.
//! Pure; the controller patches a status only when it changed, so a steady state writes
//! nothing.

use mailroute_config::document::Tenant;
use mailroute_config::resources::{Condition, RelayPolicyStatus};
use mailroute_config::{Credentials, Problem};

/// The `Ready` condition of one resource. `previous` keeps its transition time when the status
/// is unchanged; `now` is RFC 3339.
pub fn ready(
    problems: &[&Problem],
    generation: Option<i64>,
    previous: &[Condition],
    now: &str,
) -> Condition {
    let (status, reason, message) = if problems.is_empty() {
        (
            "True",
            "Compiled",
            "part of the relay configuration".to_owned(),
        )
    } else {
        (
            "False",
            "Invalid",
            problems
                .iter()
                .map(|p| format!("{}: {}", p.field, p.message))
                .collect::<Vec<_>>()
                .join("; "),
        )
    };
    let last_transition_time = previous
        .iter()
        .find(|c| c.type_ == "Ready" && c.status == status)
        .map(|c| c.last_transition_time.clone())
        .unwrap_or_else(|| now.to_owned());
    Condition {
        type_: "Ready".to_owned(),
        status: status.to_owned(),
        reason: reason.to_owned(),
        message,
        last_transition_time,
        observed_generation: generation,
    }
}

/// What a `RelayPolicy`'s status reports besides `Ready` (SPEC 3.3): registered users, groups,
/// enabled ranges, the client addresses they cover, the limits in force, and the DNS record of
/// each DKIM key (SPEC 12). Empty for a policy
/// that is not part of the document.
pub fn policy_facts(tenant: Option<&Tenant>, credentials: &Credentials) -> serde_json::Value {
    let Some(t) = tenant else {
        return serde_json::json!({});
    };
    let covered: u128 = t
        .ip_ranges
        .iter()
        .map(|r| 1u128 << (u32::from(r.max_prefix_len()) - u32::from(r.prefix_len())).min(127))
        .sum();
    serde_json::json!({
        "users": t.users.len(),
        "groups": t.groups.len(),
        "enabledRanges": t.ip_ranges.len(),
        "addressesCovered": u64::try_from(covered).unwrap_or(u64::MAX),
        "effectiveLimits": t.limits,
        "dkim": super::dkim::publications(t, credentials),
    })
}

/// The same facts as a stored status shows them.
pub fn stored_policy_facts(status: Option<&RelayPolicyStatus>) -> serde_json::Value {
    let Some(s) = status else {
        return serde_json::json!({});
    };
    if s.users.is_none() {
        return serde_json::json!({});
    }
    serde_json::json!({
        "users": s.users,
        "groups": s.groups,
        "enabledRanges": s.enabled_ranges,
        "addressesCovered": s.addresses_covered,
        "effectiveLimits": s.effective_limits,
        "dkim": s.dkim,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use mailroute_config::Kind;

    fn problem(field: &str, message: &str) -> Problem {
        Problem {
            kind: Kind::RoutingRule,
            name: "split".into(),
            field: field.into(),
            message: message.into(),
        }
    }

    #[test]
    fn an_invalid_resource_is_not_ready_and_the_message_names_the_field() {
        let p = problem("actions.route", "no MailRoute \"legacy\" in namespace mail");
        let c = ready(&[&p], Some(4), &[], "2026-11-22T12:00:00Z");
        assert_eq!((c.status.as_str(), c.reason.as_str()), ("False", "Invalid"));
        assert_eq!(
            c.message,
            "actions.route: no MailRoute \"legacy\" in namespace mail"
        );
        assert_eq!(c.observed_generation, Some(4));
    }

    #[test]
    fn the_transition_time_moves_only_when_the_status_changes() {
        let first = ready(&[], Some(1), &[], "t1");
        let same = ready(&[], Some(2), std::slice::from_ref(&first), "t2");
        assert_eq!(same.last_transition_time, "t1");
        let p = problem("priority", "must be at least 0");
        let changed = ready(&[&p], Some(3), &[same], "t3");
        assert_eq!(changed.last_transition_time, "t3");
    }
}
