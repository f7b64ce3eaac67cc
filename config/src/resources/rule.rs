//! `RoutingRule`: which messages go where.

use super::Condition;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A routing rule of a tenant: picks messages by direction, envelope sender and recipient and
/// account type, and changes their route, delivers extra copies, rewrites the recipient domain,
/// requires TLS, adds headers or refuses them.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[cfg_attr(
    feature = "kube",
    derive(kube::CustomResource),
    kube(
        group = "mailroute.io",
        version = "v1alpha1",
        kind = "RoutingRule",
        namespaced,
        status = "RoutingRuleStatus",
        shortname = "mrule",
        category = "mailrouting",
        doc = "A routing rule: which messages of a tenant go where, and what extra copies are delivered.",
        printcolumn = r#"{"name":"Policy","type":"string","jsonPath":".spec.policyRef"}"#,
        printcolumn = r#"{"name":"Priority","type":"integer","jsonPath":".spec.priority"}"#,
        printcolumn = r#"{"name":"Mode","type":"string","jsonPath":".spec.mode"}"#,
        printcolumn = r#"{"name":"Matches","type":"integer","jsonPath":".status.matches"}"#,
        printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
        printcolumn = r#"{"name":"Reason","type":"string","priority":1,"jsonPath":".status.conditions[?(@.type==\"Ready\")].reason"}"#,
        printcolumn = r#"{"name":"Message","type":"string","priority":1,"jsonPath":".status.conditions[?(@.type==\"Ready\")].message"}"#,
        printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
    )
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RoutingRuleSpec {
    /// Name of the RelayPolicy (tenant) this rule belongs to; the rule only sees that tenant's
    /// messages.
    #[schemars(length(min = 1, max = 253))]
    pub policy_ref: String,
    /// Evaluation order: lower first; ties are broken by name. Default 0.
    #[serde(default)]
    pub priority: i32,
    /// Which messages the rule applies to, classified per recipient: `Inbound` (external sender
    /// to our recipient), `InternalReceiving` (internal sender to our recipient), `Outbound` (our
    /// sender to an external recipient), `InternalSending` (our sender to an internal recipient).
    #[schemars(length(min = 1, max = 4))]
    pub messages: Vec<MessageKind>,
    /// Envelope sender and recipient conditions; all given lists must match.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub envelope_filter: Option<EnvelopeFilter>,
    /// For recipients in the tenant's domains: which account types the rule applies to (`Users`,
    /// `Groups`, `Unrecognized` = addresses of our domains that are neither, the catch-all of
    /// split delivery). Default: all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 3))]
    pub account_types: Option<Vec<AccountType>>,
    /// What happens to matching recipients.
    #[serde(default)]
    pub actions: RuleActions,
    /// When true, later rules are not evaluated for recipients this rule matched.
    #[serde(default)]
    pub stop_processing: bool,
    /// `Enforce` (default) applies the actions; `Audit` changes nothing but counts and logs what
    /// the rule would have done, to try a rule on live traffic before enforcing it.
    #[serde(default)]
    pub mode: RuleMode,
}

/// The direction of a message, per recipient.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, JsonSchema,
)]
pub enum MessageKind {
    /// External sender to a recipient in the tenant's domains.
    Inbound,
    /// Internal sender to a recipient in the tenant's domains.
    InternalReceiving,
    /// Sender in the tenant's domains to an external recipient.
    Outbound,
    /// Sender in the tenant's domains to an internal recipient.
    InternalSending,
}

/// Account types of a recipient in the tenant's domains.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, JsonSchema,
)]
pub enum AccountType {
    /// A registered user of the tenant.
    Users,
    /// The address of one of the tenant's groups.
    Groups,
    /// An address of the tenant's domains that is neither a user nor a group.
    Unrecognized,
}

/// Whether a rule acts or only reports.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, JsonSchema,
)]
pub enum RuleMode {
    /// Apply the actions.
    #[default]
    Enforce,
    /// Apply nothing; count and log what would have happened.
    Audit,
}

/// Envelope conditions of a rule.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EnvelopeFilter {
    /// The envelope sender (MAIL FROM) must match one of these, when given.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 1000))]
    pub senders: Vec<AddressMatcher>,
    /// The envelope recipient must match one of these, when given.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 1000))]
    pub recipients: Vec<AddressMatcher>,
}

