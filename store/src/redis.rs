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
//! - Reservations of one tenant are gathered while one is in flight ([`RedisStore::reserve`]):
//!   one script and one round trip for all the tenant's sessions that reached RCPT meanwhile,
//!   reading each counter once per batch.
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
use redis::FromRedisValue;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::oneshot;

const RESERVE: &str = include_str!("reserve.lua");
const FINISH: &str = include_str!("finish.lua");
const RENEW: &str = include_str!("renew.lua");

/// Prefix of every key the relay writes.
const PREFIX: &str = "mailroute:";

/// How long settlements are gathered before they are sent together: long enough to gather
/// a few at any rate above some hundred messages a second, far below a hold's life.
pub const SETTLE_WINDOW: Duration = Duration::from_millis(5);

/// The most holds one settlement script carries (each a few keys and arguments per counter).
const SETTLE_CHUNK: usize = 128;

/// The most reservations one script carries.
const RESERVE_CHUNK: usize = 64;

/// Quotas and ledger in Redis.
pub struct RedisStore {
    shared: Arc<Shared>,
}

/// What the store's calls and its batches of reservations (sent from a task of their own) share.
struct Shared {
    topology: Topology,
    /// The longest a whole operation may take, lookups of the master and waits for a
    /// connection included.
    timeout: Duration,
    reserve: redis::Script,
    finish: redis::Script,
    renew: redis::Script,
    /// Per hash tag with a reservation in flight, the reservations that arrived meanwhile:
    /// sent together, in one script, when it is answered (see [`RedisStore::reserve`]).
    waiting: Mutex<HashMap<String, Vec<Waiting>>>,
}

/// A reservation waiting for its tag's reservation in flight.
struct Waiting {
    hold: String,
    counters: Vec<Counter>,
    ttl: Duration,
    answer: oneshot::Sender<Result<Reservation, StoreError>>,
}

/// One reservation as the script takes it.
#[derive(Clone, Copy)]
struct Ask<'a> {
    hold: &'a str,
    counters: &'a [Counter],
    ttl: Duration,
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
            shared: Arc::new(Shared {
                topology: Topology::new(spec, auth, timeout)?,
                timeout,
                reserve: redis::Script::new(RESERVE),
                finish: redis::Script::new(FINISH),
                renew: redis::Script::new(RENEW),
                waiting: Mutex::default(),
            }),
        })
    }
}
impl Shared {
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

    /// Runs `pipe` within the store's timeout.
    async fn query<T: FromRedisValue>(&self, pipe: &redis::Pipeline) -> Result<T, StoreError> {
        self.within(async {
            let mut connection = self.topology.connection().await?;
            self.topology
                .checked(pipe.query_async(&mut connection).await)
        })
        .await
    }

    /// Sets each of `names` (ledger entries, in-flight marks) to 1 with expiry `ttl`, in one
    /// pipeline (`atomic`: MULTI/EXEC).
    async fn set_all(
        &self,
        names: impl Iterator<Item = String>,
        ttl: Duration,
        atomic: bool,
    ) -> Result<(), StoreError> {
        let mut pipe = redis::pipe();
        if atomic {
            pipe.atomic();
        }
        let mut any = false;
        for name in names {
            pipe.cmd("SET")
                .arg(name)
                .arg(1)
                .arg("PX")
                .arg(ms(ttl))
                .ignore();
            any = true;
        }
        if !any {
            return Ok(());
        }
        self.query(&pipe).await
    }

    /// Runs a script within the store's timeout.
    async fn invoke<T: FromRedisValue>(
        &self,
        call: &redis::ScriptInvocation<'_>,
    ) -> Result<T, StoreError> {
        self.within(async {
            let mut connection = self.topology.connection().await?;
            self.topology
                .checked(call.invoke_async(&mut connection).await)
        })
        .await
    }

    /// Reserves for `asks` in one script, answering each as if it had run alone, in order.
    async fn reserve(&self, asks: &[Ask<'_>]) -> Result<Vec<Reservation>, StoreError> {
        let now = now_ms();
        let mut call = self.reserve.prepare_invoke();
        call.arg(now);
        for ask in asks {
            call.arg(ask.hold)
                .arg(now + ms(ask.ttl))
                .arg(ask.counters.len());
            for c in ask.counters {
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
        }
        let answer: Vec<i64> = self.invoke(&call).await?;
        reservations(&answer, asks.iter().map(|a| a.counters.len())).ok_or_else(|| {
            StoreError(format!(
                "unexpected answer from the reserve script: {answer:?}"
            ))
        })
    }

    /// The reservation in flight for `tag` has been answered: the ones that arrived meanwhile
    /// are sent together from a task of their own, or the tag is idle again.
    fn hand_on(self: &Arc<Self>, tag: &str) {
        let Some(batch) = self.next_batch(tag) else {
            return;
        };
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                let shared = self.clone();
                let tag = tag.to_owned();
                runtime.spawn(async move { shared.send_waiting(tag, batch).await });
            }
            Err(_) => {
                self.lock_waiting().remove(tag);
                for waiting in batch {
                    let _ = waiting
                        .answer
                        .send(Err(StoreError("the relay is stopping".into())));
                }
            }
        }
    }

