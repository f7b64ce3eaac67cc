//! Command lines: framing (RFC 5321 section 4.5.3.1.4: at most 512 octets with the CRLF; an
//! AUTH line or SASL response at most 12,288, RFC 4954 section 4), the
//! checks smtp-proto does not make (a CR, NUL or bare LF inside a command), then smtp-proto's
//! parser for the grammar, and the parameters we advertise.

use super::address;
use crate::reply::Reply;
use memchr::memchr;
use smtp_proto::{
    Error as ProtoError, MAIL_BODY_7BIT, MAIL_BODY_8BITMIME, MAIL_SMTPUTF8, MailFrom, RcptTo,
    Request,
};
use std::borrow::Cow;

/// The longest command line, CRLF included.
pub const MAX_COMMAND_LINE: usize = 512;

/// The longest `AUTH` command line or SASL response line, CRLF included (RFC 4954 section 4
/// allows responses of 12,288 octets; clients put the same in an initial response). OAuth and
/// service-account tokens run to a few thousand octets once base64-encoded.
pub const MAX_AUTH_LINE: usize = 12_288;

/// One framing step over buffered input.
#[derive(Debug, PartialEq, Eq)]
pub enum Framed<'a> {
    /// A whole command line, CRLF included.
    Line { line: &'a [u8], consumed: usize },
    /// A line that must be refused with this reply.
    Refused { reply: Reply, consumed: usize },
    /// Bytes of an over-long line thrown away; its end has not arrived yet.
    Skipped { consumed: usize },
    /// No complete line yet.
    NeedMore,
}

/// Cuts command lines out of the input, remembering an over-long line across reads.
#[derive(Debug, Default)]
pub struct LineFramer {
    /// An over-long line is being thrown away: `Some(true)` for an AUTH line.
    discarding: Option<bool>,
}

/// `AUTH ` in any case: a line allowed [`MAX_AUTH_LINE`].
fn is_auth(input: &[u8]) -> bool {
    input
        .get(..5)
        .is_some_and(|p| p.eq_ignore_ascii_case(b"AUTH "))
}

fn too_long(auth: bool) -> Reply {
    if auth {
        Reply::auth_line_too_long()
    } else {
        Reply::line_too_long()
    }
}

impl LineFramer {
    /// A command line. Never returns `Skipped` with nothing consumed, so a caller looping
    /// until `NeedMore` always ends.
    pub fn next<'a>(&mut self, input: &'a [u8]) -> Framed<'a> {
        self.next_line(input, false)
    }

    /// A command line, or with `sasl_response` a client's answer to an AUTH challenge.
    pub fn next_line<'a>(&mut self, input: &'a [u8], sasl_response: bool) -> Framed<'a> {
        if input.is_empty() {
            return Framed::NeedMore;
        }
        if let Some(auth) = self.discarding {
            return match memchr(b'\n', input) {
                Some(at) => {
                    self.discarding = None;
                    Framed::Refused {
                        reply: too_long(auth),
                        consumed: at + 1,
                    }
                }
                None => Framed::Skipped {
                    consumed: input.len(),
                },
            };
        }
        let auth = sasl_response || is_auth(input);
        let limit = if auth {
            MAX_AUTH_LINE
        } else {
            MAX_COMMAND_LINE
        };
        let window = &input[..input.len().min(limit)];
        match memchr(b'\n', window) {
            Some(at) => {
                let consumed = at + 1;
                if at == 0 || input[at - 1] != b'\r' {
                    return Framed::Refused {
                        reply: Reply::bare_line_feed_in_command(),
                        consumed,
                    };
                }
                let text = &input[..at - 1];
                if text.iter().any(|b| *b == b'\r' || *b == 0) {
                    return Framed::Refused {
                        reply: Reply::cr_in_command(),
                        consumed,
                    };
                }
                Framed::Line {
                    line: &input[..consumed],
                    consumed,
                }
            }
            None if input.len() >= limit => {
                // NB: skip only the window: commands pipelined after the long line's end must
                // still be read.
                self.discarding = Some(auth);
                Framed::Skipped {
                    consumed: window.len(),
                }
            }
            None => Framed::NeedMore,
        }
    }
}

