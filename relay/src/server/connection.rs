//! The thin I/O driver of one SMTP session: reads, feeds [`Session`], writes replies, and
//! carries out the session's events (TLS upgrade, credential check, delivery) with timeouts.

use super::{Generation, Shared};
use crate::interfaces::{AuthCheck, RefusalReason};
use crate::metrics::{ListenerResultLabels, RefusalLabels};
use crate::reply::Reply;
use crate::smtp::sasl::Secret;
use crate::smtp::session::{AuthOutcome, Event, ListenerKind, Session, TlsInfo};
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::{Instant, timeout};

use tokio_rustls::server::TlsStream;

/// The socket, with what was read past a PROXY header still to be read.
pub(crate) type Io = super::proxy::Rewind<TcpStream>;

/// A plaintext or TLS connection.
pub(crate) enum Conn {
    Plain(Io),
    Tls(Box<TlsStream<Io>>),
    /// The stream was handed to the TLS acceptor (only while a handshake runs).
    Detached,
}

fn detached() -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::NotConnected,
        "stream detached for TLS handshake",
    )
}

impl Conn {
    async fn read_buf(&mut self, buf: &mut Vec<u8>) -> std::io::Result<usize> {
        match self {
            Conn::Plain(s) => s.read_buf(buf).await,
            Conn::Tls(s) => s.read_buf(buf).await,
            Conn::Detached => Err(detached()),
        }
    }

    async fn write_all(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        match self {
            Conn::Plain(s) => s.write_all(bytes).await,
            Conn::Tls(s) => {
                s.write_all(bytes).await?;
                s.flush().await
            }
            Conn::Detached => Err(detached()),
        }
    }

    async fn shutdown(&mut self) {
        let _ = match self {
            Conn::Plain(s) => s.shutdown().await,
            Conn::Tls(s) => s.shutdown().await,
            Conn::Detached => Ok(()),
        };
    }

    fn tls_info(&self) -> Option<TlsInfo> {
        match self {
            Conn::Plain(_) | Conn::Detached => None,
            Conn::Tls(s) => {
                let (_, conn) = s.get_ref();
                Some(TlsInfo {
                    version: super::tls::version_name(conn.protocol_version()),
                    cipher: conn
                        .negotiated_cipher_suite()
                        .map(|c| format!("{:?}", c.suite()))
                        .unwrap_or_default(),
                })
            }
        }
    }
}

/// Why the session ended early.
enum End {
    /// Close after writing what is buffered.
    Close,
}

/// The configuration generation a session uses, and the transaction the admission holds
/// something for (quota reservations) until it ends.
struct Current {
    generation: Arc<Generation>,
    open: Option<Arc<str>>,
}

impl Current {
    /// Takes the generation in force now (only between transactions, once what the last one
    /// reserved was given back to the generation that reserved it).
    fn refresh(&mut self, shared: &Shared, session: &mut Session) {
        let latest = shared.generation.load();
        if self.open.is_none() && !Arc::ptr_eq(&latest, &self.generation) {
            self.generation = Arc::clone(&latest);
            session.reconfigure(Arc::clone(&self.generation.session));
        }
    }

    /// Tells the admission that the open transaction ended (`accepted`: the client heard 250).
    async fn end(&mut self, accepted: bool) {
        let Some(transaction) = self.open.take() else {
            return;
        };
        if let Some(admit) = &self.generation.admit {
            admit.end(&transaction, accepted).await;
        }
    }
}

/// Runs one session to its end.
pub(crate) async fn drive(
    conn: Conn,
    peer: SocketAddr,
    listener: ListenerKind,
    shared: Arc<Shared>,
    shutdown: watch::Receiver<bool>,
    id: String,
) {
    let mut current = Current {
        generation: shared.generation.load_full(),
        open: None,
    };
    run(conn, peer, listener, &shared, shutdown, id, &mut current).await;
    // NB: a client that disconnects in the middle of a transaction releases what it held.
    current.end(false).await;
}

