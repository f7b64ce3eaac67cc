//! The RCPT decision as users and attackers meet it (SPEC 5.3-5.4, 3.4; docs/admission.md),
//! over loopback against Postfix `smtp-sink` upstreams. The tenant's own clients connect from
//! 127.0.0.2 (its range); everyone else from 127.0.0.1 is an outsider.

mod support;

use std::net::{IpAddr, SocketAddr};
use support::sink::Sink;
use support::{Client, bounded, configured};

const TENANT_CLIENT: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 2));
const TLS_CLIENT: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 3));

/// A Trial tenant `example.com` (100 recipients a day, 50 per 10 minutes) with registered user
/// alice, its clients in 127.0.0.2/32, and `secure.example` requiring TLS, in 127.0.0.3/32.
fn tenants(mailbox: SocketAddr, out: SocketAddr, allowed: &str) -> String {
    format!(
        r#"{}{}
apiVersion: mailroute.io/v1alpha1
kind: RelayPolicy
metadata: {{name: example, namespace: mail}}
spec:
  domains: [example.com]
  licenses: 1
  tier: Trial
  users: [Alice@Example.com]
  allowedSenders: {allowed}
  authentication: {{ipRanges: [{{cidr: 127.0.0.2/32}}]}}
  inboundRoute: mailbox
  outboundRoute: out
---
apiVersion: mailroute.io/v1alpha1
kind: RelayPolicy
metadata: {{name: secure, namespace: mail}}
spec:
  domains: [secure.example]
  licenses: 1
  requireTLS: true
  authentication: {{ipRanges: [{{cidr: 127.0.0.3/32}}]}}
  inboundRoute: mailbox
  outboundRoute: out
"#,
        support::plain_route("mailbox", mailbox),
        support::plain_route("out", out)
    )
}

/// One message over `c` (already greeted and EHLO'd); the reply to each RCPT and, when one was
/// accepted, to the end of data.
async fn transaction(c: &mut Client, from: &str, to: &[&str], subject: &str) -> Vec<String> {
    let mut replies = vec![c.command(&format!("MAIL FROM:<{from}>")).await];
    let mut accepted = 0;
    for rcpt in to {
        let r = c.command(&format!("RCPT TO:<{rcpt}>")).await;
        accepted += usize::from(r.starts_with("250"));
        replies.push(r);
    }
    if accepted == 0 {
        c.command("RSET").await;
        return replies;
    }
    assert!(c.command("DATA").await.starts_with("354"));
    c.send(format!("Subject: {subject}\r\n\r\nbody\r\n.\r\n").as_bytes())
        .await;
    replies.push(c.reply().await);
    replies
}

async fn greeted(c: &mut Client, helo: &str) {
    assert!(c.reply().await.starts_with("220"));
    assert!(c.command(&format!("EHLO {helo}")).await.starts_with("250"));
}

