//! The ESMTP session as a sans-IO state machine: bytes in, [`Event`]s out.
//!
//! The driver (`crate::server`) owns the socket. It feeds whatever it read to
//! [`Session::receive`], writes the replies, and carries out the other events: a TLS handshake
//! ([`Event::StartTls`], answered by [`Session::tls_started`]), a credential check
//! ([`Event::Authenticate`], answered by [`Session::auth_result`]) and a delivery
//! ([`Event::Message`], answered by [`Session::delivered`]). While one of those is pending the
//! session consumes no input, so nothing a client pipelines can overtake it.

use super::command::{Framed, LineFramer, is_command, parse};
use super::data::{BdatChecker, DataReceiver, DataStatus};
use super::{received, sasl};
use crate::interfaces::{
    Admitted, Recipient, RecipientQuery, Refusal, RefusalReason, SessionFacts, Transaction,
};
use crate::reply::Reply;
use smtp_proto::{MAIL_BODY_8BITMIME, MAIL_SMTPUTF8, Request};
use std::borrow::Cow;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::SystemTime;

/// Which kind of listener a session arrived on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ListenerKind {
    /// Port 25 style: STARTTLS offered.
    Smtp,
    /// Port 587 style: STARTTLS offered, AUTH after TLS.
    Submission,
    /// Port 465 style: TLS from the first byte.
    Smtps,
}

impl ListenerKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ListenerKind::Smtp => "smtp",
            ListenerKind::Submission => "submission",
            ListenerKind::Smtps => "smtps",
        }
    }
}

/// Limits and identity shared by every session of a relay.
#[derive(Clone, Debug)]
pub struct SessionConfig {
    /// Name in the greeting and in `Received:`.
    pub hostname: String,
    /// Whether a certificate is loaded, so STARTTLS can be offered.
    pub tls_available: bool,
    /// Whether AUTH is offered (after TLS).
    pub auth_available: bool,
    /// Whether bearer tokens are checked (service accounts with `--jwks-file` or the cluster's
    /// keys): OAUTHBEARER and XOAUTH2 are offered beside PLAIN and LOGIN.
    pub bearer_available: bool,
    /// Largest message accepted, in octets (advertised as SIZE).
    pub max_message_size: usize,
    /// Recipients per transaction; more get `452 4.5.3`.
    pub max_recipients: usize,
    /// Refused commands per session before it is closed with `421 4.7.0`.
    pub max_errors: usize,
    /// Commands outside a transaction (NOOP, RSET, VRFY, HELP, EHLO...) before MAIL.
    pub max_idle_commands: usize,
    /// Commands of any kind between two accepted messages, beyond `max_recipients` RCPTs (a
    /// MAIL/RSET loop that never sends a message is closed with `421 4.7.0`).
    pub max_commands_per_message: usize,
    /// More `Received:` headers than this is a loop (`554 5.4.6`).
    pub max_received_headers: usize,
    /// The clock for `Received:` dates.
    pub now: fn() -> SystemTime,
    /// The memory budget for message content, shared by every session of the relay.
    pub budget: Arc<crate::budget::Budget>,
    /// Ask the driver about every recipient that passes the protocol's checks
    /// ([`Event::CheckRecipient`]: the RCPT decision of `crate::admission`). Off, every such
    /// recipient is accepted unrouted (protocol tests with a stand-in delivery).
    pub check_recipients: bool,
}

impl SessionConfig {
    pub fn new(hostname: impl Into<String>) -> Self {
        Self {
            hostname: hostname.into(),
            tls_available: false,
            auth_available: false,
            bearer_available: false,
            max_message_size: 35 * 1024 * 1024,
            max_recipients: 1000,
            max_errors: 10,
            max_idle_commands: 100,
            max_commands_per_message: 100,
            max_received_headers: 50,
            now: SystemTime::now,
            budget: crate::budget::Budget::unlimited(),
            check_recipients: false,
        }
    }
}

pub use super::received::TlsInfo;

/// What the driver must do.
#[derive(Debug)]
pub enum Event {
    Reply(Reply),
    /// Write the replies so far, then run the TLS handshake and call [`Session::tls_started`].
    StartTls,
    /// Check the credentials and call [`Session::auth_result`] with the identity they prove
    /// (the username for a password; the token's subject for a bearer token).
    Authenticate {
        username: String,
        secret: sasl::Secret,
    },
    /// Deliver, then call [`Session::delivered`] with the reply for the client.
    Message(Transaction),
    /// Decide on the recipient and call [`Session::recipient_checked`].
    CheckRecipient(RecipientQuery),
    /// The session itself refused a recipient (for `mailroute_relay_rcpt_refusals_total`).
    RecipientRefused(RefusalReason),
    /// Write the replies so far and close the connection.
    Close,
}

