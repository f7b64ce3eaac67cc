//! The in-process quota store of a single relay (the default): exact counts, unique recipients
//! kept exactly, everything behind one lock (a reservation is a few map operations).

use super::{BUCKETS, BoxFuture, Counter, Hold, QuotaStore, Reservation, StoreError};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Time since the store started; replaceable in tests.
pub type Clock = Arc<dyn Fn() -> Duration + Send + Sync>;

#[derive(Debug, Default)]
struct State {
    /// Settled units per bucket; for unique counting, members whose latest bucket it is.
    buckets: BTreeMap<u64, u64>,
    /// Open holds and when they expire.
    held: HashMap<String, Duration>,
    /// Unique counting: each member's latest bucket.
    members: HashMap<String, u64>,
}

impl State {
    /// Drops what left the window (`first` is its oldest bucket) and expired holds.
    fn prune(&mut self, first: u64, now: Duration) {
        self.held.retain(|_, until| *until > now);
        while let Some((&b, _)) = self.buckets.first_key_value() {
            if b >= first {
                break;
            }
            self.buckets.pop_first();
        }
        let live: u64 = self.buckets.values().sum();
        if self.members.len() as u64 > 2 * live + 1024 {
            self.members.retain(|_, b| *b >= first);
        }
    }

    fn settled(&self) -> u64 {
        self.buckets.values().sum()
    }

    fn is_empty(&self) -> bool {
        self.buckets.is_empty() && self.held.is_empty()
    }
}

/// Counts per counter key, exact.
pub struct MemoryQuotaStore {
    states: Mutex<HashMap<String, State>>,
    clock: Clock,
}

impl std::fmt::Debug for MemoryQuotaStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryQuotaStore").finish_non_exhaustive()
    }
}

impl Default for MemoryQuotaStore {
    fn default() -> Self {
        let start = Instant::now();
        Self::with_clock(Arc::new(move || start.elapsed()))
    }
}

fn bucket_of(now: Duration, counter: &Counter) -> (u64, u64) {
    let len = counter.bucket().as_millis().max(1) as u64;
    let current = now.as_millis() as u64 / len;
    (current, current.saturating_sub(BUCKETS - 1))
}

impl MemoryQuotaStore {
    pub fn with_clock(clock: Clock) -> Self {
        Self {
            states: Mutex::new(HashMap::new()),
            clock,
        }
    }

    fn reserve_now(
        &self,
        hold: &str,
        counters: &[Counter],
        ttl: Duration,
    ) -> Result<Reservation, StoreError> {
        let now = (self.clock)();
        let mut states = self
            .states
            .lock()
            .map_err(|_| StoreError("quota store lock poisoned".to_owned()))?;
        if states.len() > 10_000 {
            states.retain(|_, s| !s.is_empty());
        }
        let mut reserved = Vec::with_capacity(counters.len());
        for (i, counter) in counters.iter().enumerate() {
            let (_, first) = bucket_of(now, counter);
            let state = states.entry(counter.key.clone()).or_default();
            state.prune(first, now);
            let used = state.settled() + state.held.len() as u64;
            let needed = counter
                .member
                .as_ref()
                .is_none_or(|m| state.members.get(m).is_none_or(|b| *b < first));
            if counter.enforce && needed && used >= counter.max {
                return Ok(Reservation::Exceeded(i));
            }
            reserved.push(needed);
        }
        for (counter, needed) in counters.iter().zip(&reserved) {
            if *needed && let Some(state) = states.get_mut(&counter.key) {
                state.held.insert(hold.to_owned(), now + ttl);
            }
        }
        Ok(Reservation::Granted(reserved))
    }

