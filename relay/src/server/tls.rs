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
    pub fn server_config(self: &Arc<Self>) -> Result<Arc<rustls::ServerConfig>, TlsError> {
        let config =
            rustls::ServerConfig::builder_with_provider(Arc::new(ring::default_provider()))
                .with_safe_default_protocol_versions()
                .map_err(TlsError::Config)?
                .with_no_client_auth()
                .with_cert_resolver(Arc::new(Resolver(Arc::clone(self))));
        Ok(Arc::new(config))
    }
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
