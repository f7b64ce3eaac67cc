//! Which Redis a decision goes to (SPEC 5.3a): one server (`redis://`), the master the
//! sentinels name (`redis-sentinel://`), or the Cluster node of the decision's slot
//! (`redis-cluster://`). [`super::redis::RedisStore`] sends its scripts through
//! [`Topology::connection`] and hands every answer to [`Topology::checked`], so a failover is
//! followed without a restart:
//!
//! - one server: the `redis` crate's `ConnectionManager` reconnects after a failure;
//! - Sentinel: the master is asked of the sentinels (which connect to it and check its `ROLE`)
//!   when there is no connection; a connection error, a timeout or a `READONLY` answer (the
//!   old master demoted) drops the connection, so the next decision asks the sentinels again;
//! - Cluster: the `redis` crate's cluster client follows `MOVED` and `ASK` and refreshes its
//!   slot map; every key of one decision has one hash tag, so each decision is one slot.
//!
//! Every connection is made lazily: the relay starts, and answers `451 4.3.0`, while the store
//! is away.

use super::{RedisAuth, RedisSpec, StoreError};
use arc_swap::ArcSwapOption;
use redis::aio::{
    ConnectionLike, ConnectionManager, ConnectionManagerConfig, MultiplexedConnection,
};
use redis::cluster_async::ClusterConnection;
use redis::sentinel::{SentinelClient, SentinelClientBuilder, SentinelServerType};
use redis::{
    AsyncConnectionConfig, Cmd, ConnectionAddr, ErrorKind, Pipeline, RedisError, RedisFuture,
    ServerErrorKind, TlsMode, Value,
};
use std::sync::Arc;
use std::time::Duration;

/// How the store reaches Redis.
pub enum Topology {
    Single(ConnectionManager),
    Sentinel(Sentinel),
    Cluster(Cluster),
}

/// The master the sentinels name, and the connection to it while it works.
pub struct Sentinel {
    client: tokio::sync::Mutex<SentinelClient>,
    current: ArcSwapOption<MultiplexedConnection>,
    config: AsyncConnectionConfig,
    timeout: Duration,
}

/// A Redis Cluster, connected at first use.
pub struct Cluster {
    client: redis::cluster::ClusterClient,
    connection: tokio::sync::OnceCell<ClusterConnection>,
    timeout: Duration,
}

/// One decision's connection.
#[derive(Clone)]
pub enum Connection {
    Single(ConnectionManager),
    Multiplexed(MultiplexedConnection),
    Cluster(ClusterConnection),
}

fn unavailable(e: RedisError) -> StoreError {
    StoreError(e.to_string())
}

fn addr(host: &str, port: u16, tls: bool) -> ConnectionAddr {
    if tls {
        ConnectionAddr::TcpTls {
            host: host.to_owned(),
            port,
            insecure: false,
            tls_params: None,
        }
    } else {
        ConnectionAddr::Tcp(host.to_owned(), port)
    }
}

