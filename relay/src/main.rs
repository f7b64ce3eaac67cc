//! `mailroute-relay`: the stateless SMTP relay.

use anyhow::Context;
use clap::{ArgGroup, Parser};
use mailroute_relay::auth::throttle::{AuthThrottle, ThrottleConfig};
use mailroute_relay::auth::tokens::TokenKeys;
use mailroute_relay::config_source::{self, Loaded};
use mailroute_relay::generation::Builder;
use mailroute_relay::metrics::Metrics;
use mailroute_relay::reload::{self, Build, Source};
use mailroute_relay::server::tls::CertificateStore;
use mailroute_relay::server::{Limits, Server, Shared};
use mailroute_relay::smtp::session::ListenerKind;
use mailroute_relay::store::{
    Ledger, MemoryLedger, MemoryQuotaStore, QuotaStore, RedisAuth, RedisStore, StoreSpec,
};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

mod explain_cli;

/// Stateless SMTP relay driven by Mailroute's compiled configuration. `mailroute-relay explain
/// --help`: what it would do with one envelope, offline.
#[derive(Debug, Parser)]
#[command(name = "mailroute-relay", version, about)]
#[command(group(ArgGroup::new("source").required(true).args(["manifests", "config", "configmap"])))]
struct Cli {
    /// Run straight from a directory of Kubernetes manifests (every *.yaml file), compiled
    /// in-process; no cluster needed.
    #[arg(long, value_name = "DIR", env = "MAILROUTE_MANIFESTS")]
    manifests: Option<PathBuf>,
    /// Run from a compiled relay document: a file (as printed by `mailroute-operator render`),
    /// or a directory holding the operator's ConfigMap(s) and Secret as a projected volume
    /// shows them (`config.json` or its parts `config.json.<i>-of-<n>`, and
    /// `credentials.json`).
    #[arg(long, value_name = "PATH", env = "MAILROUTE_CONFIG")]
    config: Option<PathBuf>,
    /// Run from the operator's ConfigMap NAMESPACE/NAME (usually
    /// `<namespace>/mailroute-relay-config`) and Secret `mailroute-relay-credentials`, watched
    /// through the Kubernetes API: with the pod's service account in a cluster, with
    /// `KUBECONFIG` (or ~/.kube/config) outside one. Needs get, list and watch on both.
    #[arg(long, value_name = "NAMESPACE/NAME", env = "MAILROUTE_CONFIGMAP")]
    configmap: Option<String>,
    /// Load and check the configuration, print a summary, and exit: 0 when it is valid.
    #[arg(long)]
    check: bool,
    /// Port-25-style listener (STARTTLS offered), e.g. 0.0.0.0:25. Repeatable.
    #[arg(
        long,
        value_name = "ADDR",
        env = "MAILROUTE_SMTP",
        value_delimiter = ','
    )]
    smtp: Vec<SocketAddr>,
    /// Port-587-style listener (STARTTLS offered, AUTH after TLS). Repeatable.
    #[arg(
        long,
        value_name = "ADDR",
        env = "MAILROUTE_SUBMISSION",
        value_delimiter = ','
    )]
    submission: Vec<SocketAddr>,
    /// Port-465-style listener (TLS from the first byte). Repeatable; needs --tls-cert.
    #[arg(
        long,
        value_name = "ADDR",
        env = "MAILROUTE_SMTPS",
        value_delimiter = ','
    )]
    smtps: Vec<SocketAddr>,
    /// Expect a PROXY protocol v1 or v2 header on every listener (behind a load balancer that
    /// sends one), so IP ranges and Received: see the client's own address.
    #[arg(long, env = "MAILROUTE_PROXY_PROTOCOL")]
    proxy_protocol: bool,
    /// Believe PROXY headers only from these sources (the load balancers; repeatable, implies
    /// the PROXY protocol): a connection from one must begin with a header, a header from any
    /// other source is refused and the socket's own address is used.
    #[arg(
        long,
        value_name = "CIDR",
        env = "MAILROUTE_PROXY_TRUSTED",
        value_delimiter = ','
    )]
    proxy_trusted: Vec<ipnet::IpNet>,
    /// PEM certificate chain for STARTTLS and smtps; reloaded when the file changes.
    #[arg(
        long,
        value_name = "FILE",
        env = "MAILROUTE_TLS_CERT",
        requires = "tls_key"
    )]
    tls_cert: Option<PathBuf>,
    /// PEM private key for --tls-cert; reloaded when the file changes.
    #[arg(
        long,
        value_name = "FILE",
        env = "MAILROUTE_TLS_KEY",
        requires = "tls_cert"
    )]
    tls_key: Option<PathBuf>,
    /// JWKS document of the cluster's service-account token issuer (the API server's
    /// /openid/v1/jwks): applications authenticate with their projected token (AUTH
    /// OAUTHBEARER or XOAUTH2) as the tenant listing their service account. Reloaded when
    /// the file changes.
    #[arg(long, value_name = "FILE", env = "MAILROUTE_JWKS_FILE")]
    jwks_file: Option<PathBuf>,
    /// The audience service-account tokens must be minted for.
    #[arg(
        long,
        value_name = "AUDIENCE",
        env = "MAILROUTE_TOKEN_AUDIENCE",
        default_value = mailroute_relay::auth::tokens::DEFAULT_AUDIENCE
    )]
    token_audience: String,
    /// Admin listener serving /metrics, /healthz and /readyz, e.g. 0.0.0.0:9090.
    #[arg(long, value_name = "ADDR", env = "MAILROUTE_ADMIN")]
    admin: Option<SocketAddr>,
    /// Name used in the greeting, in Received: headers and in EHLO to upstreams.
    /// Default: the machine's host name (never localhost).
    #[arg(long, value_name = "NAME", env = "MAILROUTE_HOSTNAME")]
    hostname: Option<String>,
    /// Seconds transactions in flight may take to finish after SIGTERM.
    #[arg(
        long,
        value_name = "SECONDS",
        env = "MAILROUTE_SHUTDOWN_GRACE",
        default_value_t = 30
    )]
    shutdown_grace: u64,
    /// Largest message accepted, in octets (advertised as SIZE).
    #[arg(
        long,
        value_name = "OCTETS",
        env = "MAILROUTE_MAX_MESSAGE_SIZE",
        default_value_t = 36_700_160
    )]
    max_message_size: usize,
    /// Recipients per transaction (RFC 5321 asks for at least 100).
    #[arg(long, value_name = "N", env = "MAILROUTE_MAX_RECIPIENTS", default_value_t = 1000,
          value_parser = clap::value_parser!(u32).range(100..))]
    max_recipients: u32,
    /// Sessions open at once; further clients get 421 4.3.2.
    #[arg(
        long,
        value_name = "N",
        env = "MAILROUTE_MAX_SESSIONS",
        default_value_t = 20_000
    )]
    max_sessions: usize,
    /// Milliseconds to wait before the greeting; clients that talk first are refused with
    /// 554 5.5.0 (spam engines do). 0 disables the wait.
    #[arg(
        long,
        value_name = "MS",
        env = "MAILROUTE_GREET_DELAY_MS",
        default_value_t = 0
    )]
    greet_delay_ms: u64,
    /// Octets of message content the relay holds at once, across all sessions, from receipt to
    /// the end of delivery; a transaction that would exceed it is answered 452 4.3.1 (at MAIL
    /// when it declares SIZE=). Default: half the container's memory limit (or of the
    /// machine's memory).
    #[arg(long, value_name = "OCTETS", env = "MAILROUTE_MAX_INFLIGHT_BYTES")]
    max_inflight_bytes: Option<usize>,
    /// Sessions one client address may hold at once (IPv6: per /64); more get 421 4.7.0.
    #[arg(
        long,
        value_name = "N",
        env = "MAILROUTE_MAX_SESSIONS_PER_IP",
        default_value_t = 50
    )]
    max_sessions_per_ip: usize,
    /// Seconds each command may take to arrive, from the end of the previous one, before
    /// 421 4.4.2 (a client trickling bytes does not extend it).
    #[arg(
        long,
        value_name = "SECONDS",
        env = "MAILROUTE_IDLE_TIMEOUT",
        default_value_t = 300
    )]
    idle_timeout: u64,
    /// Name server (IP:PORT) for MX and host lookups. Default: the system's resolver.
    #[arg(long, value_name = "ADDR", env = "MAILROUTE_DNS_SERVER")]
    dns_server: Option<SocketAddr>,
    /// Port for direct delivery to MX hosts. Always 25 on the Internet; other values are for
    /// test setups (a DNS server and upstreams on loopback).
    #[arg(
        long,
        value_name = "PORT",
        env = "MAILROUTE_MX_PORT",
        default_value_t = 25
    )]
    mx_port: u16,
    /// Port of the HTTPS servers MTA-STS policies are fetched from. Always 443 on the
    /// Internet; other values are for test setups.
    #[arg(
        long,
        value_name = "PORT",
        env = "MAILROUTE_MTA_STS_PORT",
        default_value_t = 443
    )]
    mta_sts_port: u16,
    /// Extra trust roots (a PEM file) for the certificates of MX hosts and MTA-STS policy
    /// servers under an MTA-STS policy, beside the system's.
    #[arg(long, value_name = "FILE", env = "MAILROUTE_MX_CA_FILE")]
    mx_ca_file: Option<std::path::PathBuf>,
    /// Where sending quotas and the delivery ledger live: `memory` (one relay) or Redis shared
    /// by every replica: one server (`redis://host:6379/0`), the master of a Sentinel
    /// deployment (`redis-sentinel://s1:26379,s2:26379,s3:26379/mymaster[/DB]`) or a Cluster
    /// (`redis-cluster://n1:6379,n2:6379`); `rediss...` for TLS. Passwords come from
    /// --store-password-file or MAILROUTE_STORE_PASSWORD (and, for the sentinels,
    /// MAILROUTE_STORE_SENTINEL_PASSWORD), never from this value in the chart.
    #[arg(
        long,
        value_name = "STORE",
        env = "MAILROUTE_STORE",
        default_value = "memory"
    )]
    store: StoreSpec,
    /// A file holding the Redis password (a mounted Secret); MAILROUTE_STORE_PASSWORD is read
    /// when it is not given.
    #[arg(long, value_name = "FILE")]
    store_password_file: Option<std::path::PathBuf>,
    /// Longest wait for the shared store, in milliseconds, before it counts as unavailable.
    #[arg(
        long,
        value_name = "MS",
        env = "MAILROUTE_STORE_TIMEOUT_MS",
        default_value_t = 1000
    )]
    store_timeout_ms: u64,
    /// Seconds a quota reservation made at RCPT lives unless the transaction ends first (it
    /// bounds how long a relay that died keeps reservations counted).
    #[arg(
        long,
        value_name = "SECONDS",
        env = "MAILROUTE_QUOTA_HOLD",
        default_value_t = 900
    )]
    quota_hold: u64,
    /// When the shared store (quotas, the delivery ledger) cannot be reached: `closed` answers
    /// 451 4.3.0, `open` accepts without it (quotas unenforced, a retry may duplicate).
    #[arg(long, value_name = "MODE", env = "MAILROUTE_STORE_FAILURE", default_value = "closed",
          value_parser = ["closed", "open"])]
    store_failure: String,
    /// Milliseconds between checks of --manifests or --config for changes; a valid change is
    /// put in force without dropping a session, an invalid one is refused and counted. 0: no
    /// reloads.
    #[arg(
        long,
        value_name = "MS",
        env = "MAILROUTE_WATCH_INTERVAL_MS",
        default_value_t = 250
    )]
    watch_interval_ms: u64,
    /// Deliveries the in-memory ledger remembers (about 60 bytes each); past it the oldest go.
    #[arg(
        long,
        value_name = "N",
        env = "MAILROUTE_LEDGER_MAX_ENTRIES",
        default_value_t = 1_000_000
    )]
    ledger_max_entries: usize,
    /// File holding the key of the copies' loop marker MAC (SPEC 6.3), shared by every relay
    /// of the installation; without it, the credentials' `loopKey`.
    #[arg(long, value_name = "FILE", env = "MAILROUTE_LOOP_KEY_FILE")]
    loop_key_file: Option<PathBuf>,
    /// Seconds to wait before answering end of data: below the shortest data timeout of the
    /// clients in use (SPEC 5.2); `451 4.4.5` for what an upstream has not accepted by then.
    #[arg(
        long,
        value_name = "SECONDS",
        env = "MAILROUTE_REPLY_BOUND",
        default_value_t = 300
    )]
    reply_bound: u64,
    /// Development only: deliver every route's mail to a built-in sink that writes each message
    /// to DIR/<route>-<n>.eml and prints where (every destination, TLS and AUTH replaced), so
    /// dual and split delivery can be seen without an MTA.
    #[arg(long, value_name = "DIR", env = "MAILROUTE_DEV_SINK")]
    dev_sink: Option<PathBuf>,
}

