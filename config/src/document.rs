//! The compiled relay document (SPEC section 4): one immutable, versioned description of
//! everything a relay needs, with every reference resolved and every default applied.
//!
//! The operator writes it to ConfigMap `mailroute-relay-config` and the relay reads it back with
//! [`RelayDocument::from_json`], which runs the same checks the compiler guarantees (so a
//! hand-edited or truncated document is refused, never half-applied). Credentials never appear in
//! it: they travel separately as [`Credentials`].

use crate::names::{Address, Domain};
use crate::resources::{
    AccountType, AllowedSenders, DeliveryMode, MessageKind, RuleMode, Tier, TlsMode,
};
use ipnet::IpNet;
use schemars::JsonSchema;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

/// `apiVersion` of the document format.
pub const API_VERSION: &str = "mailroute.io/relay-config/v1";

/// The versioned document: a generation number, a content hash and the configuration.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RelayDocument {
    /// Always [`API_VERSION`].
    pub api_version: String,
    /// Increases each time the operator publishes a document with a different hash.
    pub generation: u64,
    /// `sha256:` and the hex SHA-256 of the JSON serialisation of `config`.
    pub hash: String,
    /// What the relay enforces.
    pub config: RelayConfig,
}

/// Why a document was refused.
#[derive(Debug, thiserror::Error)]
pub enum DocumentError {
    #[error("not a relay document: {0}")]
    Syntax(#[from] serde_json::Error),
    #[error("apiVersion is {found:?}; this relay reads {API_VERSION:?}")]
    ApiVersion { found: String },
    #[error(
        "hash mismatch: the document says {declared}, its content hashes to {actual} (truncated or edited by hand?)"
    )]
    Hash { declared: String, actual: String },
    #[error("inconsistent document: {}", .0.join("; "))]
    Inconsistent(Vec<String>),
}

impl RelayDocument {
    /// Wraps a configuration with its generation and content hash.
    pub fn new(generation: u64, config: RelayConfig) -> Self {
        let hash = config.content_hash();
        Self {
            api_version: API_VERSION.to_owned(),
            generation,
            hash,
            config,
        }
    }

    /// Parses and checks a document as the relay loads it: format version, content hash, and
    /// the consistency of every reference ([`RelayConfig::check`]).
    pub fn from_json(bytes: &[u8]) -> Result<Self, DocumentError> {
        let document: RelayDocument = serde_json::from_slice(bytes)?;
        if document.api_version != API_VERSION {
            return Err(DocumentError::ApiVersion {
                found: document.api_version,
            });
        }
        let actual = document.config.content_hash();
        if actual != document.hash {
            return Err(DocumentError::Hash {
                declared: document.hash,
                actual,
            });
        }
        document
            .config
            .check()
            .map_err(DocumentError::Inconsistent)?;
        Ok(document)
    }

    /// The canonical serialisation (what `render` prints and the ConfigMap holds).
    pub fn to_json_pretty(&self) -> String {
        // NB: serialising these types cannot fail: every map key is a string.
        serde_json::to_string_pretty(self).unwrap_or_default()
    }
}

/// Everything a relay enforces for one namespace.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RelayConfig {
    /// The namespace the resources came from.
    pub namespace: String,
    /// Destinations by MailRoute name.
    pub routes: BTreeMap<String, Route>,
    /// Tenants by RelayPolicy name.
    pub tenants: BTreeMap<String, Tenant>,
}

impl RelayConfig {
    /// `sha256:<hex>` of the canonical JSON of this configuration. Maps are ordered and lists
    /// sorted by the compiler, so equal inputs give equal hashes.
    pub fn content_hash(&self) -> String {
        let bytes = serde_json::to_vec(self).unwrap_or_default();
        let digest = Sha256::digest(&bytes);
        let mut hex = String::with_capacity(7 + 64);
        hex.push_str("sha256:");
        for byte in digest.iter() {
            hex.push_str(&format!("{byte:02x}"));
        }
        hex
    }

