//! MTA-STS (RFC 8461) for a route delivering by MX lookup with `mxLookup: {mtaSts: true}`,
//! against a DNS server ([`support::dns`]) and an HTTPS policy server on loopback, with a
//! second relay as the domain's MX host presenting certificates of a test authority the relay
//! under test is told to trust (as `--mx-ca-file` does): `enforce` sends nothing to an
//! unlisted MX host or over a certificate that fails, `testing` delivers and counts, a cached
//! policy outlives an outage of its server, and a new TXT id brings a new policy.

mod support;

use mailroute_relay::delivery::mta_sts::Policies;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;
use support::dns::DnsServer;
use support::mta_sts::{PolicyServer, TestCa, install, partner_relay};
use support::{Configured, Relay, Stores, bounded, send_message};

/// Mail from example.com's applications to partner.test goes through route `partner`, which
/// delivers to partner.test's MX hosts (on the MX relay's port) under its MTA-STS policy.
fn relay_for(dns: &DnsServer, mx: &Relay, policy_server: &PolicyServer, ca: &TestCa) -> Configured {
    partner_relay(
        mx.smtp.port(),
        "{mtaSts: true}",
        Stores {
            dns_server: Some(dns.addr),
            mta_sts: Arc::new(Policies::new(policy_server.addr.port(), Some(&ca.pem))),
            ..Stores::memory()
        },
    )
}

/// partner.test: one MX host, `mx.partner.test`, and an MTA-STS policy with id `id`.
async fn zone(id: &str) -> DnsServer {
    let dns = DnsServer::start().await;
    dns.set_mx("partner.test", 10, "mx.partner.test");
    dns.a("mx.partner.test", Ipv4Addr::LOCALHOST);
    dns.a("mta-sts.partner.test", Ipv4Addr::LOCALHOST);
    dns.set_txt("_mta-sts.partner.test", &format!("v=STSv1; id={id};"));
    dns
}

fn policy(mode: &str, mx: &str) -> String {
    format!("version: STSv1\r\nmode: {mode}\r\nmx: {mx}\r\nmax_age: 86400\r\n")
}

async fn send(relay: SocketAddr, id: &str) -> String {
    send_message(
        relay,
        "app@example.com",
        &["bob@partner.test"],
        &format!("Message-ID: <{id}@example.com>\r\nSubject: {id}\r\n\r\nbody\r\n"),
    )
    .await
}

