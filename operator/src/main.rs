//! `mailroute-operator`: the controller and its offline tools.

use anyhow::Context;
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

/// Compiles Mailroute resources (MailRoute, RoutingRule, RelayPolicy) into relay configuration.
#[derive(Debug, Parser)]
#[command(name = "mailroute-operator", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the controller in a cluster (in-cluster service account, or KUBECONFIG): watch the
    /// resources, publish each namespace's relay configuration, and report status.
    Run {
        /// Namespaces to manage (repeatable); all namespaces when none is given.
        #[arg(
            long = "namespace",
            value_name = "NS",
            env = "MAILROUTE_NAMESPACES",
            value_delimiter = ','
        )]
        namespaces: Vec<String>,
        /// Namespaces to publish a relay document for from the start, even before they hold any
        /// resource (repeatable): the relays' configuration namespace, so a first install's
        /// relays get an empty, valid document at once instead of waiting for the first
        /// resource. The chart passes `relay.configNamespace`.
        #[arg(
            long = "publish-namespace",
            value_name = "NS",
            env = "MAILROUTE_PUBLISH_NAMESPACES",
            value_delimiter = ','
        )]
        publish: Vec<String>,
        /// Seconds between full passes over every known namespace (picks up changed Secrets
        /// and ConfigMaps the resources reference).
        #[arg(
            long,
            value_name = "SECONDS",
            env = "MAILROUTE_RESYNC",
            default_value_t = 60
        )]
        resync: u64,
        /// Namespace of the `mailroute-operator` Lease for leader election (normally the
        /// operator's own, from the downward API). Without it, this replica always writes: run
        /// only one.
        #[arg(long, value_name = "NS", env = "POD_NAMESPACE")]
        lease_namespace: Option<String>,
        /// This replica's identity in the Lease (normally the pod name).
        #[arg(long, value_name = "NAME", env = "POD_NAME")]
        identity: Option<String>,
        /// Name the TLS probe presents in EHLO to routes without `heloName`. Default: the
        /// machine's host name.
        #[arg(long, value_name = "NAME", env = "MAILROUTE_PROBE_HELO")]
        probe_helo: Option<String>,
        /// Admin listener serving /metrics, /healthz and /readyz, e.g. 0.0.0.0:9090.
        #[arg(long, value_name = "ADDR", env = "MAILROUTE_ADMIN")]
        admin: Option<std::net::SocketAddr>,
        /// The relays' shared store (their `--store`: redis://, redis-sentinel://,
        /// redis-cluster://), read for each route's `status.rateLimits`; passwords as the
        /// relay takes them (`MAILROUTE_STORE_PASSWORD`, `--store-password-file`). Default:
        /// none (the relays count in memory, nothing to show).
        #[arg(long, value_name = "URL", env = "MAILROUTE_STORE")]
        store: Option<String>,
        /// File holding the store's password (a mounted Secret).
        #[arg(long, value_name = "PATH")]
        store_password_file: Option<std::path::PathBuf>,
    },
    /// Print all CustomResourceDefinitions as YAML, or write one file per CRD into a directory.
    Crdgen {
        /// Write `<plural>.mailroute.io.yaml` files into this directory instead of printing.
        #[arg(long, value_name = "DIR")]
        out: Option<PathBuf>,
    },
    /// Compile a directory of manifests (every *.yaml file, multi-document, with the Secrets and
    /// ConfigMaps they reference) and print the relay document. Problems go to stderr; the exit
    /// status is 1 when any resource is invalid (the document then holds the valid ones).
    Render {
        /// Directory of manifests.
        #[arg(short = 'f', long = "filename", value_name = "DIR")]
        dir: PathBuf,
        /// Namespace to compile, when the manifests span several.
        #[arg(short, long, env = "MAILROUTE_NAMESPACE")]
        namespace: Option<String>,
        /// Generation number to stamp on the document.
        #[arg(long, default_value_t = 1)]
        generation: u64,
    },
    /// Show what the relay would do with one envelope, offline: the tenant and how the
    /// session was bound, each recipient's direction, account type, matching rules and route,
    /// the legs with their TLS, the quota counters, and the exact reply to every command. Runs
    /// `mailroute-relay explain` (the relay's own session, admission and routing) with the same
    /// arguments: `MAILROUTE_RELAY_BIN`, else the `mailroute-relay` beside this program, else
    /// the one on PATH. `mailroute-operator explain --help` lists its options.
    #[command(disable_help_flag = true)]
    Explain {
        /// `-f DIR | --config PATH | --configmap NS/NAME --from ADDR --to ADDR [...]`.
        #[arg(
            trailing_var_arg = true,
            allow_hyphen_values = true,
            value_name = "ARGS"
        )]
        args: Vec<std::ffi::OsString>,
    },
}