/// The outcome of a credential check.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AuthOutcome {
    Accepted,
    Refused,
    /// Too many failures from this client address: refused without checking.
    Throttled,
    /// No slot for password hashing free: come back later.
    Busy,
}

#[derive(Debug)]
enum Phase {
    Command,
    Data(DataReceiver),
    Bdat {
        remaining: usize,
        last: bool,
    },
    BdatDiscard {
        remaining: usize,
    },
    Sasl(sasl::Waiting),
    WaitingTls,
    /// `bearer`: the credentials were a bearer token (refused with an error challenge).
    WaitingAuth {
        bearer: bool,
    },
    WaitingRecipient {
        address: String,
    },
    WaitingDelivery,
    /// DATA was refused: the next line tells whether the client goes on with a command or
    /// sends its content anyway, which is then read to its end and never run as commands.
    AfterRefusedData,
    /// Content after a refused DATA, read to its `CRLF.CRLF` and thrown away.
    DiscardData(DataReceiver),
    Closed,
}

#[derive(Debug)]
struct Envelope {
    /// `<session id>.<n>`.
    id: Arc<str>,
    facts: Arc<SessionFacts>,
    mail_from: String,
    declared_size: usize,
    recipients: Vec<Recipient>,
    /// The tenant the admission bound the session to.
    tenant: Option<Arc<str>>,
    /// Whether the session is authorised to send for it.
    authorised: bool,
    /// `allowedSenders: Any`: the sender to relay with.
    rewrite_sender: Option<String>,
    body_8bit: bool,
    smtputf8: bool,
    used_bdat: bool,
    bdat: BdatChecker,
    bdat_oversize: bool,
    /// The `Received:` header, then the message as it arrives: the only copy of it.
    content: Vec<u8>,
    /// Length of the `Received:` header at the start of `content` (0 before content starts).
    received_len: usize,
    /// What `content` holds of the memory budget.
    memory: Option<crate::budget::Held>,
    /// The budget was spent while the content arrived: read on, keep nothing, answer 452.
    over_budget: bool,
}

impl Envelope {
    /// Holds budget for what `content` takes now; false (and the content dropped) once the
    /// budget is spent.
    fn within_budget(&mut self) -> bool {
        if self.over_budget {
            return false;
        }
        let held = self
            .memory
            .as_mut()
            .is_some_and(|m| m.grow_to(self.content.capacity()));
        if !held {
            self.over_budget = true;
            self.content = Vec::new();
        }
        held
    }
}

/// Room beyond a declared `SIZE=` for the `Received:` header and a final CRLF (twice this is
/// held at MAIL, so the content never needs more than was held).
const CONTENT_SLACK: usize = 4096;

/// One SMTP session.
#[derive(Debug)]
pub struct Session {
    config: Arc<SessionConfig>,
    id: String,
    peer: SocketAddr,
    listener: ListenerKind,
    phase: Phase,
    framer: LineFramer,
    helo: Option<String>,
    esmtp: bool,
    tls: Option<TlsInfo>,
    authenticated: Option<String>,
    envelope: Option<Envelope>,
    transactions: u64,
    errors: usize,
    idle_commands: usize,
    /// Commands since the last accepted message.
    commands: usize,
    /// Whole lines read (commands, AUTH responses, refused lines): progress for deadlines.
    lines: u64,
}

impl Session {
    /// A new session; `tls` is set for implicit-TLS listeners.
    pub fn new(
        config: Arc<SessionConfig>,
        id: impl Into<String>,
        peer: SocketAddr,
        listener: ListenerKind,
        tls: Option<TlsInfo>,
    ) -> Self {
        Self {
            config,
            id: id.into(),
            peer,
            listener,
            phase: Phase::Command,
            framer: LineFramer::default(),
            helo: None,
            esmtp: false,
            tls,
            authenticated: None,
            envelope: None,
            transactions: 0,
            errors: 0,
            idle_commands: 0,
            commands: 0,
            lines: 0,
        }
    }

    /// Whole lines read so far (a command's deadline starts again after each).
    pub fn lines(&self) -> u64 {
        self.lines
    }

