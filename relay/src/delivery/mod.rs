//! Delivery (SPEC 6.3-6.6): carries out a message's plan synchronously. Legs run concurrently
//! over pooled upstream connections, each route's TLS policy is enforced, and the client's reply
//! follows what the required upstreams said ([`outcome::client_reply`]). Successful deliveries
//! of a message the client must retry are recorded in the ledger, so the retry re-sends only
//! what failed.
//!
//! - [`upstream`]: one connection to an upstream server (mail-send's client, pipelining).
//! - [`pool`]: connection reuse per route and host.
//! - [`hosts`]: which hosts to try (host sets, MX lookups).
//! - [`tls`]: client TLS per route policy.
//! - [`ledger`]: the delivery ledger and its in-memory store.
//! - [`outcome`]: the reply rules.

pub mod hosts;
pub mod ledger;
pub mod outcome;
pub mod pool;
pub mod tls;
pub mod upstream;

pub use crate::interfaces::BoxFuture;

use crate::interfaces::{Deliver, RecipientQuery, Transaction};
use crate::metrics::{
    Metrics, RouteLabels, RuleLabels, TrafficLabels, UpstreamLabels, VerificationLabels,
};
use crate::reply::Reply;
use crate::routing::{Leg, RecipientRoute, Router, Target};
use hosts::{Candidate, ResolveError, Resolver};
use ledger::Ledger;
use mailroute_config::document::{Destination, Pool as PoolConfig, Route, RouteTimeouts, RouteTls};
use mailroute_config::resources::{DeliveryMode, TlsMode};
use mailroute_config::{Credentials, RelayConfig};
use outcome::{LegOutcome, RecipientOutcome};
use pool::{Checkout, PoolKey, Pooled};
use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;
use tokio_rustls::TlsConnector;
use upstream::{Dial, TlsPlan, Upstream, UpstreamError};

/// Longest RCPT-time recipient check; past it the recipient is accepted and delivery after
/// DATA decides (the client must not wait on a slow upstream for every recipient).
pub const VERIFY_TIMEOUT: Duration = Duration::from_secs(10);

/// The header a relay adds to the copies it makes; a message carrying it gets no further
/// copies, so two relays copying to each other stop after one hop.
pub const LOOP_MARKER: &str = "X-Mailroute-Loop";

/// Relay-wide delivery settings.
#[derive(Clone, Debug)]
pub struct Settings {
    /// EHLO name for routes without `heloName`, and the loop marker's value.
    pub hostname: String,
    /// `--store-failure open`: when the ledger cannot be read, deliver anyway.
    pub store_failure_open: bool,
    /// Name server for MX and host lookups (default: the system's).
    pub dns_server: Option<std::net::SocketAddr>,
    /// Port of direct (MX) delivery: 25, except in test setups.
    pub mx_port: u16,
}

/// Why delivery could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("DNS resolver: {0}")]
    Resolver(String),
}

/// One route, ready to use.
struct RouteRuntime {
    name: Arc<str>,
    route: Route,
    connector: Result<TlsConnector, String>,
    credentials: Option<(String, String)>,
    permits: Arc<Semaphore>,
}

impl RouteRuntime {
    fn new(name: &str, route: Route, credentials: &Credentials) -> Self {
        let checks = tls::Checks {
            ca_signed: route.tls.require_ca_signed,
            hostname: route.tls.validate_hostname,
        };
        let connector =
            tls::connector(checks, credentials.ca_bundles.get(name).map(String::as_str))
                .map_err(|e| e.to_string());
        let credentials = credentials
            .routes
            .get(name)
            .map(|c| (c.username.clone(), c.password.clone()));
        let permits = Arc::new(Semaphore::new(route.pool.max_connections.max(1) as usize));
        Self {
            name: Arc::from(name),
            route,
            connector,
            credentials,
            permits,
        }
    }

    fn limits(&self) -> pool::Limits {
        pool::Limits {
            max_messages: self.route.pool.max_messages_per_connection.max(1),
            idle_timeout: Duration::from_millis(self.route.pool.idle_timeout_ms),
        }
    }
}

