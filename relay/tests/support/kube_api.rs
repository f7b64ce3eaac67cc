//! A fake Kubernetes API server on loopback, over real TLS (an rcgen certificate as the
//! cluster CA), that lists and watches ConfigMaps and Secrets the way kube's watcher asks:
//! `GET /api/v1/namespaces/NS/RESOURCE?fieldSelector=metadata.name%3DNAME` lists with a
//! resourceVersion; `&watch=true&resourceVersion=V` streams newline-delimited events (chunked)
//! from V, replayed from its history and then live; a watch from a version older than the last
//! [`FakeApi::expire`] gets an `ERROR` event with `410 Gone`, as after an etcd compaction. It
//! records every request (path, query, bearer token) so a test can tell lists from watches, and
//! can end every watch, or be down (connections closed at once), on demand.

use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// One request as the server saw it.
#[derive(Clone, Debug)]
pub struct Seen {
    pub path: String,
    pub query: String,
    /// The `Authorization` header.
    pub token: Option<String>,
    pub at: Instant,
}

impl Seen {
    pub fn is_watch(&self) -> bool {
        self.query
            .split('&')
            .any(|p| p == "watch=true" || p == "watch=1")
    }
}

#[derive(Clone)]
struct Change {
    version: u64,
    resource: String,
    name: String,
    kind: &'static str,
    object: Value,
}

#[derive(Default)]
struct State {
    version: u64,
    expired_below: u64,
    objects: BTreeMap<(String, String), Value>,
    history: Vec<Change>,
}

struct Inner {
    state: Mutex<State>,
    changed: tokio::sync::broadcast::Sender<()>,
    requests: Mutex<Vec<Seen>>,
    down: AtomicBool,
    /// Bumped to end every open watch.
    closings: tokio::sync::watch::Sender<u64>,
    /// How long a watch lasts at most (the real server ends them after `timeoutSeconds`).
    watch_for: Mutex<Duration>,
    open_watches: AtomicU64,
    /// What `GET /openid/v1/jwks` answers (the issuer's keys); 404 while `None`.
    issuer_keys: Mutex<Option<Value>>,
}

