//! `RelayPolicy`: a tenant and its relay service.

use super::{Condition, KeyRef, SecretRef};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A tenant ("customer") of the relay: its domains, users and groups, who may relay for it,
/// which senders it may use, its sending quotas, and its default routes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[cfg_attr(
    feature = "kube",
    derive(kube::CustomResource),
    kube(
        group = "mailroute.io",
        version = "v1alpha1",
        kind = "RelayPolicy",
        namespaced,
        status = "RelayPolicyStatus",
        shortname = "mpolicy",
        category = "mailrouting",
        doc = "A tenant of the relay: its domains, users, who may relay, allowed senders, quotas and default routes.",
        printcolumn = r#"{"name":"Domains","type":"string","jsonPath":".spec.domains"}"#,
        printcolumn = r#"{"name":"Licenses","type":"integer","jsonPath":".spec.licenses"}"#,
        printcolumn = r#"{"name":"Tier","type":"string","jsonPath":".spec.tier"}"#,
        printcolumn = r#"{"name":"Users","type":"integer","jsonPath":".status.users"}"#,
        printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
        printcolumn = r#"{"name":"Reason","type":"string","priority":1,"jsonPath":".status.conditions[?(@.type==\"Ready\")].reason"}"#,
        printcolumn = r#"{"name":"Message","type":"string","priority":1,"jsonPath":".status.conditions[?(@.type==\"Ready\")].message"}"#,
        printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
    )
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RelayPolicySpec {
    /// The tenant's domains. A domain, its subdomains, and its parent domains up to the
    /// registrable domain count as internal.
    #[schemars(length(min = 1, max = 10000))]
    pub domains: Vec<String>,
    /// Registered user addresses.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub users: Vec<String>,
    /// More registered users, one address per line (blank lines and lines starting with `#` are
    /// ignored), from a ConfigMap or Secret key: for large directories.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub users_from: Option<UsersFrom>,
    /// The tenant's groups (distribution lists).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<GroupSpec>,
    /// Number of seats; the default sending limits are derived from it.
    #[schemars(range(min = 1))]
    pub licenses: u32,
    /// `Standard` (default) or `Trial` (low tenant limits: 100 recipients a day, 50 per 10
    /// minutes).
    #[serde(default)]
    pub tier: Tier,
    /// Which envelope senders the tenant may relay: `RegisteredUsers`, `OwnDomains` (default) or
    /// `Any` (other senders, and the null sender, are rewritten to `postmaster@` a tenant domain).
    #[serde(default)]
    pub allowed_senders: AllowedSenders,
    /// Who may relay outbound mail for the tenant. With both enabled IP ranges and
    /// `requireSMTPAuth`, a client must satisfy both.
    #[serde(default)]
    pub authentication: Authentication,
    /// Refuse mail from clients that did not negotiate TLS.
    #[serde(default, rename = "requireTLS")]
    pub require_tls: bool,
    /// Overrides of the default sending limits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<LimitOverrides>,
    /// Name of the MailRoute for outbound mail (an outbound gateway or smarthost). When absent,
    /// outbound mail is delivered directly by MX lookup of each recipient domain.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub outbound_route: Option<String>,
    /// Name of the MailRoute holding the tenant's mailboxes (the primary mail server), for
    /// inbound and internal mail.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub inbound_route: Option<String>,
    /// DKIM signing of the tenant's own mail (SPEC 12): a message from a client authorised
    /// for the tenant whose envelope sender or `From:` address is in a key's domain (or a
    /// subdomain of it) is signed with every key of that domain (several selectors during a
    /// key rotation), once, before any copy is made. Inbound mail is never signed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub dkim: Vec<DkimKey>,
}

/// One DKIM signing key of a tenant.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DkimKey {
    /// The signing domain (`d=`), one of the tenant's domains or a subdomain of one.
    #[schemars(length(min = 1, max = 253))]
    pub domain: String,
    /// The selector (`s=`): the public key is published as a TXT record at
    /// `SELECTOR._domainkey.DOMAIN` (the policy's status shows the record).
    #[schemars(length(min = 1, max = 63))]
    pub selector: String,
    /// The private key, PEM (PKCS#8; PKCS#1 `RSA PRIVATE KEY` also for RSA).
    pub private_key_secret_ref: KeyRef,
    /// `rsa-sha256` (default; a key of 2048 bits or more) or `ed25519-sha256` (RFC 8463).
    #[serde(default)]
    pub algorithm: DkimAlgorithm,
    /// Header fields signed, in order (`h=`). Default: From, To, Cc, Subject, Date,
    /// Message-ID, Reply-To, In-Reply-To, References, MIME-Version, Content-Type,
    /// Content-Transfer-Encoding. From is always signed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub headers: Vec<String>,
    /// `relaxed/relaxed` (default), `relaxed/simple`, `simple/relaxed` or `simple/simple`
    /// (header/body, RFC 6376 3.4).
    #[serde(default = "default_canonicalization")]
    pub canonicalization: String,
}

fn default_canonicalization() -> String {
    "relaxed/relaxed".to_owned()
}

/// Where and what to publish for one DKIM key.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DkimPublication {
    /// The key's domain.
    pub domain: String,
    /// The key's selector.
    pub selector: String,
    /// The record's DNS name, `SELECTOR._domainkey.DOMAIN`.
    pub name: String,
    /// The TXT record's value, e.g. `v=DKIM1; k=rsa; p=MIIBIjANBg...`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub record: Option<String>,
    /// Why no record can be shown (the private key could not be read).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// A DKIM signing algorithm.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum DkimAlgorithm {
    #[default]
    #[serde(rename = "rsa-sha256")]
    RsaSha256,
    #[serde(rename = "ed25519-sha256")]
    Ed25519Sha256,
}

