//! The leg plan runner: one transaction, from its plan to the client's reply (SPEC 6.3-6.6).
//!
//! - Every leg starts at once. A copy leg sends its content but holds its final `.` until the
//!   primary legs accepted the message ([`outcome::copies_may_complete`]); if they did not,
//!   the copy is abandoned unterminated and the upstream discards it.
//! - The reply comes when every required leg has its outcome ([`outcome::reply_ready`]), or at
//!   the reply bound (`deadline`), whichever is first: best-effort legs never hold it, and at
//!   the bound what has not succeeded is told `451 4.4.5`.
//! - Legs go on after the reply (a best-effort copy, an upstream that was sent the whole
//!   message but has not answered yet); what succeeds for a message the client was not told
//!   `250` is recorded in the ledger as it succeeds, so the retry re-sends nothing delivered.

use super::attempt::{Done, Failed, Gate, Hold, Job, LedgerAnswer, wait_for};
use super::ledger::{self, Key, Recorded};
use super::loop_marker::Marker;
use super::outcome::{self, LegOutcome, RecipientOutcome};
use super::upstream::{self, Answers, Envelope, Timing, UpstreamError};
use super::{Forwarder, report};
use crate::interfaces::Transaction;
use crate::reply::Reply;
use crate::routing::Leg;
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{oneshot, watch};

/// Delivers `tx` and returns what to tell the client, by `deadline`. The work that goes on
/// after the reply (best-effort legs, late answers) continues in a task of its own.
pub(super) async fn forward(
    forwarder: Arc<Forwarder>,
    tx: Transaction,
    deadline: Instant,
) -> Reply {
    let mut tx = tx;
    // NB: signed before the plan: every leg, the copies too, carries the same signature.
    if !forwarder.signers.is_empty() {
        forwarder.signers.sign(&mut tx, &forwarder.metrics);
    }
    let (reply_tx, mut reply_rx) = oneshot::channel();
    let mut run = Box::pin(run(forwarder, Arc::new(tx), deadline, reply_tx));
    // NB: most transactions finish with their reply; only one with legs still running needs a
    // task of its own, so the common case costs no spawn.
    let reply = tokio::select! {
        biased;
        () = &mut run => reply_rx.try_recv().ok(),
        reply = &mut reply_rx => {
            tokio::spawn(run);
            reply.ok()
        }
    };
    reply.unwrap_or_else(|| {
        Reply::new(
            451,
            "4.3.0",
            "Delivery failed inside the relay; try again later",
        )
    })
}

