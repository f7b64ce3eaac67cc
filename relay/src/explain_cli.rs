//! `mailroute-relay explain` (and `mailroute-operator explain`, which runs it): the command line
//! of [`mailroute_relay::explain`].

use clap::Parser;
use mailroute_relay::explain::{self, Envelope};
use mailroute_relay::reload::{self, Source};
use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

/// Show what the relay would do with one envelope, offline: the tenant and how the
/// session was bound, each recipient's direction, account type, matching rules and route, the
/// legs with their TLS, the quota counters, and the exact reply to every command. Exit status:
/// 0 when the message is accepted for every recipient, 1 when a command is refused, 2 when the
/// configuration or the envelope cannot be read.
#[derive(Debug, Parser)]
#[command(name = "explain", bin_name = "mailroute-relay explain", version)]
#[command(group(clap::ArgGroup::new("source").required(true).args(["dir", "config", "configmap"])))]
struct ExplainCli {
    /// Directory of manifests of one namespace (what the relay's --manifests reads).
    #[arg(short = 'f', long = "filename", value_name = "DIR")]
    dir: Option<PathBuf>,
    /// A compiled relay document (`render` output, or the operator's ConfigMap as mounted).
    #[arg(long, value_name = "PATH")]
    config: Option<PathBuf>,
    /// The operator's ConfigMap in the cluster (in-cluster service account, or KUBECONFIG).
    #[arg(long, value_name = "NAMESPACE/NAME")]
    configmap: Option<String>,
    /// Envelope sender (empty for the null sender).
    #[arg(long, value_name = "ADDR", allow_hyphen_values = true)]
    from: String,
    /// Envelope recipient (repeatable, or comma-separated).
    #[arg(long, value_name = "ADDR", required = true, value_delimiter = ',')]
    to: Vec<String>,
    /// The client's address (default: one of no tenant's ranges, from TEST-NET-1).
    #[arg(long, value_name = "IP", default_value = "192.0.2.1")]
    client_ip: std::net::IpAddr,
    /// The client's EHLO name.
    #[arg(long, value_name = "NAME", default_value = "client.example")]
    helo: String,
    /// Authenticate (SMTP AUTH, inside TLS) as this user; the password is not checked.
    #[arg(long, value_name = "USER")]
    auth: Option<String>,
    /// STARTTLS before MAIL.
    #[arg(long)]
    tls: bool,
    /// The relay's name in the greeting and `Received:`.
    #[arg(long, value_name = "NAME", default_value = "mailroute-relay")]
    hostname: String,
    /// `text` for people, `json` for scripts.
    #[arg(short = 'o', long = "output", value_enum, default_value_t = Output::Text)]
    output: Output,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Output {
    Text,
    Json,
}

/// Runs `explain` with `args` (what follows `explain` on the command line).
pub fn main(args: impl IntoIterator<Item = OsString>) -> ExitCode {
    let cli =
        match ExplainCli::try_parse_from(std::iter::once(OsString::from("explain")).chain(args)) {
            Ok(cli) => cli,
            Err(e) => {
                let _ = e.print();
                return if e.use_stderr() {
                    ExitCode::from(2)
                } else {
                    ExitCode::SUCCESS
                };
            }
        };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("explain: {e}");
            return ExitCode::from(2);
        }
    };
    let envelope = Envelope {
        client: cli.client_ip,
        helo: cli.helo.clone(),
        auth: cli.auth.clone(),
        tls: cli.tls,
        from: cli.from.clone(),
        to: cli.to.clone(),
    };
    let explained = runtime.block_on(async {
        // NB: -f, --config and --configmap read as the relay's own --manifests, --config
        // and --configmap.
        let source = Source::open(
            cli.dir.as_deref(),
            cli.config.as_deref(),
            cli.configmap.as_deref(),
        )
        .await
        .map_err(|e| e.to_string())?;
        let loaded = reload::load_listed(&source, Duration::from_secs(30))
            .await
            .map_err(|e| format!("configuration not loaded: {e}"))?;
        explain::explain(&loaded, &cli.hostname, &envelope)
            .await
            .map_err(|e| e.to_string())
    });
    let explanation = match explained {
        Ok(explanation) => explanation,
        Err(e) => {
            eprintln!("explain: {e}");
            return ExitCode::from(2);
        }
    };
    match cli.output {
        Output::Text => print!("{}", explain::render_text(&explanation)),
        Output::Json => match serde_json::to_string_pretty(&explanation) {
            Ok(json) => println!("{json}"),
            Err(e) => {
                eprintln!("explain: {e}");
                return ExitCode::from(2);
            }
        },
    }
    if explanation.accepted() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
