//! Client TLS for upstream connections, one connector per route policy (SPEC 3.1 `tls`):
//! certificates checked against the system roots plus the route's CA bundle, the host name
//! checked when `validateHostname` says so, nothing checked for opportunistic encryption.

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use std::sync::{Arc, OnceLock};
use tokio_rustls::TlsConnector;

/// Why a route's TLS settings cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    #[error("caBundle: no PEM certificate could be read")]
    EmptyBundle,
    #[error("caBundle: {0}")]
    Bundle(String),
    #[error("no trust roots: the system has none and the route gives no caBundle")]
    NoRoots,
    #[error("verifier: {0}")]
    Verifier(String),
}

/// What was wrong with an upstream's certificate, in the terms of a TLS-RPT report
/// (RFC 8460 section 4.3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CertificateProblem {
    /// Not valid for the name that was dialled.
    HostMismatch,
    /// Expired (or not yet valid).
    Expired,
    /// Not issued by a trusted root.
    NotTrusted,
    /// Any other failed check.
    Invalid,
}

impl CertificateProblem {
    /// The problem behind a failed handshake, when it was the certificate.
    pub fn of(error: &std::io::Error) -> Option<Self> {
        let rustls::Error::InvalidCertificate(e) =
            error.get_ref()?.downcast_ref::<rustls::Error>()?
        else {
            return None;
        };
        Some(match e {
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
                Self::HostMismatch
            }
            CertificateError::Expired
            | CertificateError::ExpiredContext { .. }
            | CertificateError::NotValidYet
            | CertificateError::NotValidYetContext { .. } => Self::Expired,
            CertificateError::UnknownIssuer | CertificateError::BadSignature => Self::NotTrusted,
            _ => Self::Invalid,
        })
    }

    /// The TLS-RPT result type.
    pub fn result_type(self) -> &'static str {
        match self {
            Self::HostMismatch => "certificate-host-mismatch",
            Self::Expired => "certificate-expired",
            Self::NotTrusted => "certificate-not-trusted",
            Self::Invalid => "validation-failure",
        }
    }
}

impl std::fmt::Display for CertificateProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::HostMismatch => "not valid for the host name",
            Self::Expired => "expired or not yet valid",
            Self::NotTrusted => "not issued by a trusted authority",
            Self::Invalid => "invalid",
        })
    }
}

/// What to check of the upstream's certificate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Checks {
    pub ca_signed: bool,
    pub hostname: bool,
}

fn provider() -> Arc<CryptoProvider> {
    CryptoProvider::get_default()
        .cloned()
        .unwrap_or_else(|| Arc::new(rustls::crypto::ring::default_provider()))
}

/// The system's trust roots, read once.
fn system_roots() -> &'static [CertificateDer<'static>] {
    static ROOTS: OnceLock<Vec<CertificateDer<'static>>> = OnceLock::new();
    ROOTS.get_or_init(|| rustls_native_certs::load_native_certs().certs)
}

/// A connector for one route. `bundle`: extra PEM roots from `tls.caBundleSecretRef`.
pub fn connector(checks: Checks, bundle: Option<&str>) -> Result<TlsConnector, TlsSetupError> {
    Ok(TlsConnector::from(Arc::new(client_config(checks, bundle)?)))
}

/// The client TLS settings behind [`connector`], for other clients of the same trust (the
/// token endpoint of a route's OAuth).
pub fn client_config(checks: Checks, bundle: Option<&str>) -> Result<ClientConfig, TlsSetupError> {
    let provider = provider();
    let algorithms = provider.signature_verification_algorithms;
    let verifier: Arc<dyn ServerCertVerifier> = if checks.ca_signed {
        let mut roots = RootCertStore::empty();
        roots.add_parsable_certificates(system_roots().iter().cloned());
        if let Some(pem) = bundle {
            let certs: Vec<CertificateDer<'static>> =
                CertificateDer::pem_slice_iter(pem.as_bytes())
                    .collect::<Result<_, _>>()
                    .map_err(|e| TlsSetupError::Bundle(e.to_string()))?;
            if certs.is_empty() {
                return Err(TlsSetupError::EmptyBundle);
            }
            roots.add_parsable_certificates(certs);
        }
        if roots.is_empty() {
            return Err(TlsSetupError::NoRoots);
        }
        let webpki = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
            .build()
            .map_err(|e| TlsSetupError::Verifier(e.to_string()))?;
        if checks.hostname {
            webpki
        } else {
            Arc::new(IgnoreName(webpki))
        }
    } else {
        Arc::new(NoChecks(algorithms))
    };
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsSetupError::Verifier(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    Ok(config)
}

/// The name to verify: the host name, or its IP address.
pub fn server_name(host: &str) -> Option<ServerName<'static>> {
    ServerName::try_from(host.to_owned()).ok()
}

/// Chain checked, name not (`requireCASigned: true`, `validateHostname: false`).
#[derive(Debug)]
struct IgnoreName(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for IgnoreName {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// Opportunistic encryption (RFC 7435): any certificate, but the handshake signatures are
/// still verified so the session keys belong to whoever holds the certificate's key.
#[derive(Debug)]
struct NoChecks(WebPkiSupportedAlgorithms);

impl ServerCertVerifier for NoChecks {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_schemes()
    }
}
