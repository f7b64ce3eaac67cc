//! The route TLS probe against real peers on loopback: Postfix `smtp-sink` (no STARTTLS) and
//! a STARTTLS server with an rcgen certificate. Checks what a user reads in
//! `status.lastProbe` and the `TLSVerified` condition, and that the probe never sends MAIL.

use mailroute_config::{Credentials, Manifests, compile};
use mailroute_operator::controller::probe::probe;
use mailroute_smtp_client::hosts::Resolver;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

/// Compiles one MailRoute `probed` with `spec`, plus a CA bundle Secret when given.
fn route(spec: &str, bundle: Option<&str>) -> (mailroute_config::document::Route, Credentials) {
    let mut yaml = format!(
        "apiVersion: mailroute.io/v1alpha1\nkind: MailRoute\nmetadata: {{name: probed, namespace: mail}}\nspec: {spec}\n"
    );
    if let Some(pem) = bundle {
        let indented: String = pem.lines().map(|l| format!("    {l}\n")).collect();
        yaml.push_str(&format!(
            "---\napiVersion: v1\nkind: Secret\nmetadata: {{name: ca, namespace: mail}}\nstringData:\n  ca.crt: |\n{indented}"
        ));
    }
    let mut manifests = Manifests::default();
    manifests
        .add_yaml(std::path::Path::new("probe.yaml"), &yaml)
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(manifests.problems.is_empty(), "{:?}", manifests.problems);
    let inputs = manifests.namespaces.remove("mail").unwrap_or_default();
    let compiled = compile(&inputs);
    assert!(compiled.problems.is_empty(), "{:?}", compiled.problems);
    let route = compiled.config.routes["probed"].clone();
    (route, compiled.credentials)
}

/// A STARTTLS server presenting a self-signed certificate for 127.0.0.1; records every command.
async fn starttls_server() -> (SocketAddr, String, Arc<Mutex<Vec<String>>>) {
    let generated = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned()])
        .unwrap_or_else(|e| panic!("{e}"));
    let cert_pem = generated.cert.pem();
    let cert = rustls_pki_types::CertificateDer::from(generated.cert.der().to_vec());
    let key = rustls_pki_types::PrivateKeyDer::try_from(generated.signing_key.serialize_der())
        .unwrap_or_else(|e| panic!("{e}"));
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap_or_else(|e| panic!("{e}"))
    .with_no_client_auth()
    .with_single_cert(vec![cert], key)
    .unwrap_or_else(|e| panic!("{e}"));
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let addr = listener.local_addr().unwrap_or_else(|e| panic!("{e}"));
    let seen: Arc<Mutex<Vec<String>>> = Arc::default();
    let log = seen.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, log) = (acceptor.clone(), log.clone());
            tokio::spawn(async move {
                let mut plain = BufReader::new(tcp);
                let _ = plain.get_mut().write_all(b"220 probe.test ESMTP\r\n").await;
                let mut line = String::new();
                loop {
                    line.clear();
                    if plain.read_line(&mut line).await.unwrap_or(0) == 0 {
                        return;
                    }
                    log.lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push(line.trim().to_owned());
                    let upper = line.to_ascii_uppercase();
                    if upper.starts_with("EHLO") {
                        let _ = plain
                            .get_mut()
                            .write_all(b"250-probe.test\r\n250 STARTTLS\r\n")
                            .await;
                    } else if upper.starts_with("STARTTLS") {
                        let _ = plain.get_mut().write_all(b"220 go ahead\r\n").await;
                        break;
                    } else {
                        let _ = plain.get_mut().write_all(b"503 not now\r\n").await;
                    }
                }
                let Ok(tls) = acceptor.accept(plain.into_inner()).await else {
                    return;
                };
                let mut tls = BufReader::new(tls);
                loop {
                    line.clear();
                    if tls.read_line(&mut line).await.unwrap_or(0) == 0 {
                        return;
                    }
                    log.lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push(line.trim().to_owned());
                    let upper = line.to_ascii_uppercase();
                    let reply: &[u8] = if upper.starts_with("EHLO") {
                        b"250 probe.test\r\n"
                    } else if upper.starts_with("QUIT") {
                        b"221 bye\r\n"
                    } else {
                        b"250 ok\r\n"
                    };
                    let _ = tls.get_mut().write_all(reply).await;
                    if upper.starts_with("QUIT") {
                        return;
                    }
                }
            });
        }
    });
    (addr, cert_pem, seen)
}