#[tokio::test]
async fn nobody_outside_can_spend_a_tenants_quota() {
    bounded(120, async {
        let (mailbox, out) = (Sink::start(), Sink::start());
        let relay = configured(&tenants(mailbox.addr, out.addr, "OwnDomains"))
            .start()
            .await;

        // The attack: the tenant's domain in EHLO, a registered user as sender, 130 times the
        // tenant's postmaster. Inbound mail: all accepted, one message in the mailbox.
        let mut attacker = Client::connect(relay.smtp).await;
        greeted(&mut attacker, "example.com").await;
        let to = vec!["postmaster@example.com"; 130];
        let replies = transaction(&mut attacker, "alice@example.com", &to, "lockout").await;
        assert!(
            replies.iter().all(|r| r.starts_with("250")),
            "{:?}",
            replies.iter().find(|r| !r.starts_with("250"))
        );
        assert_eq!(mailbox.wait_count("Subject: lockout", 1), 1);

        // 60 inbound messages from outsiders presenting the tenant's domain in EHLO: more
        // than the tenant's 10-minute limit, none refused.
        for i in 0..60 {
            let replies = transaction(
                &mut attacker,
                "news@outside.example",
                &["bob@example.com"],
                &format!("inbound {i}"),
            )
            .await;
            assert!(
                replies.iter().all(|r| r.starts_with("250")),
                "{i}: {replies:?}"
            );
        }

        // The tenant's own application still relays, and its registered user still sends.
        let mut app = Client::connect_from(relay.smtp, TENANT_CLIENT).await;
        greeted(&mut app, "app.example.com").await;
        let replies = transaction(&mut app, "app@example.com", &["x@partner.example"], "app").await;
        assert!(replies.iter().all(|r| r.starts_with("250")), "{replies:?}");
        let replies = transaction(
            &mut app,
            "alice@example.com",
            &["y@partner.example"],
            "alice",
        )
        .await;
        assert!(replies.iter().all(|r| r.starts_with("250")), "{replies:?}");
        assert_eq!(out.wait_count("Subject: app", 1), 1);
        assert_eq!(out.wait_count("Subject: alice", 1), 1);
        drop(relay);
    })
    .await;
}

#[tokio::test]
async fn the_tenants_own_sending_is_still_limited() {
    bounded(60, async {
        let (mailbox, out) = (Sink::start(), Sink::start());
        let relay = configured(&tenants(mailbox.addr, out.addr, "OwnDomains"))
            .start()
            .await;
        let mut app = Client::connect_from(relay.smtp, TENANT_CLIENT).await;
        greeted(&mut app, "app.example.com").await;
        // Trial: 50 recipients per 10 minutes for senders that are not registered users.
        let to: Vec<String> = (0..51).map(|i| format!("r{i}@partner.example")).collect();
        let to: Vec<&str> = to.iter().map(String::as_str).collect();
        let replies = transaction(&mut app, "app@example.com", &to, "burst").await;
        assert!(replies[1..51].iter().all(|r| r.starts_with("250")));
        assert!(
            replies[51].starts_with("450 4.2.1 Peak SMTP relay limit exceeded for customer"),
            "{}",
            replies[51]
        );
        assert!(
            replies[52].starts_with("250"),
            "the 50 accepted are delivered"
        );
    })
    .await;
}

#[tokio::test]
async fn require_tls_binds_mail_the_tenants_clients_relay() {
    bounded(60, async {
        let (mailbox, out) = (Sink::start(), Sink::start());
        let relay = configured(&tenants(mailbox.addr, out.addr, "OwnDomains"))
            .start()
            .await;
        let mut c = Client::connect_from(relay.smtp, TLS_CLIENT).await;
        greeted(&mut c, "app.secure.example").await;
        let replies = transaction(
            &mut c,
            "app@secure.example",
            &["x@partner.example"],
            "clear",
        )
        .await;
        assert!(replies[1].starts_with("530 5.7.0"), "{replies:?}");
        assert!(c.command("STARTTLS").await.starts_with("220"));
        let mut c = c.starttls(&relay.certs.cert_pem).await;
        assert!(
            c.command("EHLO app.secure.example")
                .await
                .starts_with("250")
        );
        let replies =
            transaction(&mut c, "app@secure.example", &["x@partner.example"], "tls").await;
        assert!(replies.iter().all(|r| r.starts_with("250")), "{replies:?}");
        assert_eq!(out.wait_count("Subject: tls", 1), 1);
        assert_eq!(out.count("Subject: clear"), 0);
    })
    .await;
}

