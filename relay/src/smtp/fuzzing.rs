//! Fuzz harnesses: the properties the protocol pieces must keep on any input. Used by the
//! cargo-fuzz targets in `relay/fuzz/` and by a short deterministic run in the test suite.
//! Each function panics when a property is broken.

use super::command::{Framed, LineFramer, parse};
use super::data::{BdatChecker, DataReceiver, DataStatus, dot_stuff};
use super::session::{AuthOutcome, Event, ListenerKind, Session, SessionConfig, TlsInfo};
use crate::reply::Reply;
use std::sync::Arc;

/// Published SMTP smuggling end-of-data variants (bare LF, bare CR, and their mixes with dots
/// and NUL). Each must be refused wherever it appears in DATA content.
pub const SMUGGLING_VARIANTS: &[&[u8]] = &[
    b"\n.\n",
    b"\n.\r\n",
    b"\r\n.\n",
    b"\r.\r",
    b"\r\n.\r",
    b"\r.\r\n",
    b"\n.\r",
    b"\r.\n",
    b"\r\n.\r\r\n",
    b"\r\n\x00.\r\n",
    b"\r\n.\x00\r\n",
    b"\r\n\x00.\r\n.\n",
    b"\r\n.\x00\n",
    b"\n\x00.\r\n",
    b"\r\x00.\r\n",
    b"\n..\n",
    b"\r\n.\r \r\n",
    b"\r\n\r.\r\n",
    b"\n\n.\r\n",
];

/// Splits `data` into pieces whose sizes come from `seed`, so the same input is tried under
/// another segmentation.
fn segments(data: &[u8], seed: u8) -> Vec<&[u8]> {
    let mut pieces = Vec::new();
    let mut rest = data;
    let mut state = u32::from(seed) | 1;
    while !rest.is_empty() {
        state ^= state << 13;
        state ^= state >> 17;
        state ^= state << 5;
        let size = 1 + (state as usize % 17);
        let (head, tail) = rest.split_at(size.min(rest.len()));
        pieces.push(head);
        rest = tail;
    }
    pieces
}

/// Command framing and parsing: never panics, always progresses, never yields a line with a
/// CR, NUL or bare LF inside, or longer than 512 octets.
pub fn command_line(data: &[u8]) {
    let mut framer = LineFramer::default();
    let mut rest = data;
    loop {
        match framer.next(rest) {
            Framed::NeedMore => break,
            Framed::Skipped { consumed } | Framed::Refused { consumed, .. } => {
                assert!(consumed > 0 && consumed <= rest.len(), "no progress");
                rest = &rest[consumed..];
            }
            Framed::Line { line, consumed } => {
                assert!(consumed > 0 && consumed <= rest.len());
                assert!(line.len() <= super::command::MAX_COMMAND_LINE);
                assert!(line.ends_with(b"\r\n"));
                let inner = &line[..line.len() - 2];
                assert!(!inner.iter().any(|b| *b == b'\r' || *b == b'\n' || *b == 0));
                let _ = parse(line);
                rest = &rest[consumed..];
            }
        }
    }
}

fn receive_all(pieces: &[&[u8]]) -> (DataStatus, usize, Vec<u8>) {
    let mut rx = DataReceiver::new(1 << 20);
    let mut out = Vec::new();
    let mut consumed = 0;
    for piece in pieces {
        let (n, status) = rx.feed(piece, &mut out);
        assert!(n <= piece.len());
        consumed += n;
        if status != DataStatus::NeedMore {
            return (status, consumed, out);
        }
        assert_eq!(n, piece.len());
    }
    (DataStatus::NeedMore, consumed, out)
}