    pub fn greeting(&self) -> Reply {
        Reply::greeting(&self.config.hostname)
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn is_closed(&self) -> bool {
        matches!(self.phase, Phase::Closed)
    }

    /// Whether a message is being received or delivered (graceful shutdown lets these finish).
    pub fn in_transaction(&self) -> bool {
        self.envelope.is_some()
            || matches!(
                self.phase,
                Phase::Data(_) | Phase::Bdat { .. } | Phase::WaitingDelivery
            )
    }

    /// Whether a message's content is being received (the DATA timeout applies).
    pub fn receiving_content(&self) -> bool {
        matches!(
            self.phase,
            Phase::Data(_) | Phase::Bdat { .. } | Phase::BdatDiscard { .. } | Phase::DiscardData(_)
        )
    }

    pub fn listener(&self) -> ListenerKind {
        self.listener
    }

    pub fn tls(&self) -> Option<&TlsInfo> {
        self.tls.as_ref()
    }

    pub fn authenticated(&self) -> Option<&str> {
        self.authenticated.as_deref()
    }

    pub fn helo(&self) -> Option<&str> {
        self.helo.as_deref()
    }

    fn close(&mut self, reply: Reply, events: &mut Vec<Event>) {
        events.push(Event::Reply(reply));
        events.push(Event::Close);
        self.phase = Phase::Closed;
        self.envelope = None;
    }

    /// Sends a refusal, closing the session when the client has made too many.
    fn refuse(&mut self, reply: Reply, events: &mut Vec<Event>) {
        self.errors += 1;
        events.push(Event::Reply(reply));
        if self.errors >= self.config.max_errors {
            self.close(Reply::too_many_errors(), events);
        }
    }

    /// Feeds input; returns how many bytes were consumed. Unconsumed bytes must be fed again
    /// once a pending event is answered. Input after a STARTTLS is consumed and discarded.
    pub fn receive(&mut self, input: &[u8], events: &mut Vec<Event>) -> usize {
        let mut pos = 0;
        while pos < input.len() {
            let rest = &input[pos..];
            match &mut self.phase {
                Phase::AfterRefusedData => match self.framer.next(rest) {
                    // A client that obeyed the refusal (RFC 5321 section 3.3: no content
                    // without 354) goes on with a command; content starts with a header line.
                    Framed::Line { line, .. } if is_command(line) => {
                        self.phase = Phase::Command;
                    }
                    Framed::NeedMore => break,
                    _ => {
                        // NB: not consumed: the line is the content's first.
                        self.envelope = None;
                        self.framer = LineFramer::default();
                        self.phase =
                            Phase::DiscardData(DataReceiver::new(self.config.max_message_size));
                    }
                },
                Phase::DiscardData(receiver) => {
                    let mut sink = Vec::new();
                    let (n, status) = receiver.feed(rest, &mut sink);
                    pos += n;
                    let oversize = receiver.is_oversize();
                    match status {
                        DataStatus::BareLineEnding => {
                            self.close(Reply::bare_line_ending(), events);
                            return input.len();
                        }
                        DataStatus::NeedMore if oversize => {
                            self.close(Reply::content_after_refused_data(), events);
                            return input.len();
                        }
                        DataStatus::NeedMore => {}
                        DataStatus::Complete => {
                            self.lines += 1;
                            self.phase = Phase::Command;
                            self.refuse(Reply::content_after_refused_data_discarded(), events);
                        }
                    }
                }
                Phase::Closed
                | Phase::WaitingTls
                | Phase::WaitingAuth { .. }
                | Phase::WaitingRecipient { .. }
                | Phase::WaitingDelivery => {
                    break;
                }
                Phase::Data(receiver) => {
                    let Some(envelope) = self.envelope.as_mut() else {
                        self.phase = Phase::Command;
                        continue;
                    };
                    let (n, status) = receiver.feed(rest, &mut envelope.content);
                    pos += n;
                    if !envelope.within_budget() {
                        receiver.discard();
                    }
                    match status {
                        DataStatus::NeedMore => {}
                        DataStatus::BareLineEnding => {
                            self.close(Reply::bare_line_ending(), events);
                            return input.len();
                        }
                        DataStatus::Complete => {
                            let oversize = receiver.is_oversize();
                            self.lines += 1;
                            self.phase = Phase::Command;
                            self.finish_message(oversize, events);
                        }
                    }
                }
                Phase::BdatDiscard { remaining } => {
                    let take = (*remaining).min(rest.len());
                    *remaining -= take;
                    pos += take;
                    if *remaining == 0 && !self.is_closed() {
                        self.lines += 1;
                        self.phase = Phase::Command;
                    }
                }
                Phase::Bdat { remaining, last } => {
                    let (remaining_now, last_now) = (*remaining, *last);
                    self.start_content();
                    self.phase = Phase::Bdat {
                        remaining: remaining_now,
                        last: last_now,
                    };
                    let Phase::Bdat { remaining, last } = &mut self.phase else {
                        continue;
                    };
                    let take = (*remaining).min(rest.len());
                    let chunk = &rest[..take];
                    *remaining -= take;
                    let (done, last) = (*remaining == 0, *last);
                    pos += take;
                    let Some(envelope) = self.envelope.as_mut() else {
                        self.phase = Phase::Command;
                        continue;
                    };
                    if !envelope.bdat.check(chunk) {
                        self.close(Reply::bare_line_ending(), events);
                        return input.len();
                    }
                    // NB: saturating: a refused message's content was dropped, header and all.
                    let size =
                        envelope.content.len().saturating_sub(envelope.received_len) + chunk.len();
                    if size > self.config.max_message_size {
                        envelope.bdat_oversize = true;
                        envelope.content = Vec::new();
                    } else if !envelope.bdat_oversize && !envelope.over_budget {
                        envelope.content.extend_from_slice(chunk);
                        envelope.within_budget();
                    }
                    if done {
                        self.lines += 1;
                        self.phase = Phase::Command;
                        if last {
                            if !envelope.bdat.finish() {
                                self.close(Reply::bare_line_ending(), events);
                                return input.len();
                            }
                            let oversize = envelope.bdat_oversize;
                            self.finish_message(oversize, events);
                        } else if envelope.bdat_oversize {
                            // RFC 3030: the transaction is over once a chunk is refused.
                            self.envelope = None;
                            self.refuse(Reply::message_too_big(), events);
                        } else {
                            events.push(Event::Reply(Reply::new(250, "2.0.0", "Chunk received")));
                        }
                    }
                }
                _ => match self
                    .framer
                    .next_line(rest, matches!(self.phase, Phase::Sasl(_)))
                {
                    Framed::NeedMore => break,
                    Framed::Skipped { consumed } => pos += consumed,
                    Framed::Refused { reply, consumed } => {
                        pos += consumed;
                        self.lines += 1;
                        self.refuse(reply, events);
                    }
                    Framed::Line { line, consumed } => {
                        pos += consumed;
                        self.lines += 1;
                        let pipelined = pos < input.len();
                        let line = line.to_vec();
                        if self.line(&line, pipelined, events) {
                            // STARTTLS: whatever was pipelined after it is discarded.
                            return input.len();
                        }
                    }
                },
            }
        }
        pos
    }

    /// Handles one command or AUTH line; true when the rest of the input must be discarded.
    fn line(&mut self, line: &[u8], pipelined: bool, events: &mut Vec<Event>) -> bool {
        match std::mem::replace(&mut self.phase, Phase::Command) {
            Phase::Sasl(waiting) => {
                self.sasl_step(sasl::respond(waiting, line), events);
                return false;
            }
            other => self.phase = other,
        }
        let request = match parse(line) {
            Ok(request) => request,
            Err(refusal) if refusal.close => {
                self.close(refusal.reply, events);
                return false;
            }
            Err(refusal) => {
                // A recipient the parser refuses is a refused recipient too (counted as syntax,
                // like the session's other address checks).
                if self.envelope.is_some()
                    && line
                        .get(..4)
                        .is_some_and(|v| v.eq_ignore_ascii_case(b"RCPT"))
                {
                    events.push(Event::RecipientRefused(RefusalReason::Syntax));
                }
                self.refuse(refusal.reply, events);
                return false;
            }
        };
        if !matches!(
            request,
            Request::Mail { .. }
                | Request::Rcpt { .. }
                | Request::Data
                | Request::Bdat { .. }
                | Request::Quit
        ) && self.envelope.is_none()
        {
            self.idle_commands += 1;
            if self.idle_commands > self.config.max_idle_commands {
                self.close(Reply::too_many_errors(), events);
                return false;
            }
        }
        // NB: every command counts here, RSET and MAIL included: only an accepted message
        // gives the client a fresh allowance. BDAT chunks are content (bounded by the size).
        if !matches!(request, Request::Bdat { .. }) {
            self.commands += 1;
        }
        if self.commands > self.config.max_commands_per_message + self.config.max_recipients {
            self.close(Reply::too_many_commands(), events);
            return false;
        }
        match request {
            Request::Ehlo { .. } | Request::Helo { .. } if pipelined => {
                self.close(Reply::pipelining_violation(), events);
            }
            Request::Ehlo { host } => {
                self.helo = Some(host.into_owned());
                self.esmtp = true;
                self.envelope = None;
                events.push(Event::Reply(self.ehlo_reply()));
            }
            Request::Helo { host } => {
                self.helo = Some(host.into_owned());
                self.esmtp = false;
                self.envelope = None;
                let client = self.peer.ip().to_string();
                events.push(Event::Reply(Reply::helo(&self.config.hostname, &client)));
            }
            Request::StartTls => {
                if self.tls.is_some() {
                    self.refuse(Reply::tls_already_active(), events);
                } else if !self.config.tls_available {
                    self.refuse(Reply::tls_not_available(), events);
                } else {
                    events.push(Event::Reply(Reply::ready_for_tls()));
                    events.push(Event::StartTls);
                    self.phase = Phase::WaitingTls;
                    return true;
                }
            }
            Request::Auth {
                mechanism,
                initial_response,
            } => {
                self.auth(mechanism, &initial_response, events);
            }
            Request::Mail { from } => {
                if self.helo.is_none() {
                    self.refuse(Reply::bad_sequence("send EHLO or HELO first"), events);
                } else if self.envelope.is_some() {
                    self.refuse(Reply::bad_sequence("nested MAIL command"), events);
                } else if from.size > self.config.max_message_size {
                    self.refuse(Reply::message_too_big(), events);
                } else if !from.address.is_ascii() && from.flags & MAIL_SMTPUTF8 == 0 {
                    self.refuse(Reply::non_ascii_address(), events);
                } else if (from.flags & MAIL_SMTPUTF8 != 0 || from.flags & MAIL_BODY_8BITMIME != 0)
                    && !self.esmtp
                {
                    self.refuse(
                        Reply::unsupported_parameter("(extensions need EHLO)"),
                        events,
                    );
                } else if let Some(memory) = self.config.budget.hold(
                    from.size
                        .saturating_add(2 * CONTENT_SLACK * usize::from(from.size > 0)),
                ) {
                    // NB: a declared SIZE= is held at once; content without one as it arrives.
                    self.transactions += 1;
                    self.envelope = Some(Envelope {
                        id: Arc::from(format!("{}.{}", self.id, self.transactions)),
                        facts: Arc::new(SessionFacts {
                            client: self.peer.ip(),
                            helo: self.helo.clone(),
                            authenticated: self.authenticated.clone(),
                            tls: self.tls.is_some(),
                        }),
                        mail_from: from.address.into_owned(),
                        declared_size: from.size,
                        recipients: Vec::new(),
                        tenant: None,
                        authorised: false,
                        rewrite_sender: None,
                        body_8bit: from.flags & MAIL_BODY_8BITMIME != 0,
                        smtputf8: from.flags & MAIL_SMTPUTF8 != 0,
                        used_bdat: false,
                        bdat: BdatChecker::default(),
                        bdat_oversize: false,
                        content: Vec::new(),
                        received_len: 0,
                        memory: Some(memory),
                        over_budget: false,
                    });
                    events.push(Event::Reply(Reply::sender_ok()));
                } else {
                    // NB: not the client's error: it may try again later.
                    events.push(Event::Reply(Reply::insufficient_storage()));
                }
            }
            Request::Rcpt { to } => {
                let max = self.config.max_recipients;
                let check = self.config.check_recipients;
                match self.envelope.as_mut() {
                    None => self.refuse(Reply::bad_sequence("send MAIL first"), events),
                    Some(_) if to.address.is_empty() => {
                        events.push(Event::RecipientRefused(RefusalReason::Syntax));
                        self.refuse(Reply::bad_recipient_address(), events);
                    }
                    Some(e) if !to.address.is_ascii() && !e.smtputf8 => {
                        events.push(Event::RecipientRefused(RefusalReason::Syntax));
                        self.refuse(Reply::non_ascii_address(), events);
                    }
                    // NB: limits are not the client's errors (RFC 5321 section 4.5.3.1.10: 452,
                    // and the accepted recipients are delivered).
                    Some(e) if e.mail_from.is_empty() && !e.recipients.is_empty() => {
                        events.push(Event::RecipientRefused(RefusalReason::Limit));
                        events.push(Event::Reply(Reply::null_sender_one_recipient()));
                    }
                    Some(e) if e.recipients.len() >= max => {
                        events.push(Event::RecipientRefused(RefusalReason::Limit));
                        events.push(Event::Reply(Reply::too_many_recipients()));
                    }
                    Some(e) if check => {
                        let query = RecipientQuery {
                            transaction: Arc::clone(&e.id),
                            session: Arc::clone(&e.facts),
                            sender: e.mail_from.clone(),
                            recipient: to.address.clone().into_owned(),
                            accepted: e.recipients.len(),
                        };
                        self.phase = Phase::WaitingRecipient {
                            address: to.address.into_owned(),
                        };
                        events.push(Event::CheckRecipient(query));
                    }
                    Some(e) => {
                        e.recipients.push(Recipient {
                            address: to.address.into_owned(),
                            route: None,
                        });
                        events.push(Event::Reply(Reply::recipient_ok()));
                    }
                }
            }
            Request::Data => {
                // NB: DATA must end a pipelined group (RFC 2920); bytes after it would be
                // content sent before 354, or commands smuggled after a refused DATA.
                if pipelined {
                    self.close(Reply::pipelining_violation(), events);
                    return false;
                }
                let refusal = match self.envelope.as_ref() {
                    None => Some(Reply::bad_sequence("send MAIL first")),
                    Some(e) if e.recipients.is_empty() => {
                        Some(Reply::new(554, "5.5.1", "No valid recipients"))
                    }
                    Some(e) if e.used_bdat => Some(Reply::bad_sequence("DATA after BDAT")),
                    Some(_) => None,
                };
                match refusal {
                    Some(reply) => {
                        self.refuse(reply, events);
                        if !self.is_closed() {
                            self.phase = Phase::AfterRefusedData;
                        }
                    }
                    None => {
                        self.start_content();
                        self.phase = Phase::Data(DataReceiver::new(self.config.max_message_size));
                        events.push(Event::Reply(Reply::start_data()));
                    }
                }
            }
            Request::Bdat {
                chunk_size,
                is_last,
            } => {
                let ready = match self.envelope.as_mut() {
                    Some(e) if !e.recipients.is_empty() => {
                        e.used_bdat = true;
                        true
                    }
                    _ => false,
                };
                if !ready {
                    // The chunk is still read to its end: its bytes must never run as commands.
                    self.phase = Phase::BdatDiscard {
                        remaining: chunk_size,
                    };
                    self.refuse(
                        Reply::bad_sequence("send MAIL and RCPT before BDAT"),
                        events,
                    );
                } else if chunk_size == 0 {
                    self.receive_empty_chunk(is_last, events);
                } else {
                    self.phase = Phase::Bdat {
                        remaining: chunk_size,
                        last: is_last,
                    };
                }
            }
            Request::Rset => {
                self.envelope = None;
                events.push(Event::Reply(Reply::reset()));
            }
            Request::Noop { .. } => events.push(Event::Reply(Reply::ok())),
            Request::Vrfy { .. } | Request::Expn { .. } => {
                events.push(Event::Reply(Reply::cannot_verify()));
            }
            Request::Help { .. } => events.push(Event::Reply(Reply::help())),
            Request::Quit => {
                let reply = Reply::closing(&self.config.hostname);
                self.close(reply, events);
            }
            Request::Lhlo { .. }
            | Request::Etrn { .. }
            | Request::Atrn { .. }
            | Request::Burl { .. } => {
                self.refuse(Reply::not_implemented(), events);
            }
        }
        false
    }

    fn receive_empty_chunk(&mut self, is_last: bool, events: &mut Vec<Event>) {
        self.phase = Phase::Command;
        if is_last {
            let finished = self.envelope.as_ref().is_some_and(|e| e.bdat.finish());
            if !finished {
                self.close(Reply::bare_line_ending(), events);
                return;
            }
            let oversize = self.envelope.as_ref().is_some_and(|e| e.bdat_oversize);
            self.finish_message(oversize, events);
        } else {
            events.push(Event::Reply(Reply::new(250, "2.0.0", "Chunk received")));
        }
    }

    fn ehlo_reply(&self) -> Reply {
        let mut lines: Vec<Cow<'static, str>> = vec![
            format!("{} greets {}", self.config.hostname, self.peer.ip()).into(),
            "PIPELINING".into(),
            format!("SIZE {}", self.config.max_message_size).into(),
            "8BITMIME".into(),
            "SMTPUTF8".into(),
            "ENHANCEDSTATUSCODES".into(),
            "CHUNKING".into(),
        ];
        if self.tls.is_none() && self.config.tls_available {
            lines.push("STARTTLS".into());
        }
        if self.tls.is_some() && self.config.auth_available && self.authenticated.is_none() {
            lines.push(if self.config.bearer_available {
                "AUTH PLAIN LOGIN OAUTHBEARER XOAUTH2".into()
            } else {
                "AUTH PLAIN LOGIN".into()
            });
        }
        Reply::multiline(250, lines)
    }

