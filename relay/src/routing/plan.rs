//! The delivery plan of one message (SPEC 6.3): recipients grouped into legs, one SMTP
//! transaction per (target, copy or not, TLS requirement, added headers), copies deduplicated.

use super::{Direction, RecipientRoute, Router, RuleMatch, Target};
use crate::reply::Reply;
use mailroute_config::document::Header;
use std::collections::HashSet;

/// One recipient of a leg.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LegRecipient {
    /// The address given to the upstream.
    pub address: String,
    /// Index of the client's recipient this delivery is for.
    pub original: usize,
    /// `NOTIFY=NEVER` where the upstream offers DSN.
    pub notify_never: bool,
}

/// One SMTP transaction to one target.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Leg {
    pub target: Target,
    /// An extra copy (`alsoDeliverTo`): it carries the loop marker.
    pub copy: bool,
    /// Whether a failure holds the client's reply (the route's `delivery`).
    pub required: bool,
    /// TLS whatever the route says (`actions.requireTLS`).
    pub require_tls: bool,
    /// Headers prepended to the message for this leg.
    pub headers: Vec<Header>,
    pub recipients: Vec<LegRecipient>,
}

/// What to do with one message.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub legs: Vec<Leg>,
    /// Recipients that cannot be delivered (no route was decided for them): index of the
    /// client's recipient and the reply.
    pub refused: Vec<(usize, Reply)>,
    /// Tenant and direction per client recipient (`None` when refused), for metrics.
    pub recipients: Vec<Option<(std::sync::Arc<str>, Direction)>>,
    /// Every rule that matched, for metrics and "would have" logs.
    pub matches: Vec<(usize, RuleMatch)>,
    /// Copies left out because the message is itself a copy (loop protection).
    pub copies_suppressed: usize,
}

impl Router {
    /// Routes every recipient of a message from `sender` in a session bound to `bound`, then
    /// plans its delivery (the whole decision at once: `explain`, tests).
    pub fn plan(
        &self,
        bound: Option<&str>,
        sender: &str,
        recipients: &[String],
        is_copy: bool,
    ) -> Plan {
        let bound = bound.and_then(|b| self.tenants().id(b));
        self.plan_routes(
            recipients.iter().map(|r| {
                self.route_recipient(bound, sender, r)
                    .map_err(|u| u.reply())
            }),
            is_copy,
        )
    }

    /// Plans the delivery of a message whose recipients were routed at RCPT time (one route, or
    /// the refusal, per client recipient, in order). `is_copy`: the message carries another
    /// relay's loop marker, so it gets no further copies (two relays copying to each other stop
    /// after one hop).
    pub fn plan_routes(
        &self,
        routes: impl IntoIterator<Item = Result<RecipientRoute, Reply>>,
        is_copy: bool,
    ) -> Plan {
        let mut plan = Plan::default();
        let mut routed: Vec<(usize, RecipientRoute)> = Vec::new();
        for (i, route) in routes.into_iter().enumerate() {
            match route {
                Ok(route) => {
                    plan.recipients.push(Some((
                        std::sync::Arc::clone(&route.tenant),
                        route.direction,
                    )));
                    plan.matches
                        .extend(route.matches.iter().cloned().map(|m| (i, m)));
                    routed.push((i, route));
                }
                Err(reply) => {
                    plan.recipients.push(None);
                    plan.refused.push((i, reply));
                }
            }
        }
        // NB: (target, address) pairs already planned: the same recipient never goes twice to
        // one target, whether the client listed it twice or a copy repeats the primary.
        let mut seen: HashSet<(Target, String)> = HashSet::new();
        for (i, route) in &routed {
            let key = (route.target.clone(), route.deliver_as.to_ascii_lowercase());
            if seen.insert(key) {
                self.add(
                    &mut plan.legs,
                    route.target.clone(),
                    false,
                    route.require_tls,
                    &route.headers,
                    LegRecipient {
                        address: route.deliver_as.clone(),
                        original: *i,
                        notify_never: false,
                    },
                );
            }
        }
        for (i, route) in &routed {
            for copy in &route.copies {
                if is_copy {
                    plan.copies_suppressed += 1;
                    continue;
                }
                let key = (copy.target.clone(), copy.recipient.to_ascii_lowercase());
                if seen.insert(key) {
                    self.add(
                        &mut plan.legs,
                        copy.target.clone(),
                        true,
                        false,
                        &[],
                        LegRecipient {
                            address: copy.recipient.clone(),
                            original: *i,
                            notify_never: copy.suppress_bounces,
                        },
                    );
                }
            }
        }
        plan
    }

    fn add(
        &self,
        legs: &mut Vec<Leg>,
        target: Target,
        copy: bool,
        require_tls: bool,
        headers: &[Header],
        recipient: LegRecipient,
    ) {
        if let Some(leg) = legs.iter_mut().find(|l| {
            l.target == target
                && l.copy == copy
                && l.require_tls == require_tls
                && l.headers == headers
        }) {
            leg.recipients.push(recipient);
            return;
        }
        legs.push(Leg {
            required: self.is_required(&target),
            target,
            copy,
            require_tls,
            headers: headers.to_vec(),
            recipients: vec![recipient],
        });
    }
}