async fn run(
    forwarder: Arc<Forwarder>,
    tx: Arc<Transaction>,
    deadline: Instant,
    reply_to: oneshot::Sender<Reply>,
) {
    let fwd = &*forwarder;
    let original = tx.content.get(tx.received_len..).unwrap_or_default();
    let is_copy = match fwd.settings.loop_key.check(original) {
        Marker::Valid => true,
        Marker::Absent => false,
        Marker::Forged => {
            fwd.metrics.loop_markers_forged.inc();
            tracing::info!(transaction = %tx.id, "loop marker does not verify; ignored, copies made");
            false
        }
    };
    // The routes decided at RCPT time: nothing is routed twice.
    let plan = fwd.router.plan_routes(
        tx.recipients.iter().map(|r| {
            r.route.clone().ok_or_else(|| {
                Reply::new(550, "5.7.1", "Recipient not admitted by the relay's policy")
            })
        }),
        is_copy,
    );
    report::matches(fwd, &tx, &plan);

    let fingerprint = ledger::fingerprint(original);
    let keys: Vec<Vec<Key>> = plan
        .legs
        .iter()
        .map(|leg| {
            let target = leg.target.to_string();
            leg.recipients
                .iter()
                .map(|r| ledger::key(&fingerprint, &target, &r.address))
                .collect()
        })
        .collect();
    let flat: Vec<Key> = keys.iter().flatten().copied().collect();
    // NB: the lookup runs beside the legs' MAIL, RCPT, DATA and content, each leg's final `.`
    // waiting for it (a round trip off the client's path with a remote store); an answer that
    // is there at once (the memory store) is used before the legs start, as it was.
    let mut lookup = fwd.ledger.lookup(&flat);
    let first = std::future::poll_fn(|cx| std::task::Poll::Ready(lookup.as_mut().poll(cx))).await;
    let (answer_tx, answer) = watch::channel(None::<Option<Arc<[bool]>>>);
    // Which recipients an earlier attempt is still delivering (known with the lookup's answer).
    let mut in_flight: Arc<[bool]> = Arc::from(vec![false; flat.len()]);
    let mut looking_up = match first {
        std::task::Poll::Ready(found) => {
            match looked_up(fwd, &tx, found, flat.len()) {
                Some(found) => {
                    let (done, flying) = not_to_send(&found);
                    in_flight = flying;
                    answer_tx.send_replace(Some(Some(done)))
                }
                None => {
                    let _ = reply_to.send(store_failed());
                    return;
                }
            };
            false
        }
        std::task::Poll::Pending => true,
    };
    // One copy header for every copy leg (its MAC covers the body: computed once).
    let marker = plan.legs.iter().any(|l| l.copy).then(|| {
        fwd.settings
            .loop_key
            .header(&fwd.settings.hostname, original)
    });
    let (open_copies, hold) = watch::channel(None::<bool>);
    let started = Instant::now();
    let ranges: Vec<Range<usize>> = plan
        .legs
        .iter()
        .scan(0, |offset, leg| {
            let range = *offset..*offset + leg.recipients.len();
            *offset = range.end;
            Some(range)
        })
        .collect();
    let mut running: FuturesUnordered<_> = plan
        .legs
        .iter()
        .enumerate()
        .map(|(i, leg)| {
            let range = ranges[i].clone();
            let hold = leg.copy.then(|| hold.clone());
            let marker = marker.as_deref().filter(|_| leg.copy);
            let (tx, answer) = (&*tx, answer.clone());
            async move {
                let outcome = fwd
                    .run_leg(leg, tx, (answer, range), marker, hold, deadline)
                    .await;
                (i, outcome)
            }
        })
        .collect();

    // The legs' outcomes, plus one settled primary for what the configuration refused.
    let mut outcomes: Vec<Option<LegOutcome>> = vec![None; plan.legs.len()];
    let mut delays = vec![Duration::ZERO; plan.legs.len()];
    let refused: Vec<LegOutcome> = plan
        .refused
        .iter()
        .map(|(i, reply)| LegOutcome {
            target: "configuration".to_owned(),
            required: true,
            copy: false,
            recipients: vec![(
                tx.recipients[*i].address.clone(),
                RecipientOutcome::Permanent(reply.clone()),
            )],
        })
        .collect();
    let mut reply_to = Some(reply_to);
    // Whether the client was told `250` (None: not told yet).
    let mut told: Option<bool> = None;
    let mut recorded = vec![false; plan.legs.len()];
    // The legs marked in flight at the bound, whose marks they clear when they end.
    let mut marked = vec![false; plan.legs.len()];
    let mut at_bound = false;
    let bound = tokio::time::sleep_until(deadline.into());
    tokio::pin!(bound);
    loop {
        if open_copies.borrow().is_none() {
            let primaries: Vec<(bool, Option<&LegOutcome>)> = plan
                .legs
                .iter()
                .zip(&outcomes)
                .filter(|(leg, _)| !leg.copy)
                .map(|(leg, o)| (leg.required, o.as_ref()))
                .chain(refused.iter().map(|o| (true, Some(o))))
                .collect();
            if let Some(open) = outcome::copies_may_complete(&primaries) {
                open_copies.send_replace(Some(open));
            }
        }
        if told.is_none() {
            // NB: once the copies are to be abandoned, a copy still connecting cannot change
            // the reply: it no longer holds it.
            let copies_closed = *open_copies.borrow() == Some(false);
            let legs: Vec<(bool, Option<&LegOutcome>)> = plan
                .legs
                .iter()
                .zip(&outcomes)
                .map(|(leg, o)| (leg.required && !(leg.copy && copies_closed), o.as_ref()))
                .collect();
            if at_bound || outcome::reply_ready(&legs) {
                let settled = settled(&plan.legs, &outcomes, &refused, at_bound);
                let reply = outcome::client_reply(&tx.id, &settled);
                if !reply.is_positive() {
                    record(fwd, &tx, &keys, &outcomes, &mut recorded).await;
                    if at_bound {
                        // NB: before the client hears 451, so its retry cannot overtake.
                        let done = answer.borrow().clone().flatten();
                        mark_in_flight(fwd, &tx, &keys, &outcomes, done.as_deref(), &mut marked)
                            .await;
                    }
                }
                told = Some(reply.is_positive());
                report::transaction(fwd, &tx, &plan, &outcomes, &delays, &reply);
                if let Some(to) = reply_to.take() {
                    let _ = to.send(reply);
                }
            }
        }
        tokio::select! {
            biased;
            next = running.next() => {
                let Some((i, mut outcome)) = next else { break };
                delays[i] = started.elapsed();
                // NB: reported as the ledger's (nothing sent), then told as not delivered yet.
                report::leg(fwd, &plan.legs[i], &outcome, delays[i]);
                held_by_earlier_attempt(&mut outcome, in_flight.get(ranges[i].clone()).unwrap_or_default());
                if told == Some(false) {
                    tracing::info!(transaction = %tx.id, target = %outcome.target, delay_ms = delays[i].as_millis() as u64, "leg finished after the reply");
                }
                outcomes[i] = Some(outcome);
                if told == Some(false) {
                    record(fwd, &tx, &keys, &outcomes, &mut recorded).await;
                    if marked[i]
                        && let Err(e) = fwd.ledger.clear_in_flight(&keys[i]).await
                    {
                        fwd.metrics.store_errors.inc();
                        tracing::warn!(transaction = %tx.id, error = %e, "in-flight mark not cleared; retries wait for it to expire");
                    }
                }
            }
            found = &mut lookup, if looking_up => {
                looking_up = false;
                match looked_up(fwd, &tx, found, flat.len()) {
                    Some(found) => {
                        let (done, flying) = not_to_send(&found);
                        in_flight = flying;
                        answer_tx.send_replace(Some(Some(done)))
                    }
                    None => {
                        // Every leg is held before its final `.`: none completes.
                        answer_tx.send_replace(Some(None));
                        if told.is_none() {
                            told = Some(false);
                            if let Some(to) = reply_to.take() {
                                let _ = to.send(store_failed());
                            }
                        }
                        None
                    }
                };
            }
            () = &mut bound, if told.is_none() => {
                tracing::warn!(transaction = %tx.id, "legs still running at the reply bound");
                at_bound = true;
            }
        }
    }
}

