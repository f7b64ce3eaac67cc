//! Applications in the cluster authenticating with their Kubernetes service-account token
//! (SPEC 11), against the real binary with `--jwks-file`: a projected token signed by the
//! issuer (ES256 or RS256) with the relay's audience binds the session to the tenant listing
//! that service account, and it relays; a token for another audience, an expired one, one
//! signed by another key, one of a service account no RelayPolicy lists, and one sent in clear
//! are refused. The issuer's keys are generated per run (rcgen for P-256, openssl for RSA).

mod support;

use base64::Engine;
use mailroute_relay::auth::tokens::{TokenError, TokenKeys};
use std::net::SocketAddr;
use std::time::SystemTime;
use support::issuer::{IssuerKey, jwks};
use support::sink::{Sink, free_port};
use support::{Client, bounded, relay_process};

const TICKETING: &str = "system:serviceaccount:mail:ticketing";

fn manifests(dir: &std::path::Path, sink: SocketAddr) {
    std::fs::write(
        dir.join("tenant.yaml"),
        format!(
            "apiVersion: mailroute.io/v1alpha1
kind: MailRoute
metadata: {{name: out, namespace: mail}}
spec: {{host: {}, port: {}, tls: {{mode: Disabled}}}}
---
apiVersion: mailroute.io/v1alpha1
kind: RelayPolicy
metadata: {{name: acme, namespace: mail}}
spec:
  domains: [acme.example]
  licenses: 10
  outboundRoute: out
  authentication:
    requireSMTPAuth: true
    serviceAccounts: [{{name: ticketing}}, {{namespace: billing, name: invoices}}]
",
            sink.ip(),
            sink.port()
        ),
    )
    .unwrap_or_else(|e| panic!("{e}"));
}

