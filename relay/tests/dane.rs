//! DANE for SMTP (RFC 7672) for a route delivering by MX lookup with `mxLookup: {dane: true}`,
//! against a DNS server on loopback that answers as a validating resolver (the AD bit set, or
//! not) and a second relay as the MX host: a matching DANE-EE or DANE-TA record delivers over
//! TLS, a mismatching one defers with `451 4.4.0` and sends nothing, and without the AD bit
//! the TLSA records are not used.

mod support;

use ring::digest;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;
use support::dns::DnsServer;
use support::mta_sts::{Issued, TestCa, install, partner_relay};
use support::{Configured, Relay, Stores, bounded, send_message};

fn relay_for(dns: &DnsServer, mx: &Relay) -> Configured {
    partner_relay(
        mx.smtp.port(),
        "{dane: true}",
        Stores {
            dns_server: Some(dns.addr),
            ..Stores::memory()
        },
    )
}

/// partner.test with one MX host, and the TLSA owner name of that host on the MX relay's port.
async fn zone(mx: &Relay, authentic: bool) -> (DnsServer, String) {
    let dns = DnsServer::start().await;
    dns.mx("partner.test", 10, "mx.partner.test");
    dns.a("mx.partner.test", Ipv4Addr::LOCALHOST);
    dns.set_authentic(authentic);
    (dns, format!("_{}._tcp.mx.partner.test", mx.smtp.port()))
}

/// A self-signed certificate for the MX host, installed; its public key (SPKI DER).
fn self_signed(mx: &Relay) -> Vec<u8> {
    let generated = rcgen::generate_simple_self_signed(vec!["mx.partner.test".to_owned()])
        .unwrap_or_else(|e| panic!("{e}"));
    install(
        mx,
        &Issued {
            cert_pem: generated.cert.pem(),
            key_pem: generated.signing_key.serialize_pem(),
        },
    );
    rcgen::PublicKeyData::subject_public_key_info(&generated.signing_key)
}

fn sha256(bytes: &[u8]) -> Vec<u8> {
    digest::digest(&digest::SHA256, bytes).as_ref().to_vec()
}

async fn send(relay: SocketAddr, id: &str) -> String {
    send_message(
        relay,
        "app@example.com",
        &["bob@partner.test"],
        &format!("Message-ID: <{id}@example.com>\r\nSubject: {id}\r\n\r\nbody\r\n"),
    )
    .await
}

