//! One connection to an upstream SMTP server, driven with mail-send's client: greeting, EHLO,
//! STARTTLS or implicit TLS as the route's policy says, AUTH, then transactions with MAIL,
//! RCPT and DATA pipelined when the server offers PIPELINING, and the message and its end
//! marker in one write.
//!
//! mail-send's own message writer is not used: it appends an extra CRLF and does not dot-stuff
//! a leading dot; the relay's `dot_stuff` writes the content exactly as it was received.

use crate::bearer::{self, Login};
use crate::dot::DotStuffer;
use crate::failure::{END_OF_DATA, from_mail_send};
pub use crate::failure::{UpstreamError, to_reply};
use crate::reply::Reply;
pub use crate::stream::Stream;
use mail_send::SmtpClient;
use smtp_proto::{
    EXT_8BIT_MIME, EXT_DSN, EXT_PIPELINING, EXT_SIZE, EXT_SMTP_UTF8, EXT_START_TLS, Response,
};
use std::io;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

/// Message content is written upstream in pieces of about this many octets.
pub const WRITE_CHUNK: usize = 64 * 1024;

/// How to reach and greet one upstream host.
#[derive(Clone, Debug)]
pub struct Dial {
    pub addr: SocketAddr,
    /// Host name (or IP text) for certificate checks and logs.
    pub host: String,
    pub helo: String,
    pub tls: TlsPlan,
    /// How to authenticate, after TLS (never in clear).
    pub login: Option<Login>,
    pub connect_timeout: Duration,
    pub command_timeout: Duration,
}

/// What TLS the connection must have.
#[derive(Clone)]
pub enum TlsPlan {
    /// Never STARTTLS.
    Off,
    /// STARTTLS when offered.
    Opportunistic(TlsConnector),
    /// STARTTLS, or no delivery.
    Required(TlsConnector),
    /// TLS from the first byte.
    Implicit(TlsConnector),
}

impl std::fmt::Debug for TlsPlan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            TlsPlan::Off => "Off",
            TlsPlan::Opportunistic(_) => "Opportunistic",
            TlsPlan::Required(_) => "Required",
            TlsPlan::Implicit(_) => "Implicit",
        })
    }
}

/// One recipient as sent upstream.
#[derive(Debug)]
pub struct Recipient<'a> {
    pub address: &'a str,
    pub notify_never: bool,
}

/// The envelope of one transaction as sent upstream.
#[derive(Debug)]
pub struct Envelope<'a> {
    pub sender: &'a str,
    pub recipients: &'a [Recipient<'a>],
    /// The client declared `BODY=8BITMIME`.
    pub eight_bit: bool,
    /// The client declared `SMTPUTF8`.
    pub smtputf8: bool,
}

/// How long one transaction may take.
#[derive(Clone, Copy, Debug)]
pub struct Timing {
    /// Until the end-of-data marker is written: the client's reply bound.
    pub deadline: Instant,
    /// For the upstream's answer to the end of data.
    pub data_timeout: Duration,
}

/// What the upstream said to one transaction.
#[derive(Debug)]
pub struct Answers {
    /// The MAIL reply when it was a failure.
    pub mail: Option<Reply>,
    /// One per recipient: `None` when accepted.
    pub recipients: Vec<Option<Reply>>,
    /// The reply after the end of data, when DATA was reached: `None` when accepted.
    pub data: Option<Option<Reply>>,
}

/// An open, greeted connection.
pub struct Upstream {
    client: SmtpClient<Stream>,
    capabilities: u32,
    pub tls: bool,
    pub messages: u32,
    pub idle_since: Instant,
    /// Broken or out of step: never reuse.
    pub poisoned: bool,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream")
            .field("tls", &self.tls)
            .field("messages", &self.messages)
            .field("poisoned", &self.poisoned)
            .finish()
    }
}

impl Answers {
    /// Every recipient refused with `reply`, nothing sent.
    fn refused(reply: Reply, recipients: usize) -> Self {
        Self {
            mail: Some(reply.clone()),
            recipients: vec![Some(reply); recipients],
            data: None,
        }
    }
}

/// The header section of a message (up to the first empty line).
fn header_section(message: &[u8]) -> &[u8] {
    if message.starts_with(b"\r\n") {
        return &[];
    }
    memchr::memmem::find(message, b"\r\n\r\n").map_or(message, |at| &message[..at])
}

