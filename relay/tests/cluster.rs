//! `--configmap`: the operator's ConfigMap(s) and Secret followed through the Kubernetes API
//! with watches, against a fake API server that lists and streams watch events over real TLS
//! (`support::kube_api`), reached through a kubeconfig whose user has a `tokenFile`, as a pod's
//! service account is. In-process: whole and split documents load with their credentials, an
//! incomplete split is refused, a missing ConfigMap is a clear error, a relay waits for its
//! ConfigMap at first install, a change is in force within a second, also after `410 Gone`, and
//! a token file that changes is used on the next request. The real binary: in steady state it
//! makes no request but its watches, and an API down for 30 s leaves it serving on the
//! generation in force, `mailroute_relay_config_source_up` 0 and one log line, until the API is
//! back (1 again, without a restart).

mod support;

use base64::Engine;
use mailroute_relay::cluster::{ClusterSource, connect};
use mailroute_relay::reload::{self, Source};
use prometheus_client::registry::Registry;
use serde_json::{Value, json};
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::kube_api::FakeApi;

const INDEX: &str = "mailroute-relay-config";
const SECRET: &str = "mailroute-relay-credentials";

/// The compiled document of one tenant; `licenses` makes documents differ.
fn document_json(generation: u64, licenses: u32) -> String {
    let compiled = support::compile_yaml(&format!(
        r#"
apiVersion: mailroute.io/v1alpha1
kind: MailRoute
metadata: {{name: mailbox, namespace: mail}}
spec: {{host: 127.0.0.1, port: 2525, tls: {{mode: Disabled}}}}
---
apiVersion: mailroute.io/v1alpha1
kind: RelayPolicy
metadata: {{name: example, namespace: mail}}
spec:
  domains: [example.com]
  licenses: {licenses}
  inboundRoute: mailbox
  authentication: {{requireSMTPAuth: true, credentialsSecretRef: {{name: accounts}}}}
---
apiVersion: v1
kind: Secret
metadata: {{name: accounts, namespace: mail}}
stringData: {{app: s3cret}}
"#
    ));
    serde_json::to_string(&compiled.document(generation)).unwrap_or_default()
}

fn index(generation: u64, licenses: u32) -> Value {
    json!({"metadata": {"annotations": {"mailroute.io/parts": "1"}},
        "data": {"config.json": document_json(generation, licenses)}})
}

fn secret_with(password: &str) -> Value {
    let credentials = json!({"tenants": {"example": {"app": password}}}).to_string();
    json!({"data": {"credentials.json": base64::engine::general_purpose::STANDARD.encode(credentials)}})
}

/// A fake API server and a kubeconfig for it, with the token in a file.
struct Cluster {
    api: FakeApi,
    token: PathBuf,
    kubeconfig: PathBuf,
    _certs: support::CertFiles,
    _dir: tempfile::TempDir,
}

impl Cluster {
    async fn start() -> Self {
        let certs = support::cert_files(&["localhost"]);
        let api = FakeApi::start(&certs).await;
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let token = dir.path().join("token");
        std::fs::write(&token, "pod-token\n").unwrap_or_else(|e| panic!("{e}"));
        let kubeconfig = api.kubeconfig(dir.path(), &certs.cert, &token);
        Self {
            api,
            token,
            kubeconfig,
            _certs: certs,
            _dir: dir,
        }
    }

    /// A cluster where the operator has published generation 7 and its Secret.
    async fn published() -> Self {
        let cluster = Self::start().await;
        cluster.publish(7, 5);
        cluster.api.put("secrets", SECRET, secret_with("s3cret"));
        cluster
    }

    /// The operator's objects for generation `generation`.
    fn publish(&self, generation: u64, licenses: u32) {
        self.api
            .put("configmaps", INDEX, index(generation, licenses));
    }

    async fn source(&self) -> Source {
        let client = connect(Some(&self.kubeconfig))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        Source::Cluster(Arc::new(ClusterSource::start(client, "mail", INDEX)))
    }
}

async fn loaded(source: &Source) -> Result<mailroute_relay::config_source::Loaded, String> {
    reload::load_listed(source, Duration::from_secs(10))
        .await
        .map_err(|e| e.to_string())
}

