//! The relay's Prometheus metrics (SPEC section 8). Label values come from closed sets
//! (listener kinds, yes/no), never from client input.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

/// Labels of `mailroute_relay_sessions_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SessionLabels {
    pub listener: String,
    /// `yes` when the session ended inside TLS.
    pub tls: String,
}

/// Labels of the message and recipient counters.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TrafficLabels {
    /// A tenant name from the configuration, or `none`.
    pub tenant: String,
    /// `inbound`, `internal`, `outbound` (or `none` when refused before routing).
    pub direction: String,
    /// `delivered`, `deferred` (4xx to the client) or `refused` (5xx).
    pub outcome: String,
}

/// Labels of per-route metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    /// A MailRoute name, or `mx` for direct delivery.
    pub route: String,
}

/// Labels of `mailroute_relay_upstream_replies_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UpstreamLabels {
    pub route: String,
    /// `2xx`, `4xx`, `5xx`, or `error` (connection, timeout, TLS policy).
    pub class: String,
}

/// Labels of `mailroute_relay_copies_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CopyLabels {
    pub route: String,
    /// `delivered`, `refused` (5xx: counted, never told), `deferred` (4xx or no answer),
    /// `withheld` (abandoned before its final `.`: the primary delivery did not succeed) or
    /// `ledger` (delivered by an earlier attempt).
    pub outcome: String,
}

/// Labels of `mailroute_relay_rule_matches_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RuleLabels {
    pub tenant: String,
    pub rule: String,
    /// `enforce` or `audit` (matched, changed nothing).
    pub mode: String,
}

/// Labels of `mailroute_relay_config_reloads_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReloadLabels {
    /// `success` or `error` (refused; the previous configuration stays in force).
    pub result: String,
}

/// Labels of `mailroute_relay_route_rate_limited_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RateLimitLabels {
    pub route: String,
    /// `messages_per_minute`, `recipients_per_minute`, `recipients_per_day` or
    /// `concurrent_connections`.
    pub limit: String,
}

/// Labels of `mailroute_relay_dkim_signatures_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DkimLabels {
    pub tenant: String,
    pub domain: String,
    pub selector: String,
    /// `signed` or `error`.
    pub result: &'static str,
}

/// Labels of `mailroute_relay_tls_policy_results_total`: what a TLS-RPT report (RFC 8460)
/// would say of each session to a domain delivered to by MX lookup under `mxLookup.mtaSts`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TlsPolicyLabels {
    /// The destination (policy) domain.
    pub domain: String,
    /// `sts` or `no-policy-found`.
    pub policy_type: &'static str,
    /// `enforce`, `testing`, or `none` (no usable policy).
    pub mode: &'static str,
    /// `success`, or a TLS-RPT result type (`starttls-not-supported`,
    /// `certificate-host-mismatch`, `certificate-expired`, `certificate-not-trusted`,
    /// `validation-failure`, `sts-policy-fetch-error`, `sts-policy-invalid`,
    /// `sts-webpki-invalid`).
    pub result: &'static str,
}

/// Labels of `mailroute_relay_oauth_token_requests_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TokenRequestLabels {
    pub route: String,
    /// `success`, or `failure` (unreachable, refused the client, or answered no token).
    pub result: &'static str,
}

/// Labels of `mailroute_relay_quota_rejections_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct QuotaLabels {
    pub tenant: String,
    /// `user_messages_per_day`, `user_unique_recipients_per_day`,
    /// `customer_recipients_per_day` or `customer_recipients_per_10_minutes`.
    pub limit: String,
}

/// Labels of `mailroute_relay_recipient_verifications_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VerificationLabels {
    pub route: String,
    /// `accepted`, `refused` (5xx), `deferred` (4xx) or `unavailable` (no answer: accepted).
    pub result: String,
}

/// Labels of `mailroute_relay_rcpt_refusals_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusalLabels {
    /// The tenant the session is bound to, or `none`.
    pub tenant: String,
    /// `RefusalReason::as_str`: a closed set.
    pub reason: &'static str,
}

/// Labels of `mailroute_relay_auth_total` and `mailroute_relay_tls_handshakes_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ListenerResultLabels {
    pub listener: &'static str,
    /// AUTH: `accepted`, `refused`, `throttled`, `busy`; TLS: `success`, `failure`, `timeout`.
    pub result: &'static str,
}

fn duration_histogram() -> Histogram {
    Histogram::new([
        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
        60.0,
    ])
}

