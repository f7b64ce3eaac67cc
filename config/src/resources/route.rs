//! `MailRoute`: a named SMTP destination.

use super::{Condition, KeyRef, SecretRef};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A named SMTP destination that routing rules and relay policies send mail to: a mailbox server,
/// a legacy system during a migration, an archive, an outbound gateway or smarthost, or "deliver
/// by MX lookup".
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[cfg_attr(
    feature = "kube",
    derive(kube::CustomResource),
    kube(
        group = "mailroute.io",
        version = "v1alpha1",
        kind = "MailRoute",
        namespaced,
        status = "MailRouteStatus",
        shortname = "mroute",
        category = "mailrouting",
        doc = "A named SMTP destination (mail server, smarthost, archive, or MX lookup) that Mailroute can deliver to.",
        printcolumn = r#"{"name":"Host","type":"string","jsonPath":".spec.host","description":"Destination host or MX domain"}"#,
        printcolumn = r#"{"name":"Hosts","type":"string","jsonPath":".spec.hosts.primary[*].host","description":"Primary hosts of a route with hosts: instead of host"}"#,
        printcolumn = r#"{"name":"Port","type":"integer","jsonPath":".spec.port"}"#,
        printcolumn = r#"{"name":"TLS","type":"string","jsonPath":".spec.tls.mode"}"#,
        printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
        printcolumn = r#"{"name":"TLS Verified","type":"string","jsonPath":".status.conditions[?(@.type==\"TLSVerified\")].status"}"#,
        printcolumn = r#"{"name":"Reason","type":"string","priority":1,"jsonPath":".status.conditions[?(@.type==\"Ready\")].reason"}"#,
        printcolumn = r#"{"name":"Message","type":"string","priority":1,"jsonPath":".status.conditions[?(@.type==\"Ready\")].message"}"#,
        printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
    )
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "has(self.host) != has(self.hosts)", "message": "set exactly one of host or hosts"},
    {"rule": "!has(self.mxLookup) || has(self.host)", "message": "mxLookup needs host (the domain whose MX records are looked up), not hosts"},
    {"rule": "self.port in [25, 465, 587] || (self.port >= 1024 && self.port <= 65535)", "message": "port must be 25, 465, 587 or 1024-65535", "fieldPath": ".port"},
    {"rule": "!has(self.rateLimits) || !has(self.rateLimits.per) || self.rateLimits.per != 'Credential' || has(self.auth)", "message": "rateLimits.per Credential needs auth (the credential the limits are counted for)", "fieldPath": ".rateLimits.per"}
]))]
pub struct MailRouteSpec {
    /// Host name or IP literal (IPv4 or IPv6) of the destination; with `mxLookup`, the domain
    /// whose MX records are used. Set either `host` or `hosts`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub host: Option<String>,
    /// Weighted sets of destination hosts, instead of `host`: mail is split across the `primary`
    /// hosts in proportion to their weights, and the `secondary` hosts are used only when no
    /// primary host is reachable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hosts: Option<HostSets>,
    /// TCP port of the destination: 25, 465, 587 or 1024-65535. Default 25.
    #[serde(default = "default_port")]
    pub port: u16,
    /// Treat `host` as a domain and deliver to its MX hosts in preference order, falling back to
    /// its A/AAAA records when it has no MX record (RFC 5321 section 5.1); `{}` for plain MX
    /// delivery, `mtaSts: true` and `dane: true` to honour the destination's MTA-STS policy
    /// and DANE records.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mx_lookup: Option<MxLookup>,
    /// TLS policy for connections to this destination.
    #[serde(default)]
    pub tls: RouteTls,
    /// SMTP AUTH credentials presented to the destination.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth: Option<RouteAuth>,
    /// The name the relay presents in EHLO to this destination. Default: the relay's configured
    /// hostname (never `localhost`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub helo_name: Option<String>,
    /// Reuse of connections to this destination across messages.
    #[serde(default)]
    pub connection_pool: ConnectionPool,
    /// Time limits for talking to this destination.
    #[serde(default)]
    pub timeouts: Timeouts,
    /// Whether a failure to deliver to this destination holds the client's reply (`Required`, the
    /// default: the client is told to retry) or is only counted and logged (`BestEffort`).
    #[serde(default)]
    pub delivery: DeliveryMode,
    /// How often the operator re-runs the TLS probe of this destination (connect, EHLO,
    /// STARTTLS or implicit TLS, certificate checks, QUIT; it never sends mail), e.g. `5m`.
    /// Default `5m`; at least `10s`.
    #[serde(default = "default_probe_interval")]
    pub probe_interval: String,
    /// Check each recipient with this destination while the client is still at RCPT (MAIL
    /// FROM, RCPT TO, RSET over a pooled connection; no mail is sent), so an address the
    /// destination refuses is refused to the client at once, with the destination's own
    /// reply, instead of after the message. Applies where this route is a recipient's primary
    /// destination. Default false.
    #[serde(default)]
    pub verify_recipients: bool,
    /// The upstream's sending limits (a provider's published ones, e.g. Microsoft 365's 30
    /// messages a minute), kept by every relay replica together through the shared store: over
    /// one, the route is not tried and the client hears `451 4.4.5` naming it (a best-effort
    /// copy is counted as deferred). Rolling windows in 24 buckets.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limits: Option<RateLimits>,
}