fn system_hostname() -> Option<String> {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())?;
    let name = name.trim().to_owned();
    (!name.is_empty() && name != "localhost").then_some(name)
}

fn main() -> ExitCode {
    if std::env::args_os().nth(1).is_some_and(|a| a == "explain") {
        mailroute_admin::init_logging("warn,kube_client=off,kube_runtime=off");
        return explain_cli::main(std::env::args_os().skip(2));
    }
    // NB: kube's own request and watcher logs are off by default: the cluster source logs an API
    // failure itself, once a minute while it lasts, where kube would log every retry.
    mailroute_admin::init_logging("info,kube_client=off,kube_runtime=off");
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("mailroute-relay: {e}");
            return ExitCode::from(1);
        }
    };
    let source = match runtime.block_on(source(&cli)) {
        Ok(source) => source,
        Err(e) => {
            eprintln!("mailroute-relay: {e}");
            return ExitCode::from(2);
        }
    };
    let first = if cli.check {
        runtime.block_on(reload::load_listed(&source, CHECK_LISTING_BOUND))
    } else {
        runtime.block_on(waiting(&cli, &source))
    };
    let loaded = match first {
        Ok(loaded) => loaded,
        Err(e) => {
            eprintln!("mailroute-relay: configuration not loaded: {e}");
            return ExitCode::from(2);
        }
    };
    println!("configuration OK: {}", config_source::summary(&loaded));
    if cli.check {
        return ExitCode::SUCCESS;
    }
    match runtime.block_on(serve(cli, source, loaded)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mailroute-relay: {e:#}");
            ExitCode::from(1)
        }
    }
}