async fn run(
    mut conn: Conn,
    peer: SocketAddr,
    listener: ListenerKind,
    shared: &Arc<Shared>,
    mut shutdown: watch::Receiver<bool>,
    id: String,
    current: &mut Current,
) {
    let limits = &shared.limits;
    let mut session = Session::new(
        Arc::clone(&current.generation.session),
        id,
        peer,
        listener,
        conn.tls_info(),
    );
    let mut out = Vec::with_capacity(256);
    session.greeting().write_to(&mut out);
    if conn.write_all(&out).await.is_err() {
        return;
    }
    out.clear();
    let deadline = Instant::now() + limits.max_session_duration;
    // NB: deadlines, not read timeouts: a client trickling a byte at a time does not extend
    // them (RFC 5321 section 4.5.3.2: 5 minutes a command; 3 minutes a block of content and
    // 10 minutes for all of it).
    let mut command_deadline = Instant::now() + limits.idle_timeout;
    let mut content_deadline: Option<Instant> = None;
    let mut input: Vec<u8> = Vec::new();
    loop {
        if *shutdown.borrow() && !session.in_transaction() {
            Reply::shutting_down(&shared.hostname).write_to(&mut out);
            break;
        }
        let receiving = session.receiving_content();
        let wait_until = if receiving {
            let all =
                *content_deadline.get_or_insert_with(|| Instant::now() + limits.data_total_timeout);
            all.min(Instant::now() + limits.data_timeout)
        } else {
            content_deadline = None;
            command_deadline
        };
        input.reserve(4096);
        let read = tokio::select! {
            r = tokio::time::timeout_at(wait_until, conn.read_buf(&mut input)) => r,
            _ = shutdown.changed(), if !session.in_transaction() => {
                Reply::shutting_down(&shared.hostname).write_to(&mut out);
                break;
            }
            _ = tokio::time::sleep_until(deadline) => {
                Reply::session_too_long(&shared.hostname).write_to(&mut out);
                break;
            }
        };
        match read {
            Ok(Ok(0)) | Ok(Err(_)) => return finish(shared, &conn, listener),
            Ok(Ok(n)) => {
                shared.metrics.bytes_received.inc_by(n as u64);
            }
            Err(_) => {
                let reply = if receiving {
                    Reply::data_timeout(&shared.hostname)
                } else {
                    Reply::idle_timeout(&shared.hostname)
                };
                reply.write_to(&mut out);
                break;
            }
        }
        if !session.in_transaction() {
            // NB: before the input is read too, so a command that arrives after a reload (an
            // AUTH with a password just rotated out) meets the configuration in force.
            current.refresh(shared, &mut session);
        }
        let lines_before = session.lines();
        let processed = process(
            &mut session,
            &mut conn,
            &mut input,
            &mut out,
            shared,
            peer,
            current,
        )
        .await;
        if !session.in_transaction() {
            // RSET, a new STARTTLS, a refused message: nothing of it will be accepted.
            current.end(false).await;
            // Between transactions: the next one uses the configuration in force now.
            current.refresh(shared, &mut session);
        }
        match processed {
            Ok(()) => {}
            Err(End::Close) => break,
        }
        if !out.is_empty() {
            if conn.write_all(&out).await.is_err() {
                return finish(shared, &conn, listener);
            }
            out.clear();
        }
        if session.lines() != lines_before {
            // A whole command arrived: the next one has its own deadline. (Bytes of a line
            // not yet ended, or of an over-long line being skipped, are no progress.)
            command_deadline = Instant::now() + limits.idle_timeout;
        }
        if input.is_empty() && input.capacity() > 64 * 1024 {
            input = Vec::new();
        }
    }
    if !out.is_empty() {
        let _ = timeout(limits.idle_timeout, conn.write_all(&out)).await;
    }
    conn.shutdown().await;
    finish(shared, &conn, listener);
}

fn finish(shared: &Shared, conn: &Conn, listener: ListenerKind) {
    let tls = if matches!(conn, Conn::Tls(_)) {
        "yes"
    } else {
        "no"
    };
    shared
        .metrics
        .sessions
        .get_or_create(&crate::metrics::SessionLabels {
            listener: listener.as_str().to_owned(),
            tls: tls.to_owned(),
        })
        .inc();
}