    fn auth(&mut self, mechanism: u64, initial: &str, events: &mut Vec<Event>) {
        if self.tls.is_none() {
            // NB: checked before anything else, so no credential is ever read in clear.
            self.refuse(Reply::auth_needs_tls(), events);
        } else if !self.config.auth_available {
            self.refuse(Reply::not_implemented(), events);
        } else if self.authenticated.is_some() {
            self.refuse(Reply::already_authenticated(), events);
        } else if self.envelope.is_some() {
            self.refuse(
                Reply::bad_sequence("AUTH during a mail transaction"),
                events,
            );
        } else if !self.config.bearer_available
            && (mechanism == smtp_proto::AUTH_OAUTHBEARER || mechanism == smtp_proto::AUTH_XOAUTH2)
        {
            self.refuse(Reply::auth_mechanism_unsupported(), events);
        } else {
            self.sasl_step(sasl::start(mechanism, initial), events);
        }
    }

    fn sasl_step(&mut self, step: sasl::Step, events: &mut Vec<Event>) {
        match step {
            sasl::Step::Challenge(reply, waiting) => {
                self.phase = Phase::Sasl(waiting);
                events.push(Event::Reply(reply));
            }
            sasl::Step::Credentials { username, secret } => {
                self.phase = Phase::WaitingAuth {
                    bearer: matches!(secret, sasl::Secret::Bearer(_)),
                };
                events.push(Event::Authenticate { username, secret });
            }
            sasl::Step::Refused(reply) => self.refuse(reply, events),
        }
    }