/// Polls `check` every 10 ms until it holds; panics naming `what` after `within`.
async fn within(what: &str, within: Duration, mut check: impl FnMut() -> bool) {
    let start = Instant::now();
    while !check() {
        assert!(start.elapsed() < within, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn a_whole_document_and_its_credentials_load_through_watches_with_the_token_file() {
    support::bounded(30, async {
        let cluster = Cluster::published().await;
        let source = cluster.source().await;
        let loaded = loaded(&source).await.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(loaded.document.generation, 7);
        assert_eq!(loaded.credentials.tenants["example"]["app"], "s3cret");
        let seen = cluster.api.requests();
        assert!(
            !seen.is_empty()
                && seen
                    .iter()
                    .all(|s| s.token.as_deref() == Some("Bearer pod-token")),
            "{seen:?}"
        );
        // Each object is listed by name, which a Role's resourceNames can allow.
        for (resource, name) in [("configmaps", INDEX), ("secrets", SECRET)] {
            assert!(
                seen.iter().any(|s| s.path.ends_with(resource)
                    && !s.is_watch()
                    && s.query
                        .contains(&format!("fieldSelector=metadata.name%3D{name}"))),
                "no list of {resource} {name}: {seen:?}"
            );
        }
    })
    .await;
}

#[tokio::test]
async fn a_split_document_loads_only_when_every_part_is_there() {
    use mailroute_config::parts::{part_key, split};
    support::bounded(30, async {
        let json = document_json(7, 5);
        let parts = split(&json, json.len() / 3 + 1);
        assert_eq!(parts.len(), 3);
        let cluster = Cluster::start().await;
        cluster.api.put(
            "configmaps",
            INDEX,
            json!({"metadata": {"annotations": {"mailroute.io/parts": "3"}}, "data": {}}),
        );
        cluster.api.put("secrets", SECRET, secret_with("s3cret"));
        for i in [0, 2] {
            cluster.api.put(
                "configmaps",
                &format!("{INDEX}-{i}"),
                json!({"data": {part_key(i, 3): parts[i]}}),
            );
        }
        let source = cluster.source().await;
        let refused = loaded(&source).await.map(|_| ());
        assert!(
            refused
                .as_ref()
                .is_err_and(|e| e.contains("part 1 of 3 is missing")),
            "{refused:?}"
        );
        cluster.api.put(
            "configmaps",
            &format!("{INDEX}-1"),
            json!({"data": {part_key(1, 3): parts[1]}}),
        );
        let added = Instant::now();
        while let Err(e) = loaded(&source).await {
            assert!(
                added.elapsed() < Duration::from_secs(1),
                "not complete within 1 s: {e}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
}

#[tokio::test]
async fn a_missing_config_map_is_a_clear_error() {
    support::bounded(30, async {
        let cluster = Cluster::start().await;
        let source = cluster.source().await;
        let e = loaded(&source).await.map(|_| ());
        assert!(
            e.as_ref()
                .is_err_and(|e| e.contains("configmap mail/mailroute-relay-config does not exist")),
            "{e:?}"
        );
    })
    .await;
}

/// `AUTH PLAIN` as `app` over implicit TLS; the reply.
async fn auth(relay: &support::Relay, password: &str) -> String {
    let mut c = support::Client::connect_tls(relay.smtps, &relay.certs.cert_pem).await;
    c.reply().await;
    c.command("EHLO client.test").await;
    let token = base64::engine::general_purpose::STANDARD.encode(format!("\0app\0{password}"));
    c.command(&format!("AUTH PLAIN {token}")).await
}

/// An in-process relay serving `source`'s first configuration, with the reload watch running.
async fn serving(source: Source) -> (support::Relay, tokio::task::JoinHandle<()>, Registry) {
    let mut registry = Registry::default();
    let metrics = Arc::new(mailroute_relay::metrics::Metrics::register(&mut registry));
    let builder = Arc::new(support::builder(
        support::Stores::memory(),
        Arc::clone(&metrics),
    ));
    let relay = support::Relay::start(support::Options {
        metrics: Some(metrics),
        ..support::Options::default()
    })
    .await;
    let first = loaded(&source).await.unwrap_or_else(|e| panic!("{e}"));
    relay
        .shared
        .install(builder.generation(&first).unwrap_or_else(|e| panic!("{e}")));
    let build: Arc<reload::Build> =
        Arc::new(move |l| builder.generation(l).map_err(|e| e.to_string()));
    let watch = tokio::spawn(reload::watch(
        source,
        Duration::from_secs(3600),
        Arc::clone(&relay.shared),
        build,
    ));
    (relay, watch, registry)
}

fn text(registry: &Registry) -> String {
    let mut out = String::new();
    let _ = prometheus_client::encoding::text::encode(&mut out, registry);
    out
}

#[tokio::test]
async fn a_password_rotated_in_the_secret_is_in_force_within_a_second() {
    support::bounded(60, async {
        let cluster = Cluster::published().await;
        let (relay, watch, _registry) = serving(cluster.source().await).await;
        assert!(auth(&relay, "s3cret").await.starts_with("235"));
        // Only the Secret changes; the ConfigMap (and the document's hash) stay as they were.
        let before = relay.shared.generation.load().hash.clone();
        cluster.api.put("secrets", SECRET, secret_with("rotated"));
        within("the rotated password", Duration::from_secs(1), || {
            relay.shared.generation.load().hash != before
        })
        .await;
        assert!(auth(&relay, "rotated").await.starts_with("235"));
        assert!(
            auth(&relay, "s3cret").await.starts_with("535"),
            "the old password still works"
        );
        watch.abort();
    })
    .await;
}

#[tokio::test]
async fn a_change_is_in_force_within_a_second_also_after_the_watch_expired_with_410_gone() {
    support::bounded(60, async {
        let cluster = Cluster::published().await;
        let (relay, watch, registry) = serving(cluster.source().await).await;
        let generation = || relay.shared.generation.load().number;
        assert_eq!(generation(), 7);
        cluster.publish(8, 6);
        within("generation 8", Duration::from_secs(1), || generation() == 8).await;

        // The history is compacted: each watch gets 410 Gone and must list again.
        let lists = || {
            cluster
                .api
                .requests()
                .iter()
                .filter(|s| !s.is_watch())
                .count()
        };
        let before = lists();
        cluster.api.expire();
        within("a new list after 410 Gone", Duration::from_secs(10), || {
            lists() >= before + 2 && cluster.api.open_watches() >= 2
        })
        .await;
        cluster.publish(9, 7);
        within(
            "generation 9 after the re-list",
            Duration::from_secs(1),
            || generation() == 9,
        )
        .await;
        let errors = support::metric_value(
            &text(&registry),
            "mailroute_relay_config_reloads_total{result=\"error\"}",
        );
        assert_eq!(errors, 0.0, "a 410 is not a refused configuration");
        watch.abort();
    })
    .await;
}

#[tokio::test]
async fn a_token_file_that_changes_is_used_on_the_next_request() {
    support::bounded(60, async {
        let cluster = Cluster::published().await;
        let source = cluster.source().await;
        loaded(&source).await.unwrap_or_else(|e| panic!("{e}"));
        within("two watches", Duration::from_secs(5), || {
            cluster.api.open_watches() >= 2
        })
        .await;
        // The kubelet (or an administrator) replaces the token; the server then ends the watches.
        std::fs::write(&cluster.token, "rotated-token\n").unwrap_or_else(|e| panic!("{e}"));
        let rotated = Instant::now();
        cluster.api.close_watches();
        within("new watches", Duration::from_secs(10), || {
            cluster
                .api
                .requests()
                .iter()
                .filter(|s| s.at > rotated)
                .count()
                >= 2
        })
        .await;
        let after: Vec<_> = cluster
            .api
            .requests()
            .into_iter()
            .filter(|s| s.at > rotated)
            .collect();
        assert!(
            after
                .iter()
                .all(|s| s.token.as_deref() == Some("Bearer rotated-token")),
            "{after:?}"
        );
    })
    .await;
}

#[tokio::test]
async fn at_first_install_a_relay_waits_for_its_config_map_instead_of_exiting() {
    support::bounded(30, async {
        // The relay starts before the operator has published anything.
        let cluster = Cluster::start().await;
        let source = cluster.source().await;
        let waiting = tokio::spawn(async move {
            reload::first_load(&source, Duration::from_secs(60))
                .await
                .map(|loaded| loaded.document.generation)
                .map_err(|e| e.to_string())
        });
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert!(
            !waiting.is_finished(),
            "gave up while the ConfigMap does not exist"
        );
        // The operator publishes: the relay starts on it, woken by the watch (not the minute-long retry).
        cluster.publish(7, 5);
        cluster.api.put("secrets", SECRET, secret_with("s3cret"));
        let published = Instant::now();
        let generation = waiting.await.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(generation, Ok(7));
        assert!(published.elapsed() < Duration::from_secs(1));
    })
    .await;
}

#[tokio::test]
async fn a_configuration_file_that_is_missing_is_still_an_error_at_once() {
    let source = Source::Document("/nonexistent/mailroute/config.json".into());
    let result = reload::first_load(&source, Duration::from_secs(60)).await;
    assert!(result.is_err());
}

// The real binary.

/// The relay binary on `--configmap mail/mailroute-relay-config` through `cluster`'s kubeconfig,
/// its log in a file.
struct Binary {
    smtp: SocketAddr,
    admin: SocketAddr,
    log: PathBuf,
    _process: support::Process,
}

impl Binary {
    fn start(cluster: &Cluster) -> Self {
        let port = support::sink::free_port;
        let smtp: SocketAddr = format!("127.0.0.1:{}", port())
            .parse()
            .unwrap_or_else(|e| panic!("{e}"));
        let admin: SocketAddr = format!("127.0.0.1:{}", port())
            .parse()
            .unwrap_or_else(|e| panic!("{e}"));
        let log = cluster._dir.path().join("relay.log");
        let file = std::fs::File::create(&log).unwrap_or_else(|e| panic!("{e}"));
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_mailroute-relay"))
            .args([
                "--configmap",
                &format!("mail/{INDEX}"),
                "--hostname",
                "relay.test",
            ])
            .args(["--smtp", &smtp.to_string(), "--admin", &admin.to_string()])
            .env("KUBECONFIG", &cluster.kubeconfig)
            .env_remove("RUST_LOG")
            .env_remove("KUBERNETES_SERVICE_HOST")
            .stdout(std::process::Stdio::null())
            .stderr(file)
            .spawn()
            .unwrap_or_else(|e| panic!("{e}"));
        let process = support::Process(child);
        support::wait_port(smtp);
        Self {
            smtp,
            admin,
            log,
            _process: process,
        }
    }

    fn metric(&self, name: &str) -> f64 {
        support::metric_value(&support::http_get(self.admin, "/metrics").1, name)
    }

    fn log_lines(&self, containing: &str) -> usize {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains(containing))
            .count()
    }

    /// The greeting and the reply to EHLO.
    fn ehlo(&self) -> String {
        let Ok(stream) = TcpStream::connect(self.smtp) else {
            return String::new();
        };
        let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
        let mut writer = stream.try_clone().unwrap_or_else(|e| panic!("{e}"));
        let mut reader = BufReader::new(stream);
        let mut line = String::new();
        let _ = reader.read_line(&mut line);
        let _ = writer.write_all(b"EHLO client.test\r\n");
        let mut reply = String::new();
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                break;
            }
            reply.push_str(&line);
            if line.as_bytes().get(3) == Some(&b' ') {
                break;
            }
        }
        let _ = writer.write_all(b"QUIT\r\n");
        reply
    }
}

/// Polls `check` every 50 ms (blocking) until it holds; panics naming `what` after `within`.
fn until(what: &str, within: Duration, mut check: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !check() {
        assert!(start.elapsed() < within, "{what}: not within {within:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
    start.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_steady_state_the_relay_makes_no_request_but_its_watches() {
    support::bounded(120, async {
        let cluster = Cluster::start().await;
        // The server ends each watch after 25 s, as a real one does after its timeout: the relay
        // watches again from where it was, without listing.
        cluster.api.end_watches_after(Duration::from_secs(25));
        cluster.publish(7, 5);
        cluster.api.put("secrets", SECRET, secret_with("s3cret"));
        let relay = tokio::task::block_in_place(|| {
            let relay = Binary::start(&cluster);
            until("ready", Duration::from_secs(10), || {
                support::http_get(relay.admin, "/readyz").0 == 200
            });
            relay
        });
        let steady = Instant::now();
        tokio::time::sleep(Duration::from_secs(60)).await;
        let during: Vec<_> = cluster
            .api
            .requests()
            .into_iter()
            .filter(|s| s.at > steady)
            .collect();
        assert!(
            during.iter().all(support::kube_api::Seen::is_watch),
            "requests other than watches in steady state: {during:?}"
        );
        assert!(
            during.len() >= 4,
            "the watches were not renewed: {during:?}"
        );
        assert!(
            during.iter().all(|s| s.query.contains("resourceVersion=")),
            "a watch started over instead of resuming: {during:?}"
        );
        assert!(
            during.len() <= 8,
            "{} watches in 60 s for two objects",
            during.len()
        );
        tokio::task::block_in_place(|| {
            assert_eq!(relay.metric("mailroute_relay_config_source_up"), 1.0);
            // A change is in force within a second.
            cluster.publish(8, 6);
            until("generation 8", Duration::from_secs(1), || {
                relay.metric("mailroute_relay_config_generation") == 8.0
            });
        });
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_api_down_for_30_seconds_leaves_the_relay_serving_and_it_recovers_without_a_restart() {
    support::bounded(150, async {
        let cluster = Cluster::published().await;
        let relay = tokio::task::block_in_place(|| {
            let relay = Binary::start(&cluster);
            until("ready", Duration::from_secs(10), || {
                support::http_get(relay.admin, "/readyz").0 == 200
            });
            relay
        });
        cluster.api.set_down(true);
        tokio::task::block_in_place(|| {
            until("config_source_up 0", Duration::from_secs(15), || {
                relay.metric("mailroute_relay_config_source_up") == 0.0
            });
        });
        tokio::time::sleep(Duration::from_secs(30)).await;
        tokio::task::block_in_place(|| {
            // Serving on the generation in force all along.
            assert_eq!(support::http_get(relay.admin, "/readyz").0, 200);
            assert_eq!(relay.metric("mailroute_relay_config_generation"), 7.0);
            assert_eq!(relay.metric("mailroute_relay_config_source_up"), 0.0);
            assert!(
                relay.ehlo().starts_with("250"),
                "not serving while the API is down"
            );
            // Logged once while it lasts (at most once a minute), not once per retry.
            assert_eq!(relay.log_lines("cannot be watched"), 1);
        });
        cluster.api.set_down(false);
        tokio::task::block_in_place(|| {
            // The watches retry every 5 s (and a fifth) at most.
            let back = until("config_source_up 1 again", Duration::from_secs(10), || {
                relay.metric("mailroute_relay_config_source_up") == 1.0
            });
            eprintln!("the API was watched again {back:?} after it came back");
            assert_eq!(relay.log_lines("watched again"), 1);
            cluster.publish(8, 6);
            until(
                "generation 8 after the outage",
                Duration::from_secs(1),
                || relay.metric("mailroute_relay_config_generation") == 8.0,
            );
        });
    })
    .await;
}

/// Following the cluster without `--jwks-file`, the relay asks the API server for the
/// service-account issuer's keys: tokens are refused until they answer, then checked, and a
/// key the issuer publishes later is taken at the next refresh.
#[tokio::test]
async fn service_account_tokens_are_checked_against_the_keys_the_api_server_publishes() {
    use mailroute_relay::auth::tokens::{TokenError, TokenKeys};
    use support::issuer::{IssuerKey, jwks};
    support::bounded(30, async {
        let cluster = Cluster::start().await;
        let client = connect(Some(&cluster.kubeconfig))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let issuer = IssuerKey::es256("cluster-1");
        let subject = "system:serviceaccount:mail:ticketing";
        let token = issuer.token(subject, "mailroute", 600);
        let keys = TokenKeys::empty("mailroute");
        // No tenant lists a service account yet: nothing is asked.
        let follow = mailroute_relay::cluster::follow_issuer_keys(client, keys.clone());
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(
            !cluster
                .api
                .requests()
                .iter()
                .any(|s| s.path == "/openid/v1/jwks")
        );
        // Now one does (a generation with serviceAccounts calls this), but the keys are not
        // published yet: the request fails and tokens are refused.
        keys.want();
        within(
            "the first request for the keys",
            Duration::from_secs(5),
            || {
                cluster
                    .api
                    .requests()
                    .iter()
                    .any(|s| s.path == "/openid/v1/jwks")
            },
        )
        .await;
        assert_eq!(
            keys.verify(&token),
            Err(TokenError::UnknownKey("cluster-1".into()))
        );
        follow.abort();
        // Published: asked again (at start here; every 10 minutes, or 30 s after a failure,
        // when running), and the token verifies with the API server's bearer token.
        cluster.api.set_issuer_keys(&jwks(&[&issuer]));
        let client = connect(Some(&cluster.kubeconfig))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let follow = mailroute_relay::cluster::follow_issuer_keys(client, keys.clone());
        within(
            "the keys from the API server",
            Duration::from_secs(5),
            || keys.verify(&token).is_ok(),
        )
        .await;
        assert_eq!(keys.verify(&token).as_deref(), Ok(subject));
        let asked: Vec<_> = cluster
            .api
            .requests()
            .into_iter()
            .filter(|s| s.path == "/openid/v1/jwks")
            .collect();
        assert!(
            asked.len() == 2
                && asked
                    .iter()
                    .all(|s| s.token.as_deref() == Some("Bearer pod-token")),
            "{asked:?}"
        );
        follow.abort();
    })
    .await;
}
