//! Delivery end to end against real Postfix `smtp-sink` upstreams: dual and split delivery,
//! connection reuse, TLS policy, loop protection, and the fault matrix of SPEC 6.5-6.6 (for
//! every 250 each required upstream has the message exactly once; for every 4xx the retry
//! delivers only what failed).

mod support;

use std::net::SocketAddr;
use std::time::Duration;
use support::sink::{Sink, free_port};
use support::{bounded, configured, send_message};

/// Dual delivery: the primary route and a required copy route, with short timeouts.
fn dual(primary: SocketAddr, secondary: SocketAddr) -> String {
    format!(
        r#"
apiVersion: mailroute.io/v1alpha1
kind: MailRoute
metadata: {{name: mailbox, namespace: mail}}
spec:
  host: {}
  port: {}
  tls: {{mode: Disabled}}
  timeouts: {{connect: 1s, command: 1s, dataEnd: 2s}}
---
apiVersion: mailroute.io/v1alpha1
kind: MailRoute
metadata: {{name: legacy, namespace: mail}}
spec:
  host: {}
  port: {}
  tls: {{mode: Opportunistic}}
  timeouts: {{connect: 1s, command: 1s, dataEnd: 2s}}
---
apiVersion: mailroute.io/v1alpha1
kind: RelayPolicy
metadata: {{name: example, namespace: mail}}
spec:
  domains: [example.com]
  licenses: 10
  users: [alice@example.com, bob@example.com]
  inboundRoute: mailbox
---
apiVersion: mailroute.io/v1alpha1
kind: RoutingRule
metadata: {{name: copy-to-legacy, namespace: mail}}
spec:
  policyRef: example
  priority: 10
  messages: [Inbound, InternalReceiving]
  accountTypes: [Users]
  actions:
    alsoDeliverTo: [{{route: legacy}}]
"#,
        primary.ip(),
        primary.port(),
        secondary.ip(),
        secondary.port()
    )
}

fn message(id: &str) -> String {
    format!("Message-ID: <{id}@client.test>\r\nSubject: {id}\r\n\r\nbody of {id}\r\n")
}

