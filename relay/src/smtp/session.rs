//! The ESMTP session as a sans-IO state machine: bytes in, [`Event`]s out.
//!
//! The driver (`crate::server`) owns the socket. It feeds whatever it read to
//! [`Session::receive`], writes the replies, and carries out the other events: a TLS handshake
//! ([`Event::StartTls`], answered by [`Session::tls_started`]), a credential check
//! ([`Event::Authenticate`], answered by [`Session::auth_result`]) and a delivery
//! ([`Event::Message`], answered by [`Session::delivered`]). While one of those is pending the
//! session consumes no input, so nothing a client pipelines can overtake it.

use super::command::{Framed, LineFramer, parse};
use super::data::{BdatChecker, DataReceiver, DataStatus};
use super::reply::Reply;
use base64::Engine;
use smtp_proto::{AUTH_LOGIN, AUTH_PLAIN, MAIL_BODY_8BITMIME, MAIL_SMTPUTF8, Request};
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
    /// Largest message accepted, in octets (advertised as SIZE).
    pub max_message_size: usize,
    /// Recipients per transaction; more get `452 4.5.3`.
    pub max_recipients: usize,
    /// Refused commands per session before it is closed with `421 4.7.0`.
    pub max_errors: usize,
    /// Commands outside a transaction (NOOP, RSET, VRFY, HELP, EHLO...) before MAIL.
    pub max_idle_commands: usize,
    /// More `Received:` headers than this is a loop (`554 5.4.6`).
    pub max_received_headers: usize,
    /// The clock for `Received:` dates.
    pub now: fn() -> SystemTime,
    /// Tenants and the no-open-relay rule; `None` accepts every recipient (protocol tests).
    pub directory: Option<Arc<crate::policy::tenants::Directory>>,
    /// Routing rules, for refusals at RCPT time (`actions.reject`).
    pub router: Option<Arc<crate::routing::Router>>,
    /// Ask the driver about every recipient that passed the checks above
    /// ([`Event::CheckRecipient`]): quotas, recipient verification with the upstream.
    pub check_recipients: bool,
}

impl SessionConfig {
    pub fn new(hostname: impl Into<String>) -> Self {
        Self {
            hostname: hostname.into(),
            tls_available: false,
            auth_available: false,
            max_message_size: 35 * 1024 * 1024,
            max_recipients: 1000,
            max_errors: 10,
            max_idle_commands: 100,
            max_received_headers: 50,
            now: SystemTime::now,
            directory: None,
            router: None,
            check_recipients: false,
        }
    }
}

/// The negotiated TLS parameters, for `Received:` and logs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsInfo {
    pub version: String,
    pub cipher: String,
}

/// An accepted message, handed to delivery.
#[derive(Debug)]
pub struct Transaction {
    /// `<session id>.<n>`: names the transaction in logs and in the reply to the client.
    pub id: String,
    /// Envelope sender; empty for the null sender.
    pub mail_from: String,
    pub recipients: Vec<String>,
    pub body_8bit: bool,
    pub smtputf8: bool,
    /// `Received:` header plus the message exactly as the client sent it.
    pub content: Vec<u8>,
    /// Length of the `Received:` header at the start of `content`.
    pub received_len: usize,
    /// The tenant the session is bound to (SPEC 5.4), if any.
    pub tenant: Option<Arc<str>>,
}

/// A recipient the session would accept, for the checks that need I/O (SPEC 3.4, 6.4).
#[derive(Clone, Debug)]
pub struct RecipientQuery {
    /// The transaction's id, as [`Transaction::id`] will be.
    pub transaction: String,
    /// The tenant the session is bound to, if any.
    pub tenant: Option<Arc<str>>,
    /// Envelope sender as the client gave it (empty: the null sender).
    pub sender: String,
    pub recipient: String,
    /// Recipients already accepted in this transaction.
    pub accepted: usize,
}

/// What the driver must do.
#[derive(Debug)]
pub enum Event {
    Reply(Reply),
    /// Write the replies so far, then run the TLS handshake and call [`Session::tls_started`].
    StartTls,
    /// Check the credentials and call [`Session::auth_result`].
    Authenticate {
        username: String,
        password: String,
    },
    /// Deliver, then call [`Session::delivered`] with the reply for the client.
    Message(Transaction),
    /// Check the recipient and call [`Session::recipient_checked`].
    CheckRecipient(RecipientQuery),
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
}

#[derive(Debug)]
enum Phase {
    Command,
    Data(DataReceiver),
    Bdat { remaining: usize, last: bool },
    BdatDiscard { remaining: usize },
    AuthPlain,
    AuthLoginUser,
    AuthLoginPassword { username: String },
    WaitingTls,
    WaitingAuth,
    WaitingRecipient { address: String },
    WaitingDelivery,
    Closed,
}