/// The recipients the ledger already has, from its answer: on a failure all `false` with
/// `--store-failure open`, else `None` (the transaction is refused).
fn looked_up(
    fwd: &Forwarder,
    tx: &Transaction,
    found: Result<Vec<Recorded>, crate::store::StoreError>,
    n: usize,
) -> Option<Vec<Recorded>> {
    match found {
        Ok(found) => Some(found),
        Err(e) => {
            fwd.metrics.store_errors.inc();
            tracing::warn!(transaction = %tx.id, error = %e, "ledger lookup failed");
            fwd.settings
                .store_failure_open
                .then(|| vec![Recorded::Absent; n])
        }
    }
}

/// From the ledger's answer: which recipients not to send (delivered or in flight), and which
/// of them are in flight.
fn not_to_send(found: &[Recorded]) -> (Arc<[bool]>, Arc<[bool]>) {
    let done = found.iter().map(|r| *r != Recorded::Absent).collect();
    let flying = found.iter().map(|r| *r == Recorded::InFlight).collect();
    (done, flying)
}

/// A recipient not sent because an earlier attempt is still delivering it is not delivered
/// yet: `451 4.4.5` until that attempt ends (then the ledger says delivered, or nothing).
fn held_by_earlier_attempt(outcome: &mut LegOutcome, in_flight: &[bool]) {
    for ((_, o), flying) in outcome.recipients.iter_mut().zip(in_flight) {
        if *flying && *o == RecipientOutcome::AlreadyDelivered {
            *o = RecipientOutcome::Temporary(Reply::new(
                451,
                "4.4.5",
                format!(
                    "An earlier attempt of this message is still being delivered via {}; try again later",
                    outcome.target
                ),
            ));
        }
    }
}

