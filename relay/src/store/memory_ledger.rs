//! The in-process delivery ledger of a single relay (the default store).

use super::{BoxFuture, Key, Ledger, RETENTION, StoreError};
use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

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
