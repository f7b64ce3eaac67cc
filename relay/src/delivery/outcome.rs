//! What the client is told after end of data (SPEC 6.5), from what each leg's upstream said,
//! and when a copy may be completed (SPEC 6.3). Pure functions, so every rule is tested on its
//! own.

use crate::reply::Reply;

/// What happened to one recipient of one leg.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RecipientOutcome {
    Delivered,
    /// Recorded in the ledger by an earlier attempt: not sent again.
    AlreadyDelivered,
    /// A 4xx from the upstream.
    Temporary(Reply),
    /// No upstream answer: a refused connection, a timeout, a TLS policy failure, a DNS
    /// failure (the reply is the relay's own, temporary).
    Unreachable(Reply),
    /// A 5xx (or a recipient the configuration refused at end of data).
    Permanent(Reply),
    /// A copy abandoned before its final `.` because the message's primary delivery did not
    /// succeed (SPEC 6.3): the primary legs' outcome is what the client hears.
    Withheld,
}

impl RecipientOutcome {
    pub fn is_delivered(&self) -> bool {
        matches!(
            self,
            RecipientOutcome::Delivered | RecipientOutcome::AlreadyDelivered
        )
    }

    /// From an upstream refusal's class.
    pub fn refused(reply: Reply) -> Self {
        if reply.code() >= 500 {
            RecipientOutcome::Permanent(reply)
        } else {
            RecipientOutcome::Temporary(reply)
        }
    }
}

/// One leg's result.
#[derive(Clone, Debug)]
pub struct LegOutcome {
    /// Route name (or `mx:domain`), for the client's reply and logs.
    pub target: String,
    pub required: bool,
    /// An extra copy (`alsoDeliverTo`): completed only once the primary legs accepted.
    pub copy: bool,
    /// Addresses and outcomes, in the leg's order.
    pub recipients: Vec<(String, RecipientOutcome)>,
}

/// The reply after end of data:
/// - a temporary failure on any leg that counts gives `451 4.4.x` naming the route(s), and the
///   client's retry re-sends only what failed (the ledger);
/// - otherwise a permanent refusal gives the upstream's 5xx (naming the recipients when others
///   were delivered: a queue-less relay cannot bounce for some recipients only, so the client
///   is told, and its bounce reaches the sender);
/// - otherwise `250`.
///
/// The legs that count are the `Required` ones; when a message has none, at least one leg must
/// have delivered it (a best-effort-only plan must not lose the message behind a 250).
pub fn client_reply(transaction_id: &str, legs: &[LegOutcome]) -> Reply {
    let any_required = legs.iter().any(|l| l.required);
    let counted: Vec<&LegOutcome> = legs
        .iter()
        .filter(|l| l.required || !any_required)
        .collect();
    let temporary: Vec<(&str, &Reply, bool)> = counted
        .iter()
        .flat_map(|l| {
            l.recipients.iter().filter_map(move |(_, o)| match o {
                RecipientOutcome::Temporary(r) => Some((l.target.as_str(), r, true)),
                RecipientOutcome::Unreachable(r) => Some((l.target.as_str(), r, false)),
                _ => None,
            })
        })
        .collect();
    let delivered = counted
        .iter()
        .filter(|l| !l.copy)
        .flat_map(|l| &l.recipients)
        .filter(|(_, o)| o.is_delivered())
        .count();
    if !any_required && delivered > 0 {
        return Reply::message_accepted(transaction_id);
    }
    if let Some((_, first, from_upstream)) = temporary.first() {
        let mut routes: Vec<&str> = temporary.iter().map(|(t, _, _)| *t).collect();
        routes.dedup();
        let enhanced = match first.enhanced() {
            // 4.7.0: the route's OAuth token could not be had (SPEC 11). A TLS the route, a
            // rule, MTA-STS or DANE requires and could not be had is 4.4.0 like any other
            // temporary failure (SPEC 6.5: 451 4.4.x); the text names the policy.
            Some(e) if e.starts_with("4.4.") || e == "4.7.0" => e.to_owned(),
            _ => "4.4.0".to_owned(),
        };
        return Reply::relayed(
            451,
            Some(&enhanced),
            if *from_upstream {
                format!(
                    "Not delivered yet via route {}: upstream said {} {}; try again later",
                    routes.join(", "),
                    first.code(),
                    first.text()
                )
            } else {
                format!(
                    "Not delivered yet via route {}: {}; try again later",
                    routes.join(", "),
                    first.text()
                )
            },
        );
    }
    // NB: a copy never turns a delivered message into a bounce (SPEC 6.5): its permanent
    // refusal is counted and logged, not told.
    let permanent: Vec<(&str, &str, &Reply)> = counted
        .iter()
        .filter(|l| !l.copy)
        .flat_map(|l| {
            l.recipients.iter().filter_map(move |(a, o)| match o {
                RecipientOutcome::Permanent(r) => Some((l.target.as_str(), a.as_str(), r)),
                _ => None,
            })
        })
        .collect();
    if let Some((route, _, first)) = permanent.first() {
        let text = if delivered == 0 {
            format!("Refused via route {route}: {}", first.text())
        } else {
            let refused: Vec<&str> = permanent.iter().map(|(_, a, _)| *a).collect();
            format!(
                "Not delivered to {} via route {route}: {} (other recipients were delivered)",
                refused.join(", "),
                first.text()
            )
        };
        return Reply::relayed(first.code(), first.enhanced(), text);
    }
    if delivered == 0 {
        return Reply::new(
            451,
            "4.4.0",
            "Message not delivered to any destination; try again later",
        );
    }
    Reply::message_accepted(transaction_id)
}