/// The DATA receiver: the outcome does not depend on segmentation; content it keeps has CRLF
/// line endings only; content written by the dot-stuffer reads back identically.
pub fn data_receiver(data: &[u8]) {
    let Some((&seed, data)) = data.split_first() else {
        return;
    };
    let whole = receive_all(&[data]);
    let split = receive_all(&segments(data, seed));
    assert_eq!(whole, split, "segmentation changed the outcome");
    let (status, _, content) = whole;
    if status != DataStatus::BareLineEnding {
        for (i, b) in content.iter().enumerate() {
            if *b == b'\n' {
                assert!(i > 0 && content[i - 1] == b'\r', "bare LF kept");
            }
            if *b == b'\r' {
                assert_eq!(content.get(i + 1), Some(&b'\n'), "bare CR kept");
            }
        }
    }
    if status == DataStatus::Complete {
        let mut wire = Vec::new();
        dot_stuff(&content, &mut wire);
        let (again, consumed, back) = receive_all(&[&wire]);
        assert_eq!((again, consumed), (DataStatus::Complete, wire.len()));
        assert_eq!(back, content, "dot-stuffing round trip changed the content");
    }
    // BDAT: the same verdict in one chunk and in many.
    let mut one = BdatChecker::default();
    let one_ok = one.check(data) && one.finish();
    let mut many = BdatChecker::default();
    let many_ok = segments(data, seed).iter().all(|p| many.check(p)) && many.finish();
    assert_eq!(one_ok, many_ok, "BDAT verdict depends on chunking");
}

/// The whole session under arbitrary input and segmentation: never panics, consumes only what
/// it was given, says nothing after closing, and hands over only messages free of bare line
/// endings that start with exactly one Received: header.
pub fn session(data: &[u8]) {
    let Some((&seed, data)) = data.split_first() else {
        return;
    };
    let mut config = SessionConfig::new("relay.fuzz");
    config.tls_available = true;
    config.auth_available = true;
    config.bearer_available = true;
    config.max_message_size = 4096;
    config.max_recipients = 5;
    config.check_recipients = seed % 4 < 2;
    config.now = || std::time::UNIX_EPOCH;
    let mut session = Session::new(
        Arc::new(config),
        "f",
        std::net::SocketAddr::from(([192, 0, 2, 1], 25)),
        ListenerKind::Smtp,
        None,
    );
    let mut pending: Vec<u8> = Vec::new();
    let mut closed = false;
    for piece in segments(data, seed) {
        pending.extend_from_slice(piece);
        loop {
            let mut events = Vec::new();
            let consumed = session.receive(&pending, &mut events);
            assert!(consumed <= pending.len());
            pending.drain(..consumed);
            let mut resumed = false;
            let mut queue: std::collections::VecDeque<Event> = events.into();
            while let Some(event) = queue.pop_front() {
                assert!(!closed, "event after close: {event:?}");
                let mut more = Vec::new();
                match event {
                    Event::Close => closed = true,
                    Event::Reply(_) | Event::RecipientRefused(_) => {}
                    Event::StartTls => {
                        pending.clear();
                        session.tls_started(TlsInfo {
                            version: "TLSv1.3".into(),
                            cipher: "X".into(),
                        });
                        resumed = true;
                    }
                    Event::Authenticate { username, .. } => {
                        let outcome = if seed % 2 == 0 {
                            AuthOutcome::Accepted
                        } else {
                            AuthOutcome::Refused
                        };
                        session.auth_result(&username, outcome, &mut more);
                        resumed = true;
                    }
                    Event::CheckRecipient(q) => {
                        assert!(!q.recipient.is_empty());
                        let verdict = if q.accepted % 3 == 2 {
                            Err(crate::interfaces::Refusal::new(
                                crate::interfaces::RefusalReason::Quota,
                                Reply::new(450, "4.2.1", "limit"),
                            ))
                        } else {
                            Ok(crate::interfaces::Admitted {
                                tenant: None,
                                route: crate::routing::RecipientRoute::plain(
                                    "fuzz",
                                    crate::routing::Direction::Inbound,
                                    crate::routing::Target::Route(std::sync::Arc::from("sink")),
                                    &q.recipient,
                                ),
                                rewrite_sender: None,
                                authorised: false,
                            })
                        };
                        session.recipient_checked(verdict, &mut more);
                        resumed = true;
                    }
                    Event::Message(t) => {
                        let message = &t.content[t.received_len..];
                        assert!(t.content.starts_with(b"Received: "));
                        let mut checker = BdatChecker::default();
                        assert!(
                            checker.check(message) && checker.finish(),
                            "bare line ending delivered"
                        );
                        assert!(!t.recipients.is_empty());
                        session.delivered(Reply::message_accepted(&t.id), &mut more);
                        resumed = true;
                    }
                }
                queue.extend(more);
            }
            if closed || !resumed || pending.is_empty() {
                break;
            }
        }
        if closed {
            return;
        }
    }
}
