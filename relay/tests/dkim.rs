//! DKIM signing per tenant (SPEC 12, `RelayPolicy.dkim`), as a receiver checks it: a tenant's
//! outbound message, with a copy to an archive, is signed once with both keys of a rotation
//! (RSA-2048 and Ed25519, made by `openssl`), both legs carry the same signatures, the message's
//! own bytes are untouched, and both signatures verify with the `mail-auth` verifier and with
//! Python's dkimpy. A message from a client not authorised for the tenant — inbound mail, even
//! one whose `From:` claims the tenant's domain — is never signed.

mod support;

use base64::Engine;
use mail_auth::common::parse::TxtRecordParser;
use mail_auth::common::verify::DomainKey;
use mail_auth::hickory_resolver::config::{NameServerConfig, ResolverConfig, ResolverOpts};
use mail_auth::{
    AuthenticatedMessage, DkimResult, MessageAuthenticator, Parameters, ResolverCache, Txt,
};
use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};
use support::dkim::TxtCache;
use support::scripted::{Script, Scripted};
use support::{Client, bounded, configured};

/// A private key (PKCS#8 PEM) made by openssl, and its DKIM record (`v=DKIM1; k=...; p=...`).
fn key(algorithm: &str) -> (String, String) {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let path = dir.path().join("key.pem");
    let mut genpkey = Command::new("openssl");
    genpkey
        .args(["genpkey", "-algorithm", algorithm, "-out"])
        .arg(&path);
    if algorithm == "RSA" {
        genpkey.args(["-pkeyopt", "rsa_keygen_bits:2048"]);
    }
    assert!(
        genpkey.status().is_ok_and(|s| s.success()),
        "openssl genpkey"
    );
    let public = Command::new("openssl")
        .args(["pkey", "-pubout", "-outform", "DER", "-in"])
        .arg(&path)
        .output()
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(public.status.success());
    let b64 = base64::engine::general_purpose::STANDARD;
    let record = match algorithm {
        "RSA" => format!("v=DKIM1; k=rsa; p={}", b64.encode(&public.stdout)),
        // NB: an Ed25519 record holds the raw 32-octet key (RFC 8463), the end of the SPKI.
        _ => format!(
            "v=DKIM1; k=ed25519; p={}",
            b64.encode(&public.stdout[public.stdout.len() - 32..])
        ),
    };
    let pem = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{e}"));
    (pem, record)
}

fn indent(pem: &str) -> String {
    pem.lines().map(|l| format!("    {l}\n")).collect()
}

fn manifests(upstream: SocketAddr, archive: SocketAddr, rsa: &str, ed: &str) -> String {
    format!(
        r#"
apiVersion: v1
kind: Secret
metadata: {{name: dkim-keys, namespace: mail}}
stringData:
  rsa.pem: |
{}  ed.pem: |
{}---
apiVersion: mailroute.io/v1alpha1
kind: MailRoute
metadata: {{name: out, namespace: mail}}
spec: {{host: {}, port: {}, tls: {{mode: Disabled}}}}
---
apiVersion: mailroute.io/v1alpha1
kind: MailRoute
metadata: {{name: archive, namespace: mail}}
spec: {{host: {}, port: {}, tls: {{mode: Disabled}}}}
---
apiVersion: mailroute.io/v1alpha1
kind: RelayPolicy
metadata: {{name: example, namespace: mail}}
spec:
  domains: [example.com]
  licenses: 10
  authentication: {{ipRanges: [{{cidr: 127.0.0.1/32}}]}}
  outboundRoute: out
  inboundRoute: out
  dkim:
    - {{domain: example.com, selector: rsa2026, privateKeySecretRef: {{name: dkim-keys, key: rsa.pem}}}}
    - {{domain: example.com, selector: ed2026, algorithm: ed25519-sha256, privateKeySecretRef: {{name: dkim-keys, key: ed.pem}}}}
---
apiVersion: mailroute.io/v1alpha1
kind: RoutingRule
metadata: {{name: journal, namespace: mail}}
spec:
  policyRef: example
  messages: [Outbound]
  actions:
    alsoDeliverTo: [{{route: archive}}]
"#,
        indent(rsa),
        indent(ed),
        upstream.ip(),
        upstream.port(),
        archive.ip(),
        archive.port()
    )
}

