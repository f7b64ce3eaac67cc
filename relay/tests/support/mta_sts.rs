//! What an MTA-STS test needs beside the relay: a test certificate authority (rcgen) the
//! relay is told to trust, and an HTTPS policy server on loopback that serves
//! `/.well-known/mta-sts.txt` with a certificate from it, counts its requests, and can have
//! an outage and a new policy.

use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A certificate authority for tests.
pub struct TestCa {
    pub pem: String,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
}

/// A certificate and its key, in PEM.
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
}

impl TestCa {
    pub fn new() -> Self {
        let key = rcgen::KeyPair::generate().unwrap_or_else(|e| panic!("{e}"));
        let mut params =
            rcgen::CertificateParams::new(Vec::<String>::new()).unwrap_or_else(|e| panic!("{e}"));
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "Mailroute test CA");
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params.self_signed(&key).unwrap_or_else(|e| panic!("{e}"));
        Self {
            pem: cert.pem(),
            issuer: rcgen::Issuer::new(params, key),
        }
    }

    /// A server certificate for `name`, issued by this authority.
    pub fn issue(&self, name: &str) -> Issued {
        let key = rcgen::KeyPair::generate().unwrap_or_else(|e| panic!("{e}"));
        let params =
            rcgen::CertificateParams::new(vec![name.to_owned()]).unwrap_or_else(|e| panic!("{e}"));
        let cert = params
            .signed_by(&key, &self.issuer)
            .unwrap_or_else(|e| panic!("{e}"));
        Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        }
    }
}

/// Puts `issued` in the relay's certificate files and waits until it serves it.
pub fn install(relay: &super::Relay, issued: &Issued) {
    std::fs::write(&relay.certs.cert, &issued.cert_pem).unwrap_or_else(|e| panic!("{e}"));
    std::fs::write(&relay.certs.key, &issued.key_pem).unwrap_or_else(|e| panic!("{e}"));
    // NB: a later modification time, so the reload sees a change however fast this ran.
    let later = std::time::SystemTime::now() + std::time::Duration::from_secs(5);
    for path in [&relay.certs.cert, &relay.certs.key] {
        std::fs::File::options()
            .write(true)
            .open(path)
            .and_then(|f| f.set_modified(later))
            .unwrap_or_else(|e| panic!("{e}"));
    }
    assert!(relay.store.reload_if_changed(), "certificate reloaded");
}

/// An HTTPS server answering `GET /.well-known/mta-sts.txt` with the current policy.
pub struct PolicyServer {
    pub addr: SocketAddr,
    policy: Arc<Mutex<String>>,
    requests: Arc<AtomicUsize>,
    down: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl PolicyServer {
    /// Serves `policy` with a certificate for `name` from `ca`.
    pub async fn start(ca: &TestCa, name: &str, policy: &str) -> Self {
        let issued = ca.issue(name);
        let chain: Vec<CertificateDer<'static>> =
            rustls::pki_types::pem::PemObject::pem_slice_iter(issued.cert_pem.as_bytes())
                .collect::<Result<_, _>>()
                .unwrap_or_else(|e| panic!("{e}"));
        let key: PrivateKeyDer<'static> = PrivatePkcs8KeyDer::from(
            rcgen::KeyPair::from_pem(&issued.key_pem)
                .unwrap_or_else(|e| panic!("{e}"))
                .serialize_der(),
        )
        .into();
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap_or_else(|e| panic!("{e}"))
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap_or_else(|e| panic!("{e}"));
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let addr = listener.local_addr().unwrap_or_else(|e| panic!("{e}"));
        let policy = Arc::new(Mutex::new(policy.to_owned()));
        let requests = Arc::new(AtomicUsize::new(0));
        let down = Arc::new(AtomicBool::new(false));
        let task = {
            let (policy, requests, down) = (
                Arc::clone(&policy),
                Arc::clone(&requests),
                Arc::clone(&down),
            );
            tokio::spawn(async move {
                while let Ok((tcp, _)) = listener.accept().await {
                    if down.load(Ordering::SeqCst) {
                        drop(tcp);
                        continue;
                    }
                    let (acceptor, policy, requests) =
                        (acceptor.clone(), Arc::clone(&policy), Arc::clone(&requests));
                    tokio::spawn(async move {
                        let Ok(mut tls) = acceptor.accept(tcp).await else {
                            return;
                        };
                        let mut request = Vec::new();
                        let mut buf = [0u8; 1024];
                        while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                            match tls.read(&mut buf).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => request.extend_from_slice(&buf[..n]),
                            }
                        }
                        requests.fetch_add(1, Ordering::SeqCst);
                        let wanted = request.starts_with(b"GET /.well-known/mta-sts.txt ");
                        let body = policy.lock().map(|p| p.clone()).unwrap_or_default();
                        let answer = if wanted {
                            format!(
                                "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                                body.len()
                            )
                        } else {
                            "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                                .to_owned()
                        };
                        let _ = tls.write_all(answer.as_bytes()).await;
                        let _ = tls.shutdown().await;
                    });
                }
            })
        };
        Self {
            addr,
            policy,
            requests,
            down,
            task,
        }
    }

    pub fn set_policy(&self, policy: &str) {
        if let Ok(mut p) = self.policy.lock() {
            *p = policy.to_owned();
        }
    }

    pub fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }

    /// An outage (`true`): connections are closed at once, nothing is served.
    pub fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
    }
}

impl Drop for PolicyServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A relay sending example.com's mail (clients from 127.0.0.0/16) to partner.test through route
/// `partner`, which delivers by MX lookup (`mx_lookup`, e.g. `{dane: true}`) on the MX relay's
/// port, resolving with `stores.dns_server`.
pub fn partner_relay(mx_port: u16, mx_lookup: &str, stores: super::Stores) -> super::Configured {
    let yaml = format!(
        r#"
apiVersion: mailroute.io/v1alpha1
kind: MailRoute
metadata: {{name: partner, namespace: mail}}
spec:
  host: partner.test
  port: {mx_port}
  mxLookup: {mx_lookup}
  timeouts: {{connect: 2s, command: 5s, dataEnd: 5s}}
  connectionPool: {{maxMessagesPerConnection: 1}}
---
apiVersion: mailroute.io/v1alpha1
kind: RelayPolicy
metadata: {{name: example, namespace: mail}}
spec:
  domains: [example.com]
  licenses: 10
  authentication: {{ipRanges: [{{cidr: 127.0.0.0/16}}]}}
  outboundRoute: partner
"#
    );
    super::configured_with_stores(&yaml, stores)
}
