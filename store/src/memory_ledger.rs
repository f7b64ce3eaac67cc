//! The in-process delivery ledger of a single relay (the default store).

use super::{BoxFuture, Key, Ledger, RETENTION, Recorded, StoreError};
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
    /// In-flight marks and their expiry (few: only legs running past a reply bound).
    in_flight: HashMap<Key, Instant>,
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
    fn lookup<'a>(&'a self, keys: &'a [Key]) -> BoxFuture<'a, Result<Vec<Recorded>, StoreError>> {
        let now = Instant::now();
        let live = |at: Option<&Instant>| at.is_some_and(|until| *until > now);
        let found = match self.inner.lock() {
            Ok(inner) => keys
                .iter()
                .map(|k| {
                    if live(inner.entries.get(k)) {
                        Recorded::Delivered
                    } else if live(inner.in_flight.get(k)) {
                        Recorded::InFlight
                    } else {
                        Recorded::Absent
                    }
                })
                .collect(),
            Err(_) => vec![Recorded::Absent; keys.len()],
        };
        Box::pin(async move { Ok(found) })
    }

    fn mark_in_flight<'a>(
        &'a self,
        keys: &'a [Key],
        ttl: Duration,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        let now = Instant::now();
        if let Ok(mut inner) = self.inner.lock() {
            inner.in_flight.retain(|_, until| *until > now);
            for key in keys {
                inner.in_flight.insert(*key, now + ttl);
            }
        }
        Box::pin(async { Ok(()) })
    }

    fn clear_in_flight<'a>(&'a self, keys: &'a [Key]) -> BoxFuture<'a, Result<(), StoreError>> {
        if let Ok(mut inner) = self.inner.lock() {
            for key in keys {
                inner.in_flight.remove(key);
            }
        }
        Box::pin(async { Ok(()) })
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
        let found = delivered(&ledger, &keys[..3]).await;
        assert_eq!(found, [true, true, false]);
        ledger
            .record(&keys[2..])
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(ledger.len(), 3, "bounded at its capacity, oldest dropped");
        assert_eq!(
            delivered(&ledger, &keys).await,
            [false, false, true, true, true]
        );
        tokio::time::sleep(Duration::from_millis(60)).await;
        assert_eq!(delivered(&ledger, &keys).await, [false; 5]);
    }

    async fn delivered(ledger: &MemoryLedger, keys: &[Key]) -> Vec<bool> {
        let found = ledger.lookup(keys).await.unwrap_or_default();
        found.iter().map(|r| *r == Recorded::Delivered).collect()
    }

    #[tokio::test]
    async fn an_in_flight_mark_lasts_until_cleared_or_expired_and_a_delivery_wins_over_it() {
        use Recorded::{Absent, Delivered, InFlight};
        let ledger = MemoryLedger::new(10);
        let keys: Vec<Key> = (0u8..3).map(|i| [i; 16]).collect();
        let ttl = Duration::from_secs(60);
        let _ = ledger.mark_in_flight(&keys, ttl).await;
        assert_eq!(
            ledger.lookup(&keys).await.unwrap_or_default(),
            [InFlight; 3]
        );
        // The leg ends: one recipient delivered, then every mark of the leg cleared.
        let _ = ledger.record(&keys[..1]).await;
        assert_eq!(
            ledger.lookup(&keys).await.unwrap_or_default(),
            [Delivered, InFlight, InFlight]
        );
        let _ = ledger.clear_in_flight(&keys).await;
        assert_eq!(
            ledger.lookup(&keys).await.unwrap_or_default(),
            [Delivered, Absent, Absent]
        );
        // A relay that stopped mid-leg: the mark expires by itself.
        let _ = ledger
            .mark_in_flight(&keys[2..], Duration::from_millis(20))
            .await;
        tokio::time::sleep(Duration::from_millis(30)).await;
        assert_eq!(
            ledger.lookup(&keys[2..]).await.unwrap_or_default(),
            [Absent]
        );
    }
}
