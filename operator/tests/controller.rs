//! The controller against kube's mock-service pattern (`tower-test`, as kube-rs's controller-rs
//! does): a small in-memory API server answers the requests one reconcile makes, keeps what is
//! written, and logs every request, so each scenario checks what a user would see in the
//! cluster: the ConfigMap and Secret, the statuses, the Events, and that a steady state writes
//! nothing.

use http::{Method, Request, Response, StatusCode};
use kube::Client;
use kube::client::Body;
use mailroute_config::RelayDocument;
use mailroute_operator::controller::{self, Summary, publish};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

const NS: &str = "mail";
const CR: &str = "/apis/mailroute.io/v1alpha1/namespaces/mail";
const CORE: &str = "/api/v1/namespaces/mail";

/// An API server with objects kept by path (`<collection>/<name>`).
#[derive(Clone, Default)]
struct FakeApi {
    objects: Arc<Mutex<BTreeMap<String, Value>>>,
    /// (method, path) of every request.
    log: Arc<Mutex<Vec<(Method, String)>>>,
}

impl FakeApi {
    fn put(&self, collection: &str, object: Value) {
        let name = object["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        self.objects
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(format!("{collection}/{name}"), object);
    }

    fn get(&self, path: &str) -> Option<Value> {
        self.objects
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(path)
            .cloned()
    }

    fn writes(&self) -> Vec<(Method, String)> {
        self.log
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|(m, _)| *m != Method::GET)
            .cloned()
            .collect()
    }

    fn clear_log(&self) {
        self.log.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }

    fn respond(&self, method: &Method, path: &str, body: &[u8]) -> (StatusCode, Value) {
        self.log
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((method.clone(), path.to_owned()));
        let mut objects = self.objects.lock().unwrap_or_else(|e| e.into_inner());
        let not_found = || {
            (
                StatusCode::NOT_FOUND,
                json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                       "message": "not found", "reason": "NotFound", "code": 404}),
            )
        };
        match *method {
            Method::GET => {
                if let Some(o) = objects.get(path) {
                    return (StatusCode::OK, o.clone());
                }
                let items: Vec<Value> = objects
                    .iter()
                    .filter(|(k, _)| {
                        k.strip_prefix(path)
                            .and_then(|rest| rest.strip_prefix('/'))
                            .is_some_and(|rest| !rest.contains('/'))
                    })
                    .map(|(_, v)| v.clone())
                    .collect();
                let is_collection = ["mailroutes", "relaypolicies", "routingrules"]
                    .iter()
                    .any(|c| path.ends_with(c));
                if is_collection {
                    (
                        StatusCode::OK,
                        json!({"apiVersion": "mailroute.io/v1alpha1", "kind": "List",
                                            "metadata": {"resourceVersion": "1"}, "items": items}),
                    )
                } else {
                    not_found()
                }
            }
            Method::PATCH if path.ends_with("/status") => {
                let object_path = path.trim_end_matches("/status");
                let patch: Value = serde_json::from_slice(body).unwrap_or_default();
                match objects.get_mut(object_path) {
                    Some(o) => {
                        o["status"] = patch["status"].clone();
                        (StatusCode::OK, o.clone())
                    }
                    None => not_found(),
                }
            }
            Method::PATCH => {
                // Server-side apply of a whole object.
                let object: Value = serde_json::from_slice(body).unwrap_or_default();
                objects.insert(path.to_owned(), object.clone());
                (StatusCode::OK, object)
            }
            Method::PUT => {
                // Replace: only over the version the writer read (optimistic concurrency).
                let mut object: Value = serde_json::from_slice(body).unwrap_or_default();
                let Some(stored) = objects.get(path) else {
                    return not_found();
                };
                if stored["metadata"]["resourceVersion"] != object["metadata"]["resourceVersion"] {
                    return (
                        StatusCode::CONFLICT,
                        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                               "message": "the object has been modified", "reason": "Conflict", "code": 409}),
                    );
                }
                let version: u64 = stored["metadata"]["resourceVersion"]
                    .as_str()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
                object["metadata"]["resourceVersion"] = json!((version + 1).to_string());
                objects.insert(path.to_owned(), object.clone());
                (StatusCode::OK, object)
            }
            Method::POST => {
                let mut object: Value = serde_json::from_slice(body).unwrap_or_default();
                object["metadata"]["resourceVersion"] = json!("1");
                let name = object["metadata"]["name"]
                    .as_str()
                    .map(str::to_owned)
                    .unwrap_or_else(|| format!("generated-{}", objects.len()));
                object["metadata"]["name"] = json!(name);
                objects.insert(format!("{path}/{name}"), object.clone());
                (StatusCode::CREATED, object)
            }
            _ => not_found(),
        }
    }

    /// A client served by this API server until the returned task is dropped.
    fn client(&self) -> (Client, tokio::task::JoinHandle<()>) {
        let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let api = self.clone();
        let task = tokio::spawn(async move {
            while let Some((request, send)) = handle.next_request().await {
                let method = request.method().clone();
                let path = request.uri().path().to_owned();
                let body = request
                    .into_body()
                    .collect_bytes()
                    .await
                    .unwrap_or_default();
                let (status, value) = api.respond(&method, &path, &body);
                let response = Response::builder()
                    .status(status)
                    .body(Body::from(serde_json::to_vec(&value).unwrap_or_default()))
                    .unwrap_or_else(|e| panic!("{e}"));
                send.send_response(response);
            }
        });
        (Client::new(service, NS), task)
    }
}