impl Upstream {
    /// Connects, reads the greeting, says EHLO, upgrades to TLS and authenticates as planned.
    pub async fn connect(dial: &Dial) -> Result<Self, UpstreamError> {
        let connect = tokio::time::timeout(dial.connect_timeout, TcpStream::connect(dial.addr))
            .await
            .map_err(|_| UpstreamError::Timeout {
                stage: "connect",
                after: dial.connect_timeout,
            })?
            .map_err(|source| UpstreamError::Connect {
                addr: dial.addr,
                source,
            })?;
        let _ = connect.set_nodelay(true);
        let t = dial.command_timeout;
        let (stream, mut tls) = match &dial.tls {
            TlsPlan::Implicit(connector) => {
                (handshake(connector, &dial.host, connect, t).await?, true)
            }
            _ => (Stream::Plain(connect), false),
        };
        let mut client = SmtpClient { stream, timeout: t };
        let greeting = tokio::time::timeout(t, client.read())
            .await
            .map_err(|_| UpstreamError::Timeout {
                stage: "greeting",
                after: t,
            })?
            .map_err(|e| from_mail_send("greeting", e, t))?;
        if greeting.code != 220 {
            return Err(UpstreamError::Refused {
                stage: "greeting",
                reply: to_reply(&greeting),
            });
        }
        let mut ehlo = client
            .ehlo(&dial.helo)
            .await
            .map_err(|e| from_mail_send("EHLO", e, t))?;
        let wants_tls = match &dial.tls {
            TlsPlan::Required(c) => Some((c, true)),
            TlsPlan::Opportunistic(c) => Some((c, false)),
            TlsPlan::Off | TlsPlan::Implicit(_) => None,
        };
        if let Some((connector, required)) = wants_tls
            && !tls
        {
            if ehlo.has_capability(EXT_START_TLS) {
                let reply = client
                    .cmd(b"STARTTLS\r\n")
                    .await
                    .map_err(|e| from_mail_send("STARTTLS", e, t))?;
                if reply.code != 220 {
                    return Err(UpstreamError::Refused {
                        stage: "STARTTLS",
                        reply: to_reply(&reply),
                    });
                }
                let Stream::Plain(tcp) = client.stream else {
                    return Err(UpstreamError::Tls("already encrypted".into()));
                };
                client = SmtpClient {
                    stream: handshake(connector, &dial.host, tcp, t).await?,
                    timeout: t,
                };
                tls = true;
                ehlo = client
                    .ehlo(&dial.helo)
                    .await
                    .map_err(|e| from_mail_send("EHLO after STARTTLS", e, t))?;
            } else if required {
                let _ = client.cmd(b"QUIT\r\n").await;
                return Err(UpstreamError::TlsNotOffered);
            }
        }
        if let Some(login) = &dial.login {
            if !tls {
                let _ = client.cmd(b"QUIT\r\n").await;
                return Err(UpstreamError::AuthWithoutTls);
            }
            match login {
                Login::Password { username, password } => {
                    let credentials =
                        mail_send::Credentials::new(username.as_str(), password.as_str());
                    client
                        .authenticate(&credentials, &ehlo)
                        .await
                        .map_err(|e| from_mail_send("AUTH", e, t))?;
                }
                Login::Bearer { username, tokens } => {
                    bearer::authenticate(&mut client, &ehlo, username, tokens.as_ref(), t).await?;
                }
            }
        }
        Ok(Self {
            capabilities: ehlo.capabilities,
            client,
            tls,
            messages: 0,
            idle_since: Instant::now(),
            poisoned: false,
        })
    }

