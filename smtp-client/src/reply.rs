//! SMTP replies: one type with named constructors, so every reply the relay sends is written
//! once, with its enhanced status code (RFC 3463).
//!
//! Enhanced codes are carried by every 2xx, 4xx and 5xx reply except the greeting and the
//! replies to EHLO/HELO (RFC 2034 section 3); the intermediate 354 and 334 carry none.

use std::borrow::Cow;
use std::fmt;

/// One SMTP reply, possibly multi-line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    code: u16,
    enhanced: Option<Cow<'static, str>>,
    lines: Vec<Cow<'static, str>>,
}

impl Reply {
    /// A reply with an enhanced status code.
    pub fn new(code: u16, enhanced: &'static str, text: impl Into<Cow<'static, str>>) -> Self {
        Self {
            code,
            enhanced: Some(Cow::Borrowed(enhanced)),
            lines: vec![text.into()],
        }
    }

    /// A reply whose codes come from elsewhere (an upstream server, a rule's `reject`). The
    /// enhanced code is kept only when it is well formed (`class.subject.detail`, RFC 3463) and
    /// its class agrees with the reply code.
    pub fn relayed(code: u16, enhanced: Option<&str>, text: impl Into<Cow<'static, str>>) -> Self {
        let class = char::from(b'0' + (code / 100 % 10) as u8);
        let enhanced = enhanced
            .filter(|e| {
                let mut parts = e.split('.');
                let ok = |p: Option<&str>, max: usize| {
                    p.is_some_and(|p| {
                        !p.is_empty() && p.len() <= max && p.bytes().all(|b| b.is_ascii_digit())
                    })
                };
                e.starts_with(class)
                    && ok(parts.next(), 1)
                    && ok(parts.next(), 3)
                    && ok(parts.next(), 3)
                    && parts.next().is_none()
            })
            .map(|e| Cow::Owned(e.to_owned()));
        Self {
            code,
            enhanced,
            lines: vec![text.into()],
        }
    }

    /// The text of the reply, lines joined by a space.
    pub fn text(&self) -> String {
        self.lines.join(" ")
    }

    /// A reply without an enhanced status code (greeting, EHLO, 354, 334).
    pub fn bare(code: u16, text: impl Into<Cow<'static, str>>) -> Self {
        Self {
            code,
            enhanced: None,
            lines: vec![text.into()],
        }
    }

    /// A multi-line reply without enhanced codes (the EHLO reply).
    pub fn multiline(code: u16, lines: Vec<Cow<'static, str>>) -> Self {
        Self {
            code,
            enhanced: None,
            lines,
        }
    }

    pub fn code(&self) -> u16 {
        self.code
    }

    pub fn enhanced(&self) -> Option<&str> {
        self.enhanced.as_deref()
    }

    /// 2xx.
    pub fn is_positive(&self) -> bool {
        (200..300).contains(&self.code)
    }

    /// Appends the wire form (`code[-| ][enhanced ]text CRLF` per line) to `out`.
    pub fn write_to(&self, out: &mut Vec<u8>) {
        let last = self.lines.len().saturating_sub(1);
        for (i, line) in self.lines.iter().enumerate() {
            out.extend_from_slice(self.code.to_string().as_bytes());
            out.push(if i == last { b' ' } else { b'-' });
            if let Some(enhanced) = &self.enhanced {
                out.extend_from_slice(enhanced.as_bytes());
                out.push(b' ');
            }
            // NB: texts may quote client input (a parameter name); never let a CR or LF in
            // one become a second reply line.
            out.extend(
                line.bytes()
                    .map(|b| if b == b'\r' || b == b'\n' { b' ' } else { b }),
            );
            out.extend_from_slice(b"\r\n");
        }
    }

    // --- Greeting and session ---