fn main() -> ExitCode {
    mailroute_admin::init_logging("warn");
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("mailroute-operator: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Run {
            namespaces,
            publish,
            resync,
            lease_namespace,
            identity,
            probe_helo,
            admin,
            store,
            store_password_file,
        } => {
            let store = match store
                .as_deref()
                .map(str::parse::<mailroute_store::StoreSpec>)
            {
                None | Some(Ok(mailroute_store::StoreSpec::Memory)) => None,
                Some(Ok(mailroute_store::StoreSpec::Redis(spec))) => {
                    let auth = mailroute_store::RedisAuth::from_environment(
                        store_password_file.as_deref(),
                    )
                    .map_err(|e| anyhow::anyhow!(e))?;
                    let store = mailroute_store::RedisStore::open(
                        &spec,
                        &auth,
                        mailroute_operator::controller::usage::READ_TIMEOUT,
                    )
                    .map_err(|e| anyhow::anyhow!("--store: {e}"))?;
                    Some(std::sync::Arc::new(store)
                        as std::sync::Arc<dyn mailroute_store::QuotaStore>)
                }
                Some(Err(e)) => anyhow::bail!("{e}"),
            };
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("starting the runtime")?;
            runtime.block_on(async {
                let client = kube::Client::try_default()
                    .await
                    .context("connecting to the Kubernetes API (in-cluster or KUBECONFIG)")?;
                let mut registry = prometheus_client::registry::Registry::default();
                let metrics = std::sync::Arc::new(mailroute_operator::metrics::Metrics::register(
                    &mut registry,
                ));
                let ready = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
                if let Some(addr) = admin {
                    let listener = tokio::net::TcpListener::bind(addr)
                        .await
                        .with_context(|| format!("binding admin listener {addr}"))?;
                    tokio::spawn(mailroute_admin::serve(
                        listener,
                        std::sync::Arc::new(registry),
                        std::sync::Arc::clone(&ready),
                        std::future::pending(),
                    ));
                }
                let pacing = mailroute_operator::controller::run::Pacing {
                    resync: std::time::Duration::from_secs(resync.max(5)),
                    ..Default::default()
                };
                let readiness = mailroute_operator::controller::readiness::Readiness::new(
                    pacing.resync,
                    std::sync::Arc::clone(&ready),
                );
                let helo = probe_helo.unwrap_or_else(|| {
                    std::fs::read_to_string("/proc/sys/kernel/hostname")
                        .map(|h| h.trim().to_owned())
                        .ok()
                        .filter(|h| !h.is_empty() && h != "localhost")
                        .unwrap_or_else(|| "mailroute-operator.local".to_owned())
                });
                let election = lease_namespace.map(|ns| {
                    let identity = identity.unwrap_or_else(|| {
                        format!(
                            "{}-{}",
                            std::fs::read_to_string("/proc/sys/kernel/hostname")
                                .unwrap_or_default()
                                .trim(),
                            std::process::id()
                        )
                    });
                    mailroute_operator::controller::leader::Election::new(&ns, &identity)
                });
                tokio::select! {
                    () = mailroute_operator::controller::run::run(client, mailroute_operator::controller::run::Scope { namespaces, publish }, pacing, election, metrics, mailroute_operator::controller::run::Probing { helo, store }, readiness) => {}
                    _ = tokio::signal::ctrl_c() => tracing::info!("stopping"),
                }
                anyhow::Ok(())
            })?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Crdgen { out: None } => {
            print!("{}", mailroute_operator::crdgen::all_yaml()?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Crdgen { out: Some(dir) } => {
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            for crd in mailroute_operator::crdgen::crds() {
                let path = dir.join(mailroute_operator::crdgen::file_name(&crd));
                std::fs::write(&path, mailroute_operator::crdgen::to_yaml(&crd)?)
                    .with_context(|| format!("writing {}", path.display()))?;
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Render {
            dir,
            namespace,
            generation,
        } => {
            let rendered =
                mailroute_operator::render::render(&dir, namespace.as_deref(), generation)?;
            for warning in &rendered.warnings {
                eprintln!("warning: {warning}");
            }
            for problem in &rendered.problems {
                eprintln!("error: {problem}");
            }
            println!("{}", rendered.document.to_json_pretty());
            if rendered.problems.is_empty() {
                Ok(ExitCode::SUCCESS)
            } else {
                eprintln!(
                    "{} problem(s); the document above holds only the valid resources",
                    rendered.problems.len()
                );
                Ok(ExitCode::FAILURE)
            }
        }
        Command::Explain { args } => Ok(explain_with_the_relay(args)),
    }
}

/// `explain` is the relay's: it plays the envelope through the relay's own session, admission
/// and routing, which only the relay links. Replaces this process with `mailroute-relay explain`
/// (its output and exit status are the command's).
fn explain_with_the_relay(args: Vec<std::ffi::OsString>) -> ExitCode {
    use std::os::unix::process::CommandExt;
    let relay = relay_program();
    let error = std::process::Command::new(&relay)
        .arg("explain")
        .args(args)
        .exec();
    eprintln!(
        "mailroute-operator explain: cannot run {} ({error}): explain needs mailroute-relay beside mailroute-operator, on PATH, or named by MAILROUTE_RELAY_BIN",
        relay.display()
    );
    ExitCode::from(2)
}

/// Where `mailroute-relay` is: `MAILROUTE_RELAY_BIN`, else beside this program (the image and
/// `cargo build` put both in one directory), else on PATH.
fn relay_program() -> PathBuf {
    if let Some(path) = std::env::var_os("MAILROUTE_RELAY_BIN") {
        return PathBuf::from(path);
    }
    std::env::current_exe()
        .ok()
        .and_then(|own| own.parent().map(|dir| dir.join("mailroute-relay")))
        .filter(|beside| beside.is_file())
        .unwrap_or_else(|| PathBuf::from("mailroute-relay"))
}