    /// Runs one transaction: `prefix` (header lines this leg adds) then `message`, dot-stuffed
    /// on the way out through a buffer of [`WRITE_CHUNK`] octets, never a whole copy.
    ///
    /// Everything up to the end-of-data marker must be done by `timing.deadline` (the client's
    /// reply bound); the upstream's answer to it is awaited for `timing.data_timeout`. With a
    /// `hold`, the content goes out but its final `.` waits for `hold` to say `true`; `false`
    /// (or the deadline) abandons the message without it ([`UpstreamError::Withheld`]), so the
    /// upstream discards it. A leg whose upstream lacks an extension the message needs is
    /// refused in the [`Answers`] before MAIL (SPEC 6.7). A failure of the connection itself is
    /// an `Err` (and the connection is poisoned); refusals are in the [`Answers`].
    pub async fn send<H>(
        &mut self,
        envelope: &Envelope<'_>,
        prefix: &[u8],
        message: &[u8],
        timing: Timing,
        hold: Option<H>,
    ) -> Result<Answers, UpstreamError>
    where
        H: std::future::Future<Output = bool>,
    {
        if let Some(refusal) = self.lacks(envelope, prefix, message) {
            return Ok(Answers::refused(refusal, envelope.recipients.len()));
        }
        self.poisoned = true;
        self.messages += 1;
        let deadline = tokio::time::Instant::from_std(timing.deadline);
        let bound = |stage: &'static str| UpstreamError::Bound { stage };
        let (mut answers, data_reply) = tokio::time::timeout_at(
            deadline,
            self.envelope(envelope, prefix.len() + message.len()),
        )
        .await
        .map_err(|_| bound("MAIL, RCPT and DATA"))??;
        if answers.recipients.iter().all(Option::is_some)
            || data_reply.as_ref().is_none_or(|r| r.code != 354)
        {
            // DATA refused (no valid recipient, or MAIL failed): leave the transaction.
            if data_reply.is_some_and(|r| r.code == 354) {
                // NB: a server that said 354 with no recipient accepted gets an empty message
                // it must refuse; the content is never sent to it.
                if let Ok(Ok(_)) =
                    tokio::time::timeout(timing.data_timeout, self.finish(b".\r\n")).await
                {
                    self.poisoned = false;
                    self.idle_since = Instant::now();
                }
            } else {
                self.reset().await;
            }
            return Ok(answers);
        }
        let mut stuffer = DotStuffer::new(message);
        let end = stuffer.end_marker();
        let held = hold.is_some();
        tokio::time::timeout_at(deadline, self.write_content(prefix, &mut stuffer, !held))
            .await
            .map_err(|_| bound("message content"))?
            .map_err(|e| UpstreamError::Protocol {
                stage: "message content",
                detail: e.to_string(),
            })?;
        if let Some(hold) = hold {
            match tokio::time::timeout_at(deadline, hold).await {
                Ok(true) => {}
                Ok(false) => return Err(UpstreamError::Withheld),
                Err(_) => return Err(bound("waiting for the primary legs")),
            }
        }
        let final_reply = tokio::time::timeout(
            timing.data_timeout,
            self.finish(if held { end } else { b"" }),
        )
        .await
        .map_err(|_| UpstreamError::Timeout {
            stage: END_OF_DATA,
            after: timing.data_timeout,
        })?
        .map_err(|e| UpstreamError::Protocol {
            stage: END_OF_DATA,
            detail: e.to_string(),
        })?;
        answers.data = Some((final_reply.code / 100 != 2).then(|| to_reply(&final_reply)));
        self.poisoned = false;
        self.idle_since = Instant::now();
        Ok(answers)
    }

    /// SPEC 6.7: what this message needs that the upstream does not offer, as the leg's
    /// refusal. A body declared 8-bit that is in fact all ASCII needs nothing; an address
    /// that is not ASCII, or (with `SMTPUTF8` declared) a header that is not, needs SMTPUTF8.
    fn lacks(&self, envelope: &Envelope<'_>, prefix: &[u8], message: &[u8]) -> Option<Reply> {
        if envelope.eight_bit
            && self.capabilities & EXT_8BIT_MIME == 0
            && !(prefix.is_ascii() && message.is_ascii())
        {
            return Some(Reply::new(
                554,
                "5.6.3",
                "the upstream does not offer 8BITMIME and the relay never converts a body",
            ));
        }
        if self.capabilities & EXT_SMTP_UTF8 == 0
            && (!envelope.sender.is_ascii()
                || envelope.recipients.iter().any(|r| !r.address.is_ascii())
                || (envelope.smtputf8 && !header_section(message).is_ascii()))
        {
            return Some(Reply::new(
                553,
                "5.6.7",
                "the upstream does not offer SMTPUTF8 for an internationalised address or header",
            ));
        }
        None
    }