    /// Answers a pending [`Event::Authenticate`]; `identity` is what the credentials proved.
    pub fn auth_result(&mut self, identity: &str, outcome: AuthOutcome, events: &mut Vec<Event>) {
        let Phase::WaitingAuth { bearer } = self.phase else {
            return;
        };
        self.phase = Phase::Command;
        match outcome {
            AuthOutcome::Accepted => {
                self.authenticated = Some(identity.to_owned());
                events.push(Event::Reply(Reply::auth_succeeded()));
            }
            // NB: a refused token is told so in a challenge first (RFC 7628 3.2.2); the
            // client's answer to it ends the exchange with the same 535.
            AuthOutcome::Refused if bearer => self.sasl_step(sasl::bearer_refused(), events),
            AuthOutcome::Refused => self.refuse(Reply::auth_failed(), events),
            AuthOutcome::Throttled => self.close(Reply::auth_too_many_failures(), events),
            AuthOutcome::Busy => events.push(Event::Reply(Reply::auth_busy())),
        }
    }

    /// Puts a new configuration in force (a reload). Only between transactions: the driver
    /// never calls it while [`Session::in_transaction`].
    pub fn reconfigure(&mut self, config: Arc<SessionConfig>) {
        if !self.in_transaction() {
            self.config = config;
        }
    }

