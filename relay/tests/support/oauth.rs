//! An OAuth 2.0 token endpoint (HTTPS on loopback, an `rcgen` certificate) and an upstream
//! that takes mail only after `AUTH XOAUTH2` or `AUTH OAUTHBEARER` with a token that endpoint
//! issued and that has not expired or been revoked, as Microsoft 365 and Google answer.

use base64::Engine;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

/// A certificate for `127.0.0.1` (its PEM is the route's CA bundle) and an acceptor with it.
pub struct Tls {
    pub pem: String,
    pub acceptor: TlsAcceptor,
}

pub fn tls() -> Tls {
    let generated = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned()])
        .unwrap_or_else(|e| panic!("{e}"));
    let pem = generated.cert.pem();
    let key = rustls_pki_types::PrivateKeyDer::try_from(generated.signing_key.serialize_der())
        .unwrap_or_else(|e| panic!("{e}"));
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap_or_else(|e| panic!("{e}"))
    .with_no_client_auth()
    .with_single_cert(vec![generated.cert.der().clone()], key)
    .unwrap_or_else(|e| panic!("{e}"));
    Tls {
        pem,
        acceptor: TlsAcceptor::from(Arc::new(config)),
    }
}

/// What the token endpoint did and does.
#[derive(Debug)]
pub struct Issuer {
    /// The form of every token request, in order.
    pub requests: Vec<String>,
    /// Tokens issued, with when the upstream stops taking them.
    pub tokens: HashMap<String, Instant>,
    /// The `expires_in` it announces, and how long the upstream takes a token.
    pub lifetime: Duration,
    /// Answer `401 invalid_client` instead of a token.
    pub refuse: bool,
}

pub struct TokenEndpoint {
    pub url: String,
    pub issuer: Arc<Mutex<Issuer>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TokenEndpoint {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl TokenEndpoint {
    pub async fn start(tls: &Tls, lifetime: Duration) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let addr = listener.local_addr().unwrap_or_else(|e| panic!("{e}"));
        let issuer = Arc::new(Mutex::new(Issuer {
            requests: Vec::new(),
            tokens: HashMap::new(),
            lifetime,
            refuse: false,
        }));
        let (acceptor, state) = (tls.acceptor.clone(), Arc::clone(&issuer));
        let task = tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                let (acceptor, state) = (acceptor.clone(), Arc::clone(&state));
                tokio::spawn(async move {
                    if let Ok(stream) = acceptor.accept(socket).await {
                        let _ = answer(stream, &state).await;
                    }
                });
            }
        });
        Self {
            url: format!("https://{addr}/oauth2/v2.0/token"),
            issuer,
            task,
        }
    }

    pub fn requests(&self) -> Vec<String> {
        self.issuer
            .lock()
            .map(|i| i.requests.clone())
            .unwrap_or_default()
    }

    /// The upstream stops taking every token issued so far (as after a password reset).
    pub fn revoke_all(&self) {
        if let Ok(mut i) = self.issuer.lock() {
            i.tokens.clear();
        }
    }
}

/// One HTTP/1.1 exchange: `POST` with a form, a JSON answer, then close.
async fn answer<S: AsyncRead + AsyncWrite + Unpin>(
    stream: S,
    issuer: &Mutex<Issuer>,
) -> std::io::Result<()> {
    let mut stream = BufReader::new(stream);
    let mut length = 0usize;
    let mut request_line = String::new();
    stream.read_line(&mut request_line).await?;
    loop {
        let mut line = String::new();
        if stream.read_line(&mut line).await? == 0 || line == "\r\n" {
            break;
        }
        if let Some((name, value)) = line.split_once(':')
            && name.eq_ignore_ascii_case("content-length")
        {
            length = value.trim().parse().unwrap_or(0);
        }
    }
    let mut body = vec![0u8; length.min(64 * 1024)];
    stream.read_exact(&mut body).await?;
    let form = String::from_utf8_lossy(&body).into_owned();
    let (status, json) = match issuer.lock() {
        Ok(mut i) => {
            i.requests.push(form);
            let n = i.requests.len();
            if !request_line.starts_with("POST /oauth2/v2.0/token ") {
                ("404 Not Found", r#"{"error":"not_found"}"#.to_owned())
            } else if i.refuse {
                (
                    "401 Unauthorized",
                    r#"{"error":"invalid_client","error_description":"AADSTS7000215: Invalid client secret provided."}"#
                        .to_owned(),
                )
            } else {
                let token = format!("token-{n}");
                let lifetime = i.lifetime;
                i.tokens.insert(token.clone(), Instant::now() + lifetime);
                (
                    "200 OK",
                    format!(
                        r#"{{"token_type":"Bearer","expires_in":{},"access_token":"{token}"}}"#,
                        lifetime.as_secs()
                    ),
                )
            }
        }
        Err(_) => ("500 Internal Server Error", "{}".to_owned()),
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{json}",
        json.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}

/// What the upstream saw.
#[derive(Debug, Default)]
pub struct Seen {
    /// `(mechanism, user, token, accepted)` of every AUTH.
    pub auths: Vec<(String, String, String, bool)>,
    /// Messages taken (content before the final `.`).
    pub accepted: Vec<String>,
}

pub struct BearerUpstream {
    pub addr: SocketAddr,
    pub seen: Arc<Mutex<Seen>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for BearerUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl BearerUpstream {
    /// Implicit TLS with `tls`, offering `mechanisms` (e.g. `"XOAUTH2"`), taking `user`'s
    /// tokens from `issuer`.
    pub async fn start(
        tls: &Tls,
        mechanisms: &'static str,
        user: &'static str,
        issuer: Arc<Mutex<Issuer>>,
    ) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let addr = listener.local_addr().unwrap_or_else(|e| panic!("{e}"));
        let seen = Arc::new(Mutex::new(Seen::default()));
        let (acceptor, state) = (tls.acceptor.clone(), Arc::clone(&seen));
        let task = tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                let (acceptor, state, issuer) =
                    (acceptor.clone(), Arc::clone(&state), Arc::clone(&issuer));
                tokio::spawn(async move {
                    if let Ok(stream) = acceptor.accept(socket).await {
                        let _ = smtp(stream, mechanisms, user, &issuer, &state).await;
                    }
                });
            }
        });
        Self { addr, seen, task }
    }

    pub fn auths(&self) -> Vec<(String, String, String, bool)> {
        self.seen
            .lock()
            .map(|s| s.auths.clone())
            .unwrap_or_default()
    }

    pub fn accepted(&self) -> usize {
        self.seen.lock().map(|s| s.accepted.len()).unwrap_or(0)
    }
}