/// Why a command line was refused, and whether the session must end.
#[derive(Debug, PartialEq, Eq)]
pub struct Refusal {
    pub reply: Reply,
    pub close: bool,
}

/// Starts of lines that show an HTTP client (or a proxy probe) talking to the SMTP port.
const NOT_SMTP: &[&[u8]] = &[
    b"GET ",
    b"POST ",
    b"HEAD ",
    b"PUT ",
    b"DELETE ",
    b"OPTIONS ",
    b"CONNECT ",
    // A PROXY header from a source not trusted to send one (SPEC 5.1).
    b"PROXY ",
    b"PATCH ",
    b"HOST:",
    b"USER-AGENT:",
    b"ACCEPT:",
    b"CONTENT-",
];

/// Whether a line starts with an SMTP verb (a command, not a line of message content: content
/// starts with header lines, `Name:`).
pub fn is_command(line: &[u8]) -> bool {
    const VERBS: &[&[u8]] = &[
        b"EHLO",
        b"HELO",
        b"MAIL",
        b"RCPT",
        b"DATA",
        b"BDAT",
        b"RSET",
        b"NOOP",
        b"QUIT",
        b"VRFY",
        b"EXPN",
        b"HELP",
        b"AUTH",
        b"STARTTLS",
    ];
    VERBS.iter().any(|verb| {
        line.len() > verb.len()
            && line[..verb.len()].eq_ignore_ascii_case(verb)
            && matches!(line[verb.len()], b' ' | b'\r')
    })
}

/// Parses one framed command line. The path of MAIL and RCPT is ours to read
/// ([`super::address`]): the address comes back exactly as the client wrote it.
pub fn parse(line: &[u8]) -> Result<Request<Cow<'_, str>>, Refusal> {
    let refused = |reply| Refusal {
        reply,
        close: false,
    };
    let bad_path = || {
        refused(if line[..4].eq_ignore_ascii_case(b"MAIL") {
            Reply::bad_sender_address()
        } else {
            Reply::bad_recipient_address()
        })
    };
    match address::find(line) {
        None => {}
        Some(Err(_)) => return Err(bad_path()),
        Some(Ok(path)) => {
            let raw = std::str::from_utf8(&line[path.start..path.end]).map_err(|_| bad_path())?;
            let mailbox = address::mailbox(raw).map_err(|_| bad_path())?;
            // smtp-proto reads the parameters, on the line with a stand-in address.
            let mut stand_in = Vec::with_capacity(line.len());
            stand_in.extend_from_slice(&line[..path.start]);
            if !mailbox.is_empty() {
                stand_in.extend_from_slice(b"stand-in@mailroute.invalid");
            }
            stand_in.extend_from_slice(&line[path.end..]);
            return match parse_grammar(&stand_in)? {
                // NB: check_parameters refused every parameter that carries a value.
                Request::Mail { from } => Ok(Request::Mail {
                    from: MailFrom {
                        address: Cow::Owned(mailbox),
                        flags: from.flags,
                        size: from.size,
                        trans_id: None,
                        by: 0,
                        env_id: None,
                        solicit: None,
                        mtrk: None,
                        auth: None,
                        hold_for: 0,
                        hold_until: 0,
                        mt_priority: 0,
                    },
                }),
                Request::Rcpt { to } => Ok(Request::Rcpt {
                    to: RcptTo {
                        address: Cow::Owned(mailbox),
                        orcpt: None,
                        rrvs: 0,
                        flags: to.flags,
                    },
                }),
                _ => Err(bad_path()),
            };
        }
    }
    let request = parse_grammar(line)?;
    // Without angle brackets smtp-proto read the address: it must still be one we would
    // write back out unchanged.
    match &request {
        Request::Mail { from } if address::mailbox(&from.address).is_err() => Err(bad_path()),
        Request::Rcpt { to } if address::mailbox(&to.address).is_err() => Err(bad_path()),
        _ => Ok(request),
    }
}

