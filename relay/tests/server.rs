//! The relay's front door on loopback with real TLS and real clients.

mod support;

use mailroute_relay::auth::throttle::ThrottleConfig;
use mailroute_relay::server::Limits;
use std::time::{Duration, Instant};
use support::{Client, Options, Relay, bounded};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const MESSAGE: &str = "From: a@example.com\r\nTo: b@example.com\r\nSubject: =?UTF-8?Q?caf=C3=A9?=\r\n\tfolded continuation\r\n\r\nline one\r\n..two dots stay one\r\n\u{e9}t\u{e9} 8-bit\r\n";

#[tokio::test]
async fn mail_send_delivers_over_starttls_with_auth_byte_for_byte() {
    bounded(30, async {
        let relay = Relay::start(Options::default()).await;
        let long_line = "x".repeat(998);
        let body = format!("{MESSAGE}{long_line}\r\nlast line without CRLF");
        let message = mail_send::smtp::message::Message::new(
            "a@example.com",
            ["b@example.com", "c@example.com"],
            body.as_bytes(),
        );
        mail_send::SmtpClientBuilder::new("127.0.0.1", relay.submission.port())
            .unwrap_or_else(|e| panic!("{e}"))
            .implicit_tls(false)
            .allow_invalid_certs()
            .helo_host("client.test")
            .credentials(("app", "secret"))
            .connect()
            .await
            .unwrap_or_else(|e| panic!("connect: {e}"))
            .send(message)
            .await
            .unwrap_or_else(|e| panic!("send: {e}"));
        assert_eq!(relay.capture.count(), 1);
        // mail-send ends the content with CRLF before the final dot; everything else is as sent.
        assert_eq!(relay.capture.body(0), format!("{body}\r\n").into_bytes());
        let messages = relay.capture.messages.lock().unwrap_or_else(|e| e.into_inner());
        let received = String::from_utf8_lossy(&messages[0].content[..messages[0].received_len]).into_owned();
        assert!(received.starts_with("Received: from client.test ([127.0.0.1])\r\n\tby relay.test (Mailroute) with ESMTPSA id "), "{received}");
        assert!(received.contains("(using TLSv1.3 with cipher TLS13_"), "{received}");
        assert_eq!(
            messages[0].addresses().collect::<Vec<_>>(),
            ["b@example.com", "c@example.com"]
        );
    })
    .await;
}

fn smuggling_payload(variant: &[u8]) -> Vec<u8> {
    let mut data = b"From: a@example.com\r\n\r\nhello".to_vec();
    data.extend_from_slice(variant);
    data.extend_from_slice(b"MAIL FROM:<evil@example.com>\r\nRCPT TO:<victim@example.com>\r\nDATA\r\nsmuggled\r\n.\r\n");
    data
}

/// A session with one accepted recipient, ready for content.
async fn open_transaction(relay: &Relay) -> Client {
    let mut c = Client::connect(relay.smtp).await;
    assert!(c.reply().await.starts_with("220 "));
    assert!(c.command("EHLO client.test").await.starts_with("250"));
    assert!(
        c.command("MAIL FROM:<a@example.com>")
            .await
            .starts_with("250")
    );
    assert!(
        c.command("RCPT TO:<b@example.com>")
            .await
            .starts_with("250")
    );
    c
}

async fn open_data(relay: &Relay) -> Client {
    let mut c = open_transaction(relay).await;
    assert!(c.command("DATA").await.starts_with("354"));
    c
}

