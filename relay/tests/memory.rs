//! The memory budget for message content (`--max-inflight-bytes`) with the real binary: 60
//! sessions each sending a 30 MB message at once, through the relay to Postfix `smtp-sink`.
//! The relay's resident memory stays under the budget plus 64 MiB, the transactions the budget
//! cannot hold are told `452 4.3.1` (at MAIL when they declared SIZE=, else at end of data),
//! and a new client is still greeted at once.

mod support;

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use support::sink::free_port;
use support::{Client, Process, bounded, relay_process, rss_bytes, wait_port};

const BUDGET: u64 = 256 << 20;
const MESSAGE: usize = 30_000_000;
const SESSIONS: usize = 60;

/// One client's transaction: the reply that decided it.
async fn send_large(relay: SocketAddr, declare_size: bool, chunk: Arc<Vec<u8>>) -> String {
    let mut c = Client::connect(relay).await;
    c.reply().await;
    c.command("EHLO big.example").await;
    // What is sent: whole chunks, at least MESSAGE octets.
    let total = MESSAGE.div_ceil(chunk.len()) * chunk.len();
    let size = if declare_size {
        format!(" SIZE={total}")
    } else {
        String::new()
    };
    let mail = c
        .command(&format!("MAIL FROM:<big@partner.example>{size}"))
        .await;
    if !mail.starts_with("250") {
        return format!("MAIL {mail}");
    }
    let rcpt = c.command("RCPT TO:<bob@example.com>").await;
    assert!(rcpt.starts_with("250"), "{rcpt}");
    assert!(c.command("DATA").await.starts_with("354"));
    let mut sent = 0;
    while sent < total {
        c.send(&chunk).await;
        sent += chunk.len();
    }
    c.send(b".\r\n").await;
    format!("DATA {}", c.reply().await)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_large_messages_at_once_stay_within_the_memory_budget() {
    bounded(300, async {
        // The upstream takes everything and keeps nothing.
        let sink: SocketAddr = ([127, 0, 0, 1], free_port()).into();
        let _sink = Process(
            Command::new("smtp-sink")
                .args(["-u", "root", &sink.to_string(), "100"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap_or_else(|e| panic!("smtp-sink: {e}")),
        );
        wait_port(sink);
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        std::fs::write(
            dir.path().join("relay.yaml"),
            format!(
                "apiVersion: mailroute.io/v1alpha1\nkind: MailRoute\nmetadata: {{name: mailbox, namespace: mail}}\nspec: {{host: {}, port: {}, tls: {{mode: Disabled}}, connectionPool: {{maxConnections: 100}}}}\n---\napiVersion: mailroute.io/v1alpha1\nkind: RelayPolicy\nmetadata: {{name: example, namespace: mail}}\nspec: {{domains: [example.com], licenses: 10, inboundRoute: mailbox}}\n",
                sink.ip(),
                sink.port()
            ),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let relay: SocketAddr = ([127, 0, 0, 1], free_port()).into();
        let admin: SocketAddr = ([127, 0, 0, 1], free_port()).into();
        let relay_process = relay_process(
            &[
                "--manifests",
                dir.path().to_str().unwrap_or_default(),
                "--hostname",
                "relay.test",
                "--smtp",
                &relay.to_string(),
                "--max-inflight-bytes",
                &BUDGET.to_string(),
                "--admin",
                &admin.to_string(),
            ],
            relay,
        );
        let pid = relay_process.0.id();
        let baseline = rss_bytes(pid);

        let peak = Arc::new(AtomicU64::new(0));
        let done = Arc::new(AtomicBool::new(false));
        let sampler = {
            let (peak, done) = (Arc::clone(&peak), Arc::clone(&done));
            std::thread::spawn(move || {
                while !done.load(Ordering::Relaxed) {
                    peak.fetch_max(rss_bytes(pid), Ordering::Relaxed);
                    std::thread::sleep(Duration::from_millis(20));
                }
            })
        };

        let line = format!("{}\r\n", "x".repeat(998));
        let chunk = Arc::new(line.repeat(64).into_bytes());
        // Most declare their size, some do not (they find out at end of data).
        let clients: Vec<_> = (0..SESSIONS)
            .map(|i| tokio::spawn(send_large(relay, i % 10 != 0, Arc::clone(&chunk))))
            .collect();
        tokio::time::sleep(Duration::from_millis(500)).await;
        let started = Instant::now();
        let mut fresh = Client::connect(relay).await;
        assert!(fresh.reply().await.starts_with("220"));
        let greeted = started.elapsed();

        let mut replies = Vec::new();
        for c in clients {
            replies.push(c.await.unwrap_or_else(|e| panic!("{e}")));
        }
        done.store(true, Ordering::Relaxed);
        let _ = sampler.join();
        let peak = peak.load(Ordering::Relaxed);

        let accepted = replies.iter().filter(|r| r.starts_with("DATA 250")).count();
        let at_mail = replies.iter().filter(|r| r.starts_with("MAIL 452 4.3.1")).count();
        let at_end = replies.iter().filter(|r| r.starts_with("DATA 452 4.3.1")).count();
        println!(
            "{SESSIONS} sessions x {MESSAGE} octets, budget {} MiB: {accepted} accepted, {at_mail} told 452 at MAIL, {at_end} at end of data; relay RSS {} MiB at rest, {} MiB at peak; a new client greeted in {greeted:?}",
            BUDGET >> 20,
            baseline >> 20,
            peak >> 20
        );
        assert_eq!(accepted + at_mail + at_end, SESSIONS, "{replies:?}");
        assert!(accepted > 0 && at_mail > 0, "{replies:?}");
        assert!(peak < BUDGET + (64 << 20), "RSS {peak} over the budget");
        assert!(greeted < Duration::from_millis(100), "greeted after {greeted:?}");
        // Every octet held was given back, and the budget is shown.
        let metrics = || {
            use std::io::{Read, Write};
            let mut s = std::net::TcpStream::connect(admin).unwrap_or_else(|e| panic!("{e}"));
            let _ = write!(s, "GET /metrics HTTP/1.0\r\n\r\n");
            let mut out = String::new();
            let _ = s.read_to_string(&mut out);
            out
        };
        let deadline = Instant::now() + Duration::from_secs(5);
        while !metrics().contains("mailroute_relay_inflight_bytes 0") {
            assert!(Instant::now() < deadline, "content still held: {}", metrics());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(metrics().contains(&format!("mailroute_relay_inflight_limit_bytes {BUDGET}")));
    })
    .await;
}