impl Topology {
    pub fn new(spec: &RedisSpec, auth: &RedisAuth, timeout: Duration) -> Result<Self, StoreError> {
        match spec {
            RedisSpec::Single(url) => {
                let mut info: redis::ConnectionInfo =
                    redis::IntoConnectionInfo::into_connection_info(url.as_str())
                        .map_err(unavailable)?;
                if let Some(password) = &auth.password
                    && info.redis_settings().password().is_none()
                {
                    let settings = info.redis_settings().clone().set_password(password);
                    info = info.set_redis_settings(settings);
                }
                let client = redis::Client::open(info).map_err(unavailable)?;
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(timeout))
                    .set_response_timeout(Some(timeout))
                    .set_number_of_retries(1)
                    .set_max_delay(Duration::from_millis(500));
                let manager =
                    ConnectionManager::new_lazy_with_config(client, config).map_err(unavailable)?;
                Ok(Self::Single(manager))
            }
            RedisSpec::Sentinel {
                sentinels,
                master,
                db,
                tls,
            } => {
                let addrs = sentinels.iter().map(|(h, p)| addr(h, *p, *tls));
                let mut builder =
                    SentinelClientBuilder::new(addrs, master, SentinelServerType::Master)
                        .map_err(unavailable)?
                        .set_client_to_redis_db(*db);
                if *tls {
                    builder = builder
                        .set_client_to_redis_tls_mode(TlsMode::Secure)
                        .set_client_to_sentinel_tls_mode(TlsMode::Secure);
                }
                if let Some(password) = &auth.password {
                    builder = builder.set_client_to_redis_password(password);
                }
                if let Some(password) = &auth.sentinel_password {
                    builder = builder.set_client_to_sentinel_password(password);
                }
                let client = builder.build().map_err(unavailable)?;
                Ok(Self::Sentinel(Sentinel {
                    client: tokio::sync::Mutex::new(client),
                    current: ArcSwapOption::empty(),
                    config: AsyncConnectionConfig::new()
                        .set_connection_timeout(Some(timeout))
                        .set_response_timeout(Some(timeout)),
                    timeout,
                }))
            }
            RedisSpec::Cluster { nodes, tls } => {
                let scheme = if *tls { "rediss" } else { "redis" };
                let urls: Vec<String> = nodes
                    .iter()
                    .map(|(h, p)| format!("{scheme}://{h}:{p}"))
                    .collect();
                let mut builder = redis::cluster::ClusterClientBuilder::new(urls)
                    .connection_timeout(timeout)
                    .response_timeout(timeout)
                    // NB: the crate waits at least 1.28 s before retrying a TRYAGAIN (a slot
                    // half moved) by default, longer than a decision may take; a move is
                    // over in milliseconds, so retry soon and a few times.
                    .retries(4)
                    .min_retry_wait(5)
                    .retry_wait_formula(5, 2)
                    .max_retry_wait(100);
                if let Some(password) = &auth.password {
                    builder = builder.password(password);
                }
                let client = builder.build().map_err(unavailable)?;
                Ok(Self::Cluster(Cluster {
                    client,
                    connection: tokio::sync::OnceCell::new(),
                    timeout,
                }))
            }
        }
    }

    /// A connection for one decision.
    pub async fn connection(&self) -> Result<Connection, StoreError> {
        match self {
            Self::Single(manager) => Ok(Connection::Single(manager.clone())),
            Self::Sentinel(sentinel) => sentinel.connection().await.map(Connection::Multiplexed),
            Self::Cluster(cluster) => {
                let connect = cluster.connection.get_or_try_init(|| async {
                    tokio::time::timeout(cluster.timeout, cluster.client.get_async_connection())
                        .await
                        .map_err(|_| StoreError("no Redis Cluster node answered in time".into()))?
                        .map_err(unavailable)
                });
                connect.await.cloned().map(Connection::Cluster)
            }
        }
    }

    /// `answer` as the store's result; a failure that means the master may have changed makes
    /// the next decision look it up again.
    pub fn checked<T>(&self, answer: Result<T, RedisError>) -> Result<T, StoreError> {
        answer.map_err(|e| {
            if let Self::Sentinel(sentinel) = self
                && master_lost(&e)
            {
                tracing::info!(error = %e, "Redis master lost; asking the sentinels again");
                sentinel.current.store(None);
            }
            unavailable(e)
        })
    }
}

impl Topology {
    /// An operation ran out of time: behind Sentinel the master may be gone without a word
    /// (a host down, a partition), so the next decision looks it up again.
    pub fn timed_out(&self) {
        if let Self::Sentinel(sentinel) = self {
            sentinel.current.store(None);
        }
    }
}

/// Whether an error means the connection no longer leads to a master.
fn master_lost(e: &RedisError) -> bool {
    e.is_io_error()
        || e.is_timeout()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || e.kind() == ErrorKind::Server(ServerErrorKind::ReadOnly)
        || e.to_string().contains("READONLY")
}

impl Sentinel {
    async fn connection(&self) -> Result<MultiplexedConnection, StoreError> {
        if let Some(current) = self.current.load_full() {
            return Ok((*current).clone());
        }
        let mut client = self.client.lock().await;
        // NB: another decision may have looked the master up while this one waited.
        if let Some(current) = self.current.load_full() {
            return Ok((*current).clone());
        }
        let lookup = client.get_async_connection_with_config(&self.config);
        let connection = tokio::time::timeout(self.timeout, lookup)
            .await
            .map_err(|_| StoreError("the sentinels named no master in time".into()))?
            .map_err(unavailable)?;
        self.current.store(Some(Arc::new(connection.clone())));
        Ok(connection)
    }
}

impl ConnectionLike for Connection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::Single(c) => c.req_packed_command(cmd),
            Self::Multiplexed(c) => c.req_packed_command(cmd),
            Self::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Self::Single(c) => c.req_packed_commands(cmd, offset, count),
            Self::Multiplexed(c) => c.req_packed_commands(cmd, offset, count),
            Self::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Single(c) => c.get_db(),
            Self::Multiplexed(c) => c.get_db(),
            Self::Cluster(c) => c.get_db(),
        }
    }
}
