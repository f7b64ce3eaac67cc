//! The loop marker a copy carries (SPEC 6.3), which a client cannot forge.
//!
//! A relay adds `X-Mailroute-Loop: <hostname>; mac=<hex>` to every copy it makes; a message
//! that arrives with a marker that verifies gets no further copies, so two relays copying to
//! each other stop after one hop. The MAC is HMAC-SHA256 under a per-installation key (from
//! `--loop-key-file`, or the credentials' `loopKey`) over the relay's name, the Message-ID and
//! the SHA-256 of the body: what stays the same while relays prepend headers. A marker that
//! does not verify (written by a client to opt out of the journal copy, or by a relay with
//! another key) is ignored and counted, and the copies are made.

use ring::hmac;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// The header's name.
pub const HEADER: &str = "X-Mailroute-Loop";

/// Octets of the MAC kept in the header (128 bits).
const MAC_LEN: usize = 16;

/// The key the markers are made and checked with.
pub struct LoopKey(hmac::Key);

impl std::fmt::Debug for LoopKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // NB: never print key material.
        f.write_str("LoopKey(..)")
    }
}

/// What a message's header section says about loops.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Marker {
    /// No marker: an original message.
    Absent,
    /// A marker made with this installation's key for this message: it is a copy.
    Valid,
    /// One or more markers, none of which verifies: ignored.
    Forged,
}

impl LoopKey {
    /// A key from secret material (a file's content or the credentials' `loopKey`); leading
    /// and trailing white space is not part of it.
    pub fn new(secret: &[u8]) -> Self {
        Self(hmac::Key::new(hmac::HMAC_SHA256, secret.trim_ascii()))
    }

    /// A key of 32 random octets: markers then verify only within this process.
    pub fn random() -> Self {
        let rng = ring::rand::SystemRandom::new();
        match hmac::Key::generate(hmac::HMAC_SHA256, &rng) {
            Ok(key) => Self(key),
            // NB: the system's random source failing is not recoverable; a key from the time
            // still cannot be guessed by a client before it sends.
            Err(_) => Self::new(format!("{:?}", std::time::SystemTime::now()).as_bytes()),
        }
    }

    /// The header line (with CRLF) for a copy of `message` made by `hostname`.
    pub fn header(&self, hostname: &str, message: &[u8]) -> String {
        let mac = self.mac(hostname, message);
        format!("{HEADER}: {hostname}; mac={}\r\n", hex(&mac))
    }

    /// Whether `message` (as the client sent it) carries a valid marker.
    pub fn check(&self, message: &[u8]) -> Marker {
        let mut found = false;
        for value in header_values(message, HEADER) {
            found = true;
            let Some((host, mac)) = parse(value) else {
                continue;
            };
            // NB: the tag is truncated (RFC 2104 section 5), so it is compared here, in
            // constant time, rather than with `hmac::verify`, which wants all 32 octets.
            if bool::from(self.mac(host, message).ct_eq(&mac)) {
                return Marker::Valid;
            }
        }
        if found {
            Marker::Forged
        } else {
            Marker::Absent
        }
    }

    fn mac(&self, hostname: &str, message: &[u8]) -> Vec<u8> {
        let tag = hmac::sign(&self.0, &input(hostname, message));
        tag.as_ref()[..MAC_LEN].to_vec()
    }
}

/// What the MAC covers: the relay's name, the Message-ID, the body's SHA-256.
fn input(hostname: &str, message: &[u8]) -> Vec<u8> {
    let body = memchr::memmem::find(message, b"\r\n\r\n").map_or(&[][..], |at| &message[at + 4..]);
    let mut hash = Sha256::new();
    hash.update(
        header_values(message, "Message-ID")
            .next()
            .unwrap_or_default(),
    );
    hash.update([0]);
    hash.update(body);
    let mut out = Vec::with_capacity(hostname.len() + 33);
    out.extend_from_slice(b"mailroute-loop-v1\0");
    out.extend_from_slice(hostname.as_bytes());
    out.push(0);
    out.extend_from_slice(&hash.finalize());
    out
}

/// `host; mac=<hex>` into the host and the MAC's octets. Only the full MAC length verifies: a
/// truncated one would lower the forger's odds.
fn parse(value: &[u8]) -> Option<(&str, Vec<u8>)> {
    let value = std::str::from_utf8(value).ok()?;
    let (host, rest) = value.split_once(';')?;
    let mac = rest.trim().strip_prefix("mac=")?;
    if mac.len() != MAC_LEN * 2 {
        return None;
    }
    let bytes = (0..MAC_LEN)
        .map(|i| u8::from_str_radix(mac.get(2 * i..2 * i + 2)?, 16).ok())
        .collect::<Option<Vec<u8>>>()?;
    Some((host.trim(), bytes))
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

/// The trimmed values of every `name:` field in the header section (unfolded lines only: the
/// relay writes its markers on one line).
fn header_values<'a>(message: &'a [u8], name: &'a str) -> impl Iterator<Item = &'a [u8]> + 'a {
    let mut rest = message;
    std::iter::from_fn(move || {
        while !rest.is_empty() && !rest.starts_with(b"\r\n") {
            let end = memchr::memmem::find(rest, b"\r\n").map_or(rest.len(), |i| i + 2);
            let line = &rest[..end];
            rest = &rest[end..];
            if line.len() > name.len()
                && line[name.len()] == b':'
                && line[..name.len()].eq_ignore_ascii_case(name.as_bytes())
            {
                return Some(line[name.len() + 1..].trim_ascii());
            }
        }
        None
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MESSAGE: &[u8] = b"Message-ID: <1@x>\r\nSubject: a\r\n\r\nbody\r\n";

    #[test]
    fn a_relay_s_marker_verifies_after_headers_are_prepended() {
        let key = LoopKey::new(b"installation secret\n");
        assert_eq!(key.check(MESSAGE), Marker::Absent);
        let header = key.header("relay-a.example", MESSAGE);
        // What the next relay sees: its own view of the content starts with the copy's
        // marker, the first relay's Received: header and the original message.
        let mut copy = header.into_bytes();
        copy.extend_from_slice(b"Received: from a by relay-a; Wed, 2 Dec 2026\r\n");
        copy.extend_from_slice(MESSAGE);
        assert_eq!(key.check(&copy), Marker::Valid);
        // Another installation's key: not ours, so not trusted.
        assert_eq!(LoopKey::new(b"other").check(&copy), Marker::Forged);
    }

    #[test]
    fn a_client_written_marker_is_forged() {
        let key = LoopKey::new(b"k");
        let mut forged = b"X-Mailroute-Loop: relay-a.example\r\n".to_vec();
        forged.extend_from_slice(MESSAGE);
        assert_eq!(key.check(&forged), Marker::Forged);
        // A marker copied from another message does not carry over.
        let other = b"Message-ID: <2@x>\r\nSubject: a\r\n\r\nbody\r\n";
        let mut replayed = key.header("relay-a.example", other).into_bytes();
        replayed.extend_from_slice(MESSAGE);
        assert_eq!(key.check(&replayed), Marker::Forged);
        // The body changed: the marker no longer fits it.
        let mut edited = key.header("relay-a.example", MESSAGE).into_bytes();
        edited.extend_from_slice(b"Message-ID: <1@x>\r\nSubject: a\r\n\r\nbody!\r\n");
        assert_eq!(key.check(&edited), Marker::Forged);
        // A marker in the body is not a header.
        assert_eq!(
            key.check(b"Subject: a\r\n\r\nX-Mailroute-Loop: r; mac=00\r\n"),
            Marker::Absent
        );
    }
}