/// The count of `mailroute_relay_tls_policy_results_total` for partner.test with these
/// labels (0 when absent).
fn results(config: &Configured, policy_type: &str, mode: &str, result: &str) -> u64 {
    let wanted = format!(
        "mailroute_relay_tls_policy_results_total{{domain=\"partner.test\",policy_type=\"{policy_type}\",mode=\"{mode}\",result=\"{result}\"}} "
    );
    config
        .metrics_text()
        .lines()
        .find_map(|l| l.strip_prefix(&wanted))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// Whether the MX host received the message `id` over TLS (its Received: header says ESMTPS).
fn received_over_tls(mx: &Relay, id: &str) -> Option<bool> {
    let messages = mx.capture.messages.lock().ok()?;
    let t = messages
        .iter()
        .find(|t| String::from_utf8_lossy(&t.content).contains(&format!("Subject: {id}")))?;
    let received = String::from_utf8_lossy(&t.content[..t.received_len]).into_owned();
    Some(received.contains("ESMTPS"))
}

#[tokio::test]
async fn enforce_delivers_to_a_listed_mx_over_verified_tls_and_nothing_with_a_bad_certificate() {
    bounded(60, async {
        let ca = TestCa::new();
        let mx = Relay::start(support::Options::default()).await;
        install(&mx, &ca.issue("mx.partner.test"));
        let server = PolicyServer::start(
            &ca,
            "mta-sts.partner.test",
            &policy("enforce", "mx.partner.test"),
        )
        .await;
        let dns = zone("20261204").await;
        let config = relay_for(&dns, &mx, &server, &ca);
        let relay = config.start().await;

        let reply = send(relay.smtp, "sts-good").await;
        assert!(reply.starts_with("250"), "{reply}");
        assert_eq!(received_over_tls(&mx, "sts-good"), Some(true));
        assert_eq!(results(&config, "sts", "enforce", "success"), 1);

        // The MX host now presents a certificate for another name (as after a hijack), then
        // one that no trusted authority issued. A relay that never met the host before is
        // sent each time: one that did would resume its verified TLS session.
        install(&mx, &ca.issue("mx.attacker.test"));
        let mismatch = relay_for(&dns, &mx, &server, &ca);
        let relay = mismatch.start().await;
        let reply = send(relay.smtp, "sts-mismatch").await;
        assert!(reply.starts_with("451 4.4.0"), "{reply}");
        assert!(reply.contains("route partner"), "{reply}");
        assert_eq!(
            results(&mismatch, "sts", "enforce", "certificate-host-mismatch"),
            1
        );
        let self_signed = rcgen::generate_simple_self_signed(vec!["mx.partner.test".to_owned()])
            .unwrap_or_else(|e| panic!("{e}"));
        install(
            &mx,
            &support::mta_sts::Issued {
                cert_pem: self_signed.cert.pem(),
                key_pem: self_signed.signing_key.serialize_pem(),
            },
        );
        let untrusted = relay_for(&dns, &mx, &server, &ca);
        let relay = untrusted.start().await;
        let reply = send(relay.smtp, "sts-untrusted").await;
        assert!(reply.starts_with("451 4.4.0"), "{reply}");
        assert_eq!(
            results(&untrusted, "sts", "enforce", "certificate-not-trusted"),
            1
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(
            mx.capture.count(),
            1,
            "nothing sent over a failed certificate"
        );
        assert_eq!(server.requests(), 3, "each relay fetched the policy once");
    })
    .await;
}

#[tokio::test]
async fn enforce_sends_nothing_to_an_mx_host_the_policy_does_not_list() {
    bounded(60, async {
        let ca = TestCa::new();
        let mx = Relay::start(support::Options::default()).await;
        // A valid certificate for the host the MX record names, but the policy names another:
        // the MX record is what an attacker on the DNS path would change.
        install(&mx, &ca.issue("mx.partner.test"));
        let server = PolicyServer::start(
            &ca,
            "mta-sts.partner.test",
            &policy("enforce", "*.mail.partner.test"),
        )
        .await;
        let dns = zone("1").await;
        let config = relay_for(&dns, &mx, &server, &ca);
        let relay = config.start().await;
        let reply = send(relay.smtp, "sts-unlisted").await;
        assert!(reply.starts_with("451 4.4.0"), "{reply}");
        assert!(
            reply.contains("no MX host of partner.test is listed in its MTA-STS policy"),
            "{reply}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(mx.capture.count(), 0);
        assert_eq!(results(&config, "sts", "enforce", "validation-failure"), 1);
    })
    .await;
}

#[tokio::test]
async fn testing_delivers_and_counts_what_enforce_would_have_refused() {
    bounded(60, async {
        let ca = TestCa::new();
        // The relay's own self-signed certificate: not from a trusted authority.
        let mx = Relay::start(support::Options::default()).await;
        let server = PolicyServer::start(
            &ca,
            "mta-sts.partner.test",
            &policy("testing", "mx.partner.test"),
        )
        .await;
        let dns = zone("1").await;
        let config = relay_for(&dns, &mx, &server, &ca);
        let relay = config.start().await;
        let reply = send(relay.smtp, "sts-testing").await;
        assert!(reply.starts_with("250"), "{reply}");
        assert_eq!(mx.capture.count(), 1);
        assert_eq!(
            results(&config, "sts", "testing", "certificate-not-trusted"),
            1
        );
        assert_eq!(results(&config, "sts", "testing", "success"), 0);
    })
    .await;
}

#[tokio::test]
async fn a_cached_policy_outlives_its_server_and_a_new_id_brings_a_new_policy() {
    bounded(60, async {
        let ca = TestCa::new();
        let mx = Relay::start(support::Options::default()).await;
        install(&mx, &ca.issue("mx.partner.test"));
        let server = PolicyServer::start(
            &ca,
            "mta-sts.partner.test",
            &policy("enforce", "mx.partner.test"),
        )
        .await;
        let dns = zone("1").await;
        let config = relay_for(&dns, &mx, &server, &ca);
        let relay = config.start().await;

        // A policy announced but not to be had, and none cached: delivered as without one.
        server.set_down(true);
        let reply = send(relay.smtp, "sts-unfetched").await;
        assert!(reply.starts_with("250"), "{reply}");
        assert_eq!(results(&config, "sts", "none", "sts-policy-fetch-error"), 1);

        // Back up: the policy is fetched and enforced.
        server.set_down(false);
        let reply = send(relay.smtp, "sts-fetched").await;
        assert!(reply.starts_with("250"), "{reply}");
        assert_eq!(received_over_tls(&mx, "sts-fetched"), Some(true));
        assert_eq!(server.requests(), 1);

        // The server is down again and the MX record now names a host the policy does not
        // list: the cached policy is still in force, so nothing is sent.
        server.set_down(true);
        dns.a("mx2.partner.test", Ipv4Addr::LOCALHOST);
        dns.set_mx("partner.test", 10, "mx2.partner.test");
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let reply = send(relay.smtp, "sts-cached").await;
        assert!(reply.starts_with("451 4.4.0"), "{reply}");
        assert_eq!(mx.capture.count(), 2);
        assert_eq!(results(&config, "sts", "enforce", "validation-failure"), 1);

        // A new id in DNS (1 s TTL) and a testing policy: fetched again, and mail flows.
        server.set_down(false);
        server.set_policy(&policy("testing", "mx.partner.test"));
        dns.set_txt("_mta-sts.partner.test", "v=STSv1; id=2;");
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let reply = send(relay.smtp, "sts-new-id").await;
        assert!(reply.starts_with("250"), "{reply}");
        assert_eq!(server.requests(), 2, "fetched once more, for the new id");
        assert_eq!(results(&config, "sts", "testing", "validation-failure"), 1);
    })
    .await;
}