    /// Checks what types alone cannot: every route a tenant or rule names exists, every group a
    /// rule names exists in its tenant, rules are in evaluation order, no domain or IP range
    /// belongs to two tenants. Returns every problem found.
    pub fn check(&self) -> Result<(), Vec<String>> {
        let mut problems = Vec::new();
        let mut route_ref = |owner: &str, field: &str, name: &Option<String>| {
            if let Some(name) = name
                && !self.routes.contains_key(name)
            {
                problems.push(format!("{owner}: {field}: no route {name:?}"));
            }
        };
        for (tenant_name, tenant) in &self.tenants {
            let owner = format!("tenant {tenant_name}");
            route_ref(&owner, "inboundRoute", &tenant.inbound_route);
            route_ref(&owner, "outboundRoute", &tenant.outbound_route);
            for rule in &tenant.rules {
                let owner = format!("tenant {tenant_name} rule {}", rule.name);
                route_ref(&owner, "actions.route", &rule.actions.route);
                for copy in &rule.actions.also_deliver_to {
                    route_ref(&owner, "actions.alsoDeliverTo.route", &copy.route);
                }
            }
        }
        let mut domain_owner: BTreeMap<&Domain, &str> = BTreeMap::new();
        let mut range_owner: BTreeMap<&IpNet, &str> = BTreeMap::new();
        for (tenant_name, tenant) in &self.tenants {
            let groups: BTreeSet<&str> = tenant.groups.iter().map(|g| g.name.as_str()).collect();
            for rule in &tenant.rules {
                for matcher in rule.senders.iter().chain(&rule.recipients) {
                    if let Matcher::Group(group) = matcher
                        && !groups.contains(group.as_str())
                    {
                        problems.push(format!(
                            "tenant {tenant_name} rule {}: no group {group:?}",
                            rule.name
                        ));
                    }
                }
            }
            if !tenant
                .rules
                .windows(2)
                .all(|w| (w[0].priority, &w[0].name) < (w[1].priority, &w[1].name))
            {
                problems.push(format!(
                    "tenant {tenant_name}: rules are not sorted by priority, then name"
                ));
            }
            for domain in &tenant.domains {
                if let Some(other) = domain_owner.insert(domain, tenant_name) {
                    problems.push(format!(
                        "domain {domain} belongs to tenants {other} and {tenant_name}"
                    ));
                }
            }
            for range in &tenant.ip_ranges {
                if let Some(other) = range_owner.insert(range, tenant_name) {
                    problems.push(format!(
                        "IP range {range} belongs to tenants {other} and {tenant_name}"
                    ));
                }
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems)
        }
    }
}

/// A destination.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Route {
    /// Where the mail goes.
    pub destination: Destination,
    /// TLS policy, with the mode-dependent defaults applied.
    pub tls: RouteTls,
    /// Whether SMTP AUTH credentials for this route are in [`Credentials::routes`].
    pub auth: bool,
    /// EHLO name; `None` means the relay's `--hostname`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub helo_name: Option<Domain>,
    /// Connection reuse.
    pub pool: Pool,
    /// Time limits, in milliseconds.
    pub timeouts: RouteTimeouts,
    /// Whether a failure holds the client's reply.
    pub delivery: DeliveryMode,
    /// How often the operator probes the route's TLS, in milliseconds.
    pub probe_interval_ms: u64,
    /// Recipients are checked with this route's upstream at RCPT time.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub verify_recipients: bool,
    /// The upstream's sending limits, kept across replicas (SPEC 11).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limits: Option<crate::resources::RateLimits>,
}

/// Where a route delivers.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub enum Destination {
    /// One host.
    Host(HostPort),
    /// The MX hosts of a domain (A/AAAA fallback), on a port; `mta_sts`, `dane`: the
    /// domain's MTA-STS policy and its MX hosts' DANE records are honoured.
    Mx {
        domain: Domain,
        port: u16,
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        mta_sts: bool,
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        dane: bool,
    },
    /// Weighted host sets.
    HostSets {
        primary: Vec<WeightedHostPort>,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        secondary: Vec<WeightedHostPort>,
    },
}

/// A host and port.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HostPort {
    pub host: Host,
    pub port: u16,
}

/// A host, port and weight.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WeightedHostPort {
    pub host: Host,
    pub port: u16,
    pub weight: u32,
}

/// A host name or an IP address.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Host {
    Name(Domain),
    Ip(IpAddr),
}

impl FromStr for Host {
    type Err = crate::names::NameError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bare = s
            .strip_prefix('[')
            .and_then(|s| s.strip_suffix(']'))
            .map(|s| s.strip_prefix("IPv6:").unwrap_or(s))
            .unwrap_or(s);
        match bare.parse::<IpAddr>() {
            Ok(ip) => Ok(Host::Ip(ip)),
            Err(_) => s.parse().map(Host::Name),
        }
    }
}

impl fmt::Display for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Host::Name(name) => name.fmt(f),
            Host::Ip(ip) => ip.fmt(f),
        }
    }
}

impl Serialize for Host {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Host {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = std::borrow::Cow::<str>::deserialize(deserializer)?;
        text.parse()
            .map_err(|e| serde::de::Error::custom(format!("host {text:?} {e}")))
    }
}

