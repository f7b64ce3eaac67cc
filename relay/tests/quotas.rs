//! Sending quotas (SPEC 3.4, 5.3a) with real stores: exactness under hundreds of concurrent
//! clients (one relay on the memory store; three relay processes sharing one `redis-server`),
//! reservations of a killed relay expiring, unique recipients, and a Redis outage.
//!
//! The tenant is on the Trial tier (50 recipients per 10 minutes), bound by its IP range
//! (127.0.0.0/16), sending as an address that is not a registered user (so the tenant limits
//! apply to it), to external recipients delivered to Postfix `smtp-sink`.

mod support;

use mailroute_relay::delivery::ledger::{Ledger, key};
use mailroute_relay::store::MemoryQuotaStore;
use mailroute_relay::store::RedisStore;
use mailroute_relay::store::{Counter, Hold, Limit, QuotaStore, Reservation};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use support::redis::RedisServer;
use support::sink::Sink;
use support::trial::{Fate, PEAK, RelayProcess, burst, manifests, one_message, tally, trial};
use support::{Client, Stores, bounded, configured, configured_with_stores};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_relay_on_the_memory_store_accepts_exactly_the_peak_limit() {
    bounded(120, async {
        let sink = Sink::start();
        let config = configured(&trial(sink.addr, ""));
        let relay = config.start().await;
        let fates = burst(&[relay.smtp], 300).await;
        let (accepted, refused, failed) = tally(&fates, PEAK);
        println!("memory store, 1 relay, 300 clients: {accepted} accepted, {refused} refused, {failed} failed");
        // 300 clients, 20 upstream connections: legs wait for a pooled connection.
        assert_eq!(failed, 0, "{fates:?}");
        assert_eq!(sink.wait_count("Subject: quota ", accepted), accepted);
        let metrics = config.metrics_text();
        assert!(
            metrics.contains(&format!(
                r#"mailroute_relay_quota_rejections_total{{tenant="example",limit="customer_recipients_per_10_minutes"}} {refused}"#
            )),
            "{metrics}"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_relays_sharing_redis_never_accept_more_than_the_limit() {
    bounded(180, async {
        let redis = RedisServer::start();
        let sink = Sink::start();
        let dir = manifests(&trial(sink.addr, ""));
        let url = redis.url();
        let relays: Vec<RelayProcess> = (0..3)
            .map(|_| RelayProcess::start(dir.path(), &["--store", &url]))
            .collect();
        let addrs: Vec<SocketAddr> = relays.iter().map(|r| r.smtp).collect();
        let fates = burst(&addrs, 300).await;
        let (accepted, refused, failed) = tally(&fates, PEAK);
        println!("redis store, 3 relays, 300 clients: {accepted} accepted, {refused} refused, {failed} failed");
        assert_eq!(sink.wait_count("Subject: quota ", accepted), accepted);
        // A second burst: the two together still within the limit.
        let mut all = fates;
        all.extend(burst(&addrs, 30).await);
        tally(&all, PEAK);
        // Every key the relays wrote expires.
        let keys = redis.cli(&["--scan", "--pattern", "mailroute:*"]);
        assert!(!keys.is_empty());
        for k in keys.lines() {
            let ttl: i64 = redis.cli(&["PTTL", k]).parse().unwrap_or(-9);
            assert!(ttl > 0, "{k} has no expiry ({ttl})");
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_relays_reservations_expire() {
    bounded(120, async {
        let redis = RedisServer::start();
        let sink = Sink::start();
        let dir = manifests(&trial(sink.addr, ""));
        let url = redis.url();
        let mut doomed = RelayProcess::start(dir.path(), &["--store", &url, "--quota-hold", "3"]);
        // 10 recipients reserved in a transaction that never ends.
        let mut c = Client::connect(doomed.smtp).await;
        c.reply().await;
        c.command("EHLO app.example.com").await;
        c.command("MAIL FROM:<app@example.com>").await;
        for i in 0..10 {
            assert!(
                c.command(&format!("RCPT TO:<held{i}@partner.example>"))
                    .await
                    .starts_with("250")
            );
        }
        doomed.kill();
        let killed_at = Instant::now();
        let survivor = RelayProcess::start(dir.path(), &["--store", &url, "--quota-hold", "3"]);
        let first = burst(&[survivor.smtp], PEAK).await;
        let accepted = first.iter().filter(|f| **f == Fate::Accepted).count();
        assert_eq!(
            accepted,
            PEAK - 10,
            "the dead relay's holds still count: {first:?}"
        );
        tokio::time::sleep(
            Duration::from_secs(3).saturating_sub(killed_at.elapsed()) + Duration::from_millis(500),
        )
        .await;
        let later = burst(&[survivor.smtp], 20).await;
        let accepted = later.iter().filter(|f| **f == Fate::Accepted).count();
        assert_eq!(
            accepted, 10,
            "after expiry the 10 are free again: {later:?}"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_outage_defers_then_service_resumes_without_restart() {
    bounded(120, async {
        let mut redis = RedisServer::start();
        let sink = Sink::start();
        let dir = manifests(&trial(sink.addr, ""));
        let url = redis.url();
        let closed =
            RelayProcess::start(dir.path(), &["--store", &url, "--store-timeout-ms", "300"]);
        let open = RelayProcess::start(
            dir.path(),
            &[
                "--store",
                &url,
                "--store-timeout-ms",
                "300",
                "--store-failure",
                "open",
            ],
        );
        assert_eq!(
            one_message(closed.smtp, "app@example.com", "a@partner.example").await,
            Fate::Accepted
        );

        redis.stop();
        match one_message(closed.smtp, "app@example.com", "b@partner.example").await {
            Fate::Refused(r) => assert!(r.starts_with("451 4.3.0"), "{r}"),
            other => panic!("closed: {other:?}"),
        }
        // Availability over enforcement: accepted, quota and ledger skipped.
        assert_eq!(
            one_message(open.smtp, "app@example.com", "c@partner.example").await,
            Fate::Accepted
        );

        redis.resume();
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            match one_message(closed.smtp, "app@example.com", "d@partner.example").await {
                Fate::Accepted => break,
                other => {
                    assert!(Instant::now() < deadline, "never recovered: {other:?}");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
        assert_eq!(sink.wait_count("Subject: quota ", 3), 3);
        assert_eq!(sink.count("Subject: quota b@"), 0);
    })
    .await;
}

#[tokio::test]
async fn a_registered_users_unique_recipients_are_counted_once_in_redis() {
    bounded(60, async {
        let redis = RedisServer::start();
        let sink = Sink::start();
        let config = on_redis(
            &redis,
            &trial(
                sink.addr,
                "  limits: {perUser: {uniqueRecipientsPerDay: 3}}",
            ),
        );
        let relay = config.start().await;
        let mut fates = Vec::new();
        for to in ["a", "b", "a", "A", "c", "a", "d"] {
            fates.push(one_message(relay.smtp, "alice@example.com", &format!("{to}@partner.example")).await);
        }
        let refused: Vec<usize> = fates
            .iter()
            .enumerate()
            .filter(|(_, f)| !matches!(f, Fate::Accepted))
            .map(|(i, _)| i)
            .collect();
        assert_eq!(refused, [6], "{fates:?}");
        assert!(
            matches!(&fates[6], Fate::Refused(r) if r.starts_with("550 5.4.5 Daily SMTP relay limit exceeded for user")),
            "{fates:?}"
        );
    })
    .await;
}

#[tokio::test]
async fn the_redis_ledger_remembers_deliveries_for_five_days_and_marks_legs_in_flight() {
    bounded(30, async {
        let redis = RedisServer::start();
        let store =
            RedisStore::new(&redis.url(), Duration::from_secs(1)).unwrap_or_else(|e| panic!("{e}"));
        let fp = [7u8; 32];
        let a = key(&fp, "route/a", "x@example.com");
        let b = key(&fp, "route/b", "x@example.com");
        use mailroute_relay::store::Recorded::{Absent, Delivered, InFlight};
        let lookup = async |keys: &[mailroute_relay::store::Key]| {
            store.lookup(keys).await.unwrap_or_else(|e| panic!("{e}"))
        };
        assert_eq!(lookup(&[a, b]).await, [Absent, Absent]);
        store.record(&[a]).await.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(lookup(&[a, b]).await, [Delivered, Absent]);
        let keys = redis.cli(&["--scan", "--pattern", "mailroute:ledger:*"]);
        let ttl: i64 = redis.cli(&["PTTL", keys.trim()]).parse().unwrap_or(-9);
        assert!(ttl > 4 * 86_400_000 && ttl <= 5 * 86_400_000, "{ttl}");
        // A leg still running past the reply bound: marked in flight, then delivered and cleared.
        store
            .mark_in_flight(&[a, b], Duration::from_secs(60))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            lookup(&[a, b]).await,
            [Delivered, InFlight],
            "delivered wins"
        );
        let marks = redis.cli(&["--scan", "--pattern", "mailroute:ledger:*:flight"]);
        let ttl: i64 = redis
            .cli(&["PTTL", marks.lines().next().unwrap_or_default()])
            .parse()
            .unwrap_or(-9);
        assert!(ttl > 50_000 && ttl <= 60_000, "{ttl}");
        store.record(&[b]).await.unwrap_or_else(|e| panic!("{e}"));
        store
            .clear_in_flight(&[a, b])
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(lookup(&[a, b]).await, [Delivered, Delivered]);
        assert!(
            redis
                .cli(&["--scan", "--pattern", "mailroute:ledger:*:flight"])
                .trim()
                .is_empty()
        );
    })
    .await;
}

#[tokio::test]
async fn the_memory_store_settles_only_accepted_messages() {
    bounded(60, async {
        // The upstream refuses every message: reservations are released, nothing counts.
        let sink = Sink::start_with(&["-r", "DATA"]);
        let store = Arc::new(MemoryQuotaStore::default());
        let config = configured_with_stores(
            &trial(sink.addr, ""),
            Stores {
                ledger: Arc::new(mailroute_relay::store::MemoryLedger::new(1000)),
                quotas: store,
                ..Stores::memory()
            },
        );
        let relay = config.start().await;
        let counted = Arc::new(AtomicUsize::new(0));
        for i in 0..(PEAK + 10) {
            if let Fate::Failed(r) = one_message(
                relay.smtp,
                "app@example.com",
                &format!("f{i}@partner.example"),
            )
            .await
            {
                assert!(r.starts_with("451"), "{r}");
                counted.fetch_add(1, Ordering::Relaxed);
            }
        }
        assert_eq!(
            counted.load(Ordering::Relaxed),
            PEAK + 10,
            "never refused at RCPT"
        );
    })
    .await;
}

/// An in-process relay for `yaml` with its quotas and ledger in `redis`.
fn on_redis(redis: &RedisServer, yaml: &str) -> support::Configured {
    let store = Arc::new(
        RedisStore::new(&redis.url(), Duration::from_secs(1)).unwrap_or_else(|e| panic!("{e}")),
    );
    configured_with_stores(
        yaml,
        Stores {
            ledger: store.clone(),
            quotas: store,
            ..Stores::memory()
        },
    )
}

/// Scripts the Redis server ran (`EVALSHA` calls that did not fail).
fn scripts_run(redis: &RedisServer) -> i64 {
    let stats = redis.cli(&["INFO", "commandstats"]);
    let field = |name: &str| -> i64 {
        stats
            .lines()
            .find(|l| l.starts_with("cmdstat_evalsha:"))
            .and_then(|l| l.split([':', ',']).find_map(|kv| kv.strip_prefix(name)))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    };
    field("calls=") - field("failed_calls=")
}

/// A tenant's counters as the relay builds them: 10 minutes (enforced) and a day.
fn tenant_counters(tenant: &str, per_10_minutes: u64) -> Vec<Counter> {
    let counter = |limit, name: &str, max, window| Counter {
        limit,
        key: format!("{{{tenant}}}:customer:{name}"),
        max,
        window,
        member: None,
        enforce: true,
    };
    vec![
        counter(
            Limit::CustomerRecipientsPer10Minutes,
            "10m",
            per_10_minutes,
            Duration::from_secs(600),
        ),
        counter(
            Limit::CustomerRecipientsPerDay,
            "1d",
            10_000,
            Duration::from_secs(86_400),
        ),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_reservations_of_a_tenant_share_a_few_scripts_and_stay_exact() {
    bounded(30, async {
        let redis = RedisServer::start();
        let store =
            RedisStore::new(&redis.url(), Duration::from_secs(1)).unwrap_or_else(|e| panic!("{e}"));
        let busy = tenant_counters("busy", 50);
        let quiet = tenant_counters("quiet", 5);
        let ttl = Duration::from_secs(60);
        // 150 sessions of one tenant reserving at once, 10 of another beside them.
        let ids: Vec<String> = (0..160).map(|i| format!("hold-{i}")).collect();
        let asks = ids.iter().enumerate().map(|(i, id)| {
            let counters = if i < 150 { &busy } else { &quiet };
            store.reserve(id, counters, ttl)
        });
        let answers = futures_util::future::join_all(asks).await;
        let granted = |range: std::ops::Range<usize>| {
            answers[range]
                .iter()
                .filter(|a| matches!(a, Ok(Reservation::Granted(_))))
                .count()
        };
        let refused = answers
            .iter()
            .filter(|a| matches!(a, Ok(Reservation::Exceeded(0))))
            .count();
        assert_eq!((granted(0..150), granted(150..160), refused), (50, 5, 105));
        let scripts = scripts_run(&redis);
        println!("160 reservations of two tenants: {scripts} scripts");
        // The first of each tenant alone, then those that arrived while it was in flight
        // together, and so on (how many arrive in one round trip varies with the machine): a
        // script per reservation would be 160.
        assert!(
            scripts <= 40,
            "{scripts} scripts: reservations were not gathered"
        );
        // What the batch held is what a hold counts: 50 held, and released they free the limit.
        assert_eq!(
            redis
                .cli(&["ZCARD", "mailroute:{busy}:customer:10m:h"])
                .trim(),
            "50"
        );
        assert_eq!(
            redis
                .cli(&["ZCARD", "mailroute:{busy}:customer:1d:h"])
                .trim(),
            "50"
        );
        let holds: Vec<Hold> = ids
            .iter()
            .zip(&answers)
            .take(150)
            .filter_map(|(id, a)| match a {
                Ok(Reservation::Granted(reserved)) => Some(Hold {
                    id: id.clone(),
                    counters: busy.clone(),
                    reserved: reserved.clone(),
                }),
                _ => None,
            })
            .collect();
        store
            .finish(&holds, false)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            redis
                .cli(&["ZCARD", "mailroute:{busy}:customer:10m:h"])
                .trim(),
            "0"
        );
        let again = store.reserve("again", &busy, ttl).await;
        assert!(matches!(again, Ok(Reservation::Granted(_))), "{again:?}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_messages_settle_in_a_few_scripts_and_count_exactly() {
    bounded(60, async {
        let redis = RedisServer::start();
        let sink = Sink::start();
        let config = on_redis(&redis, &trial(sink.addr, ""));
        let relay = config.start().await;
        // 40 clients at once: 40 reservations, and settlements gathered per window.
        let fates = burst(&[relay.smtp], 40).await;
        assert!(fates.iter().all(|f| *f == Fate::Accepted), "{fates:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
        let scripts = scripts_run(&redis);
        println!("40 accepted messages: {scripts} scripts");
        assert!(
            scripts <= 40 + 20,
            "{scripts} scripts for 40 reservations: settlements were not gathered"
        );
        // Every hold was settled into the count: none is left held ...
        let held = redis.cli(&["ZCARD", "mailroute:{example}:customer:10m:h"]);
        assert_eq!(held.trim(), "0");
        let units: i64 = redis
            .cli(&["HVALS", "mailroute:{example}:customer:10m:n"])
            .split_whitespace()
            .filter_map(|v| v.parse::<i64>().ok())
            .sum();
        assert_eq!(units, 40);
        // ... and the settled count is what the next decisions see: 10 more, then the limit.
        let mut later = Vec::new();
        for i in 0..12 {
            later.push(
                one_message(
                    relay.smtp,
                    "app@example.com",
                    &format!("l{i}@partner.example"),
                )
                .await,
            );
        }
        let accepted = later.iter().filter(|f| **f == Fate::Accepted).count();
        assert_eq!(accepted, PEAK - 40, "{later:?}");
    })
    .await;
}

/// What route rate limits and connection leases ask of a store beyond reservations: the use
/// of a counter (settled plus held) read without changing it, and a hold renewed while it
/// lives but never brought back once it ended or expired. Both stores answer alike.
async fn usage_and_renewal(store: &dyn QuotaStore) {
    let counters = tenant_counters("usage", 5);
    let ttl = Duration::from_secs(60);
    let reserve = async |id: &str, ttl| match store.reserve(id, &counters, ttl).await {
        Ok(Reservation::Granted(reserved)) => Hold {
            id: id.to_owned(),
            counters: counters.clone(),
            reserved,
        },
        other => panic!("{other:?}"),
    };
    let usage = async || {
        store
            .usage(&counters)
            .await
            .unwrap_or_else(|e| panic!("{e}"))
    };
    assert_eq!(usage().await, [0, 0]);
    let settled = reserve("settled", ttl).await;
    let held = reserve("held", ttl).await;
    store
        .finish(std::slice::from_ref(&settled), true)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    // One settled and one held, on both counters; reading changed nothing.
    assert_eq!(usage().await, [2, 2]);
    assert_eq!(usage().await, [2, 2]);

    assert!(
        store
            .renew(&held, ttl)
            .await
            .unwrap_or_else(|e| panic!("{e}"))
    );
    assert!(
        !store
            .renew(&settled, ttl)
            .await
            .unwrap_or_else(|e| panic!("{e}"))
    );
    let short = reserve("short", Duration::from_millis(200)).await;
    assert!(
        store
            .renew(&short, Duration::from_millis(400))
            .await
            .unwrap_or_else(|e| panic!("{e}"))
    );
    tokio::time::sleep(Duration::from_millis(250)).await;
    // Renewed: still held past its first expiry.
    assert_eq!(usage().await, [3, 3]);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !store
            .renew(&short, ttl)
            .await
            .unwrap_or_else(|e| panic!("{e}"))
    );
    assert_eq!(usage().await, [2, 2]);
}

#[tokio::test]
async fn both_stores_read_usage_and_renew_holds_only_while_they_live() {
    bounded(30, async {
        usage_and_renewal(&MemoryQuotaStore::default()).await;
        let redis = RedisServer::start();
        let store =
            RedisStore::new(&redis.url(), Duration::from_secs(1)).unwrap_or_else(|e| panic!("{e}"));
        usage_and_renewal(&store).await;
    })
    .await;
}
