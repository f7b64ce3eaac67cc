//! A relay server on loopback for tests: real sockets, real TLS (rcgen), a capturing delivery.

#![allow(dead_code)]

pub mod dkim;
pub mod dns;
pub mod haproxy;
pub mod issuer;
pub mod kube_api;
pub mod mta;
pub mod mta_sts;
pub mod oauth;
pub mod redis;
pub mod scripted;
pub mod sink;
pub mod trial;

use mailroute_relay::auth::throttle::{AuthThrottle, ThrottleConfig};
use mailroute_relay::interfaces::{AuthCheck, Authenticator, BoxFuture, Deliver, Transaction};
use mailroute_relay::metrics::Metrics;
use mailroute_relay::reply::Reply;
use mailroute_relay::server::tls::CertificateStore;
use mailroute_relay::server::{Limits, Server, Shared};
use mailroute_relay::smtp::session::{ListenerKind, SessionConfig};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// Accepted messages.
#[derive(Clone, Default)]
pub struct Capture {
    pub messages: Arc<Mutex<Vec<Transaction>>>,
    pub delay: Duration,
}

impl Capture {
    pub fn count(&self) -> usize {
        self.messages.lock().map(|m| m.len()).unwrap_or(0)
    }
    /// Message content after the relay's Received: header.
    pub fn body(&self, i: usize) -> Vec<u8> {
        let messages = self.messages.lock().unwrap_or_else(|e| e.into_inner());
        let t = &messages[i];
        t.content[t.received_len..].to_vec()
    }
}

impl Deliver for Capture {
    fn deliver(self: Arc<Self>, t: Transaction, _deadline: Instant) -> BoxFuture<'static, Reply> {
        Box::pin(async move {
            tokio::time::sleep(self.delay).await;
            let reply = Reply::message_accepted(&t.id);
            if let Ok(mut m) = self.messages.lock() {
                m.push(t);
            }
            reply
        })
    }
}

/// One account: app / secret.
pub struct TestAccounts;

impl Authenticator for TestAccounts {
    fn check<'a>(&'a self, u: &'a str, p: &'a str) -> BoxFuture<'a, AuthCheck> {
        Box::pin(async move {
            if u == "app" && p == "secret" {
                AuthCheck::Accepted
            } else {
                AuthCheck::Refused
            }
        })
    }
}

/// A certificate for `relay.test` in files, as a mounted Secret would be.
pub struct CertFiles {
    pub dir: tempfile::TempDir,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub cert_pem: String,
}

pub fn cert_files(names: &[&str]) -> CertFiles {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let cert = dir.path().join("tls.crt");
    let key = dir.path().join("tls.key");
    let cert_pem = write_cert(&cert, &key, names);
    CertFiles {
        dir,
        cert,
        key,
        cert_pem,
    }
}

pub fn write_cert(cert: &std::path::Path, key: &std::path::Path, names: &[&str]) -> String {
    let names: Vec<String> = names.iter().map(|s| (*s).to_owned()).collect();
    let generated = rcgen::generate_simple_self_signed(names).unwrap_or_else(|e| panic!("{e}"));
    let pem = generated.cert.pem();
    std::fs::write(cert, &pem).unwrap_or_else(|e| panic!("{e}"));
    std::fs::write(key, generated.signing_key.serialize_pem()).unwrap_or_else(|e| panic!("{e}"));
    pem
}

