//! All-or-nothing copies, the reply bound and extensions (SPEC 5.2, 6.3, 6.5-6.7), as a client
//! sees them against real and scripted upstreams: a primary's refusal leaves no copy anywhere,
//! a copy's refusal never becomes a bounce, a slow or failing copy route never makes the
//! client's retry duplicate a message, a hanging best-effort copy never delays the `250`, a
//! client cannot opt out of copies with a header of its own, and no message is sent to an
//! upstream without the extension it needs.

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::scripted::{Script, Scripted};
use support::sink::{Sink, free_port};
use support::{Client, bounded, configured, send_message};

/// A primary route `mailbox` and a copy route `archive` (`delivery` as given) for every
/// message to example.com's users.
fn with_archive(primary: SocketAddr, archive: SocketAddr, delivery: &str) -> String {
    format!(
        r#"
apiVersion: mailroute.io/v1alpha1
kind: MailRoute
metadata: {{name: mailbox, namespace: mail}}
spec:
  host: {}
  port: {}
  tls: {{mode: Disabled}}
  timeouts: {{connect: 1s, command: 1s, dataEnd: 2s}}
---
apiVersion: mailroute.io/v1alpha1
kind: MailRoute
metadata: {{name: archive, namespace: mail}}
spec:
  host: {}
  port: {}
  tls: {{mode: Disabled}}
  delivery: {delivery}
  timeouts: {{connect: 1s, command: 1s, dataEnd: 2s}}
---
apiVersion: mailroute.io/v1alpha1
kind: RelayPolicy
metadata: {{name: example, namespace: mail}}
spec:
  domains: [example.com]
  licenses: 10
  users: [alice@example.com]
  inboundRoute: mailbox
---
apiVersion: mailroute.io/v1alpha1
kind: RoutingRule
metadata: {{name: journal, namespace: mail}}
spec:
  policyRef: example
  priority: 10
  messages: [Inbound, InternalReceiving]
  accountTypes: [Users]
  actions:
    alsoDeliverTo: [{{route: archive}}]
"#,
        primary.ip(),
        primary.port(),
        archive.ip(),
        archive.port()
    )
}

/// Quotas and ledger in the Redis at `url`, as a replica sharing it would have them.
fn redis_stores(url: &str) -> support::Stores {
    let redis = Arc::new(
        mailroute_relay::store::RedisStore::new(url, Duration::from_secs(1))
            .unwrap_or_else(|e| panic!("{e}")),
    );
    support::Stores {
        ledger: redis.clone(),
        quotas: redis,
        ..support::Stores::memory()
    }
}

fn message(id: &str) -> String {
    format!("Message-ID: <{id}@client.test>\r\nSubject: {id}\r\n\r\nbody of {id}\r\n")
}

async fn send(relay: SocketAddr, id: &str) -> String {
    send_message(
        relay,
        "someone@partner.example",
        &["alice@example.com"],
        &message(id),
    )
    .await
}

#[tokio::test]
async fn a_primary_refusal_leaves_no_copy_anywhere() {
    bounded(60, async {
        for (what, fault) in [("5xx at end of data", "."), ("5xx to RCPT", "RCPT")] {
            let primary = Sink::start_on(([127, 0, 0, 1], free_port()).into(), &["-f", fault]);
            let archive = Scripted::start(Script::default()).await;
            let config = configured(&with_archive(primary.addr, archive.addr, "Required"));
            let relay = config.start().await;
            let reply = send(relay.smtp, "refused").await;
            assert!(reply.starts_with('5'), "{what}: {reply}");
            assert!(reply.contains("route mailbox"), "{what}: {reply}");
            tokio::time::sleep(Duration::from_millis(200)).await;
            assert_eq!(
                archive.accepted().len(),
                0,
                "{what}: the archive kept a copy"
            );
            let metrics = config.metrics_text();
            assert!(
                metrics.contains(
                    r#"mailroute_relay_copies_total{route="archive",outcome="withheld"} 1"#
                ),
                "{what}: {metrics}"
            );
        }
    })
    .await;
}