/// The fake API server; the namespace is `mail`.
#[derive(Clone)]
pub struct FakeApi {
    inner: Arc<Inner>,
    pub addr: SocketAddr,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl FakeApi {
    /// Listens on 127.0.0.1 with the certificate of `certs` (issued for `localhost`).
    pub async fn start(certs: &super::CertFiles) -> Self {
        let store = mailroute_relay::server::tls::CertificateStore::load(&certs.cert, &certs.key)
            .unwrap_or_else(|e| panic!("{e}"));
        let acceptor = tokio_rustls::TlsAcceptor::from(
            store.server_config().unwrap_or_else(|e| panic!("{e}")),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let addr = listener.local_addr().unwrap_or_else(|e| panic!("{e}"));
        let api = Self {
            inner: Arc::new(Inner {
                state: Mutex::new(State {
                    version: 100,
                    ..State::default()
                }),
                changed: tokio::sync::broadcast::channel(64).0,
                requests: Mutex::new(Vec::new()),
                down: AtomicBool::new(false),
                closings: tokio::sync::watch::channel(0).0,
                watch_for: Mutex::new(Duration::from_secs(290)),
                open_watches: AtomicU64::new(0),
                issuer_keys: Mutex::new(None),
            }),
            addr,
        };
        let server = api.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                if server.inner.down.load(Ordering::SeqCst) {
                    drop(tcp);
                    continue;
                }
                let (acceptor, api) = (acceptor.clone(), server.clone());
                tokio::spawn(async move {
                    if let Ok(tls) = acceptor.accept(tcp).await {
                        api.handle(tls).await;
                    }
                });
            }
        });
        api
    }

    /// Publishes the service-account issuer's keys (a JWKS document) at `/openid/v1/jwks`.
    pub fn set_issuer_keys(&self, jwks: &str) {
        let keys = serde_json::from_str(jwks).unwrap_or_else(|e| panic!("{e}"));
        *lock(&self.inner.issuer_keys) = Some(keys);
    }

    /// Creates or replaces ConfigMap or Secret (`resource`: `configmaps`, `secrets`) `name`
    /// with `body` (its `data`, `metadata.annotations`, ...); watchers see it at once.
    pub fn put(&self, resource: &str, name: &str, body: Value) {
        let kind = if resource == "secrets" {
            "Secret"
        } else {
            "ConfigMap"
        };
        let mut state = lock(&self.inner.state);
        state.version += 1;
        let version = state.version;
        let mut object = body;
        object["apiVersion"] = json!("v1");
        object["kind"] = json!(kind);
        object["metadata"]["name"] = json!(name);
        object["metadata"]["namespace"] = json!("mail");
        object["metadata"]["resourceVersion"] = json!(version.to_string());
        let key = (resource.to_owned(), name.to_owned());
        let change = if state.objects.contains_key(&key) {
            "MODIFIED"
        } else {
            "ADDED"
        };
        state.objects.insert(key, object.clone());
        state.history.push(Change {
            version,
            resource: resource.to_owned(),
            name: name.to_owned(),
            kind: change,
            object,
        });
        drop(state);
        let _ = self.inner.changed.send(());
    }

    /// Deletes an object; watchers see `DELETED`.
    pub fn delete(&self, resource: &str, name: &str) {
        let mut state = lock(&self.inner.state);
        let Some(mut object) = state
            .objects
            .remove(&(resource.to_owned(), name.to_owned()))
        else {
            return;
        };
        state.version += 1;
        let version = state.version;
        object["metadata"]["resourceVersion"] = json!(version.to_string());
        state.history.push(Change {
            version,
            resource: resource.to_owned(),
            name: name.to_owned(),
            kind: "DELETED",
            object,
        });
        drop(state);
        let _ = self.inner.changed.send(());
    }

    /// Compacts the history: every open watch, and every new watch from an older version, gets
    /// `410 Gone`; only a new list brings a watcher back.
    pub fn expire(&self) {
        let mut state = lock(&self.inner.state);
        state.version += 1;
        state.expired_below = state.version;
        drop(state);
        let _ = self.inner.changed.send(());
    }

    /// Ends every open watch normally (as the server does after a watch's timeout).
    pub fn close_watches(&self) {
        self.inner.closings.send_modify(|n| *n += 1);
    }

    /// Watches end after `d` at most from now on.
    pub fn end_watches_after(&self, d: Duration) {
        *lock(&self.inner.watch_for) = d;
    }

    /// Down: open watches end and connections are closed as soon as they are accepted.
    pub fn set_down(&self, down: bool) {
        self.inner.down.store(down, Ordering::SeqCst);
        if down {
            self.close_watches();
        }
    }

    pub fn requests(&self) -> Vec<Seen> {
        lock(&self.inner.requests).clone()
    }

    /// Watches open now.
    pub fn open_watches(&self) -> u64 {
        self.inner.open_watches.load(Ordering::SeqCst)
    }

    /// A kubeconfig for this server in `dir`, authenticating with the token in `token_file`.
    pub fn kubeconfig(&self, dir: &Path, ca: &Path, token_file: &Path) -> PathBuf {
        let path = dir.join("kubeconfig");
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: https://localhost:{}\n    certificate-authority: {}\nusers:\n- name: relay\n  user:\n    tokenFile: {}\ncontexts:\n- name: fake\n  context: {{cluster: fake, user: relay, namespace: mail}}\ncurrent-context: fake\n",
            self.addr.port(),
            ca.display(),
            token_file.display()
        );
        std::fs::write(&path, text).unwrap_or_else(|e| panic!("{e}"));
        path
    }

    async fn handle<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(&self, mut tls: S) {
        let mut head = Vec::new();
        let mut buf = [0u8; 2048];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            match tls.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => head.extend_from_slice(&buf[..n]),
            }
        }
        let head = String::from_utf8_lossy(&head).into_owned();
        let target = head.split_whitespace().nth(1).unwrap_or("/").to_owned();
        let (path, query) = target
            .split_once('?')
            .map_or((target.clone(), String::new()), |(p, q)| {
                (p.to_owned(), q.to_owned())
            });
        let token = head.lines().find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("authorization")
                .then(|| value.trim().to_owned())
        });
        lock(&self.inner.requests).push(Seen {
            path: path.clone(),
            query: query.clone(),
            token,
            at: Instant::now(),
        });
        let params: BTreeMap<String, String> = query
            .split('&')
            .filter_map(|p| p.split_once('='))
            .map(|(k, v)| (k.to_owned(), decode(v)))
            .collect();
        let resource = path.rsplit('/').next().unwrap_or_default().to_owned();
        let name = params
            .get("fieldSelector")
            .and_then(|f| f.strip_prefix("metadata.name="))
            .map(str::to_owned);
        if path == "/openid/v1/jwks" {
            let keys = lock(&self.inner.issuer_keys).clone();
            let _ = match keys {
                Some(keys) => respond(&mut tls, "200 OK", &keys).await,
                None => respond(&mut tls, "404 Not Found", &status(404, "NotFound")).await,
            };
            return;
        }
        if !path.starts_with("/api/v1/namespaces/mail/") {
            let _ = respond(&mut tls, "404 Not Found", &status(404, "NotFound")).await;
            return;
        }
        if params.get("watch").is_some_and(|w| w == "true" || w == "1") {
            let from: u64 = params
                .get("resourceVersion")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            self.watch(&mut tls, &resource, name.as_deref(), from).await;
        } else {
            let body = self.list(&resource, name.as_deref());
            let _ = respond(&mut tls, "200 OK", &body).await;
        }
    }

    fn list(&self, resource: &str, name: Option<&str>) -> Value {
        {
            let state = lock(&self.inner.state);
            let items: Vec<Value> = state
                .objects
                .iter()
                .filter(|((r, n), _)| r == resource && name.is_none_or(|x| x == n))
                .map(|(_, o)| o.clone())
                .collect();
            let kind = if resource == "secrets" {
                "SecretList"
            } else {
                "ConfigMapList"
            };
            json!({"apiVersion": "v1", "kind": kind,
                "metadata": {"resourceVersion": state.version.to_string()}, "items": items})
        }
    }

    async fn watch<S: tokio::io::AsyncWrite + Unpin>(
        &self,
        tls: &mut S,
        resource: &str,
        name: Option<&str>,
        from: u64,
    ) {
        // NB: `connection: close`, as the handler serves one request per connection: a client
        // that reused the connection after the watch ended would fail its next request.
        let head = "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n";
        if tls.write_all(head.as_bytes()).await.is_err() {
            return;
        }
        self.inner.open_watches.fetch_add(1, Ordering::SeqCst);
        let mut changed = self.inner.changed.subscribe();
        let mut closings = self.inner.closings.subscribe();
        let until = tokio::time::Instant::now() + *lock(&self.inner.watch_for);
        let mut sent = from;
        loop {
            let (lines, gone) = {
                let state = lock(&self.inner.state);
                if sent < state.expired_below {
                    let error = json!({"type": "ERROR", "object": status(410, "Expired")});
                    (vec![error], true)
                } else {
                    let lines: Vec<Value> = state
                        .history
                        .iter()
                        .filter(|c| {
                            c.version > sent
                                && c.resource == resource
                                && name.is_none_or(|n| n == c.name)
                        })
                        .map(|c| json!({"type": c.kind, "object": c.object}))
                        .collect();
                    sent = state.version;
                    (lines, false)
                }
            };
            for line in lines {
                let text = format!("{line}\n");
                let chunk = format!("{:x}\r\n{text}\r\n", text.len());
                if tls.write_all(chunk.as_bytes()).await.is_err() {
                    self.inner.open_watches.fetch_sub(1, Ordering::SeqCst);
                    return;
                }
            }
            let _ = tls.flush().await;
            if gone || self.inner.down.load(Ordering::SeqCst) {
                break;
            }
            tokio::select! {
                _ = changed.recv() => {}
                _ = closings.changed() => break,
                () = tokio::time::sleep_until(until) => break,
            }
        }
        self.inner.open_watches.fetch_sub(1, Ordering::SeqCst);
        if !self.inner.down.load(Ordering::SeqCst) {
            let _ = tls.write_all(b"0\r\n\r\n").await;
            let _ = tls.flush().await;
        }
    }
}

fn status(code: u16, reason: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "reason": reason, "code": code, "message": reason})
}

async fn respond<S: tokio::io::AsyncWrite + Unpin>(
    tls: &mut S,
    status: &str,
    body: &Value,
) -> std::io::Result<()> {
    let body = body.to_string();
    let response = format!(
        "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    tls.write_all(response.as_bytes()).await?;
    tls.flush().await
}

/// `%XX` and `+` decoded.
fn decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(b) => out.push(b),
                    Err(_) => out.extend_from_slice(&bytes[i..i + 3]),
                }
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}
