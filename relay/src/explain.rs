//! `explain` (SPEC 7): what the relay would do with one envelope, offline — the hosted suites'
//! "test message".
//!
//! Nothing here decides anything: the envelope is played through the relay's own session state
//! machine ([`Session`]), its own RCPT decision ([`Gate`]: binding, relay policy, rules, quotas)
//! and its own delivery plan ([`Router::plan_routes`]), built from the configuration exactly as
//! a running relay builds a generation. What the report adds is read from the same decisions:
//! how the session was bound, each recipient's route and the rules that matched, the legs, the
//! quota counters a recipient spends.
//!
//! Offline means three things, each said in the report: no upstream is contacted (recipient
//! verification and route rate limits, asked at RCPT by a running relay, are not asked), quota
//! counters start at zero (a fresh memory store: a limit this message alone exceeds is found,
//! one reached by earlier mail is not), and the reply to the content is the one a running relay
//! gives when every required leg is accepted by its upstream.

use crate::admission::Gate;
use crate::config_source::Loaded;
use crate::delivery::{self, SetupError};
use crate::generation::Builder;
use crate::interfaces::{Admit, Admitted, Refusal};
use crate::metrics::Metrics;
use crate::reply::Reply;
use crate::routing::{Router, Target};
use crate::smtp::received::TlsInfo;
use crate::smtp::session::{AuthOutcome, Event, ListenerKind, Session, SessionConfig};
use base64::Engine as _;
use mailroute_config::document::{Destination, RelayConfig};
use mailroute_store::{MemoryLedger, MemoryQuotaStore};
use serde::Serialize;
use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

/// The message explain sends after DATA, as on the wire (its end of data included).
pub const CONTENT: &[u8] = b"Subject: mailroute explain\r\n\r\nA message to explain.\r\n.\r\n";

/// The envelope to explain, and the session it arrives in.
#[derive(Clone, Debug)]
pub struct Envelope {
    pub client: IpAddr,
    /// The EHLO name.
    pub helo: String,
    /// SMTP AUTH as this user (its password taken as right: explain checks no credentials).
    pub auth: Option<String>,
    /// STARTTLS before MAIL (implied by `auth`: AUTH is offered only inside TLS).
    pub tls: bool,
    pub from: String,
    pub to: Vec<String>,
}