/// TLS policy of a route with its defaults resolved.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RouteTls {
    pub mode: TlsMode,
    #[serde(rename = "requireCASigned")]
    pub require_ca_signed: bool,
    pub validate_hostname: bool,
    /// Whether extra trust roots for this route are in [`Credentials::ca_bundles`].
    pub ca_bundle: bool,
}

/// Connection reuse of a route.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Pool {
    pub max_connections: u32,
    pub max_messages_per_connection: u32,
    pub idle_timeout_ms: u64,
}

/// Time limits of a route, in milliseconds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RouteTimeouts {
    pub connect_ms: u64,
    pub command_ms: u64,
    pub data_end_ms: u64,
}

/// A tenant with everything resolved.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Tenant {
    /// The tenant's domains (each with its subdomains), sorted.
    pub domains: Vec<Domain>,
    /// Parent domains of `domains` up to the registrable domain: internal, without their other
    /// subdomains. Sorted.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub parent_domains: Vec<Domain>,
    /// Registered users, sorted, without duplicates.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub users: Vec<Address>,
    /// Groups, sorted by name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<Group>,
    pub licenses: u32,
    pub tier: Tier,
    /// Limits after defaults and overrides.
    pub limits: Limits,
    pub allowed_senders: AllowedSenders,
    /// Enabled client ranges, normalised and sorted.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ip_ranges: Vec<IpNet>,
    /// Whether SMTP AUTH is required; the accounts are in [`Credentials::tenants`].
    #[serde(rename = "requireSMTPAuth")]
    pub require_smtp_auth: bool,
    /// Service accounts whose tokens authenticate as the tenant (SPEC 11), as token subjects
    /// (`system:serviceaccount:NAMESPACE:NAME`), sorted.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub service_accounts: Vec<String>,
    #[serde(rename = "requireTLS")]
    pub require_tls: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outbound_route: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inbound_route: Option<String>,
    /// Rules in evaluation order (priority, then name).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<Rule>,
    /// DKIM signing keys (their private keys are in [`Credentials::dkim`]), in the policy's
    /// order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dkim: Vec<DkimSigning>,
}

/// A DKIM signing key of a tenant, without its private key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DkimSigning {
    pub domain: Domain,
    pub selector: String,
    pub algorithm: crate::resources::DkimAlgorithm,
    /// Header fields to sign, lowercased, From first, without duplicates.
    pub headers: Vec<String>,
    /// Relaxed (`true`) or simple header canonicalization, and the body's.
    pub relaxed_headers: bool,
    pub relaxed_body: bool,
}

impl DkimSigning {
    /// Where the public key is published, and the key of the private key in
    /// [`Credentials::dkim`]: `SELECTOR._domainkey.DOMAIN`.
    pub fn record_name(&self) -> String {
        format!("{}._domainkey.{}", self.selector, self.domain)
    }
}

/// A group of a tenant.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Group {
    pub name: String,
    pub address: Address,
    /// Members, sorted, without duplicates.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub members: Vec<Address>,
}

/// Sending limits in force for a tenant (SPEC section 3.4).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Limits {
    /// Messages per registered user per rolling 24 hours.
    pub per_user_messages_per_day: u64,
    /// Unique recipients per registered user per rolling 24 hours.
    pub per_user_unique_recipients_per_day: u64,
    /// Recipients per tenant per rolling 24 hours.
    pub per_customer_recipients_per_day: u64,
    /// Recipients per tenant per rolling 10 minutes.
    pub per_customer_recipients_per_10_minutes: u64,
    /// Refuse every sender of the tenant once a tenant limit is reached.
    pub block_all_senders_on_customer_limit: bool,
}

/// A routing rule, resolved.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Rule {
    pub name: String,
    pub priority: i32,
    /// Sorted, without duplicates.
    pub messages: Vec<MessageKind>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub senders: Vec<Matcher>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub recipients: Vec<Matcher>,
    /// Sorted, without duplicates; all three when the rule did not say.
    pub account_types: Vec<AccountType>,
    pub actions: Actions,
    pub stop_processing: bool,
    pub mode: RuleMode,
}

/// An address condition.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub enum Matcher {
    Address(Address),
    Pattern(Pattern),
    Domain(Domain),
    Group(String),
}

/// A regular expression over a whole normalised address (domain in lower case), compiled once
/// when the document is built or loaded.
#[derive(Clone, Debug)]
pub struct Pattern {
    source: String,
    regex: regex::Regex,
}

/// Upper bound on the compiled size of one pattern, so a pathological expression cannot eat
/// the relay's memory.
const PATTERN_SIZE_LIMIT: usize = 256 * 1024;