/// At the reply bound, marks in flight the recipients of every leg still running (not those
/// the ledger had already), so a retry that comes before the leg ends sends nothing again.
async fn mark_in_flight(
    fwd: &Forwarder,
    tx: &Transaction,
    keys: &[Vec<Key>],
    outcomes: &[Option<LegOutcome>],
    done: Option<&[bool]>,
    marked: &mut [bool],
) {
    let mut flying = Vec::new();
    let mut offset = 0;
    for (i, outcome) in outcomes.iter().enumerate() {
        let n = keys[i].len();
        if outcome.is_none() {
            marked[i] = true;
            flying.extend(
                keys[i]
                    .iter()
                    .enumerate()
                    .filter(|(j, _)| {
                        !done
                            .and_then(|d| d.get(offset + j))
                            .copied()
                            .unwrap_or(false)
                    })
                    .map(|(_, k)| *k),
            );
        }
        offset += n;
    }
    if !flying.is_empty()
        && let Err(e) = fwd
            .ledger
            .mark_in_flight(&flying, ledger::IN_FLIGHT_FOR)
            .await
    {
        fwd.metrics.store_errors.inc();
        tracing::warn!(transaction = %tx.id, error = %e, "in-flight mark failed; a retry before the leg ends may duplicate");
    }
}

fn store_failed() -> Reply {
    Reply::new(
        451,
        "4.3.0",
        "Temporary failure of the relay's shared store; try again later",
    )
}

/// The outcomes the reply is made from: those of the legs that finished, the configuration's
/// refusals, and (`at_bound`) for each leg still running, `451 4.4.5` for what it has not
/// delivered.
fn settled(
    legs: &[Leg],
    outcomes: &[Option<LegOutcome>],
    refused: &[LegOutcome],
    at_bound: bool,
) -> Vec<LegOutcome> {
    let mut settled: Vec<LegOutcome> = legs
        .iter()
        .zip(outcomes)
        .filter_map(|(leg, o)| match o {
            Some(o) => Some(o.clone()),
            None if at_bound => Some(leg_outcome(leg, |_| {
                RecipientOutcome::Unreachable(Reply::new(
                    451,
                    "4.4.5",
                    "no answer within the reply bound",
                ))
            })),
            None => None,
        })
        .collect();
    settled.extend(refused.iter().cloned());
    settled
}

/// A leg's outcome with `outcome(i)` for its i-th recipient.
fn leg_outcome(leg: &Leg, outcome: impl Fn(usize) -> RecipientOutcome) -> LegOutcome {
    LegOutcome {
        target: leg.target.to_string(),
        required: leg.required,
        copy: leg.copy,
        recipients: leg
            .recipients
            .iter()
            .enumerate()
            .map(|(i, r)| (r.address.clone(), outcome(i)))
            .collect(),
    }
}

/// Records in the ledger what finished legs delivered and is not recorded yet.
async fn record(
    fwd: &Forwarder,
    tx: &Transaction,
    keys: &[Vec<Key>],
    outcomes: &[Option<LegOutcome>],
    recorded: &mut [bool],
) {
    let mut delivered = Vec::new();
    for (i, outcome) in outcomes.iter().enumerate() {
        let Some(outcome) = outcome else { continue };
        if recorded[i] {
            continue;
        }
        recorded[i] = true;
        delivered.extend(
            outcome
                .recipients
                .iter()
                .zip(&keys[i])
                .filter(|((_, o), _)| *o == RecipientOutcome::Delivered)
                .map(|(_, k)| *k),
        );
    }
    if !delivered.is_empty()
        && let Err(e) = fwd.ledger.record(&delivered).await
    {
        fwd.metrics.store_errors.inc();
        tracing::warn!(transaction = %tx.id, error = %e, "ledger record failed; a retry may duplicate");
    }
}