/// One address condition; set exactly one field.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "[has(self.address), has(self.pattern), has(self.domain), has(self.group)].filter(x, x).size() == 1", "message": "set exactly one of address, pattern, domain or group"}
]))]
pub struct AddressMatcher {
    /// An exact address; the domain is compared case-insensitively, the local part exactly
    /// (RFC 5321).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 3, max = 320))]
    pub address: Option<String>,
    /// A regular expression matched against the whole address (it is anchored at both ends).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 1024))]
    pub pattern: Option<String>,
    /// A domain: matches addresses in it and in its subdomains.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub domain: Option<String>,
    /// The name of a group of the rule's RelayPolicy: matches the group's members.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub group: Option<String>,
}

/// What a rule does to matching recipients.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "!has(self.reject) || (!has(self.route) && (!has(self.alsoDeliverTo) || size(self.alsoDeliverTo) == 0) && !has(self.rewriteRecipientDomain))", "message": "reject cannot be combined with route, alsoDeliverTo or rewriteRecipientDomain"}
]))]
pub struct RuleActions {
    /// Name of a MailRoute that replaces the normal route for matching recipients ("change
    /// route").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub route: Option<String>,
    /// Extra copies of the message ("dual delivery").
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 100))]
    pub also_deliver_to: Vec<CopyTarget>,
    /// Deliver to the same local part at this domain instead (for example a migration alias
    /// domain such as `example.com.alias.example`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub rewrite_recipient_domain: Option<String>,
    /// Onward delivery for matching recipients must use TLS, whatever the route says.
    #[serde(default, rename = "requireTLS")]
    pub require_tls: bool,
    /// Headers to prepend to the message (names must start with `X-`; the body is never changed).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 50))]
    pub add_headers: Vec<HeaderSpec>,
    /// Refuse matching recipients at RCPT time with this reply.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reject: Option<RejectReply>,
}

/// An extra copy of a message; set `route`, `recipient`, or both.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "has(self.route) || has(self.recipient)", "message": "set route, recipient, or both"}
]))]
pub struct CopyTarget {
    /// Name of a MailRoute. Alone, the copy goes there with the original recipients; with
    /// `recipient`, the added recipient is delivered through it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub route: Option<String>,
    /// An extra envelope recipient for the copy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 3, max = 320))]
    pub recipient: Option<String>,
    /// Ask the destination not to send delivery status notifications for the copy
    /// (`NOTIFY=NEVER` where it supports DSN). Default true.
    #[serde(default = "default_true")]
    pub suppress_bounces: bool,
}

fn default_true() -> bool {
    true
}

/// A header to prepend.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HeaderSpec {
    /// Header name; must start with `X-`.
    #[schemars(length(min = 3, max = 76), regex(pattern = r"^[Xx]-[!-9;-~]+$"))]
    pub name: String,
    /// Header value, one line.
    #[schemars(length(max = 900))]
    pub value: String,
}

/// An SMTP reply.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "self.enhancedCode.startsWith(string(self.code / 100) + '.')", "message": "enhancedCode must have the same class as code (4.x.x with 4xx, 5.x.x with 5xx)"}
]))]
pub struct RejectReply {
    /// Reply code: 4xx (temporary) or 5xx (permanent), e.g. 550.
    #[schemars(range(min = 400, max = 599))]
    pub code: u16,
    /// Enhanced status code (RFC 3463), e.g. `5.7.1`.
    #[schemars(length(max = 11), regex(pattern = r"^[45]\.[0-9]{1,3}\.[0-9]{1,3}$"))]
    pub enhanced_code: String,
    /// Reply text, one line of printable ASCII.
    #[schemars(length(min = 1, max = 400), regex(pattern = r"^[ -~]+$"))]
    pub text: String,
}

/// Observed state of a RoutingRule.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RoutingRuleStatus {
    /// `Ready`: the rule is valid and part of the relay configuration; when false, the message
    /// names the offending field.
    #[serde(default)]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// Recipients this rule matched (enforced or audited), as last reported by the relays.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub matches: Option<u64>,
    /// The `metadata.generation` last processed by the operator.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}
