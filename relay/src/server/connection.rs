//! The thin I/O driver of one SMTP session: reads, feeds [`Session`], writes replies, and
//! carries out the session's events (TLS upgrade, credential check, delivery) with timeouts.

use super::{Generation, Shared};
use crate::smtp::reply::Reply;
use crate::smtp::session::{AuthOutcome, Event, ListenerKind, Session, TlsInfo};
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::{Instant, timeout};
use tokio_rustls::server::TlsStream;

/// A plaintext or TLS connection.
pub(crate) enum Conn {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
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

/// The configuration generation a session uses, and what its current transaction reserved
/// at RCPT time (quotas) until the transaction ends.
struct Current {
    generation: Arc<Generation>,
    holds: Vec<crate::quota::Hold>,
}

impl Current {
    /// Settles (`accepted`) or releases everything held.
    async fn finish(&mut self, accepted: bool) {
        if self.holds.is_empty() {
            return;
        }
        if let Some(admit) = &self.generation.admit {
            admit
                .finish(std::mem::take(&mut self.holds), accepted)
                .await;
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
        holds: Vec::new(),
    };
    run(conn, peer, listener, &shared, shutdown, id, &mut current).await;
    // NB: a client that disconnects in the middle of a transaction releases what it held.
    current.finish(false).await;
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
    let mut input: Vec<u8> = Vec::new();
    loop {
        if *shutdown.borrow() && !session.in_transaction() {
            Reply::shutting_down(&shared.hostname).write_to(&mut out);
            break;
        }
        let wait = if session.receiving_content() {
            limits.data_timeout
        } else {
            limits.idle_timeout
        };
        input.reserve(4096);
        let read = tokio::select! {
            r = timeout(wait, conn.read_buf(&mut input)) => r,
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
                let reply = if session.receiving_content() {
                    Reply::data_timeout(&shared.hostname)
                } else {
                    Reply::idle_timeout(&shared.hostname)
                };
                reply.write_to(&mut out);
                break;
            }
        }
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
            current.finish(false).await;
            // Between transactions: the next one uses the configuration in force now.
            let latest = shared.generation.load();
            if !Arc::ptr_eq(&latest, &current.generation) {
                current.generation = Arc::clone(&latest);
                session.reconfigure(Arc::clone(&current.generation.session));
            }
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
                    match timeout(shared.limits.tls_handshake_timeout, acceptor.accept(stream))
                        .await
                    {
                        Ok(Ok(tls)) => {
                            *conn = Conn::Tls(Box::new(tls));
                            if let Some(info) = conn.tls_info() {
                                session.tls_started(info);
                            }
                            resumed = true;
                        }
                        _ => {
                            tracing::debug!("STARTTLS handshake failed");
                            return Err(End::Close);
                        }
                    }
                }
                Event::Authenticate { username, password } => {
                    let outcome = shared
                        .throttle
                        .check(
                            peer.ip(),
                            &username,
                            &password,
                            current.generation.auth.as_ref(),
                        )
                        .await;
                    if outcome != AuthOutcome::Accepted {
                        tracing::info!(username = %username, outcome = ?outcome, "authentication failed");
                    }
                    session.auth_result(&username, outcome, &mut more);
                    resumed = true;
                }
                Event::CheckRecipient(query) => {
                    if query.accepted == 0 {
                        // Holds belong to accepted recipients only: these are left from a
                        // transaction ended by a command pipelined in the same read (RSET).
                        current.finish(false).await;
                    }
                    let verdict = match &current.generation.admit {
                        None => Ok(()),
                        Some(admit) => {
                            let admission = admit.admit(&query).await;
                            current.holds.extend(admission.hold);
                            admission.verdict
                        }
                    };
                    session.recipient_checked(verdict, &mut more);
                    resumed = true;
                }
                Event::Message(transaction) => {
                    if !out.is_empty() {
                        if conn.write_all(out).await.is_err() {
                            return Err(End::Close);
                        }
                        out.clear();
                    }
                    let id = transaction.id.clone();
                    let reply = match timeout(
                        shared.limits.end_of_data_timeout,
                        current.generation.deliver.deliver(transaction),
                    )
                    .await
                    {
                        Ok(reply) => reply,
                        Err(_) => Reply::new(
                            451,
                            "4.4.5",
                            "Delivery did not finish in time; try again later",
                        ),
                    };
                    tracing::info!(transaction = %id, code = reply.code(), "transaction finished");
                    current.finish(reply.is_positive()).await;
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
