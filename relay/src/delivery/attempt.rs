//! One host-by-host attempt over pooled connections, shared by delivery and recipient
//! verification; a route is dialled as `mailroute_smtp_client::route` says.

use super::destination_tls::LegTls;
use super::hosts::{Candidate, ResolveError};
use super::pool::{self, Checkout, PoolKey, Pooled};
use super::upstream::{Answers, Envelope, Timing, TlsPlan, Upstream, UpstreamError};
use super::{Forwarder, RouteRuntime};
use crate::reply::Reply;
use crate::routing::Target;
use mailroute_config::document::Destination;
use mailroute_config::resources::TlsMode;
use mailroute_smtp_client::route;
use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// What to do on a connection.
pub(crate) enum Job<'a> {
    /// One transaction (SPEC 6.4); `gate` says when its final `.` may go.
    Deliver {
        envelope: Envelope<'a>,
        prefix: &'a [u8],
        message: &'a [u8],
        timing: Timing,
        gate: Option<Gate>,
    },
    /// MAIL, RCPT and RSET: would the upstream take the recipient.
    Verify { sender: &'a str, recipient: &'a str },
}

/// What a [`Job`] got.
pub(crate) enum Done {
    Delivered(Answers),
    Verified(Option<Reply>),
}

/// The copies' hold: `None` until the primary legs decided, then whether copies may complete.
pub(crate) type Hold = watch::Receiver<Option<bool>>;

/// The ledger's answer for the transaction, while it is being looked up: `None` until it
/// comes, then `Some(None)` when the lookup failed and nothing may be delivered, or the
/// recipients already delivered, in plan order.
pub(crate) type LedgerAnswer = watch::Receiver<Option<Option<Arc<[bool]>>>>;

/// What a leg's final `.` (or `BDAT ... LAST`) waits for: the content is sent meanwhile.
#[derive(Clone, Default)]
pub(crate) struct Gate {
    /// A lookup still under way, and the leg's range of its answer: the `.` goes only once
    /// the ledger says none of the leg's recipients was delivered by an earlier attempt.
    pub ledger: Option<(LedgerAnswer, Range<usize>)>,
    /// A copy's hold (SPEC 6.3).
    pub copies: Option<Hold>,
}

impl Gate {
    /// `None` when nothing is waited for (the `.` follows the content in the same write).
    pub fn needed(self) -> Option<Self> {
        (self.ledger.is_some() || self.copies.is_some()).then_some(self)
    }

    /// Resolves once the leg may complete (`true`) or must be abandoned (`false`).
    async fn open(self) -> bool {
        if let Some((answer, range)) = self.ledger {
            match wait_for(answer).await {
                Some(Some(done)) if !done.get(range).unwrap_or_default().contains(&true) => {}
                _ => return false,
            }
        }
        match self.copies {
            Some(hold) => wait_for(hold).await.unwrap_or(false),
            None => true,
        }
    }
}

/// Resolves once the watched value is known (`None`: its sender is gone).
pub(crate) async fn wait_for<T: Clone>(mut value: watch::Receiver<Option<T>>) -> Option<T> {
    loop {
        if let Some(known) = value.borrow_and_update().as_ref() {
            return Some(known.clone());
        }
        if value.changed().await.is_err() {
            return None;
        }
    }
}

/// Why no host of a route did what was asked.
#[derive(Debug)]
pub enum Failed {
    /// Every connection of the route is in use (the next host would not help).
    Busy(pool::Busy),
    /// The route is at its `maxConcurrentConnections` over every replica, or the store
    /// that counts them did not answer: the reply says which.
    Limited(Reply),
    /// No host could be reached, greeted or secured, or took the transaction before its
    /// content: the last host's failure (`None`: there was no host to try).
    Hosts(Option<UpstreamError>),
    /// A failure once the content was on its way, or the bound spent: no other host is tried.
    Final(UpstreamError),
}

/// The hosts of a leg, in order, and the destination's TLS policy they are reached under.
pub(crate) struct LegHosts {
    pub candidates: Vec<Candidate>,
    pub tls: Option<LegTls>,
}

