//! The shared store in Redis (`--store redis://...`): sending quotas and the delivery ledger
//! for relays running as several replicas.
//!
//! - Every quota decision is one Lua script ([`reserve.lua`](reserve.lua),
//!   [`finish.lua`](finish.lua)), so checking and reserving is atomic across replicas, and
//!   every key it creates gets its expiry in the same script: no key without a TTL, no counter
//!   that only grows.
//! - Counts per window are a hash of 24 buckets; holds are a sorted set scored by expiry, so a
//!   dead relay's holds stop counting by themselves.
//! - Unique recipients per user are one HyperLogLog per bucket (at most 12 KiB each, whatever
//!   the number of recipients), merged per check: standard error 0.81 %, so a user's unique
//!   recipient limit holds within about 1 % either way.
//! - Ledger entries are plain keys with the 5-day expiry set by the same `SET`.
//! - Times are the relay's clock (replicas are expected to be NTP-synchronised; a skew of
//!   seconds is small against 25-second and one-hour buckets).
//! - Which Redis answers (one server, the master the sentinels name, a Cluster's node) is
//!   [`super::redis_topology`]'s; connections are made lazily and re-made after a failure, so
//!   the relay starts and recovers without a restart while Redis is away (SPEC 5.3a).
//! - Every key of one decision has one hash tag, so it is one slot of a Cluster: a quota's
//!   keys the tenant's (`{tenant}`, in the counter's name), a message's ledger entries the
//!   message's (`ledger::MESSAGE_TAG` octets of its fingerprint). A retry can be bound to
//!   another tenant than the first attempt (by AUTH instead of its IP range); the message is
//!   the same, so the ledger is tagged by the message.
//! - Settlements arrive gathered ([`QuotaStore::settle_window`], `crate::quota`): each batch
//!   is one script per tenant slot, which adds each bucket's units in one `HINCRBY` and sets
//!   each key's expiry once.
//! - Nothing waits for replicas: `WAIT` would block the one multiplexed connection every
//!   decision shares. Behind Sentinel, a failover can lose what the old master had not yet
//!   replicated: what that bound is, and how `min-replicas-max-lag` tightens it, is in
//!   docs/quotas.md ("What a failover costs").

use super::redis_topology::Topology;
use super::{
    BUCKETS, BoxFuture, Counter, Hold, Key, Ledger, MESSAGE_TAG, QuotaStore, RETENTION, Recorded,
    RedisAuth, RedisSpec, Reservation, StoreError, StoreSpec,
};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

const RESERVE: &str = include_str!("reserve.lua");
const FINISH: &str = include_str!("finish.lua");

/// Prefix of every key the relay writes.
const PREFIX: &str = "mailroute:";

/// How long settlements are gathered before they are sent together: long enough to gather
/// a few at any rate above some hundred messages a second, far below a hold's life.
pub const SETTLE_WINDOW: Duration = Duration::from_millis(5);

/// The most holds one settlement script carries (each a few keys and arguments per counter).
const SETTLE_CHUNK: usize = 128;

/// Quotas and ledger in Redis.
pub struct RedisStore {
    topology: Topology,
    /// The longest a whole operation may take, lookups of the master and waits for a
    /// connection included.
    timeout: Duration,
    reserve: redis::Script,
    finish: redis::Script,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore").finish_non_exhaustive()
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or_default()
}

fn ms(d: Duration) -> u64 {
    d.as_millis().max(1) as u64
}

impl RedisStore {
    /// A store for any `--store` form of Redis (`redis://`, `redis-sentinel://`,
    /// `redis-cluster://`), without passwords beyond the URL's. Connects lazily: the relay
    /// starts even when Redis is away, answering `451 4.3.0` (or accepting, with
    /// `--store-failure open`) until it is back.
    pub fn new(url: &str, timeout: Duration) -> Result<Self, StoreError> {
        match url.parse::<StoreSpec>() {
            Ok(StoreSpec::Redis(spec)) => Self::open(&spec, &RedisAuth::default(), timeout),
            Ok(StoreSpec::Memory) => Err(StoreError("not a Redis URL: memory".into())),
            Err(e) => Err(StoreError(e.to_string())),
        }
    }