    /// What waits for `tag`, taken; `None` (and the tag idle) when nothing does.
    fn next_batch(&self, tag: &str) -> Option<Vec<Waiting>> {
        let mut waiting = self.lock_waiting();
        match waiting.get_mut(tag) {
            Some(queue) if !queue.is_empty() => Some(std::mem::take(queue)),
            _ => {
                waiting.remove(tag);
                None
            }
        }
    }

    fn lock_waiting(&self) -> std::sync::MutexGuard<'_, HashMap<String, Vec<Waiting>>> {
        self.waiting.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Sends what waited for `tag`, in scripts of at most [`RESERVE_CHUNK`], until nothing
    /// more arrived while they were in flight.
    async fn send_waiting(self: Arc<Self>, tag: String, mut batch: Vec<Waiting>) {
        loop {
            // A reservation whose session went away meanwhile is not made at all.
            batch.retain(|w| !w.answer.is_closed());
            let shared = &*self;
            let sends = batch.chunks(RESERVE_CHUNK).map(|chunk| async move {
                let asks: Vec<Ask<'_>> = chunk
                    .iter()
                    .map(|w| Ask {
                        hold: &w.hold,
                        counters: &w.counters,
                        ttl: w.ttl,
                    })
                    .collect();
                shared.reserve(&asks).await
            });
            let answers = futures_util::future::join_all(sends).await;
            let mut answered = batch.into_iter();
            for answer in answers {
                let chunk = answered.by_ref().take(RESERVE_CHUNK);
                match answer {
                    Ok(reservations) => {
                        for (waiting, reservation) in chunk.zip(reservations) {
                            let _ = waiting.answer.send(Ok(reservation));
                        }
                    }
                    Err(e) => {
                        for waiting in chunk {
                            let _ = waiting.answer.send(Err(StoreError(e.0.clone())));
                        }
                    }
                }
            }
            match self.next_batch(&tag) {
                Some(next) => batch = next,
                None => return,
            }
        }
    }

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
        self.invoke::<i64>(&call).await?;
        Ok(())
    }
}

/// The reserve script's flattened answer for reservations of `sizes` counters each.
fn reservations(answer: &[i64], sizes: impl Iterator<Item = usize>) -> Option<Vec<Reservation>> {
    let mut rest = answer;
    let mut out = Vec::new();
    for n in sizes {
        let (&status, tail) = rest.split_first()?;
        if status == 0 {
            let reserved = tail.get(..n)?;
            out.push(Reservation::Granted(
                reserved.iter().map(|r| *r == 1).collect(),
            ));
            rest = &tail[n..];
        } else {
            out.push(Reservation::Exceeded(usize::try_from(status - 1).ok()?));
            rest = tail;
        }
    }
    rest.is_empty().then_some(out)
}

/// Hands the tag on when the reservation in flight ends, answered or abandoned (its session
/// gone): the ones waiting behind it are never left waiting.
struct InFlight<'a> {
    shared: &'a Arc<Shared>,
    tag: &'a str,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.shared.hand_on(self.tag);
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

/// The window's bucket numbers for `counter` at `now_ms`, oldest first.
fn buckets(counter: &Counter, now_ms: u64) -> impl Iterator<Item = u64> {
    let current = now_ms / ms(counter.bucket());
    current.saturating_sub(BUCKETS - 1)..=current
}