/// The first configuration ([`reload::first_load`]). While a cluster source has none yet, the
/// admin listener already answers: `/healthz` 200 (the kubelet must not restart a relay that
/// waits on purpose), `/readyz` 503 (no traffic until it serves).
async fn waiting(
    cli: &Cli,
    source: &Source,
) -> Result<Loaded, mailroute_relay::config_source::LoadError> {
    if !matches!(source, Source::Cluster(_)) {
        return source.load(1).await;
    }
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let admin = match cli.admin {
        Some(addr) => match tokio::net::TcpListener::bind(addr).await {
            Ok(listener) => Some(tokio::spawn(mailroute_admin::serve(
                listener,
                Arc::new(prometheus_client::registry::Registry::default()),
                Arc::new(AtomicBool::new(false)),
                async {
                    let _ = stopped.await;
                },
            ))),
            Err(e) => {
                tracing::warn!(error = %e, %addr, "admin listener not bound while waiting");
                None
            }
        },
        None => None,
    };
    let loaded = reload::first_load(source, reload::FIRST_LOAD_RETRY).await;
    let _ = stop.send(());
    if let Some(admin) = admin {
        let _ = admin.await;
    }
    loaded
}

/// How long `--check` waits for a cluster source's first lists.
const CHECK_LISTING_BOUND: Duration = Duration::from_secs(30);

