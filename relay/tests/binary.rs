//! The real `mailroute-relay` binary: admin endpoints, a message delivered to an smtp-sink
//! upstream, and SIGTERM.

mod support;

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::sink::free_port;

use support::http_get;

fn wait_for(addr: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(addr).is_err() {
        assert!(Instant::now() < deadline, "{addr} never listened");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn the_relay_binary_serves_smtp_and_admin_and_stops_cleanly_on_sigterm() {
    let smtp: SocketAddr = ([127, 0, 0, 1], free_port()).into();
    let admin: SocketAddr = ([127, 0, 0, 1], free_port()).into();
    let sink = support::sink::Sink::start();
    let manifests = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    std::fs::write(
        manifests.path().join("relay.yaml"),
        format!(
            r#"
apiVersion: mailroute.io/v1alpha1
kind: MailRoute
metadata: {{name: mailbox, namespace: mail}}
spec: {{host: {}, port: {}, tls: {{mode: Opportunistic}}}}
---
apiVersion: mailroute.io/v1alpha1
kind: RelayPolicy
metadata: {{name: example, namespace: mail}}
spec: {{domains: [example.com], licenses: 1, inboundRoute: mailbox}}
"#,
            sink.addr.ip(),
            sink.addr.port()
        ),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let examples = manifests.path().to_str().unwrap_or_default();
    let mut child = Command::new(env!("CARGO_BIN_EXE_mailroute-relay"))
        .args([
            "--manifests",
            examples,
            "--hostname",
            "relay.test",
            "--shutdown-grace",
            "5",
        ])
        .args(["--smtp", &smtp.to_string(), "--admin", &admin.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("{e}"));
    wait_for(smtp);
    wait_for(admin);

    assert_eq!(http_get(admin, "/healthz").0, 200);
    assert_eq!(http_get(admin, "/readyz").0, 200);

    let stream = TcpStream::connect(smtp).unwrap_or_else(|e| panic!("{e}"));
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap_or_else(|e| panic!("{e}"));
    let mut writer = stream.try_clone().unwrap_or_else(|e| panic!("{e}"));
    let mut reader = BufReader::new(stream);
    let mut reply = || {
        let mut all = String::new();
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                return all;
            }
            all.push_str(&line);
            if line.as_bytes().get(3) == Some(&b' ') {
                return all;
            }
        }
    };
    assert!(reply().starts_with("220 relay.test ESMTP"));
    for (command, expected) in [
        ("EHLO client.test\r\n", "250"),
        ("MAIL FROM:<a@example.com>\r\n", "250"),
        ("RCPT TO:<alice@example.com>\r\n", "250"),
        ("DATA\r\n", "354"),
        (
            "Subject: through the binary\r\n\r\nbody\r\n.\r\n",
            "250 2.0.0",
        ),
    ] {
        writer
            .write_all(command.as_bytes())
            .unwrap_or_else(|e| panic!("{e}"));
        let got = reply();
        assert!(got.starts_with(expected), "{command:?}: {got}");
    }

    assert_eq!(sink.wait_count("Subject: through the binary\n", 1), 1);
    let (status, metrics) = http_get(admin, "/metrics");
    assert_eq!(status, 200);
    for name in [
        "mailroute_relay_sessions_active 1",
        "mailroute_relay_bytes_received_total",
        "mailroute_relay_config_generation 1",
    ] {
        assert!(metrics.contains(name), "{name} missing in {metrics}");
    }

    let pid = child.id().to_string();
    let killed = Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(killed.success());
    // The idle session is told 421 4.3.2 at once.
    assert!(reply().starts_with("421 4.3.2"));
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(status) = child.try_wait().unwrap_or_else(|e| panic!("{e}")) {
            assert!(status.success(), "exit status {status}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the relay did not exit after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        TcpStream::connect(smtp).is_err(),
        "still listening after exit"
    );
}

#[test]
fn the_relay_binary_authenticates_tenant_accounts_from_the_credentials_secret() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let generated = rcgen::generate_simple_self_signed(vec!["relay.test".to_owned()])
        .unwrap_or_else(|e| panic!("{e}"));
    let (cert, key) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
    std::fs::write(&cert, generated.cert.pem()).unwrap_or_else(|e| panic!("{e}"));
    std::fs::write(&key, generated.signing_key.serialize_pem()).unwrap_or_else(|e| panic!("{e}"));
    let submission: SocketAddr = ([127, 0, 0, 1], free_port()).into();
    let examples = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/application-relay");
    let mut child = Command::new(env!("CARGO_BIN_EXE_mailroute-relay"))
        .args(["--manifests", examples, "--hostname", "relay.test"])
        .args(["--submission", &submission.to_string()])
        .arg("--tls-cert")
        .arg(&cert)
        .arg("--tls-key")
        .arg(&key)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("{e}"));
    wait_for(submission);
    let swaks = |user: &str, password: &str| {
        Command::new("swaks")
            .args([
                "--server",
                &submission.to_string(),
                "--tls",
                "--quit-after",
                "AUTH",
                "--timeout",
                "10",
            ])
            .args([
                "--auth",
                "PLAIN",
                "--auth-user",
                user,
                "--auth-password",
                password,
            ])
            .output()
            .unwrap_or_else(|e| panic!("swaks is needed (scripts/test installs it): {e}"))
    };
    // argon2id and bcrypt hashes from examples/application-relay's Secret.
    let argon = swaks("ticketing", "ticketing-example-password");
    let bcrypt = swaks("billing", "billing-example-password");
    let wrong = swaks("billing", "ticketing-example-password");
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        argon.status.success(),
        "{}",
        String::from_utf8_lossy(&argon.stdout)
    );
    assert!(
        bcrypt.status.success(),
        "{}",
        String::from_utf8_lossy(&bcrypt.stdout)
    );
    assert!(!wrong.status.success());
    assert!(String::from_utf8_lossy(&wrong.stdout).contains("535 5.7.8"));
}

#[test]
fn a_loop_key_too_short_or_a_store_not_understood_stops_the_start_with_a_clear_message() {
    let manifests = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    std::fs::write(
        manifests.path().join("relay.yaml"),
        "apiVersion: mailroute.io/v1alpha1\nkind: RelayPolicy\nmetadata: {name: example, namespace: mail}\nspec: {domains: [example.com], licenses: 1}\n",
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let key = manifests.path().join("loop.key");
    std::fs::write(&key, "short\n").unwrap_or_else(|e| panic!("{e}"));
    let smtp = format!("127.0.0.1:{}", free_port());
    let run = |extra: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_mailroute-relay"))
            .arg("--manifests")
            .arg(manifests.path())
            .args(["--smtp", &smtp])
            .args(extra)
            .output()
            .unwrap_or_else(|e| panic!("{e}"));
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, stderr) = run(&["--loop-key-file", key.to_str().unwrap_or_default()]);
    assert!(!ok, "started with a 5-octet loop key");
    assert!(stderr.contains("at least 16 octets"), "{stderr}");
    let (ok, stderr) = run(&["--store", "mysql://db"]);
    assert!(!ok, "started with an unknown store");
    assert!(stderr.contains("redis[s]-sentinel://HOST:PORT"), "{stderr}");
}