impl QuotaStore for RedisStore {
    /// NB: reservations of one tenant (one hash tag) are gathered while one is in flight: the
    /// first is sent at once, those that arrive before its answer go together in one script
    /// when it comes, and so on. One session at a time waits for nothing more than before;
    /// fifty concurrent sessions of a tenant share a script and its round trip, and the
    /// script reads each counter once per batch instead of once per recipient.
    fn reserve<'a>(
        &'a self,
        hold: &'a str,
        counters: &'a [Counter],
        ttl: Duration,
    ) -> BoxFuture<'a, Result<Reservation, StoreError>> {
        Box::pin(async move {
            let tag = counters.first().map_or("", |c| hash_tag(&c.key));
            let queued = {
                let mut waiting = self.shared.lock_waiting();
                match waiting.get_mut(tag) {
                    Some(queue) => {
                        let (answer, heard) = oneshot::channel();
                        queue.push(Waiting {
                            hold: hold.to_owned(),
                            counters: counters.to_vec(),
                            ttl,
                            answer,
                        });
                        Some(heard)
                    }
                    None => {
                        waiting.insert(tag.to_owned(), Vec::new());
                        None
                    }
                }
            };
            if let Some(heard) = queued {
                return heard
                    .await
                    .unwrap_or_else(|_| Err(StoreError("the reservation was abandoned".into())));
            }
            let _in_flight = InFlight {
                shared: &self.shared,
                tag,
            };
            let ask = Ask {
                hold,
                counters,
                ttl,
            };
            let mut answer = self.shared.reserve(&[ask]).await?;
            answer
                .pop()
                .ok_or_else(|| StoreError("no answer from the reserve script".into()))
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
                .map(|chunk| self.shared.end(chunk, accepted));
            futures_util::future::join_all(sends)
                .await
                .into_iter()
                .collect()
        })
    }

    fn usage<'a>(&'a self, counters: &'a [Counter]) -> BoxFuture<'a, Result<Vec<u64>, StoreError>> {
        Box::pin(async move {
            if counters.is_empty() {
                return Ok(Vec::new());
            }
            let now = now_ms();
            let mut pipe = redis::pipe();
            for c in counters {
                match &c.member {
                    Some(_) => {
                        let window: Vec<String> = buckets(c, now)
                            .map(|b| format!("{PREFIX}{}:u:{b}", c.key))
                            .collect();
                        pipe.cmd("PFCOUNT").arg(window);
                    }
                    None => {
                        pipe.cmd("HGETALL").arg(format!("{PREFIX}{}:n", c.key));
                    }
                }
                pipe.cmd("ZCOUNT")
                    .arg(format!("{PREFIX}{}:h", c.key))
                    .arg(format!("({now}"))
                    .arg("+inf");
            }
            let answers: Vec<redis::Value> = self.shared.query(&pipe).await?;
            let mut out = Vec::with_capacity(counters.len());
            for (c, pair) in counters.iter().zip(answers.chunks(2)) {
                let [settled, held] = pair else {
                    return Err(StoreError("unexpected answer to a usage read".into()));
                };
                let held =
                    u64::from_redis_value(held.clone()).map_err(|e| StoreError(e.to_string()))?;
                let settled = if c.member.is_some() {
                    u64::from_redis_value(settled.clone()).map_err(|e| StoreError(e.to_string()))?
                } else {
                    let first = (now / ms(c.bucket())).saturating_sub(BUCKETS - 1);
                    let fields: HashMap<u64, u64> = HashMap::from_redis_value(settled.clone())
                        .map_err(|e| StoreError(e.to_string()))?;
                    fields
                        .iter()
                        .filter(|(bucket, _)| **bucket >= first)
                        .map(|(_, n)| n)
                        .sum()
                };
                out.push(settled + held);
            }
            Ok(out)
        })
    }

    fn renew<'a>(
        &'a self,
        hold: &'a Hold,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(async move {
            let now = now_ms();
            let mut call = self.shared.renew.prepare_invoke();
            call.arg(now).arg(&hold.id).arg(now + ms(ttl));
            let mut any = false;
            for (c, reserved) in hold.counters.iter().zip(&hold.reserved) {
                if *reserved {
                    call.key(format!("{PREFIX}{}:h", c.key));
                    any = true;
                }
            }
            if !any {
                return Ok(false);
            }
            let renewed: i64 = self.shared.invoke(&call).await?;
            Ok(renewed == 1)
        })
    }

    fn settle_window(&self) -> Duration {
        SETTLE_WINDOW
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
                let entry = ledger_key(k);
                let mark = in_flight_key(&entry);
                pipe.cmd("MGET").arg(entry).arg(mark);
            }
            let found: Vec<(Option<i64>, Option<i64>)> = self.shared.query(&pipe).await?;
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
        let names = keys.iter().map(|k| in_flight_key(&ledger_key(k)));
        Box::pin(self.shared.set_all(names, ttl, false))
    }

    fn clear_in_flight<'a>(&'a self, keys: &'a [Key]) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            if keys.is_empty() {
                return Ok(());
            }
            let mut pipe = redis::pipe();
            for k in keys {
                pipe.del(in_flight_key(&ledger_key(k))).ignore();
            }
            self.shared.query(&pipe).await
        })
    }

    fn record<'a>(&'a self, keys: &'a [Key]) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(
            self.shared
                .set_all(keys.iter().map(ledger_key), RETENTION, true),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batchs_answer_is_split_per_reservation() {
        let answer = [0, 1, 0, 2, 0, 1, 1];
        assert_eq!(
            reservations(&answer, [2, 3, 2].into_iter()),
            Some(vec![
                Reservation::Granted(vec![true, false]),
                Reservation::Exceeded(1),
                Reservation::Granted(vec![true, true]),
            ])
        );
        // Too short, or too long, for what was asked: not a valid answer.
        assert_eq!(reservations(&answer, [2, 3, 3].into_iter()), None);
        assert_eq!(reservations(&answer, [2, 3].into_iter()), None);
    }
}
