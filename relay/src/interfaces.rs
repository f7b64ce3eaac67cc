//! What the parts of the relay hand each other, at the bottom of the module tree: the traits the
//! connection driver calls ([`Deliver`], [`Admit`], [`Authenticator`]) and the values that cross
//! them ([`Transaction`], [`RecipientQuery`], [`Admitted`], [`Refusal`]). Everything above
//! imports this module; it imports only the reply type and the routing decision it carries, so
//! no import cycle can form through it.

use crate::reply::Reply;
use crate::routing::RecipientRoute;
use std::net::IpAddr;
use std::sync::Arc;

pub use mailroute_store::BoxFuture;

/// Takes an accepted message somewhere and says what to tell the client.
pub trait Deliver: Send + Sync + 'static {
    /// The reply comes by `deadline` (the reply bound); work the delivery still has to do after
    /// it (a best-effort copy, a late upstream answer) may go on in the background.
    fn deliver(
        self: Arc<Self>,
        transaction: Transaction,
        deadline: std::time::Instant,
    ) -> BoxFuture<'static, Reply>;
    /// Periodic upkeep (closing idle upstream connections); called every few seconds.
    fn sweep(&self) {}
    /// Reads what is shared across replicas for the metrics (route rate limits' use); called
    /// every few seconds.
    fn observe(&self) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }
}

/// The RCPT decision (SPEC 5.3-5.4, 3.4, 6.4): whether a recipient is accepted, and where it
/// goes. What an admission reserves (quota holds) belongs to its transaction until the driver
/// says the transaction ended.
pub trait Admit: Send + Sync + 'static {
    fn admit<'a>(&'a self, query: &'a RecipientQuery) -> BoxFuture<'a, Result<Admitted, Refusal>>;
    /// The transaction ended: `accepted` when the client was told `250` for it; otherwise
    /// (refused, deferred, RSET, disconnect) what it reserved is released.
    fn end<'a>(&'a self, transaction: &'a str, accepted: bool) -> BoxFuture<'a, ()>;
}

/// Checks SMTP AUTH credentials.
pub trait Authenticator: Send + Sync + 'static {
    fn check<'a>(&'a self, username: &'a str, password: &'a str) -> BoxFuture<'a, AuthCheck>;
    /// Checks a bearer token (a service-account token, SPEC 11): `Ok` with the identity it
    /// proves. Refused unless the authenticator takes tokens.
    fn check_bearer<'a>(&'a self, _token: &'a str) -> BoxFuture<'a, Result<String, String>> {
        Box::pin(async { Err("bearer tokens are not accepted".to_owned()) })
    }
}

/// The answer of an [`Authenticator`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AuthCheck {
    Accepted,
    Refused,
    /// Every slot for password hashing is taken: ask the client to come back (`454 4.7.0`).
    Busy,
}

/// What the session knows about its client when it asks about a recipient.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionFacts {
    pub client: IpAddr,
    /// The EHLO/HELO name, as given.
    pub helo: Option<String>,
    /// The SMTP AUTH identity.
    pub authenticated: Option<String>,
    pub tls: bool,
}

/// A recipient that passed the session's protocol checks, for the RCPT decision.
#[derive(Clone, Debug)]
pub struct RecipientQuery {
    /// The transaction's id, as [`Transaction::id`] will be.
    pub transaction: Arc<str>,
    pub session: Arc<SessionFacts>,
    /// Envelope sender as the client gave it (empty: the null sender).
    pub sender: String,
    pub recipient: String,
    /// Recipients already accepted in this transaction.
    pub accepted: usize,
}

/// An accepted recipient: where it goes, decided once at RCPT and used by delivery.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Admitted {
    /// The tenant the session is bound to (SPEC 5.4), for the transaction's logs and metrics.
    pub tenant: Option<Arc<str>>,
    pub route: RecipientRoute,
    /// `allowedSenders: Any`: the envelope sender the message is relayed with.
    pub rewrite_sender: Option<String>,
    /// The session is authorised to send for `tenant` (its range, account, token or
    /// certificate), not merely named by its EHLO: only such mail is DKIM-signed.
    pub authorised: bool,
}