/// smtp-proto's grammar and our parameter checks.
fn parse_grammar(line: &[u8]) -> Result<Request<Cow<'_, str>>, Refusal> {
    let refused = |reply| Refusal {
        reply,
        close: false,
    };
    match Request::parse(&mut line.iter()) {
        Ok(request) => check_parameters(request).map_err(refused),
        Err(ProtoError::UnknownCommand) => {
            let upper: Vec<u8> = line.iter().take(16).map(u8::to_ascii_uppercase).collect();
            if NOT_SMTP.iter().any(|p| upper.starts_with(p)) {
                Err(Refusal {
                    reply: Reply::not_smtp(),
                    close: true,
                })
            } else {
                Err(refused(Reply::unrecognized_command()))
            }
        }
        Err(ProtoError::InvalidSenderAddress) => Err(refused(Reply::bad_sender_address())),
        Err(ProtoError::InvalidRecipientAddress) => Err(refused(Reply::bad_recipient_address())),
        Err(ProtoError::SyntaxError { syntax }) => Err(refused(Reply::syntax(syntax))),
        Err(ProtoError::InvalidParameter { param }) => {
            Err(refused(Reply::invalid_parameter(param)))
        }
        Err(ProtoError::UnsupportedParameter { param }) => {
            Err(refused(Reply::unsupported_parameter(&param)))
        }
        Err(_) => Err(refused(Reply::syntax("see RFC 5321"))),
    }
}