#[tokio::test]
async fn a_primary_refusal_is_told_at_once_while_the_copy_route_is_still_greeting() {
    bounded(30, async {
        let primary = Sink::start_on(([127, 0, 0, 1], free_port()).into(), &["-f", "RCPT"]);
        // The archive takes 0.8 s per reply: its greeting alone outlasts the primary's refusal.
        let archive = Scripted::start(Script {
            delay: Duration::from_millis(800),
            slow_connections: usize::MAX,
            ..Script::default()
        })
        .await;
        let config = configured(&with_archive(primary.addr, archive.addr, "Required"));
        let relay = config.start().await;
        let started = Instant::now();
        let reply = send(relay.smtp, "refused-fast").await;
        let waited = started.elapsed();
        assert!(reply.starts_with('5'), "{reply}");
        assert!(
            waited < Duration::from_millis(600),
            "the refusal waited {waited:?} for a copy that will be abandoned"
        );
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert_eq!(archive.accepted().len(), 0, "the archive kept a copy");
    })
    .await;
}

#[tokio::test]
async fn a_primary_temporary_failure_leaves_no_copy_and_the_retry_delivers_each_once() {
    bounded(60, async {
        let addr: SocketAddr = ([127, 0, 0, 1], free_port()).into();
        let failing = Sink::start_on(addr, &["-r", "."]);
        let archive = Scripted::start(Script::default()).await;
        let config = configured(&with_archive(addr, archive.addr, "Required"));
        let relay = config.start().await;
        let first = send(relay.smtp, "deferred").await;
        assert!(first.starts_with("451"), "{first}");
        assert!(first.contains("route mailbox"), "{first}");
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(
            archive.count("Subject: deferred"),
            0,
            "no copy of a deferred message"
        );
        assert_eq!(
            archive.abandoned(),
            1,
            "the copy was abandoned before its final dot"
        );
        drop(failing);
        let healthy = Sink::start_on(addr, &[]);
        let retry = send(relay.smtp, "deferred").await;
        assert!(retry.starts_with("250"), "{retry}");
        assert_eq!(
            healthy.wait_count("Subject: deferred", 1),
            1,
            "primary once"
        );
        assert_eq!(archive.count("Subject: deferred"), 1, "archive once");
    })
    .await;
}

#[tokio::test]
async fn with_the_ledger_in_redis_two_relays_retry_a_deferred_copy_without_duplicates() {
    bounded(60, async {
        let redis = support::redis::RedisServer::start();
        let primary = Scripted::start(Script::default()).await;
        // The archive defers the first end of data, then takes everything.
        let archive = Scripted::start(Script {
            end_of_data: Arc::new(|n| {
                if n == 0 {
                    "451 4.3.0 archive busy".to_owned()
                } else {
                    "250 2.0.0 archived".to_owned()
                }
            }),
            ..Script::default()
        })
        .await;
        let yaml = with_archive(primary.addr, archive.addr, "Required");
        let store = || redis_stores(&redis.url());
        // Two replicas sharing the store: the client's retry lands on the other one.
        let first = support::configured_with_stores(&yaml, store());
        let second = support::configured_with_stores(&yaml, store());
        let (a, b) = (first.start().await, second.start().await);
        let reply = send(a.smtp, "shared").await;
        assert!(reply.starts_with("451"), "{reply}");
        assert!(reply.contains("route archive"), "{reply}");
        let retry = send(b.smtp, "shared").await;
        assert!(retry.starts_with("250"), "{retry}");
        assert_eq!(primary.count("Subject: shared"), 1, "the primary once");
        assert_eq!(archive.count("Subject: shared"), 1, "the archive once");
    })
    .await;
}