#[tokio::test]
async fn smuggling_variants_over_the_wire_are_refused_in_any_segmentation() {
    bounded(120, async {
        let relay = Relay::start(Options::default()).await;
        for variant in mailroute_relay::smtp::fuzzing::SMUGGLING_VARIANTS {
            let payload = smuggling_payload(variant);
            let mut writes: Vec<Vec<Vec<u8>>> = vec![
                vec![payload.clone()],
                payload.chunks(1).map(<[u8]>::to_vec).collect(),
            ];
            for split in (1..payload.len()).step_by(3) {
                writes.push(vec![payload[..split].to_vec(), payload[split..].to_vec()]);
            }
            for pieces in writes {
                let mut c = open_data(&relay).await;
                for piece in &pieces {
                    c.send(piece).await;
                }
                let reply = c.reply().await;
                assert!(
                    reply.starts_with("550 5.6.11"),
                    "variant {variant:?} in {} pieces: {reply:?}",
                    pieces.len()
                );
                assert!(
                    c.is_closed().await,
                    "variant {variant:?}: connection left open"
                );
            }
        }
        assert_eq!(
            relay.capture.count(),
            0,
            "no message, smuggled or not, was accepted"
        );
    })
    .await;
}

#[tokio::test]
async fn a_nul_in_bdat_content_is_refused_in_one_write_and_byte_by_byte() {
    bounded(60, async {
        let relay = Relay::start(Options::default()).await;
        for content in [&b"hello\r\n\x00.\r\n"[..], b"hello\r\n.\x00\r\n"] {
            let chunk = [
                format!("BDAT {} LAST\r\n", content.len()).as_bytes(),
                content,
            ]
            .concat();
            for pieces in [
                vec![chunk.clone()],
                chunk.chunks(1).map(<[u8]>::to_vec).collect(),
            ] {
                let mut c = open_transaction(&relay).await;
                for piece in &pieces {
                    c.send(piece).await;
                }
                let reply = c.reply().await;
                assert!(reply.starts_with("550 5.6.11"), "{content:?}: {reply}");
                assert!(c.is_closed().await);
            }
        }
        assert_eq!(relay.capture.count(), 0, "nothing forwarded");
    })
    .await;
}

#[tokio::test]
async fn plaintext_pipelined_after_starttls_never_runs_inside_tls() {
    bounded(30, async {
        let relay = Relay::start(Options::default()).await;
        let mut c = Client::connect(relay.smtp).await;
        c.reply().await;
        let ehlo = c.command("EHLO client.test").await;
        assert!(
            ehlo.contains("STARTTLS") && !ehlo.contains("AUTH"),
            "{ehlo}"
        );
        c.send(b"STARTTLS\r\nMAIL FROM:<evil@example.com>\r\nRCPT TO:<victim@example.com>\r\n")
            .await;
        assert!(c.reply().await.starts_with("220 2.0.0"));
        let mut c = c.starttls(&relay.certs.cert_pem).await;
        // Had the injected MAIL run, this would be "503 nested MAIL"; it is "send EHLO first".
        let reply = c.command("MAIL FROM:<a@example.com>").await;
        assert!(
            reply.starts_with("503 5.5.1 Bad sequence of commands: send EHLO or HELO first"),
            "{reply}"
        );
        let ehlo = c.command("EHLO client.test").await;
        assert!(
            ehlo.contains("AUTH PLAIN LOGIN") && !ehlo.contains("STARTTLS"),
            "{ehlo}"
        );
    })
    .await;
}

#[tokio::test]
async fn auth_in_clear_is_538_and_repeated_failures_are_slowed_then_refused() {
    bounded(30, async {
        let relay = Relay::start(Options {
            throttle: ThrottleConfig {
                slow_after: 2,
                refuse_after: 4,
                delay_step: Duration::from_millis(300),
                window: Duration::from_secs(60),
            },
            ..Options::default()
        })
        .await;
        let mut c = Client::connect(relay.submission).await;
        c.reply().await;
        c.command("EHLO client.test").await;
        assert!(
            c.command("AUTH PLAIN AGFwcABzZWNyZXQ=")
                .await
                .starts_with("538 5.7.11")
        );
        assert!(c.command("STARTTLS").await.starts_with("220"));
        let mut c = c.starttls(&relay.certs.cert_pem).await;
        c.command("EHLO client.test").await;
        let mut timings = Vec::new();
        for _ in 0..4 {
            let started = Instant::now();
            // "\0app\0wrong"
            let reply = c.command("AUTH PLAIN AGFwcAB3cm9uZw==").await;
            timings.push(started.elapsed());
            assert!(reply.starts_with("535 5.7.8"), "{reply}");
        }
        assert!(
            timings[0] < Duration::from_millis(250) && timings[1] < Duration::from_millis(250),
            "{timings:?}"
        );
        assert!(
            timings[2] >= Duration::from_millis(300) && timings[3] >= Duration::from_millis(600),
            "{timings:?}"
        );
        // Now refused without checking, even with the right password, and the session ends.
        let reply = c.command("AUTH PLAIN AGFwcABzZWNyZXQ=").await;
        assert!(reply.starts_with("454 4.7.0"), "{reply}");
        assert!(c.is_closed().await);
        // A fresh session from the same address is still refused.
        let mut c = Client::connect_tls(relay.smtps, &relay.certs.cert_pem).await;
        c.reply().await;
        c.command("EHLO client.test").await;
        assert!(
            c.command("AUTH PLAIN AGFwcABzZWNyZXQ=")
                .await
                .starts_with("454 4.7.0")
        );
    })
    .await;
}

