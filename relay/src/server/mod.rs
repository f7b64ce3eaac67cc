//! Listeners and sessions: accepts connections on the smtp, submission and smtps listeners,
//! runs each session's driver, limits concurrent sessions, and shuts down gracefully.

pub mod clients;
mod connection;
pub mod proxy;
pub mod tls;

use crate::auth::throttle::AuthThrottle;
use crate::interfaces::{Admit, Authenticator, Deliver};
use crate::metrics::Metrics;
use crate::reply::Reply;
use crate::smtp::session::{ListenerKind, SessionConfig};
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};
use tracing::Instrument;

/// Time and size limits of the server.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Deadline for each command, from the end of the previous one (RFC 5321 section
    /// 4.5.3.2.7: at least 5 minutes). A client trickling bytes does not extend it.
    pub idle_timeout: Duration,
    /// Waiting for the next block of message content (RFC 5321 section 4.5.3.2.5: 3 minutes).
    pub data_timeout: Duration,
    /// Deadline for the whole content of one message, from `354` or the first BDAT.
    pub data_total_timeout: Duration,
    /// Sessions one client address may hold at once (IPv6: one /64); more are told
    /// `421 4.7.0` and closed.
    pub max_sessions_per_ip: usize,
    /// Longest session, whatever it does.
    pub max_session_duration: Duration,
    /// Sessions open at once; more are told `421 4.3.2` and closed.
    pub max_sessions: usize,
    pub tls_handshake_timeout: Duration,
    /// Bound on the wait for delivery after end of data (below the client's 10 minutes).
    pub end_of_data_timeout: Duration,
    /// How long transactions in flight may take to finish after a shutdown request.
    pub shutdown_grace: Duration,
    /// Wait this long before the greeting; a client that talks meanwhile is refused (as
    /// Postfix's postscreen pregreet test). 0: only bytes already waiting are detected.
    pub greet_delay: Duration,
    /// Every connection starts with a PROXY protocol v1 or v2 header (behind a load balancer),
    /// from the sources in `proxy_trusted`, or from any source when that is empty.
    pub proxy_protocol: bool,
    /// `--proxy-trusted`: the load balancers whose PROXY headers are believed.
    pub proxy_trusted: Vec<ipnet::IpNet>,
}

impl Limits {
    /// Whether a connection from `source` must begin with a PROXY header.
    pub fn expects_proxy_header(&self, source: std::net::IpAddr) -> bool {
        let source = mailroute_config::net::canonical_client(source);
        self.proxy_protocol
            && (self.proxy_trusted.is_empty()
                || self.proxy_trusted.iter().any(|net| net.contains(&source)))
    }
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            idle_timeout: Duration::from_secs(300),
            data_timeout: Duration::from_secs(180),
            data_total_timeout: Duration::from_secs(600),
            max_sessions_per_ip: 50,
            max_session_duration: Duration::from_secs(3600),
            max_sessions: 20_000,
            tls_handshake_timeout: Duration::from_secs(30),
            end_of_data_timeout: Duration::from_secs(300),
            shutdown_grace: Duration::from_secs(30),
            greet_delay: Duration::ZERO,
            proxy_protocol: false,
            proxy_trusted: Vec::new(),
        }
    }
}

/// One generation of the configuration: everything a session consults that a reload changes,
/// swapped as a whole. A session picks up a new generation only between transactions, so each
/// transaction is evaluated against the generation it started with.
pub struct Generation {
    /// `mailroute_relay_config_generation`.
    pub number: u64,
    /// The configuration's fingerprint (`Loaded::fingerprint`: document and credentials); a
    /// reload with the same fingerprint changes nothing.
    pub hash: String,
    pub session: Arc<SessionConfig>,
    pub deliver: Arc<dyn Deliver>,
    pub auth: Arc<dyn Authenticator>,
    /// The RCPT decision (`crate::admission`); `None` accepts what the session's own checks
    /// accept (protocol tests).
    pub admit: Option<Arc<dyn Admit>>,
}

impl std::fmt::Debug for Generation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Generation")
            .field("number", &self.number)
            .field("session", &self.session)
            .finish_non_exhaustive()
    }
}