impl Forwarder {
    /// One leg: the recipients the ledger does not already have, sent to the leg's target.
    /// While the ledger's answer is still to come, every recipient is sent and the final `.`
    /// waits for it; when it says some were delivered before, the leg is abandoned and sent
    /// again to the rest (only a retry pays for that).
    async fn run_leg(
        &self,
        leg: &Leg,
        tx: &Transaction,
        (answer, range): (LedgerAnswer, Range<usize>),
        marker: Option<&str>,
        hold: Option<Hold>,
        deadline: Instant,
    ) -> LegOutcome {
        let known = answer.borrow().clone();
        match known {
            Some(Some(done)) => {
                let done = done.get(range).unwrap_or_default();
                let gate = Gate {
                    ledger: None,
                    copies: hold,
                };
                return self.send_leg(leg, tx, done, marker, gate, deadline).await;
            }
            Some(None) => return leg_outcome(leg, |_| RecipientOutcome::Withheld),
            None => {}
        }
        let gate = Gate {
            ledger: Some((answer.clone(), range.clone())),
            copies: hold.clone(),
        };
        let mut result = self.send_leg(leg, tx, &[], marker, gate, deadline).await;
        let done = match tokio::time::timeout_at(deadline.into(), wait_for(answer)).await {
            Ok(Some(Some(done))) => done,
            _ => return result,
        };
        let done = done.get(range).unwrap_or_default();
        if !done.contains(&true) {
            return result;
        }
        let withheld = result
            .recipients
            .iter()
            .any(|(_, o)| *o == RecipientOutcome::Withheld);
        let copies_closed = hold.as_ref().is_some_and(|h| *h.borrow() == Some(false));
        if withheld && !copies_closed && done.contains(&false) {
            let gate = Gate {
                ledger: None,
                copies: hold,
            };
            result = self.send_leg(leg, tx, done, marker, gate, deadline).await;
        }
        for (r, d) in result.recipients.iter_mut().zip(done) {
            if *d {
                r.1 = RecipientOutcome::AlreadyDelivered;
            }
        }
        result
    }

    /// Sends the leg to the recipients not `done`, its final `.` waiting for `gate`.
    async fn send_leg(
        &self,
        leg: &Leg,
        tx: &Transaction,
        done: &[bool],
        marker: Option<&str>,
        gate: Gate,
        deadline: Instant,
    ) -> LegOutcome {
        let mut result = leg_outcome(leg, |i| {
            if done.get(i).copied().unwrap_or(false) {
                RecipientOutcome::AlreadyDelivered
            } else {
                RecipientOutcome::Unreachable(Reply::new(451, "4.4.0", "not attempted"))
            }
        });
        let pending: Vec<usize> = (0..leg.recipients.len())
            .filter(|i| !done.get(*i).copied().unwrap_or(false))
            .collect();
        if pending.is_empty() {
            return result;
        }
        let outcomes = match self.runtime(&leg.target) {
            None => Err(RecipientOutcome::Unreachable(Reply::new(
                451,
                "4.3.5",
                format!("route {} is not configured", leg.target),
            ))),
            Some(runtime) => match (&self.pacing, &runtime.pace) {
                (Some(pacing), Some(paced)) => {
                    let route = leg.target.to_string();
                    match pacing
                        .admit(&route, paced, pending.len(), &tx.id, &self.metrics)
                        .await
                    {
                        Err(reply) => Err(RecipientOutcome::Unreachable(reply)),
                        Ok(held) => {
                            let outcomes = self
                                .attempt(
                                    runtime,
                                    leg,
                                    tx,
                                    &pending,
                                    marker,
                                    gate.needed(),
                                    deadline,
                                )
                                .await;
                            let accepted = outcomes.as_ref().map_or(0, |o| {
                                o.iter()
                                    .filter(|o| **o == RecipientOutcome::Delivered)
                                    .count()
                            });
                            pacing.end(held, accepted).await;
                            outcomes
                        }
                    }
                }
                _ => {
                    self.attempt(runtime, leg, tx, &pending, marker, gate.needed(), deadline)
                        .await
                }
            },
        };
        match outcomes {
            Ok(outcomes) => {
                for (i, o) in pending.iter().zip(outcomes) {
                    result.recipients[*i].1 = o;
                }
            }
            Err(outcome) => {
                if outcome != RecipientOutcome::Withheld {
                    tracing::info!(transaction = %tx.id, target = %leg.target, outcome = ?outcome, "leg failed");
                }
                for i in &pending {
                    result.recipients[*i].1 = outcome.clone();
                }
            }
        }
        result
    }

