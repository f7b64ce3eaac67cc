//! The SMTP session as a client meets it, without sockets: each step sends bytes and names the
//! replies expected (code and enhanced code).

use mailroute_relay::interfaces::{Admitted, Refusal, RefusalReason, Transaction};
use mailroute_relay::routing::{Direction, RecipientRoute, Target};
use mailroute_relay::smtp::sasl::Secret;
use mailroute_relay::smtp::session::{
    AuthOutcome, Event, ListenerKind, Session, SessionConfig, TlsInfo,
};
use std::sync::Arc;

struct Dialogue {
    session: Session,
    closed: bool,
    delivered: Vec<Transaction>,
    tls_handshakes: usize,
    /// Recipients handed to the checks with I/O, and how many were accepted before each.
    checked: Vec<(String, usize)>,
}

impl Dialogue {
    fn with(config: SessionConfig) -> Self {
        let mut config = config;
        config.now = || std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_700_000_000);
        let session = Session::new(
            Arc::new(config),
            "s1",
            "192.0.2.10:40000".parse().unwrap_or_else(|e| panic!("{e}")),
            ListenerKind::Submission,
            None,
        );
        Self {
            session,
            closed: false,
            delivered: Vec::new(),
            tls_handshakes: 0,
            checked: Vec::new(),
        }
    }

    fn new() -> Self {
        let mut config = SessionConfig::new("relay.example");
        config.tls_available = true;
        config.auth_available = true;
        Self::with(config)
    }

    /// Sends bytes as one write; returns every reply line (code and the next word) produced.
    fn send(&mut self, bytes: &[u8]) -> Vec<String> {
        assert!(!self.closed, "session already closed");
        let mut replies = Vec::new();
        let mut input = bytes.to_vec();
        loop {
            let mut events = Vec::new();
            let consumed = self.session.receive(&input, &mut events);
            input.drain(..consumed);
            let mut progressed = false;
            let mut queue: std::collections::VecDeque<Event> = events.into();
            while let Some(event) = queue.pop_front() {
                let mut more = Vec::new();
                match event {
                    Event::Reply(r) => replies.push(r.to_string()),
                    Event::StartTls => {
                        self.tls_handshakes += 1;
                        input.clear();
                        self.session.tls_started(TlsInfo {
                            version: "TLSv1.3".into(),
                            cipher: "TLS13_AES_256_GCM_SHA384".into(),
                        });
                        progressed = true;
                    }
                    Event::Authenticate { username, secret } => {
                        // A password for "app", or the token "good-token" of a service account.
                        let (outcome, identity) = match secret {
                            Secret::Password(p) if username == "app" && p == "secret" => {
                                (AuthOutcome::Accepted, username)
                            }
                            Secret::Bearer(t) if t == "good-token" => (
                                AuthOutcome::Accepted,
                                "system:serviceaccount:mail:app".to_owned(),
                            ),
                            _ => (AuthOutcome::Refused, username),
                        };
                        self.session.auth_result(&identity, outcome, &mut more);
                        progressed = true;
                    }
                    Event::Message(t) => {
                        let reply = mailroute_relay::reply::Reply::message_accepted(&t.id);
                        self.delivered.push(t);
                        self.session.delivered(reply, &mut more);
                        progressed = true;
                    }
                    Event::CheckRecipient(q) => {
                        // The checks with I/O, played by the test: `full...` is over a quota.
                        let verdict = if q.recipient.starts_with("full") {
                            Err(Refusal::new(
                                RefusalReason::Quota,
                                mailroute_relay::reply::Reply::new(
                                    450,
                                    "4.2.1",
                                    "Peak SMTP relay limit exceeded for customer",
                                ),
                            ))
                        } else {
                            Ok(Admitted {
                                tenant: None,
                                route: RecipientRoute::plain(
                                    "t",
                                    Direction::Inbound,
                                    Target::Route("sink".into()),
                                    &q.recipient,
                                ),
                                rewrite_sender: None,
                                authorised: false,
                            })
                        };
                        self.checked.push((q.recipient, q.accepted));
                        self.session.recipient_checked(verdict, &mut more);
                        progressed = true;
                    }
                    Event::RecipientRefused(_) => {}
                    Event::Close => self.closed = true,
                }
                queue.extend(more);
            }
            if !progressed || input.is_empty() || self.closed {
                return replies;
            }
        }
    }

    /// Sends and checks the replies' starts.
    fn says(&mut self, bytes: &str, expected: &[&str]) {
        let replies = self.send(bytes.as_bytes());
        assert_eq!(
            replies.len(),
            expected.len(),
            "after {bytes:?}: {replies:#?}"
        );
        for (reply, expected) in replies.iter().zip(expected) {
            assert!(
                reply.starts_with(expected),
                "after {bytes:?}: got {reply:?}, want {expected:?}"
            );
        }
    }

    fn ehlo(&mut self) -> String {
        self.send(b"EHLO client.example\r\n").join("\n")
    }
}