fn results(config: &Configured, policy_type: &str, mode: &str, result: &str) -> u64 {
    let wanted = format!(
        "mailroute_relay_tls_policy_results_total{{domain=\"partner.test\",policy_type=\"{policy_type}\",mode=\"{mode}\",result=\"{result}\"}} "
    );
    config
        .metrics_text()
        .lines()
        .find_map(|l| l.strip_prefix(&wanted))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

fn over_tls(mx: &Relay, id: &str) -> Option<bool> {
    let messages = mx.capture.messages.lock().ok()?;
    let t = messages
        .iter()
        .find(|t| String::from_utf8_lossy(&t.content).contains(&format!("Subject: {id}")))?;
    Some(String::from_utf8_lossy(&t.content[..t.received_len]).contains("ESMTPS"))
}

#[tokio::test]
async fn a_matching_dane_ee_record_delivers_over_tls_and_a_mismatching_one_sends_nothing() {
    bounded(60, async {
        let mx = Relay::start(support::Options::default()).await;
        let spki = self_signed(&mx);
        let (dns, owner) = zone(&mx, true).await;
        // DANE-EE, SPKI, SHA-256: no authority and no name check, the key is the proof.
        dns.tlsa(&owner, 3, 1, 1, sha256(&spki));
        let config = relay_for(&dns, &mx);
        let relay = config.start().await;
        let reply = send(relay.smtp, "dane-match").await;
        assert!(reply.starts_with("250"), "{reply}");
        assert_eq!(over_tls(&mx, "dane-match"), Some(true));
        assert_eq!(results(&config, "tlsa", "enforce", "success"), 1);

        // The host presents another key than the record names (an interception).
        let (dns, owner) = zone(&mx, true).await;
        dns.tlsa(&owner, 3, 1, 1, sha256(b"the key the domain published"));
        let config = relay_for(&dns, &mx);
        let relay = config.start().await;
        let reply = send(relay.smtp, "dane-mismatch").await;
        assert!(reply.starts_with("451 4.4.0"), "{reply}");
        assert!(reply.contains("route partner"), "{reply}");
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(mx.capture.count(), 1, "nothing sent to a host failing DANE");
        assert_eq!(results(&config, "tlsa", "enforce", "validation-failure"), 1);
    })
    .await;
}

#[tokio::test]
async fn without_the_ad_bit_tlsa_records_are_not_used() {
    bounded(60, async {
        let mx = Relay::start(support::Options::default()).await;
        self_signed(&mx);
        let (dns, owner) = zone(&mx, false).await;
        dns.tlsa(&owner, 3, 1, 1, sha256(b"the key the domain published"));
        let config = relay_for(&dns, &mx);
        let relay = config.start().await;
        let reply = send(relay.smtp, "dane-insecure").await;
        assert!(reply.starts_with("250"), "{reply}");
        assert_eq!(mx.capture.count(), 1);
        assert_eq!(results(&config, "tlsa", "enforce", "validation-failure"), 0);
        assert_eq!(results(&config, "no-policy-found", "none", "success"), 1);
    })
    .await;
}

#[tokio::test]
async fn a_dane_ta_record_anchors_the_chain_and_unusable_records_still_mean_tls() {
    bounded(60, async {
        let ca = TestCa::new();
        let mx = Relay::start(support::Options::default()).await;
        // The server sends its chain with the authority's certificate, as DANE-TA needs.
        let issued = ca.issue("mx.partner.test");
        install(
            &mx,
            &Issued {
                cert_pem: format!("{}{}", issued.cert_pem, ca.pem),
                key_pem: issued.key_pem,
            },
        );
        let ca_der: Vec<u8> = rustls::pki_types::pem::PemObject::from_pem_slice(ca.pem.as_bytes())
            .map(|c: rustls::pki_types::CertificateDer<'static>| c.as_ref().to_vec())
            .unwrap_or_else(|e| panic!("{e}"));
        let (dns, owner) = zone(&mx, true).await;
        // DANE-TA, full certificate, SHA-256.
        dns.tlsa(&owner, 2, 0, 1, sha256(&ca_der));
        let config = relay_for(&dns, &mx);
        let relay = config.start().await;
        let reply = send(relay.smtp, "dane-ta").await;
        assert!(reply.starts_with("250"), "{reply}");
        assert_eq!(over_tls(&mx, "dane-ta"), Some(true));
        assert_eq!(results(&config, "tlsa", "enforce", "success"), 1);

        // A DANE-TA record for an authority that did not issue the host's certificate.
        let (dns, owner) = zone(&mx, true).await;
        dns.tlsa(&owner, 2, 0, 1, sha256(TestCa::new().pem.as_bytes()));
        let config = relay_for(&dns, &mx);
        let relay = config.start().await;
        let reply = send(relay.smtp, "dane-ta-other").await;
        assert!(reply.starts_with("451 4.4.0"), "{reply}");

        // Only PKIX-EE records (unusable in SMTP): delivered, but over TLS.
        let (dns, owner) = zone(&mx, true).await;
        dns.tlsa(&owner, 1, 1, 1, sha256(b"anything"));
        let config = relay_for(&dns, &mx);
        let relay = config.start().await;
        let reply = send(relay.smtp, "dane-unusable").await;
        assert!(reply.starts_with("250"), "{reply}");
        assert_eq!(over_tls(&mx, "dane-unusable"), Some(true));
        assert_eq!(mx.capture.count(), 2);
    })
    .await;
}