/// `AUTH <mechanism>` with `token` over implicit TLS; the replies to AUTH (and to the dummy
/// answer of an error challenge), and the client for what follows.
async fn authenticate(
    smtps: SocketAddr,
    cert: &str,
    oauthbearer: bool,
    token: &str,
) -> (String, Client) {
    let mut c = Client::connect_tls(smtps, cert).await;
    c.reply().await;
    let ehlo = c.command("EHLO app.acme.example").await;
    assert!(ehlo.contains("OAUTHBEARER XOAUTH2"), "{ehlo}");
    let response = if oauthbearer {
        format!("n,a=tickets@acme.example,\x01auth=Bearer {token}\x01\x01")
    } else {
        format!("user=tickets@acme.example\x01auth=Bearer {token}\x01\x01")
    };
    let encoded = base64::engine::general_purpose::STANDARD.encode(response);
    let mechanism = if oauthbearer {
        "OAUTHBEARER"
    } else {
        "XOAUTH2"
    };
    let mut reply = c.command(&format!("AUTH {mechanism} {encoded}")).await;
    if reply.starts_with("334 ") {
        // The error challenge: answered with the dummy response, then the refusal.
        reply = format!("{} / {}", reply.trim_end(), c.command("AQ==").await);
    }
    (reply, c)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_application_authenticates_with_its_service_account_token_and_relays() {
    bounded(60, async {
        let es = IssuerKey::es256("es-1");
        let rs = IssuerKey::rs256("rs-1");
        let stranger = IssuerKey::es256("es-1");
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let jwks_file = dir.path().join("jwks.json");
        std::fs::write(&jwks_file, jwks(&[&es, &rs])).unwrap_or_else(|e| panic!("{e}"));
        let sink = Sink::start();
        manifests(dir.path(), sink.addr);
        let certs = support::cert_files(&["relay.test"]);
        let smtps: SocketAddr = ([127, 0, 0, 1], free_port()).into();
        let smtp: SocketAddr = ([127, 0, 0, 1], free_port()).into();
        let _relay = relay_process(
            &[
                "--manifests",
                dir.path().to_str().unwrap_or_default(),
                "--hostname",
                "relay.test",
                "--smtps",
                &smtps.to_string(),
                "--smtp",
                &smtp.to_string(),
                "--tls-cert",
                certs.cert.to_str().unwrap_or_default(),
                "--tls-key",
                certs.key.to_str().unwrap_or_default(),
                "--jwks-file",
                jwks_file.to_str().unwrap_or_default(),
            ],
            smtps,
        );
        let cert = &certs.cert_pem;

        // ES256 by XOAUTH2: bound to acme, so it relays to an outside recipient.
        let (reply, mut c) =
            authenticate(smtps, cert, false, &es.token(TICKETING, "mailroute", 600)).await;
        assert!(reply.starts_with("235 2.7.0"), "{reply}");
        assert!(
            c.command("MAIL FROM:<tickets@acme.example>")
                .await
                .starts_with("250")
        );
        let rcpt = c.command("RCPT TO:<customer@partner.example>").await;
        assert!(rcpt.starts_with("250"), "{rcpt}");
        assert!(c.command("DATA").await.starts_with("354"));
        let done = c
            .command("From: tickets@acme.example\r\nSubject: by token\r\n\r\nhello\r\n.")
            .await;
        assert!(done.starts_with("250"), "{done}");
        assert_eq!(sink.wait_count("Subject: by token", 1), 1);

        // RS256 by OAUTHBEARER, a service account of another namespace listed by the policy.
        let invoices = "system:serviceaccount:billing:invoices";
        let (reply, _) =
            authenticate(smtps, cert, true, &rs.token(invoices, "mailroute", 600)).await;
        assert!(reply.starts_with("235 2.7.0"), "{reply}");

        // Refused, each with the error challenge and then 535 5.7.8.
        for (what, token) in [
            (
                "another audience",
                es.token(TICKETING, "https://kubernetes.default.svc", 600),
            ),
            ("expired", es.token(TICKETING, "mailroute", -3600)),
            (
                "signed by another key",
                stranger.token(TICKETING, "mailroute", 600),
            ),
            (
                "a service account no policy lists",
                es.token("system:serviceaccount:mail:other", "mailroute", 600),
            ),
            ("not a token", "not-a-jwt".to_owned()),
        ] {
            let (reply, mut c) = authenticate(smtps, cert, true, &token).await;
            assert!(
                reply.starts_with("334 ") && reply.contains("/ 535 5.7.8"),
                "{what}: {reply}"
            );
            // Not bound: nothing relays.
            assert!(
                c.command("MAIL FROM:<tickets@acme.example>")
                    .await
                    .starts_with("250")
            );
            let rcpt = c.command("RCPT TO:<customer@partner.example>").await;
            assert!(rcpt.starts_with("5"), "{what}: {rcpt}");
        }

        // In clear, before STARTTLS: refused before the token is read.
        let mut c = Client::connect(smtp).await;
        c.reply().await;
        c.command("EHLO app.acme.example").await;
        let token = es.token(TICKETING, "mailroute", 600);
        let encoded = base64::engine::general_purpose::STANDARD
            .encode(format!("n,,\x01auth=Bearer {token}\x01\x01"));
        let reply = c.command(&format!("AUTH OAUTHBEARER {encoded}")).await;
        assert!(reply.starts_with("538 5.7.11"), "{reply}");
    })
    .await;
}

#[test]
fn rotated_issuer_keys_are_read_again_and_a_broken_file_keeps_the_old_ones() {
    let old = IssuerKey::es256("old");
    let new = IssuerKey::rs256("new");
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let path = dir.path().join("jwks.json");
    std::fs::write(&path, jwks(&[&old])).unwrap_or_else(|e| panic!("{e}"));
    let keys = TokenKeys::load(&path, "mailroute").unwrap_or_else(|e| panic!("{e}"));
    let by_new = new.token(TICKETING, "mailroute", 600);
    assert_eq!(
        keys.verify(&by_new),
        Err(TokenError::UnknownKey("new".into()))
    );
    // The issuer publishes the new key beside the old one.
    std::thread::sleep(std::time::Duration::from_millis(20));
    std::fs::write(&path, jwks(&[&old, &new])).unwrap_or_else(|e| panic!("{e}"));
    let later = SystemTime::now() + std::time::Duration::from_secs(1);
    let file = std::fs::File::options()
        .write(true)
        .open(&path)
        .unwrap_or_else(|e| panic!("{e}"));
    file.set_modified(later).unwrap_or_else(|e| panic!("{e}"));
    assert!(keys.reload_if_changed());
    assert_eq!(keys.verify(&by_new).as_deref(), Ok(TICKETING));
    assert_eq!(
        keys.verify(&old.token(TICKETING, "mailroute", 600))
            .as_deref(),
        Ok(TICKETING)
    );
    // A half-written file: logged, the keys in use stay.
    std::fs::write(&path, "{\"keys\": [").unwrap_or_else(|e| panic!("{e}"));
    file.set_modified(later + std::time::Duration::from_secs(1))
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(!keys.reload_if_changed());
    assert_eq!(keys.verify(&by_new).as_deref(), Ok(TICKETING));
    // Not a service account's token: refused even when the signature holds.
    assert_eq!(
        keys.verify(&old.token("alice", "mailroute", 600)),
        Err(TokenError::NotServiceAccount("alice".into()))
    );
}