#[test]
fn ehlo_offers_starttls_before_tls_and_auth_only_after() {
    let mut d = Dialogue::new();
    let before = d.ehlo();
    for ext in [
        "PIPELINING",
        "SIZE 36700160",
        "8BITMIME",
        "SMTPUTF8",
        "ENHANCEDSTATUSCODES",
        "CHUNKING",
        "STARTTLS",
    ] {
        assert!(before.contains(ext), "{ext} missing in {before}");
    }
    assert!(!before.contains("AUTH"), "{before}");
    d.says("STARTTLS\r\n", &["220 2.0.0"]);
    let after = d.ehlo();
    assert!(
        after.contains("AUTH PLAIN LOGIN") && !after.contains("STARTTLS"),
        "{after}"
    );
}

#[test]
fn auth_in_clear_is_refused_with_538_before_any_credential_is_read() {
    let mut d = Dialogue::new();
    d.ehlo();
    d.says("AUTH PLAIN AGFwcABzZWNyZXQ=\r\n", &["538 5.7.11"]);
    d.says("AUTH LOGIN\r\n", &["538 5.7.11"]);
}

#[test]
fn commands_pipelined_after_starttls_are_discarded_not_run_inside_tls() {
    let mut d = Dialogue::new();
    d.ehlo();
    let replies =
        d.send(b"STARTTLS\r\nMAIL FROM:<evil@example.com>\r\nRCPT TO:<victim@example.com>\r\n");
    assert_eq!(replies, ["220 2.0.0 Ready to start TLS"]);
    assert_eq!(d.tls_handshakes, 1);
    // Inside TLS the session starts over: had the injected MAIL run, this would be 503 nested.
    d.says("MAIL FROM:<a@example.com>\r\n", &["503 5.5.1"]);
    d.ehlo();
    d.says("MAIL FROM:<a@example.com>\r\n", &["250 2.1.0"]);
    d.says("STARTTLS\r\n", &["503 5.5.1"]);
}

#[test]
fn auth_plain_and_login_succeed_after_tls_and_failures_count() {
    let mut d = Dialogue::new();
    d.ehlo();
    d.says("STARTTLS\r\n", &["220"]);
    d.ehlo();
    // "\0app\0wrong"
    d.says("AUTH PLAIN AGFwcAB3cm9uZw==\r\n", &["535 5.7.8"]);
    // authzid "root" acting as "app" is refused outright.
    d.says("AUTH PLAIN cm9vdABhcHAAc2VjcmV0\r\n", &["501 5.5.2"]);
    d.says("AUTH LOGIN\r\n", &["334 VXNlcm5hbWU6"]);
    d.says("YXBw\r\n", &["334 UGFzc3dvcmQ6"]);
    d.says("c2VjcmV0\r\n", &["235 2.7.0"]);
    assert_eq!(d.session.authenticated(), Some("app"));
    d.says("AUTH PLAIN AGFwcABzZWNyZXQ=\r\n", &["503 5.5.1"]);
}

fn bearer(mechanism_oauthbearer: bool, token: &str) -> String {
    use base64::Engine;
    let text = if mechanism_oauthbearer {
        format!("n,a=app@example.com,\x01auth=Bearer {token}\x01\x01")
    } else {
        format!("user=app@example.com\x01auth=Bearer {token}\x01\x01")
    };
    base64::engine::general_purpose::STANDARD.encode(text)
}