fn resource(kind: &str, name: &str, generation: i64, spec: Value) -> Value {
    json!({
        "apiVersion": "mailroute.io/v1alpha1",
        "kind": kind,
        "metadata": {"name": name, "namespace": NS, "uid": format!("uid-{name}"),
                     "generation": generation, "resourceVersion": "1"},
        "spec": spec
    })
}

/// A namespace with a mailbox route, a tenant with SMTP AUTH accounts, and a rule.
fn seed(api: &FakeApi) {
    api.put(
        &format!("{CR}/mailroutes"),
        resource(
            "MailRoute",
            "mailbox",
            1,
            json!({"host": "mail.example.com"}),
        ),
    );
    api.put(
        &format!("{CR}/relaypolicies"),
        resource(
            "RelayPolicy",
            "example",
            2,
            json!({"domains": ["example.com"], "licenses": 10, "inboundRoute": "mailbox",
                   "authentication": {"requireSMTPAuth": true,
                                      "credentialsSecretRef": {"name": "relay-accounts"}}}),
        ),
    );
    api.put(
        &format!("{CR}/routingrules"),
        resource(
            "RoutingRule",
            "archive",
            1,
            json!({"policyRef": "example", "priority": 10, "messages": ["Inbound"],
                   "actions": {"route": "mailbox"}}),
        ),
    );
    api.put(
        &format!("{CORE}/secrets"),
        json!({"apiVersion": "v1", "kind": "Secret",
               "metadata": {"name": "relay-accounts", "namespace": NS},
               "stringData": {"app": "s3cret-password"}}),
    );
}

async fn reconcile(api: &FakeApi) -> Summary {
    let (client, task) = api.client();
    let recorder = controller::recorder(client.clone());
    let summary = controller::reconcile_namespace(&client, &recorder, NS, "2026-11-22T12:00:00Z")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    task.abort();
    summary
}

