//! Hostile addresses against the relay (SPEC 5.3; issue: command injection upstream): each is
//! either refused with a clear reply or forwarded exactly as the client wrote it, and the
//! upstream's own record of the MAIL and RCPT arguments (Postfix `smtp-sink`'s `X-Mail-Args`,
//! `X-Rcpt-Args`) never holds a parameter or a command the client did not send as such.

mod support;

use support::sink::Sink;
use support::{Client, bounded, configured};

fn config(mailbox: std::net::SocketAddr) -> String {
    format!(
        r#"{}
apiVersion: mailroute.io/v1alpha1
kind: RelayPolicy
metadata: {{name: example, namespace: mail}}
spec:
  domains: [example.com]
  licenses: 10
  inboundRoute: mailbox
---
apiVersion: mailroute.io/v1alpha1
kind: RoutingRule
metadata: {{name: no-evil, namespace: mail}}
spec:
  policyRef: example
  messages: [Inbound]
  envelopeFilter: {{senders: [{{domain: evil.example}}]}}
  actions: {{reject: {{code: 550, enhancedCode: "5.7.1", text: "No mail from evil.example"}}}}
"#,
        support::plain_route("mailbox", mailbox)
    )
}

/// MAIL, RCPT, DATA in lockstep; the replies to MAIL and RCPT, and the end of data if reached.
async fn attempt(
    c: &mut Client,
    mail: &str,
    rcpt: &str,
    subject: &str,
) -> (String, String, String) {
    let m = c.command(mail).await;
    let r = if m.starts_with("250") {
        c.command(rcpt).await
    } else {
        String::new()
    };
    let mut end = String::new();
    if r.starts_with("250") {
        assert!(c.command("DATA").await.starts_with("354"));
        c.send(format!("Subject: {subject}\r\n\r\nx\r\n.\r\n").as_bytes())
            .await;
        end = c.reply().await;
    } else {
        c.command("RSET").await;
    }
    (m, r, end)
}

#[tokio::test]
async fn hostile_addresses_are_refused_or_forwarded_exactly_as_written() {
    bounded(60, async {
        let mailbox = Sink::start();
        let relay = configured(&config(mailbox.addr)).start().await;
        let mut c = Client::connect(relay.smtp).await;
        assert!(c.reply().await.starts_with("220"));
        assert!(c.command("EHLO attacker.example").await.starts_with("250"));

        // Forwarded verbatim: (MAIL line, RCPT line, the MAIL and RCPT arguments upstream).
        let forwarded = [
            (
                r#"MAIL FROM:<"x> RET=FULL ENVID=abc"@ext.example>"#,
                "RCPT TO:<bob@example.com>",
                r#"X-Mail-Args: <"x> RET=FULL ENVID=abc"@ext.example>"#,
                "X-Rcpt-Args: <bob@example.com>",
            ),
            (
                "MAIL FROM:<a@ext.example>",
                r#"RCPT TO:<"john smith"@example.com>"#,
                "X-Mail-Args: <a@ext.example>",
                r#"X-Rcpt-Args: <"john smith"@example.com>"#,
            ),
            (
                r#"MAIL FROM:<"a\"> NOTIFY=NEVER"@ext.example>"#,
                r#"RCPT TO:<"x>\r\nRSET"@example.com>"#,
                r#"X-Mail-Args: <"a\"> NOTIFY=NEVER"@ext.example>"#,
                r#"X-Rcpt-Args: <"x>\r\nRSET"@example.com>"#,
            ),
            (
                "MAIL FROM:<a@ext.example>",
                "RCPT TO:<postmaster>",
                "X-Mail-Args: <a@ext.example>",
                "X-Rcpt-Args: <postmaster@example.com>",
            ),
            (
                "MAIL FROM:<a@ext.example>",
                "RCPT TO:<@relay.example,@hop.example:carol@example.com>",
                "X-Mail-Args: <a@ext.example>",
                "X-Rcpt-Args: <carol@example.com>",
            ),
        ];
        for (i, (mail, rcpt, mail_args, rcpt_args)) in forwarded.iter().enumerate() {
            let subject = format!("forwarded-{i}");
            let (m, r, end) = attempt(&mut c, mail, rcpt, &subject).await;
            assert!(end.starts_with("250"), "{mail} {rcpt}: {m} / {r} / {end}");
            assert_eq!(mailbox.wait_count(&subject, 1), 1);
            let dump = mailbox
                .dumps()
                .into_iter()
                .find(|d| String::from_utf8_lossy(d).contains(&subject))
                .map(|d| String::from_utf8_lossy(&d).into_owned())
                .unwrap_or_default();
            let args: Vec<&str> = dump.lines().filter(|l| l.starts_with("X-")).collect();
            assert!(args.contains(mail_args), "{mail}: {args:?}");
            assert!(args.contains(rcpt_args), "{rcpt}: {args:?}");
            assert_eq!(
                args.iter().filter(|l| l.starts_with("X-Mail-Args")).count(),
                1,
                "one transaction per message: {args:?}"
            );
        }

        // Refused, nothing forwarded: (MAIL line, RCPT line, the expected reply's start).
        let refused = [
            ("MAIL FROM:<a b@ext.example>", "", "501 5.1.7"),
            ("MAIL FROM:<a\\b@ext.example>", "", "501 5.1.7"),
            ("MAIL FROM:<\"unbalanced@ext.example>", "", "501 5.1.7"),
            ("MAIL FROM:<a@ext.example", "", "501 5.1.7"),
            ("MAIL FROM:<jörg@ext.example>", "", "553 5.6.7"),
            (
                "MAIL FROM:<a@ext.example>",
                "RCPT TO:<b c@example.com>",
                "501 5.1.3",
            ),
            (
                "MAIL FROM:<a@ext.example>",
                "RCPT TO:<bob@example.com> RET=FULL",
                "555 5.5.4",
            ),
            ("MAIL FROM:<a@ext.example> ENVID=x", "", "555 5.5.4"),
            (
                "MAIL FROM:<a@ext.example>",
                "RCPT TO:<ünïcode@example.com>",
                "553 5.6.7",
            ),
            // The rule still sees the sender's real domain behind a quoted local part.
            (
                "MAIL FROM:<\"x> y\"@evil.example>",
                "RCPT TO:<bob@example.com>",
                "550 5.7.1 No mail from evil",
            ),
            (
                "MAIL FROM:<\"x@ext.example\"@evil.example>",
                "RCPT TO:<bob@example.com>",
                "550 5.7.1 No mail from evil",
            ),
        ];
        let before = mailbox.dumps().len();
        for (mail, rcpt, want) in refused {
            // A session each: refusals count towards the session's error limit.
            let mut c = Client::connect(relay.smtp).await;
            assert!(c.reply().await.starts_with("220"));
            assert!(c.command("EHLO attacker.example").await.starts_with("250"));
            let (m, r, end) = attempt(&mut c, mail, rcpt, "refused").await;
            let got = if rcpt.is_empty() || !m.starts_with("250") {
                &m
            } else {
                &r
            };
            assert!(got.starts_with(want), "{mail} {rcpt}: {got} (want {want})");
            assert!(end.is_empty(), "{mail} {rcpt}: {end}");
        }
        assert_eq!(
            mailbox.dumps().len(),
            before,
            "nothing refused was forwarded"
        );
    })
    .await;
}