impl Forwarder {
    /// The hosts to try for `target`: a route's destination, or a domain's MX hosts for
    /// direct delivery; with `mxLookup.mtaSts` or `mxLookup.dane`, the destination's TLS
    /// policy too (which may leave no host: the client hears `451 4.4.0`).
    pub(crate) async fn hosts_for(
        &self,
        runtime: &RouteRuntime,
        target: &Target,
    ) -> Result<LegHosts, Reply> {
        let found = match target {
            Target::Mx(domain) => {
                self.resolver
                    .mx(domain.as_str(), self.settings.mx_port)
                    .await
            }
            Target::Route(_) => self.resolver.route_hosts(&runtime.route.destination).await,
        };
        let mut candidates = match found {
            Ok(c) if !c.is_empty() => c,
            Ok(_) => return Err(Reply::new(451, "4.4.3", "no host to deliver to")),
            Err(ResolveError::Permanent(e)) => return Err(Reply::relayed(550, Some("5.1.2"), e)),
            Err(ResolveError::Temporary(e)) => return Err(Reply::new(451, "4.4.3", e)),
        };
        let tls = match (target, &runtime.route.destination) {
            (
                Target::Route(_),
                Destination::Mx {
                    domain,
                    port,
                    mta_sts,
                    dane,
                },
            ) if *mta_sts || *dane => Some(
                self.leg_tls(domain.as_str(), (*mta_sts, *dane), *port, &mut candidates)
                    .await?,
            ),
            _ => None,
        };
        Ok(LegHosts { candidates, tls })
    }