fn ready(api: &FakeApi, collection: &str, name: &str) -> (String, String) {
    let o = api
        .get(&format!("{CR}/{collection}/{name}"))
        .unwrap_or_default();
    let conditions = o["status"]["conditions"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let c = conditions
        .iter()
        .find(|c| c["type"] == "Ready")
        .cloned()
        .unwrap_or_default();
    (
        c["status"].as_str().unwrap_or_default().to_owned(),
        c["message"].as_str().unwrap_or_default().to_owned(),
    )
}

fn document(api: &FakeApi) -> RelayDocument {
    let cm = api
        .get(&format!("{CORE}/configmaps/{}", publish::CONFIG_MAP))
        .unwrap_or_else(|| panic!("no ConfigMap"));
    let json = cm["data"][publish::DOCUMENT_KEY]
        .as_str()
        .unwrap_or_default();
    RelayDocument::from_json(json.as_bytes()).unwrap_or_else(|e| panic!("{e}"))
}

/// The credentials the operator published in the relay's Secret, decoded.
fn published_credentials(api: &FakeApi) -> Vec<u8> {
    use base64::Engine;
    let secret = api
        .get(&format!("{CORE}/secrets/{}", publish::SECRET))
        .unwrap_or_default();
    let encoded = secret["data"][publish::CREDENTIALS_KEY]
        .as_str()
        .unwrap_or_default();
    base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .unwrap_or_default()
}

#[tokio::test]
async fn a_new_namespace_gets_its_document_credentials_and_ready_statuses() {
    let api = FakeApi::default();
    seed(&api);
    let s = reconcile(&api).await;
    assert!(s.document_written && s.credentials_written, "{s:?}");
    assert_eq!(
        (s.generation, s.invalid, s.statuses_patched, s.events),
        (1, 0, 3, 0)
    );

    let doc = document(&api);
    assert_eq!(doc.generation, 1);
    assert!(doc.config.routes.contains_key("mailbox"));
    assert!(doc.config.tenants.contains_key("example"));
    let cm = api
        .get(&format!("{CORE}/configmaps/{}", publish::CONFIG_MAP))
        .unwrap_or_default();
    assert!(
        !cm.to_string().contains("s3cret-password"),
        "no credential in a ConfigMap"
    );
    assert_eq!(cm["metadata"]["ownerReferences"][0]["uid"], "uid-example");
    let secret = api
        .get(&format!("{CORE}/secrets/{}", publish::SECRET))
        .unwrap_or_default();
    assert!(secret["data"][publish::CREDENTIALS_KEY].is_string());

    for (collection, name) in [
        ("mailroutes", "mailbox"),
        ("relaypolicies", "example"),
        ("routingrules", "archive"),
    ] {
        assert_eq!(
            ready(&api, collection, name).0,
            "True",
            "{collection}/{name}"
        );
    }
    let policy = api
        .get(&format!("{CR}/relaypolicies/example"))
        .unwrap_or_default();
    assert_eq!(policy["status"]["observedGeneration"], 2);
    // Counts and the limits in force (10 licenses: 1,300 recipients a day, 90 per 10 minutes).
    assert_eq!(policy["status"]["users"], 0);
    assert_eq!(policy["status"]["enabledRanges"], 0);
    assert_eq!(
        policy["status"]["effectiveLimits"]["perCustomerRecipientsPerDay"],
        1300
    );
    assert_eq!(
        policy["status"]["effectiveLimits"]["perCustomerRecipientsPer10Minutes"],
        90
    );
    // Applies go through server-side apply with the operator's field manager.
    assert!(
        api.writes()
            .iter()
            .any(|(m, p)| *m == Method::PATCH && p.ends_with(publish::CONFIG_MAP))
    );
}

#[tokio::test]
async fn nothing_changed_means_nothing_written() {
    let api = FakeApi::default();
    seed(&api);
    reconcile(&api).await;
    api.clear_log();
    let s = reconcile(&api).await;
    assert_eq!(
        (
            s.generation,
            s.document_written,
            s.credentials_written,
            s.statuses_patched,
            s.events
        ),
        (1, false, false, 0, 0)
    );
    assert_eq!(api.writes(), Vec::new(), "a steady state writes nothing");
}

#[tokio::test]
async fn an_invalid_rule_is_reported_and_left_out_while_the_rest_is_published() {
    let api = FakeApi::default();
    seed(&api);
    api.put(
        &format!("{CR}/routingrules"),
        resource(
            "RoutingRule",
            "split",
            5,
            json!({"policyRef": "example", "priority": 5, "messages": ["Inbound"],
                   "actions": {"route": "legacy"}}),
        ),
    );
    let s = reconcile(&api).await;
    assert_eq!((s.invalid, s.events), (1, 1), "{s:?}");
    let (status, message) = ready(&api, "routingrules", "split");
    assert_eq!(status, "False");
    assert!(
        message.starts_with("actions.route:") && message.contains("legacy"),
        "{message}"
    );
    assert_eq!(ready(&api, "routingrules", "archive").0, "True");
    let doc = document(&api);
    let rules: Vec<&str> = doc.config.tenants["example"]
        .rules
        .iter()
        .map(|r| r.name.as_str())
        .collect();
    assert_eq!(rules, ["archive"]);
    let events: Vec<Value> = api
        .objects
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .filter(|(k, _)| k.contains("/events/"))
        .map(|(_, v)| v.clone())
        .collect();
    assert_eq!(events.len(), 1);
    assert_eq!(events[0]["reason"], "Invalid");
    assert_eq!(events[0]["regarding"]["name"], "split");

    // Not retried in a loop: the next pass repeats neither the status nor the Event.
    api.clear_log();
    let again = reconcile(&api).await;
    assert_eq!((again.statuses_patched, again.events), (0, 0));
    assert_eq!(api.writes(), Vec::new());
}

#[tokio::test]
async fn a_changed_referenced_secret_rewrites_the_credentials_only() {
    let api = FakeApi::default();
    seed(&api);
    reconcile(&api).await;
    api.put(
        &format!("{CORE}/secrets"),
        json!({"apiVersion": "v1", "kind": "Secret",
               "metadata": {"name": "relay-accounts", "namespace": NS},
               "stringData": {"app": "rotated-password"}}),
    );
    let s = reconcile(&api).await;
    assert!(s.credentials_written && !s.document_written, "{s:?}");
    assert!(String::from_utf8_lossy(&published_credentials(&api)).contains("rotated-password"));
}

#[tokio::test]
async fn a_document_over_the_object_limit_is_split_into_parts() {
    let api = FakeApi::default();
    seed(&api);
    let users: Vec<String> = (0..45_000)
        .map(|i| format!("user{i:05}@example.com"))
        .collect();
    let mut policy = api
        .get(&format!("{CR}/relaypolicies/example"))
        .unwrap_or_default();
    policy["spec"]["users"] = json!(users);
    api.put(&format!("{CR}/relaypolicies"), policy);
    let s = reconcile(&api).await;
    assert!(s.document_written);
    let index = api
        .get(&format!("{CORE}/configmaps/{}", publish::CONFIG_MAP))
        .unwrap_or_default();
    let parts: usize = index["metadata"]["annotations"][publish::PARTS_ANNOTATION]
        .as_str()
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    assert!(parts >= 2, "{parts} parts");
    let mut entries = BTreeMap::new();
    for i in 0..parts {
        let cm = api
            .get(&format!("{CORE}/configmaps/{}", publish::part_name(i)))
            .unwrap_or_else(|| panic!("part {i} missing"));
        let data: BTreeMap<String, String> =
            serde_json::from_value(cm["data"].clone()).unwrap_or_default();
        assert!(data.values().all(|d| d.len() <= publish::PART_BYTES));
        entries.extend(data);
    }
    // As a relay sees them: every part's keys in one directory.
    let json = mailroute_config::parts::assemble(&entries).unwrap_or_else(|e| panic!("{e}"));
    let doc = RelayDocument::from_json(json.as_bytes()).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(doc.config.tenants["example"].users.len(), 45_000);
}

#[tokio::test]
async fn one_replica_leads_and_another_takes_over_only_when_the_lease_lapses() {
    use mailroute_operator::controller::leader::Election;
    let api = FakeApi::default();
    let (client, task) = api.client();
    let a = Election::new(NS, "operator-a");
    let b = Election::new(NS, "operator-b");
    let lead = |e: &Election| {
        let (e, client) = (e.clone(), client.clone());
        async move { e.tick(&client).await.unwrap_or_else(|err| panic!("{err}")) }
    };
    assert!(lead(&a).await, "the first replica creates the Lease");
    assert!(!lead(&b).await, "the second follows");
    assert!(lead(&a).await, "the holder renews");
    assert!(!lead(&b).await);

    // The holder dies: its last renewal ages past the Lease duration.
    let path = "/apis/coordination.k8s.io/v1/namespaces/mail/leases/mailroute-operator";
    let mut lease = api.get(path).unwrap_or_else(|| panic!("no Lease"));
    let stale =
        k8s_openapi::jiff::Timestamp::now() - k8s_openapi::jiff::SignedDuration::from_secs(20);
    lease["spec"]["renewTime"] = json!(k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime(
        stale
    ));
    api.objects
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(path.to_owned(), lease);
    assert!(lead(&b).await, "the other replica takes over");
    assert!(
        !lead(&a).await,
        "and the old holder, back, no longer writes"
    );
    let lease = api.get(path).unwrap_or_default();
    assert_eq!(lease["spec"]["holderIdentity"], "operator-b");
    assert_eq!(lease["spec"]["leaseTransitions"], 1);
    task.abort();
}

/// The relays counted two messages and hold one connection on a route with `rateLimits`: the
/// probe's status write shows where each limit stands, read from the shared store.
#[tokio::test]
async fn a_probe_result_lands_in_the_route_status_next_to_ready() {
    let api = FakeApi::default();
    seed(&api);
    reconcile(&api).await;
    // The route's host is not reachable from here: the probe says so, Ready stays.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| panic!("{e}"));
    let mut manifests = mailroute_config::Manifests::default();
    manifests
        .add_yaml(
            std::path::Path::new("r.yaml"),
            &format!("apiVersion: mailroute.io/v1alpha1\nkind: MailRoute\nmetadata: {{name: mailbox, namespace: mail}}\nspec: {{host: 127.0.0.1, port: {closed}, tls: {{mode: Required}}, timeouts: {{connect: 1s}}, rateLimits: {{messagesPerMinute: 30, maxConcurrentConnections: 3}}}}\n"),
        )
        .unwrap_or_else(|e| panic!("{e}"));
    let inputs = manifests.namespaces.remove(NS).unwrap_or_default();
    let compiled = mailroute_config::compile(&inputs);
    let route = &compiled.config.routes["mailbox"];
    let store = mailroute_store::MemoryQuotaStore::default();
    let limits = route.rate_limits.clone().unwrap_or_default();
    let scope = mailroute_store::route_limits::scope("mailbox", &limits, None);
    let reserve = async |id: &str, counters: Vec<mailroute_store::Counter>| {
        use mailroute_store::QuotaStore;
        match store
            .reserve(id, &counters, std::time::Duration::from_secs(60))
            .await
        {
            Ok(mailroute_store::Reservation::Granted(reserved)) => mailroute_store::Hold {
                id: id.to_owned(),
                counters,
                reserved,
            },
            other => panic!("{other:?}"),
        }
    };
    let mut sent = Vec::new();
    for id in ["m1", "m2"] {
        sent.push(
            reserve(
                id,
                mailroute_store::route_limits::recipient_counters(&scope, &limits, true),
            )
            .await,
        );
    }
    mailroute_store::QuotaStore::finish(&store, &sent, true)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let _lease = reserve(
        "c1",
        mailroute_store::route_limits::connection_counter(&scope, &limits)
            .into_iter()
            .collect(),
    )
    .await;
    let usage = controller::usage::read(
        &store,
        "mailbox",
        route,
        &compiled.credentials,
        "2026-11-22T12:00:00Z",
    )
    .await;
    let (client, task) = api.client();
    let resolver =
        mailroute_smtp_client::hosts::Resolver::new(None).unwrap_or_else(|e| panic!("{e}"));
    let outcome = controller::probe::probe_and_report(
        &client,
        NS,
        "mailbox",
        route,
        &compiled.credentials,
        &resolver,
        "operator.test",
        "2026-11-22T12:00:00Z",
        usage,
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    task.abort();
    assert_eq!(outcome.status, "False");
    let route = api
        .get(&format!("{CR}/mailroutes/mailbox"))
        .unwrap_or_default();
    let conditions = route["status"]["conditions"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let kinds: Vec<(&str, &str)> = conditions
        .iter()
        .map(|c| {
            (
                c["type"].as_str().unwrap_or(""),
                c["status"].as_str().unwrap_or(""),
            )
        })
        .collect();
    assert_eq!(kinds, [("Ready", "True"), ("TLSVerified", "False")]);
    assert!(
        route["status"]["lastProbe"]["error"]
            .as_str()
            .is_some_and(|e| !e.is_empty()),
        "{route}"
    );
    assert_eq!(route["status"]["lastProbe"]["time"], "2026-11-22T12:00:00Z");
    assert_eq!(
        route["status"]["rateLimits"],
        json!({"time": "2026-11-22T12:00:00Z", "scope": "route:mailbox", "limits": [
            {"limit": "messages_per_minute", "used": 2, "max": 30},
            {"limit": "concurrent_connections", "used": 1, "max": 3}]})
    );
}

/// A Microsoft 365 route with OAuth whose client id and secret sit in two Secrets: the operator
/// reads both (it only reads referenced Secrets), the route is Ready, and the client secret
/// lands in the relay's credentials Secret, not the ConfigMap.
#[tokio::test]
async fn an_oauth_route_reads_its_secrets_and_publishes_them_as_credentials() {
    let api = FakeApi::default();
    seed(&api);
    api.put(
        &format!("{CR}/mailroutes"),
        resource(
            "MailRoute",
            "m365",
            1,
            json!({"host": "smtp.office365.com", "port": 587, "tls": {"mode": "Required"},
                   "auth": {"oauth2": {
                       "tokenURL": "https://login.microsoftonline.com/t/oauth2/v2.0/token",
                       "username": "relay@example.com",
                       "clientIDSecretRef": {"name": "m365-app", "key": "id"},
                       "clientSecretSecretRef": {"name": "m365-secret", "key": "secret"},
                       "scopes": ["https://outlook.office365.com/.default"]}}}),
        ),
    );
    for (name, key, value) in [
        ("m365-app", "id", "app-id-1"),
        ("m365-secret", "secret", "oauth-client-s3cret"),
    ] {
        api.put(
            &format!("{CORE}/secrets"),
            json!({"apiVersion": "v1", "kind": "Secret",
                   "metadata": {"name": name, "namespace": NS},
                   "stringData": {key: value}}),
        );
    }
    let s = reconcile(&api).await;
    assert_eq!(s.invalid, 0, "{s:?}");
    assert_eq!(ready(&api, "mailroutes", "m365").0, "True");
    assert!(document(&api).config.routes["m365"].auth);
    let cm = api
        .get(&format!("{CORE}/configmaps/{}", publish::CONFIG_MAP))
        .unwrap_or_default();
    assert!(!cm.to_string().contains("oauth-client-s3cret"));
    let credentials: mailroute_config::Credentials =
        serde_json::from_slice(&published_credentials(&api)).unwrap_or_else(|e| panic!("{e}"));
    let client = &credentials.oauth2["m365"];
    assert_eq!(client.client_id, "app-id-1");
    assert_eq!(client.client_secret.as_deref(), Some("oauth-client-s3cret"));
}

/// A policy with a DKIM key in a Secret: the operator reads the Secret, publishes the private
/// key only in the relay's credentials Secret, and shows the TXT record to publish in the
/// policy's status; a second pass writes nothing.
#[tokio::test]
async fn a_dkim_key_shows_its_dns_record_in_the_policy_status_and_never_in_the_config_map() {
    let api = FakeApi::default();
    seed(&api);
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let path = dir.path().join("key.pem");
    let made = std::process::Command::new("openssl")
        .args(["genpkey", "-algorithm", "ed25519", "-out"])
        .arg(&path)
        .status();
    assert!(made.is_ok_and(|s| s.success()));
    let pem = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{e}"));
    api.put(
        &format!("{CR}/relaypolicies"),
        resource(
            "RelayPolicy",
            "example",
            3,
            json!({"domains": ["example.com"], "licenses": 10, "inboundRoute": "mailbox",
                   "dkim": [{"domain": "example.com", "selector": "ed2026", "algorithm": "ed25519-sha256",
                             "privateKeySecretRef": {"name": "dkim-example", "key": "private.pem"}}]}),
        ),
    );
    api.put(
        &format!("{CORE}/secrets"),
        json!({"apiVersion": "v1", "kind": "Secret",
               "metadata": {"name": "dkim-example", "namespace": NS},
               "stringData": {"private.pem": pem}}),
    );
    let s = reconcile(&api).await;
    assert_eq!(s.invalid, 0, "{s:?}");
    let expected = mailroute_operator::controller::dkim::record(
        mailroute_config::resources::DkimAlgorithm::Ed25519Sha256,
        &pem,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let policy = api
        .get(&format!("{CR}/relaypolicies/example"))
        .unwrap_or_default();
    assert_eq!(
        policy["status"]["dkim"],
        json!([{"domain": "example.com", "selector": "ed2026",
                "name": "ed2026._domainkey.example.com", "record": expected}])
    );
    assert_eq!(
        s.dkim["example"][0].record.as_deref(),
        Some(expected.as_str())
    );
    let secret_body = pem.lines().nth(1).unwrap_or_default().to_owned();
    let cm = api
        .get(&format!("{CORE}/configmaps/{}", publish::CONFIG_MAP))
        .unwrap_or_default();
    assert!(!cm.to_string().contains(&secret_body));
    let credentials: mailroute_config::Credentials =
        serde_json::from_slice(&published_credentials(&api)).unwrap_or_else(|e| panic!("{e}"));
    assert!(credentials.dkim["ed2026._domainkey.example.com"].contains(&secret_body));
    let again = reconcile(&api).await;
    assert_eq!(again.statuses_patched, 0, "{again:?}");
}
