//! A Trial tenant's load (SPEC 3.4, 5.3a): 50 recipients per 10 minutes, bound by its IP range
//! (127.0.0.0/16), sending as an address that is not a registered user (so the tenant limits
//! apply to it), to external recipients; one message per client; relay processes on a
//! manifests directory.

use super::Client;
use super::sink::free_port;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const PEAK: usize = 50;

pub fn trial(sink: SocketAddr, extra: &str) -> String {
    tenant(
        sink,
        "",
        &format!("  licenses: 1\n  tier: Trial\n  users: [alice@example.com]\n{extra}"),
    )
}

/// Route `out` to `sink` (with `route` lines) and tenant `example` bound by 127.0.0.0/16,
/// sending out through it (with `policy` lines: at least its licenses).
pub fn tenant(sink: SocketAddr, route: &str, policy: &str) -> String {
    format!(
        r#"
apiVersion: mailroute.io/v1alpha1
kind: MailRoute
metadata: {{name: out, namespace: mail}}
spec:
  host: {}
  port: {}
  tls: {{mode: Disabled}}
  connectionPool: {{maxConnections: 20}}
{route}
---
apiVersion: mailroute.io/v1alpha1
kind: RelayPolicy
metadata: {{name: example, namespace: mail}}
spec:
  domains: [example.com]
  authentication: {{ipRanges: [{{cidr: 127.0.0.0/16}}]}}
  outboundRoute: out
{policy}
"#,
        sink.ip(),
        sink.port()
    )
}

/// What happened to one client's message.
#[derive(Debug, PartialEq, Eq)]
pub enum Fate {
    /// RCPT and the message accepted.
    Accepted,
    /// RCPT refused with this reply.
    Refused(String),
    /// RCPT accepted, the message not (its reservation was released).
    Failed(String),
}

pub async fn one_message(relay: SocketAddr, from: &str, to: &str) -> Fate {
    let mut c = Client::connect(relay).await;
    c.reply().await;
    c.command("EHLO app.example.com").await;
    let mail = c.command(&format!("MAIL FROM:<{from}>")).await;
    assert!(mail.starts_with("250"), "{mail}");
    let rcpt = c.command(&format!("RCPT TO:<{to}>")).await;
    if !rcpt.starts_with("250") {
        let _ = c.command("QUIT").await;
        return Fate::Refused(rcpt);
    }
    assert!(c.command("DATA").await.starts_with("354"));
    c.send(format!("Subject: quota {to}\r\n\r\nbody\r\n.\r\n").as_bytes())
        .await;
    let end = c.reply().await;
    let _ = c.command("QUIT").await;
    if end.starts_with("250") {
        Fate::Accepted
    } else {
        Fate::Failed(end)
    }
}

/// `clients` concurrent clients, one recipient each, spread over `relays`.
pub async fn burst(relays: &[SocketAddr], clients: usize) -> Vec<Fate> {
    let tasks: Vec<_> = (0..clients)
        .map(|i| {
            let relay = relays[i % relays.len()];
            tokio::spawn(async move {
                one_message(relay, "app@example.com", &format!("r{i}@partner.example")).await
            })
        })
        .collect();
    let mut fates = Vec::new();
    for t in tasks {
        fates.push(t.await.unwrap_or_else(|e| panic!("{e}")));
    }
    fates
}

/// Checks the exactness bound and returns (accepted, refused, failed).
pub fn tally(fates: &[Fate], limit: usize) -> (usize, usize, usize) {
    let accepted = fates.iter().filter(|f| **f == Fate::Accepted).count();
    let failed = fates
        .iter()
        .filter(|f| matches!(f, Fate::Failed(_)))
        .count();
    let refused: Vec<&String> = fates
        .iter()
        .filter_map(|f| match f {
            Fate::Refused(r) => Some(r),
            _ => None,
        })
        .collect();
    for r in &refused {
        assert!(
            r.starts_with("450 4.2.1 Peak SMTP relay limit exceeded for customer"),
            "{r}"
        );
    }
    // Never above the limit; below it only by reservations released after a failure.
    assert!(accepted <= limit, "{accepted} accepted, limit {limit}");
    assert!(
        accepted + failed >= limit,
        "{accepted} accepted + {failed} failed < {limit}"
    );
    (accepted, refused.len(), failed)
}

/// A relay process on `manifests`, with extra flags; stopped on drop.
pub struct RelayProcess {
    child: Child,
    pub smtp: SocketAddr,
}

impl RelayProcess {
    pub fn start(manifests: &std::path::Path, args: &[&str]) -> Self {
        let smtp: SocketAddr = ([127, 0, 0, 1], free_port()).into();
        let child = Command::new(env!("CARGO_BIN_EXE_mailroute-relay"))
            .args(["--manifests", manifests.to_str().unwrap_or_default()])
            .args(["--hostname", "relay.test", "--smtp", &smtp.to_string()])
            // NB: every test client comes from 127.0.0.1.
            .args(["--max-sessions-per-ip", "1000"])
            .args(args)
            .stdout(Stdio::null())
            // NB: MAILROUTE_TEST_RELAY_LOGS=1 shows the relays' logs when a test fails.
            .stderr(if std::env::var_os("MAILROUTE_TEST_RELAY_LOGS").is_some() {
                Stdio::inherit()
            } else {
                Stdio::null()
            })
            .spawn()
            .unwrap_or_else(|e| panic!("{e}"));
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(smtp).is_err() {
            assert!(Instant::now() < deadline, "relay never listened");
            std::thread::sleep(Duration::from_millis(20));
        }
        Self { child, smtp }
    }

    /// SIGKILL: nothing is released, nothing is flushed.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for RelayProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

pub fn manifests(yaml: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    std::fs::write(dir.path().join("relay.yaml"), yaml).unwrap_or_else(|e| panic!("{e}"));
    dir
}