#[tokio::test]
async fn a_thousand_messages_with_a_randomly_failing_copy_route_are_each_delivered_once() {
    bounded(240, async {
        let primary = Scripted::start(Script::default()).await;
        // About one end of data in three refused for a while, chosen by a fixed generator so a
        // failure can be replayed.
        let archive = Scripted::start(Script {
            end_of_data: Arc::new(|n| {
                // splitmix64 of the end-of-data count.
                let mut x = (n as u64).wrapping_add(0x9E37_79B9_7F4A_7C15);
                x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
                x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
                x ^= x >> 31;
                if x.is_multiple_of(3) {
                    "451 4.3.0 archive busy".to_owned()
                } else {
                    "250 2.0.0 archived".to_owned()
                }
            }),
            ..Script::default()
        })
        .await;
        let config = configured(&with_archive(primary.addr, archive.addr, "Required"));
        let relay = config.start().await;
        const MESSAGES: usize = 1000;
        const CLIENTS: usize = 8;
        let mut tasks = Vec::new();
        for c in 0..CLIENTS {
            let smtp = relay.smtp;
            tasks.push(tokio::spawn(async move {
                let mut deferred = 0;
                for i in (c..MESSAGES).step_by(CLIENTS) {
                    let id = format!("random-{i}");
                    let mut attempts = 0;
                    loop {
                        attempts += 1;
                        let reply = send(smtp, &id).await;
                        if reply.starts_with("250") {
                            break;
                        }
                        assert!(reply.starts_with("451"), "{id}: {reply}");
                        assert!(attempts < 20, "{id}: never delivered: {reply}");
                        deferred += 1;
                    }
                }
                deferred
            }));
        }
        let mut deferred = 0;
        for t in tasks {
            deferred += t.await.unwrap_or_else(|e| panic!("{e}"));
        }
        assert!(
            deferred > 100,
            "the copy route failed often enough: {deferred}"
        );
        for (name, upstream) in [("primary", &primary), ("archive", &archive)] {
            let mut seen = std::collections::HashMap::<String, usize>::new();
            for m in upstream.accepted() {
                let text = String::from_utf8_lossy(&m).into_owned();
                if let Some(id) = text
                    .split("Subject: ")
                    .nth(1)
                    .and_then(|s| s.split("\r\n").next())
                {
                    *seen.entry(id.to_owned()).or_default() += 1;
                }
            }
            assert_eq!(seen.len(), MESSAGES, "{name}: a message is missing");
            let twice: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
            assert!(twice.is_empty(), "{name}: duplicates {twice:?}");
        }
        eprintln!("1000 messages, {deferred} deferred attempts: each once at both upstreams");
    })
    .await;
}

#[tokio::test]
async fn a_copy_route_slow_at_every_stage_gets_451_at_the_bound_and_the_retry_duplicates_nothing() {
    bounded(60, async {
        let primary = Scripted::start(Script::default()).await;
        // Every reply 400 ms late: inside the 1 s command timeout, but greeting, EHLO, MAIL,
        // RCPT and DATA take 2 s together, beyond the 1.5 s reply bound. Only the first
        // connection is slow.
        let archive = Scripted::start(Script {
            delay: Duration::from_millis(400),
            slow_connections: 1,
            ..Script::default()
        })
        .await;
        let config = configured(&with_archive(primary.addr, archive.addr, "Required"));
        let relay = config.start_bounded(Duration::from_millis(1500)).await;
        let started = Instant::now();
        let first = send(relay.smtp, "slow").await;
        let waited = started.elapsed();
        assert!(first.starts_with("451 4.4.5"), "{first}");
        assert!(first.contains("route archive"), "{first}");
        assert!(
            waited < Duration::from_millis(2500),
            "answered at the bound, not after the slowest leg: {waited:?}"
        );
        let retry = send(relay.smtp, "slow").await;
        assert!(retry.starts_with("250"), "{retry}");
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(primary.count("Subject: slow"), 1, "the primary once");
        assert_eq!(archive.count("Subject: slow"), 1, "the archive once");
    })
    .await;
}

