//! End to end with the MTAs people already run as the relay's clients, on loopback: a Postfix
//! instance whose `relayhost` is the relay, and Exim with the relay as its smarthost, each
//! delivering through the relay to a Postfix `smtp-sink` upstream. (swaks, for AUTH over
//! STARTTLS and implicit TLS, is in `swaks.rs`.)

mod support;

use std::net::SocketAddr;
use support::mta::{OpenSmtpd, Postfix, exim_send, sendmail_send};
use support::sink::Sink;
use support::{Client, bounded, configured, plain_route, send_message};

fn mailbox(sink: SocketAddr) -> String {
    plain_route("mailbox", sink)
        + "apiVersion: mailroute.io/v1alpha1\nkind: RelayPolicy\n\
           metadata: {name: example, namespace: mail}\n\
           spec: {domains: [example.com], licenses: 5, inboundRoute: mailbox}\n"
}

/// The mailbox route and a tenant whose clients must authenticate (as `app`, password
/// `s3cret`), as a smarthost client with AUTH is set up (docs/clients/).
fn mailbox_with_auth(sink: SocketAddr) -> String {
    plain_route("mailbox", sink)
        + "apiVersion: mailroute.io/v1alpha1\nkind: RelayPolicy\n\
           metadata: {name: example, namespace: mail}\n\
           spec:\n  domains: [example.com]\n  licenses: 5\n  inboundRoute: mailbox\n\
           \x20 authentication: {requireSMTPAuth: true, credentialsSecretRef: {name: accounts}}\n\
           ---\napiVersion: v1\nkind: Secret\n\
           metadata: {name: accounts, namespace: mail}\nstringData: {app: s3cret}\n"
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

#[tokio::test]
async fn sendmail_with_the_relay_as_smart_host_delivers_with_starttls_and_auth() {
    bounded(60, async {
        let sink = Sink::start();
        let config = configured(&mailbox_with_auth(sink.addr));
        let relay = config.start_with_accounts().await;
        let (addr, ca) = (relay.smtp, relay.certs.cert_pem.clone());
        let (ok, transcript) = tokio::task::spawn_blocking(move || {
            sendmail_send(
                addr,
                ("someone@partner.example", "alice@example.com"),
                "Subject: via sendmail\n\nhello through mailroute\n",
                ("app", "s3cret"),
                &ca,
            )
        })
        .await
        .unwrap_or_else(|e| panic!("{e}"));
        assert!(ok, "Sendmail failed: {transcript}");
        // The transcript shows TLS first, then AUTH, then the relay's acceptance.
        let starttls = transcript.find(">>> STARTTLS");
        let auth = transcript.find(">>> AUTH PLAIN");
        assert!(starttls.is_some() && auth > starttls, "{transcript}");
        assert!(transcript.contains("235 2.7.0"), "{transcript}");
        assert!(transcript.contains("Sent ("), "{transcript}");
        assert_eq!(
            sink.wait_count("Subject: via sendmail", 1),
            1,
            "{transcript}"
        );
        let dump = String::from_utf8_lossy(&sink.dumps().concat()).into_owned();
        assert!(dump.contains("by relay.test"), "{dump}");
        assert!(
            dump.contains("with ESMTPSA"),
            "the relay's Received: {dump}"
        );
    })
    .await;
}

#[tokio::test]
async fn opensmtpd_relaying_to_the_relay_delivers_with_starttls_and_auth() {
    bounded(60, async {
        let sink = Sink::start();
        let config = configured(&mailbox_with_auth(sink.addr));
        let relay = config.start_with_accounts().await;
        let addr = relay.smtp;
        let opensmtpd =
            tokio::task::spawn_blocking(move || OpenSmtpd::start(addr, ("app", "s3cret")))
                .await
                .unwrap_or_else(|e| panic!("{e}"));
        let r = send_message(
            opensmtpd.smtp,
            "someone@partner.example",
            &["alice@example.com"],
            "Subject: via opensmtpd\r\n\r\nhello through mailroute\r\n",
        )
        .await;
        assert!(r.starts_with("250"), "{r}");
        let (n, sink) = tokio::task::spawn_blocking(move || {
            (sink.wait_count("Subject: via opensmtpd", 1), sink)
        })
        .await
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(n, 1, "OpenSMTPD's log: {}", opensmtpd.log());
        let dump = String::from_utf8_lossy(&sink.dumps().concat()).into_owned();
        assert!(dump.contains("by relay.test"), "{dump}");
        assert!(
            dump.contains("with ESMTPSA"),
            "the relay's Received: {dump}"
        );
        assert!(
            dump.contains("by opensmtpd.test.example"),
            "OpenSMTPD's Received: {dump}"
        );
    })
    .await;
}

#[tokio::test]
async fn a_postfix_client_with_a_short_data_timeout_hears_451_at_the_reply_bound_and_its_retry_delivers_once()
 {
    use std::time::{Duration, Instant};
    use support::scripted::{Script, Scripted};
    bounded(300, async {
        // The upstream takes 150 s to answer the first message's end of data (inside the
        // route's default 4-minute dataEnd); the relay runs with --reply-bound 120.
        let upstream = Scripted::start(Script {
            first_end_of_data_delay: Duration::from_secs(150),
            ..Script::default()
        })
        .await;
        let config = configured(&mailbox(upstream.addr));
        let relay = config.start_bounded(Duration::from_secs(120)).await;
        // Postfix gives up on an end of data after 130 s, as GroupWise does after 3 minutes:
        // shorter than the relay's default bound (300 s), longer than this one. It retries a
        // deferred message after 45 s, once the upstream has answered.
        let relayhost = relay.smtp;
        let postfix = tokio::task::spawn_blocking(move || {
            Postfix::start_with(
                relayhost,
                "smtp_data_done_timeout = 130s\nminimal_backoff_time = 45s\n\
                 maximal_backoff_time = 60s\nqueue_run_delay = 5s",
            )
        })
        .await
        .unwrap_or_else(|e| panic!("{e}"));
        let r = send_message(
            postfix.smtp,
            "someone@partner.example",
            &["alice@example.com"],
            "Subject: slow upstream\r\n\r\nhello\r\n",
        )
        .await;
        assert!(r.starts_with("250"), "{r}");
        let handed = Instant::now();
        // Postfix hears 451 4.4.5 at the bound, not its own timeout.
        while !postfix.log().contains("status=deferred") {
            assert!(
                handed.elapsed() < Duration::from_secs(135),
                "{}",
                postfix.log()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let deferred = handed.elapsed();
        let log = postfix.log();
        assert!(log.contains("451 4.4.5"), "{log}");
        assert!(
            deferred >= Duration::from_secs(119) && deferred < Duration::from_secs(126),
            "deferred after {deferred:?}: {log}"
        );
        // The retry is answered from the ledger: the upstream got the message once.
        while !postfix.log().contains("status=sent") {
            assert!(
                handed.elapsed() < Duration::from_secs(240),
                "{}",
                postfix.log()
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        eprintln!(
            "deferred after {deferred:?}, sent after {:?}",
            handed.elapsed()
        );
        assert_eq!(
            upstream.count("Subject: slow upstream"),
            1,
            "{}",
            postfix.log()
        );
    })
    .await;
}