#[test]
fn a_service_account_token_authenticates_by_oauthbearer_or_xoauth2_inside_tls_only() {
    let mut config = SessionConfig::new("relay.example");
    config.tls_available = true;
    config.auth_available = true;
    config.bearer_available = true;
    let mut d = Dialogue::with(config);
    d.ehlo();
    // In clear: refused before the token is read.
    let good = bearer(true, "good-token");
    d.says(&format!("AUTH OAUTHBEARER {good}\r\n"), &["538 5.7.11"]);
    d.says("STARTTLS\r\n", &["220"]);
    let after = d.ehlo();
    assert!(
        after.contains("AUTH PLAIN LOGIN OAUTHBEARER XOAUTH2"),
        "{after}"
    );
    // A refused token: the error challenge (RFC 7628), the client's dummy answer, then 535.
    let bad = bearer(true, "forged");
    d.says(
        &format!("AUTH OAUTHBEARER {bad}\r\n"),
        &["334 eyJzdGF0dXMiOiJpbnZhbGlkX3Rva2VuIiwic2NoZW1lcyI6ImJlYXJlciJ9"],
    );
    d.says("AQ==\r\n", &["535 5.7.8"]);
    let bad = bearer(false, "forged");
    d.says(&format!("AUTH XOAUTH2 {bad}\r\n"), &["334"]);
    d.says("\r\n", &["535 5.7.8"]);
    // The token's identity, not the name in the SASL message, is the session's.
    let good = bearer(false, "good-token");
    d.says("AUTH XOAUTH2\r\n", &["334"]);
    d.says(&format!("{good}\r\n"), &["235 2.7.0"]);
    assert_eq!(
        d.session.authenticated(),
        Some("system:serviceaccount:mail:app")
    );
}

#[test]
fn token_mechanisms_are_not_offered_or_taken_without_service_accounts() {
    let mut d = Dialogue::new();
    d.ehlo();
    d.says("STARTTLS\r\n", &["220"]);
    let after = d.ehlo();
    assert!(
        !after.contains("OAUTHBEARER") && !after.contains("XOAUTH2"),
        "{after}"
    );
    let good = bearer(true, "good-token");
    d.says(&format!("AUTH OAUTHBEARER {good}\r\n"), &["504 5.5.4"]);
    assert_eq!(d.session.authenticated(), None);
}

#[test]
fn auth_plain_with_a_challenge_and_a_cancel() {
    let mut d = Dialogue::new();
    d.ehlo();
    d.says("STARTTLS\r\n", &["220"]);
    d.ehlo();
    d.says("AUTH PLAIN\r\n", &["334"]);
    d.says("*\r\n", &["501 5.7.0"]);
    d.says("AUTH PLAIN\r\n", &["334"]);
    d.says("AGFwcABzZWNyZXQ=\r\n", &["235 2.7.0"]);
}

#[test]
fn bad_sequences_get_the_rfc_5321_replies() {
    let mut d = Dialogue::new();
    d.says("MAIL FROM:<a@example.com>\r\n", &["503 5.5.1"]);
    d.ehlo();
    d.says("RCPT TO:<b@example.com>\r\n", &["503 5.5.1"]);
    d.says("DATA\r\n", &["503 5.5.1"]);
    d.says("MAIL FROM:<a@example.com>\r\n", &["250 2.1.0"]);
    d.says("MAIL FROM:<a@example.com>\r\n", &["503 5.5.1"]);
    d.says("DATA\r\n", &["554 5.5.1"]);
    d.says("RCPT TO:<>\r\n", &["501 5.1.3"]);
    d.says("VRFY postmaster\r\n", &["252 2.5.0"]);
    d.says("EXPN staff\r\n", &["252 2.5.0"]);
    d.says("FOO\r\n", &["500 5.5.1"]);
    d.says("RCPT TO:<b@example.com> NOTIFY=NEVER\r\n", &["555 5.5.4"]);
    d.says("RSET\r\n", &["250 2.0.0"]);
    d.says("QUIT\r\n", &["221 2.0.0"]);
    assert!(d.closed);
}

