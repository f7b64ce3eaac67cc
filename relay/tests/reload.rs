//! Configuration reloads with the real binary (`--manifests DIR`, watched): a change is
//! enforced quickly (measured), an invalid one is refused and counted while the previous one
//! stays in force, and hundreds of sessions sending through many reloads lose nothing.

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use support::sink::{Sink, free_port};
use support::{Client, bounded};

struct RelayProcess {
    child: Child,
    smtp: SocketAddr,
    admin: SocketAddr,
}

impl RelayProcess {
    fn start(dir: &Path) -> Self {
        Self::start_with(&["--manifests", dir.to_str().unwrap_or_default()])
    }

    fn start_with(source: &[&str]) -> Self {
        let smtp: SocketAddr = ([127, 0, 0, 1], free_port()).into();
        let admin: SocketAddr = ([127, 0, 0, 1], free_port()).into();
        let child = Command::new(env!("CARGO_BIN_EXE_mailroute-relay"))
            .args(source)
            .args(["--hostname", "relay.test", "--watch-interval-ms", "100"])
            // NB: every test client comes from 127.0.0.1.
            .args(["--max-sessions-per-ip", "1000"])
            .args(["--smtp", &smtp.to_string(), "--admin", &admin.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("{e}"));
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(smtp).is_err() {
            assert!(Instant::now() < deadline, "relay never listened");
            std::thread::sleep(Duration::from_millis(20));
        }
        Self { child, smtp, admin }
    }

    fn metrics(&self) -> String {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(self.admin).unwrap_or_else(|e| panic!("{e}"));
        let _ = write!(s, "GET /metrics HTTP/1.0\r\n\r\n");
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out
    }
}

impl Drop for RelayProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn route(name: &str, sink: SocketAddr) -> String {
    format!(
        "apiVersion: mailroute.io/v1alpha1\nkind: MailRoute\nmetadata: {{name: {name}, namespace: mail}}\nspec: {{host: {}, port: {}, tls: {{mode: Disabled}}}}\n",
        sink.ip(),
        sink.port()
    )
}

fn policy(inbound: &str) -> String {
    format!(
        "apiVersion: mailroute.io/v1alpha1\nkind: RelayPolicy\nmetadata: {{name: example, namespace: mail}}\nspec: {{domains: [example.com], licenses: 10, inboundRoute: {inbound}}}\n"
    )
}

/// A rule refusing `probe@example.com` at RCPT.
const BLOCK: &str = "apiVersion: mailroute.io/v1alpha1\nkind: RoutingRule\nmetadata: {name: block, namespace: mail}\nspec:\n  policyRef: example\n  priority: 1\n  messages: [Inbound]\n  envelopeFilter: {recipients: [{address: probe@example.com}]}\n  actions: {reject: {code: 550, enhancedCode: \"5.7.1\", text: blocked by rule}}\n";

/// Writes a file the way an editor or kubelet would: a new file renamed over the old one.
fn write(dir: &Path, name: &str, content: &str) {
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, content).unwrap_or_else(|e| panic!("{e}"));
    std::fs::rename(&tmp, dir.join(name)).unwrap_or_else(|e| panic!("{e}"));
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_on_disk_is_enforced_fast_and_an_invalid_one_is_refused() {
    bounded(120, async {
        let sink = Sink::start();
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        write(dir.path(), "route.yaml", &route("mailbox", sink.addr));
        write(dir.path(), "policy.yaml", &policy("mailbox"));
        let relay = RelayProcess::start(dir.path());

        // A session kept open picks up each generation between transactions; a refused
        // RCPT counts towards its error limit, so it is renewed every few probes.
        let smtp = relay.smtp;
        let mut session: Option<(Client, usize)> = None;
        let mut probe = async || {
            if session.as_ref().is_none_or(|(_, n)| *n >= 5) {
                let mut c = Client::connect(smtp).await;
                c.reply().await;
                c.command("EHLO client.test").await;
                session = Some((c, 0));
            }
            let Some((c, n)) = session.as_mut() else {
                unreachable!()
            };
            *n += 1;
            c.command("MAIL FROM:<someone@partner.example>").await;
            let r = c.command("RCPT TO:<probe@example.com>").await;
            c.command("RSET").await;
            r
        };
        assert!(probe().await.starts_with("250"));
        let mut delays = Vec::new();
        for i in 0..20 {
            let blocked = i % 2 == 0;
            let changed = Instant::now();
            if blocked {
                write(dir.path(), "rule.yaml", BLOCK);
            } else {
                std::fs::remove_file(dir.path().join("rule.yaml")).unwrap_or_else(|e| panic!("{e}"));
            }
            loop {
                let r = probe().await;
                if r.starts_with("550") == blocked {
                    delays.push(changed.elapsed());
                    break;
                }
                assert!(changed.elapsed() < Duration::from_secs(10), "change {i} never enforced");
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
        delays.sort();
        let (p50, p99) = (percentile(&delays, 0.5), percentile(&delays, 0.99));
        println!("manifest change to enforcement over 20 changes (watch interval 100 ms): p50 {p50:?}, p99 {p99:?}");
        assert!(p99 < Duration::from_secs(2), "p99 {p99:?}");
        let metrics = relay.metrics();
        assert!(metrics.contains("mailroute_relay_config_reloads_total{result=\"success\"} 20"), "{metrics}");
        assert!(metrics.contains("mailroute_relay_config_generation 21"), "{metrics}");

        // A rule naming a route that does not exist: refused, counted, previous stays.
        write(dir.path(), "rule.yaml", &BLOCK.replace("reject: {code: 550, enhancedCode: \"5.7.1\", text: blocked by rule}", "route: nowhere"));
        let deadline = Instant::now() + Duration::from_secs(5);
        while !relay.metrics().contains("mailroute_relay_config_reloads_total{result=\"error\"} 1") {
            assert!(Instant::now() < deadline, "the invalid change was never seen");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(probe().await.starts_with("250"), "the previous configuration is in force");
        assert!(relay.metrics().contains("mailroute_relay_config_generation 21"));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_under_load_lose_nothing_through_many_reloads() {
    bounded(180, async {
        let (a, b) = (Sink::start(), Sink::start());
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        write(dir.path(), "route-a.yaml", &route("a", a.addr));
        write(dir.path(), "policy.yaml", &policy("a"));
        let relay = RelayProcess::start(dir.path());

        const CLIENTS: usize = 200;
        const MESSAGES: usize = 8;
        let clients: Vec<_> = (0..CLIENTS)
            .map(|i| {
                let addr = relay.smtp;
                tokio::spawn(async move {
                    let mut c = Client::connect(addr).await;
                    c.reply().await;
                    c.command("EHLO client.test").await;
                    let mut replies = Vec::new();
                    for m in 0..MESSAGES {
                        c.command("MAIL FROM:<someone@partner.example>").await;
                        c.command("RCPT TO:<alice@example.com>").await;
                        c.command("DATA").await;
                        c.send(format!("Subject: load-{i}-{m}\r\n\r\nx\r\n.\r\n").as_bytes()).await;
                        replies.push(c.reply().await);
                        tokio::time::sleep(Duration::from_millis(700 + (i as u64 % 7) * 30)).await;
                    }
                    let _ = c.command("QUIT").await;
                    replies
                })
            })
            .collect();
        // Meanwhile: valid and invalid configurations alternately, and a two-file change
        // (a new route, then the policy pointing at it) written one file at a time.
        let mut flips = 0;
        let writer = async {
            for i in 0..30 {
                match i % 3 {
                    0 => write(dir.path(), "broken.yaml", "apiVersion: mailroute.io/v1alpha1\nkind: MailRoute\nmetadata: {name: broken, namespace: mail}\nspec: {port: 7}\n"),
                    1 => std::fs::remove_file(dir.path().join("broken.yaml")).unwrap_or_else(|e| panic!("{e}")),
                    _ => {
                        let (name, sink) = if flips % 2 == 0 { ("b", b.addr) } else { ("a", a.addr) };
                        write(dir.path(), &format!("route-{name}.yaml"), &route(name, sink));
                        tokio::time::sleep(Duration::from_millis(150)).await;
                        write(dir.path(), "policy.yaml", &policy(name));
                        flips += 1;
                    }
                }
                tokio::time::sleep(Duration::from_millis(150)).await;
            }
        };
        writer.await;
        let mut accepted = 0;
        for task in clients {
            for reply in task.await.unwrap_or_else(|e| panic!("{e}")) {
                assert!(reply.starts_with("250"), "{reply}");
                accepted += 1;
            }
        }
        assert_eq!(accepted, CLIENTS * MESSAGES);
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut total = 0;
        while Instant::now() < deadline {
            total = a.count("Subject: load-") + b.count("Subject: load-");
            if total >= accepted {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(total, accepted, "every accepted message on exactly one sink");
        assert!(a.count("Subject: load-") > 0 && b.count("Subject: load-") > 0, "both generations served");
        let metrics = relay.metrics();
        assert!(metrics.contains("mailroute_relay_config_reloads_total{result=\"error\"}"), "{metrics}");
    })
    .await;
}

/// The operator's split document in a projected volume (`--config DIR`): parts of a new
/// generation arrive one at a time; the relay keeps the previous generation until every part
/// of the new one is there (a mix fails the content hash, a partial set is incomplete).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_split_document_switches_only_when_every_part_is_there() {
    bounded(60, async {
        use mailroute_config::parts::{part_key, split};
        let sink = Sink::start();
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let document = |generation: u64, extra: &str| {
            let yaml = format!(
                "{}---\n{}{extra}",
                route("mailbox", sink.addr),
                policy("mailbox")
            );
            let compiled = support::compile_yaml(&yaml);
            serde_json::to_string(&compiled.document(generation)).unwrap_or_default()
        };
        let write_parts = |json: &str, which: &[usize]| {
            let parts = split(json, json.len() / 3 + 1);
            assert_eq!(parts.len(), 3);
            for i in which {
                write(dir.path(), &part_key(*i, 3), parts[*i]);
            }
        };
        write_parts(&document(1, ""), &[0, 1, 2]);
        let relay =
            RelayProcess::start_with(&["--config", dir.path().to_str().unwrap_or_default()]);
        assert!(
            relay
                .metrics()
                .contains("mailroute_relay_config_generation 1")
        );

        let next = document(2, &format!("---\n{BLOCK}"));
        for (written, i) in [0usize, 1].iter().enumerate() {
            write_parts(&next, &[*i]);
            tokio::time::sleep(Duration::from_millis(400)).await;
            let m = relay.metrics();
            assert!(
                m.contains("mailroute_relay_config_generation 1"),
                "after {} part(s): {m}",
                written + 1
            );
        }
        let m = relay.metrics();
        assert!(
            m.contains("mailroute_relay_config_reloads_total{result=\"error\"}"),
            "{m}"
        );
        write_parts(&next, &[2]);
        let deadline = Instant::now() + Duration::from_secs(5);
        while !relay
            .metrics()
            .contains("mailroute_relay_config_generation 2")
        {
            assert!(
                Instant::now() < deadline,
                "the complete generation was never put in force"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
}

/// A tenant whose clients must authenticate, with one account `app`.
fn accounts(sink: SocketAddr, password: &str) -> String {
    format!(
        "{}---\napiVersion: mailroute.io/v1alpha1\nkind: RelayPolicy\nmetadata: {{name: example, namespace: mail}}\nspec:\n  domains: [example.com]\n  licenses: 10\n  inboundRoute: mailbox\n  authentication: {{requireSMTPAuth: true, credentialsSecretRef: {{name: accounts}}}}\n---\napiVersion: v1\nkind: Secret\nmetadata: {{name: accounts, namespace: mail}}\nstringData: {{app: {password}}}\n",
        route("mailbox", sink)
    )
}

/// A relay reading `source` (`--manifests` or `--config`) from `dir`, with an smtps listener.
fn start_with_smtps(
    source: &str,
    dir: &Path,
    certs: &support::CertFiles,
    smtps: SocketAddr,
) -> RelayProcess {
    RelayProcess::start_with(&[
        source,
        dir.to_str().unwrap_or_default(),
        "--tls-cert",
        certs.cert.to_str().unwrap_or_default(),
        "--tls-key",
        certs.key.to_str().unwrap_or_default(),
        "--smtps",
        &smtps.to_string(),
    ])
}

/// `AUTH PLAIN` as `app` over implicit TLS; the reply.
async fn auth(smtps: SocketAddr, cert_pem: &str, password: &str) -> String {
    use base64::Engine;
    let mut c = Client::connect_tls(smtps, cert_pem).await;
    c.reply().await;
    c.command("EHLO client.test").await;
    let token = base64::engine::general_purpose::STANDARD.encode(format!("\0app\0{password}"));
    c.command(&format!("AUTH PLAIN {token}")).await
}

/// Rotates `app`'s password with `rotate` and checks: the new one works within a second of the
/// change being visible, the old one is refused, and a session open meanwhile is not dropped.
async fn rotation_is_in_force_within_a_second(
    relay: &RelayProcess,
    smtps: SocketAddr,
    cert_pem: &str,
    rotate: impl FnOnce(),
) {
    assert!(auth(smtps, cert_pem, "old-secret").await.starts_with("235"));
    let mut open = Client::connect_tls(smtps, cert_pem).await;
    open.reply().await;
    assert!(open.command("EHLO open.test").await.starts_with("250"));
    rotate();
    let changed = Instant::now();
    let reloaded = "mailroute_relay_config_reloads_total{result=\"success\"} 1";
    while !relay.metrics().contains(reloaded) {
        assert!(
            changed.elapsed() < Duration::from_secs(1),
            "not in force within a second"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    println!("password rotation in force after {:?}", changed.elapsed());
    assert!(auth(smtps, cert_pem, "new-secret").await.starts_with("235"));
    assert!(
        auth(smtps, cert_pem, "old-secret").await.starts_with("535"),
        "the old password still works"
    );
    assert!(
        open.command("NOOP").await.starts_with("250"),
        "the open session was dropped"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_password_rotated_in_the_manifests_is_in_force_at_once() {
    bounded(60, async {
        let sink = Sink::start();
        let certs = support::cert_files(&["relay.test"]);
        let smtps: SocketAddr = ([127, 0, 0, 1], free_port()).into();
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        write(dir.path(), "all.yaml", &accounts(sink.addr, "old-secret"));
        let relay = start_with_smtps("--manifests", dir.path(), &certs, smtps);
        rotation_is_in_force_within_a_second(&relay, smtps, &certs.cert_pem, || {
            write(dir.path(), "all.yaml", &accounts(sink.addr, "new-secret"));
        })
        .await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_password_rotated_in_the_credentials_of_a_compiled_document_is_in_force_at_once() {
    bounded(60, async {
        let sink = Sink::start();
        let certs = support::cert_files(&["relay.test"]);
        let smtps: SocketAddr = ([127, 0, 0, 1], free_port()).into();
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let compiled = support::compile_yaml(&accounts(sink.addr, "old-secret"));
        let json = serde_json::to_string(&compiled.document(1)).unwrap_or_default();
        write(dir.path(), "config.json", &json);
        let credentials = |password: &str| {
            serde_json::json!({"tenants": {"example": {"app": password}}}).to_string()
        };
        write(dir.path(), "credentials.json", &credentials("old-secret"));
        let relay = start_with_smtps("--config", dir.path(), &certs, smtps);
        // Only the Secret changes: the document (and its hash) stay the same.
        rotation_is_in_force_within_a_second(&relay, smtps, &certs.cert_pem, || {
            write(dir.path(), "credentials.json", &credentials("new-secret"));
        })
        .await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_mailroute_object_is_refused_and_the_tenant_keeps_working() {
    bounded(60, async {
        let sink = Sink::start();
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        write(dir.path(), "route.yaml", &route("mailbox", sink.addr));
        write(dir.path(), "policy.yaml", &policy("mailbox"));
        let relay = RelayProcess::start(dir.path());
        let send = || async {
            support::send_message(
                relay.smtp,
                "a@partner.example",
                &["bob@example.com"],
                "Subject: t\r\n\r\nx\r\n",
            )
            .await
        };
        assert!(send().await.starts_with("250"));
        // A typo in the kind, then in the apiVersion, then a file cut off mid-write.
        let policy_text = policy("mailbox");
        let broken = [
            policy_text.replace("kind: RelayPolicy", "kind: RelayPolcy"),
            policy_text.replace("mailroute.io/v1alpha1", "mailroute.io/v1alpha"),
            policy_text[..policy_text.len() / 2].to_owned(),
        ];
        for (i, text) in broken.iter().enumerate() {
            write(dir.path(), "policy.yaml", text);
            let deadline = Instant::now() + Duration::from_secs(5);
            let want = format!(
                "mailroute_relay_config_reloads_total{{result=\"error\"}} {}",
                i + 1
            );
            while !relay.metrics().contains(&want) {
                assert!(
                    Instant::now() < deadline,
                    "change {i} was not refused: {}",
                    relay.metrics()
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            assert!(
                send().await.starts_with("250"),
                "the tenant stopped working after change {i}"
            );
        }
        assert!(!relay.metrics().contains("result=\"success\""));
    })
    .await;
}