#[tokio::test]
async fn implicit_tls_accepts_auth_and_a_message() {
    bounded(30, async {
        let relay = Relay::start(Options::default()).await;
        let mut c = Client::connect_tls(relay.smtps, &relay.certs.cert_pem).await;
        assert!(c.reply().await.starts_with("220 relay.test"));
        let ehlo = c.command("EHLO client.test").await;
        assert!(
            ehlo.contains("AUTH PLAIN LOGIN") && !ehlo.contains("STARTTLS"),
            "{ehlo}"
        );
        assert!(
            c.command("AUTH PLAIN AGFwcABzZWNyZXQ=")
                .await
                .starts_with("235 2.7.0")
        );
        assert!(
            c.command("MAIL FROM:<a@example.com>")
                .await
                .starts_with("250")
        );
        assert!(
            c.command("RCPT TO:<b@example.com>")
                .await
                .starts_with("250")
        );
        assert!(c.command("DATA").await.starts_with("354"));
        c.send(b".leading dot line\r\nbody\r\n.\r\n").await;
        assert!(c.reply().await.starts_with("250 2.0.0"));
        assert_eq!(relay.capture.body(0), b"leading dot line\r\nbody\r\n");
    })
    .await;
}

#[tokio::test]
async fn clients_that_talk_before_the_greeting_or_speak_http_are_dropped() {
    bounded(30, async {
        let relay = Relay::start(Options {
            limits: Limits {
                greet_delay: Duration::from_millis(300),
                ..Limits::default()
            },
            ..Options::default()
        })
        .await;
        let mut c = Client::connect(relay.smtp).await;
        c.send(b"EHLO eager.test\r\n").await;
        assert!(c.reply().await.starts_with("554 5.5.0"));
        assert!(c.is_closed().await);

        let mut c = Client::connect(relay.smtp).await;
        assert!(c.reply().await.starts_with("220"));
        c.send(b"GET / HTTP/1.1\r\nHost: relay.test\r\n\r\n").await;
        assert!(c.reply().await.starts_with("554 5.5.0"));
        assert!(c.is_closed().await);

        let mut c = Client::connect(relay.smtp).await;
        c.reply().await;
        c.send(format!("NOOP {}\r\nNOOP\r\n", "x".repeat(600)).as_bytes())
            .await;
        assert!(c.reply().await.starts_with("500 5.5.2"));
        assert!(c.reply().await.starts_with("250 2.0.0"));
        assert!(
            c.command("RCPT TO:<b@example.com>")
                .await
                .starts_with("503 5.5.1")
        );
        assert!(c.command("DATA").await.starts_with("503 5.5.1"));
        c.command("EHLO client.test").await;
        assert!(
            c.command("MAIL FROM:<a@example.com> FOO=BAR")
                .await
                .starts_with("555 5.5.4")
        );
    })
    .await;
}