fn decode(line: &str) -> String {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(line.trim())
        .unwrap_or_default();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// `(user, token)` of an OAUTHBEARER (`n,a=USER,^Aauth=Bearer T^A^A`) or XOAUTH2
/// (`user=USER^Aauth=Bearer T^A^A`) response.
fn credentials(mechanism: &str, response: &str) -> (String, String) {
    let mut user = String::new();
    let mut token = String::new();
    for (i, field) in response.split('\x01').enumerate() {
        if mechanism == "OAUTHBEARER" && i == 0 {
            let a = field.split(',').nth(1).unwrap_or_default();
            user = a.strip_prefix("a=").unwrap_or_default().replace("=2C", ",");
        } else if let Some(u) = field.strip_prefix("user=") {
            user = u.to_owned();
        } else if let Some(t) = field.strip_prefix("auth=Bearer ") {
            token = t.to_owned();
        }
    }
    (user, token)
}

async fn smtp<S: AsyncRead + AsyncWrite + Unpin>(
    stream: S,
    mechanisms: &str,
    user: &str,
    issuer: &Mutex<Issuer>,
    seen: &Mutex<Seen>,
) -> std::io::Result<()> {
    let mut stream = BufReader::new(stream);
    stream.write_all(b"220 bearer ESMTP\r\n").await?;
    let mut authenticated = false;
    let mut line = String::new();
    loop {
        line.clear();
        if stream.read_line(&mut line).await? == 0 {
            return Ok(());
        }
        let upper = line.to_ascii_uppercase();
        let reply = if upper.starts_with("EHLO") {
            format!(
                "250-bearer\r\n250-PIPELINING\r\n250-ENHANCEDSTATUSCODES\r\n250 AUTH {mechanisms}\r\n"
            )
        } else if let Some(rest) = upper.strip_prefix("AUTH ") {
            let mut words = line[5..].split_whitespace();
            let mechanism = rest
                .split_whitespace()
                .next()
                .unwrap_or_default()
                .to_owned();
            let mut response = words.nth(1).map(str::to_owned);
            if response.is_none() {
                stream.write_all(b"334 \r\n").await?;
                let mut next = String::new();
                stream.read_line(&mut next).await?;
                response = Some(next);
            }
            let (who, token) = credentials(&mechanism, &decode(&response.unwrap_or_default()));
            let valid = who == user
                && issuer
                    .lock()
                    .map(|i| {
                        i.tokens
                            .get(&token)
                            .is_some_and(|end| Instant::now() < *end)
                    })
                    .unwrap_or(false);
            if let Ok(mut s) = seen.lock() {
                s.auths.push((mechanism.clone(), who, token, valid));
            }
            if valid {
                authenticated = true;
                "235 2.7.0 Authentication successful\r\n".to_owned()
            } else if mechanism == "OAUTHBEARER" {
                // RFC 7628 3.2.2: the error challenge; the client's dummy answer ends it.
                let status = base64::engine::general_purpose::STANDARD
                    .encode(br#"{"status":"invalid_token","schemes":"bearer"}"#);
                stream
                    .write_all(format!("334 {status}\r\n").as_bytes())
                    .await?;
                let mut dummy = String::new();
                stream.read_line(&mut dummy).await?;
                "535 5.7.8 Authentication credentials invalid\r\n".to_owned()
            } else {
                "535 5.7.3 Authentication unsuccessful\r\n".to_owned()
            }
        } else if upper.starts_with("MAIL") && !authenticated {
            "530 5.7.0 Authentication required\r\n".to_owned()
        } else if upper.starts_with("MAIL") || upper.starts_with("RCPT") {
            "250 2.1.0 ok\r\n".to_owned()
        } else if upper.starts_with("DATA") {
            stream.write_all(b"354 go ahead\r\n").await?;
            let mut content = String::new();
            loop {
                let mut l = String::new();
                if stream.read_line(&mut l).await? == 0 {
                    return Ok(());
                }
                if l == ".\r\n" {
                    break;
                }
                content.push_str(&l);
            }
            if let Ok(mut s) = seen.lock() {
                s.accepted.push(content);
            }
            "250 2.0.0 queued\r\n".to_owned()
        } else if upper.starts_with("QUIT") {
            stream.write_all(b"221 2.0.0 bye\r\n").await?;
            return Ok(());
        } else {
            "250 2.0.0 ok\r\n".to_owned()
        };
        stream.write_all(reply.as_bytes()).await?;
        stream.flush().await?;
    }
}

/// A loopback port nothing listens on.
pub async fn closed_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    listener.local_addr().map(|a| a.port()).unwrap_or(1)
}