/// Direct delivery's settings (no MailRoute): port 25, opportunistic TLS, Internet-sized
/// timeouts. The destination is a placeholder: MX targets are resolved per recipient domain.
fn mx_route() -> Route {
    Route {
        destination: Destination::Host(mailroute_config::document::HostPort {
            host: mailroute_config::document::Host::Ip(std::net::Ipv4Addr::UNSPECIFIED.into()),
            port: 25,
        }),
        tls: RouteTls {
            mode: TlsMode::Opportunistic,
            require_ca_signed: false,
            validate_hostname: false,
            ca_bundle: false,
        },
        auth: false,
        helo_name: None,
        pool: PoolConfig {
            max_connections: 200,
            max_messages_per_connection: 100,
            idle_timeout_ms: 30_000,
        },
        timeouts: RouteTimeouts {
            connect_ms: 30_000,
            command_ms: 300_000,
            data_end_ms: 600_000,
        },
        delivery: DeliveryMode::Required,
        probe_interval_ms: 0,
        verify_recipients: false,
    }
}

/// Delivers messages as the configuration says. Implements [`Deliver`].
pub struct Forwarder {
    router: Arc<Router>,
    routes: HashMap<Arc<str>, RouteRuntime>,
    mx: RouteRuntime,
    pool: pool::Pool,
    resolver: Resolver,
    ledger: Arc<dyn Ledger>,
    settings: Settings,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for Forwarder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Forwarder")
            .field("routes", &self.routes.keys().collect::<Vec<_>>())
            .field("settings", &self.settings)
            .finish()
    }
}

impl Forwarder {
    pub fn new(
        config: &RelayConfig,
        credentials: &Credentials,
        router: Arc<Router>,
        ledger: Arc<dyn Ledger>,
        settings: Settings,
        metrics: Arc<Metrics>,
    ) -> Result<Self, SetupError> {
        let routes = config
            .routes
            .iter()
            .map(|(name, route)| {
                let runtime = RouteRuntime::new(name, route.clone(), credentials);
                if let Err(e) = &runtime.connector {
                    tracing::warn!(route = %name, error = %e, "route TLS settings unusable; its TLS legs will be deferred");
                }
                (Arc::clone(&runtime.name), runtime)
            })
            .collect();
        Ok(Self {
            router,
            routes,
            mx: RouteRuntime::new("mx", mx_route(), &Credentials::default()),
            pool: pool::Pool::default(),
            resolver: Resolver::new(settings.dns_server).map_err(SetupError::Resolver)?,
            ledger,
            settings,
            metrics,
        })
    }

    /// Idle upstream connections (for tests).
    pub fn idle_connections(&self) -> usize {
        self.pool.idle_count()
    }

    /// Closes connections idle longer than their route allows; call periodically.
    pub fn sweep(&self) {
        self.pool.sweep(|route| {
            self.routes
                .get(route)
                .unwrap_or(&self.mx)
                .limits()
                .idle_timeout
        });
    }

    /// Checks a recipient with its primary route's upstream at RCPT time (SPEC 6.4), when that
    /// route has `verifyRecipients` and is required. `Err`: the upstream's refusal, for the
    /// client. An upstream that cannot be asked (unreachable, slow, TLS policy) accepts: the
    /// message's delivery decides, with the reply rules of SPEC 6.5.
    pub async fn verify_recipient(
        &self,
        query: &RecipientQuery,
        route: &RecipientRoute,
    ) -> Result<(), Reply> {
        let Target::Route(name) = &route.target else {
            return Ok(());
        };
        let Some(runtime) = self.routes.get(&**name) else {
            return Ok(());
        };
        if !runtime.route.verify_recipients || !self.router.is_required(&route.target) {
            return Ok(());
        }
        let answer = tokio::time::timeout(VERIFY_TIMEOUT, self.probe(runtime, route, query))
            .await
            .unwrap_or(Err(UpstreamError::Timeout {
                stage: "recipient check",
                after: VERIFY_TIMEOUT,
            }));
        let (result, verdict) = match answer {
            Ok(None) => ("accepted", Ok(())),
            Ok(Some(refusal)) if refusal.code() >= 500 => ("refused", Err(refusal)),
            Ok(Some(refusal)) => ("deferred", Err(refusal)),
            Err(e) => {
                tracing::info!(transaction = %query.transaction, route = %runtime.name, error = %e, "recipient check unavailable; accepting");
                ("unavailable", Ok(()))
            }
        };
        self.metrics
            .recipient_verifications
            .get_or_create(&VerificationLabels {
                route: runtime.name.to_string(),
                result: result.to_owned(),
            })
            .inc();
        verdict
    }

