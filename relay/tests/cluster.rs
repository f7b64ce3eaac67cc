//! `--configmap`: reading the operator's ConfigMap(s) and Secret from the Kubernetes API,
//! against a fake API server over real TLS (an rcgen certificate as the cluster CA): the
//! bearer token is sent, whole and split documents load with their credentials, an
//! incomplete split is refused, a missing ConfigMap is a clear error, and at first install the
//! relay waits for it rather than exiting.

mod support;

use base64::Engine;
use mailroute_relay::cluster::{ApiSource, ClusterError, parse_name};
use mailroute_relay::reload::Source;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Path -> JSON object; every request's Authorization header is recorded.
#[derive(Clone, Default)]
struct FakeApi {
    objects: Arc<Mutex<BTreeMap<String, Value>>>,
    tokens: Arc<Mutex<Vec<String>>>,
}

impl FakeApi {
    fn put(&self, path: &str, object: Value) {
        self.objects
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(path.to_owned(), object);
    }

    async fn serve(self, certs: &support::CertFiles) -> std::net::SocketAddr {
        let store = mailroute_relay::server::tls::CertificateStore::load(&certs.cert, &certs.key)
            .unwrap_or_else(|e| panic!("{e}"));
        let acceptor = tokio_rustls::TlsAcceptor::from(
            store.server_config().unwrap_or_else(|e| panic!("{e}")),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let addr = listener.local_addr().unwrap_or_else(|e| panic!("{e}"));
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (acceptor, api) = (acceptor.clone(), self.clone());
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let mut head = Vec::new();
                    let mut buf = [0u8; 1024];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        match tls.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                    }
                    let head = String::from_utf8_lossy(&head).into_owned();
                    let path = head.split_whitespace().nth(1).unwrap_or("/").to_owned();
                    for line in head.lines() {
                        if let Some(v) = line.strip_prefix("authorization: ") {
                            api.tokens
                                .lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .push(v.to_owned());
                        }
                    }
                    let found = api
                        .objects
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .get(&path)
                        .cloned();
                    let (status, body) = match found {
                        Some(o) => ("200 OK", o.to_string()),
                        None => (
                            "404 Not Found",
                            json!({"kind": "Status", "code": 404}).to_string(),
                        ),
                    };
                    let response = format!(
                        "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = tls.write_all(response.as_bytes()).await;
                    let _ = tls.shutdown().await;
                });
            }
        });
        addr
    }
}

const CM: &str = "/api/v1/namespaces/mail/configmaps";
const SECRET: &str = "/api/v1/namespaces/mail/secrets/mailroute-relay-credentials";

fn document_json() -> String {
    let compiled = support::compile_yaml(
        r#"
apiVersion: mailroute.io/v1alpha1
kind: MailRoute
metadata: {name: mailbox, namespace: mail}
spec: {host: 127.0.0.1, port: 2525, tls: {mode: Disabled}}
---
apiVersion: mailroute.io/v1alpha1
kind: RelayPolicy
metadata: {name: example, namespace: mail}
spec:
  domains: [example.com]
  licenses: 5
  inboundRoute: mailbox
  authentication: {requireSMTPAuth: true, credentialsSecretRef: {name: accounts}}
---
apiVersion: v1
kind: Secret
metadata: {name: accounts, namespace: mail}
stringData: {app: s3cret}
"#,
    );
    serde_json::to_string(&compiled.document(7)).unwrap_or_default()
}

fn secret() -> Value {
    secret_with("s3cret")
}

fn secret_with(password: &str) -> Value {
    let credentials = json!({"tenants": {"example": {"app": password}}}).to_string();
    json!({"data": {"credentials.json": base64::engine::general_purpose::STANDARD.encode(credentials)}})
}

