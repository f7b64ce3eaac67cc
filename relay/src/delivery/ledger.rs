//! The delivery ledger (SPEC 6.6): which (message, target, recipient) deliveries succeeded, so
//! a client's retry after a `451` re-sends only what failed.
//!
//! The fingerprint comes from the message, never from the session: its Message-ID and a hash
//! of its content as the client sent it (the relay's own `Received:` header excluded, as it
//! differs per attempt). Entries live for 5 days, longer than any client keeps retrying, in a
//! [`Ledger`] of the shared store (`crate::store`).

pub use crate::store::{IN_FLIGHT_FOR, Key, Ledger, MESSAGE_TAG, RETENTION, Recorded};
use sha2::{Digest, Sha256};

/// The message fingerprint: Message-ID (case kept, as it is compared byte for byte) and the
/// SHA-256 of the content after the relay's `Received:` header.
pub fn fingerprint(content: &[u8]) -> [u8; 32] {
    let mut hash = Sha256::new();
    hash.update(message_id(content).unwrap_or_default());
    hash.update([0]);
    hash.update(content);
    hash.finalize().into()
}

/// The key of one delivery: the message's first [`MESSAGE_TAG`] octets of the fingerprint,
/// then 12 of a hash of (fingerprint, target, recipient). Every key of one message shares its
/// first octets, so a Redis Cluster keeps them in one slot (`store::redis`).
pub fn key(fingerprint: &[u8; 32], target: &str, recipient: &str) -> Key {
    let mut hash = Sha256::new();
    hash.update(fingerprint);
    hash.update(target.as_bytes());
    hash.update([0]);
    hash.update(recipient.to_ascii_lowercase().as_bytes());
    let digest = hash.finalize();
    let mut key = [0u8; 16];
    key[..MESSAGE_TAG].copy_from_slice(&fingerprint[..MESSAGE_TAG]);
    key[MESSAGE_TAG..].copy_from_slice(&digest[..16 - MESSAGE_TAG]);
    key
}

/// The value of the first `Message-ID:` header in the header section, unfolded and trimmed.
fn message_id(content: &[u8]) -> Option<&[u8]> {
    let mut rest = content;
    while !rest.is_empty() && !rest.starts_with(b"\r\n") {
        let end = memchr::memmem::find(rest, b"\r\n").map_or(rest.len(), |i| i + 2);
        let line = &rest[..end];
        if line.len() > 11 && line[..11].eq_ignore_ascii_case(b"message-id:") {
            return Some(line[11..].trim_ascii());
        }
        rest = &rest[end..];
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprint_ignores_nothing_but_tells_messages_apart() {
        let a = b"Message-ID: <1@x>\r\nSubject: a\r\n\r\nbody\r\n";
        let b = b"Message-ID: <2@x>\r\nSubject: a\r\n\r\nbody\r\n";
        let c = b"Message-ID: <1@x>\r\nSubject: a\r\n\r\nbody!\r\n";
        assert_eq!(message_id(a), Some(&b"<1@x>"[..]));
        assert_eq!(
            message_id(b"Subject: a\r\n\r\nMessage-ID: <in body>\r\n"),
            None
        );
        assert_eq!(fingerprint(a), fingerprint(a));
        assert_ne!(fingerprint(a), fingerprint(b));
        assert_ne!(fingerprint(a), fingerprint(c));
        let f = fingerprint(a);
        assert_eq!(key(&f, "mailbox", "A@x"), key(&f, "mailbox", "a@X"));
        assert_ne!(key(&f, "mailbox", "a@x"), key(&f, "archive", "a@x"));
        // One message's keys share their tag.
        assert_eq!(
            key(&f, "mailbox", "a@x")[..MESSAGE_TAG],
            key(&f, "archive", "b@x")[..MESSAGE_TAG]
        );
    }
}