    /// One recipient check over a pooled connection, trying the route's hosts in order.
    async fn probe(
        &self,
        runtime: &RouteRuntime,
        route: &RecipientRoute,
        query: &RecipientQuery,
    ) -> Result<Option<Reply>, UpstreamError> {
        let candidates = self
            .resolver
            .route_hosts(&runtime.route.destination)
            .await
            .map_err(|e| UpstreamError::Protocol {
                stage: "host lookup",
                detail: e.to_string(),
            })?;
        let tls_required = route.require_tls || runtime.route.tls.mode == TlsMode::Required;
        let limits = runtime.limits();
        let mut last = None;
        'hosts: for candidate in &candidates {
            let key = PoolKey {
                route: Arc::clone(&runtime.name),
                addr: candidate.addr,
                tls_required,
            };
            for attempt in 0..2 {
                let mut conn = match self
                    .connection(runtime, candidate, &key, route.require_tls, attempt == 0)
                    .await
                {
                    Ok(conn) => conn,
                    Err(Unavailable::Busy(busy)) => {
                        return Err(UpstreamError::Protocol {
                            stage: "connection pool",
                            detail: busy.to_string(),
                        });
                    }
                    Err(Unavailable::Host(e)) => {
                        last = Some(e);
                        continue 'hosts;
                    }
                };
                match conn.upstream.verify(&query.sender, &route.deliver_as).await {
                    Ok(answer) => {
                        self.pool.put(key, conn, limits);
                        return Ok(answer);
                    }
                    // NB: a reused connection the upstream closed meanwhile: once more, fresh.
                    Err(e) if conn.reused => last = Some(e),
                    Err(e) => {
                        last = Some(e);
                        continue 'hosts;
                    }
                }
            }
        }
        Err(last.unwrap_or(UpstreamError::Protocol {
            stage: "host lookup",
            detail: "no host to ask".to_owned(),
        }))
    }

    async fn forward(&self, tx: Transaction) -> Reply {
        let original = tx.content.get(tx.received_len..).unwrap_or_default();
        let is_copy = has_header(original, LOOP_MARKER);
        // The routes decided at RCPT time: nothing is routed twice.
        let plan = self.router.plan_routes(
            tx.recipients.iter().map(|r| {
                r.route.clone().ok_or_else(|| {
                    Reply::new(550, "5.7.1", "Recipient not admitted by the relay's policy")
                })
            }),
            is_copy,
        );
        for (i, m) in &plan.matches {
            self.metrics
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
        self.metrics
            .copies_suppressed
            .inc_by(plan.copies_suppressed as u64);

        let fingerprint = ledger::fingerprint(original);
        let keys: Vec<Vec<ledger::Key>> = plan
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
        let flat: Vec<ledger::Key> = keys.iter().flatten().copied().collect();
        let done = match self.ledger.contains(&flat).await {
            Ok(found) => found,
            Err(e) => {
                self.metrics.store_errors.inc();
                tracing::warn!(transaction = %tx.id, error = %e, "ledger lookup failed");
                if !self.settings.store_failure_open {
                    return Reply::new(
                        451,
                        "4.3.0",
                        "Temporary failure of the relay's shared store; try again later",
                    );
                }
                vec![false; flat.len()]
            }
        };

        let mut offset = 0;
        let mut runs = Vec::with_capacity(plan.legs.len());
        for leg in &plan.legs {
            let leg_done = &done[offset..offset + leg.recipients.len()];
            offset += leg.recipients.len();
            let run = self.run_leg(leg, &tx, leg_done);
            runs.push(async move {
                let started = Instant::now();
                let outcome = run.await;
                (outcome, started.elapsed())
            });
        }
        let (mut outcomes, delays): (Vec<LegOutcome>, Vec<Duration>) =
            futures_util::future::join_all(runs)
                .await
                .into_iter()
                .unzip();
        for (i, reply) in &plan.refused {
            outcomes.push(LegOutcome {
                target: "configuration".to_owned(),
                required: true,
                recipients: vec![(
                    tx.recipients[*i].address.clone(),
                    RecipientOutcome::Permanent(reply.clone()),
                )],
            });
        }
        let reply = outcome::client_reply(&tx.id, &outcomes);

        if !reply.is_positive() {
            let delivered: Vec<ledger::Key> = outcomes
                .iter()
                .zip(&keys)
                .flat_map(|(leg, keys)| {
                    leg.recipients
                        .iter()
                        .zip(keys)
                        .filter(|((_, o), _)| *o == RecipientOutcome::Delivered)
                        .map(|(_, k)| *k)
                })
                .collect();
            if !delivered.is_empty()
                && let Err(e) = self.ledger.record(&delivered).await
            {
                self.metrics.store_errors.inc();
                tracing::warn!(transaction = %tx.id, error = %e, "ledger record failed; a retry may duplicate");
            }
        }
        self.count(&tx, &plan, &reply);
        log_transaction(&tx, &plan, &outcomes, &delays, &reply);
        reply
    }

    fn count(&self, tx: &Transaction, plan: &crate::routing::Plan, reply: &Reply) {
        let outcome = match reply.code() / 100 {
            2 => "delivered",
            4 => "deferred",
            _ => "refused",
        };
        let label = |entry: Option<&(Arc<str>, crate::routing::Direction)>| TrafficLabels {
            tenant: entry
                .map(|(t, _)| t.to_string())
                .or_else(|| tx.tenant.as_deref().map(str::to_owned))
                .unwrap_or_else(|| "none".to_owned()),
            direction: entry.map_or("none", |(_, d)| d.as_str()).to_owned(),
            outcome: outcome.to_owned(),
        };
        self.metrics
            .messages
            .get_or_create(&label(plan.recipients.iter().flatten().next()))
            .inc();
        for entry in &plan.recipients {
            self.metrics
                .recipients
                .get_or_create(&label(entry.as_ref()))
                .inc();
        }
    }

    fn runtime(&self, target: &Target) -> Option<&RouteRuntime> {
        match target {
            Target::Route(name) => self.routes.get(name),
            Target::Mx(_) => Some(&self.mx),
        }
    }

    async fn run_leg(&self, leg: &Leg, tx: &Transaction, done: &[bool]) -> LegOutcome {
        let started = Instant::now();
        let mut result = LegOutcome {
            target: leg.target.to_string(),
            required: leg.required,
            recipients: leg
                .recipients
                .iter()
                .zip(done)
                .map(|(r, d)| {
                    let o = if *d {
                        RecipientOutcome::AlreadyDelivered
                    } else {
                        RecipientOutcome::Unreachable(Reply::new(451, "4.4.0", "not attempted"))
                    };
                    (r.address.clone(), o)
                })
                .collect(),
        };
        let pending: Vec<usize> = (0..leg.recipients.len()).filter(|i| !done[*i]).collect();
        if pending.is_empty() {
            return result;
        }
        let Some(runtime) = self.runtime(&leg.target) else {
            set_all(
                &mut result,
                &pending,
                RecipientOutcome::Unreachable(Reply::new(
                    451,
                    "4.3.5",
                    format!("route {} is not configured", leg.target),
                )),
            );
            return result;
        };
        let route_label = RouteLabels {
            route: runtime.name.to_string(),
        };
        let class = match self.attempt(runtime, leg, tx, &pending).await {
            Ok(outcomes) => {
                let class = if outcomes.iter().all(|o| o.is_delivered()) {
                    "2xx"
                } else if outcomes
                    .iter()
                    .any(|o| matches!(o, RecipientOutcome::Permanent(_)))
                {
                    "5xx"
                } else {
                    "4xx"
                };
                for (i, o) in pending.iter().zip(outcomes) {
                    result.recipients[*i].1 = o;
                }
                class
            }
            Err(outcome) => {
                let class = match &outcome {
                    RecipientOutcome::Permanent(_) => "5xx",
                    _ => "error",
                };
                tracing::info!(transaction = %tx.id, target = %leg.target, outcome = ?outcome, "leg failed");
                set_all(&mut result, &pending, outcome);
                class
            }
        };
        self.metrics
            .upstream_replies
            .get_or_create(&UpstreamLabels {
                route: route_label.route.clone(),
                class: class.to_owned(),
            })
            .inc();
        self.metrics
            .delivery_duration
            .get_or_create(&route_label)
            .observe(started.elapsed().as_secs_f64());
        result
    }

    /// Tries the leg's hosts in order until one takes the transaction. `Ok`: one outcome per
    /// pending recipient; `Err`: one outcome for all of them.
    async fn attempt(
        &self,
        runtime: &RouteRuntime,
        leg: &Leg,
        tx: &Transaction,
        pending: &[usize],
    ) -> Result<Vec<RecipientOutcome>, RecipientOutcome> {
        let candidates = match &leg.target {
            Target::Mx(domain) => {
                self.resolver
                    .mx(domain.as_str(), self.settings.mx_port)
                    .await
            }
            Target::Route(_) => self.resolver.route_hosts(&runtime.route.destination).await,
        };
        let candidates = match candidates {
            Ok(c) if !c.is_empty() => c,
            Ok(_) => {
                return Err(RecipientOutcome::Unreachable(Reply::new(
                    451,
                    "4.4.3",
                    "no host to deliver to",
                )));
            }
            Err(ResolveError::Permanent(e)) => {
                return Err(RecipientOutcome::Permanent(Reply::relayed(
                    550,
                    Some("5.1.2"),
                    e,
                )));
            }
            Err(ResolveError::Temporary(e)) => {
                return Err(RecipientOutcome::Unreachable(Reply::new(451, "4.4.3", e)));
            }
        };
        // The header lines this leg adds, written before the message (which is never copied
        // for a leg: it is dot-stuffed on the way out).
        let mut prefix = Vec::new();
        if leg.copy {
            prefix.extend_from_slice(
                format!("{LOOP_MARKER}: {}\r\n", self.settings.hostname).as_bytes(),
            );
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
        let tls_required = leg.require_tls || runtime.route.tls.mode == TlsMode::Required;
        let limits = runtime.limits();
        let data_timeout = Duration::from_millis(runtime.route.timeouts.data_end_ms);
        let mut last: Option<UpstreamError> = None;
        'hosts: for candidate in &candidates {
            let key = PoolKey {
                route: Arc::clone(&runtime.name),
                addr: candidate.addr,
                tls_required,
            };
            for attempt in 0..2 {
                let mut conn = match self
                    .connection(runtime, candidate, &key, leg.require_tls, attempt == 0)
                    .await
                {
                    Ok(conn) => conn,
                    Err(Unavailable::Busy(busy)) => {
                        return Err(RecipientOutcome::Unreachable(Reply::new(
                            451,
                            "4.4.5",
                            busy.to_string(),
                        )));
                    }
                    Err(Unavailable::Host(e)) => {
                        tracing::debug!(route = %runtime.name, host = %candidate.addr, error = %e, "upstream unavailable");
                        last = Some(e);
                        continue 'hosts;
                    }
                };
                match conn
                    .upstream
                    .send(
                        &tx.mail_from,
                        &recipients,
                        tx.body_8bit,
                        tx.smtputf8,
                        &prefix,
                        &tx.content,
                        data_timeout,
                    )
                    .await
                {
                    Ok(answers) => {
                        self.pool.put(key.clone(), conn, limits);
                        return Ok(answers_to_outcomes(&answers, pending.len()));
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
                    Err(e) => {
                        return Err(RecipientOutcome::Unreachable(Reply::new(
                            451,
                            e.enhanced(),
                            e.to_string(),
                        )));
                    }
                }
            }
        }
        let reply = match last {
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
        };
        Err(RecipientOutcome::Unreachable(reply))
    }

    /// A connection to `candidate` for `key`: a pooled one when `reuse`, else a new one as soon
    /// as the route has a free slot (waiting up to its connect timeout).
    async fn connection(
        &self,
        runtime: &RouteRuntime,
        candidate: &Candidate,
        key: &PoolKey,
        leg_requires_tls: bool,
        reuse: bool,
    ) -> Result<Pooled, Unavailable> {
        let checkout = self
            .pool
            .checkout(
                key,
                runtime.limits(),
                &runtime.permits,
                runtime.route.pool.max_connections,
                Duration::from_millis(runtime.route.timeouts.connect_ms),
                reuse,
            )
            .await
            .map_err(Unavailable::Busy)?;
        match checkout {
            Checkout::Reused(conn) => Ok(conn),
            Checkout::Fresh(permit) => self
                .open(runtime, candidate, leg_requires_tls)
                .await
                .map(|up| pool::Pool::wrap(up, permit))
                .map_err(Unavailable::Host),
        }
    }

    /// Opens a connection to one host with the route's policy; opportunistic TLS falls back to
    /// plaintext when the handshake fails (RFC 7435), never when TLS is required.
    async fn open(
        &self,
        runtime: &RouteRuntime,
        candidate: &Candidate,
        leg_requires_tls: bool,
    ) -> Result<Upstream, UpstreamError> {
        let connector = || {
            runtime.connector.clone().map_err(|e| {
                UpstreamError::Tls(format!("TLS settings of route {}: {e}", runtime.name))
            })
        };
        let tls = match (runtime.route.tls.mode, leg_requires_tls) {
            (TlsMode::Implicit, _) => TlsPlan::Implicit(connector()?),
            (TlsMode::Required, _) | (_, true) => TlsPlan::Required(connector()?),
            (TlsMode::Opportunistic, false) => match connector() {
                Ok(c) => TlsPlan::Opportunistic(c),
                Err(_) => TlsPlan::Off,
            },
            (TlsMode::Disabled, false) => TlsPlan::Off,
        };
        let mut dial = Dial {
            addr: candidate.addr,
            host: candidate.name.clone(),
            helo: runtime
                .route
                .helo_name
                .as_ref()
                .map(|h| h.to_string())
                .unwrap_or_else(|| self.settings.hostname.clone()),
            tls,
            credentials: runtime.credentials.clone(),
            connect_timeout: Duration::from_millis(runtime.route.timeouts.connect_ms),
            command_timeout: Duration::from_millis(runtime.route.timeouts.command_ms),
        };
        match Upstream::connect(&dial).await {
            Err(UpstreamError::Tls(e)) if matches!(dial.tls, TlsPlan::Opportunistic(_)) => {
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
    /// Every connection of the route is in use (the next host would not help).
    Busy(pool::Busy),
    /// This host cannot be reached, greeted or secured (the next one may be).
    Host(UpstreamError),
}

fn set_all(result: &mut LegOutcome, pending: &[usize], outcome: RecipientOutcome) {
    for i in pending {
        result.recipients[*i].1 = outcome.clone();
    }
}

fn answers_to_outcomes(answers: &upstream::Answers, n: usize) -> Vec<RecipientOutcome> {
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

/// Whether the header section of `message` has a field called `name`.
/// The one log line of a delivered (or refused, or deferred) transaction (SPEC 8): never an
/// address of a recipient, a credential or the body; replies as codes only.
fn log_transaction(
    tx: &Transaction,
    plan: &crate::routing::Plan,
    outcomes: &[LegOutcome],
    delays: &[Duration],
    reply: &Reply,
) {
    let direction = plan
        .recipients
        .iter()
        .flatten()
        .next()
        .map_or("none", |(_, d)| d.as_str());
    let legs: Vec<String> = outcomes
        .iter()
        .enumerate()
        .map(|(i, leg)| {
            let answer = leg
                .recipients
                .iter()
                .find_map(|(_, o)| match o {
                    RecipientOutcome::Delivered => None,
                    RecipientOutcome::AlreadyDelivered => Some(Cow::Borrowed("ledger")),
                    RecipientOutcome::Temporary(r)
                    | RecipientOutcome::Unreachable(r)
                    | RecipientOutcome::Permanent(r) => Some(Cow::Owned(format!(
                        "{} {}",
                        r.code(),
                        r.enhanced().unwrap_or_default()
                    ))),
                })
                .unwrap_or(Cow::Borrowed("250"));
            let delay = delays.get(i).map_or(0, |d| d.as_millis());
            format!("{}={} {}ms", leg.target, answer.trim_end(), delay)
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

fn has_header(message: &[u8], name: &str) -> bool {
    let mut rest = message;
    while !rest.is_empty() && !rest.starts_with(b"\r\n") {
        let end = memchr::memmem::find(rest, b"\r\n").map_or(rest.len(), |i| i + 2);
        let line = &rest[..end];
        if line.len() > name.len()
            && line[name.len()] == b':'
            && line[..name.len()].eq_ignore_ascii_case(name.as_bytes())
        {
            return true;
        }
        rest = &rest[end..];
    }
    false
}

impl Deliver for Forwarder {
    fn deliver(&self, transaction: Transaction) -> BoxFuture<'_, Reply> {
        Box::pin(self.forward(transaction))
    }

    fn sweep(&self) {
        Forwarder::sweep(self);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_loop_marker_is_found_in_the_header_section_only() {
        assert!(has_header(
            b"Subject: a\r\nx-mailroute-loop: r1\r\n\r\nbody\r\n",
            LOOP_MARKER
        ));
        assert!(!has_header(
            b"Subject: a\r\n\r\nX-Mailroute-Loop: r1\r\n",
            LOOP_MARKER
        ));
        assert!(!has_header(b"X-Mailroute-Loopy: 1\r\n\r\n", LOOP_MARKER));
    }
}