async fn source(api: FakeApi) -> (Source, FakeApi, support::CertFiles) {
    let certs = support::cert_files(&["localhost"]);
    let addr = api.clone().serve(&certs).await;
    let (ns, name) = parse_name("mail/mailroute-relay-config").unwrap_or_else(|e| panic!("{e}"));
    let source = ApiSource::new(
        &format!("https://localhost:{}", addr.port()),
        Some("pod-token".into()),
        certs.cert_pem.as_bytes(),
        &ns,
        &name,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    (Source::Cluster(Arc::new(source)), api, certs)
}

#[tokio::test]
async fn a_whole_document_and_its_credentials_load_with_the_pods_token() {
    let api = FakeApi::default();
    api.put(
        &format!("{CM}/mailroute-relay-config"),
        json!({"metadata": {"annotations": {"mailroute.io/parts": "1"}}, "data": {"config.json": document_json()}}),
    );
    api.put(SECRET, secret());
    let (source, api, _certs) = source(api).await;
    let loaded = source.load(1).await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(loaded.document.generation, 7);
    assert_eq!(loaded.credentials.tenants["example"]["app"], "s3cret");
    let tokens = api.tokens.lock().unwrap_or_else(|e| e.into_inner()).clone();
    assert!(
        !tokens.is_empty() && tokens.iter().all(|t| t == "Bearer pod-token"),
        "{tokens:?}"
    );
}

#[tokio::test]
async fn a_split_document_loads_only_when_every_part_is_there() {
    use mailroute_config::parts::{part_key, split};
    let json = document_json();
    let parts = split(&json, json.len() / 3 + 1);
    assert_eq!(parts.len(), 3);
    let api = FakeApi::default();
    api.put(
        &format!("{CM}/mailroute-relay-config"),
        json!({"metadata": {"annotations": {"mailroute.io/parts": "3"}}, "data": {}}),
    );
    api.put(SECRET, secret());
    for i in [0, 2] {
        api.put(
            &format!("{CM}/mailroute-relay-config-{i}"),
            json!({"data": {part_key(i, 3): parts[i]}}),
        );
    }
    let (source, api, _certs) = source(api).await;
    let refused = source.load(1).await.map(|_| ()).map_err(|e| e.to_string());
    assert!(
        refused
            .as_ref()
            .is_err_and(|e| e.contains("part 1 of 3 is missing")),
        "{refused:?}"
    );
    api.put(
        &format!("{CM}/mailroute-relay-config-1"),
        json!({"data": {part_key(1, 3): parts[1]}}),
    );
    let loaded = source.load(1).await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(loaded.document.generation, 7);
}

#[tokio::test]
async fn a_missing_config_map_is_a_clear_error() {
    let (source, _api, _certs) = source(FakeApi::default()).await;
    let e = source.load(1).await.map(|_| ()).map_err(|e| e.to_string());
    assert!(
        e.as_ref()
            .is_err_and(|e| e.contains("configmaps/mailroute-relay-config: HTTP 404")),
        "{e:?}"
    );
    assert!(matches!(parse_name("no-slash"), Err(ClusterError::Name(_))));
}

/// `AUTH PLAIN` as `app` over implicit TLS; the reply.
async fn auth(relay: &support::Relay, password: &str) -> String {
    let mut c = support::Client::connect_tls(relay.smtps, &relay.certs.cert_pem).await;
    c.reply().await;
    c.command("EHLO client.test").await;
    let token = base64::engine::general_purpose::STANDARD.encode(format!("\0app\0{password}"));
    c.command(&format!("AUTH PLAIN {token}")).await
}

#[tokio::test]
async fn a_password_rotated_in_the_secret_is_in_force_within_a_second() {
    support::bounded(60, async {
        let api = FakeApi::default();
        api.put(
            &format!("{CM}/mailroute-relay-config"),
            json!({"metadata": {"annotations": {"mailroute.io/parts": "1"}}, "data": {"config.json": document_json()}}),
        );
        api.put(SECRET, secret());
        let (source, api, _certs) = source(api).await;
        let mut registry = prometheus_client::registry::Registry::default();
        let metrics = Arc::new(mailroute_relay::metrics::Metrics::register(&mut registry));
        let builder = Arc::new(support::builder(support::Stores::memory(), metrics));
        let relay = support::Relay::start(support::Options::default()).await;
        let loaded = source.load(1).await.unwrap_or_else(|e| panic!("{e}"));
        relay
            .shared
            .install(builder.generation(&loaded).unwrap_or_else(|e| panic!("{e}")));
        let build: Arc<mailroute_relay::reload::Build> =
            Arc::new(move |l| builder.generation(l).map_err(|e| e.to_string()));
        let watch = tokio::spawn(mailroute_relay::reload::watch(
            source,
            std::time::Duration::from_millis(100),
            Arc::clone(&relay.shared),
            build,
        ));
        // NB: let the watch read the source once before it changes.
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        assert!(auth(&relay, "s3cret").await.starts_with("235"));
        // Only the Secret changes; the ConfigMap (and the document's hash) stay as they were.
        let before = relay.shared.generation.load().hash.clone();
        api.put(SECRET, secret_with("rotated"));
        let changed = std::time::Instant::now();
        while relay.shared.generation.load().hash == before {
            assert!(changed.elapsed() < std::time::Duration::from_secs(1), "not in force within a second");
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert!(auth(&relay, "rotated").await.starts_with("235"));
        assert!(auth(&relay, "s3cret").await.starts_with("535"), "the old password still works");
        watch.abort();
    })
    .await;
}

#[tokio::test]
async fn at_first_install_a_relay_waits_for_its_config_map_instead_of_exiting() {
    support::bounded(30, async {
        // The relay starts before the operator has published anything.
        let (source, api, _certs) = source(FakeApi::default()).await;
        let waiting = tokio::spawn(async move {
            mailroute_relay::reload::first_load(&source, std::time::Duration::from_millis(100))
                .await
                .map(|loaded| loaded.document.generation)
                .map_err(|e| e.to_string())
        });
        tokio::time::sleep(std::time::Duration::from_millis(600)).await;
        assert!(!waiting.is_finished(), "gave up while the ConfigMap does not exist");
        // The operator publishes: the relay starts on it.
        api.put(
            &format!("{CM}/mailroute-relay-config"),
            json!({"metadata": {"annotations": {"mailroute.io/parts": "1"}}, "data": {"config.json": document_json()}}),
        );
        api.put(SECRET, secret());
        let published = std::time::Instant::now();
        let generation = waiting.await.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(generation, Ok(7));
        assert!(published.elapsed() < std::time::Duration::from_secs(1));
    })
    .await;
}

#[tokio::test]
async fn a_configuration_file_that_is_missing_is_still_an_error_at_once() {
    let source = Source::Document("/nonexistent/mailroute/config.json".into());
    let result =
        mailroute_relay::reload::first_load(&source, std::time::Duration::from_secs(60)).await;
    assert!(result.is_err());
}