/// MAIL and RCPT parameters of extensions we do not advertise (DSN, BINARYMIME, REQUIRETLS,
/// DELIVERBY, FUTURERELEASE, ...) are refused rather than silently ignored.
fn check_parameters(request: Request<Cow<'_, str>>) -> Result<Request<Cow<'_, str>>, Reply> {
    match &request {
        Request::Mail { from } => {
            let allowed = MAIL_BODY_7BIT | MAIL_BODY_8BITMIME | MAIL_SMTPUTF8;
            let MailFrom {
                flags,
                trans_id,
                by,
                env_id,
                solicit,
                mtrk,
                hold_for,
                hold_until,
                mt_priority,
                ..
            } = from;
            let unsupported = if flags & !allowed != 0 {
                Some("(BODY=BINARYMIME, RET, REQUIRETLS, BY or CONPERM)")
            } else if env_id.is_some() {
                Some("ENVID")
            } else if trans_id.is_some() || *by != 0 || solicit.is_some() || mtrk.is_some() {
                Some("(TRANSID, BY, SOLICIT or MTRK)")
            } else if *hold_for != 0 || *hold_until != 0 || *mt_priority != 0 {
                Some("(HOLDFOR, HOLDUNTIL or MT-PRIORITY)")
            } else {
                None
            };
            match unsupported {
                Some(p) => Err(Reply::unsupported_parameter(p)),
                None => Ok(request),
            }
        }
        Request::Rcpt { to } => {
            let RcptTo {
                orcpt, rrvs, flags, ..
            } = to;
            if *flags != 0 || orcpt.is_some() || *rrvs != 0 {
                Err(Reply::unsupported_parameter("(NOTIFY, ORCPT or RRVS)"))
            } else {
                Ok(request)
            }
        }
        _ => Ok(request),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame_all(input: &[u8]) -> Vec<String> {
        let mut framer = LineFramer::default();
        let mut out = Vec::new();
        let mut rest = input;
        loop {
            match framer.next(rest) {
                Framed::Line { line, consumed } => {
                    out.push(String::from_utf8_lossy(line).trim_end().to_owned());
                    rest = &rest[consumed..];
                }
                Framed::Refused { reply, consumed } => {
                    out.push(reply.to_string());
                    rest = &rest[consumed..];
                }
                Framed::Skipped { consumed } => rest = &rest[consumed..],
                Framed::NeedMore => return out,
            }
        }
    }

    #[test]
    fn lines_end_with_crlf_and_hold_no_cr_or_nul() {
        assert_eq!(
            frame_all(b"NOOP\r\nEHLO a\rX: y\r\nNOOP\nRSET\x00\r\nQUIT\r\nPART"),
            [
                "NOOP",
                "501 5.5.2 Syntax error: CR or NUL inside a command",
                "500 5.5.2 Command lines must end with CRLF",
                "501 5.5.2 Syntax error: CR or NUL inside a command",
                "QUIT",
            ]
        );
    }

    #[test]
    fn auth_lines_may_carry_a_token_of_12288_octets_and_no_more() {
        let line = |len: usize| {
            let mut l = b"auth XOAUTH2 ".to_vec();
            l.extend(std::iter::repeat_n(b'A', len - l.len() - 2));
            l.extend_from_slice(b"\r\n");
            l
        };
        assert_eq!(frame_all(&line(3000)).len(), 1);
        assert!(frame_all(&line(3000))[0].starts_with("auth XOAUTH2 AAAA"));
        assert_eq!(frame_all(&line(MAX_AUTH_LINE)).len(), 1);
        let mut over = line(MAX_AUTH_LINE + 1);
        over.extend_from_slice(b"NOOP\r\n");
        assert_eq!(
            frame_all(&over),
            ["500 5.5.6 Authentication exchange line is too long", "NOOP"]
        );
        // A SASL response line has the same room; any other command keeps 512.
        let mut framer = LineFramer::default();
        let response = [vec![b'A'; 4000], b"\r\n".to_vec()].concat();
        assert!(matches!(
            framer.next_line(&response, true),
            Framed::Line { consumed: 4002, .. }
        ));
        assert!(matches!(
            framer.next(&response),
            Framed::Skipped { consumed: 512 }
        ));
    }

    #[test]
    fn a_line_over_512_octets_is_refused_once_and_the_next_line_works() {
        let mut input = b"NOOP ".to_vec();
        input.extend(std::iter::repeat_n(b'x', 506));
        input.extend_from_slice(b"\r\nNOOP\r\n");
        assert_eq!(frame_all(&input[..512]), Vec::<String>::new());
        assert_eq!(
            frame_all(&input),
            [
                "500 5.5.2 Command line too long (512 octets at most)",
                "NOOP"
            ]
        );
        let mut exact = b"NOOP ".to_vec();
        exact.extend(std::iter::repeat_n(b'x', 505));
        exact.extend_from_slice(b"\r\n");
        assert_eq!(exact.len(), 512);
        assert_eq!(frame_all(&exact).len(), 1);
        assert!(frame_all(&exact)[0].starts_with("NOOP xxx"));
    }

    fn refusal(line: &[u8]) -> String {
        match parse(line) {
            Ok(r) => format!("ok {}", r.name()),
            Err(r) => format!("{}{}", r.reply, if r.close { " [close]" } else { "" }),
        }
    }

    #[test]
    fn parsing_names_the_reply_rfc_5321_gives() {
        assert_eq!(
            refusal(b"MAIL FROM:<a@example.com> SIZE=100 BODY=8BITMIME SMTPUTF8\r\n"),
            "ok MAIL"
        );
        assert_eq!(refusal(b"FOO bar\r\n"), "500 5.5.1 Command unrecognized");
        assert_eq!(
            refusal(b"GET / HTTP/1.1\r\n"),
            "554 5.5.0 This is an SMTP server, closing connection [close]"
        );
        assert_eq!(
            refusal(b"Host: relay.example\r\n"),
            "554 5.5.0 This is an SMTP server, closing connection [close]"
        );
        assert_eq!(
            refusal(b"MAIL FROM:<a@example.com> RET=FULL\r\n"),
            "555 5.5.4 Unsupported parameter (BODY=BINARYMIME, RET, REQUIRETLS, BY or CONPERM)"
        );
        assert_eq!(
            refusal(b"RCPT TO:<b@example.com> NOTIFY=NEVER\r\n"),
            "555 5.5.4 Unsupported parameter (NOTIFY, ORCPT or RRVS)"
        );
        assert!(refusal(b"MAIL FROM:<a@example.com> X-FOO=1\r\n").starts_with("555 5.5.4"));
        assert!(refusal(b"MAIL TO:<a@example.com>\r\n").starts_with("501 5.5.4 Syntax"));
    }
}