/// Whether the copies may be completed (SPEC 6.3), from the primary legs' outcomes so far
/// (`None`: still running): `Some(true)` once every primary leg that counts for the reply
/// accepted, `Some(false)` as soon as one of them did not (the copies are abandoned), `None`
/// while that is not known. The legs that count are the required primaries; with none, the
/// first primary that delivers opens the way, and all of them failing closes it.
pub fn copies_may_complete(primaries: &[(bool, Option<&LegOutcome>)]) -> Option<bool> {
    let delivered = |l: &LegOutcome| l.recipients.iter().all(|(_, o)| o.is_delivered());
    let any_required = primaries.iter().any(|(required, _)| *required);
    if any_required {
        let mut pending = false;
        for (required, outcome) in primaries {
            match (required, outcome) {
                (false, _) => {}
                (true, None) => pending = true,
                (true, Some(l)) if !delivered(l) => return Some(false),
                (true, Some(_)) => {}
            }
        }
        return (!pending).then_some(true);
    }
    if primaries.iter().any(|(_, o)| o.is_some_and(delivered)) {
        return Some(true);
    }
    primaries.iter().all(|(_, o)| o.is_some()).then_some(false)
}

/// Whether the client's reply can be given now (SPEC 6.5): once every required leg (primary
/// or copy) has its outcome; when the message has no required leg, once one leg delivered it
/// or all are done. Best-effort legs never hold the reply.
pub fn reply_ready(legs: &[(bool, Option<&LegOutcome>)]) -> bool {
    let any_required = legs.iter().any(|(required, _)| *required);
    if any_required {
        return legs.iter().all(|(required, o)| !required || o.is_some());
    }
    legs.iter().all(|(_, o)| o.is_some())
        || legs
            .iter()
            .any(|(_, o)| o.is_some_and(|l| l.recipients.iter().any(|(_, o)| o.is_delivered())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use RecipientOutcome::*;

    fn leg(target: &str, required: bool, outcomes: Vec<RecipientOutcome>) -> LegOutcome {
        LegOutcome {
            target: target.into(),
            required,
            copy: false,
            recipients: outcomes
                .into_iter()
                .enumerate()
                .map(|(i, o)| (format!("r{i}@example.com"), o))
                .collect(),
        }
    }

    fn temp() -> RecipientOutcome {
        Temporary(Reply::relayed(421, Some("4.3.2"), "busy"))
    }

    fn perm() -> RecipientOutcome {
        Permanent(Reply::relayed(550, Some("5.1.1"), "no such user"))
    }

    #[test]
    fn the_reply_follows_the_required_legs() {
        let ok = client_reply("t1", &[leg("mailbox", true, vec![Delivered])]);
        assert_eq!(ok.code(), 250);

        let r = client_reply(
            "t1",
            &[
                leg("mailbox", true, vec![Delivered]),
                leg("legacy", true, vec![temp()]),
            ],
        );
        assert_eq!((r.code(), r.enhanced()), (451, Some("4.4.0")));
        assert!(r.text().contains("route legacy"), "{}", r.text());
        assert!(r.text().contains("421 busy"), "{}", r.text());

        // A best-effort leg never changes the reply.
        let r = client_reply(
            "t1",
            &[
                leg("smarthost", true, vec![Delivered]),
                leg("archive", false, vec![temp()]),
            ],
        );
        assert_eq!(r.code(), 250);

        // Every recipient refused permanently: the upstream's own code.
        let r = client_reply("t1", &[leg("mailbox", true, vec![perm(), perm()])]);
        assert_eq!((r.code(), r.enhanced()), (550, Some("5.1.1")));

        // Some delivered, some refused: still 5xx, naming who was not delivered.
        let r = client_reply("t1", &[leg("mailbox", true, vec![Delivered, perm()])]);
        assert_eq!(r.code(), 550);
        assert!(r.text().contains("r1@example.com"), "{}", r.text());

        // A retry where the ledger covers what succeeded before.
        let r = client_reply(
            "t1",
            &[
                leg("mailbox", true, vec![AlreadyDelivered]),
                leg("legacy", true, vec![Delivered]),
            ],
        );
        assert_eq!(r.code(), 250);

        // Temporary wins over permanent: the client retries, the ledger keeps what succeeded.
        let r = client_reply("t1", &[leg("mailbox", true, vec![temp(), perm()])]);
        assert_eq!(r.code(), 451);

        // Only best-effort legs: one must have delivered.
        let r = client_reply("t1", &[leg("archive", false, vec![temp()])]);
        assert_eq!(r.code(), 451);
        let r = client_reply(
            "t1",
            &[
                leg("a", false, vec![temp()]),
                leg("b", false, vec![Delivered]),
            ],
        );
        assert_eq!(r.code(), 250);

        // A connection timeout keeps its 4.4.x detail.
        let timeout = Unreachable(Reply::new(451, "4.4.2", "connect timed out"));
        let r = client_reply("t1", &[leg("mailbox", true, vec![timeout])]);
        assert_eq!(r.enhanced(), Some("4.4.2"));
    }

    fn copy(target: &str, required: bool, outcomes: Vec<RecipientOutcome>) -> LegOutcome {
        LegOutcome {
            copy: true,
            ..leg(target, required, outcomes)
        }
    }

    #[test]
    fn a_copy_never_turns_a_delivered_message_into_a_bounce() {
        // The primary accepted, a required copy refused permanently: 250, the copy counted.
        let r = client_reply(
            "t1",
            &[
                leg("mailbox", true, vec![Delivered]),
                copy("legacy", true, vec![perm()]),
            ],
        );
        assert_eq!(r.code(), 250, "{r}");
        // A required copy's temporary failure: 451 naming it; the retry re-sends only it.
        let r = client_reply(
            "t1",
            &[
                leg("mailbox", true, vec![Delivered]),
                copy("legacy", true, vec![temp()]),
            ],
        );
        assert_eq!(r.code(), 451, "{r}");
        assert!(r.text().contains("route legacy"), "{r}");
        // The primary refused: its 5xx, the withheld copy says nothing.
        let r = client_reply(
            "t1",
            &[
                leg("mailbox", true, vec![perm()]),
                copy("archive", true, vec![Withheld]),
            ],
        );
        assert_eq!((r.code(), r.enhanced()), (550, Some("5.1.1")), "{r}");
    }

    #[test]
    fn copies_wait_for_the_required_primaries() {
        let ok = leg("mailbox", true, vec![Delivered]);
        let refused = leg("mailbox", true, vec![perm()]);
        let deferred = leg("legacy", true, vec![temp()]);
        assert_eq!(copies_may_complete(&[(true, None)]), None);
        assert_eq!(copies_may_complete(&[(true, Some(&ok))]), Some(true));
        assert_eq!(copies_may_complete(&[(true, Some(&refused))]), Some(false));
        // One required primary failed: abandon at once, without waiting for the other.
        assert_eq!(
            copies_may_complete(&[(true, None), (true, Some(&deferred))]),
            Some(false)
        );
        assert_eq!(
            copies_may_complete(&[(true, Some(&ok)), (true, None)]),
            None
        );
        // A best-effort primary does not hold the copies when a required one exists.
        assert_eq!(
            copies_may_complete(&[(true, Some(&ok)), (false, None)]),
            Some(true)
        );
        // Only best-effort primaries: the first delivery opens, all failing closes.
        assert_eq!(
            copies_may_complete(&[(false, None), (false, Some(&ok))]),
            Some(true)
        );
        assert_eq!(
            copies_may_complete(&[(false, Some(&deferred)), (false, None)]),
            None
        );
        assert_eq!(
            copies_may_complete(&[(false, Some(&deferred)), (false, Some(&refused))]),
            Some(false)
        );
        // A partly refused primary leg is not an acceptance.
        let partly = leg("mailbox", true, vec![Delivered, perm()]);
        assert_eq!(copies_may_complete(&[(true, Some(&partly))]), Some(false));
    }

    #[test]
    fn best_effort_legs_never_hold_the_reply() {
        let ok = leg("mailbox", true, vec![Delivered]);
        assert!(reply_ready(&[(true, Some(&ok)), (false, None)]));
        assert!(!reply_ready(&[(true, Some(&ok)), (true, None)]));
        assert!(!reply_ready(&[(false, None), (false, None)]));
        let best = leg("archive", false, vec![Delivered]);
        assert!(reply_ready(&[(false, Some(&best)), (false, None)]));
    }
}