/// Where the configuration comes from, per the command line.
async fn source(cli: &Cli) -> Result<Source, String> {
    Source::open(
        cli.manifests.as_deref(),
        cli.config.as_deref(),
        cli.configmap.as_deref(),
    )
    .await
    .map_err(|e| e.to_string())
}

async fn serve(cli: Cli, source: Source, loaded: config_source::Loaded) -> anyhow::Result<()> {
    if cli.smtp.is_empty() && cli.submission.is_empty() && cli.smtps.is_empty() {
        anyhow::bail!("no listener: give at least one of --smtp, --submission, --smtps");
    }
    let hostname = match cli.hostname.clone().or_else(system_hostname) {
        Some(name) if name != "localhost" => name,
        _ => anyhow::bail!("set --hostname: the system host name is missing or localhost"),
    };
    let certificates = match (&cli.tls_cert, &cli.tls_key) {
        (Some(cert), Some(key)) => {
            Some(CertificateStore::load(cert, key).context("loading the TLS certificate")?)
        }
        _ => None,
    };
    if certificates.is_none() && !cli.smtps.is_empty() {
        anyhow::bail!("--smtps needs --tls-cert and --tls-key");
    }
    let tls = match &certificates {
        Some(store) => Some(tokio_rustls::TlsAcceptor::from(store.server_config()?)),
        None => None,
    };
    let _watch = certificates
        .as_ref()
        .map(|store| store.watch(Duration::from_secs(2)));

    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = Arc::new(Metrics::register(&mut registry));
    metrics
        .config_generation
        .set(i64::try_from(loaded.document.generation).unwrap_or(i64::MAX));
    metrics.config_source_up.set(1);

    let store_timeout = Duration::from_millis(cli.store_timeout_ms.max(1));
    let (ledger, quota_store): (Arc<dyn Ledger>, Arc<dyn QuotaStore>) = match &cli.store {
        StoreSpec::Memory => (
            Arc::new(MemoryLedger::new(cli.ledger_max_entries)),
            Arc::new(MemoryQuotaStore::default()),
        ),
        StoreSpec::Redis(spec) => {
            let auth = RedisAuth::from_environment(cli.store_password_file.as_deref())
                .map_err(|e| anyhow::anyhow!(e))?;
            let redis = Arc::new(
                RedisStore::open(spec, &auth, store_timeout)
                    .map_err(|e| anyhow::anyhow!("--store: {e}"))?,
            );
            (redis.clone(), redis)
        }
    };
    // Service-account tokens: checked against --jwks-file, or, following the cluster, against
    // the keys the API server publishes.
    let (tokens, _tokens_follow) = match (&cli.jwks_file, &source) {
        (Some(path), _) => {
            let keys = TokenKeys::load(path, &cli.token_audience)
                .map_err(|e| anyhow::anyhow!("--jwks-file: {e}"))?;
            let watch = keys.watch(Duration::from_secs(10));
            (Some(keys), Some(watch))
        }
        (None, Source::Cluster(cluster)) => {
            let keys = TokenKeys::empty(&cli.token_audience);
            let follow =
                mailroute_relay::cluster::follow_issuer_keys(cluster.client(), keys.clone());
            (Some(keys), Some(follow))
        }
        (None, _) => (None, None),
    };
    let builder = Arc::new(Builder {
        hostname: hostname.clone(),
        tokens,
        tls_available: tls.is_some(),
        max_message_size: cli.max_message_size,
        max_recipients: cli.max_recipients as usize,
        ledger,
        quota_store,
        quota_hold: Duration::from_secs(cli.quota_hold.max(1)),
        store_timeout,
        store_failure_open: cli.store_failure == "open",
        dns_server: cli.dns_server,
        mx_port: cli.mx_port,
        loop_key: match &cli.loop_key_file {
            Some(path) => {
                let secret = std::fs::read(path)
                    .with_context(|| format!("reading --loop-key-file {}", path.display()))?;
                if secret.trim_ascii().len() < 16 {
                    anyhow::bail!(
                        "--loop-key-file {}: the key must be at least 16 octets",
                        path.display()
                    );
                }
                Some(Arc::new(mailroute_relay::delivery::LoopKey::new(&secret)))
            }
            None => None,
        },
        metrics: Arc::clone(&metrics),
        token_clients: Arc::default(),
        ask_upstreams: true,
        mta_sts: {
            let roots = match &cli.mx_ca_file {
                Some(path) => Some(
                    std::fs::read_to_string(path)
                        .with_context(|| format!("reading --mx-ca-file {}", path.display()))?,
                ),
                None => None,
            };
            Arc::new(mailroute_relay::delivery::mta_sts::Policies::new(
                cli.mta_sts_port,
                roots.as_deref(),
            ))
        },
        budget: {
            let limit = cli
                .max_inflight_bytes
                .unwrap_or_else(mailroute_relay::budget::default_limit);
            metrics
                .inflight_bytes_limit
                .set(i64::try_from(limit).unwrap_or(i64::MAX));
            mailroute_relay::budget::Budget::observed(limit, metrics.inflight_bytes.clone())
        },
    });
    let dev_sink = match &cli.dev_sink {
        Some(dir) => {
            let sink = mailroute_relay::dev_sink::DevSink::new(dir)
                .with_context(|| format!("--dev-sink {}", dir.display()))?;
            tracing::warn!(dir = %dir.display(), "--dev-sink: every route delivers to files, nothing leaves the machine");
            Some(Arc::new(sink))
        }
        None => None,
    };
    let mut loaded = loaded;
    if let Some(sink) = &dev_sink {
        sink.redirect(&mut loaded).context("--dev-sink")?;
    }
    let first = builder.generation(&loaded).context("setting up delivery")?;
    let limits = Limits {
        idle_timeout: Duration::from_secs(cli.idle_timeout),
        max_sessions: cli.max_sessions,
        max_sessions_per_ip: cli.max_sessions_per_ip,
        shutdown_grace: Duration::from_secs(cli.shutdown_grace),
        greet_delay: Duration::from_millis(cli.greet_delay_ms),
        proxy_protocol: cli.proxy_protocol || !cli.proxy_trusted.is_empty(),
        proxy_trusted: cli.proxy_trusted.iter().map(ipnet::IpNet::trunc).collect(),
        end_of_data_timeout: Duration::from_secs(cli.reply_bound.max(1)),
        ..Limits::default()
    };
    let ready = Arc::new(AtomicBool::new(false));
    let shared = Arc::new(Shared {
        clients: Default::default(),
        generation: arc_swap::ArcSwap::from_pointee(first),
        hostname,
        limits,
        tls,
        throttle: AuthThrottle::new(ThrottleConfig::default()),
        metrics,
        ready: Arc::clone(&ready),
    });
    let sweeper = {
        let shared = Arc::clone(&shared);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(5));
            loop {
                tick.tick().await;
                let generation = shared.generation.load_full();
                generation.deliver.sweep();
                generation.deliver.observe().await;
            }
        })
    };
    let watcher = (cli.watch_interval_ms > 0).then(|| {
        let builder = Arc::clone(&builder);
        let build: Arc<Build> = Arc::new(move |loaded: &Loaded| match &dev_sink {
            Some(sink) => {
                let mut loaded = loaded.clone();
                sink.redirect(&mut loaded).map_err(|e| e.to_string())?;
                builder.generation(&loaded).map_err(|e| e.to_string())
            }
            None => builder.generation(loaded).map_err(|e| e.to_string()),
        });
        tokio::spawn(reload::watch(
            source,
            Duration::from_millis(cli.watch_interval_ms),
            Arc::clone(&shared),
            build,
        ))
    });

    let mut listeners = Vec::new();
    for (kind, addrs) in [
        (ListenerKind::Smtp, &cli.smtp),
        (ListenerKind::Submission, &cli.submission),
        (ListenerKind::Smtps, &cli.smtps),
    ] {
        for addr in addrs {
            let listener = mailroute_relay::server::bind(*addr)
                .with_context(|| format!("binding {} listener {addr}", kind.as_str()))?;
            tracing::info!(listener = kind.as_str(), addr = %listener.local_addr()?, "listening");
            listeners.push((kind, listener));
        }
    }
    // Every listener is bound: a connection made from now on waits in the backlog until the
    // accept loops start a moment later, so the relay is ready before `/readyz` first answers
    // (a probe must never see 503 from a relay that serves).
    ready.store(true, std::sync::atomic::Ordering::SeqCst);
    let (stop_admin, admin_stopped) = tokio::sync::oneshot::channel::<()>();
    let admin = match cli.admin {
        Some(addr) => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding admin listener {addr}"))?;
            tracing::info!(addr = %listener.local_addr()?, "admin listening");
            let registry = Arc::new(registry);
            Some(tokio::spawn(mailroute_admin::serve(
                listener,
                registry,
                Arc::clone(&ready),
                async {
                    let _ = admin_stopped.await;
                },
            )))
        }
        None => None,
    };
    Server::new(shared, listeners).run(shutdown_signal()).await;
    sweeper.abort();
    if let Some(watcher) = watcher {
        watcher.abort();
    }
    let _ = stop_admin.send(());
    if let Some(admin) = admin {
        let _ = admin.await;
    }
    Ok(())
}

/// SIGTERM (Kubernetes) or SIGINT (a terminal).
async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot listen for SIGTERM");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
    }
}