/// How a route that delivers by MX lookup secures its connections.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MxLookup {
    /// Honour the domain's MTA-STS policy (RFC 8461): the `_mta-sts` TXT record and the policy
    /// at `https://mta-sts.<domain>/.well-known/mta-sts.txt`, cached for its `max_age`. In
    /// `enforce` mode only the MX hosts the policy lists are used, over TLS with a certificate
    /// valid for the host's name, else the client hears `451 4.4.0`; in `testing` mode mail is
    /// delivered as without a policy and what would have failed is counted. Default false.
    #[serde(default)]
    pub mta_sts: bool,
    /// Honour the MX hosts' DANE TLSA records (RFC 7672): where the MX records, the host's
    /// address and its `_<port>._tcp` TLSA records are DNSSEC-validated (the AD bit of the
    /// name server the relay is given, which must be a validating resolver it trusts), TLS is
    /// mandatory and the certificate must match a usable record (DANE-EE or DANE-TA); records
    /// all unusable still make TLS mandatory. DANE takes precedence over MTA-STS for a host
    /// that has it. Default false.
    #[serde(default)]
    pub dane: bool,
}

/// Sending limits of a route; unset ones do not apply.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RateLimits {
    /// Messages (transactions) the upstream accepts per rolling minute.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub messages_per_minute: Option<u32>,
    /// Recipients per rolling minute.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub recipients_per_minute: Option<u32>,
    /// Recipients per rolling 24 hours.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub recipients_per_day: Option<u32>,
    /// Connections open to the upstream at once, in use or idle in a relay's pool, counted over
    /// every replica (a provider's concurrent-connection limit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_concurrent_connections: Option<u32>,
    /// What the limits are counted for: this route (`Route`, the default), or the credential
    /// it authenticates as (`Credential`: every route that logs in as the same user shares
    /// one set of counts, as a provider counts per mailbox). `Credential` needs `auth`.
    #[serde(default, skip_serializing_if = "is_default")]
    pub per: RateLimitScope,
}

/// What a route's [`RateLimits`] are counted for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum RateLimitScope {
    /// The route itself.
    #[default]
    Route,
    /// The user name the route authenticates as, shared by every route using it.
    Credential,
}

fn is_default<T: Default + PartialEq>(value: &T) -> bool {
    *value == T::default()
}

fn default_port() -> u16 {
    25
}

fn default_probe_interval() -> String {
    "5m".to_owned()
}

/// Weighted destination host sets.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HostSets {
    /// Hosts that share the traffic in proportion to their weights.
    #[schemars(length(min = 1))]
    pub primary: Vec<WeightedHost>,
    /// Hosts used only when no primary host is reachable.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub secondary: Vec<WeightedHost>,
}