    pub fn greeting(hostname: &str) -> Self {
        Self::bare(220, format!("{hostname} ESMTP Mailroute"))
    }
    pub fn closing(hostname: &str) -> Self {
        Self::new(221, "2.0.0", format!("{hostname} closing connection"))
    }
    pub fn ok() -> Self {
        Self::new(250, "2.0.0", "OK")
    }
    pub fn sender_ok() -> Self {
        Self::new(250, "2.1.0", "Sender OK")
    }
    pub fn recipient_ok() -> Self {
        Self::new(250, "2.1.5", "Recipient OK")
    }
    pub fn reset() -> Self {
        Self::new(250, "2.0.0", "Reset OK")
    }
    pub fn helo(hostname: &str, client: &str) -> Self {
        Self::bare(250, format!("{hostname} greets {client}"))
    }
    pub fn cannot_verify() -> Self {
        Self::new(
            252,
            "2.5.0",
            "Cannot VRFY user, but will accept message and attempt delivery",
        )
    }
    pub fn start_data() -> Self {
        Self::bare(354, "End data with <CR><LF>.<CR><LF>")
    }
    pub fn ready_for_tls() -> Self {
        Self::new(220, "2.0.0", "Ready to start TLS")
    }
    pub fn help() -> Self {
        Self::new(214, "2.0.0", "See RFC 5321")
    }
    pub fn shutting_down(hostname: &str) -> Self {
        Self::new(
            421,
            "4.3.2",
            format!("{hostname} Service shutting down, try again later"),
        )
    }
    pub fn idle_timeout(hostname: &str) -> Self {
        Self::new(
            421,
            "4.4.2",
            format!("{hostname} Timeout waiting for command, closing connection"),
        )
    }
    pub fn session_too_long(hostname: &str) -> Self {
        Self::new(
            421,
            "4.4.2",
            format!("{hostname} Session too long, closing connection"),
        )
    }
    pub fn too_many_sessions(hostname: &str) -> Self {
        Self::new(
            421,
            "4.3.2",
            format!("{hostname} Too many connections, try again later"),
        )
    }
    pub fn too_many_errors() -> Self {
        Self::new(421, "4.7.0", "Too many errors, closing connection")
    }

    // --- Syntax and sequence (RFC 5321 section 4.2.2, RFC 3463) ---

    /// `--max-sessions-per-ip`: this client already holds its share of the relay's sessions.
    pub fn too_many_sessions_from_client(hostname: &str) -> Self {
        Self::new(
            421,
            "4.7.0",
            format!("{hostname} Too many connections from your address, try again later"),
        )
    }
    /// A session sending commands without ever sending a message (a MAIL/RSET loop).
    pub fn too_many_commands() -> Self {
        Self::new(
            421,
            "4.7.0",
            "Too many commands without a message, closing connection",
        )
    }
    /// Content kept coming after a refused DATA, past the largest message.
    pub fn content_after_refused_data() -> Self {
        Self::new(
            554,
            "5.5.0",
            "Message content after a refused DATA, closing connection",
        )
    }
    /// Content sent after a refused DATA, read to its end and thrown away.
    pub fn content_after_refused_data_discarded() -> Self {
        Self::new(
            554,
            "5.5.1",
            "DATA was refused: the content that followed was discarded",
        )
    }
    pub fn unrecognized_command() -> Self {
        Self::new(500, "5.5.1", "Command unrecognized")
    }
    /// RFC 4954 section 6's reply to an AUTH line or SASL response over 12,288 octets.
    pub fn auth_line_too_long() -> Self {
        Self::new(500, "5.5.6", "Authentication exchange line is too long")
    }
    pub fn line_too_long() -> Self {
        Self::new(500, "5.5.2", "Command line too long (512 octets at most)")
    }
    pub fn bare_line_feed_in_command() -> Self {
        Self::new(500, "5.5.2", "Command lines must end with CRLF")
    }
    pub fn cr_in_command() -> Self {
        Self::new(501, "5.5.2", "Syntax error: CR or NUL inside a command")
    }
    pub fn syntax(usage: &'static str) -> Self {
        Self::new(501, "5.5.4", format!("Syntax: {usage}"))
    }
    pub fn bad_sender_address() -> Self {
        Self::new(501, "5.1.7", "Bad sender address syntax")
    }
    pub fn bad_recipient_address() -> Self {
        Self::new(501, "5.1.3", "Bad recipient address syntax")
    }
    /// RFC 6531 section 3.5: a UTF-8 address in a transaction without `SMTPUTF8`.
    pub fn non_ascii_address() -> Self {
        Self::new(
            553,
            "5.6.7",
            "Non-ASCII addresses need the SMTPUTF8 parameter on MAIL",
        )
    }
    pub fn bad_sequence(what: &'static str) -> Self {
        Self::new(503, "5.5.1", format!("Bad sequence of commands: {what}"))
    }
    pub fn not_implemented() -> Self {
        Self::new(502, "5.5.1", "Command not implemented")
    }
    pub fn unsupported_parameter(parameter: &str) -> Self {
        Self::new(555, "5.5.4", format!("Unsupported parameter {parameter}"))
    }
    pub fn invalid_parameter(parameter: &'static str) -> Self {
        Self::new(501, "5.5.4", format!("Invalid value for {parameter}"))
    }
    pub fn pipelining_violation() -> Self {
        Self::new(
            554,
            "5.5.0",
            "Command pipelined where RFC 2920 forbids it, closing connection",
        )
    }
    pub fn talked_before_greeting() -> Self {
        Self::new(
            554,
            "5.5.0",
            "Client sent data before the greeting, closing connection",
        )
    }
    pub fn not_smtp() -> Self {
        Self::new(554, "5.5.0", "This is an SMTP server, closing connection")
    }