#[test]
fn http_requests_end_the_session() {
    let mut d = Dialogue::new();
    d.says(
        "GET / HTTP/1.1\r\nHost: relay.example\r\n\r\n",
        &["554 5.5.0"],
    );
    assert!(d.closed);
}

#[test]
fn the_null_sender_gets_one_recipient_per_transaction() {
    let mut d = Dialogue::new();
    d.ehlo();
    d.says(
        "MAIL FROM:<>\r\nRCPT TO:<a@example.com>\r\nRCPT TO:<b@example.com>\r\n",
        &["250 2.1.0", "250 2.1.5", "452 4.5.3"],
    );
}

#[test]
fn pipelined_recipients_are_checked_one_by_one_and_refusals_do_not_end_the_session() {
    let mut config = SessionConfig::new("relay.example");
    config.check_recipients = true;
    let mut d = Dialogue::with(config);
    d.ehlo();
    let mut batch = String::from("MAIL FROM:<a@example.com>\r\nRCPT TO:<ok1@example.com>\r\n");
    for i in 0..12 {
        batch.push_str(&format!("RCPT TO:<full{i}@example.com>\r\n"));
    }
    batch.push_str("RCPT TO:<ok2@example.com>\r\nRCPT TO:<>\r\n");
    let mut expected = vec!["250 2.1.0", "250 2.1.5"];
    expected.extend(std::iter::repeat_n("450 4.2.1", 12));
    expected.extend(["250 2.1.5", "501"]);
    d.says(&batch, &expected);
    // An empty address is refused by the session itself, never handed over.
    assert_eq!(d.checked.len(), 14);
    assert_eq!(d.checked[0], ("ok1@example.com".to_owned(), 0));
    assert_eq!(d.checked[13], ("ok2@example.com".to_owned(), 1));
    d.says("DATA\r\n", &["354"]);
    d.says("Subject: x\r\n\r\nhi\r\n.\r\n", &["250 2.0.0"]);
    assert_eq!(
        d.delivered[0].addresses().collect::<Vec<_>>(),
        ["ok1@example.com", "ok2@example.com"]
    );
}

#[test]
fn recipients_beyond_the_limit_get_452() {
    let mut config = SessionConfig::new("relay.example");
    config.max_recipients = 100;
    let mut d = Dialogue::with(config);
    d.ehlo();
    d.says("MAIL FROM:<a@example.com>\r\n", &["250"]);
    let mut batch = String::new();
    for i in 0..101 {
        batch.push_str(&format!("RCPT TO:<r{i}@example.com>\r\n"));
    }
    let replies = d.send(batch.as_bytes());
    assert_eq!(replies.len(), 101);
    assert!(replies[..100].iter().all(|r| r.starts_with("250 2.1.5")));
    assert!(replies[100].starts_with("452 4.5.3"), "{}", replies[100]);
}

#[test]
fn declared_and_undeclared_oversize_are_refused_with_552_and_the_session_goes_on() {
    let mut config = SessionConfig::new("relay.example");
    config.max_message_size = 100;
    let mut d = Dialogue::with(config);
    d.ehlo();
    d.says("MAIL FROM:<a@example.com> SIZE=101\r\n", &["552 5.3.4"]);
    d.says("MAIL FROM:<a@example.com> SIZE=50\r\n", &["250"]);
    d.says("RCPT TO:<b@example.com>\r\n", &["250"]);
    d.says("DATA\r\n", &["354"]);
    let big = format!("Subject: big\r\n\r\n{}\r\n.\r\n", "x".repeat(200));
    d.says(&big, &["552 5.3.4"]);
    assert!(d.delivered.is_empty());
    d.says("NOOP\r\n", &["250 2.0.0"]);
}

