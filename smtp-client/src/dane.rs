//! DANE for SMTP (RFC 7672): an MX host's DNSSEC-validated TLSA records decide its
//! certificate. `DANE-EE(3)` records match the server's own certificate or public key (names
//! and dates are not checked, section 3.1.1); `DANE-TA(2)` records match a certificate of the
//! chain the server sent, which then anchors the ordinary chain and name checks (section
//! 3.1.2). `PKIX-TA(0)`/`PKIX-EE(1)` records, unknown selectors and matching types are
//! unusable in SMTP (section 3.1.3); a host whose records are all unusable still gets
//! mandatory TLS, without authentication (section 2.2).

use hickory_resolver::proto::rr::rdata::TLSA;
use ring::digest;
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use std::sync::Arc;
use tokio_rustls::TlsConnector;

/// One TLSA record, as numbers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tlsa {
    pub usage: u8,
    pub selector: u8,
    pub matching: u8,
    pub data: Vec<u8>,
}

impl From<&TLSA> for Tlsa {
    fn from(r: &TLSA) -> Self {
        Self {
            usage: r.cert_usage.into(),
            selector: r.selector.into(),
            matching: r.matching.into(),
            data: r.cert_data.clone(),
        }
    }
}

impl Tlsa {
    /// Whether SMTP may use this record (RFC 7672 section 3.1).
    pub fn usable(&self) -> bool {
        matches!(self.usage, 2 | 3) && self.selector <= 1 && self.matching <= 2
    }

    /// Whether `cert` is what this record describes.
    fn matches(&self, cert: &CertificateDer<'_>) -> bool {
        let selected = match self.selector {
            0 => cert.as_ref().to_vec(),
            1 => match x509_parser::parse_x509_certificate(cert.as_ref()) {
                Ok((_, parsed)) => parsed.tbs_certificate.subject_pki.raw.to_vec(),
                Err(_) => return false,
            },
            _ => return false,
        };
        match self.matching {
            0 => selected == self.data,
            1 => digest::digest(&digest::SHA256, &selected).as_ref() == self.data.as_slice(),
            2 => digest::digest(&digest::SHA512, &selected).as_ref() == self.data.as_slice(),
            _ => false,
        }
    }
}

fn provider() -> Arc<CryptoProvider> {
    CryptoProvider::get_default()
        .cloned()
        .unwrap_or_else(|| Arc::new(rustls::crypto::ring::default_provider()))
}

/// A connector that accepts a server only by its usable TLSA `records`; `names` are the
/// reference identifiers a `DANE-TA` chain's certificate must carry (the MX host's name).
pub fn connector(records: Vec<Tlsa>, names: Vec<String>) -> Result<TlsConnector, String> {
    let provider = provider();
    let verifier = DaneVerifier {
        records: records.into_iter().filter(Tlsa::usable).collect(),
        names,
        algorithms: provider.signature_verification_algorithms,
        provider: Arc::clone(&provider),
    };
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    Ok(TlsConnector::from(Arc::new(config)))
}

#[derive(Debug)]
struct DaneVerifier {
    records: Vec<Tlsa>,
    names: Vec<String>,
    algorithms: WebPkiSupportedAlgorithms,
    provider: Arc<CryptoProvider>,
}

impl DaneVerifier {
    /// A `DANE-TA` record matching one of the chain's certificates, taken as the trust anchor
    /// of the usual chain and name checks.
    fn trust_anchored(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> bool {
        for anchor in intermediates {
            if !self
                .records
                .iter()
                .any(|r| r.usage == 2 && r.matches(anchor))
            {
                continue;
            }
            let mut roots = RootCertStore::empty();
            if roots.add(anchor.clone().into_owned()).is_err() {
                continue;
            }
            let Ok(webpki) =
                WebPkiServerVerifier::builder_with_provider(Arc::new(roots), self.provider.clone())
                    .build()
            else {
                continue;
            };
            for name in &self.names {
                if let Ok(server_name) = ServerName::try_from(name.as_str())
                    && webpki
                        .verify_server_cert(end_entity, intermediates, &server_name, &[], now)
                        .is_ok()
                {
                    return true;
                }
            }
        }
        false
    }
}

impl ServerCertVerifier for DaneVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let end_entity_matches = self
            .records
            .iter()
            .any(|r| r.usage == 3 && r.matches(end_entity));
        if end_entity_matches || self.trust_anchored(end_entity, intermediates, now) {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::ApplicationVerificationFailure,
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert() -> (CertificateDer<'static>, Vec<u8>) {
        let generated = rcgen::generate_simple_self_signed(vec!["mx.example".to_owned()])
            .unwrap_or_else(|e| panic!("{e}"));
        let der = generated.cert.der().clone();
        let spki = rcgen::PublicKeyData::subject_public_key_info(&generated.signing_key);
        (der, spki)
    }

    #[test]
    fn records_match_by_certificate_or_key_and_digest() {
        let (der, spki) = cert();
        let sha256 = |b: &[u8]| digest::digest(&digest::SHA256, b).as_ref().to_vec();
        let sha512 = |b: &[u8]| digest::digest(&digest::SHA512, b).as_ref().to_vec();
        for (selector, matching, data) in [
            (0, 0, der.as_ref().to_vec()),
            (0, 1, sha256(der.as_ref())),
            (1, 1, sha256(&spki)),
            (1, 2, sha512(&spki)),
            (1, 0, spki.clone()),
        ] {
            let r = Tlsa {
                usage: 3,
                selector,
                matching,
                data,
            };
            assert!(r.matches(&der), "{selector} {matching}");
        }
        let other = Tlsa {
            usage: 3,
            selector: 1,
            matching: 1,
            data: sha256(b"another key"),
        };
        assert!(!other.matches(&der));
    }

    #[test]
    fn pkix_usages_and_unknown_types_are_unusable_in_smtp() {
        let r = |usage, selector, matching| Tlsa {
            usage,
            selector,
            matching,
            data: vec![1],
        };
        assert!(r(3, 1, 1).usable());
        assert!(r(2, 0, 1).usable());
        assert!(!r(0, 1, 1).usable());
        assert!(!r(1, 1, 1).usable());
        assert!(!r(3, 2, 1).usable());
        assert!(!r(3, 1, 3).usable());
    }
}
