//! A load generator for the benchmarks that need what Postfix's `smtp-source` lacks: STARTTLS,
//! with a full handshake per session or with resumption (session tickets).
//!
//! `cargo run --release -p mailroute-relay --example smtp-load -- --to 127.0.0.1:2525
//! --messages 4000 --concurrency 50 --starttls [--resume]`
//!
//! Each session: greeting, EHLO, STARTTLS and EHLO again (with `--starttls`), then
//! `--per-session` transactions (MAIL, RCPT, DATA, the message), then QUIT; one command at a
//! time, as `smtp-source` does. Prints one line: messages, seconds, messages a second, and how
//! many handshakes were full and how many resumed. The TLS client is the relay's own upstream
//! client (`mailroute-smtp-client`), opportunistic: the benchmarks' certificates are
//! self-signed, on loopback.

use anyhow::{Context, Result, bail};
use clap::Parser;
use mailroute_smtp_client::tls::{self, Checks};
use rustls::HandshakeKind;
use rustls_pki_types::ServerName;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

#[derive(Parser)]
struct Args {
    /// The server.
    #[arg(long)]
    to: SocketAddr,
    #[arg(long, default_value_t = 4000)]
    messages: usize,
    #[arg(long, default_value_t = 50)]
    concurrency: usize,
    /// Message size in bytes (headers included).
    #[arg(long, default_value_t = 1024)]
    size: usize,
    /// Transactions per session.
    #[arg(long, default_value_t = 1)]
    per_session: usize,
    /// STARTTLS before the first transaction.
    #[arg(long)]
    starttls: bool,
    /// Resume TLS sessions (tickets) across this client's sessions; without it every session
    /// makes a full handshake.
    #[arg(long)]
    resume: bool,
    #[arg(long, default_value = "bench@bench.example")]
    from: String,
    #[arg(long, default_value = "user@bench.example")]
    rcpt: String,
    #[arg(long, default_value = "client.bench.example")]
    ehlo: String,
    /// The longest the whole run may take.
    #[arg(long, default_value_t = 600)]
    timeout_seconds: u64,
}

/// What the sessions count together.
#[derive(Default)]
struct Tally {
    next: AtomicUsize,
    sent: AtomicUsize,
    full: AtomicUsize,
    resumed: AtomicUsize,
}

/// Reads one (possibly multi-line) reply and checks its class.
async fn expect<S: AsyncRead + Unpin>(reader: &mut BufReader<S>, class: u8) -> Result<()> {
    let mut line = String::new();
    loop {
        line.clear();
        if reader.read_line(&mut line).await? == 0 {
            bail!("the server closed the connection");
        }
        if line.as_bytes().get(3) != Some(&b'-') {
            break;
        }
    }
    if line.as_bytes().first() != Some(&class) {
        bail!("unexpected reply: {}", line.trim_end());
    }
    Ok(())
}

async fn command<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut BufReader<S>,
    line: &str,
    class: u8,
) -> Result<()> {
    stream.get_mut().write_all(line.as_bytes()).await?;
    expect(stream, class).await
}

/// The transactions of one session after its (last) EHLO, then QUIT.
async fn transactions<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut BufReader<S>,
    args: &Args,
    message: &[u8],
    tally: &Tally,
    first: bool,
) -> Result<()> {
    let mail = format!("MAIL FROM:<{}>\r\n", args.from);
    let rcpt = format!("RCPT TO:<{}>\r\n", args.rcpt);
    for n in 0..args.per_session {
        if !(first && n == 0) && tally.next.fetch_add(1, Ordering::Relaxed) >= args.messages {
            break;
        }
        command(stream, &mail, b'2').await?;
        command(stream, &rcpt, b'2').await?;
        command(stream, "DATA\r\n", b'3').await?;
        stream.get_mut().write_all(message).await?;
        expect(stream, b'2').await?;
        tally.sent.fetch_add(1, Ordering::Relaxed);
    }
    command(stream, "QUIT\r\n", b'2').await
}

async fn session(
    args: &Args,
    tls: &tokio_rustls::TlsConnector,
    message: &[u8],
    tally: &Tally,
) -> Result<()> {
    let tcp = TcpStream::connect(args.to).await?;
    tcp.set_nodelay(true)?;
    let mut plain = BufReader::new(tcp);
    expect(&mut plain, b'2').await?;
    let ehlo = format!("EHLO {}\r\n", args.ehlo);
    command(&mut plain, &ehlo, b'2').await?;
    if !args.starttls {
        return transactions(&mut plain, args, message, tally, true).await;
    }
    command(&mut plain, "STARTTLS\r\n", b'2').await?;
    let name = ServerName::try_from("relay.bench.example")?;
    let secured = tls.connect(name, plain.into_inner()).await?;
    match secured.get_ref().1.handshake_kind() {
        Some(HandshakeKind::Resumed) => tally.resumed.fetch_add(1, Ordering::Relaxed),
        _ => tally.full.fetch_add(1, Ordering::Relaxed),
    };
    let mut secured = BufReader::new(secured);
    command(&mut secured, &ehlo, b'2').await?;
    transactions(&mut secured, args, message, tally, true).await
}

/// A message of `size` bytes: headers, then lines of 76 characters, then the final `.`.
fn message(size: usize) -> Vec<u8> {
    let mut out =
        b"From: bench@bench.example\r\nTo: user@bench.example\r\nSubject: load\r\n\r\n".to_vec();
    while out.len() + 78 <= size {
        out.extend_from_slice(&[b'x'; 76]);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b".\r\n");
    out
}

/// The relay's own upstream TLS client, opportunistic (any certificate: the benchmarks'
/// servers present self-signed ones), with a fresh session cache.
fn connector() -> Result<tokio_rustls::TlsConnector> {
    let checks = Checks {
        ca_signed: false,
        hostname: false,
    };
    Ok(tls::connector(checks, None)?)
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Arc::new(Args::parse());
    let message: Arc<[u8]> = message(args.size).into();
    let tally = Arc::new(Tally::default());
    let started = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..args.concurrency.max(1) {
        // Each worker is one client MTA with its own session cache (as one Postfix or Exim
        // host keeps its sessions), so with --resume every session after its first resumes;
        // without it every session starts with an empty cache (a full handshake).
        let mut tls = connector()?;
        let (args, message, tally) = (args.clone(), message.clone(), tally.clone());
        workers.push(tokio::spawn(async move {
            while tally.next.fetch_add(1, Ordering::Relaxed) < args.messages {
                if !args.resume {
                    tls = connector()?;
                }
                session(&args, &tls, &message, &tally).await?;
            }
            anyhow::Ok(())
        }));
    }
    let run = futures_util::future::try_join_all(workers);
    let results = tokio::time::timeout(Duration::from_secs(args.timeout_seconds), run)
        .await
        .context("the run did not finish in time")??;
    for result in results {
        result?;
    }
    let seconds = started.elapsed().as_secs_f64();
    let sent = tally.sent.load(Ordering::Relaxed);
    println!(
        "messages {sent} seconds {seconds:.3} msg/s {:.0} full {} resumed {}",
        sent as f64 / seconds,
        tally.full.load(Ordering::Relaxed),
        tally.resumed.load(Ordering::Relaxed)
    );
    Ok(())
}