/// Every relay metric.
#[derive(Debug)]
pub struct Metrics {
    pub sessions_active: Gauge,
    pub sessions: Family<SessionLabels, Counter>,
    pub bytes_received: Counter,
    pub config_generation: Gauge,
    pub config_reloads: Family<ReloadLabels, Counter>,
    /// 1 while the configuration's source can be read (files there; every API watch answering).
    pub config_source_up: Gauge,
    pub messages: Family<TrafficLabels, Counter>,
    pub recipients: Family<TrafficLabels, Counter>,
    pub delivery_duration: Family<RouteLabels, Histogram, fn() -> Histogram>,
    pub upstream_replies: Family<UpstreamLabels, Counter>,
    pub rule_matches: Family<RuleLabels, Counter>,
    /// Copies not made because the message already was one (loop protection).
    pub copies_suppressed: Counter,
    /// Copy legs by route and outcome (SPEC 6.3, 6.5).
    pub copies: Family<CopyLabels, Counter>,
    /// Loop markers that did not verify (written by a client, or by a relay with another
    /// key): ignored, copies made.
    pub loop_markers_forged: Counter,
    /// Ledger and quota store operations that failed (SPEC 5.3a).
    pub store_errors: Counter,
    pub quota_rejections: Family<QuotaLabels, Counter>,
    pub route_rate_limited: Family<RateLimitLabels, Counter>,
    /// Each route limit's use now (the shared store's count over every replica) and its
    /// maximum, read every few seconds.
    pub route_rate_used: Family<RateLimitLabels, Gauge>,
    pub route_rate_max: Family<RateLimitLabels, Gauge>,
    /// DKIM signatures made (SPEC 12).
    pub dkim_signatures: Family<DkimLabels, Counter>,
    /// Sessions under a destination's TLS policy (SPEC 12).
    pub tls_policy_results: Family<TlsPolicyLabels, Counter>,
    /// Requests to routes' OAuth token endpoints (SPEC 11).
    pub oauth_token_requests: Family<TokenRequestLabels, Counter>,
    pub recipient_verifications: Family<VerificationLabels, Counter>,
    pub rcpt_refusals: Family<RefusalLabels, Counter>,
    pub auth: Family<ListenerResultLabels, Counter>,
    pub tls_handshakes: Family<ListenerResultLabels, Counter>,
    pub connections_refused: Family<ListenerResultLabels, Counter>,
    /// Message content held now, and the budget for it (`--max-inflight-bytes`).
    pub inflight_bytes: Gauge,
    pub inflight_bytes_limit: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            sessions_active: Gauge::default(),
            sessions: Family::default(),
            bytes_received: Counter::default(),
            config_generation: Gauge::default(),
            config_reloads: Family::default(),
            config_source_up: Gauge::default(),
            messages: Family::default(),
            recipients: Family::default(),
            delivery_duration: Family::new_with_constructor(duration_histogram),
            upstream_replies: Family::default(),
            rule_matches: Family::default(),
            copies_suppressed: Counter::default(),
            copies: Family::default(),
            loop_markers_forged: Counter::default(),
            store_errors: Counter::default(),
            quota_rejections: Family::default(),
            route_rate_limited: Family::default(),
            route_rate_used: Family::default(),
            route_rate_max: Family::default(),
            dkim_signatures: Family::default(),
            tls_policy_results: Family::default(),
            oauth_token_requests: Family::default(),
            recipient_verifications: Family::default(),
            rcpt_refusals: Family::default(),
            auth: Family::default(),
            tls_handshakes: Family::default(),
            connections_refused: Family::default(),
            inflight_bytes: Gauge::default(),
            inflight_bytes_limit: Gauge::default(),
        }
    }
}

