//! What an upstream receives: messages accepted by the relay are forwarded to a real Postfix
//! `smtp-sink` by the relay's delivery (pooled connection, dot-stuffing writer), and the sink's dump equals what the client
//! sent plus the relay's one `Received:` header: no line added, removed or changed.

mod support;

use mailroute_relay::smtp::data::dot_stuff;
use std::time::Duration;
use support::sink::Sink;
use support::{Client, bounded, configured};

/// One tenant whose mailbox route is the sink.
fn to_sink(sink: std::net::SocketAddr) -> String {
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
spec: {{domains: [example.com], licenses: 1, inboundRoute: mailbox}}
"#,
        sink.ip(),
        sink.port()
    )
}

/// The sink's dump without its own trace headers: from the relay's Received: header on.
fn after_sink_headers(dump: &[u8]) -> &[u8] {
    let marker = b"Received: from client.test";
    let at = dump
        .windows(marker.len())
        .position(|w| w == marker)
        .unwrap_or_else(|| {
            panic!(
                "no relay Received: header in {}",
                String::from_utf8_lossy(dump)
            )
        });
    &dump[at..]
}

#[tokio::test]
async fn the_upstream_receives_exactly_what_the_client_sent_plus_one_received_header() {
    bounded(60, async {
        let sink = Sink::start();
        let config = configured(&to_sink(sink.addr));
        let relay = config.start().await;
        let messages: Vec<Vec<u8>> = vec![
            b"Subject: one\r\n\r\nbody\r\n".to_vec(),
            b"Subject: dots\r\n\r\n.\r\n..\r\n.leading\r\n...three\r\n".to_vec(),
            b"Subject: trailing blank lines\r\n\r\nx\r\n\r\n\r\n".to_vec(),
            format!("Subject: long\r\n\r\n{}\r\n", "z".repeat(998)).into_bytes(),
            "Subject: 8bit\r\n\r\n\u{e9}t\u{e9}\r\n".as_bytes().to_vec(),
        ];
        let mut client = Client::connect(relay.smtp).await;
        client.reply().await;
        client.command("EHLO client.test").await;
        for (i, message) in messages.iter().enumerate() {
            assert!(
                client
                    .command("MAIL FROM:<a@example.com>")
                    .await
                    .starts_with("250")
            );
            assert!(
                client
                    .command("RCPT TO:<b@example.com>")
                    .await
                    .starts_with("250")
            );
            if i % 2 == 0 {
                assert!(client.command("DATA").await.starts_with("354"));
                let mut wire = Vec::new();
                dot_stuff(message, &mut wire);
                client.send(&wire).await;
            } else {
                client
                    .send(
                        &[
                            format!("BDAT {} LAST\r\n", message.len()).as_bytes(),
                            message,
                        ]
                        .concat(),
                    )
                    .await;
            }
            let answer = client.reply().await;
            assert!(answer.starts_with("250 2.0.0"), "message {i}: {answer}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        let dumps = sink.dumps();
        assert_eq!(dumps.len(), messages.len());
        for (i, sent) in messages.iter().enumerate() {
            let subject_line = String::from_utf8_lossy(sent)
                .lines()
                .next()
                .unwrap_or_default()
                .to_owned();
            let dump = dumps
                .iter()
                .find(|d| String::from_utf8_lossy(d).contains(&format!("\n{subject_line}\n")))
                .unwrap_or_else(|| panic!("message {i} ({subject_line}) never reached the sink"));
            let received_and_message = after_sink_headers(dump);
            let text = String::from_utf8_lossy(received_and_message);
            let body_at =
                text.find("+0000\n").unwrap_or_else(|| panic!("{text}")) + "+0000\n".len();
            // smtp-sink stores lines with LF, and ends every dump with one extra LF.
            let mut expected = String::from_utf8_lossy(sent).replace("\r\n", "\n");
            expected.push('\n');
            assert_eq!(&text[body_at..], expected, "message {i}");
            assert_eq!(
                text.matches("Received: ").count(),
                1,
                "message {i}: one Received: header"
            );
        }
    })
    .await;
}