#[tokio::test]
async fn a_retry_while_the_first_attempt_is_still_being_delivered_sends_nothing_again() {
    bounded(60, async {
        // The primary takes 1.7 s to answer the first message's end of data, inside the
        // route's 2 s dataEnd but past the relay's 1 s reply bound.
        let primary = Scripted::start(Script {
            first_end_of_data_delay: Duration::from_millis(1700),
            ..Script::default()
        })
        .await;
        let archive = Scripted::start(Script::default()).await;
        let config = configured(&with_archive(primary.addr, archive.addr, "Required"));
        let relay = config.start_bounded(Duration::from_secs(1)).await;
        let started = Instant::now();
        let first = send(relay.smtp, "in flight").await;
        assert!(first.starts_with("451 4.4.5"), "{first}");
        // A client that retries at once (Exchange's first retry is a minute; a script's can be
        // a second) while the first attempt's legs still run: nothing is sent again.
        let early = send(relay.smtp, "in flight").await;
        assert!(
            started.elapsed() < Duration::from_millis(1700),
            "the retry came too late to test"
        );
        assert!(early.starts_with("451 4.4.5"), "{early}");
        assert!(early.contains("still being delivered"), "{early}");
        // The first attempt ends: both legs delivered, once.
        tokio::time::sleep(
            Duration::from_millis(1700).saturating_sub(started.elapsed())
                + Duration::from_millis(500),
        )
        .await;
        let late = send(relay.smtp, "in flight").await;
        assert!(
            late.starts_with("250"),
            "the retry after the legs ended: {late}"
        );
        assert_eq!(primary.count("Subject: in flight"), 1, "the primary once");
        assert_eq!(archive.count("Subject: in flight"), 1, "the archive once");
    })
    .await;
}

#[tokio::test]
async fn a_hanging_best_effort_copy_never_delays_the_250() {
    bounded(60, async {
        let primary = Scripted::start(Script::default()).await;
        let hanging = Scripted::start(Script {
            delay: Duration::from_secs(30),
            slow_connections: usize::MAX,
            ..Script::default()
        })
        .await;
        let config = configured(&with_archive(primary.addr, hanging.addr, "BestEffort"));
        let relay = config.start_bounded(Duration::from_secs(10)).await;
        let started = Instant::now();
        let reply = send(relay.smtp, "hang").await;
        let waited = started.elapsed();
        assert!(reply.starts_with("250"), "{reply}");
        assert!(
            waited < Duration::from_millis(500),
            "the best-effort copy held the reply for {waited:?}"
        );
        assert_eq!(primary.count("Subject: hang"), 1);
    })
    .await;
}

#[tokio::test]
async fn a_client_written_loop_marker_does_not_suppress_the_copy() {
    bounded(30, async {
        let primary = Scripted::start(Script::default()).await;
        let archive = Scripted::start(Script::default()).await;
        let config = configured(&with_archive(primary.addr, archive.addr, "Required"));
        let relay = config.start().await;
        for (i, marker) in [
            "X-Mailroute-Loop: relay.test",
            "X-Mailroute-Loop: relay.test; mac=00112233445566778899aabbccddeeff",
        ]
        .iter()
        .enumerate()
        {
            let id = format!("opt-out-{i}");
            let reply = send_message(
                relay.smtp,
                "someone@partner.example",
                &["alice@example.com"],
                &format!("{marker}\r\n{}", message(&id)),
            )
            .await;
            assert!(reply.starts_with("250"), "{reply}");
            assert_eq!(
                archive.count(&format!("Subject: {id}")),
                1,
                "{marker}: copy made"
            );
        }
        let metrics = config.metrics_text();
        assert!(
            metrics.contains("mailroute_relay_loop_markers_forged_total 2"),
            "{metrics}"
        );
        assert!(
            metrics.contains("mailroute_relay_copies_suppressed_total 0"),
            "{metrics}"
        );
    })
    .await;
}