/// One destination host with its share of the traffic.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WeightedHost {
    /// Host name or IP literal.
    #[schemars(length(min = 1, max = 253))]
    pub host: String,
    /// TCP port; default: the route's `port`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// Share of the traffic, as a proportion of the sum of the set's weights (weights need not
    /// add up to 100). 0 takes the host out of rotation. Default 1.
    #[serde(default = "default_weight")]
    #[schemars(range(min = 0, max = 1000000))]
    pub weight: u32,
}

fn default_weight() -> u32 {
    1
}

/// How TLS is used towards a destination.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, JsonSchema,
)]
pub enum TlsMode {
    /// Use STARTTLS when the destination offers it, otherwise send in clear.
    #[default]
    Opportunistic,
    /// Always use STARTTLS; never send a byte of mail in clear.
    Required,
    /// TLS from the first byte (port 465 style).
    Implicit,
    /// Never use TLS.
    Disabled,
}

/// TLS policy for a destination.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "self.mode != 'Disabled' || !has(self.caBundleSecretRef)", "message": "caBundleSecretRef has no effect when mode is Disabled"}
]))]
pub struct RouteTls {
    /// `Opportunistic` (default: STARTTLS if offered), `Required` (never send in clear),
    /// `Implicit` (TLS from the first byte, port 465 style) or `Disabled`.
    #[serde(default)]
    pub mode: TlsMode,
    /// Require a certificate chaining to a trusted CA. Default: true when `mode` is `Required` or
    /// `Implicit`, false otherwise.
    #[serde(
        rename = "requireCASigned",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub require_ca_signed: Option<bool>,
    /// Require the certificate to match the destination host name. Default: true when `mode` is
    /// `Required` or `Implicit`, false otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub validate_hostname: Option<bool>,
    /// Extra trust roots (PEM certificates) from a Secret key, added to the system roots.
    #[serde(
        rename = "caBundleSecretRef",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub ca_bundle_secret_ref: Option<KeyRef>,
}

/// SMTP AUTH towards a destination: a password (`secretRef`) or OAuth 2.0 (`oauth2`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "has(self.secretRef) != has(self.oauth2)", "message": "set exactly one of secretRef or oauth2"}
]))]
pub struct RouteAuth {
    /// Secret with the keys `username` and `password` (SASL PLAIN or LOGIN).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_ref: Option<SecretRef>,
    /// OAuth 2.0 (SASL OAUTHBEARER or XOAUTH2, whichever the destination offers), as Microsoft
    /// 365 and Google Workspace need once basic authentication is off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oauth2: Option<RouteOAuth2>,
}

/// Where the relay gets the access tokens it presents to a destination. With
/// `refreshTokenSecretRef` the refresh-token grant is used (with the client secret too, when
/// one is given); otherwise the client-credentials grant.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "has(self.clientSecretSecretRef) || has(self.refreshTokenSecretRef)", "message": "set clientSecretSecretRef, refreshTokenSecretRef, or both"},
    {"rule": "self.tokenURL.startsWith('https://')", "message": "tokenURL must be an https:// URL", "fieldPath": ".tokenURL"}
]))]
pub struct RouteOAuth2 {
    /// The authorization server's token endpoint, e.g.
    /// `https://login.microsoftonline.com/TENANT_ID/oauth2/v2.0/token`.
    #[serde(rename = "tokenURL")]
    #[schemars(length(min = 9, max = 2048))]
    pub token_url: String,
    /// The mailbox the token is for: the SASL identity (`user=` of XOAUTH2, `a=` of
    /// OAUTHBEARER), e.g. `relay@example.com`.
    #[schemars(length(min = 1, max = 320))]
    pub username: String,
    /// Secret key holding the OAuth client (application) id.
    #[serde(rename = "clientIDSecretRef")]
    pub client_id_secret_ref: KeyRef,
    /// Secret key holding the client secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_secret_secret_ref: Option<KeyRef>,
    /// Secret key holding a refresh token (the refresh-token grant, for delegated access).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refresh_token_secret_ref: Option<KeyRef>,
    /// Scopes asked for, e.g. `https://outlook.office365.com/.default`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 20))]
    pub scopes: Vec<String>,
    /// Extra trust roots (PEM certificates) for the token endpoint, added to the system roots.
    #[serde(
        rename = "caBundleSecretRef",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub ca_bundle_secret_ref: Option<KeyRef>,
}