/// What every session of a server shares.
pub struct Shared {
    /// The configuration in force; replaced by reloads.
    pub generation: arc_swap::ArcSwap<Generation>,
    /// Sessions open per client address.
    pub clients: clients::Clients,
    /// Name in the greeting and in `421` replies.
    pub hostname: String,
    pub limits: Limits,
    pub tls: Option<tokio_rustls::TlsAcceptor>,
    pub throttle: AuthThrottle,
    pub metrics: Arc<Metrics>,
    /// False from the moment shutdown starts (`/readyz`).
    pub ready: Arc<AtomicBool>,
}

impl Shared {
    /// Puts `generation` in force for new sessions and for existing ones between transactions.
    pub fn install(&self, generation: Generation) {
        self.metrics
            .config_generation
            .set(i64::try_from(generation.number).unwrap_or(i64::MAX));
        self.generation.store(Arc::new(generation));
    }
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("hostname", &self.hostname)
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

/// Bound listeners and what the sessions share.
pub struct Server {
    shared: Arc<Shared>,
    listeners: Vec<(ListenerKind, TcpListener)>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("listeners", &self.listeners.len())
            .finish()
    }
}

/// Binds a listener with the largest accept queue the system allows (`net.core.somaxconn`), so
/// a burst of connections is queued rather than dropped (a dropped SYN costs the client a
/// retransmission, a second or more).
pub fn bind(addr: std::net::SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    let backlog = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .ok()
        .and_then(|v| v.trim().parse::<u32>().ok())
        .unwrap_or(4096)
        .clamp(1024, 65_535);
    socket.listen(backlog)
}

static SESSION_COUNTER: AtomicU64 = AtomicU64::new(0);

/// A session id unique in this process and unlikely to repeat across restarts.
fn next_session_id() -> String {
    static PREFIX: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let prefix = PREFIX.get_or_init(|| {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        format!(
            "{:x}{:04x}",
            (nanos / 1_000_000) as u64,
            std::process::id() & 0xffff
        )
    });
    format!(
        "{prefix}{:06x}",
        SESSION_COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

impl Server {
    pub fn new(shared: Arc<Shared>, listeners: Vec<(ListenerKind, TcpListener)>) -> Self {
        Self { shared, listeners }
    }

    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Serves until `shutdown` completes, then stops accepting, tells idle sessions
    /// `421 4.3.2`, lets transactions in flight finish for up to the grace period, and returns.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let (stop_tx, stop_rx) = watch::channel(false);
        let max = self.shared.limits.max_sessions;
        let permits = Arc::new(Semaphore::new(max));
        let mut accept_loops = Vec::new();
        for (kind, listener) in self.listeners {
            let shared = Arc::clone(&self.shared);
            let permits = Arc::clone(&permits);
            let stop = stop_rx.clone();
            accept_loops.push(tokio::spawn(accept_loop(
                kind, listener, shared, permits, stop,
            )));
        }
        self.shared.ready.store(true, Ordering::SeqCst);
        shutdown.await;
        self.shared.ready.store(false, Ordering::SeqCst);
        tracing::info!("shutting down: no new connections, idle sessions told 421");
        let _ = stop_tx.send(true);
        for task in accept_loops {
            let _ = task.await;
        }
        let all = u32::try_from(max).unwrap_or(u32::MAX);
        match tokio::time::timeout(self.shared.limits.shutdown_grace, permits.acquire_many(all))
            .await
        {
            Ok(_) => tracing::info!("every session ended"),
            Err(_) => tracing::warn!("shutdown grace period over with sessions still open"),
        }
    }
}

async fn accept_loop(
    kind: ListenerKind,
    listener: TcpListener,
    shared: Arc<Shared>,
    permits: Arc<Semaphore>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = stop.changed() => return,
        };
        let (stream, peer) = match accepted {
            Ok(pair) => pair,
            Err(e) => {
                // NB: EMFILE and friends: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let Ok(permit) = Arc::clone(&permits).try_acquire_owned() else {
            count_refused(&shared, kind, "too_many_sessions");
            let hostname = shared.hostname.clone();
            tokio::spawn(refuse_busy(stream, hostname));
            continue;
        };
        let shared = Arc::clone(&shared);
        let stop = stop.clone();
        tokio::spawn(async move {
            shared.metrics.sessions_active.inc();
            serve(stream, peer, kind, Arc::clone(&shared), stop).await;
            shared.metrics.sessions_active.dec();
            drop(permit);
        });
    }
}