    /// Tries the leg's hosts in order until one takes the transaction. `Ok`: one outcome per
    /// pending recipient; `Err`: one outcome for all of them.
    #[allow(clippy::too_many_arguments)]
    async fn attempt(
        &self,
        runtime: &super::RouteRuntime,
        leg: &Leg,
        tx: &Transaction,
        pending: &[usize],
        marker: Option<&str>,
        gate: Option<Gate>,
        deadline: Instant,
    ) -> Result<Vec<RecipientOutcome>, RecipientOutcome> {
        let hosts = match self.hosts_for(runtime, &leg.target).await {
            Ok(hosts) => hosts,
            Err(reply) if reply.code() >= 500 => return Err(RecipientOutcome::Permanent(reply)),
            Err(reply) => return Err(RecipientOutcome::Unreachable(reply)),
        };
        // The header lines this leg adds, written before the message (which is never copied
        // for a leg: it is dot-stuffed on the way out).
        let mut prefix = Vec::new();
        if let Some(marker) = marker {
            prefix.extend_from_slice(marker.as_bytes());
        }
        for h in &leg.headers {
            prefix.extend_from_slice(format!("{}: {}\r\n", h.name, h.value).as_bytes());
        }
        let recipients: Vec<upstream::Recipient<'_>> = pending
            .iter()
            .map(|i| upstream::Recipient {
                address: &leg.recipients[*i].address,
                notify_never: leg.recipients[*i].notify_never,
            })
            .collect();
        let envelope = Envelope {
            sender: &tx.mail_from,
            recipients: &recipients,
            eight_bit: tx.body_8bit,
            smtputf8: tx.smtputf8,
        };
        let timing = Timing {
            deadline,
            data_timeout: Duration::from_millis(runtime.route.timeouts.data_end_ms),
        };
        let job = Job::Deliver {
            envelope,
            prefix: &prefix,
            message: &tx.content,
            timing,
            gate,
        };
        let sent = self
            .on_hosts(runtime, &hosts, leg.require_tls, deadline, job)
            .await;
        match sent {
            Ok(Done::Delivered(answers)) => Ok(answers_to_outcomes(&answers, pending.len())),
            Ok(Done::Verified(_)) => Err(RecipientOutcome::Unreachable(Reply::new(
                451,
                "4.3.0",
                "delivery got a verification's answer",
            ))),
            Err(Failed::Final(UpstreamError::Withheld)) => Err(RecipientOutcome::Withheld),
            Err(Failed::Final(e)) => Err(RecipientOutcome::Unreachable(Reply::new(
                451,
                e.enhanced(),
                e.to_string(),
            ))),
            Err(Failed::Limited(reply)) => Err(RecipientOutcome::Unreachable(reply)),
            Err(Failed::Busy(busy)) => Err(RecipientOutcome::Unreachable(Reply::new(
                451,
                "4.4.5",
                busy.to_string(),
            ))),
            Err(Failed::Hosts(last)) => Err(RecipientOutcome::Unreachable(match last {
                Some(UpstreamError::Refused { stage, reply }) => {
                    // NB: even a 5xx greeting or EHLO is a reason to try later (RFC 5321 5.1).
                    Reply::new(
                        451,
                        "4.4.0",
                        format!("{stage}: upstream said {} {}", reply.code(), reply.text()),
                    )
                }
                Some(e) => Reply::new(451, e.enhanced(), e.to_string()),
                None => Reply::new(451, "4.4.0", "not delivered"),
            })),
        }
    }
}

fn answers_to_outcomes(answers: &Answers, n: usize) -> Vec<RecipientOutcome> {
    (0..n)
        .map(|j| match answers.recipients.get(j).cloned().flatten() {
            Some(refusal) => RecipientOutcome::refused(refusal),
            None => match &answers.data {
                Some(None) => RecipientOutcome::Delivered,
                Some(Some(refusal)) => RecipientOutcome::refused(refusal.clone()),
                None => RecipientOutcome::refused(
                    answers
                        .mail
                        .clone()
                        .unwrap_or_else(|| Reply::new(451, "4.4.0", "upstream refused DATA")),
                ),
            },
        })
        .collect()
}