    /// Answers a pending [`Event::CheckRecipient`]: `Ok` adds the recipient with its route.
    /// A refusal counts towards the session's error limit only when it is the client's error
    /// (relaying without authorisation, a refused sender), not a quota or a missing mailbox.
    pub fn recipient_checked(
        &mut self,
        verdict: Result<Admitted, Refusal>,
        events: &mut Vec<Event>,
    ) {
        let Phase::WaitingRecipient { address } =
            std::mem::replace(&mut self.phase, Phase::Command)
        else {
            return;
        };
        match (verdict, self.envelope.as_mut()) {
            (Ok(admitted), Some(e)) => {
                if e.tenant.is_none() {
                    e.tenant = admitted.tenant;
                    e.authorised = admitted.authorised;
                }
                if e.rewrite_sender.is_none() {
                    e.rewrite_sender = admitted.rewrite_sender;
                }
                e.recipients.push(Recipient {
                    address,
                    route: Some(admitted.route),
                });
                events.push(Event::Reply(Reply::recipient_ok()));
            }
            (Ok(_), None) => self.refuse(Reply::bad_sequence("send MAIL first"), events),
            (Err(refusal), _) if refusal.reason.is_client_error() => {
                self.refuse(refusal.reply, events);
            }
            (Err(refusal), _) => events.push(Event::Reply(refusal.reply)),
        }
    }

