//! The shared store (SPEC 5.3a, 6.6): the one stateful part of Mailroute. It holds the sending
//! quotas' and the routes' rate limits' counts and holds ([`QuotaStore`]) and the delivery
//! ledger ([`Ledger`]), in memory for one relay or in Redis for replicas sharing them.
//! `--store` is parsed into a [`StoreSpec`] at the command line; everything above sees only the
//! two traits. The relay decides with it; the operator only reads it (a route's use of its
//! limits, for its status).
//!
//! - [`memory_quotas`], [`memory_ledger`]: the in-process stores (the default).
//! - [`redis`]: both in Redis, one Lua script per decision; [`redis_topology`]: which Redis
//!   (one server, Sentinel, Cluster).
//! - [`route_limits`]: the counters of a route's `rateLimits` (what the relay reserves on and
//!   the operator reads).

pub mod memory_ledger;
pub mod memory_quotas;
pub mod redis;
pub(crate) mod redis_topology;
pub mod route_limits;

pub use memory_ledger::MemoryLedger;
pub use memory_quotas::MemoryQuotaStore;
pub use redis::RedisStore;

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

/// A boxed future, as the store traits return (they are used as trait objects).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Why the shared store could not answer.
#[derive(Debug, thiserror::Error)]
#[error("shared store unavailable: {0}")]
pub struct StoreError(pub String);

/// What `--store` names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreSpec {
    /// `memory`: this relay only.
    Memory,
    /// Redis, shared by replicas.
    Redis(RedisSpec),
}

/// Which Redis (`redis_topology` follows it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RedisSpec {
    /// `redis://HOST:PORT[/DB]` or `rediss://...` (TLS): one server.
    Single(String),
    /// `redis-sentinel://HOST:PORT[,HOST:PORT...]/MASTER[/DB]` (`rediss-sentinel://` for TLS):
    /// the master the sentinels name for `master`.
    Sentinel {
        sentinels: Vec<(String, u16)>,
        master: String,
        db: i64,
        tls: bool,
    },
    /// `redis-cluster://HOST:PORT[,HOST:PORT...]` (`rediss-cluster://` for TLS): a Cluster,
    /// found from any of its nodes.
    Cluster {
        nodes: Vec<(String, u16)>,
        tls: bool,
    },
}

/// Passwords for Redis, from the environment or mounted files, never from `--store`'s value
/// in the chart.
#[derive(Clone, Default)]
pub struct RedisAuth {
    /// For the data nodes (the master, the Cluster's nodes).
    pub password: Option<String>,
    /// For the sentinels, when they ask for one.
    pub sentinel_password: Option<String>,
}

impl RedisAuth {
    /// The passwords as a deployment gives them: the data nodes' from `password_file` (a
    /// mounted Secret, trailing newline ignored) or else `MAILROUTE_STORE_PASSWORD`; the
    /// sentinels' from `MAILROUTE_STORE_SENTINEL_PASSWORD`. Empty means none.
    pub fn from_environment(password_file: Option<&std::path::Path>) -> Result<Self, String> {
        let password = match password_file {
            Some(path) => Some(
                std::fs::read_to_string(path)
                    .map_err(|e| format!("--store-password-file {}: {e}", path.display()))?
                    .trim_end_matches(['\r', '\n'])
                    .to_owned(),
            ),
            None => std::env::var("MAILROUTE_STORE_PASSWORD").ok(),
        };
        Ok(Self {
            password: password.filter(|p| !p.is_empty()),
            sentinel_password: std::env::var("MAILROUTE_STORE_SENTINEL_PASSWORD")
                .ok()
                .filter(|p| !p.is_empty()),
        })
    }
}

impl std::fmt::Debug for RedisAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisAuth")
            .field("password", &self.password.as_ref().map(|_| "<set>"))
            .field(
                "sentinel_password",
                &self.sentinel_password.as_ref().map(|_| "<set>"),
            )
            .finish()
    }
}

/// Why a `--store` value is refused.
#[derive(Debug, thiserror::Error)]
#[error(
    "--store {0:?}: expected memory, redis[s]://HOST:PORT[/DB], \
     redis[s]-sentinel://HOST:PORT[,HOST:PORT...]/MASTER[/DB] or \
     redis[s]-cluster://HOST:PORT[,HOST:PORT...]"
)]
pub struct StoreSpecError(String);

/// `HOST:PORT[,HOST:PORT...]`, each with a port.
fn hosts(list: &str) -> Option<Vec<(String, u16)>> {
    list.split(',')
        .map(|h| {
            let (host, port) = h.rsplit_once(':')?;
            let host = host.trim_start_matches('[').trim_end_matches(']');
            (!host.is_empty()).then_some(())?;
            Some((host.to_owned(), port.parse().ok()?))
        })
        .collect()
}