fn resolver() -> Resolver {
    Resolver::new(None).unwrap_or_else(|e| panic!("{e}"))
}

const NOW: &str = "2026-11-22T12:00:00Z";

#[tokio::test]
async fn a_self_signed_certificate_fails_a_required_route_and_passes_with_its_ca_bundle() {
    let (addr, pem, seen) = starttls_server().await;
    let spec = format!(
        "{{host: 127.0.0.1, port: {}, tls: {{mode: Required}}}}",
        addr.port()
    );
    let (strict, credentials) = route(&spec, None);
    let p = probe(
        "probed",
        &strict,
        &credentials,
        &resolver(),
        "relay.test",
        NOW,
    )
    .await;
    assert_eq!((p.status, p.reason), ("False", "HandshakeFailed"), "{p:?}");
    assert!(p.result.error.is_some());

    let spec = format!(
        "{{host: 127.0.0.1, port: {}, tls: {{mode: Required, caBundleSecretRef: {{name: ca, key: ca.crt}}}}}}",
        addr.port()
    );
    let (trusted, credentials) = route(&spec, Some(&pem));
    let p = probe(
        "probed",
        &trusted,
        &credentials,
        &resolver(),
        "relay.test",
        NOW,
    )
    .await;
    assert_eq!((p.status, p.reason), ("True", "Verified"), "{p:?}");
    assert_eq!(p.result.tls_version.as_deref(), Some("TLSv1.3"));
    assert!(
        p.result
            .certificate_subject
            .as_deref()
            .is_some_and(|s| s.contains("rcgen")),
        "{p:?}"
    );
    assert!(p.result.certificate_not_after.is_some());
    let expiry = p.certificate_expiry().unwrap_or_default();
    assert!(expiry > 1_700_000_000, "{expiry}");
    assert!(
        p.result
            .target
            .as_deref()
            .is_some_and(|t| t.contains(&addr.to_string()))
    );
    let condition = p.condition(Some(3), &[], NOW);
    assert_eq!(condition.type_, "TLSVerified");
    assert!(
        condition.message.starts_with("TLSv1.3 with "),
        "{}",
        condition.message
    );

    let commands = seen.lock().unwrap_or_else(|e| e.into_inner()).clone();
    assert!(commands.iter().any(|c| c == "QUIT"), "{commands:?}");
    assert!(
        !commands
            .iter()
            .any(|c| c.to_ascii_uppercase().starts_with("MAIL")
                || c.to_ascii_uppercase().starts_with("AUTH")),
        "the probe never sends mail or credentials: {commands:?}"
    );
}

#[tokio::test]
async fn a_server_without_starttls_is_reported_as_such() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| panic!("{e}"));
    let mut sink = std::process::Command::new("smtp-sink")
        .args(["-u", "root", &format!("127.0.0.1:{port}"), "10"])
        .spawn()
        .unwrap_or_else(|e| panic!("smtp-sink (Debian package postfix): {e}"));
    for _ in 0..200 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (opportunistic, credentials) = route(&format!("{{host: 127.0.0.1, port: {port}}}"), None);
    let p = probe(
        "probed",
        &opportunistic,
        &credentials,
        &resolver(),
        "relay.test",
        NOW,
    )
    .await;
    let _ = sink.kill();
    let _ = sink.wait();
    assert_eq!(
        (p.status, p.reason),
        ("False", "STARTTLSNotOffered"),
        "{p:?}"
    );

    let (disabled, credentials) = route("{host: 127.0.0.1, tls: {mode: Disabled}}", None);
    let p = probe(
        "probed",
        &disabled,
        &credentials,
        &resolver(),
        "relay.test",
        NOW,
    )
    .await;
    assert_eq!((p.status, p.reason), ("Unknown", "TLSDisabled"));
}