    fn finish_now(&self, holds: &[Hold], accepted: bool) -> Result<(), StoreError> {
        let now = (self.clock)();
        let mut states = self
            .states
            .lock()
            .map_err(|_| StoreError("quota store lock poisoned".to_owned()))?;
        for hold in holds {
            for (counter, reserved) in hold.counters.iter().zip(&hold.reserved) {
                let state = states.entry(counter.key.clone()).or_default();
                state.held.remove(&hold.id);
                if !accepted {
                    continue;
                }
                let (current, _) = bucket_of(now, counter);
                match &counter.member {
                    Some(member) => {
                        let previous = state.members.insert(member.clone(), current);
                        if previous == Some(current) {
                            continue;
                        }
                        if let Some(old) = previous
                            && let Some(n) = state.buckets.get_mut(&old)
                        {
                            *n = n.saturating_sub(1);
                        }
                        *state.buckets.entry(current).or_default() += 1;
                    }
                    None if *reserved => *state.buckets.entry(current).or_default() += 1,
                    None => {}
                }
            }
        }
        Ok(())
    }
}

impl MemoryQuotaStore {
    fn usage_now(&self, counters: &[Counter]) -> Result<Vec<u64>, StoreError> {
        let now = (self.clock)();
        let mut states = self
            .states
            .lock()
            .map_err(|_| StoreError("quota store lock poisoned".to_owned()))?;
        Ok(counters
            .iter()
            .map(|counter| match states.get_mut(&counter.key) {
                None => 0,
                Some(state) => {
                    let (_, first) = bucket_of(now, counter);
                    state.prune(first, now);
                    state.settled() + state.held.len() as u64
                }
            })
            .collect())
    }

    fn renew_now(&self, hold: &Hold, ttl: Duration) -> Result<bool, StoreError> {
        let now = (self.clock)();
        let mut states = self
            .states
            .lock()
            .map_err(|_| StoreError("quota store lock poisoned".to_owned()))?;
        let mut live = !hold.counters.is_empty();
        for (counter, reserved) in hold.counters.iter().zip(&hold.reserved) {
            if !reserved {
                continue;
            }
            let held = states
                .get(&counter.key)
                .and_then(|s| s.held.get(&hold.id))
                .is_some_and(|until| *until > now);
            live &= held;
        }
        if live {
            for (counter, reserved) in hold.counters.iter().zip(&hold.reserved) {
                if *reserved && let Some(state) = states.get_mut(&counter.key) {
                    state.held.insert(hold.id.clone(), now + ttl);
                }
            }
        }
        Ok(live)
    }
}

impl QuotaStore for MemoryQuotaStore {
    fn usage<'a>(&'a self, counters: &'a [Counter]) -> BoxFuture<'a, Result<Vec<u64>, StoreError>> {
        let result = self.usage_now(counters);
        Box::pin(async move { result })
    }

    fn renew<'a>(
        &'a self,
        hold: &'a Hold,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        let result = self.renew_now(hold, ttl);
        Box::pin(async move { result })
    }

    fn reserve<'a>(
        &'a self,
        hold: &'a str,
        counters: &'a [Counter],
        ttl: Duration,
    ) -> BoxFuture<'a, Result<Reservation, StoreError>> {
        let result = self.reserve_now(hold, counters, ttl);
        Box::pin(async move { result })
    }

    fn finish<'a>(
        &'a self,
        holds: &'a [Hold],
        accepted: bool,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        let result = self.finish_now(holds, accepted);
        Box::pin(async move { result })
    }
}