    /// Runs `op` on a connection to the first of `candidates` that takes it: a pooled
    /// connection first, once more on a fresh one when a reused connection turns out closed,
    /// then the next host while nothing can have been delivered. Connecting ends at
    /// `deadline`. A connection `op` left clean goes back to the pool; any other is closed.
    pub(crate) async fn on_hosts(
        &self,
        runtime: &RouteRuntime,
        hosts: &LegHosts,
        leg_requires_tls: bool,
        deadline: Instant,
        job: Job<'_>,
    ) -> Result<Done, Failed> {
        let tls_required = leg_requires_tls || runtime.route.tls.mode == TlsMode::Required;
        let limits = runtime.limits();
        let sts = hosts.tls.as_ref();
        let mut last = None;
        'hosts: for candidate in &hosts.candidates {
            let key = PoolKey {
                route: Arc::clone(&runtime.name),
                addr: candidate.addr,
                tls_required,
                verified: sts.is_some_and(|s| s.verified(&candidate.name)),
            };
            for attempt in 0..2 {
                let connection = tokio::time::timeout_at(
                    deadline.into(),
                    self.connection(
                        runtime,
                        candidate,
                        &key,
                        (leg_requires_tls, sts),
                        attempt == 0,
                    ),
                )
                .await;
                let mut conn = match connection {
                    Err(_) => return Err(Failed::Final(UpstreamError::Bound { stage: "connect" })),
                    Ok(Ok(conn)) => conn,
                    Ok(Err(Unavailable::Busy(busy))) => return Err(Failed::Busy(busy)),
                    Ok(Err(Unavailable::Limited(reply))) => return Err(Failed::Limited(reply)),
                    Ok(Err(Unavailable::Host(e))) => {
                        tracing::debug!(route = %runtime.name, host = %candidate.addr, error = %e, "upstream unavailable");
                        last = Some(e);
                        continue 'hosts;
                    }
                };
                let done = match &job {
                    Job::Deliver {
                        envelope,
                        prefix,
                        message,
                        timing,
                        gate,
                    } => {
                        let gate = gate.clone().map(Gate::open);
                        conn.upstream
                            .send(envelope, prefix, message, *timing, gate)
                            .await
                            .map(Done::Delivered)
                    }
                    Job::Verify { sender, recipient } => conn
                        .upstream
                        .verify(sender, recipient)
                        .await
                        .map(Done::Verified),
                };
                match done {
                    Ok(answer) => {
                        self.pool.put(key, conn, limits);
                        return Ok(answer);
                    }
                    Err(e) if e.is_before_data() => {
                        // NB: nothing was delivered: a reused connection the upstream closed
                        // meanwhile is retried fresh, anything else moves to the next host.
                        let reused = conn.reused;
                        last = Some(e);
                        if reused {
                            continue;
                        }
                        continue 'hosts;
                    }
                    Err(e) => return Err(Failed::Final(e)),
                }
            }
        }
        Err(Failed::Hosts(last))
    }

    /// A connection to `candidate` for `key`: a pooled one when `reuse`, else a new one as soon
    /// as the route has a free slot (waiting up to its connect timeout).
    async fn connection(
        &self,
        runtime: &RouteRuntime,
        candidate: &Candidate,
        key: &PoolKey,
        tls: (bool, Option<&LegTls>),
        reuse: bool,
    ) -> Result<Pooled, Unavailable> {
        let connect_wait = Duration::from_millis(runtime.route.timeouts.connect_ms);
        let checkout = self
            .pool
            .checkout(
                key,
                runtime.limits(),
                &runtime.permits,
                runtime.route.pool.max_connections,
                connect_wait,
                reuse,
            )
            .await
            .map_err(Unavailable::Busy)?;
        match checkout {
            Checkout::Reused(conn) => Ok(conn),
            Checkout::Fresh(permit) => {
                let lease = match (&self.pacing, &runtime.pace) {
                    (Some(pacing), Some(paced)) => {
                        match pacing.lease(&runtime.name, paced, &self.metrics).await {
                            Ok(lease) => lease,
                            // NB: at the limit over every replica, one of this relay's own
                            // connections coming back is the way through (never a queue
                            // longer than the connect timeout).
                            Err(reply) if reuse && paced.holds_leases() => {
                                drop(permit);
                                return self
                                    .pool
                                    .returned_within(key, runtime.limits(), connect_wait)
                                    .await
                                    .ok_or(Unavailable::Limited(reply));
                            }
                            Err(reply) => return Err(Unavailable::Limited(reply)),
                        }
                    }
                    _ => None,
                };
                self.open(runtime, candidate, tls)
                    .await
                    .map(|up| pool::Pool::wrap(up, permit, lease))
                    .map_err(Unavailable::Host)
            }
        }
    }

    /// Opens a connection to one host with the route's policy (and its domain's MTA-STS
    /// policy); opportunistic TLS falls back to plaintext when the handshake fails
    /// (RFC 7435), never when TLS is required.
    async fn open(
        &self,
        runtime: &RouteRuntime,
        candidate: &Candidate,
        (leg_requires_tls, leg_tls): (bool, Option<&LegTls>),
    ) -> Result<Upstream, UpstreamError> {
        match leg_tls {
            Some(leg_tls) => {
                self.open_under(leg_tls, runtime, candidate, leg_requires_tls)
                    .await
            }
            None => {
                self.open_as_route(runtime, candidate, leg_requires_tls)
                    .await
            }
        }
    }

    /// Opens a connection to one host with the route's own TLS policy.
    pub(crate) async fn open_as_route(
        &self,
        runtime: &RouteRuntime,
        candidate: &Candidate,
        leg_requires_tls: bool,
    ) -> Result<Upstream, UpstreamError> {
        let tls = route::tls_plan(
            runtime.route.tls.mode,
            leg_requires_tls,
            &runtime.connector,
            &runtime.name,
        )?;
        let mut dial = route::dial(
            &runtime.route,
            candidate,
            &self.settings.hostname,
            tls,
            runtime.login.clone(),
        );
        match Upstream::connect(&dial).await {
            Err(e @ (UpstreamError::Tls(_) | UpstreamError::Certificate { .. }))
                if matches!(dial.tls, TlsPlan::Opportunistic(_)) =>
            {
                tracing::info!(route = %runtime.name, host = %candidate.addr, error = %e, "opportunistic TLS failed; delivering in plaintext");
                dial.tls = TlsPlan::Off;
                Upstream::connect(&dial).await
            }
            other => other,
        }
    }
}

/// Why no connection to a host could be had.
enum Unavailable {
    Busy(pool::Busy),
    Limited(Reply),
    Host(UpstreamError),
}
