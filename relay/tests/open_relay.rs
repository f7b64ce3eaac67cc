//! The classic open-relay probes from an unauthorised address, on every listener: all refused
//! at RCPT, nothing delivered. Mail for the tenant's own domain is still accepted.

mod support;

use mailroute_relay::config_source;
use support::{Client, Relay, bounded, policy_options};

const PROBES: &[&str] = &[
    "victim@external.example",
    "victim@EXTERNAL.Example",
    "victim%external.example@example.com",
    "victim%external.example@relay.test",
    "external.example!victim@example.com",
    "\"victim@external.example\"@example.com",
    "\"victim%external.example\"@example.com",
    "@example.com:victim@external.example",
    "victim@[192.0.2.1]",
    "victim@[IPv6:2001:db8::1]",
    "victim@external.example.",
    "victim@example.com.external.example",
    "victim@example.com.",
    "postmaster@external.example",
];

async fn relay_with_policy() -> Relay {
    let examples =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/dual-delivery");
    let loaded = config_source::from_manifests(&examples, 1).unwrap_or_else(|e| panic!("{e}"));
    Relay::start(policy_options(&loaded)).await
}

#[tokio::test]
async fn open_relay_probes_are_refused_on_every_listener_and_nothing_is_delivered() {
    bounded(60, async {
        let relay = relay_with_policy().await;
        let cert = relay.certs.cert_pem.clone();
        for listener in ["smtp", "submission", "smtps"] {
            let connect = || async {
                let mut c = match listener {
                    "smtp" => Client::connect(relay.smtp).await,
                    "submission" => Client::connect(relay.submission).await,
                    _ => Client::connect_tls(relay.smtps, &cert).await,
                };
                assert!(c.reply().await.starts_with("220"));
                assert!(c.command("EHLO prober.example").await.starts_with("250"));
                c
            };
            // One session per probe: a prober piling up refusals is cut off after ten anyway.
            for probe in PROBES {
                let mut c = connect().await;
                assert!(
                    c.command("MAIL FROM:<spammer@prober.example>")
                        .await
                        .starts_with("250")
                );
                let reply = c.command(&format!("RCPT TO:<{probe}>")).await;
                assert!(
                    reply.starts_with("550 5.7.1") || reply.starts_with("501 "),
                    "{listener}: {probe} was not refused: {reply}"
                );
                assert!(
                    c.command("DATA").await.starts_with("554 5.5.1"),
                    "{listener}: {probe}"
                );
            }
            // Inbound mail for the tenant's domain, in any case, is still accepted.
            let mut c = connect().await;
            assert!(
                c.command("MAIL FROM:<friend@prober.example>")
                    .await
                    .starts_with("250")
            );
            assert!(
                c.command("RCPT TO:<alice@Example.COM>")
                    .await
                    .starts_with("250 2.1.5")
            );
            assert!(
                c.command("RCPT TO:<sales@sub.example.com>")
                    .await
                    .starts_with("250 2.1.5")
            );
            c.command("QUIT").await;
        }
        assert_eq!(relay.capture.count(), 0, "no probe reached delivery");
    })
    .await;
}

#[tokio::test]
async fn an_authorised_network_relays_only_for_senders_the_tenant_allows() {
    bounded(30, async {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        std::fs::write(
            dir.path().join("policy.yaml"),
            "apiVersion: mailroute.io/v1alpha1\nkind: RelayPolicy\nmetadata: {name: apps, namespace: mail}\nspec:\n  domains: [example.org]\n  licenses: 10\n  allowedSenders: OwnDomains\n  authentication:\n    ipRanges: [{cidr: 127.0.0.1/32, description: this test}]\n",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let loaded = config_source::from_manifests(dir.path(), 1).unwrap_or_else(|e| panic!("{e}"));
        let relay = Relay::start(policy_options(&loaded)).await;

        let mut c = Client::connect(relay.smtp).await;
        c.reply().await;
        c.command("EHLO app.example.org").await;
        assert!(c.command("MAIL FROM:<app@example.org>").await.starts_with("250"));
        assert!(c.command("RCPT TO:<customer@external.example>").await.starts_with("250 2.1.5"), "relaying from the range");
        c.command("RSET").await;
        assert!(c.command("MAIL FROM:<ceo@bank.example>").await.starts_with("250"));
        let reply = c.command("RCPT TO:<customer@external.example>").await;
        assert!(reply.starts_with("550 5.7.1 Sender address not allowed"), "{reply}");
        assert!(c.command("RCPT TO:<team@example.org>").await.starts_with("250 2.1.5"), "inbound is open to any sender");
    })
    .await;
}

#[tokio::test]
async fn allowed_senders_any_rewrites_foreign_senders_of_relayed_mail_to_postmaster() {
    bounded(30, async {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        std::fs::write(
            dir.path().join("policy.yaml"),
            "apiVersion: mailroute.io/v1alpha1\nkind: RelayPolicy\nmetadata: {name: apps, namespace: mail}\nspec:\n  domains: [example.org]\n  licenses: 10\n  allowedSenders: Any\n  authentication:\n    ipRanges: [{cidr: 127.0.0.1/32}]\n",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let loaded = config_source::from_manifests(dir.path(), 1).unwrap_or_else(|e| panic!("{e}"));
        let relay = Relay::start(policy_options(&loaded)).await;
        let mut c = Client::connect(relay.smtp).await;
        c.reply().await;
        c.command("EHLO scanner.vendor.example").await;
        for (sender, recipient) in [("alerts@vendor.example", "ops@external.example"), ("", "ops@external.example"), ("alerts@vendor.example", "team@example.org")] {
            assert!(c.command(&format!("MAIL FROM:<{sender}>")).await.starts_with("250"));
            assert!(c.command(&format!("RCPT TO:<{recipient}>")).await.starts_with("250"), "{sender} -> {recipient}");
            assert!(c.command("DATA").await.starts_with("354"));
            c.send(b"Subject: scan report\r\n\r\nbody\r\n.\r\n").await;
            assert!(c.reply().await.starts_with("250"));
        }
        let messages = relay.capture.messages.lock().unwrap_or_else(|e| e.into_inner());
        let senders: Vec<&str> = messages.iter().map(|t| t.mail_from.as_str()).collect();
        assert_eq!(
            senders,
            ["postmaster@example.org", "postmaster@example.org", "alerts@vendor.example"],
            "relayed mail is rewritten; inbound mail keeps its sender"
        );
        assert!(messages.iter().all(|t| t.content.ends_with(b"Subject: scan report\r\n\r\nbody\r\n")), "content untouched");
    })
    .await;
}