/// Sends one message with MAIL parameters; returns the reply after DATA (or the refusal).
async fn send_with(relay: SocketAddr, from: &str, params: &str, body: &[u8]) -> String {
    let mut client = Client::connect(relay).await;
    client.reply().await;
    client.command("EHLO client.test").await;
    let r = client.command(&format!("MAIL FROM:<{from}>{params}")).await;
    assert!(r.starts_with("250"), "MAIL: {r}");
    let r = client.command("RCPT TO:<alice@example.com>").await;
    assert!(r.starts_with("250"), "RCPT: {r}");
    let r = client.command("DATA").await;
    assert!(r.starts_with("354"), "DATA: {r}");
    let mut wire = Vec::new();
    mailroute_relay::smtp::data::dot_stuff(body, &mut wire);
    client.send(&wire).await;
    let reply = client.reply().await;
    let _ = client.command("QUIT").await;
    reply
}

fn only_mailbox(upstream: SocketAddr) -> String {
    format!(
        "{}---\napiVersion: mailroute.io/v1alpha1\nkind: RelayPolicy\nmetadata: {{name: example, namespace: mail}}\nspec: {{domains: [example.com], licenses: 10, users: [alice@example.com], inboundRoute: mailbox}}\n",
        support::plain_route("mailbox", upstream)
    )
}

#[tokio::test]
async fn extensions_the_message_needs_are_declared_upstream_or_the_leg_is_refused() {
    bounded(60, async {
        let eight_bit = "Subject: caf\u{e9}\r\n\r\nd\u{e9}j\u{e0} vu\r\n".as_bytes();
        let utf8_sender = "d\u{e9}veloppeur@partner.example";
        // Without 8BITMIME, SMTPUTF8 or SIZE.
        let bare = Scripted::start(Script {
            extensions: vec!["PIPELINING", "ENHANCEDSTATUSCODES"],
            ..Script::default()
        })
        .await;
        let config = configured(&only_mailbox(bare.addr));
        let relay = config.start().await;
        let reply = send_with(relay.smtp, "a@partner.example", " BODY=8BITMIME", eight_bit).await;
        assert!(reply.starts_with("554 5.6.3"), "{reply}");
        assert!(reply.contains("route mailbox"), "{reply}");
        let reply = send_with(
            relay.smtp,
            utf8_sender,
            " SMTPUTF8",
            b"Subject: x\r\n\r\nx\r\n",
        )
        .await;
        assert!(reply.starts_with("553 5.6.7"), "{reply}");
        // Declared 8-bit but all ASCII: nothing is needed, it is delivered undeclared.
        let reply = send_with(
            relay.smtp,
            "a@partner.example",
            " BODY=8BITMIME",
            b"Subject: ascii\r\n\r\nplain\r\n",
        )
        .await;
        assert!(reply.starts_with("250"), "{reply}");
        assert_eq!(
            bare.accepted().len(),
            1,
            "only the message that needs nothing went out"
        );
        assert!(
            bare.mail_lines()
                .iter()
                .all(|l| !l.contains("BODY=") && !l.contains("SIZE=")),
            "{:?}",
            bare.mail_lines()
        );

        // With them: passed on and declared, SIZE= included.
        let full = Scripted::start(Script {
            extensions: vec![
                "PIPELINING",
                "8BITMIME",
                "SMTPUTF8",
                "SIZE 10000000",
                "ENHANCEDSTATUSCODES",
            ],
            ..Script::default()
        })
        .await;
        let config = configured(&only_mailbox(full.addr));
        let relay = config.start().await;
        let reply = send_with(relay.smtp, "a@partner.example", " BODY=8BITMIME", eight_bit).await;
        assert!(reply.starts_with("250"), "{reply}");
        let reply = send_with(
            relay.smtp,
            utf8_sender,
            " SMTPUTF8",
            b"Subject: x\r\n\r\nx\r\n",
        )
        .await;
        assert!(reply.starts_with("250"), "{reply}");
        let lines = full.mail_lines();
        assert!(lines[0].contains(" BODY=8BITMIME"), "{lines:?}");
        assert!(
            lines[1].contains(" SMTPUTF8") && lines[1].contains(utf8_sender),
            "{lines:?}"
        );
        let size: usize = lines[0]
            .split(" SIZE=")
            .nth(1)
            .and_then(|s| s.split(' ').next())
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("no SIZE= in {lines:?}"));
        assert_eq!(size, full.accepted()[0].len(), "SIZE= is what was sent");
        assert!(
            full.accepted()[0].ends_with(&eight_bit[eight_bit.len() - 10..]),
            "body untouched"
        );
    })
    .await;
}

