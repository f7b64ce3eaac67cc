//! Byte transparency: a DKIM-signed corpus (simple canonicalisation, so any changed byte breaks
//! it) passes through the relay by DATA and by BDAT, arrives byte-identical after the relay's one
//! `Received:` header, and still verifies.

mod support;

use mail_auth::common::crypto::Ed25519Key;
use mail_auth::common::headers::HeaderWriter;
use mail_auth::common::parse::TxtRecordParser;
use mail_auth::common::verify::DomainKey;
use mail_auth::dkim::{Canonicalization, DkimSigner};
use mail_auth::hickory_resolver::config::{NameServerConfig, ResolverConfig, ResolverOpts};
use mail_auth::{
    AuthenticatedMessage, DkimResult, MessageAuthenticator, Parameters, ResolverCache, Txt,
};
use mailroute_relay::smtp::data::dot_stuff;
use std::time::Instant;
use support::dkim::TxtCache;
use support::{Client, Options, Relay, bounded};

/// Messages that exercise everything a relay tends to break.
fn corpus() -> Vec<Vec<u8>> {
    let long = "y".repeat(998);
    let big_body: String = (0..2000)
        .map(|i| format!("line {i} of a large message, with a tab\there\r\n"))
        .collect();
    vec![
        b"From: a@example.com\r\nTo: b@example.com\r\nSubject: plain\r\n\r\nHello.\r\n".to_vec(),
        b"From: a@example.com\r\nSubject: dots\r\n\r\n.first body line starts with a dot\r\n..two\r\n.\r\n...\r\nend\r\n".to_vec(),
        format!("From: a@example.com\r\nSubject: =?UTF-8?B?w6l0w6k=?=\r\n\tfolded\r\n  twice\r\nX-Long: {long}\r\n\r\n{long}\r\n{long}\r\n").into_bytes(),
        "From: j\u{fc}rgen@b\u{fc}cher.example\r\nSubject: caf\u{e9} \u{1F600}\r\n\r\n\u{e9}t\u{e9} \u{65e5}\u{672c}\u{8a9e} 8-bit body\r\n\r\n\r\n".as_bytes().to_vec(),
        [&b"From: a@example.com\r\nSubject: latin-1 bytes\r\nContent-Type: text/plain; charset=iso-8859-1\r\n\r\n"[..], &[0xe9, 0x74, 0xe9, b'\r', b'\n', 0x01, 0xff, b' ', b' ', b'\t', b'\r', b'\n']].concat(),
        format!("From: a@example.com\r\nSubject: big\r\n\r\n{big_body}").into_bytes(),
        b"From: a@example.com\r\nSubject: empty body\r\n\r\n".to_vec(),
    ]
}

async fn send_data(client: &mut Client, message: &[u8]) -> String {
    assert!(client.command("DATA").await.starts_with("354"));
    let mut wire = Vec::new();
    dot_stuff(message, &mut wire);
    client.send(&wire).await;
    client.reply().await
}

async fn send_bdat(client: &mut Client, message: &[u8], chunk: usize) -> String {
    let chunks: Vec<&[u8]> = message.chunks(chunk.max(1)).collect();
    let mut last_reply = String::new();
    for (i, piece) in chunks.iter().enumerate() {
        let last = i + 1 == chunks.len();
        let header = format!(
            "BDAT {}{}\r\n",
            piece.len(),
            if last { " LAST" } else { "" }
        );
        client.send(&[header.as_bytes(), piece].concat()).await;
        last_reply = client.reply().await;
        assert!(last_reply.starts_with("250"), "chunk {i}: {last_reply}");
    }
    last_reply
}

#[tokio::test]
async fn a_dkim_signed_corpus_passes_byte_identical_and_still_verifies() {
    bounded(60, async {
        let pkcs8 = Ed25519Key::generate_pkcs8().unwrap_or_else(|e| panic!("{e}"));
        let key = Ed25519Key::from_pkcs8_der(&pkcs8).unwrap_or_else(|e| panic!("{e}"));
        use base64::Engine;
        let record = format!(
            "v=DKIM1; k=ed25519; p={}",
            base64::engine::general_purpose::STANDARD.encode(key.public_key())
        );
        let cache = TxtCache::default();
        for name in ["mr._domainkey.example.com.", "mr._domainkey.example.com"] {
            let domain_key = DomainKey::parse(record.as_bytes()).unwrap_or_else(|e| panic!("{e}"));
            cache.insert(name.into(), Txt::from(domain_key), Instant::now());
        }
        let signer = DkimSigner::from_key(key)
            .domain("example.com")
            .selector("mr")
            .headers(["From", "To", "Subject", "X-Long", "Content-Type"])
            .header_canonicalization(Canonicalization::Simple)
            .body_canonicalization(Canonicalization::Simple);
        // NB: a resolver that can only reach loopback: a cache miss fails here, never online.
        let nameserver =
            NameServerConfig::udp_and_tcp("127.0.0.1".parse().unwrap_or_else(|e| panic!("{e}")));
        let authenticator = MessageAuthenticator::new(
            ResolverConfig::from_parts(None, vec![], vec![nameserver]),
            ResolverOpts::default(),
        )
        .unwrap_or_else(|e| panic!("{e}"));

        let relay = Relay::start(Options::default()).await;
        let mut client = Client::connect(relay.smtp).await;
        client.reply().await;
        client.command("EHLO client.test").await;
        let mut sent = Vec::new();
        for (i, message) in corpus().into_iter().enumerate() {
            let signature = signer.sign(&message).unwrap_or_else(|e| panic!("{e}"));
            let signed = [signature.to_header().as_bytes(), &message].concat();
            // One-octet chunks for the small messages; an odd size for the large one.
            let tiny = if signed.len() > 10_000 { 997 } else { 1 };
            for chunking in [None, Some(tiny), Some(7), Some(4096)] {
                assert!(
                    client
                        .command("MAIL FROM:<a@example.com> BODY=8BITMIME SMTPUTF8")
                        .await
                        .starts_with("250")
                );
                assert!(
                    client
                        .command("RCPT TO:<b@example.com>")
                        .await
                        .starts_with("250")
                );
                let reply = match chunking {
                    None => send_data(&mut client, &signed).await,
                    Some(size) => send_bdat(&mut client, &signed, size).await,
                };
                assert!(
                    reply.starts_with("250 2.0.0"),
                    "message {i} {chunking:?}: {reply}"
                );
                sent.push((i, chunking, signed.clone()));
            }
        }
        assert_eq!(relay.capture.count(), sent.len());
        let messages = relay
            .capture
            .messages
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .split_off(0);
        for ((i, chunking, signed), delivered) in sent.iter().zip(messages) {
            assert_eq!(
                &delivered.content[delivered.received_len..],
                signed.as_slice(),
                "message {i} {chunking:?} changed in transit"
            );
            let parsed = AuthenticatedMessage::parse(&delivered.content)
                .unwrap_or_else(|| panic!("message {i} unparsable"));
            let results = authenticator
                .verify_dkim(Parameters::new(&parsed).with_txt_cache(&cache))
                .await;
            assert!(!results.is_empty(), "message {i}: no signature found");
            for r in &results {
                assert_eq!(r.result(), &DkimResult::Pass, "message {i} {chunking:?}");
            }
        }
    })
    .await;
}