    /// A store for `spec`, with `auth`'s passwords.
    pub fn open(spec: &RedisSpec, auth: &RedisAuth, timeout: Duration) -> Result<Self, StoreError> {
        Ok(Self {
            topology: Topology::new(spec, auth, timeout)?,
            timeout,
            reserve: redis::Script::new(RESERVE),
            finish: redis::Script::new(FINISH),
        })
    }

    /// `work` within the store's timeout: a master being looked up, or a connection waited for,
    /// never holds a decision past it.
    async fn within<T>(
        &self,
        work: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        match tokio::time::timeout(self.timeout, work).await {
            Ok(answer) => answer,
            Err(_) => {
                self.topology.timed_out();
                Err(StoreError(format!(
                    "no answer from Redis within {} ms",
                    self.timeout.as_millis()
                )))
            }
        }
    }

    /// The in-flight mark of ledger entry `entry`: `…:entry:flight`, in the same slot.
    fn in_flight_key(entry: &str) -> String {
        format!("{entry}:flight")
    }

    /// `mailroute:ledger:{tag}:entry`, the tag being the message's.
    fn ledger_key(key: &Key) -> String {
        use std::fmt::Write;
        let mut name = String::with_capacity(PREFIX.len() + 10 + 32);
        name.push_str(PREFIX);
        name.push_str("ledger:{");
        for (i, b) in key.iter().enumerate() {
            if i == MESSAGE_TAG {
                name.push_str("}:");
            }
            let _ = write!(name, "{b:02x}");
        }
        name
    }
}

/// The window's bucket numbers for `counter` at `now_ms`, oldest first.
fn buckets(counter: &Counter, now_ms: u64) -> impl Iterator<Item = u64> {
    let current = now_ms / ms(counter.bucket());
    current.saturating_sub(BUCKETS - 1)..=current
}

impl QuotaStore for RedisStore {
    fn reserve<'a>(
        &'a self,
        hold: &'a str,
        counters: &'a [Counter],
        ttl: Duration,
    ) -> BoxFuture<'a, Result<Reservation, StoreError>> {
        Box::pin(async move {
            let now = now_ms();
            let mut call = self.reserve.prepare_invoke();
            call.arg(now).arg(hold).arg(now + ms(ttl));
            for c in counters {
                call.key(format!("{PREFIX}{}:n", c.key))
                    .key(format!("{PREFIX}{}:h", c.key));
                call.arg(c.max)
                    .arg(ms(c.window))
                    .arg(ms(c.bucket()))
                    .arg(u8::from(c.enforce))
                    .arg(c.member.as_deref().unwrap_or_default());
                if c.member.is_some() {
                    call.key(format!("{PREFIX}{}:scratch", c.key));
                    for b in buckets(c, now) {
                        call.key(format!("{PREFIX}{}:u:{b}", c.key));
                    }
                }
            }
            let answer: Vec<i64> = self
                .within(async {
                    let mut connection = self.topology.connection().await?;
                    self.topology
                        .checked(call.invoke_async(&mut connection).await)
                })
                .await?;
            match answer.split_first() {
                Some((0, reserved)) if reserved.len() == counters.len() => Ok(
                    Reservation::Granted(reserved.iter().map(|r| *r == 1).collect()),
                ),
                Some((&i, [])) if i >= 1 => Ok(Reservation::Exceeded(i as usize - 1)),
                _ => Err(StoreError(format!(
                    "unexpected answer from the reserve script: {answer:?}"
                ))),
            }
        })
    }

    fn finish<'a>(
        &'a self,
        holds: &'a [Hold],
        accepted: bool,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            // One script per tenant slot (a Cluster refuses keys of several slots in one
            // script), at most SETTLE_CHUNK holds each, all sent at once.
            let mut slots: std::collections::BTreeMap<&str, Vec<&Hold>> = Default::default();
            for hold in holds {
                let tag = hold.counters.first().map_or("", |c| hash_tag(&c.key));
                slots.entry(tag).or_default().push(hold);
            }
            let sends = slots
                .values()
                .flat_map(|holds| holds.chunks(SETTLE_CHUNK))
                .map(|chunk| self.end(chunk, accepted));
            futures_util::future::join_all(sends)
                .await
                .into_iter()
                .collect()
        })
    }

    fn settle_window(&self) -> Duration {
        SETTLE_WINDOW
    }
}