/// Where more registered users come from; set exactly one of the two references.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "has(self.configMapRef) != has(self.secretRef)", "message": "set exactly one of configMapRef or secretRef"}
]))]
pub struct UsersFrom {
    /// A ConfigMap key holding one address per line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_map_ref: Option<KeyRef>,
    /// A Secret key holding one address per line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_ref: Option<KeyRef>,
}

/// A group (distribution list) of the tenant.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GroupSpec {
    /// The name rules use to refer to the group (`envelopeFilter: {group: NAME}`).
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// The group's own address.
    #[schemars(length(min = 3, max = 320))]
    pub address: String,
    /// Member addresses.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub members: Vec<String>,
}

/// Tenant tier.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, JsonSchema,
)]
pub enum Tier {
    /// Limits derived from licenses.
    #[default]
    Standard,
    /// Low tenant limits: 100 recipients per 24 hours, 50 per 10 minutes.
    Trial,
}

/// Which envelope senders a tenant may relay.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, JsonSchema,
)]
pub enum AllowedSenders {
    /// Only registered users.
    RegisteredUsers,
    /// Any address in the tenant's domains.
    #[default]
    OwnDomains,
    /// Any sender; senders outside the tenant's domains, and the null sender, are rewritten to
    /// `postmaster@` the tenant domain the client authenticated or identified with.
    Any,
}

/// Who may relay for the tenant.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "!self.requireSMTPAuth || has(self.credentialsSecretRef) || (has(self.serviceAccounts) && size(self.serviceAccounts) > 0)", "message": "requireSMTPAuth needs credentialsSecretRef or serviceAccounts", "fieldPath": ".credentialsSecretRef"}
]))]
pub struct Authentication {
    /// Client address ranges allowed to relay. A range may hold at most 65,536 addresses (IPv4
    /// /16, IPv6 /112). Disabled ranges are kept but ignored.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 10000))]
    pub ip_ranges: Vec<IpRange>,
    /// Require SMTP AUTH (over TLS) with a username and password from `credentialsSecretRef`.
    #[serde(default, rename = "requireSMTPAuth")]
    pub require_smtp_auth: bool,
    /// Secret with one key per username; each value is a password or an `$argon2id$` or bcrypt
    /// hash.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_secret_ref: Option<SecretRef>,
    /// Kubernetes service accounts whose projected tokens authenticate as the tenant (SMTP
    /// AUTH OAUTHBEARER or XOAUTH2, after TLS, audience `mailroute` unless the relay's
    /// `--token-audience` says otherwise). Each service account belongs to one RelayPolicy.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 1000))]
    pub service_accounts: Vec<ServiceAccountRef>,
}

/// A Kubernetes service account.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServiceAccountRef {
    /// Its namespace; default: the RelayPolicy's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63))]
    pub namespace: Option<String>,
    /// Its name.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

/// A client address range.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IpRange {
    /// IPv4 or IPv6 range in CIDR notation (`192.0.2.0/24`, `2001:db8::/112`), or a single
    /// address. Host bits must be zero.
    #[schemars(length(min = 2, max = 64))]
    pub cidr: String,
    /// What the range is (shown to operators only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// A disabled range is kept but ignored. Default true.
    #[serde(default = "default_true")]
    pub enabled: bool,
}

fn default_true() -> bool {
    true
}

/// Overrides of the default sending limits; unset fields keep their defaults.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LimitOverrides {
    /// Limits per registered user (the envelope sender).
    #[serde(default)]
    pub per_user: PerUserLimits,
    /// Limits for the whole tenant.
    #[serde(default)]
    pub per_customer: PerCustomerLimits,
    /// Once a tenant limit is reached, refuse every sender of the tenant (not only the one that
    /// reached it).
    #[serde(default)]
    pub block_all_senders_on_customer_limit: bool,
}

/// Per-user limit overrides.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PerUserLimits {
    /// Messages per registered user per rolling 24 hours. Default 10,000.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub messages_per_day: Option<u64>,
    /// Unique recipients per registered user per rolling 24 hours. Default 130 x licenses.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub unique_recipients_per_day: Option<u64>,
}

/// Tenant-wide limit overrides.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PerCustomerLimits {
    /// Recipients per tenant per rolling 24 hours. Default 130 x licenses, at most 4,600,000
    /// (Trial: 100).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub recipients_per_day: Option<u64>,
    /// Recipients per tenant per rolling 10 minutes. Default 9 x licenses, at most 319,444
    /// (Trial: 50).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub recipients_per_10_minutes: Option<u64>,
}

/// Observed state of a RelayPolicy.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RelayPolicyStatus {
    /// `Ready`: the policy is valid and part of the relay configuration; when false, the message
    /// names the offending field.
    #[serde(default)]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// Registered users (inline and from `usersFrom`), after removing duplicates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub users: Option<u64>,
    /// Groups.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub groups: Option<u64>,
    /// Enabled IP ranges.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enabled_ranges: Option<u64>,
    /// Client addresses the enabled IP ranges cover.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub addresses_covered: Option<u64>,
    /// The limits in force after defaults and overrides.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub effective_limits: Option<crate::document::Limits>,
    /// The DNS TXT record to publish for each DKIM key.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dkim: Vec<DkimPublication>,
    /// The `metadata.generation` last processed by the operator.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}