#[test]
fn a_message_passes_byte_for_byte_after_one_received_header() {
    let mut d = Dialogue::new();
    d.ehlo();
    let body = "..leading dot\r\nSubject: caf\u{e9}\r\n\r\n\u{e9}t\u{e9}\r\n..\r\n.x\r\n";
    d.says("MAIL FROM:<a@example.com> BODY=8BITMIME\r\n", &["250"]);
    d.says("RCPT TO:<b@example.com>\r\n", &["250"]);
    d.says("DATA\r\n", &["354"]);
    d.says(
        &format!("{body}.\r\n"),
        &["250 2.0.0 OK queued-less as s1.1"],
    );
    let t = &d.delivered[0];
    let (received, message) = t.content.split_at(t.received_len);
    assert_eq!(
        message,
        "\u{2e}leading dot\r\nSubject: caf\u{e9}\r\n\r\n\u{e9}t\u{e9}\r\n.\r\nx\r\n".as_bytes()
    );
    let received = String::from_utf8_lossy(received);
    assert_eq!(
        received,
        "Received: from client.example ([192.0.2.10])\r\n\tby relay.example (Mailroute) with ESMTP id s1.1\r\n\tfor <b@example.com>;\r\n\tTue, 14 Nov 2023 22:13:20 +0000\r\n"
    );
    assert!(t.body_8bit);
}

#[test]
fn smuggling_in_data_is_refused_with_550_5_6_11_and_a_close() {
    let mut d = Dialogue::new();
    d.ehlo();
    d.says(
        "MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.com>\r\n",
        &["250", "250"],
    );
    d.says("DATA\r\n", &["354"]);
    d.says(
        "hello\n.\nMAIL FROM:<evil@example.com>\r\nRCPT TO:<victim@example.com>\r\nDATA\r\nsmuggled\r\n.\r\n",
        &["550 5.6.11"],
    );
    assert!(d.closed);
    assert!(d.delivered.is_empty());
}

#[test]
fn content_pipelined_after_data_closes_the_session() {
    let mut d = Dialogue::new();
    d.ehlo();
    d.says(
        "MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.com>\r\n",
        &["250", "250"],
    );
    d.says("DATA\r\nSubject: x\r\n\r\nbody\r\n.\r\n", &["554 5.5.0"]);
    assert!(d.closed && d.delivered.is_empty());
}

#[test]
fn ehlo_must_end_a_pipelined_group() {
    let mut d = Dialogue::new();
    d.says(
        "EHLO client.example\r\nMAIL FROM:<a@example.com>\r\n",
        &["554 5.5.0"],
    );
    assert!(d.closed);
}

#[test]
fn bdat_chunks_make_one_message_and_a_refused_bdat_never_runs_its_bytes() {
    let mut d = Dialogue::new();
    d.ehlo();
    d.says("BDAT 6\r\nQUIT\r\n", &["503 5.5.1"]);
    assert!(!d.closed, "the chunk's QUIT must not run");
    d.says(
        "MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.com>\r\n",
        &["250", "250"],
    );
    d.says("BDAT 13\r\nSubject: x\r\n\r", &["250 2.0.0"]);
    d.says("BDAT 8 LAST\r\n\n.body\r\n", &["250 2.0.0 OK"]);
    let t = &d.delivered[0];
    assert_eq!(&t.content[t.received_len..], b"Subject: x\r\n\r\n.body\r\n");
    d.says(
        "MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.com>\r\n",
        &["250", "250"],
    );
    d.says("BDAT 5 LAST\r\na\nb\r\n", &["550 5.6.11"]);
    assert!(d.closed);
}

#[test]
fn too_many_errors_close_the_session() {
    let mut d = Dialogue::new();
    let mut replies = Vec::new();
    for _ in 0..10 {
        replies.extend(d.send(b"BOGUS\r\n"));
    }
    assert_eq!(replies.len(), 11);
    assert!(replies[10].starts_with("421 4.7.0"), "{replies:?}");
    assert!(d.closed);
}

#[test]
fn a_mail_loop_is_refused() {
    let mut d = Dialogue::new();
    d.ehlo();
    d.says(
        "MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.com>\r\n",
        &["250", "250"],
    );
    d.says("DATA\r\n", &["354"]);
    let headers = "Received: from x by y; Tue, 14 Nov 2023 22:13:20 +0000\r\n".repeat(50);
    d.says(
        &format!("{headers}Subject: loop\r\n\r\nbody\r\n.\r\n"),
        &["554 5.4.6"],
    );
    assert!(d.delivered.is_empty());
}