    // --- Message ---

    pub fn message_accepted(id: &str) -> Self {
        Self::new(250, "2.0.0", format!("OK queued-less as {id}"))
    }
    pub fn too_many_recipients() -> Self {
        Self::new(452, "4.5.3", "Too many recipients")
    }
    pub fn null_sender_one_recipient() -> Self {
        Self::new(
            452,
            "4.5.3",
            "Only one recipient per transaction for the null sender",
        )
    }
    /// `--max-inflight-bytes`: the relay holds as much message content as it may right now.
    pub fn insufficient_storage() -> Self {
        Self::new(452, "4.3.1", "Insufficient system storage, try again later")
    }
    pub fn message_too_big() -> Self {
        Self::new(
            552,
            "5.3.4",
            "Message size exceeds fixed maximum message size",
        )
    }
    pub fn bare_line_ending() -> Self {
        Self::new(
            550,
            "5.6.11",
            "Bare CR or LF, or NUL, in message content, closing connection (see RFC 5321 section 2.3.8)",
        )
    }
    pub fn mail_loop() -> Self {
        Self::new(
            554,
            "5.4.6",
            "Too many Received: headers: mail loop detected",
        )
    }
    pub fn data_timeout(hostname: &str) -> Self {
        Self::new(
            421,
            "4.4.2",
            format!("{hostname} Timeout reading message data, closing connection"),
        )
    }

    // --- TLS and AUTH (RFC 3207, RFC 4954) ---

    pub fn tls_already_active() -> Self {
        Self::new(503, "5.5.1", "TLS already active")
    }
    pub fn tls_not_available() -> Self {
        Self::new(454, "4.7.0", "TLS not available")
    }
    pub fn auth_needs_tls() -> Self {
        Self::new(
            538,
            "5.7.11",
            "Encryption required for requested authentication mechanism",
        )
    }
    pub fn auth_succeeded() -> Self {
        Self::new(235, "2.7.0", "Authentication succeeded")
    }
    pub fn auth_failed() -> Self {
        Self::new(535, "5.7.8", "Authentication credentials invalid")
    }
    pub fn auth_too_many_failures() -> Self {
        Self::new(
            454,
            "4.7.0",
            "Too many failed authentication attempts, try again later",
        )
    }
    /// Every slot for password checks is taken (a flood of AUTH attempts): come back later.
    pub fn auth_busy() -> Self {
        Self::new(
            454,
            "4.7.0",
            "Temporary authentication failure, try again later",
        )
    }
    pub fn auth_cancelled() -> Self {
        Self::new(501, "5.7.0", "Authentication cancelled")
    }
    pub fn auth_mechanism_unsupported() -> Self {
        Self::new(504, "5.5.4", "Unrecognized authentication type")
    }
    pub fn already_authenticated() -> Self {
        Self::new(503, "5.5.1", "Already authenticated")
    }
    /// The shared store (quotas, ledger) cannot answer (SPEC 5.3a).
    pub fn store_unavailable() -> Self {
        Self::new(
            451,
            "4.3.0",
            "Temporary failure of the relay's shared store; try again later",
        )
    }
    pub fn auth_challenge(base64: impl Into<Cow<'static, str>>) -> Self {
        Self::bare(334, base64)
    }
}

impl fmt::Display for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut wire = Vec::new();
        self.write_to(&mut wire);
        f.write_str(String::from_utf8_lossy(&wire).trim_end())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wire(reply: &Reply) -> String {
        let mut out = Vec::new();
        reply.write_to(&mut out);
        String::from_utf8_lossy(&out).into_owned()
    }

    #[test]
    fn replies_carry_enhanced_codes_except_greeting_ehlo_and_intermediates() {
        assert_eq!(wire(&Reply::ok()), "250 2.0.0 OK\r\n");
        assert_eq!(
            wire(&Reply::greeting("relay.example")),
            "220 relay.example ESMTP Mailroute\r\n"
        );
        assert_eq!(
            wire(&Reply::start_data()),
            "354 End data with <CR><LF>.<CR><LF>\r\n"
        );
        assert_eq!(
            wire(&Reply::multiline(
                250,
                vec![
                    "relay.example".into(),
                    "PIPELINING".into(),
                    "8BITMIME".into()
                ]
            )),
            "250-relay.example\r\n250-PIPELINING\r\n250 8BITMIME\r\n"
        );
    }

    #[test]
    fn client_text_in_a_reply_cannot_start_a_new_line() {
        assert_eq!(
            wire(&Reply::unsupported_parameter("X=1\r\n250 fake")),
            "555 5.5.4 Unsupported parameter X=1  250 fake\r\n"
        );
    }
}