impl std::str::FromStr for StoreSpec {
    type Err = StoreSpecError;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        let refused = || StoreSpecError(value.to_owned());
        if value == "memory" {
            return Ok(StoreSpec::Memory);
        }
        if value.starts_with("redis://") || value.starts_with("rediss://") {
            return Ok(StoreSpec::Redis(RedisSpec::Single(value.to_owned())));
        }
        let (scheme, rest) = value.split_once("://").ok_or_else(refused)?;
        match scheme {
            "redis-sentinel" | "rediss-sentinel" => {
                let mut parts = rest.split('/');
                let sentinels = parts.next().and_then(hosts).ok_or_else(refused)?;
                let master = parts.next().filter(|m| !m.is_empty()).ok_or_else(refused)?;
                let db = match parts.next() {
                    None | Some("") => 0,
                    Some(db) => db.parse().map_err(|_| refused())?,
                };
                if parts.next().is_some() {
                    return Err(refused());
                }
                Ok(StoreSpec::Redis(RedisSpec::Sentinel {
                    sentinels,
                    master: master.to_owned(),
                    db,
                    tls: scheme == "rediss-sentinel",
                }))
            }
            "redis-cluster" | "rediss-cluster" => {
                let nodes = hosts(rest.trim_end_matches('/')).ok_or_else(refused)?;
                Ok(StoreSpec::Redis(RedisSpec::Cluster {
                    nodes,
                    tls: scheme == "rediss-cluster",
                }))
            }
            _ => Err(refused()),
        }
    }
}

/// How long a successful delivery is remembered.
pub const RETENTION: Duration = Duration::from_secs(5 * 24 * 3600);

/// A ledger entry: the message's tag, then a hash of (fingerprint, target, recipient).
pub type Key = [u8; 16];

/// How many leading octets of a [`Key`] name its message (shared by all its keys).
pub const MESSAGE_TAG: usize = 4;

/// How long a delivery still running when its client was told `451` at the reply bound is
/// marked in flight, at most: longer than a leg can run after the bound with the default
/// timeouts (connect 10 s, commands 60 s each, end of data 4 min). The leg clears the mark when
/// it ends; the expiry only matters if the relay stops first.
pub const IN_FLIGHT_FOR: Duration = Duration::from_secs(15 * 60);

/// What the ledger knows of one (message, target, recipient).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Recorded {
    Absent,
    /// Delivered by an earlier attempt: not sent again, and the client hears it delivered.
    Delivered,
    /// An earlier attempt's leg is still running (its client heard `451` at the reply bound):
    /// not sent again, and the client hears `451` until that leg ends. Without this a client
    /// that retries within minutes would deliver a second copy.
    InFlight,
}

/// Where successful deliveries are recorded: memory for one relay, Redis across replicas.
pub trait Ledger: Send + Sync + 'static {
    /// What is recorded of each of `keys` (delivered takes precedence over in flight).
    fn lookup<'a>(&'a self, keys: &'a [Key]) -> BoxFuture<'a, Result<Vec<Recorded>, StoreError>>;
    /// Records `keys` as delivered, for [`RETENTION`].
    fn record<'a>(&'a self, keys: &'a [Key]) -> BoxFuture<'a, Result<(), StoreError>>;
    /// Marks `keys` in flight for `ttl`.
    fn mark_in_flight<'a>(
        &'a self,
        keys: &'a [Key],
        ttl: Duration,
    ) -> BoxFuture<'a, Result<(), StoreError>>;
    /// Removes the in-flight marks of `keys` (what was delivered is [`Ledger::record`]ed first).
    fn clear_in_flight<'a>(&'a self, keys: &'a [Key]) -> BoxFuture<'a, Result<(), StoreError>>;
}

/// A rolling window is this many buckets (SPEC 3.4: at most 1/24 of its length).
pub const BUCKETS: u64 = 24;

/// The limits of SPEC 3.4.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Limit {
    UserMessagesPerDay,
    UserUniqueRecipientsPerDay,
    CustomerRecipientsPerDay,
    CustomerRecipientsPer10Minutes,
    /// A route's sending limits (`MailRoute.rateLimits`, SPEC 11).
    RouteMessagesPerMinute,
    RouteRecipientsPerMinute,
    RouteRecipientsPerDay,
    /// Connections open to a route's upstream at once (holds only, never settled).
    RouteConcurrentConnections,
}

