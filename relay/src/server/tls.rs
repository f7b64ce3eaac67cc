//! TLS for the listeners: certificate and key from PEM files (a mounted Secret, e.g. from
//! cert-manager), swapped atomically when the files change on disk. Handshakes in flight keep
//! the key they started with.

use arc_swap::ArcSwap;
use rustls::crypto::ring;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// Why a certificate could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {message}")]
    Pem { path: PathBuf, message: String },
    #[error("{0}: no certificate found")]
    NoCertificate(PathBuf),
    #[error("the key does not fit the certificate or is not supported: {0}")]
    Key(rustls::Error),
    #[error("building the TLS configuration: {0}")]
    Config(rustls::Error),
}

fn load(cert: &Path, key: &Path) -> Result<CertifiedKey, TlsError> {
    let pem = |path: &Path, e: rustls_pki_types::pem::Error| TlsError::Pem {
        path: path.to_owned(),
        message: e.to_string(),
    };
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| pem(cert, e))?
        .collect::<Result<_, _>>()
        .map_err(|e| pem(cert, e))?;
    if chain.is_empty() {
        return Err(TlsError::NoCertificate(cert.to_owned()));
    }
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| pem(key, e))?;
    let provider = ring::default_provider();
    CertifiedKey::from_der(chain, key, &provider).map_err(TlsError::Key)
}

/// The current certificate, replaceable while serving.
#[derive(Debug)]
pub struct CertificateStore {
    cert_path: PathBuf,
    key_path: PathBuf,
    current: ArcSwap<CertifiedKey>,
    loaded_at: std::sync::Mutex<(Option<SystemTime>, Option<SystemTime>)>,
}

fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

impl CertificateStore {
    /// Loads the certificate chain and key; an error here stops the relay from starting.
    pub fn load(cert_path: &Path, key_path: &Path) -> Result<Arc<Self>, TlsError> {
        let key = load(cert_path, key_path)?;
        Ok(Arc::new(Self {
            cert_path: cert_path.to_owned(),
            key_path: key_path.to_owned(),
            current: ArcSwap::from_pointee(key),
            loaded_at: std::sync::Mutex::new((modified(cert_path), modified(key_path))),
        }))
    }

    /// Reloads when either file changed; a broken pair is logged and the old one kept.
    /// Returns true when a new certificate is in use.
    pub fn reload_if_changed(&self) -> bool {
        let now = (modified(&self.cert_path), modified(&self.key_path));
        let Ok(mut seen) = self.loaded_at.lock() else {
            return false;
        };
        if *seen == now {
            return false;
        }
        match load(&self.cert_path, &self.key_path) {
            Ok(key) => {
                self.current.store(Arc::new(key));
                *seen = now;
                tracing::info!(cert = %self.cert_path.display(), "TLS certificate reloaded");
                true
            }
            Err(e) => {
                // NB: a Secret update may land the two files one after the other; the next
                // poll retries, and until then the old pair keeps serving.
                tracing::warn!(error = %e, "TLS certificate not reloaded; keeping the previous one");
                false
            }
        }
    }

    /// Polls the files every `interval` until the returned task is dropped.
    pub fn watch(self: &Arc<Self>, interval: Duration) -> tokio::task::JoinHandle<()> {
        let store = Arc::clone(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                store.reload_if_changed();
            }
        })
    }

    /// A rustls server configuration that always presents the current certificate.
    ///
    /// NB: resumption by session tickets is on (rustls's ticketer: AES-256-GCM ticket keys,
    /// rotated every 6 hours, in this process only). Without a ticketer rustls resumes only
    /// sessions still in its server-side cache of 256, so a relay serving more clients than
    /// that made nearly every reconnecting client pay a full handshake again (its private-key
    /// operation is most of a TLS session's CPU: docs/benchmarks.md, "TLS"). A client that
    /// reconnects to another replica does a full handshake there.
    ///
    /// NB: the relay, not the client, picks the cipher suite, and picks AES-128-GCM with SHA-256
    /// first (then rustls's default order). Clients list AES-256-GCM with SHA-384 first, whose
    /// key schedule runs SHA-512's compression in software, where SHA-256 has the CPU's SHA
    /// instructions: SHA-512 alone was 7 % of the relay's CPU in a profile of STARTTLS
    /// sessions. AES-128 is as safe here as the X25519 or P-256 key exchange beside it.
    pub fn server_config(self: &Arc<Self>) -> Result<Arc<rustls::ServerConfig>, TlsError> {
        let mut provider = ring::default_provider();
        provider
            .cipher_suites
            .sort_by_key(|suite| !prefer(suite.suite()));
        let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(provider))
            .with_safe_default_protocol_versions()
            .map_err(TlsError::Config)?
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(Resolver(Arc::clone(self))));
        config.ignore_client_order = true;
        config.ticketer = ring::Ticketer::new().map_err(TlsError::Config)?;
        Ok(Arc::new(config))
    }
}

/// The suites the relay picks first when the client offers them.
fn prefer(suite: rustls::CipherSuite) -> bool {
    use rustls::CipherSuite::*;
    matches!(
        suite,
        TLS13_AES_128_GCM_SHA256
            | TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256
            | TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256
    )
}

#[derive(Debug)]
struct Resolver(Arc<CertificateStore>);

impl ResolvesServerCert for Resolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.current.load_full())
    }
}

/// `TLSv1.3`-style name of a negotiated version.
pub fn version_name(version: Option<rustls::ProtocolVersion>) -> String {
    match version {
        Some(rustls::ProtocolVersion::TLSv1_3) => "TLSv1.3".to_owned(),
        Some(rustls::ProtocolVersion::TLSv1_2) => "TLSv1.2".to_owned(),
        Some(other) => format!("{other:?}"),
        None => "unknown".to_owned(),
    }
}