impl RedisStore {
    /// Settles (`accepted`) or releases `holds` in one script.
    async fn end(&self, holds: &[&Hold], accepted: bool) -> Result<(), StoreError> {
        let now = now_ms();
        let mut call = self.finish.prepare_invoke();
        call.arg(now).arg(u8::from(accepted));
        for hold in holds {
            for (c, reserved) in hold.counters.iter().zip(&hold.reserved) {
                let current = now / ms(c.bucket());
                call.key(format!("{PREFIX}{}:n", c.key))
                    .key(format!("{PREFIX}{}:h", c.key))
                    .key(format!("{PREFIX}{}:u:{current}", c.key));
                call.arg(&hold.id)
                    .arg(ms(c.window))
                    .arg(ms(c.bucket()))
                    .arg(u8::from(*reserved))
                    .arg(c.member.as_deref().unwrap_or_default());
            }
        }
        self.within(async {
            let mut connection = self.topology.connection().await?;
            self.topology
                .checked(call.invoke_async::<i64>(&mut connection).await)
        })
        .await?;
        Ok(())
    }
}

/// A key's Redis hash tag: what is between its first `{` and the next `}`.
fn hash_tag(key: &str) -> &str {
    key.split_once('{')
        .and_then(|(_, rest)| rest.split_once('}'))
        .map_or(key, |(tag, _)| tag)
}

impl Ledger for RedisStore {
    fn lookup<'a>(&'a self, keys: &'a [Key]) -> BoxFuture<'a, Result<Vec<Recorded>, StoreError>> {
        Box::pin(async move {
            if keys.is_empty() {
                return Ok(Vec::new());
            }
            // NB: one MGET per key for its entry and its in-flight mark (one slot: the same
            // hash tag), as many commands as the EXISTS it replaces. A relay of an earlier
            // version only sees entries: during a rolling upgrade it may send a copy an
            // in-flight mark would have held back (a duplicate, never a loss).
            let mut pipe = redis::pipe();
            for k in keys {
                let entry = Self::ledger_key(k);
                let mark = Self::in_flight_key(&entry);
                pipe.cmd("MGET").arg(entry).arg(mark);
            }
            let found: Vec<(Option<i64>, Option<i64>)> = self
                .within(async {
                    let mut connection = self.topology.connection().await?;
                    self.topology
                        .checked(pipe.query_async(&mut connection).await)
                })
                .await?;
            Ok(found
                .into_iter()
                .map(|(entry, mark)| match (entry, mark) {
                    (Some(_), _) => Recorded::Delivered,
                    (None, Some(_)) => Recorded::InFlight,
                    (None, None) => Recorded::Absent,
                })
                .collect())
        })
    }

    fn mark_in_flight<'a>(
        &'a self,
        keys: &'a [Key],
        ttl: Duration,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            if keys.is_empty() {
                return Ok(());
            }
            let mut pipe = redis::pipe();
            for k in keys {
                pipe.cmd("SET")
                    .arg(Self::in_flight_key(&Self::ledger_key(k)))
                    .arg(1)
                    .arg("PX")
                    .arg(ms(ttl))
                    .ignore();
            }
            self.within(async {
                let mut connection = self.topology.connection().await?;
                self.topology
                    .checked(pipe.query_async::<()>(&mut connection).await)
            })
            .await
        })
    }

    fn clear_in_flight<'a>(&'a self, keys: &'a [Key]) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            if keys.is_empty() {
                return Ok(());
            }
            let mut pipe = redis::pipe();
            for k in keys {
                pipe.del(Self::in_flight_key(&Self::ledger_key(k))).ignore();
            }
            self.within(async {
                let mut connection = self.topology.connection().await?;
                self.topology
                    .checked(pipe.query_async::<()>(&mut connection).await)
            })
            .await
        })
    }

    fn record<'a>(&'a self, keys: &'a [Key]) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            if keys.is_empty() {
                return Ok(());
            }
            let mut pipe = redis::pipe();
            pipe.atomic();
            for k in keys {
                pipe.cmd("SET")
                    .arg(Self::ledger_key(k))
                    .arg(1)
                    .arg("PX")
                    .arg(ms(RETENTION))
                    .ignore();
            }
            self.within(async {
                let mut connection = self.topology.connection().await?;
                self.topology
                    .checked(pipe.query_async::<()>(&mut connection).await)
            })
            .await?;
            Ok(())
        })
    }
}
