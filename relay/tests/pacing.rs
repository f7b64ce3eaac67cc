//! A route's sending limits kept across replicas (SPEC 11, `MailRoute.rateLimits`): three relay
//! processes on one Redis, a route allowing 30 messages a minute (Microsoft 365's published
//! limit per mailbox), 100 clients at once: the upstream receives exactly 30, and the other 70
//! hear `451 4.4.5` naming the route (their own queues retry; nothing is lost or sent twice).

mod support;

use std::net::SocketAddr;
use support::bounded;
use support::redis::RedisServer;
use support::sink::Sink;
use support::trial::{Fate, RelayProcess, burst, manifests, tenant};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_relays_never_send_a_route_more_than_its_messages_per_minute() {
    bounded(180, async {
        let redis = RedisServer::start();
        let sink = Sink::start();
        let dir = manifests(&tenant(
            sink.addr,
            "  rateLimits: {messagesPerMinute: 30}",
            "  licenses: 1000",
        ));
        let url = redis.url();
        let relays: Vec<RelayProcess> = (0..3)
            .map(|_| RelayProcess::start(dir.path(), &["--store", &url]))
            .collect();
        let addrs: Vec<SocketAddr> = relays.iter().map(|r| r.smtp).collect();
        let fates = burst(&addrs, 100).await;
        let accepted = fates.iter().filter(|f| **f == Fate::Accepted).count();
        let paced: Vec<&String> = fates
            .iter()
            .filter_map(|f| match f {
                Fate::Failed(r) => Some(r),
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
    })
    .await;
}