    /// Answers a pending [`Event::StartTls`]: the session starts over, as RFC 3207 requires.
    pub fn tls_started(&mut self, info: TlsInfo) {
        if matches!(self.phase, Phase::WaitingTls) {
            self.tls = Some(info);
            self.helo = None;
            self.esmtp = false;
            self.envelope = None;
            self.authenticated = None;
            self.framer = LineFramer::default();
            self.phase = Phase::Command;
        }
    }

    /// Answers a pending [`Event::Message`] with the reply for the client.
    pub fn delivered(&mut self, reply: Reply, events: &mut Vec<Event>) {
        if matches!(self.phase, Phase::WaitingDelivery) {
            // The reply to the content: the next command's deadline starts now.
            self.lines += 1;
            self.phase = Phase::Command;
            if reply.is_positive() {
                self.commands = 0;
                events.push(Event::Reply(reply));
            } else {
                self.refuse(reply, events);
            }
        }
    }

    fn finish_message(&mut self, oversize: bool, events: &mut Vec<Event>) {
        let Some(envelope) = self.envelope.take() else {
            return;
        };
        if oversize {
            self.refuse(Reply::message_too_big(), events);
            return;
        }
        if envelope.over_budget {
            // NB: not the client's error: the relay is busy, the client retries later.
            events.push(Event::Reply(Reply::insufficient_storage()));
            return;
        }
        let mut envelope = envelope;
        if envelope.received_len == 0 {
            // An empty BDAT LAST as the only chunk: no content arrived to put it before.
            envelope.content = self.received_header(&envelope);
            envelope.received_len = envelope.content.len();
        }
        let envelope = envelope;
        let message = envelope
            .content
            .get(envelope.received_len..)
            .unwrap_or_default();
        if count_received(message) >= self.config.max_received_headers {
            self.refuse(Reply::mail_loop(), events);
            return;
        }
        self.phase = Phase::WaitingDelivery;
        let (mail_from, original_sender) = match envelope.rewrite_sender {
            Some(rewritten) => (rewritten, Some(envelope.mail_from)),
            None => (envelope.mail_from, None),
        };
        events.push(Event::Message(Transaction {
            id: envelope.id,
            mail_from,
            original_sender,
            recipients: envelope.recipients,
            body_8bit: envelope.body_8bit,
            smtputf8: envelope.smtputf8,
            declared_size: envelope.declared_size,
            received_len: envelope.received_len,
            content: envelope.content,
            tenant: envelope.tenant,
            authorised: envelope.authorised,
            memory: envelope.memory,
        }));
    }