#[tokio::test]
async fn graceful_shutdown_tells_idle_sessions_421_and_lets_a_transaction_finish() {
    bounded(30, async {
        let mut relay = Relay::start(Options {
            delivery_delay: Duration::from_millis(800),
            ..Options::default()
        })
        .await;
        let mut idle = Client::connect(relay.smtp).await;
        idle.reply().await;
        idle.command("EHLO idle.test").await;
        let mut busy = open_data(&relay).await;
        busy.send(b"Subject: in flight\r\n\r\nbody\r\n.\r\n").await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        let server = relay.shutdown();
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(
            !relay.ready.load(std::sync::atomic::Ordering::SeqCst),
            "/readyz must turn false at once"
        );
        assert!(idle.reply().await.starts_with("421 4.3.2"));
        assert!(idle.is_closed().await);
        assert!(
            tokio::net::TcpStream::connect(relay.smtp).await.is_err(),
            "no new connections"
        );
        assert!(
            busy.reply().await.starts_with("250 2.0.0"),
            "the transaction in flight completes"
        );
        assert!(busy.reply().await.starts_with("421 4.3.2"));
        assert_eq!(relay.capture.count(), 1);
        tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .unwrap_or_else(|_| panic!("server did not stop"))
            .unwrap_or_else(|e| panic!("{e}"));
    })
    .await;
}

#[tokio::test]
async fn session_limit_and_idle_timeout_answer_with_421() {
    bounded(30, async {
        let relay = Relay::start(Options {
            limits: Limits {
                max_sessions: 2,
                idle_timeout: Duration::from_millis(700),
                ..Limits::default()
            },
            ..Options::default()
        })
        .await;
        let mut a = Client::connect(relay.smtp).await;
        let mut b = Client::connect(relay.smtp).await;
        assert!(a.reply().await.starts_with("220") && b.reply().await.starts_with("220"));
        let mut c = Client::connect(relay.smtp).await;
        assert!(c.reply().await.starts_with("421 4.3.2"));
        assert!(a.reply().await.starts_with("421 4.4.2"), "idle timeout");
        assert!(a.is_closed().await);
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut d = Client::connect(relay.smtp).await;
        assert!(d.reply().await.starts_with("220"), "a slot is free again");
    })
    .await;
}

