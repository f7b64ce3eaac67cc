//! The delivery ledger (SPEC 6.6): which (message, target, recipient) deliveries succeeded, so
//! a client's retry after a `451` re-sends only what failed.
//!
//! The fingerprint comes from the message, never from the session: its Message-ID and a hash
//! of its content as the client sent it (the relay's own `Received:` header excluded, as it
//! differs per attempt). Entries live for 5 days, longer than any client keeps retrying.

use super::BoxFuture;
use sha2::{Digest, Sha256};
use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long a successful delivery is remembered.
pub const RETENTION: Duration = Duration::from_secs(5 * 24 * 3600);

/// A ledger entry: a hash of (fingerprint, target, recipient).
pub type Key = [u8; 16];

/// Why the shared store could not answer.
#[derive(Debug, thiserror::Error)]
#[error("shared store unavailable: {0}")]
pub struct StoreError(pub String);

/// Where successful deliveries are recorded: memory for one relay, Redis across replicas.
pub trait Ledger: Send + Sync + 'static {
    /// Which of `keys` are recorded.
    fn contains<'a>(&'a self, keys: &'a [Key]) -> BoxFuture<'a, Result<Vec<bool>, StoreError>>;
    /// Records `keys` for [`RETENTION`].
    fn record<'a>(&'a self, keys: &'a [Key]) -> BoxFuture<'a, Result<(), StoreError>>;
}

/// The message fingerprint: Message-ID (case kept, as it is compared byte for byte) and the
/// SHA-256 of the content after the relay's `Received:` header.
pub fn fingerprint(content: &[u8]) -> [u8; 32] {
    let mut hash = Sha256::new();
    hash.update(message_id(content).unwrap_or_default());
    hash.update([0]);
    hash.update(content);
    hash.finalize().into()
}

/// The key of one delivery.
pub fn key(fingerprint: &[u8; 32], target: &str, recipient: &str) -> Key {
    let mut hash = Sha256::new();
    hash.update(fingerprint);
    hash.update(target.as_bytes());
    hash.update([0]);
    hash.update(recipient.to_ascii_lowercase().as_bytes());
    let digest = hash.finalize();
    let mut key = [0u8; 16];
    key.copy_from_slice(&digest[..16]);
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

/// The in-process ledger of a single relay, bounded: past `capacity` entries the oldest go
/// first (16 bytes of key plus bookkeeping, about 60 bytes each).
#[derive(Debug)]
pub struct MemoryLedger {
    inner: Mutex<MemoryInner>,
    capacity: usize,
    retention: Duration,
}

#[derive(Debug, Default)]
struct MemoryInner {
    entries: HashMap<Key, Instant>,
    order: VecDeque<(Instant, Key)>,
}

impl MemoryLedger {
    pub fn new(capacity: usize) -> Self {
        Self::with_retention(capacity, RETENTION)
    }

    pub fn with_retention(capacity: usize, retention: Duration) -> Self {
        Self {
            inner: Mutex::new(MemoryInner::default()),
            capacity: capacity.max(1),
            retention,
        }
    }

    pub fn len(&self) -> usize {
        self.inner.lock().map(|i| i.entries.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Ledger for MemoryLedger {
    fn contains<'a>(&'a self, keys: &'a [Key]) -> BoxFuture<'a, Result<Vec<bool>, StoreError>> {
        let now = Instant::now();
        let found = match self.inner.lock() {
            Ok(inner) => keys
                .iter()
                .map(|k| inner.entries.get(k).is_some_and(|until| *until > now))
                .collect(),
            Err(_) => vec![false; keys.len()],
        };
        Box::pin(async move { Ok(found) })
    }

    fn record<'a>(&'a self, keys: &'a [Key]) -> BoxFuture<'a, Result<(), StoreError>> {
        let now = Instant::now();
        if let Ok(mut inner) = self.inner.lock() {
            while let Some((until, key)) = inner.order.front().copied() {
                if until > now && inner.entries.len() + keys.len() <= self.capacity {
                    break;
                }
                inner.order.pop_front();
                if inner.entries.get(&key) == Some(&until) {
                    inner.entries.remove(&key);
                }
            }
            let until = now + self.retention;
            for key in keys {
                inner.entries.insert(*key, until);
                inner.order.push_back((until, *key));
            }
        }
        Box::pin(async { Ok(()) })
    }
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
    }

    #[tokio::test]
    async fn memory_ledger_remembers_forgets_after_retention_and_stays_bounded() {
        let ledger = MemoryLedger::with_retention(3, Duration::from_millis(50));
        let keys: Vec<Key> = (0u8..5).map(|i| [i; 16]).collect();
        ledger
            .record(&keys[..2])
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let found = ledger.contains(&keys[..3]).await.unwrap_or_default();
        assert_eq!(found, [true, true, false]);
        ledger
            .record(&keys[2..])
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(ledger.len(), 3, "bounded at its capacity, oldest dropped");
        assert_eq!(
            ledger.contains(&keys).await.unwrap_or_default(),
            [false, false, true, true, true]
        );
        tokio::time::sleep(Duration::from_millis(60)).await;
        assert_eq!(ledger.contains(&keys).await.unwrap_or_default(), [false; 5]);
    }
}