/// Feeds buffered input to the session until it needs more, carrying out its events.
async fn process(
    session: &mut Session,
    conn: &mut Conn,
    input: &mut Vec<u8>,
    out: &mut Vec<u8>,
    shared: &Arc<Shared>,
    peer: SocketAddr,
    current: &mut Current,
) -> Result<(), End> {
    loop {
        let mut events = Vec::new();
        let consumed = session.receive(input, &mut events);
        input.drain(..consumed);
        let mut queue: VecDeque<Event> = events.into();
        let mut resumed = false;
        while let Some(event) = queue.pop_front() {
            let mut more = Vec::new();
            match event {
                Event::Reply(reply) => reply.write_to(out),
                Event::Close => return Err(End::Close),
                Event::StartTls => {
                    // NB: anything the client pipelined after STARTTLS was consumed by the
                    // session; clear what this driver still holds too.
                    input.clear();
                    if conn.write_all(out).await.is_err() {
                        return Err(End::Close);
                    }
                    out.clear();
                    let Some(acceptor) = shared.tls.clone() else {
                        return Err(End::Close);
                    };
                    let Conn::Plain(stream) = std::mem::replace(conn, Conn::Detached) else {
                        return Err(End::Close);
                    };
                    let handshake =
                        timeout(shared.limits.tls_handshake_timeout, acceptor.accept(stream)).await;
                    let result = match &handshake {
                        Ok(Ok(_)) => "success",
                        Ok(Err(_)) => "failure",
                        Err(_) => "timeout",
                    };
                    count_tls(shared, session.listener(), result);
                    match handshake {
                        Ok(Ok(tls)) => {
                            *conn = Conn::Tls(Box::new(tls));
                            if let Some(info) = conn.tls_info() {
                                session.tls_started(info);
                            }
                            resumed = true;
                        }
                        Ok(Err(e)) => {
                            tracing::info!(error = %e, "STARTTLS handshake failed");
                            return Err(End::Close);
                        }
                        Err(_) => {
                            tracing::info!("STARTTLS handshake timed out");
                            return Err(End::Close);
                        }
                    }
                }
                Event::Authenticate { username, secret } => {
                    let auth = current.generation.auth.as_ref();
                    let (outcome, identity) = match &secret {
                        Secret::Password(password) => (
                            shared
                                .throttle
                                .check(peer.ip(), &username, password, auth)
                                .await,
                            username.clone(),
                        ),
                        Secret::Bearer(token) => {
                            let mut identity = String::new();
                            let outcome = shared
                                .throttle
                                .attempt(peer.ip(), async {
                                    match auth.check_bearer(token).await {
                                        Ok(subject) => {
                                            identity = subject;
                                            AuthCheck::Accepted
                                        }
                                        Err(why) => {
                                            // NB: why, never the token.
                                            tracing::info!(username = %username, reason = %why, "service-account token refused");
                                            AuthCheck::Refused
                                        }
                                    }
                                })
                                .await;
                            (outcome, identity)
                        }
                    };
                    let result = match outcome {
                        AuthOutcome::Accepted => "accepted",
                        AuthOutcome::Refused => "refused",
                        AuthOutcome::Throttled => "throttled",
                        AuthOutcome::Busy => "busy",
                    };
                    shared
                        .metrics
                        .auth
                        .get_or_create(&ListenerResultLabels {
                            listener: session.listener().as_str(),
                            result,
                        })
                        .inc();
                    if outcome != AuthOutcome::Accepted {
                        tracing::info!(username = %username, result, "authentication failed");
                    }
                    session.auth_result(&identity, outcome, &mut more);
                    resumed = true;
                }
                Event::CheckRecipient(query) => {
                    if current.open.as_ref() != Some(&query.transaction) {
                        // What an earlier transaction reserved, ended by a command pipelined in
                        // the same read (RSET): released before the next one asks.
                        current.end(false).await;
                    }
                    let verdict = match &current.generation.admit {
                        None => Err(crate::interfaces::Refusal::new(
                            RefusalReason::RelayDenied,
                            Reply::new(550, "5.7.1", "Relaying denied"),
                        )),
                        Some(admit) => admit.admit(&query).await,
                    };
                    current.open = Some(Arc::clone(&query.transaction));
                    match &verdict {
                        Ok(admitted) => {
                            tracing::debug!(transaction = %query.transaction, tenant = admitted.tenant.as_deref(), direction = admitted.route.direction.as_str(), target = %admitted.route.target, "recipient accepted");
                        }
                        Err(refusal) => {
                            count_refusal(shared, refusal.tenant.as_deref(), refusal.reason);
                            tracing::info!(transaction = %query.transaction, reason = refusal.reason.as_str(), reply = %refusal.reply, "recipient refused");
                        }
                    }
                    session.recipient_checked(verdict, &mut more);
                    resumed = true;
                }
                Event::RecipientRefused(reason) => count_refusal(shared, None, reason),
                Event::Message(transaction) => {
                    if !out.is_empty() {
                        if conn.write_all(out).await.is_err() {
                            return Err(End::Close);
                        }
                        out.clear();
                    }
                    let id = transaction.id.clone();
                    let deadline = std::time::Instant::now() + shared.limits.end_of_data_timeout;
                    let delivery =
                        Arc::clone(&current.generation.deliver).deliver(transaction, deadline);
                    // NB: the delivery answers by the deadline itself (what succeeded is in the
                    // ledger by then); this guard, a little later, is for one that does not.
                    let reply = match timeout(
                        shared.limits.end_of_data_timeout + DELIVERY_GRACE,
                        delivery,
                    )
                    .await
                    {
                        Ok(reply) => reply,
                        Err(_) => {
                            tracing::warn!(transaction = %id, "delivery did not finish within the reply bound");
                            Reply::new(
                                451,
                                "4.4.5",
                                "Delivery did not finish in time; try again later",
                            )
                        }
                    };
                    current.open = Some(id);
                    current.end(reply.is_positive()).await;
                    session.delivered(reply, &mut more);
                    resumed = true;
                }
            }
            queue.extend(more);
        }
        if !resumed || input.is_empty() || session.is_closed() {
            return Ok(());
        }
    }
}

/// How long past the reply bound the driver waits for a delivery's own answer (its ledger
/// write) before answering `451 4.4.5` itself.
const DELIVERY_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

/// `mailroute_relay_rcpt_refusals_total`.
fn count_refusal(shared: &Shared, tenant: Option<&str>, reason: RefusalReason) {
    shared
        .metrics
        .rcpt_refusals
        .get_or_create(&RefusalLabels {
            tenant: tenant.unwrap_or("none").to_owned(),
            reason: reason.as_str(),
        })
        .inc();
}

/// `mailroute_relay_tls_handshakes_total`.
pub(super) fn count_tls(shared: &Shared, listener: ListenerKind, result: &'static str) {
    shared
        .metrics
        .tls_handshakes
        .get_or_create(&ListenerResultLabels {
            listener: listener.as_str(),
            result,
        })
        .inc();
}
