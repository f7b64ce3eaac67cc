//! swaks, a real SMTP client, against the relay: AUTH over STARTTLS and over implicit TLS,
//! and no AUTH in clear.

mod support;

use std::process::Command;
use support::{Options, Relay, bounded};

/// Runs swaks against `port` with AUTH as app/secret (when `mechanism` is given) and `extra`
/// arguments; returns (success, transcript).
async fn swaks_auth(port: u16, mechanism: Option<&str>, extra: &[&str]) -> (bool, String) {
    let mut args = vec!["--server".to_owned(), format!("127.0.0.1:{port}")];
    if let Some(mechanism) = mechanism {
        for a in [
            "--auth",
            mechanism,
            "--auth-user",
            "app",
            "--auth-password",
            "secret",
        ] {
            args.push(a.to_owned());
        }
    }
    args.extend(extra.iter().map(|a| (*a).to_owned()));
    swaks(args).await
}

/// Runs swaks with `args`; returns (success, transcript).
async fn swaks(args: Vec<String>) -> (bool, String) {
    let output = tokio::task::spawn_blocking(move || {
        Command::new("swaks")
            .args([
                "--timeout",
                "10",
                "--ehlo",
                "client.test",
                "--from",
                "a@example.com",
                "--to",
                "b@example.com",
            ])
            .args(&args)
            .output()
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"))
    .unwrap_or_else(|e| panic!("swaks is needed for this test (scripts/test installs it): {e}"));
    let transcript = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), transcript)
}

#[tokio::test]
async fn swaks_authenticates_over_starttls_and_over_implicit_tls() {
    bounded(60, async {
        let relay = Relay::start(Options::default()).await;
        let (ok, transcript) = swaks_auth(
            relay.submission.port(),
            Some("PLAIN"),
            &["--tls", "--header", "Subject: swaks over STARTTLS"],
        )
        .await;
        assert!(ok, "{transcript}");
        assert!(transcript.contains("235 2.7.0"), "{transcript}");

        let (ok, transcript) = swaks_auth(
            relay.smtps.port(),
            Some("LOGIN"),
            &[
                "--tls-on-connect",
                "--header",
                "Subject: swaks over implicit TLS",
            ],
        )
        .await;
        assert!(ok, "{transcript}");
        assert_eq!(relay.capture.count(), 2);
        let second = String::from_utf8_lossy(&relay.capture.body(1)).into_owned();
        assert!(
            second.contains("Subject: swaks over implicit TLS"),
            "{second}"
        );
    })
    .await;
}

#[tokio::test]
async fn swaks_cannot_authenticate_in_clear() {
    bounded(60, async {
        let relay = Relay::start(Options::default()).await;
        let (ok, transcript) = swaks_auth(relay.submission.port(), Some("PLAIN"), &[]).await;
        assert!(!ok, "{transcript}");
        assert!(!transcript.contains("235 "), "{transcript}");
        assert_eq!(relay.capture.count(), 0);
    })
    .await;
}