    /// MAIL (with what the client declared and the upstream offers), RCPT and DATA, pipelined
    /// when offered: the refusals, and the reply to DATA when it was sent.
    async fn envelope(
        &mut self,
        envelope: &Envelope<'_>,
        size: usize,
    ) -> Result<(Answers, Option<Response<String>>), UpstreamError> {
        use std::fmt::Write as _;
        let t = self.client.timeout;
        let mut mail = format!("MAIL FROM:<{}>", envelope.sender);
        if self.capabilities & EXT_SIZE != 0 {
            let _ = write!(mail, " SIZE={size}");
        }
        if envelope.eight_bit && self.capabilities & EXT_8BIT_MIME != 0 {
            mail.push_str(" BODY=8BITMIME");
        }
        if envelope.smtputf8 && self.capabilities & EXT_SMTP_UTF8 != 0 {
            mail.push_str(" SMTPUTF8");
        }
        mail.push_str("\r\n");
        let dsn = self.capabilities & EXT_DSN != 0;
        let rcpt_lines: Vec<String> = envelope
            .recipients
            .iter()
            .map(|r| {
                if r.notify_never && dsn {
                    format!("RCPT TO:<{}> NOTIFY=NEVER\r\n", r.address)
                } else {
                    format!("RCPT TO:<{}>\r\n", r.address)
                }
            })
            .collect();
        let mut answers = Answers {
            mail: None,
            recipients: Vec::with_capacity(rcpt_lines.len()),
            data: None,
        };
        let data_reply = if self.capabilities & EXT_PIPELINING != 0 {
            let mut batch = mail;
            for line in &rcpt_lines {
                batch.push_str(line);
            }
            batch.push_str("DATA\r\n");
            let expected = rcpt_lines.len() + 2;
            let client = &mut self.client;
            let replies = tokio::time::timeout(t, async {
                client.stream.write_all(batch.as_bytes()).await?;
                client.stream.flush().await?;
                client.read_many(expected).await
            })
            .await
            .map_err(|_| UpstreamError::Timeout {
                stage: "MAIL, RCPT and DATA",
                after: t,
            })?
            .map_err(|e| from_mail_send("MAIL, RCPT and DATA", e, t))?;
            let mut it = replies.into_iter();
            answers.mail = it
                .next()
                .filter(|r| r.code / 100 != 2)
                .map(|r| to_reply(&r));
            for _ in &rcpt_lines {
                let r = it.next();
                answers
                    .recipients
                    .push(r.filter(|r| r.code / 100 != 2).map(|r| to_reply(&r)));
            }
            it.next()
        } else {
            let reply = self
                .client
                .cmd(mail.as_bytes())
                .await
                .map_err(|e| from_mail_send("MAIL", e, t))?;
            if reply.code / 100 != 2 {
                answers.mail = Some(to_reply(&reply));
                answers
                    .recipients
                    .extend(rcpt_lines.iter().map(|_| Some(to_reply(&reply))));
                return Ok((answers, None));
            }
            for line in &rcpt_lines {
                let reply = self
                    .client
                    .cmd(line.as_bytes())
                    .await
                    .map_err(|e| from_mail_send("RCPT", e, t))?;
                answers
                    .recipients
                    .push((reply.code / 100 != 2).then(|| to_reply(&reply)));
            }
            if answers.recipients.iter().all(Option::is_some) {
                return Ok((answers, None));
            }
            Some(
                self.client
                    .cmd(b"DATA\r\n")
                    .await
                    .map_err(|e| from_mail_send("DATA", e, t))?,
            )
        };
        if let Some(failure) = &answers.mail {
            // NB: pipelined RCPTs after a refused MAIL get "503 need MAIL": the MAIL reply is
            // the one that says what happened (and whether to try again).
            for r in answers.recipients.iter_mut() {
                *r = Some(failure.clone());
            }
        }
        Ok((answers, data_reply))
    }

    /// Writes the content, with its end marker when `end` (a small message then goes out in
    /// one write: no wait for a delayed ACK), a large one in chunks.
    async fn write_content(
        &mut self,
        prefix: &[u8],
        stuffer: &mut DotStuffer<'_>,
        end: bool,
    ) -> io::Result<()> {
        let mut buf =
            Vec::with_capacity((prefix.len() + stuffer.remaining() + 8).min(WRITE_CHUNK + 8));
        buf.extend_from_slice(prefix);
        loop {
            let done = if end {
                stuffer.fill(&mut buf, WRITE_CHUNK)
            } else {
                stuffer.fill_body(&mut buf, WRITE_CHUNK)
            };
            self.client.stream.write_all(&buf).await?;
            buf.clear();
            if done {
                break;
            }
        }
        self.client.stream.flush().await
    }

    /// Writes what is left of the end of data (`end`, possibly nothing) and reads the reply.
    async fn finish(&mut self, end: &[u8]) -> io::Result<Response<String>> {
        if !end.is_empty() {
            self.client.stream.write_all(end).await?;
            self.client.stream.flush().await?;
        }
        self.client.read().await.map_err(io::Error::other)
    }