#[tokio::test]
async fn any_sender_is_relayed_as_postmaster_of_the_domain_the_ehlo_name_lies_in() {
    bounded(60, async {
        let (mailbox, out) = (Sink::start(), Sink::start());
        let relay = configured(&tenants(mailbox.addr, out.addr, "Any"))
            .start()
            .await;
        let mut c = Client::connect_from(relay.smtp, TENANT_CLIENT).await;
        greeted(&mut c, "mta1.example.com").await;
        let replies = transaction(
            &mut c,
            "scanner@vendor.example",
            &["ops@partner.example"],
            "scan",
        )
        .await;
        assert!(replies.iter().all(|r| r.starts_with("250")), "{replies:?}");
        assert_eq!(out.wait_count("Subject: scan", 1), 1);
        assert_eq!(out.count("X-Mail-Args: <postmaster@example.com>"), 1);
    })
    .await;
}

#[tokio::test]
async fn a_registered_user_is_one_whatever_the_case_of_the_address() {
    bounded(60, async {
        let (mailbox, out) = (Sink::start(), Sink::start());
        // RegisteredUsers: the user written `Alice@Example.com` in the policy.
        let yaml = tenants(mailbox.addr, out.addr, "RegisteredUsers").replace(
            "  users: [Alice@Example.com]",
            "  users: [Alice@Example.com]\n  limits: {perUser: {uniqueRecipientsPerDay: 2}}",
        );
        let relay = configured(&yaml).start().await;
        let mut c = Client::connect_from(relay.smtp, TENANT_CLIENT).await;
        greeted(&mut c, "app.example.com").await;
        // Allowed as a registered user in every spelling, and counted as one user: the
        // per-user limit of 2 unique recipients holds across spellings.
        let a = transaction(&mut c, "alice@example.com", &["a@partner.example"], "one").await;
        let b = transaction(&mut c, "ALICE@EXAMPLE.COM", &["b@partner.example"], "two").await;
        assert!(
            a.iter().chain(&b).all(|r| r.starts_with("250")),
            "{a:?} {b:?}"
        );
        let third = transaction(&mut c, "Alice@Example.COM", &["c@partner.example"], "3").await;
        assert!(
            third[1].starts_with("550 5.4.5 Daily SMTP relay limit exceeded for user"),
            "{third:?}"
        );
        let other = transaction(&mut c, "bob@example.com", &["d@partner.example"], "4").await;
        assert!(other[1].contains("not a registered user"), "{other:?}");
    })
    .await;
}

#[tokio::test]
async fn refusals_auth_and_tls_handshakes_are_counted() {
    bounded(60, async {
        let (mailbox, out) = (Sink::start(), Sink::start());
        let configured = configured(&tenants(mailbox.addr, out.addr, "OwnDomains"));
        let relay = configured.start().await;
        let mut c = Client::connect(relay.smtp).await;
        greeted(&mut c, "outsider.example").await;
        transaction(&mut c, "a@outside.example", &["victim@else.example"], "x").await;
        transaction(&mut c, "a@outside.example", &["carol@secure.example"], "x").await;
        assert!(
            c.command("MAIL FROM:<a@outside.example>")
                .await
                .starts_with("250")
        );
        let unparsable = c.command("RCPT TO:<victim@else..example>").await;
        assert!(unparsable.starts_with("501 5.1.3"), "{unparsable}");
        assert!(c.command("RSET").await.starts_with("250"));
        assert!(c.command("STARTTLS").await.starts_with("220"));
        let mut c = c.starttls(&relay.certs.cert_pem).await;
        assert!(c.command("EHLO outsider.example").await.starts_with("250"));
        let text = configured.metrics_text();
        for line in [
            r#"mailroute_relay_rcpt_refusals_total{tenant="none",reason="relay_denied"} 1"#,
            r#"mailroute_relay_rcpt_refusals_total{tenant="none",reason="tls_required"} 1"#,
            r#"mailroute_relay_rcpt_refusals_total{tenant="none",reason="syntax"} 1"#,
            r#"mailroute_relay_tls_handshakes_total{listener="smtp",result="success"} 1"#,
        ] {
            assert!(text.contains(line), "{line} not in\n{text}");
        }
    })
    .await;
}