/// Why a recipient was refused, as `mailroute_relay_rcpt_refusals_total{reason}` counts it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RefusalReason {
    /// Relaying without authorisation (no open relay).
    RelayDenied,
    /// The tenant's `allowedSenders` refuses the envelope sender.
    Sender,
    /// The tenant requires TLS and the session has none.
    TlsRequired,
    /// A sending quota is reached.
    Quota,
    /// A routing rule's `reject`.
    Rule,
    /// The upstream refused it at RCPT time (recipient verification).
    Upstream,
    /// Not an address the relay can route.
    Syntax,
    /// A per-transaction limit (recipients per message, one recipient for the null sender).
    Limit,
    /// The shared store could not answer.
    Store,
    /// The recipient's primary route is at its rate limit (`MailRoute.rateLimits`).
    RateLimit,
}

impl RefusalReason {
    pub fn as_str(self) -> &'static str {
        match self {
            RefusalReason::RelayDenied => "relay_denied",
            RefusalReason::Sender => "sender",
            RefusalReason::TlsRequired => "tls_required",
            RefusalReason::Quota => "quota",
            RefusalReason::Rule => "rule",
            RefusalReason::Upstream => "upstream",
            RefusalReason::Syntax => "syntax",
            RefusalReason::Limit => "limit",
            RefusalReason::Store => "store",
            RefusalReason::RateLimit => "rate_limit",
        }
    }

    /// Whether the refusal is the client's error (counted towards the session's error limit,
    /// so a probe for open relaying is closed); quotas, a missing mailbox upstream or a store
    /// outage are not, so a client sending to many recipients is not cut off for them.
    pub fn is_client_error(self) -> bool {
        matches!(
            self,
            RefusalReason::RelayDenied
                | RefusalReason::Sender
                | RefusalReason::TlsRequired
                | RefusalReason::Syntax
        )
    }
}

/// A refused recipient: the reply for the client, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub reply: Reply,
    pub reason: RefusalReason,
    /// The tenant the session is bound to, for the metric's label.
    pub tenant: Option<Arc<str>>,
}

impl Refusal {
    pub fn new(reason: RefusalReason, reply: Reply) -> Self {
        Self {
            reply,
            reason,
            tenant: None,
        }
    }
}

/// One accepted recipient of a transaction.
#[derive(Clone, Debug)]
pub struct Recipient {
    /// As the client wrote it.
    pub address: String,
    /// Where it goes; `None` only where no admission ran (protocol tests with a stand-in
    /// delivery): the forwarder refuses such a recipient.
    pub route: Option<RecipientRoute>,
}

/// An accepted message, handed to delivery.
#[derive(Debug)]
pub struct Transaction {
    /// `<session id>.<n>`: names the transaction in logs and in the reply to the client.
    pub id: Arc<str>,
    /// Envelope sender for the upstreams (after an `allowedSenders: Any` rewrite); empty for
    /// the null sender.
    pub mail_from: String,
    /// The sender as the client gave it, when it was rewritten.
    pub original_sender: Option<String>,
    pub recipients: Vec<Recipient>,
    pub body_8bit: bool,
    pub smtputf8: bool,
    /// `SIZE=` as the client declared it (0: not declared).
    pub declared_size: usize,
    /// `Received:` header plus the message exactly as the client sent it.
    pub content: Vec<u8>,
    /// Length of the `Received:` header at the start of `content`.
    pub received_len: usize,
    /// The tenant the session is bound to (SPEC 5.4), if any.
    pub tenant: Option<Arc<str>>,
    /// The session is authorised to send for `tenant` ([`Admitted::authorised`]).
    pub authorised: bool,
    /// The part of the memory budget `content` holds, given back when the transaction is
    /// dropped (after its delivery).
    pub memory: Option<crate::budget::Held>,
}

impl Transaction {
    /// The recipients' addresses, as the client wrote them.
    pub fn addresses(&self) -> impl Iterator<Item = &str> {
        self.recipients.iter().map(|r| r.address.as_str())
    }
}