    /// Asks whether the upstream would take `recipient` from `sender`: MAIL, RCPT and RSET
    /// (pipelined when offered), no message. `Ok(None)`: it would; `Ok(Some(reply))`: its
    /// refusal (of the MAIL, when that failed).
    pub async fn verify(
        &mut self,
        sender: &str,
        recipient: &str,
    ) -> Result<Option<Reply>, UpstreamError> {
        self.poisoned = true;
        let t = self.client.timeout;
        let mail = format!("MAIL FROM:<{sender}>\r\n");
        let rcpt = format!("RCPT TO:<{recipient}>\r\n");
        let (mail_reply, rcpt_reply) = if self.capabilities & EXT_PIPELINING != 0 {
            let batch = format!("{mail}{rcpt}RSET\r\n");
            let client = &mut self.client;
            let replies = tokio::time::timeout(t, async {
                client.stream.write_all(batch.as_bytes()).await?;
                client.stream.flush().await?;
                client.read_many(3).await
            })
            .await
            .map_err(|_| UpstreamError::Timeout {
                stage: "recipient check",
                after: t,
            })?
            .map_err(|e| from_mail_send("recipient check", e, t))?;
            let mut it = replies.into_iter();
            let (m, r, reset) = (it.next(), it.next(), it.next());
            if reset.is_some_and(|r| r.code / 100 == 2) {
                self.poisoned = false;
            }
            (m, r)
        } else {
            let m = self
                .client
                .cmd(mail.as_bytes())
                .await
                .map_err(|e| from_mail_send("MAIL", e, t))?;
            let r = if m.code / 100 == 2 {
                Some(
                    self.client
                        .cmd(rcpt.as_bytes())
                        .await
                        .map_err(|e| from_mail_send("RCPT", e, t))?,
                )
            } else {
                None
            };
            self.reset().await;
            (Some(m), r)
        };
        self.idle_since = Instant::now();
        let refusal = match (mail_reply, rcpt_reply) {
            (Some(m), _) if m.code / 100 != 2 => Some(to_reply(&m)),
            (_, Some(r)) if r.code / 100 != 2 => Some(to_reply(&r)),
            (Some(_), Some(_)) => None,
            _ => {
                return Err(UpstreamError::Protocol {
                    stage: "recipient check",
                    detail: "missing replies".to_owned(),
                });
            }
        };
        Ok(refusal)
    }

    async fn reset(&mut self) {
        if let Ok(r) = self.client.cmd(b"RSET\r\n").await
            && r.code / 100 == 2
        {
            self.poisoned = false;
            self.idle_since = Instant::now();
        }
    }

    /// The negotiated TLS version and the peer's certificate chain (DER, leaf first), when the
    /// connection is encrypted: what a TLS probe reports.
    pub fn tls_peer(&self) -> Option<(String, Vec<Vec<u8>>)> {
        let Stream::Tls(tls) = &self.client.stream else {
            return None;
        };
        let (_, connection) = tls.get_ref();
        let version = connection
            .protocol_version()
            .map(|v| match v {
                rustls::ProtocolVersion::TLSv1_3 => "TLSv1.3".to_owned(),
                rustls::ProtocolVersion::TLSv1_2 => "TLSv1.2".to_owned(),
                other => format!("{other:?}"),
            })
            .unwrap_or_default();
        let chain = connection
            .peer_certificates()
            .map(|certs| certs.iter().map(|c| c.as_ref().to_vec()).collect())
            .unwrap_or_default();
        Some((version, chain))
    }

    /// Ends the session politely.
    pub async fn quit(mut self) {
        let _ = self.client.cmd(b"QUIT\r\n").await;
        let _ = self.client.stream.shutdown().await;
    }
}

async fn handshake(
    connector: &TlsConnector,
    host: &str,
    tcp: TcpStream,
    timeout: Duration,
) -> Result<Stream, UpstreamError> {
    let name = crate::tls::server_name(host)
        .ok_or_else(|| UpstreamError::Tls(format!("{host:?} is not a valid TLS server name")))?;
    match tokio::time::timeout(timeout, connector.connect(name, tcp)).await {
        Ok(Ok(tls)) => Ok(Stream::Tls(Box::new(tls))),
        Ok(Err(e)) => Err(match crate::tls::CertificateProblem::of(&e) {
            Some(problem) => UpstreamError::Certificate {
                problem,
                detail: e.to_string(),
            },
            None => UpstreamError::Tls(e.to_string()),
        }),
        Err(_) => Err(UpstreamError::Timeout {
            stage: "TLS handshake",
            after: timeout,
        }),
    }
}