#[derive(Debug, Default)]
struct Envelope {
    mail_from: String,
    recipients: Vec<String>,
    body_8bit: bool,
    smtputf8: bool,
    used_bdat: bool,
    bdat: BdatChecker,
    bdat_oversize: bool,
    content: Vec<u8>,
}

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
        }
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
            Phase::Data(_) | Phase::Bdat { .. } | Phase::BdatDiscard { .. }
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
                Phase::Closed
                | Phase::WaitingTls
                | Phase::WaitingAuth
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
                    match status {
                        DataStatus::NeedMore => {}
                        DataStatus::BareLineEnding => {
                            self.close(Reply::bare_line_ending(), events);
                            return input.len();
                        }
                        DataStatus::Complete => {
                            let oversize = receiver.is_oversize();
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
                        self.phase = Phase::Command;
                    }
                }
                Phase::Bdat { remaining, last } => {
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
                    if envelope.content.len() + chunk.len() > self.config.max_message_size {
                        envelope.bdat_oversize = true;
                        envelope.content = Vec::new();
                    } else if !envelope.bdat_oversize {
                        envelope.content.extend_from_slice(chunk);
                    }
                    if done {
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
                _ => match self.framer.next(rest) {
                    Framed::NeedMore => break,
                    Framed::Skipped { consumed } => pos += consumed,
                    Framed::Refused { reply, consumed } => {
                        pos += consumed;
                        self.refuse(reply, events);
                    }
                    Framed::Line { line, consumed } => {
                        pos += consumed;
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
            Phase::AuthPlain => {
                self.auth_plain_response(trim_crlf(line), events);
                return false;
            }
            Phase::AuthLoginUser => {
                if is_cancel(line) {
                    self.refuse(Reply::auth_cancelled(), events);
                    return false;
                }
                match decode(trim_crlf(line)) {
                    Some(username) => {
                        self.phase = Phase::AuthLoginPassword { username };
                        events.push(Event::Reply(Reply::auth_challenge("UGFzc3dvcmQ6")));
                    }
                    None => self.refuse(Reply::new(501, "5.5.2", "Invalid base64"), events),
                }
                return false;
            }
            Phase::AuthLoginPassword { username } => {
                if is_cancel(line) {
                    self.refuse(Reply::auth_cancelled(), events);
                    return false;
                }
                match decode(trim_crlf(line)) {
                    Some(password) => {
                        self.phase = Phase::WaitingAuth;
                        events.push(Event::Authenticate { username, password });
                    }
                    None => self.refuse(Reply::new(501, "5.5.2", "Invalid base64"), events),
                }
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
                } else if (from.flags & MAIL_SMTPUTF8 != 0 || from.flags & MAIL_BODY_8BITMIME != 0)
                    && !self.esmtp
                {
                    self.refuse(
                        Reply::unsupported_parameter("(extensions need EHLO)"),
                        events,
                    );
                } else {
                    self.envelope = Some(Envelope {
                        mail_from: from.address.into_owned(),
                        body_8bit: from.flags & MAIL_BODY_8BITMIME != 0,
                        smtputf8: from.flags & MAIL_SMTPUTF8 != 0,
                        ..Envelope::default()
                    });
                    events.push(Event::Reply(Reply::sender_ok()));
                }
            }
            Request::Rcpt { to } => {
                // The relay policy first (it needs the whole session), then the envelope.
                let refusal = if self.envelope.is_some() && !to.address.is_empty() {
                    self.recipient_refusal(&to.address)
                } else {
                    None
                };
                let max = self.config.max_recipients;
                match (self.envelope.as_mut(), refusal) {
                    (None, _) => self.refuse(Reply::bad_sequence("send MAIL first"), events),
                    (Some(_), _) if to.address.is_empty() => {
                        self.refuse(Reply::bad_recipient_address(), events);
                    }
                    (Some(_), Some(reply)) => self.refuse(reply, events),
                    (Some(e), None) if e.mail_from.is_empty() && !e.recipients.is_empty() => {
                        self.refuse(Reply::null_sender_one_recipient(), events);
                    }
                    (Some(e), None) if e.recipients.len() >= max => {
                        self.refuse(Reply::too_many_recipients(), events);
                    }
                    (Some(e), None) if self.config.check_recipients => {
                        let query = RecipientQuery {
                            transaction: format!("{}.{}", self.id, self.transactions + 1),
                            tenant: None,
                            sender: e.mail_from.clone(),
                            recipient: to.address.clone().into_owned(),
                            accepted: e.recipients.len(),
                        };
                        self.phase = Phase::WaitingRecipient {
                            address: to.address.into_owned(),
                        };
                        events.push(Event::CheckRecipient(RecipientQuery {
                            tenant: self.tenant(),
                            ..query
                        }));
                    }
                    (Some(e), None) => {
                        e.recipients.push(to.address.into_owned());
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
                match self.envelope.as_ref() {
                    None => self.refuse(Reply::bad_sequence("send MAIL first"), events),
                    Some(e) if e.recipients.is_empty() => {
                        self.refuse(Reply::new(554, "5.5.1", "No valid recipients"), events);
                    }
                    Some(e) if e.used_bdat => {
                        self.refuse(Reply::bad_sequence("DATA after BDAT"), events);
                    }
                    Some(_) => {
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

    /// The sender the tenant's `allowedSenders: Any` rewrite gives this message, if any.
    fn rewritten_sender(&self, sender: &str, recipients: &[String]) -> Option<String> {
        let directory = self.config.directory.as_ref()?;
        let binding = directory.bind(
            self.authenticated.as_deref(),
            self.peer.ip(),
            self.helo.as_deref(),
        );
        directory.rewritten_sender(&binding, self.helo.as_deref(), sender, recipients)
    }

    /// Why a recipient must be refused at RCPT time, per the tenants' relay policy.
    fn recipient_refusal(&self, recipient: &str) -> Option<Reply> {
        let directory = self.config.directory.as_ref()?;
        let binding = directory.bind(
            self.authenticated.as_deref(),
            self.peer.ip(),
            self.helo.as_deref(),
        );
        let sender = self.envelope.as_ref().map_or("", |e| e.mail_from.as_str());
        if let Err(reply) =
            directory.check_recipient(&binding, self.tls.is_some(), sender, recipient)
        {
            return Some(reply);
        }
        let router = self.config.router.as_ref()?;
        router
            .route_recipient(binding.tenant.as_deref(), sender, recipient)
            .err()
    }

    /// The tenant this session is bound to now.
    fn tenant(&self) -> Option<Arc<str>> {
        let directory = self.config.directory.as_ref()?;
        directory
            .bind(
                self.authenticated.as_deref(),
                self.peer.ip(),
                self.helo.as_deref(),
            )
            .tenant
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
            lines.push("AUTH PLAIN LOGIN".into());
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
        } else if mechanism == AUTH_PLAIN {
            if initial.is_empty() {
                self.phase = Phase::AuthPlain;
                events.push(Event::Reply(Reply::auth_challenge("")));
            } else {
                self.auth_plain_response(initial.as_bytes(), events);
            }
        } else if mechanism == AUTH_LOGIN {
            match initial {
                "" => {
                    self.phase = Phase::AuthLoginUser;
                    events.push(Event::Reply(Reply::auth_challenge("VXNlcm5hbWU6")));
                }
                ir => match decode(ir.as_bytes()) {
                    Some(username) => {
                        self.phase = Phase::AuthLoginPassword { username };
                        events.push(Event::Reply(Reply::auth_challenge("UGFzc3dvcmQ6")));
                    }
                    None => self.refuse(Reply::new(501, "5.5.2", "Invalid base64"), events),
                },
            }
        } else {
            self.refuse(Reply::auth_mechanism_unsupported(), events);
        }
    }

    /// `[authzid] NUL authcid NUL password` (RFC 4616); an authzid other than the authcid is
    /// refused: nobody may act as someone else.
    fn auth_plain_response(&mut self, response: &[u8], events: &mut Vec<Event>) {
        if response == b"*" {
            self.refuse(Reply::auth_cancelled(), events);
            return;
        }
        let decoded = if response == b"=" {
            Some(Vec::new())
        } else {
            base64::engine::general_purpose::STANDARD
                .decode(response)
                .ok()
        };
        let parts: Option<(String, String)> = decoded.and_then(|bytes| {
            let mut fields = bytes.split(|b| *b == 0);
            let authzid = fields.next()?;
            let authcid = String::from_utf8(fields.next()?.to_vec()).ok()?;
            let password = String::from_utf8(fields.next()?.to_vec()).ok()?;
            if fields.next().is_some() || (!authzid.is_empty() && authzid != authcid.as_bytes()) {
                return None;
            }
            Some((authcid, password))
        });
        match parts {
            Some((username, password)) => {
                self.phase = Phase::WaitingAuth;
                events.push(Event::Authenticate { username, password });
            }
            None => self.refuse(
                Reply::new(501, "5.5.2", "Malformed AUTH PLAIN response"),
                events,
            ),
        }
    }

    /// Answers a pending [`Event::Authenticate`].
    pub fn auth_result(&mut self, username: &str, outcome: AuthOutcome, events: &mut Vec<Event>) {
        if !matches!(self.phase, Phase::WaitingAuth) {
            return;
        }
        self.phase = Phase::Command;
        match outcome {
            AuthOutcome::Accepted => {
                self.authenticated = Some(username.to_owned());
                events.push(Event::Reply(Reply::auth_succeeded()));
            }
            AuthOutcome::Refused => self.refuse(Reply::auth_failed(), events),
            AuthOutcome::Throttled => self.close(Reply::auth_too_many_failures(), events),
        }
    }

    /// Puts a new configuration in force (a reload). Only between transactions: the driver
    /// never calls it while [`Session::in_transaction`].
    pub fn reconfigure(&mut self, config: Arc<SessionConfig>) {
        if !self.in_transaction() {
            self.config = config;
        }
    }

    /// Answers a pending [`Event::CheckRecipient`]: `Ok` adds the recipient. A refusal does
    /// not count towards the session's error limit.
    pub fn recipient_checked(&mut self, verdict: Result<(), Reply>, events: &mut Vec<Event>) {
        let Phase::WaitingRecipient { address } =
            std::mem::replace(&mut self.phase, Phase::Command)
        else {
            return;
        };
        match (verdict, self.envelope.as_mut()) {
            (Ok(()), Some(e)) => {
                e.recipients.push(address);
                events.push(Event::Reply(Reply::recipient_ok()));
            }
            (Ok(()), None) => self.refuse(Reply::bad_sequence("send MAIL first"), events),
            // NB: not a client error (quotas, a mailbox the upstream does not have): a client
            // sending to many recipients past a limit is not closed for it.
            (Err(reply), _) => events.push(Event::Reply(reply)),
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
            self.phase = Phase::Command;
            if reply.is_positive() {
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
        if count_received(&envelope.content) >= self.config.max_received_headers {
            self.refuse(Reply::mail_loop(), events);
            return;
        }
        let mut envelope = envelope;
        if let Some(sender) = self.rewritten_sender(&envelope.mail_from, &envelope.recipients) {
            envelope.mail_from = sender;
        }
        self.transactions += 1;
        let id = format!("{}.{}", self.id, self.transactions);
        let received = self.received_header(&id, &envelope);
        let mut content = Vec::with_capacity(received.len() + envelope.content.len());
        content.extend_from_slice(received.as_bytes());
        content.extend_from_slice(&envelope.content);
        self.phase = Phase::WaitingDelivery;
        events.push(Event::Message(Transaction {
            id,
            mail_from: envelope.mail_from,
            recipients: envelope.recipients,
            body_8bit: envelope.body_8bit,
            smtputf8: envelope.smtputf8,
            received_len: received.len(),
            content,
            tenant: self.tenant(),
        }));
    }

    /// One `Received:` header (RFC 5321 section 4.4, RFC 3848 protocol names), folded.
    fn received_header(&self, id: &str, envelope: &Envelope) -> String {
        let helo = sanitize(self.helo.as_deref().unwrap_or("unknown"));
        let protocol = match (self.esmtp, self.tls.is_some(), self.authenticated.is_some()) {
            (false, _, _) => "SMTP",
            (true, false, false) => "ESMTP",
            (true, false, true) => "ESMTPA",
            (true, true, false) => "ESMTPS",
            (true, true, true) => "ESMTPSA",
        };
        let mut header = format!(
            "Received: from {helo} ([{}])\r\n\tby {} (Mailroute) with {protocol} id {id}",
            self.peer.ip(),
            sanitize(&self.config.hostname),
        );
        if let Some(tls) = &self.tls {
            header.push_str(&format!(
                "\r\n\t(using {} with cipher {})",
                sanitize(&tls.version),
                sanitize(&tls.cipher)
            ));
        }
        if let [only] = envelope.recipients.as_slice() {
            header.push_str(&format!("\r\n\tfor <{}>", sanitize(only)));
        }
        let date = httpdate::fmt_http_date((self.config.now)()).replace(" GMT", " +0000");
        header.push_str(&format!(";\r\n\t{date}\r\n"));
        header
    }
}

fn trim_crlf(line: &[u8]) -> &[u8] {
    line.strip_suffix(b"\r\n").unwrap_or(line)
}

fn is_cancel(line: &[u8]) -> bool {
    trim_crlf(line) == b"*"
}

fn decode(text: &[u8]) -> Option<String> {
    base64::engine::general_purpose::STANDARD
        .decode(text)
        .ok()
        .and_then(|b| String::from_utf8(b).ok())
}

/// Client-supplied text in a header: printable ASCII without parentheses or angle brackets
/// (so it cannot close a comment or an address), UTF-8 kept for SMTPUTF8 addresses.
fn sanitize(text: &str) -> String {
    text.chars()
        .map(|c| match c {
            '(' | ')' | '<' | '>' | ';' | '\\' => '_',
            c if c.is_control() || c == ' ' => '_',
            c => c,
        })
        .collect()
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