#[tokio::test]
async fn with_the_ledger_in_redis_a_retry_after_a_deferred_recipient_delivers_only_that_one() {
    bounded(60, async {
        let redis = support::redis::RedisServer::start();
        // The mailbox defers bob's first RCPT, then takes everything.
        let deferred = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mailbox = Scripted::start(Script {
            rcpt: Arc::new(move |line| {
                if line.contains("bob@") && !deferred.swap(true, std::sync::atomic::Ordering::SeqCst) {
                    "451 4.2.1 mailbox busy".to_owned()
                } else {
                    "250 2.1.5 ok".to_owned()
                }
            }),
            ..Script::default()
        })
        .await;
        let yaml = format!(
            "{}---\napiVersion: mailroute.io/v1alpha1\nkind: RelayPolicy\nmetadata: {{name: example, namespace: mail}}\nspec: {{domains: [example.com], licenses: 10, users: [alice@example.com, bob@example.com], inboundRoute: mailbox}}\n",
            support::plain_route("mailbox", mailbox.addr)
        );
        let store = || redis_stores(&redis.url());
        let first = support::configured_with_stores(&yaml, store());
        let second = support::configured_with_stores(&yaml, store());
        let (a, b) = (first.start().await, second.start().await);
        let to = ["alice@example.com", "bob@example.com"];
        let reply = send_message(a.smtp, "someone@partner.example", &to, &message("split")).await;
        assert!(reply.starts_with("451"), "{reply}");
        // The retry reaches the other replica while the ledger lookup is still under way: the
        // leg goes out to both, is abandoned before its final `.`, and goes again to bob only.
        let retry = send_message(b.smtp, "someone@partner.example", &to, &message("split")).await;
        assert!(retry.starts_with("250"), "{retry}");
        assert_eq!(mailbox.delivered_to("alice@"), 1, "alice once");
        assert_eq!(mailbox.delivered_to("bob@"), 1, "bob once");
        assert_eq!(mailbox.count("Subject: split"), 2, "two messages in all");
        assert!(mailbox.abandoned() <= 1, "{} abandoned", mailbox.abandoned());
    })
    .await;
}

#[tokio::test]
async fn a_ledger_that_fails_while_the_legs_are_under_way_lets_no_leg_complete() {
    bounded(60, async {
        let mailbox = Scripted::start(Script::default()).await;
        let archive = Scripted::start(Script::default()).await;
        let yaml = with_archive(mailbox.addr, archive.addr, "Required");
        // Nothing listens there: every lookup fails, after the legs started.
        let dead = format!("redis://127.0.0.1:{}/0", free_port());
        let ledger = Arc::new(
            mailroute_relay::store::RedisStore::new(&dead, Duration::from_secs(1))
                .unwrap_or_else(|e| panic!("{e}")),
        );
        let stores = support::Stores {
            ledger,
            ..support::Stores::memory()
        };
        let relay = support::configured_with_stores(&yaml, stores).start().await;
        let reply = send(relay.smtp, "unlooked").await;
        assert!(reply.starts_with("451 4.3.0"), "{reply}");
        // Give an abandoned leg time to be seen closing.
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(
            mailbox.count("Subject: unlooked"),
            0,
            "the mailbox has nothing"
        );
        assert_eq!(
            archive.count("Subject: unlooked"),
            0,
            "the archive has nothing"
        );
    })
    .await;
}
