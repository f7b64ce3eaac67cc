//! Direct delivery by MX lookup (SPEC 6.4), against a DNS server on loopback
//! ([`support::dns`]) and Postfix `smtp-sink` as the recipient domain's mail host: preference
//! order with failover, the A-record fallback of RFC 5321 section 5.1, the TTL cache, and the
//! permanent refusals (NXDOMAIN, null MX).

mod support;

use hickory_proto::rr::RecordType;
use std::net::{Ipv4Addr, SocketAddr};
use support::dns::DnsServer;
use support::sink::Sink;
use support::{Configured, Stores, bounded, configured_with_stores, send_message};

/// A tenant relaying from 127.0.0.0/16 with no outbound route: direct delivery.
const POLICY: &str = r#"
apiVersion: mailroute.io/v1alpha1
kind: RelayPolicy
metadata: {name: example, namespace: mail}
spec:
  domains: [example.com]
  licenses: 10
  authentication: {ipRanges: [{cidr: 127.0.0.0/16}]}
"#;

fn relay_for(dns: &DnsServer, sink: &Sink) -> Configured {
    configured_with_stores(
        POLICY,
        Stores {
            dns_server: Some(dns.addr),
            mx_port: sink.addr.port(),
            ..Stores::memory()
        },
    )
}

fn message(id: &str) -> String {
    format!("Message-ID: <{id}@example.com>\r\nSubject: {id}\r\n\r\nbody\r\n")
}

async fn send(relay: SocketAddr, to: &str, id: &str) -> String {
    send_message(relay, "app@example.com", &[to], &message(id)).await
}

#[tokio::test]
async fn mx_hosts_are_tried_in_preference_order_and_answers_are_cached() {
    bounded(60, async {
        let sink = Sink::start();
        let dns = DnsServer::start().await;
        // The preferred host does not answer; the next one is the sink.
        dns.mx("partner.test", 10, "dead.partner.test");
        dns.mx("partner.test", 20, "mx.partner.test");
        dns.a("dead.partner.test", Ipv4Addr::new(127, 0, 0, 2));
        dns.a("mx.partner.test", Ipv4Addr::new(127, 0, 0, 1));
        let config = relay_for(&dns, &sink);
        let relay = config.start().await;
        for id in ["mx-1", "mx-2"] {
            let reply = send(relay.smtp, "bob@partner.test", id).await;
            assert!(reply.starts_with("250"), "{reply}");
        }
        assert_eq!(sink.wait_count("Subject: mx-", 2), 2);
        let dump = String::from_utf8_lossy(&sink.dumps().concat()).into_owned();
        assert!(dump.contains("bob@partner.test"), "{dump}");
        // Within the records' 300 s TTL the second message asked nothing again.
        assert_eq!(dns.queries("partner.test", RecordType::MX), 1);
        assert_eq!(dns.queries("mx.partner.test", RecordType::A), 1);
    })
    .await;
}

#[tokio::test]
async fn a_domain_without_mx_records_gets_mail_at_its_address() {
    bounded(60, async {
        let sink = Sink::start();
        let dns = DnsServer::start().await;
        dns.a("plain.test", Ipv4Addr::new(127, 0, 0, 1));
        let config = relay_for(&dns, &sink);
        let relay = config.start().await;
        let reply = send(relay.smtp, "carol@plain.test", "a-fallback").await;
        assert!(reply.starts_with("250"), "{reply}");
        assert_eq!(sink.wait_count("Subject: a-fallback", 1), 1);
        assert!(dns.queries("plain.test", RecordType::MX) >= 1);
    })
    .await;
}

#[tokio::test]
async fn a_domain_that_does_not_exist_or_takes_no_mail_is_refused_permanently() {
    bounded(60, async {
        let sink = Sink::start();
        let dns = DnsServer::start().await;
        dns.null_mx("nomail.test");
        let config = relay_for(&dns, &sink);
        let relay = config.start().await;
        let reply = send(relay.smtp, "x@missing.test", "nx").await;
        assert!(
            reply.starts_with("550 5.1.2") && reply.contains("does not exist"),
            "{reply}"
        );
        let reply = send(relay.smtp, "x@nomail.test", "null-mx").await;
        assert!(
            reply.starts_with("550 5.1.2") && reply.contains("null MX"),
            "{reply}"
        );
        assert_eq!(sink.count("Subject: "), 0);
        assert!(dns.total() >= 2);
    })
    .await;
}