impl Pattern {
    /// Compiles `source`, anchored at both ends.
    pub fn new(source: &str) -> Result<Self, regex::Error> {
        let regex = regex::RegexBuilder::new(&format!("^(?:{source})$"))
            .size_limit(PATTERN_SIZE_LIMIT)
            .build()?;
        Ok(Self {
            source: source.to_owned(),
            regex,
        })
    }

    /// The expression as written.
    pub fn as_str(&self) -> &str {
        &self.source
    }

    /// Whether the whole of `address` matches.
    pub fn is_match(&self, address: &str) -> bool {
        self.regex.is_match(address)
    }
}

impl PartialEq for Pattern {
    fn eq(&self, other: &Self) -> bool {
        self.source == other.source
    }
}

impl Serialize for Pattern {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.source)
    }
}

impl<'de> Deserialize<'de> for Pattern {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = std::borrow::Cow::<str>::deserialize(deserializer)?;
        Pattern::new(&text).map_err(|e| serde::de::Error::custom(format!("pattern {text:?}: {e}")))
    }
}

/// What a rule does.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Actions {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub route: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub also_deliver_to: Vec<Copy>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rewrite_recipient_domain: Option<Domain>,
    #[serde(rename = "requireTLS")]
    pub require_tls: bool,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub add_headers: Vec<Header>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reject: Option<Reject>,
}

/// An extra copy.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Copy {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub route: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recipient: Option<Address>,
    pub suppress_bounces: bool,
}

/// A header to prepend.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Header {
    pub name: String,
    pub value: String,
}

/// A refusal reply.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Reject {
    pub code: u16,
    pub enhanced_code: String,
    pub text: String,
}

/// Secret material that goes to Secret `mailroute-relay-credentials`, never to the document.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Credentials {
    /// Upstream SMTP AUTH accounts by route name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub routes: BTreeMap<String, RouteCredentials>,
    /// Upstream OAuth 2.0 clients by route name (SPEC 11).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub oauth2: BTreeMap<String, OAuth2Client>,
    /// Extra PEM trust roots by route name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub ca_bundles: BTreeMap<String, String>,
    /// SMTP AUTH accounts by tenant, then username: a password or an `$argon2id$`/bcrypt hash.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub tenants: BTreeMap<String, BTreeMap<String, String>>,
    /// The key of the copies' loop marker MAC (SPEC 6.3), shared by every relay of the
    /// installation; `--loop-key-file` takes precedence.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loop_key: Option<String>,
    /// DKIM private keys (PEM) by [`DkimSigning::record_name`].
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub dkim: BTreeMap<String, String>,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // NB: never print secret values, even in debug output.
        f.debug_struct("Credentials")
            .field("routes", &self.routes.keys().collect::<Vec<_>>())
            .field("oauth2", &self.oauth2.keys().collect::<Vec<_>>())
            .field("ca_bundles", &self.ca_bundles.keys().collect::<Vec<_>>())
            .field(
                "tenants",
                &self
                    .tenants
                    .iter()
                    .map(|(t, users)| (t, users.len()))
                    .collect::<Vec<_>>(),
            )
            .field("loop_key", &self.loop_key.is_some())
            .field("dkim", &self.dkim.keys().collect::<Vec<_>>())
            .finish()
    }
}

/// An upstream account.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RouteCredentials {
    pub username: String,
    pub password: String,
}

impl fmt::Debug for RouteCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RouteCredentials")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// How a route gets its OAuth 2.0 access tokens (from `MailRoute.auth.oauth2` and its Secrets).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OAuth2Client {
    /// The token endpoint (`https://` only).
    #[serde(rename = "tokenURL")]
    pub token_url: String,
    /// The SASL identity: the mailbox the token is for.
    pub username: String,
    #[serde(rename = "clientID")]
    pub client_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_secret: Option<String>,
    /// With one, the refresh-token grant; without, client credentials.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refresh_token: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub scopes: Vec<String>,
    /// Extra PEM trust roots for the token endpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_bundle: Option<String>,
}

impl fmt::Debug for OAuth2Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // NB: the client secret and refresh token are credentials; the rest is configuration.
        f.debug_struct("OAuth2Client")
            .field("token_url", &self.token_url)
            .field("username", &self.username)
            .field("client_id", &self.client_id)
            .field(
                "client_secret",
                &self.client_secret.as_ref().map(|_| "<redacted>"),
            )
            .field(
                "refresh_token",
                &self.refresh_token.as_ref().map(|_| "<redacted>"),
            )
            .field("scopes", &self.scopes)
            .finish_non_exhaustive()
    }
}