#[test]
fn content_after_a_refused_data_never_runs_as_commands() {
    let mut d = Dialogue::new();
    d.ehlo();
    d.says("MAIL FROM:<a@example.com>\r\n", &["250"]);
    d.says("DATA\r\n", &["554 5.5.1"]);
    // The client sends its content anyway, in later segments, with commands inside.
    d.says("Subject: x\r\n\r\nMAIL FROM:<evil@example.com>\r\n", &[]);
    d.says("RCPT TO:<victim@example.com>\r\nDATA\r\nsmuggled\r\n", &[]);
    d.says(".\r\n", &["554 5.5.1"]);
    assert!(d.delivered.is_empty());
    // The session goes on as a session: a new transaction works.
    d.says("MAIL FROM:<a@example.com>\r\n", &["250"]);
    d.says("RCPT TO:<b@example.com>\r\n", &["250"]);
    d.says("DATA\r\n", &["354"]);
    d.says("Subject: y\r\n\r\nok\r\n.\r\n", &["250"]);
    assert_eq!(d.delivered.len(), 1);
    assert!(!d.delivered[0].content.windows(8).any(|w| w == b"smuggled"));
}

#[test]
fn a_client_that_obeys_a_refused_data_goes_on_with_its_next_command() {
    let mut d = Dialogue::new();
    d.ehlo();
    d.says("MAIL FROM:<a@example.com>\r\n", &["250"]);
    d.says("DATA\r\n", &["554 5.5.1"]);
    d.says("RSET\r\n", &["250"]);
    d.says("MAIL FROM:<a@example.com>\r\n", &["250"]);
    d.says("DATA\r\n", &["554 5.5.1"]);
    d.says("QUIT\r\n", &["221"]);
    assert!(d.closed);
}

#[test]
fn content_after_a_refused_data_that_never_ends_closes_the_session() {
    let mut config = SessionConfig::new("relay.example");
    config.max_message_size = 1000;
    let mut d = Dialogue::with(config);
    d.ehlo();
    d.says("MAIL FROM:<a@example.com>\r\n", &["250"]);
    d.says("DATA\r\n", &["554 5.5.1"]);
    let line = "x".repeat(98) + "\r\n";
    let mut replies = Vec::new();
    for _ in 0..20 {
        if d.closed {
            break;
        }
        replies.extend(d.send(line.as_bytes()));
    }
    assert!(d.closed, "{replies:?}");
    assert!(
        replies.last().is_some_and(|r| r.starts_with("554 5.5.0")),
        "{replies:?}"
    );
}

#[test]
fn a_mail_rset_loop_is_closed_at_the_command_limit() {
    let mut d = Dialogue::new();
    d.ehlo();
    let mut replies = Vec::new();
    for _ in 0..2000 {
        if d.closed {
            break;
        }
        replies.extend(d.send(b"MAIL FROM:<a@example.com>\r\nRSET\r\n"));
    }
    assert!(d.closed, "never closed");
    assert!(replies.len() < 1200, "{} replies", replies.len());
    assert!(
        replies.last().is_some_and(|r| r.starts_with("421 4.7.0")),
        "{:?}",
        replies.last()
    );
}

#[test]
fn recipients_over_the_limit_get_452_and_the_accepted_ones_are_delivered() {
    let mut d = Dialogue::new();
    d.ehlo();
    let mut batch = String::from("MAIL FROM:<a@example.com>\r\n");
    for i in 0..1010 {
        batch.push_str(&format!("RCPT TO:<r{i}@example.com>\r\n"));
    }
    batch.push_str("DATA\r\n");
    let replies = d.send(batch.as_bytes());
    assert_eq!(replies.len(), 1012);
    assert!(replies[1..1001].iter().all(|r| r.starts_with("250 2.1.5")));
    assert!(
        replies[1001..1011]
            .iter()
            .all(|r| r.starts_with("452 4.5.3"))
    );
    assert!(replies[1011].starts_with("354"), "{}", replies[1011]);
    d.says("Subject: many\r\n\r\nhi\r\n.\r\n", &["250"]);
    assert_eq!(d.delivered[0].recipients.len(), 1000);
    assert!(!d.closed);
}