impl Metrics {
    /// Creates the metrics and registers them.
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = Self::default();
        mailroute_admin::register_build_info(registry, "relay", env!("CARGO_PKG_VERSION"));
        registry.register(
            "mailroute_relay_sessions_active",
            "SMTP sessions open now",
            metrics.sessions_active.clone(),
        );
        registry.register(
            "mailroute_relay_sessions",
            "SMTP sessions ended, by listener and whether TLS was in use",
            metrics.sessions.clone(),
        );
        registry.register(
            "mailroute_relay_bytes_received",
            "Octets received from SMTP clients",
            metrics.bytes_received.clone(),
        );
        registry.register(
            "mailroute_relay_config_generation",
            "Generation of the relay configuration in force",
            metrics.config_generation.clone(),
        );
        registry.register(
            "mailroute_relay_config_reloads",
            "Configuration changes seen, by result (success, or error: refused, previous kept)",
            metrics.config_reloads.clone(),
        );
        registry.register(
            "mailroute_relay_config_source_up",
            "1 while the configuration's source can be read: its files exist, or every watch of the Kubernetes API answers",
            metrics.config_source_up.clone(),
        );
        registry.register(
            "mailroute_relay_messages",
            "Messages that reached end of data, by tenant, direction and what the client was told",
            metrics.messages.clone(),
        );
        registry.register(
            "mailroute_relay_recipients",
            "Recipients of those messages, by tenant, direction and outcome",
            metrics.recipients.clone(),
        );
        registry.register_with_unit(
            "mailroute_relay_delivery_duration",
            "Time to deliver one leg to its upstream, by route",
            Unit::Seconds,
            metrics.delivery_duration.clone(),
        );
        registry.register(
            "mailroute_relay_upstream_replies",
            "Upstream transactions by route and reply class",
            metrics.upstream_replies.clone(),
        );
        registry.register(
            "mailroute_relay_rule_matches",
            "Routing rule matches per recipient, by tenant, rule and mode",
            metrics.rule_matches.clone(),
        );
        registry.register(
            "mailroute_relay_copies_suppressed",
            "Copies not made because the message already was a copy (loop protection)",
            metrics.copies_suppressed.clone(),
        );
        registry.register(
            "mailroute_relay_copies",
            "Copy legs (alsoDeliverTo) by route and outcome",
            metrics.copies.clone(),
        );
        registry.register(
            "mailroute_relay_loop_markers_forged",
            "X-Mailroute-Loop markers that did not verify (ignored: copies made)",
            metrics.loop_markers_forged.clone(),
        );
        registry.register(
            "mailroute_relay_store_errors",
            "Shared store operations that failed",
            metrics.store_errors.clone(),
        );
        registry.register(
            "mailroute_relay_quota_rejections",
            "Recipients refused because a sending limit was reached, by tenant and limit",
            metrics.quota_rejections.clone(),
        );
        registry.register(
            "mailroute_relay_route_rate_limited",
            "Legs not tried because their route was at a rate limit (MailRoute.rateLimits), by route and limit",
            metrics.route_rate_limited.clone(),
        );
        registry.register(
            "mailroute_relay_route_rate_limit_used",
            "Use of each route rate limit now, over every replica (MailRoute.rateLimits), by route and limit",
            metrics.route_rate_used.clone(),
        );
        registry.register(
            "mailroute_relay_route_rate_limit_max",
            "Each route rate limit's maximum (MailRoute.rateLimits), by route and limit",
            metrics.route_rate_max.clone(),
        );
        registry.register(
            "mailroute_relay_dkim_signatures",
            "DKIM signatures of tenants' mail (RelayPolicy.dkim), by tenant, domain, selector and result",
            metrics.dkim_signatures.clone(),
        );
        registry.register(
            "mailroute_relay_tls_policy_results",
            "Sessions to MX hosts under their domain's MTA-STS policy (mxLookup.mtaSts), by domain, policy type, mode and TLS-RPT result",
            metrics.tls_policy_results.clone(),
        );
        registry.register(
            "mailroute_relay_oauth_token_requests",
            "Requests for access tokens to routes' OAuth 2.0 token endpoints, by route and result",
            metrics.oauth_token_requests.clone(),
        );
        registry.register(
            "mailroute_relay_recipient_verifications",
            "Recipients checked with the primary upstream at RCPT time, by route and result",
            metrics.recipient_verifications.clone(),
        );
        registry.register(
            "mailroute_relay_rcpt_refusals",
            "Recipients refused at RCPT time, by tenant and reason",
            metrics.rcpt_refusals.clone(),
        );
        registry.register(
            "mailroute_relay_auth",
            "SMTP AUTH attempts, by listener and result",
            metrics.auth.clone(),
        );
        registry.register(
            "mailroute_relay_tls_handshakes",
            "TLS handshakes with clients (STARTTLS and implicit), by listener and result",
            metrics.tls_handshakes.clone(),
        );
        registry.register(
            "mailroute_relay_connections_refused",
            "Connections closed before a session, by listener and reason (pregreet, proxy_untrusted, proxy_invalid, too_many_from_client, too_many_sessions)",
            metrics.connections_refused.clone(),
        );
        registry.register_with_unit(
            "mailroute_relay_inflight",
            "Message content the relay holds now, across sessions, until delivery ends",
            Unit::Bytes,
            metrics.inflight_bytes.clone(),
        );
        registry.register_with_unit(
            "mailroute_relay_inflight_limit",
            "The memory budget for message content (--max-inflight-bytes); 452 4.3.1 beyond it",
            Unit::Bytes,
            metrics.inflight_bytes_limit.clone(),
        );
        metrics
    }
}