#[tokio::test]
async fn dual_delivery_puts_each_message_once_on_both_upstreams_over_reused_connections() {
    bounded(60, async {
        let primary = Sink::start();
        let legacy = Sink::start();
        let config = configured(&dual(primary.addr, legacy.addr));
        let relay = config.start().await;
        for i in 0..5 {
            let id = format!("dual-{i}");
            let reply = send_message(
                relay.smtp,
                "someone@partner.example",
                &["alice@example.com", "nobody@example.com"],
                &message(&id),
            )
            .await;
            assert!(reply.starts_with("250 2.0.0"), "{reply}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        for i in 0..5 {
            let id = format!("Subject: dual-{i}\n");
            assert_eq!(primary.count(&id), 1, "primary has {id} once");
            assert_eq!(legacy.count(&id), 1, "legacy has {id} once");
        }
        let copy = String::from_utf8_lossy(&legacy.dumps()[0]).into_owned();
        assert!(copy.contains("X-Mailroute-Loop: relay.test"), "{copy}");
        assert!(copy.contains("alice@example.com"), "{copy}");
        assert!(
            !copy.contains("nobody@example.com"),
            "only users are copied: {copy}"
        );
        let original = String::from_utf8_lossy(&primary.dumps()[0]).into_owned();
        assert!(!original.contains("X-Mailroute-Loop"), "{original}");
        // One connection per upstream, reused for all five messages.
        assert_eq!(config.forwarder.idle_connections(), 2);
        let metrics = config.metrics_text();
        assert!(
            metrics.contains(
                r#"mailroute_relay_messages_total{tenant="example",direction="inbound",outcome="delivered"} 5"#
            ),
            "{metrics}"
        );
        assert!(
            metrics.contains(r#"mailroute_relay_upstream_replies_total{route="legacy",class="2xx"} 5"#),
            "{metrics}"
        );
    })
    .await;
}

#[tokio::test]
async fn a_required_tls_route_never_sends_to_an_upstream_without_starttls() {
    bounded(30, async {
        let primary = Sink::start();
        let yaml = dual(primary.addr, primary.addr).replace(
            "tls: {mode: Disabled}",
            "tls: {mode: Required, requireCASigned: false, validateHostname: false}",
        );
        let config = configured(&yaml);
        let relay = config.start().await;
        let reply = send_message(
            relay.smtp,
            "someone@partner.example",
            &["nobody@example.com"],
            &message("tls-required"),
        )
        .await;
        assert!(reply.starts_with("451 4.4.0"), "{reply}");
        assert!(reply.contains("route mailbox"), "{reply}");
        assert!(reply.contains("STARTTLS"), "{reply}");
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(primary.dumps().len(), 0, "nothing sent in clear");
    })
    .await;
}

/// A fault on the required copy route; what the client must be told at first.
struct Fault {
    what: &'static str,
    /// smtp-sink options, or `None` for a closed port.
    sink: Option<&'static [&'static str]>,
    /// Expected reply class on the first attempt.
    class: char,
}

const FAULTS: &[Fault] = &[
    Fault {
        what: "closed port",
        sink: None,
        class: '4',
    },
    Fault {
        what: "421 at connect",
        sink: Some(&["-Q", "CONNECT"]),
        class: '4',
    },
    Fault {
        what: "4xx to MAIL",
        sink: Some(&["-r", "MAIL"]),
        class: '4',
    },
    Fault {
        what: "4xx to RCPT",
        sink: Some(&["-r", "RCPT"]),
        class: '4',
    },
    Fault {
        what: "disconnect at DATA",
        sink: Some(&["-q", "DATA"]),
        class: '4',
    },
    Fault {
        what: "4xx at end of data",
        sink: Some(&["-r", "."]),
        class: '4',
    },
    Fault {
        what: "421 and disconnect at end of data",
        sink: Some(&["-Q", "."]),
        class: '4',
    },
    Fault {
        what: "stall at RCPT beyond the command timeout",
        sink: Some(&["-W", "rcpt:3"]),
        class: '4',
    },
    // A copy never turns a delivered message into a bounce (SPEC 6.5): the primary accepted,
    // so the client hears 250 and the copy's refusal is counted.
    Fault {
        what: "5xx to RCPT",
        sink: Some(&["-f", "RCPT"]),
        class: '2',
    },
    Fault {
        what: "5xx at end of data",
        sink: Some(&["-f", "."]),
        class: '2',
    },
];

#[tokio::test]
async fn fault_matrix_nothing_lost_nothing_duplicated_and_retries_resend_only_what_failed() {
    bounded(240, async {
        let mut table = Vec::new();
        for (n, fault) in FAULTS.iter().enumerate() {
            let primary = Sink::start();
            let port = free_port();
            let faulty_addr: SocketAddr = ([127, 0, 0, 1], port).into();
            let faulty = fault.sink.map(|args| Sink::start_on(faulty_addr, args));
            let config = configured(&dual(primary.addr, faulty_addr));
            let relay = config.start().await;
            let id = format!("fault-{n}");
            let subject = format!("Subject: {id}\n");
            let first = send_message(
                relay.smtp,
                "someone@partner.example",
                &["alice@example.com"],
                &message(&id),
            )
            .await;
            assert!(
                first.starts_with(fault.class),
                "{}: first attempt got {first}",
                fault.what
            );
            assert_eq!(
                primary.wait_count(&subject, 1),
                1,
                "{}: primary once",
                fault.what
            );
            drop(faulty);
            if fault.class == '2' {
                let metrics = config.metrics_text();
                assert!(
                    metrics.contains(
                        r#"mailroute_relay_copies_total{route="legacy",outcome="refused"} 1"#
                    ),
                    "{}: the copy's refusal is counted: {metrics}",
                    fault.what
                );
                table.push(format!("{}: {}", fault.what, first.trim_end()));
                continue;
            }
            // The secondary recovers; the client retries the same message.
            let healthy = Sink::start_on(faulty_addr, &[]);
            let retry = send_message(
                relay.smtp,
                "someone@partner.example",
                &["alice@example.com"],
                &message(&id),
            )
            .await;
            assert!(
                retry.starts_with("250"),
                "{}: retry got {retry}",
                fault.what
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
            assert_eq!(
                primary.count(&subject),
                1,
                "{}: the retry did not duplicate the primary's copy",
                fault.what
            );
            assert_eq!(
                healthy.wait_count(&subject, 1),
                1,
                "{}: secondary once",
                fault.what
            );
            table.push(format!(
                "{}: {} then {}",
                fault.what,
                first.trim_end(),
                retry.trim_end()
            ));
        }
        eprintln!("fault matrix:\n  {}", table.join("\n  "));
    })
    .await;
}

#[tokio::test]
async fn two_relays_copying_to_each_other_stop_after_one_hop() {
    bounded(60, async {
        let sink_a = Sink::start();
        let sink_b = Sink::start();
        // Each relay delivers its users' mail to its own sink and copies it to the other relay.
        let port_a = free_port();
        let port_b = free_port();
        let relay_config = |own: SocketAddr, peer: u16| {
            dual(own, ([127, 0, 0, 1], peer).into())
                .replace("tls: {mode: Opportunistic}", "tls: {mode: Disabled}")
        };
        let a = configured(&relay_config(sink_a.addr, port_b));
        let b = configured(&relay_config(sink_b.addr, port_a));
        let relay_a = a.start_on(port_a).await;
        let _relay_b = b.start_on(port_b).await;
        let reply = send_message(
            relay_a.smtp,
            "someone@partner.example",
            &["alice@example.com"],
            &message("ping-pong"),
        )
        .await;
        assert!(reply.starts_with("250"), "{reply}");
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(sink_a.count("Subject: ping-pong"), 1);
        assert_eq!(sink_b.count("Subject: ping-pong"), 1);
        assert!(
            b.metrics_text()
                .contains("mailroute_relay_copies_suppressed_total 1"),
            "{}",
            b.metrics_text()
        );
    })
    .await;
}

/// A scripted upstream that offers PIPELINING and refuses MAIL temporarily: the pipelined
/// RCPTs then get "503 need MAIL", and the recipients must carry the MAIL reply (a 4xx the
/// client retries), not the 503.
#[tokio::test]
async fn a_pipelined_mail_refusal_is_what_the_recipients_get() {
    use mailroute_relay::delivery::upstream::{
        Dial, Envelope, Recipient, Timing, TlsPlan, Upstream,
    };
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    bounded(20, async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let addr = listener.local_addr().unwrap_or_else(|e| panic!("{e}"));
        tokio::spawn(async move {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            let mut buf = vec![0u8; 4096];
            let _ = s.write_all(b"220 scripted ESMTP\r\n").await;
            let _ = s.read(&mut buf).await;
            let _ = s.write_all(b"250-scripted\r\n250 PIPELINING\r\n").await;
            let mut got = Vec::new();
            while !got.ends_with(b"DATA\r\n") {
                let n = s.read(&mut buf).await.unwrap_or(0);
                if n == 0 {
                    return;
                }
                got.extend_from_slice(&buf[..n]);
            }
            let _ = s
                .write_all(b"451 4.3.0 try later\r\n503 5.5.1 need MAIL\r\n503 5.5.1 need MAIL\r\n554 5.5.1 no valid recipients\r\n")
                .await;
            let _ = s.read(&mut buf).await;
            let _ = s.write_all(b"250 2.0.0 reset\r\n").await;
            let _ = s.read(&mut buf).await;
        });
        let dial = Dial {
            addr,
            host: "127.0.0.1".into(),
            helo: "relay.test".into(),
            tls: TlsPlan::Off,
            login: None,
            connect_timeout: Duration::from_secs(2),
            command_timeout: Duration::from_secs(2),
        };
        let mut up = Upstream::connect(&dial)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let recipients = [
            Recipient {
                address: "b@example.com",
                notify_never: false,
            },
            Recipient {
                address: "c@example.com",
                notify_never: false,
            },
        ];
        let envelope = Envelope {
            sender: "a@example.com",
            recipients: &recipients,
            eight_bit: false,
            smtputf8: false,
        };
        let timing = Timing {
            deadline: std::time::Instant::now() + Duration::from_secs(5),
            data_timeout: Duration::from_secs(2),
        };
        let answers = up
            .send(
                &envelope,
                b"",
                b"Subject: x\r\n\r\nbody\r\n",
                timing,
                None::<std::future::Ready<bool>>,
            )
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let codes: Vec<u16> = answers
            .recipients
            .iter()
            .map(|r| r.as_ref().map_or(250, |r| r.code()))
            .collect();
        assert_eq!(codes, [451, 451]);
        assert!(answers.data.is_none(), "no content sent");
        assert!(!up.poisoned, "RSET kept the connection usable");
    })
    .await;
}

/// TLS handshake failure: the upstream (a second relay, with a self-signed certificate)
/// offers STARTTLS, but a `Required` route that checks certificates cannot verify it. Nothing
/// may be sent, in clear or otherwise; with the checks off the same upstream gets the message
/// over TLS.
#[tokio::test]
async fn a_certificate_that_fails_the_checks_stops_a_required_route() {
    bounded(60, async {
        let sink = Sink::start();
        let mailbox = configured(&format!(
            r#"
apiVersion: mailroute.io/v1alpha1
kind: MailRoute
metadata: {{name: store, namespace: mail}}
spec: {{host: {}, port: {}, tls: {{mode: Disabled}}}}
---
apiVersion: mailroute.io/v1alpha1
kind: RelayPolicy
metadata: {{name: example, namespace: mail}}
spec: {{domains: [example.com], licenses: 5, inboundRoute: store}}
"#,
            sink.addr.ip(),
            sink.addr.port()
        ));
        let upstream = mailbox.start().await;
        let edge = |tls: &str| {
            configured(&format!(
                r#"
apiVersion: mailroute.io/v1alpha1
kind: MailRoute
metadata: {{name: mailbox, namespace: mail}}
spec: {{host: {}, port: {}, tls: {tls}, timeouts: {{connect: 1s, command: 2s, dataEnd: 2s}}}}
---
apiVersion: mailroute.io/v1alpha1
kind: RelayPolicy
metadata: {{name: example, namespace: mail}}
spec: {{domains: [example.com], licenses: 5, inboundRoute: mailbox}}
"#,
                upstream.smtp.ip(),
                upstream.smtp.port()
            ))
        };
        let strict = edge("{mode: Required}");
        let relay = strict.start().await;
        let reply = send_message(
            relay.smtp,
            "someone@partner.example",
            &["alice@example.com"],
            &message("tls-unverified"),
        )
        .await;
        assert!(reply.starts_with("451 4."), "{reply}");
        assert!(reply.contains("route mailbox"), "{reply}");
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(sink.count("tls-unverified"), 0, "nothing delivered");

        let lenient = edge("{mode: Required, requireCASigned: false, validateHostname: false}");
        let relay = lenient.start().await;
        let reply = send_message(
            relay.smtp,
            "someone@partner.example",
            &["alice@example.com"],
            &message("tls-encrypted"),
        )
        .await;
        assert!(reply.starts_with("250"), "{reply}");
        assert_eq!(sink.wait_count("Subject: tls-encrypted", 1), 1);
        let dump = String::from_utf8_lossy(&sink.dumps().concat()).into_owned();
        assert!(
            dump.contains("with ESMTPS"),
            "the hop into the upstream was encrypted: {dump}"
        );
    })
    .await;
}
