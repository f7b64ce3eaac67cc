//! A route's sending limits kept across replicas (SPEC 11, `MailRoute.rateLimits`): three relay
//! processes on one Redis, a route allowing 30 messages a minute (Microsoft 365's published
//! limit per mailbox), 100 clients at once: the upstream receives exactly 30, and the other 70
//! hear `451 4.4.5` naming the route (their own queues retry; nothing is lost or sent twice);
//! once the route is at its limit, the next client is refused at RCPT, before its message;
//! the relays' metrics show the route's use against its limit. And a route allowing two
//! connections at once (`maxConcurrentConnections`): three relays never open a third.

mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};
use support::bounded;
use support::http_get;
use support::redis::RedisServer;
use support::scripted::{Script, Scripted};
use support::sink::{Sink, free_port};
use support::trial::{Fate, RelayProcess, burst, manifests, one_message, tenant};

/// Three relay processes on one Redis in front of an smtp-sink, route `out` allowing 30
/// messages a minute; the first relay also serves `--admin` on `admin`, when given.
struct ThirtyAMinute {
    sink: Sink,
    _relays: Vec<RelayProcess>,
    addrs: Vec<SocketAddr>,
    redis: RedisServer,
    _dir: tempfile::TempDir,
}

fn thirty_a_minute(admin: Option<SocketAddr>) -> ThirtyAMinute {
    let redis = RedisServer::start();
    let sink = Sink::start();
    let dir = manifests(&tenant(
        sink.addr,
        "  rateLimits: {messagesPerMinute: 30}",
        "  licenses: 1000",
    ));
    let url = redis.url();
    let admin_arg = admin.map(|a| a.to_string());
    let relays: Vec<RelayProcess> = (0..3)
        .map(|i| {
            let mut args = vec!["--store", url.as_str()];
            if let (0, Some(admin)) = (i, &admin_arg) {
                args.extend(["--admin", admin.as_str()]);
            }
            RelayProcess::start(dir.path(), &args)
        })
        .collect();
    let addrs = relays.iter().map(|r| r.smtp).collect();
    ThirtyAMinute {
        sink,
        _relays: relays,
        addrs,
        redis,
        _dir: dir,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_relays_never_send_a_route_more_than_its_messages_per_minute() {
    bounded(180, async {
        let admin: SocketAddr = ([127, 0, 0, 1], free_port()).into();
        let setup = thirty_a_minute(Some(admin));
        let (sink, addrs, redis) = (&setup.sink, &setup.addrs, &setup.redis);
        let fates = burst(addrs, 100).await;
        let accepted = fates.iter().filter(|f| **f == Fate::Accepted).count();
        // NB: deferred at the end of data while the minute's 30 were still in flight, or
        // refused at RCPT once they were settled.
        let paced: Vec<&String> = fates
            .iter()
            .filter_map(|f| match f {
                Fate::Failed(r) | Fate::Refused(r) => Some(r),
                _ => None,
            })
            .collect();
        println!(
            "3 relays, 100 clients, 30 a minute: {accepted} delivered, {} deferred",
            paced.len()
        );
        assert_eq!((accepted, paced.len()), (30, 70), "{fates:?}");
        for r in paced {
            assert!(
                r.starts_with("451 4.4.5")
                    && r.contains("Route out is at its rate limit (30 messages a minute)"),
                "{r}"
            );
        }
        assert_eq!(sink.wait_count("Subject: quota ", 30), 30);
        // What was sent is settled into the route's count, nothing is left held.
        let held = redis.cli(&["ZCARD", "mailroute:{route:out}:rate:messages_per_minute:h"]);
        assert_eq!(held.trim(), "0");
        let sent: i64 = redis
            .cli(&["HVALS", "mailroute:{route:out}:rate:messages_per_minute:n"])
            .split_whitespace()
            .filter_map(|v| v.parse::<i64>().ok())
            .sum();
        assert_eq!(sent, 30);

        // The route is at its limit: the next client hears it at RCPT, before its message.
        for relay in addrs {
            let fate = one_message(*relay, "app@example.com", "late@partner.example").await;
            match fate {
                Fate::Refused(r) => assert!(
                    r.starts_with("451 4.4.5")
                        && r.contains("Route out is at its rate limit (30 messages a minute)"),
                    "{r}"
                ),
                other => panic!("expected a refusal at RCPT, got {other:?}"),
            }
        }
        assert_eq!(sink.count("Subject: quota late@"), 0);

        // The metrics show the route's use, over all three relays, against its limit.
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let (_, metrics) = http_get(admin, "/metrics");
            let used = r#"mailroute_relay_route_rate_limit_used{route="out",limit="messages_per_minute"} 30"#;
            let max = r#"mailroute_relay_route_rate_limit_max{route="out",limit="messages_per_minute"} 30"#;
            if metrics.contains(used) && metrics.contains(max) {
                assert!(metrics.contains(
                    r#"mailroute_relay_rcpt_refusals_total{tenant="example",reason="rate_limit"}"#
                ), "{metrics}");
                break;
            }
            assert!(Instant::now() < deadline, "usage not shown: {metrics}");
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    })
    .await;
}

/// A provider's concurrent-connection limit: route `out` allows two connections at once
/// (in use or idle in a pool), three relays share it, thirty clients arrive together at an
/// upstream slow enough that their sessions overlap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_relays_never_open_more_connections_than_the_route_allows() {
    bounded(180, async {
        let redis = RedisServer::start();
        let upstream = Scripted::start(Script {
            delay: Duration::from_millis(40),
            slow_connections: usize::MAX,
            ..Script::default()
        })
        .await;
        let dir = manifests(&format!(
            r#"
apiVersion: mailroute.io/v1alpha1
kind: MailRoute
metadata: {{name: out, namespace: mail}}
spec:
  host: {}
  port: {}
  tls: {{mode: Disabled}}
  connectionPool: {{maxConnections: 20, idleTimeout: 2s}}
  rateLimits: {{maxConcurrentConnections: 2}}
---
apiVersion: mailroute.io/v1alpha1
kind: RelayPolicy
metadata: {{name: example, namespace: mail}}
spec:
  domains: [example.com]
  authentication: {{ipRanges: [{{cidr: 127.0.0.0/16}}]}}
  outboundRoute: out
  licenses: 1000
"#,
            upstream.addr.ip(),
            upstream.addr.port()
        ));
        let url = redis.url();
        let relays: Vec<RelayProcess> = (0..3)
            .map(|_| RelayProcess::start(dir.path(), &["--store", &url]))
            .collect();
        let addrs: Vec<SocketAddr> = relays.iter().map(|r| r.smtp).collect();
        let fates = burst(&addrs, 30).await;
        let mut deferred = Vec::new();
        for (i, fate) in fates.iter().enumerate() {
            match fate {
                Fate::Accepted => {}
                Fate::Failed(r) => {
                    assert!(
                        r.starts_with("451 4.4.5")
                            && r.contains("Route out is at its rate limit (2 connections at once)"),
                        "{r}"
                    );
                    deferred.push(i);
                }
                Fate::Refused(r) => panic!("refused at RCPT: {r}"),
            }
        }
        println!(
            "3 relays, 30 clients, 2 connections: {} delivered at once, {} deferred, at most {} open",
            30 - deferred.len(),
            deferred.len(),
            upstream.most_open()
        );
        assert!(deferred.len() < 30, "nothing was delivered");
        assert!(upstream.most_open() <= 2, "{} open at once", upstream.most_open());

        // The deferred clients retry (through any relay, as a Service spreads them): every
        // message arrives once, and never over a third connection.
        let deadline = Instant::now() + Duration::from_secs(60);
        for (attempt, i) in (0..).zip(deferred) {
            let mut attempt = attempt;
            loop {
                let relay = addrs[attempt % addrs.len()];
                let to = format!("r{i}@partner.example");
                if one_message(relay, "app@example.com", &to).await == Fate::Accepted {
                    break;
                }
                assert!(Instant::now() < deadline, "r{i} never delivered");
                attempt += 1;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        for i in 0..30 {
            assert_eq!(upstream.count(&format!("Subject: quota r{i}@")), 1, "r{i}");
        }
        assert!(upstream.most_open() <= 2, "{} open at once", upstream.most_open());
    })
    .await;
}

/// The clients told `451 4.4.5` retry as their queues do: once the rolling minute has moved
/// on, every deferred message is delivered, exactly once, and the upstream never received
/// more than 30 in any minute.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_deferred_by_a_rate_limit_are_all_delivered_by_their_retries() {
    bounded(180, async {
        let setup = thirty_a_minute(None);
        let (sink, addrs) = (&setup.sink, &setup.addrs);
        let started = Instant::now();
        let fates = burst(addrs, 40).await;
        let deferred: Vec<usize> = fates
            .iter()
            .enumerate()
            .filter(|(_, f)| **f != Fate::Accepted)
            .map(|(i, _)| i)
            .collect();
        assert_eq!(deferred.len(), 10, "{fates:?}");
        // Within the first minute nothing more gets through...
        let early = one_message(addrs[0], "app@example.com", "r0-retry@partner.example").await;
        assert!(
            matches!(early, Fate::Refused(ref r) if r.starts_with("451 4.4.5")),
            "{early:?}"
        );
        // ...and once the minute has rolled on, the retries deliver every deferred message.
        for (n, i) in deferred.iter().enumerate() {
            let to = format!("r{i}@partner.example");
            loop {
                if one_message(addrs[n % addrs.len()], "app@example.com", &to).await
                    == Fate::Accepted
                {
                    break;
                }
                assert!(
                    started.elapsed() < Duration::from_secs(150),
                    "{to} never delivered"
                );
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
        assert!(
            started.elapsed() >= Duration::from_secs(55),
            "retries got in too early"
        );
        for i in 0..40 {
            assert_eq!(sink.count(&format!("Subject: quota r{i}@")), 1, "r{i}");
        }
    })
    .await;
}