async fn send_from(
    relay: SocketAddr,
    source: [u8; 4],
    helo: &str,
    from: &str,
    to: &str,
    message: &str,
) -> String {
    let mut c = Client::connect_from(relay, std::net::IpAddr::from(source)).await;
    c.reply().await;
    c.command(&format!("EHLO {helo}")).await;
    assert!(
        c.command(&format!("MAIL FROM:<{from}>"))
            .await
            .starts_with("250")
    );
    let rcpt = c.command(&format!("RCPT TO:<{to}>")).await;
    assert!(rcpt.starts_with("250"), "{rcpt}");
    assert!(c.command("DATA").await.starts_with("354"));
    c.send(format!("{message}.\r\n").as_bytes()).await;
    let reply = c.reply().await;
    let _ = c.command("QUIT").await;
    reply
}

/// Runs dkimpy on `message` for its signature number `index`, with `records` as the DNS.
fn dkimpy_verifies(message: &[u8], index: usize, records: &[(&str, &str)]) -> bool {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let path = dir.path().join("message.eml");
    std::fs::write(&path, message).unwrap_or_else(|e| panic!("{e}"));
    let table: String = records
        .iter()
        .map(|(name, txt)| format!("{:?}: {:?},", format!("{name}."), txt))
        .collect();
    let script = format!(
        "import dkim, sys\n\
         records = {{{table}}}\n\
         def dns(name, timeout=5):\n    return records.get(name.decode()).encode()\n\
         message = open(sys.argv[1], 'rb').read()\n\
         ok = dkim.DKIM(message).verify(idx={index}, dnsfunc=dns)\n\
         sys.exit(0 if ok else 1)\n"
    );
    Command::new("python3")
        .args(["-c", &script])
        .arg(&path)
        .status()
        .is_ok_and(|s| s.success())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenants_mail_is_signed_once_with_every_key_and_verifies_on_every_leg() {
    bounded(60, async {
        let (rsa_pem, rsa_record) = key("RSA");
        let (ed_pem, ed_record) = key("ed25519");
        let upstream = Scripted::start(Script::default()).await;
        let archive = Scripted::start(Script::default()).await;
        let config = configured(&manifests(upstream.addr, archive.addr, &rsa_pem, &ed_pem));
        let relay = config.start().await;

        let message = "From: \"Alice\" <alice@example.com>\r\nTo: bob@partner.example\r\nSubject: signed on the way out\r\nDate: Fri, 04 Dec 2026 10:00:00 +0000\r\nMessage-ID: <m1@example.com>\r\n\r\nHello Bob.\r\n";
        let reply = send_from(relay.smtp, [127, 0, 0, 1], "client.example.com", "alice@example.com", "bob@partner.example", message).await;
        assert!(reply.starts_with("250"), "{reply}");
        let deadline = Instant::now() + Duration::from_secs(10);
        while archive.accepted().is_empty() || upstream.accepted().is_empty() {
            assert!(Instant::now() < deadline, "a leg never arrived");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let primary = upstream.accepted().remove(0);
        let copy = archive.accepted().remove(0);
        let after_received = |m: &[u8]| {
            let text = String::from_utf8_lossy(m).into_owned();
            // NB: the scripted upstream keeps the content as it came (dot-stuffed, CRLF).
            let start = text.find("DKIM-Signature:").unwrap_or_else(|| panic!("unsigned: {text}"));
            text[start..].to_owned()
        };
        // The copy carries the very same signatures: one signing, before the legs.
        assert_eq!(after_received(&primary), after_received(&copy));
        let signed = after_received(&primary);
        assert_eq!(signed.matches("DKIM-Signature:").count(), 2, "{signed}");
        // The message's own bytes follow the signatures untouched.
        assert!(signed.ends_with(message), "{signed}");
        for selector in ["s=rsa2026", "s=ed2026"] {
            assert!(signed.contains(selector), "{selector}: {signed}");
        }

        let records = [
            ("rsa2026._domainkey.example.com", rsa_record.as_str()),
            ("ed2026._domainkey.example.com", ed_record.as_str()),
        ];
        let cache = TxtCache::default();
        for (name, record) in records {
            for name in [name.to_owned(), format!("{name}.")] {
                let key = DomainKey::parse(record.as_bytes()).unwrap_or_else(|e| panic!("{e}"));
                cache.insert(name.into_boxed_str(), Txt::from(key), Instant::now());
            }
        }
        let nameserver =
            NameServerConfig::udp_and_tcp("127.0.0.1".parse().unwrap_or_else(|e| panic!("{e}")));
        let authenticator = MessageAuthenticator::new(
            ResolverConfig::from_parts(None, vec![], vec![nameserver]),
            ResolverOpts::default(),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        for (leg, content) in [("primary", &primary), ("copy", &copy)] {
            let parsed = AuthenticatedMessage::parse(content).unwrap_or_else(|| panic!("{leg} unparsable"));
            let results = authenticator
                .verify_dkim(Parameters::new(&parsed).with_txt_cache(&cache))
                .await;
            assert_eq!(results.len(), 2, "{leg}");
            for r in &results {
                assert_eq!(r.result(), &DkimResult::Pass, "{leg}");
            }
            for index in 0..2 {
                assert!(dkimpy_verifies(content, index, &records), "dkimpy: {leg} signature {index}");
            }
        }
        // The verifiers do check: one changed octet of the body fails both signatures.
        let tampered = String::from_utf8_lossy(&primary).replace("Hello Bob.", "Hello Bub.");
        let parsed = AuthenticatedMessage::parse(tampered.as_bytes()).unwrap_or_else(|| panic!("unparsable"));
        let results = authenticator
            .verify_dkim(Parameters::new(&parsed).with_txt_cache(&cache))
            .await;
        assert!(results.iter().all(|r| r.result() != &DkimResult::Pass));
        assert!(!dkimpy_verifies(tampered.as_bytes(), 0, &records));
        let metrics = config.metrics_text();
        for selector in ["rsa2026", "ed2026"] {
            assert!(
                metrics.contains(&format!(
                    r#"mailroute_relay_dkim_signatures_total{{tenant="example",domain="example.com",selector="{selector}",result="signed"}} 1"#
                )),
                "{metrics}"
            );
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mail_from_a_client_not_authorised_for_the_tenant_is_never_signed() {
    bounded(60, async {
        let (rsa_pem, _) = key("RSA");
        let (ed_pem, _) = key("ed25519");
        let upstream = Scripted::start(Script::default()).await;
        let archive = Scripted::start(Script::default()).await;
        let config = configured(&manifests(upstream.addr, archive.addr, &rsa_pem, &ed_pem));
        let relay = config.start().await;
        // Inbound from outside the tenant's range, its EHLO naming the tenant (which binds the
        // session to it but authorises nothing) and its From: claiming the tenant's domain: a
        // signature would vouch for a forgery.
        let forged =
            "From: ceo@example.com\r\nTo: alice@example.com\r\nSubject: urgent\r\n\r\nPay it.\r\n";
        let reply = send_from(
            relay.smtp,
            [127, 0, 0, 2],
            "example.com",
            "someone@partner.example",
            "alice@example.com",
            forged,
        )
        .await;
        assert!(reply.starts_with("250"), "{reply}");
        let deadline = Instant::now() + Duration::from_secs(10);
        while upstream.accepted().is_empty() {
            assert!(Instant::now() < deadline, "never delivered");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let delivered = String::from_utf8_lossy(&upstream.accepted()[0]).into_owned();
        assert!(!delivered.contains("DKIM-Signature"), "{delivered}");
        assert!(
            !config
                .metrics_text()
                .contains("mailroute_relay_dkim_signatures_total{")
        );
    })
    .await;
}