/// What the relay would do, as `explain` prints it (`-o json`: this, serialised).
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Explanation {
    pub session: SessionReport,
    /// Every command and the exact reply the relay gives it, in order.
    pub commands: Vec<Step>,
    pub recipients: Vec<RecipientReport>,
    /// The delivery plan of the message (empty when no recipient was accepted).
    pub legs: Vec<LegReport>,
    /// Copies left out because the message is itself a relay's copy.
    pub copies_suppressed: usize,
    /// What explain did not do that a running relay does.
    pub offline: Vec<String>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SessionReport {
    pub client: IpAddr,
    pub helo: String,
    pub tls: bool,
    pub authenticated: Option<String>,
    /// The tenant the session is bound to, if any.
    pub tenant: Option<String>,
    /// How: `auth`, `range` or `ehlo` (which names a tenant but authorises nothing).
    pub bound_by: Option<&'static str>,
    /// Whether the session may relay and send for its tenant.
    pub authorised: bool,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Step {
    pub command: String,
    /// The reply's lines as sent, without line endings.
    pub reply: Vec<String>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RecipientReport {
    pub address: String,
    pub accepted: bool,
    /// The RCPT reply's first line.
    pub reply: String,
    /// Why it was refused (`mailroute_relay_rcpt_refusals_total`'s reason).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refused_for: Option<&'static str>,
    pub tenant: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub direction: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub account_type: Option<String>,
    /// Every rule that matched, in evaluation order.
    pub rules: Vec<RuleReport>,
    /// Where it goes: a route's name, or `mx:<domain>` (direct delivery).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// The address given upstream (after `rewriteRecipientDomain`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub deliver_as: Option<String>,
    /// Extra copies (`alsoDeliverTo`): `<route>: <address>`.
    pub copies: Vec<String>,
    /// Quota counters the recipient spends (SPEC 3.4).
    pub quota: Vec<CounterReport>,
    /// Asked of the primary route's upstream at RCPT by a running relay (not by explain).
    pub checked_upstream_at_rcpt: bool,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RuleReport {
    pub rule: String,
    /// `mode: Audit`: matched, changed nothing.
    pub audit: bool,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CounterReport {
    pub limit: &'static str,
    pub key: String,
    pub max: u64,
    /// `false`: counted, never refused (a registered user under the tenant's limit).
    pub enforced: bool,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LegReport {
    pub target: String,
    pub copy: bool,
    /// Whether its failure holds the client's reply (`delivery: Required`).
    pub required: bool,
    /// Where the route delivers: a host, host sets, or MX lookup (with MTA-STS/DANE).
    pub destination: String,
    /// The TLS the leg is held to.
    pub tls: String,
    pub recipients: Vec<String>,
}

/// Why an envelope cannot be explained.
#[derive(Debug, thiserror::Error)]
pub enum ExplainError {
    #[error("the configuration cannot be built: {0}")]
    Setup(#[from] SetupError),
    #[error("{0}")]
    Address(String),
    #[error("give at least one --to")]
    NoRecipient,
}

/// What explain's session says to the relay, one command at a time.
struct Player {
    session: Session,
    gate: Arc<Gate>,
    router: Arc<Router>,
    /// Routes a running relay asks at RCPT (`verifyRecipients`, `rateLimits`).
    asked_at_rcpt: Vec<String>,
    steps: Vec<Step>,
    recipients: Vec<RecipientReport>,
    plan: Option<crate::routing::Plan>,
}

/// Plays `envelope` through the relay built from `loaded` and reports what it would do.
pub async fn explain(
    loaded: &Loaded,
    hostname: &str,
    envelope: &Envelope,
) -> Result<Explanation, ExplainError> {
    if envelope.to.is_empty() {
        return Err(ExplainError::NoRecipient);
    }
    for (what, address) in
        std::iter::once(("--from", &envelope.from)).chain(envelope.to.iter().map(|to| ("--to", to)))
    {
        if address.contains(['<', '>', '\r', '\n']) {
            return Err(ExplainError::Address(format!(
                "{what} {address:?}: give the bare address, without <> or line breaks"
            )));
        }
    }
    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = Arc::new(Metrics::register(&mut registry));
    let builder = Builder {
        hostname: hostname.to_owned(),
        tls_available: true,
        max_message_size: 35 * 1024 * 1024,
        max_recipients: 1000,
        ledger: Arc::new(MemoryLedger::new(1024)),
        quota_store: Arc::new(MemoryQuotaStore::default()),
        quota_hold: Duration::from_secs(900),
        store_timeout: Duration::from_secs(5),
        store_failure_open: false,
        dns_server: None,
        mx_port: 25,
        loop_key: Some(Arc::new(delivery::LoopKey::random())),
        metrics,
        tokens: None,
        budget: crate::budget::Budget::unlimited(),
        token_clients: Arc::default(),
        mta_sts: Arc::new(delivery::mta_sts::Policies::new(443, None)),
        ask_upstreams: false,
    };
    let built = builder.build(loaded)?;
    let config = &loaded.document.config;
    let mut session_config: SessionConfig = built.session;
    session_config.now = std::time::SystemTime::now;
    let listener = if envelope.auth.is_some() {
        ListenerKind::Submission
    } else {
        ListenerKind::Smtp
    };
    let mut player = Player {
        session: Session::new(
            Arc::new(session_config),
            "explain",
            SocketAddr::new(envelope.client, 40000),
            listener,
            None,
        ),
        gate: built.gate,
        router: built.router,
        asked_at_rcpt: config
            .routes
            .iter()
            .filter(|(_, r)| r.verify_recipients || r.rate_limits.is_some())
            .map(|(name, _)| name.clone())
            .collect(),
        steps: Vec::new(),
        recipients: Vec::new(),
        plan: None,
    };
    player.steps.push(Step {
        command: "(connect)".to_owned(),
        reply: lines(&player.session.greeting()),
    });

    player.command(format!("EHLO {}", envelope.helo)).await;
    if envelope.tls || envelope.auth.is_some() {
        player.command("STARTTLS".to_owned()).await;
        player.command(format!("EHLO {}", envelope.helo)).await;
    }
    if let Some(user) = &envelope.auth {
        let token = base64::engine::general_purpose::STANDARD.encode(format!("\0{user}\0-"));
        player.command(format!("AUTH PLAIN {token}")).await;
    }
    player
        .command(format!("MAIL FROM:<{}>", envelope.from))
        .await;
    for to in &envelope.to {
        player.command(format!("RCPT TO:<{to}>")).await;
    }
    // NB: DATA even when every recipient was refused: its reply is part of the answer.
    if player.session.in_transaction() {
        player.command("DATA".to_owned()).await;
        if player.session.receiving_content() {
            player.content(CONTENT).await;
        }
    }
    player.command("QUIT".to_owned()).await;

    // NB: the session's own view: an AUTH the relay refused binds nothing.
    let facts = crate::interfaces::SessionFacts {
        client: envelope.client,
        helo: Some(envelope.helo.clone()),
        authenticated: player.session.authenticated().map(str::to_owned),
        tls: player.session.tls().is_some(),
    };
    let (tenant, binding) = player.gate.binding(&facts);
    let plan = player.plan.take().unwrap_or_default();
    let legs = plan
        .legs
        .iter()
        .map(|leg| leg_report(config, leg))
        .collect();
    let mut offline = vec![
        "no upstream contacted: the reply to the content is the one given when every required leg is accepted"
            .to_owned(),
        "quota counters start at zero: limits reached by earlier mail are not seen".to_owned(),
    ];
    if envelope.auth.is_some() {
        offline.push("AUTH: the password is taken as right".to_owned());
    }
    if player.recipients.iter().any(|r| r.checked_upstream_at_rcpt) {
        offline
            .push("recipient verification and route rate limits at RCPT are not asked".to_owned());
    }
    Ok(Explanation {
        session: SessionReport {
            client: envelope.client,
            helo: envelope.helo.clone(),
            tls: facts.tls,
            authenticated: facts.authenticated.clone(),
            tenant: tenant.map(|t| t.to_string()),
            bound_by: binding.by.map(|b| b.as_str()),
            authorised: binding.authorised,
        },
        commands: player.steps,
        recipients: player.recipients,
        legs,
        copies_suppressed: plan.copies_suppressed,
        offline,
    })
}

impl RecipientReport {
    /// A recipient nothing is known of yet but its address.
    fn refused(address: &str) -> Self {
        Self {
            address: address.to_owned(),
            accepted: false,
            reply: String::new(),
            refused_for: None,
            tenant: None,
            direction: None,
            account_type: None,
            rules: Vec::new(),
            target: None,
            deliver_as: None,
            copies: Vec::new(),
            quota: Vec::new(),
            checked_upstream_at_rcpt: false,
        }
    }
}

impl Explanation {
    /// Whether the relay accepts the message for every recipient (its final reply is a 2xx).
    pub fn accepted(&self) -> bool {
        !self.recipients.is_empty()
            && self.recipients.iter().all(|r| r.accepted)
            && self
                .commands
                .iter()
                .find(|s| s.command == "(message content)")
                .and_then(|s| s.reply.first())
                .is_some_and(|r| r.starts_with('2'))
    }
}

impl Player {
    async fn command(&mut self, command: String) {
        if self.session.is_closed() {
            return;
        }
        let mut line = command.clone().into_bytes();
        line.extend_from_slice(b"\r\n");
        self.feed(command, &line).await;
    }

    async fn content(&mut self, content: &[u8]) {
        self.feed("(message content)".to_owned(), content).await;
    }

    async fn feed(&mut self, command: String, input: &[u8]) {
        let mut events = Vec::new();
        let mut replies = Vec::new();
        let recorded = self.recipients.len();
        let mut refused_by_session = None;
        self.session.receive(input, &mut events);
        while !events.is_empty() {
            for event in std::mem::take(&mut events) {
                match event {
                    Event::Reply(reply) => replies.extend(lines(&reply)),
                    Event::StartTls => self.session.tls_started(TlsInfo {
                        version: "TLSv1_3".to_owned(),
                        cipher: "TLS13_AES_256_GCM_SHA384".to_owned(),
                    }),
                    Event::Authenticate { username, .. } => {
                        self.session
                            .auth_result(&username, AuthOutcome::Accepted, &mut events);
                    }
                    Event::CheckRecipient(query) => {
                        let verdict = self.gate.admit(&query).await;
                        self.record(&query, &verdict);
                        self.session.recipient_checked(verdict, &mut events);
                    }
                    Event::Message(transaction) => {
                        let routes = transaction.recipients.iter().map(|r| {
                            r.route
                                .clone()
                                .ok_or_else(|| Reply::bare(554, "no route decided"))
                        });
                        self.plan = Some(self.router.plan_routes(routes, false));
                        self.gate.end(&transaction.id, true).await;
                        self.session
                            .delivered(Reply::message_accepted(&transaction.id), &mut events);
                    }
                    Event::RecipientRefused(reason) => refused_by_session = Some(reason.as_str()),
                    Event::Close => {}
                }
            }
        }
        let first = replies.first().cloned().unwrap_or_default();
        if let Some(address) = command.strip_prefix("RCPT TO:<")
            && self.recipients.len() == recorded
        {
            // Refused by the session's own checks (syntax, recipients per message), before
            // the RCPT decision.
            let mut report = RecipientReport::refused(address.trim_end_matches('>'));
            report.refused_for = Some(refused_by_session.unwrap_or("protocol"));
            self.recipients.push(report);
        }
        if let Some(last) = self.recipients.last_mut()
            && last.reply.is_empty()
        {
            last.reply = first;
        }
        self.steps.push(Step {
            command,
            reply: replies,
        });
    }

    fn record(
        &mut self,
        query: &crate::interfaces::RecipientQuery,
        verdict: &Result<Admitted, Refusal>,
    ) {
        let (tenant, binding) = self.gate.binding(&query.session);
        let mut report = RecipientReport::refused(&query.recipient);
        report.accepted = verdict.is_ok();
        report.tenant = tenant.map(|t| t.to_string());
        match verdict {
            Ok(admitted) => {
                let route = &admitted.route;
                report.tenant = Some(route.tenant.to_string());
                report.direction = Some(route.direction.as_str());
                report.account_type = route.account_type.map(|t| format!("{t:?}"));
                report.rules = route
                    .matches
                    .iter()
                    .map(|m| RuleReport {
                        rule: m.rule.to_string(),
                        audit: m.audit,
                    })
                    .collect();
                report.target = Some(route.target.to_string());
                report.deliver_as = Some(route.deliver_as.clone());
                report.copies = route
                    .copies
                    .iter()
                    .map(|c| format!("{}: {}", c.target, c.recipient))
                    .collect();
                report.quota = self
                    .gate
                    .counters(&binding, &query.sender, &query.recipient, query.accepted)
                    .into_iter()
                    .map(|c| CounterReport {
                        limit: c.limit.as_str(),
                        key: c.key,
                        max: c.max,
                        enforced: c.enforce,
                    })
                    .collect();
                report.checked_upstream_at_rcpt = matches!(
                    &route.target,
                    Target::Route(name) if self.asked_at_rcpt.iter().any(|r| **r == **name)
                );
            }
            Err(refusal) => {
                report.refused_for = Some(refusal.reason.as_str());
                if let Some(tenant) = &refusal.tenant {
                    report.tenant = Some(tenant.to_string());
                }
            }
        }
        self.recipients.push(report);
    }
}

fn lines(reply: &Reply) -> Vec<String> {
    let mut out = Vec::new();
    reply.write_to(&mut out);
    String::from_utf8_lossy(&out)
        .split("\r\n")
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect()
}

fn leg_report(config: &RelayConfig, leg: &crate::routing::Leg) -> LegReport {
    let route = match &leg.target {
        Target::Route(name) => config.routes.get(&**name),
        Target::Mx(_) => None,
    };
    let destination = match (&leg.target, route) {
        (Target::Mx(domain), _) => format!("MX hosts of {domain}, port 25"),
        (_, None) => "unknown route".to_owned(),
        (_, Some(route)) => match &route.destination {
            Destination::Host(host) => format!("{}:{}", host.host, host.port),
            Destination::HostSets { primary, secondary } => {
                let names = |set: &[mailroute_config::document::WeightedHostPort]| {
                    set.iter()
                        .map(|h| format!("{}:{}", h.host, h.port))
                        .collect::<Vec<_>>()
                        .join(", ")
                };
                if secondary.is_empty() {
                    format!("host set {}", names(primary))
                } else {
                    format!(
                        "host set {}; secondary {}",
                        names(primary),
                        names(secondary)
                    )
                }
            }
            Destination::Mx {
                domain,
                port,
                mta_sts,
                dane,
            } => {
                let mut text = format!("MX hosts of {domain}, port {port}");
                let policies: Vec<&str> = [(*dane, "DANE"), (*mta_sts, "MTA-STS")]
                    .into_iter()
                    .filter_map(|(on, name)| on.then_some(name))
                    .collect();
                if !policies.is_empty() {
                    let _ = write!(text, " ({} honoured)", policies.join(", "));
                }
                text
            }
        },
    };
    let tls = match route {
        None => "opportunistic STARTTLS".to_owned(),
        Some(route) => {
            let mut text = format!("{:?}", route.tls.mode);
            if route.tls.require_ca_signed {
                text.push_str(", CA-signed certificate");
            }
            if route.tls.validate_hostname {
                text.push_str(", host name checked");
            }
            text
        }
    };
    let tls = if leg.require_tls {
        format!("{tls}; TLS required by a rule (requireTLS)")
    } else {
        tls
    };
    LegReport {
        target: leg.target.to_string(),
        copy: leg.copy,
        required: leg.required,
        destination,
        tls,
        recipients: leg.recipients.iter().map(|r| r.address.clone()).collect(),
    }
}

/// The report for people: what `explain` prints without `-o json`.
pub fn render_text(explanation: &Explanation) -> String {
    let mut out = String::new();
    let s = &explanation.session;
    let _ = writeln!(
        out,
        "Session: client {}, EHLO {}, TLS {}, AUTH {}",
        s.client,
        s.helo,
        if s.tls { "yes" } else { "no" },
        s.authenticated.as_deref().unwrap_or("none"),
    );
    let _ = match (&s.tenant, s.bound_by) {
        (Some(tenant), Some(by)) => writeln!(
            out,
            "  bound to tenant {tenant} by {by}, {}",
            if s.authorised {
                "authorised to relay and send for it"
            } else {
                "not authorised (named only)"
            }
        ),
        _ => writeln!(
            out,
            "  bound to no tenant (only mail for a tenant's domains is accepted)"
        ),
    };
    let _ = writeln!(out, "\nCommands and replies:");
    for step in &explanation.commands {
        let _ = writeln!(out, "  C: {}", step.command);
        for line in &step.reply {
            let _ = writeln!(out, "  S: {line}");
        }
    }
    let _ = writeln!(out, "\nRecipients:");
    for r in &explanation.recipients {
        let _ = writeln!(out, "  {}: {}", r.address, r.reply);
        if let Some(reason) = r.refused_for {
            let _ = writeln!(out, "    refused: {reason}");
        }
        if let Some(direction) = r.direction {
            let _ = writeln!(
                out,
                "    tenant {}, {direction}{}",
                r.tenant.as_deref().unwrap_or("-"),
                r.account_type
                    .as_deref()
                    .map(|t| format!(", account type {t}"))
                    .unwrap_or_default()
            );
        }
        for rule in &r.rules {
            let _ = writeln!(
                out,
                "    rule {}{}",
                rule.rule,
                if rule.audit {
                    " (audit: matched, changed nothing)"
                } else {
                    ""
                }
            );
        }
        if let (Some(target), Some(as_)) = (&r.target, &r.deliver_as) {
            let _ = writeln!(out, "    goes to {target} as {as_}");
        }
        for copy in &r.copies {
            let _ = writeln!(out, "    copy to {copy}");
        }
        if r.checked_upstream_at_rcpt {
            let _ = writeln!(
                out,
                "    checked with the upstream at RCPT (not by explain)"
            );
        }
        for c in &r.quota {
            let _ = writeln!(
                out,
                "    quota {} ({}, at most {}{})",
                c.limit,
                c.key,
                c.max,
                if c.enforced { "" } else { ", counted only" }
            );
        }
    }
    if !explanation.legs.is_empty() {
        let _ = writeln!(out, "\nLegs:");
        for leg in &explanation.legs {
            let _ = writeln!(
                out,
                "  {}{}, {}: {}",
                leg.target,
                if leg.copy { " (copy)" } else { "" },
                if leg.required {
                    "required"
                } else {
                    "best effort"
                },
                leg.recipients.join(", ")
            );
            let _ = writeln!(out, "    {}; TLS: {}", leg.destination, leg.tls);
        }
    }
    if explanation.copies_suppressed > 0 {
        let _ = writeln!(
            out,
            "  {} copies left out (the message is a relay's copy)",
            explanation.copies_suppressed
        );
    }
    let _ = writeln!(out, "\nOffline:");
    for note in &explanation.offline {
        let _ = writeln!(out, "  {note}");
    }
    out
}