pub struct Relay {
    pub smtp: SocketAddr,
    pub submission: SocketAddr,
    pub smtps: SocketAddr,
    pub capture: Capture,
    pub ready: Arc<AtomicBool>,
    /// What the sessions share; `install` a new generation to reconfigure.
    pub shared: Arc<Shared>,
    pub certs: CertFiles,
    pub store: Arc<CertificateStore>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

pub struct Options {
    /// Delivery instead of the capture (the capture then stays empty).
    pub deliver: Option<Arc<dyn Deliver>>,
    pub limits: Limits,
    pub throttle: ThrottleConfig,
    pub session: SessionConfig,
    pub delivery_delay: Duration,
    /// Port of the smtp listener (default: any free one).
    pub smtp_port: u16,
    /// RCPT-time checks with I/O (quotas, recipient verification).
    pub admit: Option<Arc<dyn mailroute_relay::interfaces::Admit>>,
    /// The server's metrics (default: a registry of its own, not readable by the test).
    pub metrics: Option<Arc<Metrics>>,
    /// Who may AUTH (default: [`TestAccounts`]).
    pub auth: Option<Arc<dyn Authenticator>>,
}

impl Default for Options {
    fn default() -> Self {
        let mut session = SessionConfig::new("relay.test");
        session.tls_available = true;
        session.auth_available = true;
        Self {
            deliver: None,
            // NB: every test client comes from 127.0.0.1.
            limits: Limits {
                max_sessions_per_ip: 100_000,
                ..Limits::default()
            },
            throttle: ThrottleConfig::default(),
            session,
            delivery_delay: Duration::ZERO,
            smtp_port: 0,
            admit: None,
            metrics: None,
            auth: None,
        }
    }
}

impl Relay {
    pub async fn start(options: Options) -> Self {
        let certs = cert_files(&["relay.test"]);
        let store =
            CertificateStore::load(&certs.cert, &certs.key).unwrap_or_else(|e| panic!("{e}"));
        let tls = tokio_rustls::TlsAcceptor::from(
            store.server_config().unwrap_or_else(|e| panic!("{e}")),
        );
        let capture = Capture {
            delay: options.delivery_delay,
            ..Capture::default()
        };
        let ready = Arc::new(AtomicBool::new(false));
        let mut registry = prometheus_client::registry::Registry::default();
        let hostname = options.session.hostname.clone();
        let generation = mailroute_relay::server::Generation {
            number: 1,
            hash: String::new(),
            session: Arc::new(options.session),
            deliver: options.deliver.unwrap_or_else(|| Arc::new(capture.clone())),
            auth: options.auth.unwrap_or_else(|| Arc::new(TestAccounts)),
            admit: options.admit,
        };
        let shared = Arc::new(Shared {
            clients: Default::default(),
            generation: arc_swap::ArcSwap::from_pointee(generation),
            hostname,
            limits: options.limits,
            tls: Some(tls),
            throttle: AuthThrottle::new(options.throttle),
            metrics: options
                .metrics
                .unwrap_or_else(|| Arc::new(Metrics::register(&mut registry))),
            ready: Arc::clone(&ready),
        });
        // NB: the relay's own bind (accept queue as deep as the system allows): tokio's
        // default of 128 overflows under a burst of hundreds of clients, and the kernel then
        // drops connections the clients believe established.
        let bind = |port: u16| {
            mailroute_relay::server::bind(SocketAddr::from(([127, 0, 0, 1], port)))
                .unwrap_or_else(|e| panic!("{e}"))
        };
        let smtp = bind(options.smtp_port);
        let (submission, smtps) = (bind(0), bind(0));
        let addrs = [
            smtp.local_addr(),
            submission.local_addr(),
            smtps.local_addr(),
        ]
        .map(|a| a.unwrap_or_else(|e| panic!("{e}")));
        let server = Server::new(
            Arc::clone(&shared),
            vec![
                (ListenerKind::Smtp, smtp),
                (ListenerKind::Submission, submission),
                (ListenerKind::Smtps, smtps),
            ],
        );
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(server.run(async {
            let _ = stopped.await;
        }));
        for _ in 0..100 {
            if ready.load(Ordering::SeqCst) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        Self {
            smtp: addrs[0],
            submission: addrs[1],
            smtps: addrs[2],
            capture,
            ready,
            shared,
            certs,
            store,
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// Starts the graceful shutdown; returns the server task to await.
    pub fn shutdown(&mut self) -> tokio::task::JoinHandle<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.task.take().unwrap_or_else(|| tokio::spawn(async {}))
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

/// A client TLS configuration trusting `cert_pem` only.
pub fn tls_connector(cert_pem: &str) -> tokio_rustls::TlsConnector {
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pki_types::CertificateDer::pem_slice_iter(cert_pem.as_bytes()) {
        roots
            .add(cert.unwrap_or_else(|e| panic!("{e}")))
            .unwrap_or_else(|e| panic!("{e}"));
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap_or_else(|e| panic!("{e}"))
    .with_root_certificates(roots)
    .with_no_client_auth();
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

/// A line-oriented SMTP client over plaintext or TLS.
pub enum Stream {
    Plain(BufReader<TcpStream>),
    Tls(Box<BufReader<tokio_rustls::client::TlsStream<TcpStream>>>),
}

pub struct Client {
    pub stream: Stream,
}

impl Client {
    pub async fn connect(addr: SocketAddr) -> Self {
        let tcp = TcpStream::connect(addr)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let _ = tcp.set_nodelay(true);
        Self {
            stream: Stream::Plain(BufReader::new(tcp)),
        }
    }

    /// From another loopback address (`127.0.0.2`...): a client in a tenant's range while the
    /// others, from 127.0.0.1, are outsiders.
    pub async fn connect_from(addr: SocketAddr, source: std::net::IpAddr) -> Self {
        let socket = tokio::net::TcpSocket::new_v4().unwrap_or_else(|e| panic!("{e}"));
        socket
            .bind(SocketAddr::new(source, 0))
            .unwrap_or_else(|e| panic!("{e}"));
        let tcp = socket.connect(addr).await.unwrap_or_else(|e| panic!("{e}"));
        let _ = tcp.set_nodelay(true);
        Self {
            stream: Stream::Plain(BufReader::new(tcp)),
        }
    }

    /// Implicit TLS from another loopback address.
    pub async fn connect_tls_from(
        addr: SocketAddr,
        source: std::net::IpAddr,
        cert_pem: &str,
    ) -> Self {
        let Stream::Plain(reader) = Self::connect_from(addr, source).await.stream else {
            unreachable!("a new connection is plaintext")
        };
        Self::over_tls(reader.into_inner(), cert_pem).await
    }

    pub async fn connect_tls(addr: SocketAddr, cert_pem: &str) -> Self {
        let tcp = TcpStream::connect(addr)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        Self::over_tls(tcp, cert_pem).await
    }

    /// Sends without panicking when the server has closed the connection.
    pub async fn try_send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        match &mut self.stream {
            Stream::Plain(s) => s.get_mut().write_all(bytes).await,
            Stream::Tls(s) => {
                let w = s.get_mut();
                w.write_all(bytes).await?;
                w.flush().await
            }
        }
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        let result = match &mut self.stream {
            Stream::Plain(s) => s.get_mut().write_all(bytes).await,
            Stream::Tls(s) => {
                let w = s.get_mut();
                match w.write_all(bytes).await {
                    Ok(()) => w.flush().await,
                    Err(e) => Err(e),
                }
            }
        };
        result.unwrap_or_else(|e| panic!("send: {e}"));
    }

    /// One whole reply (all lines), or "" when the server closed the connection.
    pub async fn reply(&mut self) -> String {
        let mut all = String::new();
        loop {
            let mut line = Vec::new();
            let n = match &mut self.stream {
                Stream::Plain(s) => s.read_until(b'\n', &mut line).await,
                Stream::Tls(s) => s.read_until(b'\n', &mut line).await,
            }
            .unwrap_or(0);
            if n == 0 {
                return all;
            }
            let text = String::from_utf8_lossy(&line).into_owned();
            let last = text.as_bytes().get(3) == Some(&b' ');
            all.push_str(&text);
            if last {
                return all;
            }
        }
    }

    /// Sends a command and returns its reply.
    pub async fn command(&mut self, line: &str) -> String {
        self.send(format!("{line}\r\n").as_bytes()).await;
        self.reply().await
    }

    /// True when the server closes the connection (reads end) within a second.
    pub async fn is_closed(&mut self) -> bool {
        let mut buf = [0u8; 64];
        let read = match &mut self.stream {
            Stream::Plain(s) => {
                tokio::time::timeout(Duration::from_secs(1), s.read(&mut buf)).await
            }
            Stream::Tls(s) => tokio::time::timeout(Duration::from_secs(1), s.read(&mut buf)).await,
        };
        matches!(read, Ok(Ok(0)) | Ok(Err(_)))
    }

    /// STARTTLS on a plaintext client.
    pub async fn starttls(self, cert_pem: &str) -> Self {
        let Stream::Plain(reader) = self.stream else {
            panic!("already TLS");
        };
        Self::over_tls(reader.into_inner(), cert_pem).await
    }

    /// A TLS handshake as `relay.test` over `tcp`, trusting `cert_pem` only.
    async fn over_tls(tcp: TcpStream, cert_pem: &str) -> Self {
        let name =
            rustls_pki_types::ServerName::try_from("relay.test").unwrap_or_else(|e| panic!("{e}"));
        let tls = tls_connector(cert_pem)
            .connect(name, tcp)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        Self {
            stream: Stream::Tls(Box::new(BufReader::new(tls))),
        }
    }
}

/// Runs a test body with an upper bound on its duration.
pub async fn bounded<F: std::future::Future<Output = ()>>(seconds: u64, body: F) {
    if tokio::time::timeout(Duration::from_secs(seconds), body)
        .await
        .is_err()
    {
        panic!("test did not finish within {seconds} s");
    }
}

/// A relay configured from manifests, as the binary would run it: tenants and rules in the
/// session, a [`Forwarder`] delivering with the in-memory ledger.
pub struct Configured {
    pub session: SessionConfig,
    pub forwarder: Arc<mailroute_relay::delivery::Forwarder>,
    /// Quotas (in memory unless [`configured_with_stores`] says otherwise) and recipient
    /// verification, as the binary sets them up.
    pub gate: Arc<mailroute_relay::admission::Gate>,
    /// The in-memory ledger (an unused one when [`configured_with_stores`] gave the stores).
    pub ledger: Arc<mailroute_relay::store::MemoryLedger>,
    pub metrics: Arc<Metrics>,
    pub registry: prometheus_client::registry::Registry,
    /// The accounts of the configuration's credentials (what the binary authenticates with).
    pub accounts: Arc<dyn Authenticator>,
}

/// Compiles manifests of namespace `mail`, which must have no problem.
pub fn compile_yaml(yaml: &str) -> mailroute_config::Compiled {
    let mut manifests = mailroute_config::Manifests::default();
    manifests
        .add_yaml(std::path::Path::new("test.yaml"), yaml)
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(manifests.problems.is_empty(), "{:?}", manifests.problems);
    let inputs = manifests.namespaces.remove("mail").unwrap_or_default();
    let compiled = mailroute_config::compile(&inputs);
    assert!(compiled.problems.is_empty(), "{:?}", compiled.problems);
    compiled
}

pub fn configured(yaml: &str) -> Configured {
    configured_with_ledger(
        yaml,
        Arc::new(mailroute_relay::store::MemoryLedger::new(100_000)),
    )
}

pub fn configured_with_ledger(
    yaml: &str,
    ledger: Arc<mailroute_relay::store::MemoryLedger>,
) -> Configured {
    let stores = Stores {
        ledger: ledger.clone(),
        ..Stores::memory()
    };
    let mut c = configured_with_stores(yaml, stores);
    c.ledger = ledger;
    c
}

/// The shared store a [`Configured`] relay uses.
pub struct Stores {
    pub ledger: Arc<dyn mailroute_relay::store::Ledger>,
    pub quotas: Arc<dyn mailroute_relay::store::QuotaStore>,
    pub store_failure_open: bool,
    /// Name server for MX lookups, and the port MX hosts are reached on.
    pub dns_server: Option<SocketAddr>,
    pub mx_port: u16,
    /// The issuer's keys for service-account tokens.
    pub tokens: Option<Arc<mailroute_relay::auth::tokens::TokenKeys>>,
    /// MTA-STS policies (default: fetched on port 443, system roots).
    pub mta_sts: Arc<mailroute_relay::delivery::mta_sts::Policies>,
}

impl Stores {
    /// In-memory stores, the system resolver, MX hosts on port 25.
    pub fn memory() -> Self {
        Self {
            ledger: Arc::new(mailroute_relay::store::MemoryLedger::new(100_000)),
            quotas: Arc::new(mailroute_relay::store::MemoryQuotaStore::default()),
            store_failure_open: false,
            dns_server: None,
            mx_port: 25,
            tokens: None,
            mta_sts: Arc::new(mailroute_relay::delivery::mta_sts::Policies::new(443, None)),
        }
    }
}

/// Options for a relay that decides recipients with the real admission for `loaded` (relay
/// policy, rules, quotas in memory) and hands accepted messages to the capture.
pub fn policy_options(loaded: &mailroute_relay::config_source::Loaded) -> Options {
    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = Arc::new(Metrics::register(&mut registry));
    let built = builder(Stores::memory(), metrics)
        .build(loaded)
        .unwrap_or_else(|e| panic!("{e}"));
    Options {
        admit: Some(built.gate),
        session: built.session,
        ..Options::default()
    }
}

/// What builds generations for tests: `relay.test`, TLS available, the given stores.
pub fn builder(stores: Stores, metrics: Arc<Metrics>) -> mailroute_relay::generation::Builder {
    mailroute_relay::generation::Builder {
        hostname: "relay.test".into(),
        tls_available: true,
        max_message_size: 35 * 1024 * 1024,
        max_recipients: 1000,
        ledger: stores.ledger,
        quota_store: stores.quotas,
        quota_hold: Duration::from_secs(900),
        store_timeout: Duration::from_millis(500),
        store_failure_open: stores.store_failure_open,
        dns_server: stores.dns_server,
        mx_port: stores.mx_port,
        loop_key: Some(Arc::new(mailroute_relay::delivery::LoopKey::new(
            b"test installation loop key",
        ))),
        metrics,
        tokens: stores.tokens,
        budget: mailroute_relay::budget::Budget::unlimited(),
        token_clients: Arc::default(),
        mta_sts: stores.mta_sts,
        ask_upstreams: true,
    }
}

pub fn configured_with_stores(yaml: &str, stores: Stores) -> Configured {
    let compiled = compile_yaml(yaml);
    let loaded = mailroute_relay::config_source::Loaded {
        document: compiled.document(1),
        credentials: compiled.credentials,
    };
    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = Arc::new(Metrics::register(&mut registry));
    let built = builder(stores, Arc::clone(&metrics))
        .build(&loaded)
        .unwrap_or_else(|e| panic!("{e}"));
    Configured {
        session: built.session,
        forwarder: built.forwarder,
        gate: built.gate,
        ledger: Arc::new(mailroute_relay::store::MemoryLedger::new(1)),
        metrics,
        registry,
        accounts: Arc::new(built.accounts),
    }
}

impl Configured {
    /// The metrics in Prometheus text format.
    pub fn metrics_text(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    /// Starts a relay serving this configuration.
    pub async fn start(&self) -> Relay {
        self.start_on(0).await
    }

    /// Starts a relay whose smtp listener is on `port`.
    pub async fn start_on(&self, port: u16) -> Relay {
        Relay::start(Options {
            smtp_port: port,
            ..self.options()
        })
        .await
    }

    /// Starts a relay that authenticates with the configuration's own accounts (its
    /// credentials' passwords) rather than [`TestAccounts`].
    pub async fn start_with_accounts(&self) -> Relay {
        Relay::start(Options {
            auth: Some(Arc::clone(&self.accounts)),
            ..self.options()
        })
        .await
    }

    /// Starts a relay that answers end of data within `reply_bound` (`--reply-bound`).
    pub async fn start_bounded(&self, reply_bound: Duration) -> Relay {
        let options = self.options();
        Relay::start(Options {
            limits: Limits {
                end_of_data_timeout: reply_bound,
                ..options.limits
            },
            ..options
        })
        .await
    }

    fn options(&self) -> Options {
        Options {
            deliver: Some(self.forwarder.clone()),
            admit: Some(self.gate.clone()),
            session: self.session.clone(),
            metrics: Some(Arc::clone(&self.metrics)),
            ..Options::default()
        }
    }
}

/// Sends one message over a fresh session; returns the reply after DATA (or the first
/// refusal, prefixed with the command).
pub async fn send_message(addr: SocketAddr, from: &str, to: &[&str], message: &str) -> String {
    let mut client = Client::connect(addr).await;
    client.reply().await;
    client.command("EHLO client.test").await;
    let r = client.command(&format!("MAIL FROM:<{from}>")).await;
    if !r.starts_with('2') {
        return format!("MAIL: {r}");
    }
    for rcpt in to {
        let r = client.command(&format!("RCPT TO:<{rcpt}>")).await;
        if !r.starts_with('2') {
            return format!("RCPT: {r}");
        }
    }
    let r = client.command("DATA").await;
    if !r.starts_with("354") {
        return format!("DATA: {r}");
    }
    let mut wire = Vec::new();
    mailroute_relay::smtp::data::dot_stuff(message.as_bytes(), &mut wire);
    client.send(&wire).await;
    let answer = client.reply().await;
    let _ = client.command("QUIT").await;
    answer
}

/// A `MailRoute` document to `upstream` in clear (test sinks speak no TLS), ending in `---`.
pub fn plain_route(name: &str, upstream: SocketAddr) -> String {
    format!(
        "apiVersion: mailroute.io/v1alpha1\nkind: MailRoute\nmetadata: {{name: {name}, namespace: mail}}\nspec: {{host: {}, port: {}, tls: {{mode: Disabled}}}}\n---\n",
        upstream.ip(),
        upstream.port()
    )
}

/// `GET path` over HTTP/1.0 (the admin listener): the status and the body; status 0 when
/// nothing answers.
pub fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)) else {
        return (0, String::new());
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let _ = write!(s, "GET {path} HTTP/1.0\r\nHost: relay\r\n\r\n");
    let mut response = String::new();
    let _ = s.read_to_string(&mut response);
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// The value of `sample` (its name and labels as printed, e.g. `x_total{result="error"}`) in a
/// Prometheus text exposition; 0 when it is absent.
pub fn metric_value(text: &str, sample: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| {
            let (key, value) = l.rsplit_once(' ')?;
            (key == sample).then(|| value.parse().ok()).flatten()
        })
        .unwrap_or(0.0)
}

/// A child process killed and reaped when dropped.
pub struct Process(pub std::process::Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The relay binary with `args`, every client from 127.0.0.1 allowed its sessions, quiet; once
/// `listening` accepts connections.
pub fn relay_process(args: &[&str], listening: SocketAddr) -> Process {
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_mailroute-relay"))
        .args(args)
        .args(["--max-sessions-per-ip", "1000"])
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("{e}"));
    let process = Process(child);
    wait_port(listening);
    process
}

/// Resident memory of process `pid` now, in octets.
pub fn rss_bytes(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kib| kib * 1024)
}

/// Waits (10 s at most) until something listens on `addr`.
pub fn wait_port(addr: SocketAddr) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(addr).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "{addr} never listened"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