async fn serve(
    mut stream: TcpStream,
    socket_peer: std::net::SocketAddr,
    kind: ListenerKind,
    shared: Arc<Shared>,
    stop: watch::Receiver<bool>,
) {
    let id = next_session_id();
    let mut peer = socket_peer;
    let mut early = Vec::new();
    let limits = &shared.limits;
    if limits.expects_proxy_header(socket_peer.ip()) {
        match proxy::read_header(&mut stream, limits.tls_handshake_timeout).await {
            Ok((source, rest)) => {
                if let Some(source) = source {
                    peer = source;
                }
                early = rest;
            }
            Err(e) => {
                tracing::warn!(%socket_peer, error = %e, "connection dropped: PROXY header expected");
                count_refused(&shared, kind, "proxy_invalid");
                return;
            }
        }
    }
    let Some(_slot) = shared.clients.admit(peer.ip(), limits.max_sessions_per_ip) else {
        tracing::info!(%peer, "too many sessions from this client address");
        count_refused(&shared, kind, "too_many_from_client");
        if kind != ListenerKind::Smtps {
            let mut out = Vec::new();
            Reply::too_many_sessions_from_client(&shared.hostname).write_to(&mut out);
            let _ = tokio::time::timeout(Duration::from_secs(5), stream.write_all(&out)).await;
        }
        return;
    };
    let conn = match kind {
        ListenerKind::Smtps => {
            let Some(acceptor) = shared.tls.clone() else {
                return;
            };
            // NB: what followed the PROXY header in its segment is the ClientHello.
            let io = proxy::Rewind::new(stream, early);
            match tokio::time::timeout(limits.tls_handshake_timeout, acceptor.accept(io)).await {
                Ok(Ok(tls)) => {
                    connection::count_tls(&shared, kind, "success");
                    connection::Conn::Tls(Box::new(tls))
                }
                Ok(Err(e)) => {
                    connection::count_tls(&shared, kind, "failure");
                    tracing::info!(%peer, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    connection::count_tls(&shared, kind, "timeout");
                    return;
                }
            }
        }
        ListenerKind::Smtp | ListenerKind::Submission => {
            // A client that talks before the greeting is not waiting for it (RFC 5321
            // section 4.3.1): a spam engine, a protocol confusion, or a PROXY header from a
            // source not trusted to send one (SPEC 5.1).
            if early.is_empty() && !limits.greet_delay.is_zero() {
                let _ = tokio::time::timeout(limits.greet_delay, stream.readable()).await;
            }
            let mut probe = [0u8; 6];
            let peeked = stream.try_read(&mut probe).unwrap_or_default();
            if !early.is_empty() || peeked > 0 {
                let proxy_line = probe[..peeked].starts_with(b"PROXY")
                    || probe[..peeked].starts_with(b"\r\n\r\n\0\r");
                let reason = if early.is_empty() && proxy_line {
                    tracing::info!(%peer, "PROXY header from a source not trusted to send one");
                    "proxy_untrusted"
                } else {
                    "pregreet"
                };
                count_refused(&shared, kind, reason);
                let mut out = Vec::new();
                Reply::talked_before_greeting().write_to(&mut out);
                let _ = stream.write_all(&out).await;
                return;
            }
            connection::Conn::Plain(proxy::Rewind::new(stream, Vec::new()))
        }
    };
    // NB: instrument the future rather than entering the span: a guard held across an await
    // would tag other sessions' log lines running on the same thread.
    let span = tracing::info_span!("session", id = %id, %peer, listener = kind.as_str());
    connection::drive(conn, peer, kind, shared, stop, id)
        .instrument(span)
        .await;
}

/// `mailroute_relay_connections_refused_total`.
fn count_refused(shared: &Shared, listener: ListenerKind, reason: &'static str) {
    shared
        .metrics
        .connections_refused
        .get_or_create(&crate::metrics::ListenerResultLabels {
            listener: listener.as_str(),
            result: reason,
        })
        .inc();
}

async fn refuse_busy(mut stream: TcpStream, hostname: String) {
    let mut out = Vec::new();
    Reply::too_many_sessions(&hostname).write_to(&mut out);
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.write_all(&out)).await;
}