#[cfg(test)]
mod tests {
    use super::super::Limit;
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};

    struct Fake(Arc<AtomicU64>);
    impl Fake {
        fn store() -> (Self, MemoryQuotaStore) {
            let ms = Arc::new(AtomicU64::new(1_000_000_000));
            let clock = Arc::clone(&ms);
            (
                Fake(ms),
                MemoryQuotaStore::with_clock(Arc::new(move || {
                    Duration::from_millis(clock.load(Ordering::SeqCst))
                })),
            )
        }
        fn advance(&self, d: Duration) {
            self.0.fetch_add(d.as_millis() as u64, Ordering::SeqCst);
        }
    }

    fn peak(max: u64) -> Counter {
        Counter {
            limit: Limit::CustomerRecipientsPer10Minutes,
            key: "{t}:customer:10m".into(),
            max,
            window: Duration::from_secs(600),
            member: None,
            enforce: true,
        }
    }

    fn unique(max: u64, member: &str) -> Counter {
        Counter {
            limit: Limit::UserUniqueRecipientsPerDay,
            key: "{t}:user:a:recipients".into(),
            max,
            window: Duration::from_secs(86_400),
            member: Some(member.into()),
            enforce: true,
        }
    }

    fn reserve(store: &MemoryQuotaStore, id: &str, counters: &[Counter]) -> Option<Hold> {
        match store
            .reserve_now(id, counters, Duration::from_secs(60))
            .unwrap_or_else(|e| panic!("{e:?}"))
        {
            Reservation::Granted(reserved) => Some(Hold {
                id: id.into(),
                counters: counters.to_vec(),
                reserved,
            }),
            Reservation::Exceeded(_) => None,
        }
    }

    #[test]
    fn holds_count_until_released_and_settled_units_until_they_leave_the_window() {
        let (clock, store) = Fake::store();
        let a = reserve(&store, "a", &[peak(2)]).unwrap_or_else(|| panic!("refused"));
        let b = reserve(&store, "b", &[peak(2)]).unwrap_or_else(|| panic!("refused"));
        assert!(reserve(&store, "c", &[peak(2)]).is_none(), "2 held");
        store
            .finish_now(&[b], false)
            .unwrap_or_else(|e| panic!("{e:?}"));
        let c = reserve(&store, "c", &[peak(2)]).unwrap_or_else(|| panic!("refused"));
        store
            .finish_now(&[a, c], true)
            .unwrap_or_else(|e| panic!("{e:?}"));
        assert!(reserve(&store, "d", &[peak(2)]).is_none(), "2 settled");
        // Rolling: 9 minutes later still counted, 10 minutes and a bucket later gone.
        clock.advance(Duration::from_secs(540));
        assert!(reserve(&store, "d", &[peak(2)]).is_none());
        clock.advance(Duration::from_secs(85));
        assert!(reserve(&store, "d", &[peak(2)]).is_some());
    }

    #[test]
    fn an_abandoned_hold_expires() {
        let (clock, store) = Fake::store();
        reserve(&store, "a", &[peak(1)]).unwrap_or_else(|| panic!("refused"));
        assert!(reserve(&store, "b", &[peak(1)]).is_none());
        clock.advance(Duration::from_secs(61));
        assert!(reserve(&store, "b", &[peak(1)]).is_some());
    }

    #[test]
    fn unique_recipients_count_once() {
        let (_clock, store) = Fake::store();
        for (i, r) in ["x", "y", "x", "x"].iter().enumerate() {
            let h = reserve(&store, &i.to_string(), &[unique(2, r)])
                .unwrap_or_else(|| panic!("refused"));
            store
                .finish_now(&[h], true)
                .unwrap_or_else(|e| panic!("{e:?}"));
        }
        assert!(reserve(&store, "z", &[unique(2, "z")]).is_none());
        assert!(reserve(&store, "x", &[unique(2, "x")]).is_some());
    }

    #[test]
    fn a_refusal_reserves_nothing_on_any_counter() {
        let (_clock, store) = Fake::store();
        let full = Counter {
            key: "{t}:customer:day".into(),
            ..peak(0)
        };
        assert!(reserve(&store, "a", &[peak(1), full]).is_none());
        assert!(
            reserve(&store, "b", &[peak(1)]).is_some(),
            "nothing left held"
        );
    }

    #[test]
    fn counters_not_enforced_still_count() {
        let (_clock, store) = Fake::store();
        let counted = Counter {
            enforce: false,
            ..peak(1)
        };
        let h = reserve(&store, "a", std::slice::from_ref(&counted))
            .unwrap_or_else(|| panic!("refused"));
        store
            .finish_now(&[h], true)
            .unwrap_or_else(|e| panic!("{e:?}"));
        assert!(reserve(&store, "b", std::slice::from_ref(&counted)).is_some());
        assert!(reserve(&store, "c", &[peak(1)]).is_none());
    }
}