impl Limit {
    /// The `limit` label of `mailroute_relay_quota_rejections_total`.
    pub fn as_str(self) -> &'static str {
        match self {
            Limit::UserMessagesPerDay => "user_messages_per_day",
            Limit::UserUniqueRecipientsPerDay => "user_unique_recipients_per_day",
            Limit::CustomerRecipientsPerDay => "customer_recipients_per_day",
            Limit::CustomerRecipientsPer10Minutes => "customer_recipients_per_10_minutes",
            Limit::RouteMessagesPerMinute => "messages_per_minute",
            Limit::RouteRecipientsPerMinute => "recipients_per_minute",
            Limit::RouteRecipientsPerDay => "recipients_per_day",
            Limit::RouteConcurrentConnections => "concurrent_connections",
        }
    }
}

/// One counter a recipient is checked against.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Counter {
    pub limit: Limit,
    /// The counter's name in the store; the tenant's part is in braces (a Redis hash tag, so
    /// a tenant's counters live together).
    pub key: String,
    pub max: u64,
    pub window: Duration,
    /// For unique counting: the recipient, lowercased. A recipient already counted in the
    /// window does not count again.
    pub member: Option<String>,
    /// `false`: counted but never refused (tenant limits for registered users, unless the
    /// tenant blocks all senders on its limit).
    pub enforce: bool,
}

impl Counter {
    /// Length of one bucket of the rolling window.
    pub fn bucket(&self) -> Duration {
        self.window / BUCKETS as u32
    }
}

/// What one recipient reserved: settled into the counts or released when its transaction ends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hold {
    pub id: String,
    pub counters: Vec<Counter>,
    /// Per counter: whether a unit was reserved (a unique recipient already counted reserves
    /// nothing).
    pub reserved: Vec<bool>,
}

/// A store's answer to a reservation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reservation {
    /// Per counter, whether a unit was reserved.
    Granted(Vec<bool>),
    /// The counter at this index is at its limit; nothing was reserved.
    Exceeded(usize),
}

/// Where the counts live. Every call is atomic: a reservation checks and reserves on all its
/// counters at once, or on none.
pub trait QuotaStore: Send + Sync + 'static {
    /// Reserves one unit on each counter unless one is at its limit (counting what is settled
    /// in the window and what other holds reserve). The hold expires after `ttl`.
    fn reserve<'a>(
        &'a self,
        hold: &'a str,
        counters: &'a [Counter],
        ttl: Duration,
    ) -> BoxFuture<'a, Result<Reservation, StoreError>>;
    /// Ends holds: settled into the counts when `accepted`, otherwise dropped.
    fn finish<'a>(
        &'a self,
        holds: &'a [Hold],
        accepted: bool,
    ) -> BoxFuture<'a, Result<(), StoreError>>;
    /// What each counter holds now: units settled in its window plus open holds (a unique
    /// counter: the distinct members settled in its window). Reads only.
    fn usage<'a>(&'a self, counters: &'a [Counter]) -> BoxFuture<'a, Result<Vec<u64>, StoreError>>;
    /// Extends an open hold to `ttl` from now; `false` when it is no longer held (expired,
    /// or ended), and nothing changes.
    fn renew<'a>(
        &'a self,
        hold: &'a Hold,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<bool, StoreError>>;
    /// How long settlements may be gathered before they are sent in one [`Self::finish`]:
    /// zero for a store in this process; a remote store's round trip is worth sharing.
    fn settle_window(&self) -> Duration {
        Duration::ZERO
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_specs_parse_or_name_what_is_expected() {
        assert_eq!("memory".parse::<StoreSpec>().ok(), Some(StoreSpec::Memory));
        assert_eq!(
            "rediss://cache:6380/2".parse::<StoreSpec>().ok(),
            Some(StoreSpec::Redis(RedisSpec::Single(
                "rediss://cache:6380/2".into()
            )))
        );
        assert_eq!(
            "redis-sentinel://s1:26379,[::1]:26380/mymaster/3"
                .parse::<StoreSpec>()
                .ok(),
            Some(StoreSpec::Redis(RedisSpec::Sentinel {
                sentinels: vec![("s1".into(), 26379), ("::1".into(), 26380)],
                master: "mymaster".into(),
                db: 3,
                tls: false,
            }))
        );
        assert_eq!(
            "rediss-cluster://a:7000,b:7001".parse::<StoreSpec>().ok(),
            Some(StoreSpec::Redis(RedisSpec::Cluster {
                nodes: vec![("a".into(), 7000), ("b".into(), 7001)],
                tls: true,
            }))
        );
        for wrong in [
            "mysql://x",
            "redis-sentinel://s1:26379",
            "redis-sentinel://s1/mymaster",
            "redis-sentinel://s1:26379/m/notadb",
            "redis-cluster://a:7000,b",
            "redis-cluster://",
        ] {
            let e = wrong.parse::<StoreSpec>().err().map(|e| e.to_string());
            assert!(
                e.as_ref()
                    .is_some_and(|e| e.contains("redis[s]-sentinel://HOST:PORT")),
                "{wrong}: {e:?}"
            );
        }
    }
}