    /// Writes the `Received:` header into the envelope's content, once, as content starts.
    fn start_content(&mut self) {
        let Some(e) = self.envelope.as_ref() else {
            return;
        };
        if e.received_len > 0 {
            return;
        }
        let mut content = self.received_header(e);
        if e.declared_size > 0 {
            // NB: exactly what was declared (and held at MAIL): no doubling past it.
            content
                .reserve_exact(e.declared_size.min(self.config.max_message_size) + CONTENT_SLACK);
        }
        if let Some(e) = self.envelope.as_mut() {
            e.received_len = content.len();
            e.content = content;
        }
    }

    /// The one `Received:` header, written before the content as it starts to arrive (so the
    /// message is never copied to put it in front).
    fn received_header(&self, envelope: &Envelope) -> Vec<u8> {
        received::header(&received::Facts {
            helo: self.helo.as_deref(),
            client: self.peer.ip(),
            hostname: &self.config.hostname,
            esmtp: self.esmtp,
            tls: self.tls.as_ref(),
            authenticated: self.authenticated.is_some(),
            id: &envelope.id,
            recipients: &envelope.recipients,
            now: (self.config.now)(),
        })
        .into_bytes()
    }
}

/// `Received:` headers in the header section (up to the first empty line).
fn count_received(message: &[u8]) -> usize {
    let mut count = 0;
    for line in message.split(|b| *b == b'\n') {
        if line == b"\r" || line.is_empty() {
            break;
        }
        if line.len() >= 9 && line[..9].eq_ignore_ascii_case(b"received:") {
            count += 1;
        }
    }
    count
}