#[tokio::test]
async fn one_client_address_cannot_hold_more_than_its_share_of_sessions() {
    bounded(30, async {
        let relay = Relay::start(Options {
            limits: Limits {
                max_sessions_per_ip: 3,
                ..Limits::default()
            },
            ..Options::default()
        })
        .await;
        let mut held = Vec::new();
        for _ in 0..3 {
            let mut c = Client::connect(relay.smtp).await;
            assert!(c.reply().await.starts_with("220"));
            held.push(c);
        }
        let mut greedy = Client::connect(relay.smtp).await;
        let reply = greedy.reply().await;
        assert!(reply.starts_with("421 4.7.0"), "{reply}");
        assert!(greedy.is_closed().await);
        // Another client is still greeted at once.
        let started = Instant::now();
        let local = std::net::IpAddr::from([127, 0, 0, 2]);
        let mut other = Client::connect_from(relay.smtp, local).await;
        assert!(other.reply().await.starts_with("220"));
        assert!(
            started.elapsed() < Duration::from_millis(100),
            "{:?}",
            started.elapsed()
        );
        // A session ended gives its place back.
        if let Some(mut c) = held.pop() {
            assert!(c.command("QUIT").await.starts_with("221"));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        let mut again = Client::connect(relay.smtp).await;
        assert!(again.reply().await.starts_with("220"));
    })
    .await;
}

#[tokio::test]
async fn a_client_trickling_bytes_is_closed_by_the_command_deadline() {
    bounded(30, async {
        let relay = Relay::start(Options {
            limits: Limits {
                idle_timeout: Duration::from_millis(1500),
                ..Limits::default()
            },
            ..Options::default()
        })
        .await;
        let mut c = Client::connect(relay.smtp).await;
        assert!(c.reply().await.starts_with("220"));
        let started = Instant::now();
        // One byte every 200 ms, never a line end: each read arrives well within the
        // timeout, the command never does.
        let mut closed_after = None;
        for byte in std::iter::repeat_n(b'N', 40) {
            if c.try_send(&[byte]).await.is_err() {
                closed_after = Some(started.elapsed());
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let reply = c.reply().await;
        assert!(reply.starts_with("421 4.4.2"), "{reply}");
        assert!(
            started.elapsed() < Duration::from_secs(4),
            "closed after {:?} ({closed_after:?})",
            started.elapsed()
        );
        // A client that sends whole commands is not cut off by the same deadline.
        let mut ok = Client::connect(relay.smtp).await;
        assert!(ok.reply().await.starts_with("220"));
        for _ in 0..4 {
            tokio::time::sleep(Duration::from_millis(800)).await;
            assert!(ok.command("NOOP").await.starts_with("250"));
        }
    })
    .await;
}

#[tokio::test]
async fn a_rotated_certificate_is_served_to_new_sessions() {
    bounded(30, async {
        let relay = Relay::start(Options::default()).await;
        let mut c = Client::connect_tls(relay.smtps, &relay.certs.cert_pem).await;
        assert!(c.reply().await.starts_with("220"));
        tokio::time::sleep(Duration::from_millis(1100)).await; // a new mtime
        let new_pem = support::write_cert(&relay.certs.cert, &relay.certs.key, &["relay.test"]);
        assert!(relay.store.reload_if_changed());
        let mut c = Client::connect_tls(relay.smtps, &new_pem).await;
        assert!(
            c.reply().await.starts_with("220"),
            "the new certificate is presented"
        );
        // A broken rotation keeps the working certificate.
        std::fs::write(&relay.certs.key, "not a key").unwrap_or_else(|e| panic!("{e}"));
        assert!(!relay.store.reload_if_changed());
        let mut c = Client::connect_tls(relay.smtps, &new_pem).await;
        assert!(c.reply().await.starts_with("220"));
    })
    .await;
}

fn proxy_v2_ipv6(source: std::net::Ipv6Addr, port: u16) -> Vec<u8> {
    let mut header = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    header.extend_from_slice(&[0x21, 0x21, 0, 36]); // v2 PROXY, TCP over IPv6, 36 octets
    header.extend_from_slice(&source.octets());
    header.extend_from_slice(&std::net::Ipv6Addr::LOCALHOST.octets());
    header.extend_from_slice(&port.to_be_bytes());
    header.extend_from_slice(&25u16.to_be_bytes());
    header
}

async fn received_from(relay: &Relay, preamble: &[u8]) -> String {
    received_via(relay, Client::connect(relay.smtp).await, &[preamble]).await
}

/// The `Received:` header of a message sent over `c` after writing `preamble` in pieces.
async fn received_via(relay: &Relay, mut c: Client, preamble: &[&[u8]]) -> String {
    for piece in preamble {
        c.send(piece).await;
    }
    assert!(c.reply().await.starts_with("220"));
    c.command("EHLO client.test").await;
    c.command("MAIL FROM:<a@example.com>").await;
    c.command("RCPT TO:<b@example.com>").await;
    c.command("DATA").await;
    c.send(b"Subject: proxied\r\n\r\nx\r\n.\r\n").await;
    assert!(c.reply().await.starts_with("250"));
    let messages = relay
        .capture
        .messages
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    let last = messages.last().unwrap_or_else(|| panic!("no message"));
    String::from_utf8_lossy(&last.content[..last.received_len]).into_owned()
}

#[tokio::test]
async fn the_proxy_protocol_carries_the_client_address_in_v1_and_v2() {
    bounded(30, async {
        let relay = Relay::start(Options {
            limits: Limits {
                proxy_protocol: true,
                tls_handshake_timeout: Duration::from_secs(2),
                ..Limits::default()
            },
            ..Options::default()
        })
        .await;
        let v1 = received_from(&relay, b"PROXY TCP4 203.0.113.7 192.0.2.1 40000 25\r\n").await;
        assert!(
            v1.starts_with("Received: from client.test ([203.0.113.7])"),
            "{v1}"
        );
        let v2 = received_from(
            &relay,
            &proxy_v2_ipv6(
                "2001:db8::42".parse().unwrap_or_else(|e| panic!("{e}")),
                40001,
            ),
        )
        .await;
        assert!(
            v2.starts_with("Received: from client.test ([2001:db8::42])"),
            "{v2}"
        );

        // A balancer health check (v2 LOCAL) keeps the socket's address.
        let mut local = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
        local.extend_from_slice(&[0x20, 0x00, 0, 0]);
        let health = received_from(&relay, &local).await;
        assert!(
            health.starts_with("Received: from client.test ([127.0.0.1])"),
            "{health}"
        );

        // No header: the connection is dropped without a greeting.
        let mut c = Client::connect(relay.smtp).await;
        c.send(b"EHLO direct.test\r\n").await;
        assert_eq!(c.reply().await, "", "no reply without a PROXY header");
    })
    .await;
}

/// A stream whose first write carries `header` in front of the client's first bytes (the TLS
/// ClientHello), as a load balancer sends them: one segment.
struct HeaderFirst {
    inner: tokio::net::TcpStream,
    header: Option<Vec<u8>>,
}

impl tokio::io::AsyncRead for HeaderFirst {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for HeaderFirst {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        if let Some(header) = self.header.take() {
            // NB: one write of header and ClientHello; reported as the client's bytes only.
            // A fresh loopback socket takes a few hundred octets at once.
            let joined = [header.as_slice(), buf].concat();
            match self.inner.try_write(&joined) {
                Ok(n) if n == joined.len() => return std::task::Poll::Ready(Ok(buf.len())),
                other => panic!("one write of header and ClientHello: {other:?}"),
            }
        }
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[tokio::test]
async fn a_proxy_v2_header_and_the_client_hello_in_one_segment_always_handshake() {
    bounded(60, async {
        let relay = Relay::start(Options {
            limits: Limits {
                proxy_protocol: true,
                tls_handshake_timeout: Duration::from_secs(5),
                ..Limits::default()
            },
            ..Options::default()
        })
        .await;
        let connector = support::tls_connector(&relay.certs.cert_pem);
        for i in 0..100 {
            let tcp = tokio::net::TcpStream::connect(relay.smtps)
                .await
                .unwrap_or_else(|e| panic!("{e}"));
            let _ = tcp.set_nodelay(true);
            let io = HeaderFirst {
                inner: tcp,
                header: Some(proxy_v2_ipv6(
                    "2001:db8::7".parse().unwrap_or_else(|e| panic!("{e}")),
                    40000 + i,
                )),
            };
            let name = rustls_pki_types::ServerName::try_from("relay.test")
                .unwrap_or_else(|e| panic!("{e}"));
            let mut tls = connector
                .connect(name, io)
                .await
                .unwrap_or_else(|e| panic!("handshake {i}: {e}"));
            let mut greeting = [0u8; 3];
            tokio::io::AsyncReadExt::read_exact(&mut tls, &mut greeting)
                .await
                .unwrap_or_else(|e| panic!("greeting {i}: {e}"));
            assert_eq!(&greeting, b"220", "{i}");
        }
    })
    .await;
}

#[tokio::test]
async fn a_proxy_header_is_believed_only_from_a_trusted_source_and_read_byte_by_byte() {
    bounded(60, async {
        let relay = Relay::start(Options {
            limits: Limits {
                proxy_protocol: true,
                proxy_trusted: vec!["127.0.0.2/32".parse().unwrap_or_else(|e| panic!("{e}"))],
                tls_handshake_timeout: Duration::from_secs(2),
                ..Limits::default()
            },
            ..Options::default()
        })
        .await;
        let balancer = std::net::IpAddr::from([127, 0, 0, 2]);
        let header = b"PROXY TCP4 203.0.113.9 192.0.2.1 40000 25\r\n";
        // From the balancer, a v1 header sent one byte at a time is read whole.
        let pieces: Vec<&[u8]> = header.chunks(1).collect();
        let received = received_via(
            &relay,
            Client::connect_from(relay.smtp, balancer).await,
            &pieces,
        )
        .await;
        assert!(
            received.starts_with("Received: from client.test ([203.0.113.9])"),
            "{received}"
        );
        // From anyone else a PROXY header is refused and the session ended.
        let mut c = Client::connect(relay.smtp).await;
        c.send(header).await;
        let reply = c.reply().await;
        assert!(reply.starts_with("554 5.5.0"), "{reply}");
        assert!(c.is_closed().await);
        // ... and without one, the socket's own address is used.
        let received = received_from(&relay, b"").await;
        assert!(
            received.starts_with("Received: from client.test ([127.0.0.1])"),
            "{received}"
        );
    })
    .await;
}

#[tokio::test]
async fn behind_haproxy_every_smtps_client_is_greeted_and_seen_with_its_own_address() {
    bounded(90, async {
        let relay = Relay::start(Options {
            limits: Limits {
                proxy_trusted: vec!["127.0.0.1/32".parse().unwrap_or_else(|e| panic!("{e}"))],
                proxy_protocol: true,
                tls_handshake_timeout: Duration::from_secs(5),
                ..Limits::default()
            },
            ..Options::default()
        })
        .await;
        let balancer = support::haproxy::Haproxy::start(relay.smtps);
        for i in 0..100 {
            let mut c = Client::connect_tls(balancer.addr, &relay.certs.cert_pem).await;
            let greeting = c.reply().await;
            assert!(greeting.starts_with("220"), "{i}: {greeting:?}");
            if i == 0 {
                let ehlo = c.command("EHLO client.test").await;
                assert!(ehlo.contains("greets 127.0.0.1"), "{ehlo}");
            }
            assert!(c.command("QUIT").await.starts_with("221"));
        }
    })
    .await;
}

/// 300 clients connect over TLS, then the first comes back: it resumes its session (a ticket),
/// rather than paying a full handshake because the server's session cache forgot it. Every
/// session gets the relay's cheapest safe choice of cipher suite, whatever the client's order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_returning_after_hundreds_of_others_resumes_its_tls_session() {
    bounded(60, async {
        let relay = Relay::start(Options::default()).await;
        let name =
            rustls_pki_types::ServerName::try_from("relay.test").unwrap_or_else(|e| panic!("{e}"));
        // Each client keeps its own sessions, as separate MTAs would.
        let clients: Vec<tokio_rustls::TlsConnector> = (0..300)
            .map(|_| support::tls_connector(&relay.certs.cert_pem))
            .collect();
        let handshake = async |client: &tokio_rustls::TlsConnector| {
            let tcp = tokio::net::TcpStream::connect(relay.smtps)
                .await
                .unwrap_or_else(|e| panic!("{e}"));
            let mut tls = client
                .connect(name.clone(), tcp)
                .await
                .unwrap_or_else(|e| panic!("{e}"));
            // The greeting, then QUIT: tickets arrive after the handshake, with the first data.
            let mut greeting = [0u8; 512];
            let n = tls
                .read(&mut greeting)
                .await
                .unwrap_or_else(|e| panic!("{e}"));
            assert!(greeting[..n].starts_with(b"220 "), "{:?}", &greeting[..n]);
            tls.write_all(b"QUIT\r\n")
                .await
                .unwrap_or_else(|e| panic!("{e}"));
            let _ = tls.read(&mut greeting).await;
            // The relay's choice, whatever the client's order: X25519, AES-128-GCM.
            let session = tls.get_ref().1;
            assert_eq!(
                session.negotiated_cipher_suite().map(|s| s.suite()),
                Some(rustls::CipherSuite::TLS13_AES_128_GCM_SHA256)
            );
            assert_eq!(
                session.negotiated_key_exchange_group().map(|g| g.name()),
                Some(rustls::NamedGroup::X25519)
            );
            session.handshake_kind()
        };
        for client in &clients {
            assert_eq!(handshake(client).await, Some(rustls::HandshakeKind::Full));
        }
        assert_eq!(
            handshake(&clients[0]).await,
            Some(rustls::HandshakeKind::Resumed),
            "the first client's session was forgotten after 299 others"
        );
    })
    .await;
}
