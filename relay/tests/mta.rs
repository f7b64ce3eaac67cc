//! End to end with the MTAs people already run as the relay's clients, on loopback: a Postfix
//! instance whose `relayhost` is the relay, and Exim with the relay as its smarthost, each
//! delivering through the relay to a Postfix `smtp-sink` upstream. (swaks, for AUTH over
//! STARTTLS and implicit TLS, is in `swaks.rs`.)

mod support;

use std::net::SocketAddr;
use support::mta::{Postfix, exim_send};
use support::sink::Sink;
use support::{Client, bounded, configured};

fn mailbox(sink: SocketAddr) -> String {
    format!(
        r#"
apiVersion: mailroute.io/v1alpha1
kind: MailRoute
metadata: {{name: mailbox, namespace: mail}}
spec: {{host: {}, port: {}, tls: {{mode: Disabled}}}}
---
apiVersion: mailroute.io/v1alpha1
kind: RelayPolicy
metadata: {{name: example, namespace: mail}}
spec: {{domains: [example.com], licenses: 5, inboundRoute: mailbox}}
"#,
        sink.ip(),
        sink.port()
    )
}

#[tokio::test]
async fn postfix_with_the_relay_as_relayhost_delivers_through_it() {
    bounded(90, async {
        let sink = Sink::start();
        let config = configured(&mailbox(sink.addr));
        let relay = config.start().await;
        let postfix = tokio::task::spawn_blocking(move || Postfix::start(relay.smtp))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        // A client hands two messages to Postfix, which queues and relays them.
        let mut c = Client::connect(postfix.smtp).await;
        c.reply().await;
        c.command("EHLO client.test").await;
        for i in 0..2 {
            assert!(
                c.command("MAIL FROM:<someone@partner.example>")
                    .await
                    .starts_with("250")
            );
            assert!(
                c.command("RCPT TO:<alice@example.com>")
                    .await
                    .starts_with("250")
            );
            assert!(c.command("DATA").await.starts_with("354"));
            c.send(format!("Subject: via postfix {i}\r\n\r\nhello\r\n.\r\n").as_bytes())
                .await;
            let r = c.reply().await;
            assert!(r.starts_with("250"), "{r}");
        }
        let _ = c.command("QUIT").await;
        let delivered = tokio::task::spawn_blocking(move || {
            let n = sink.wait_count("Subject: via postfix", 2);
            (n, sink)
        })
        .await
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(delivered.0, 2, "Postfix's log: {}", postfix.log());
        let dump = String::from_utf8_lossy(&delivered.1.dumps().concat()).into_owned();
        assert!(
            dump.contains("by relay.test"),
            "the relay's Received: {dump}"
        );
        assert!(
            dump.contains("by postfix.test.example"),
            "Postfix's Received: {dump}"
        );
        assert!(postfix.log().contains("status=sent"), "{}", postfix.log());
    })
    .await;
}

#[tokio::test]
async fn exim_with_the_relay_as_smarthost_delivers_through_it() {
    bounded(60, async {
        let sink = Sink::start();
        let config = configured(&mailbox(sink.addr));
        let relay = config.start().await;
        let addr = relay.smtp;
        let log = tokio::task::spawn_blocking(move || {
            exim_send(
                addr,
                "someone@partner.example",
                "alice@example.com",
                "Subject: via exim\n\nhello through mailroute\n",
            )
        })
        .await
        .unwrap_or_else(|e| panic!("{e}"));
        assert!(log.contains("queued-less as"), "Exim's log: {log}");
        assert_eq!(
            sink.wait_count("Subject: via exim", 1),
            1,
            "Exim's log: {log}"
        );
        let dump = String::from_utf8_lossy(&sink.dumps().concat()).into_owned();
        assert!(dump.contains("hello through mailroute"));
    })
    .await;
}
