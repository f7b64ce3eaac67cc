//! Recipient verification at RCPT time (SPEC 6.4): a route with `verifyRecipients` asks its
//! upstream about each recipient while the client is still at RCPT, so the client gets the
//! upstream's own refusal per recipient instead of a failure after the message.
//!
//! The upstream is a second Mailroute relay (a real SMTP server with per-recipient refusals
//! from a routing rule), which delivers to Postfix `smtp-sink`.

mod support;

use std::net::SocketAddr;
use support::sink::{Sink, free_port};
use support::{Client, bounded, configured};

/// The mailbox side: refuses `gone@example.com` with 550 5.1.1, delivers the rest to `sink`.
fn mailbox(sink: SocketAddr) -> String {
    format!(
        r#"
apiVersion: mailroute.io/v1alpha1
kind: MailRoute
metadata: {{name: store, namespace: mail}}
spec:
  host: {}
  port: {}
  tls: {{mode: Disabled}}
---
apiVersion: mailroute.io/v1alpha1
kind: RelayPolicy
metadata: {{name: example, namespace: mail}}
spec:
  domains: [example.com]
  licenses: 5
  inboundRoute: store
---
apiVersion: mailroute.io/v1alpha1
kind: RoutingRule
metadata: {{name: gone, namespace: mail}}
spec:
  policyRef: example
  priority: 1
  messages: [Inbound]
  envelopeFilter: {{recipients: [{{address: gone@example.com}}]}}
  actions: {{reject: {{code: 550, enhancedCode: "5.1.1", text: "Mailbox gone@example.com does not exist"}}}}
"#,
        sink.ip(),
        sink.port()
    )
}

/// The edge relay: one route to the mailbox side, verifying recipients.
fn edge(upstream: SocketAddr, verify: bool) -> String {
    format!(
        r#"
apiVersion: mailroute.io/v1alpha1
kind: MailRoute
metadata: {{name: mailbox, namespace: mail}}
spec:
  host: {}
  port: {}
  tls: {{mode: Disabled}}
  verifyRecipients: {verify}
  timeouts: {{connect: 1s, command: 2s, dataEnd: 2s}}
---
apiVersion: mailroute.io/v1alpha1
kind: RelayPolicy
metadata: {{name: example, namespace: mail}}
spec:
  domains: [example.com]
  licenses: 5
  inboundRoute: mailbox
"#,
        upstream.ip(),
        upstream.port()
    )
}

/// One transaction with per-recipient replies; returns them and the reply after DATA.
async fn transaction(relay: SocketAddr, recipients: &[&str], id: &str) -> (Vec<String>, String) {
    let mut c = Client::connect(relay).await;
    c.reply().await;
    c.command("EHLO client.test").await;
    assert!(
        c.command("MAIL FROM:<someone@partner.example>")
            .await
            .starts_with("250")
    );
    let mut replies = Vec::new();
    for r in recipients {
        replies.push(c.command(&format!("RCPT TO:<{r}>")).await);
    }
    let mut after = String::new();
    if replies.iter().any(|r| r.starts_with("250")) {
        assert!(c.command("DATA").await.starts_with("354"));
        c.send(format!("Subject: {id}\r\n\r\nbody\r\n.\r\n").as_bytes())
            .await;
        after = c.reply().await;
    }
    let _ = c.command("QUIT").await;
    (replies, after)
}

#[tokio::test]
async fn a_recipient_the_upstream_refuses_is_refused_at_rcpt_with_its_reply() {
    bounded(60, async {
        let sink = Sink::start();
        let inner = configured(&mailbox(sink.addr));
        let inner_relay = inner.start().await;
        let outer = configured(&edge(inner_relay.smtp, true));
        let relay = outer.start().await;

        let (replies, after) = transaction(
            relay.smtp,
            &["alice@example.com", "gone@example.com", "bob@example.com"],
            "verified",
        )
        .await;
        assert!(replies[0].starts_with("250"), "{replies:?}");
        assert!(
            replies[1].starts_with("550 5.1.1") && replies[1].contains("does not exist"),
            "the upstream's own refusal: {replies:?}"
        );
        assert!(replies[2].starts_with("250"), "{replies:?}");
        assert!(after.starts_with("250"), "{after}");
        assert_eq!(sink.wait_count("Subject: verified\n", 1), 1);
        let dump = String::from_utf8_lossy(&sink.dumps().concat()).into_owned();
        assert!(dump.contains("alice@example.com") && dump.contains("bob@example.com"));
        assert!(!dump.contains("gone@example.com"), "{dump}");

        let metrics = outer.metrics_text();
        assert!(
            metrics.contains(
                r#"mailroute_relay_recipient_verifications_total{route="mailbox",result="refused"} 1"#
            ),
            "{metrics}"
        );
        assert!(metrics.contains(
            r#"mailroute_relay_recipient_verifications_total{route="mailbox",result="accepted"} 2"#
        ));
        // The checks and the delivery share pooled connections: no probe left one open each.
        assert!(outer.forwarder.idle_connections() <= 2);
    })
    .await;
}

#[tokio::test]
async fn without_verification_the_refusal_comes_after_the_message() {
    bounded(60, async {
        let sink = Sink::start();
        let inner = configured(&mailbox(sink.addr));
        let inner_relay = inner.start().await;
        let outer = configured(&edge(inner_relay.smtp, false));
        let relay = outer.start().await;
        let (replies, after) = transaction(relay.smtp, &["gone@example.com"], "unverified").await;
        assert!(replies[0].starts_with("250"), "{replies:?}");
        assert!(after.starts_with("550"), "{after}");
        assert!(
            !outer
                .metrics_text()
                .contains("recipient_verifications_total{")
        );
    })
    .await;
}

#[tokio::test]
async fn an_upstream_that_cannot_be_asked_does_not_block_rcpt() {
    bounded(60, async {
        let closed = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let outer = configured(&edge(closed, true));
        let relay = outer.start().await;
        let (replies, after) = transaction(relay.smtp, &["alice@example.com"], "down").await;
        assert!(replies[0].starts_with("250"), "{replies:?}");
        // Delivery then decides, and nothing is lost: the client is told to retry.
        assert!(after.starts_with("451"), "{after}");
        assert!(outer.metrics_text().contains(
            r#"mailroute_relay_recipient_verifications_total{route="mailbox",result="unavailable"} 1"#
        ));
    })
    .await;
}