/// Connection reuse towards a destination.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ConnectionPool {
    /// Most connections open at once to this destination, per relay pod. Default 20.
    #[serde(default = "default_max_connections")]
    #[schemars(range(min = 1, max = 10000))]
    pub max_connections: u32,
    /// Messages sent over one connection before it is closed. Default 100.
    #[serde(default = "default_max_messages")]
    #[schemars(range(min = 1, max = 1000000))]
    pub max_messages_per_connection: u32,
    /// How long an unused connection is kept open, e.g. `30s`. Default `30s`.
    #[serde(default = "default_idle_timeout")]
    pub idle_timeout: String,
}

fn default_max_connections() -> u32 {
    20
}
fn default_max_messages() -> u32 {
    100
}
fn default_idle_timeout() -> String {
    "30s".to_owned()
}

impl Default for ConnectionPool {
    fn default() -> Self {
        Self {
            max_connections: default_max_connections(),
            max_messages_per_connection: default_max_messages(),
            idle_timeout: default_idle_timeout(),
        }
    }
}

/// Time limits towards a destination, as durations such as `10s`, `2m`, `1m30s`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Timeouts {
    /// Time to establish the TCP connection (and TLS, for `Implicit`). Default `10s`.
    #[serde(default = "default_connect")]
    pub connect: String,
    /// Time to wait for the reply to each command. Default `60s`.
    #[serde(default = "default_command")]
    pub command: String,
    /// Time to wait for the reply after the end of the message data. Default `4m`, below the
    /// relay's 5-minute bound on the client's wait.
    #[serde(default = "default_data_end")]
    pub data_end: String,
}

fn default_connect() -> String {
    "10s".to_owned()
}
fn default_command() -> String {
    "60s".to_owned()
}
fn default_data_end() -> String {
    "4m".to_owned()
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            connect: default_connect(),
            command: default_command(),
            data_end: default_data_end(),
        }
    }
}

/// Whether a failed delivery to a destination affects the client's reply.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, JsonSchema,
)]
pub enum DeliveryMode {
    /// A failure holds the client's reply: the client is told to retry (4xx).
    #[default]
    Required,
    /// A failure is counted and logged but never changes the client's reply.
    BestEffort,
}

/// Observed state of a MailRoute.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MailRouteStatus {
    /// `Ready` (the route is valid and part of the relay configuration) and `TLSVerified` (the
    /// last TLS probe succeeded).
    #[serde(default)]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// The result of the last TLS probe.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_probe: Option<ProbeResult>,
    /// The `metadata.generation` last processed by the operator.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Where the route's `rateLimits` stood when the operator last read the shared store
    /// (with each probe), over every relay replica.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limits: Option<RateLimitsStatus>,
}

/// A route's use of its rate limits, as the shared store counts it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RateLimitsStatus {
    /// When the store was read (RFC 3339).
    pub time: String,
    /// What the limits are counted for: `route:NAME` or `credential:USER`.
    pub scope: String,
    /// One entry per limit set.
    #[serde(default)]
    pub limits: Vec<RateLimitUsage>,
}

/// One limit's use.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RateLimitUsage {
    /// `messages_per_minute`, `recipients_per_minute`, `recipients_per_day` or
    /// `concurrent_connections`.
    pub limit: String,
    /// Used now: in the limit's rolling window (sent, plus held by transactions in flight),
    /// or connections open.
    pub used: u64,
    /// The limit, as `rateLimits` sets it.
    pub max: u64,
}

/// What the last TLS probe of a route saw.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ProbeResult {
    /// When the probe ran (RFC 3339).
    pub time: String,
    /// The host and port probed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// Negotiated TLS version, e.g. `TLSv1.3`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_version: Option<String>,
    /// Subject of the destination's certificate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate_subject: Option<String>,
    /// Issuer of the destination's certificate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate_issuer: Option<String>,
    /// Expiry of the destination's certificate (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate_not_after: Option<String>,
    /// Why the probe failed, if it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}
