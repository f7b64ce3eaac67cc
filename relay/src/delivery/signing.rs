//! DKIM signing (SPEC 12, `RelayPolicy.dkim`) with the maintained `mail-auth` signer: a
//! tenant's own mail is signed once, before the plan's legs are made, so the primary and every
//! copy carry the same signature.
//!
//! - Only mail of a session *authorised* for the tenant (its IP range, account, token or
//!   certificate) is signed: a client merely claiming a tenant's domain in `From:` — inbound
//!   mail, or a forgery from outside — is never signed, whatever its addresses say.
//! - The domain signed for is the `From:` address's (DMARC aligns on it), else the envelope
//!   sender's, matched to the tenant's keys by domain or parent domain, the most specific key
//!   domain winning; every key of that domain signs (two selectors during a key rotation).
//! - The signature is one header, `DKIM-Signature:`, placed after the relay's `Received:` and
//!   before the message; the message's own bytes are untouched (byte transparency holds).
//! - A key that does not load is logged when the configuration is built and that key skipped;
//!   a message whose signing fails is delivered unsigned and counted, never refused.

use crate::interfaces::Transaction;
use crate::metrics::{DkimLabels, Metrics};
use mail_auth::common::crypto::{Ed25519Key, RsaKey, Sha256};
use mail_auth::common::headers::HeaderWriter;
use mail_auth::dkim::{Canonicalization, DkimSigner, Done};
use mailroute_config::document::DkimSigning;
use mailroute_config::names::Domain;
use mailroute_config::resources::DkimAlgorithm;
use mailroute_config::{Credentials, RelayConfig};
use rustls_pki_types::PrivateKeyDer;
use rustls_pki_types::pem::PemObject;
use std::collections::HashMap;

enum Key {
    Rsa(Box<DkimSigner<RsaKey<Sha256>, Done>>),
    Ed25519(Box<DkimSigner<Ed25519Key, Done>>),
}

/// One key of a tenant, ready to sign.
struct Signer {
    domain: Domain,
    selector: String,
    key: Key,
}

impl Signer {
    fn sign(&self, message: &[u8]) -> Result<String, mail_auth::Error> {
        match &self.key {
            Key::Rsa(s) => s.sign(message).map(|sig| sig.to_header()),
            Key::Ed25519(s) => s.sign(message).map(|sig| sig.to_header()),
        }
    }
}

/// Why a key could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("{0}: no private key in the credentials")]
    Missing(String),
    #[error("{name}: {why}")]
    Unusable { name: String, why: String },
}

/// The signing keys of a configuration, by tenant.
#[derive(Default)]
pub struct Signers {
    by_tenant: HashMap<String, Vec<Signer>>,
}

impl std::fmt::Debug for Signers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // NB: never the keys.
        f.debug_struct("Signers")
            .field("tenants", &self.by_tenant.keys().collect::<Vec<_>>())
            .finish()
    }
}

fn load(signing: &DkimSigning, pem: &str) -> Result<Key, String> {
    let der = PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(|e| e.to_string())?;
    let canonicalization = |relaxed| {
        if relaxed {
            Canonicalization::Relaxed
        } else {
            Canonicalization::Simple
        }
    };
    let (ch, cb) = (
        canonicalization(signing.relaxed_headers),
        canonicalization(signing.relaxed_body),
    );
    let headers = signing.headers.clone();
    match signing.algorithm {
        DkimAlgorithm::RsaSha256 => {
            let key = RsaKey::<Sha256>::from_key_der(der).map_err(|e| e.to_string())?;
            Ok(Key::Rsa(Box::new(
                DkimSigner::from_key(key)
                    .domain(signing.domain.as_str())
                    .selector(&signing.selector)
                    .headers(headers)
                    .header_canonicalization(ch)
                    .body_canonicalization(cb),
            )))
        }
        DkimAlgorithm::Ed25519Sha256 => {
            let PrivateKeyDer::Pkcs8(pkcs8) = der else {
                return Err("an Ed25519 key must be PKCS#8 (-----BEGIN PRIVATE KEY-----)".into());
            };
            let key = Ed25519Key::from_pkcs8_maybe_unchecked_der(pkcs8.secret_pkcs8_der())
                .map_err(|e| e.to_string())?;
            Ok(Key::Ed25519(Box::new(
                DkimSigner::from_key(key)
                    .domain(signing.domain.as_str())
                    .selector(&signing.selector)
                    .headers(headers)
                    .header_canonicalization(ch)
                    .body_canonicalization(cb),
            )))
        }
    }
}

impl Signers {
    /// The keys of every tenant of `config`, and those that could not be loaded (skipped).
    pub fn new(config: &RelayConfig, credentials: &Credentials) -> (Self, Vec<KeyError>) {
        let mut signers = Self::default();
        let mut errors = Vec::new();
        for (tenant, t) in &config.tenants {
            for signing in &t.dkim {
                let name = signing.record_name();
                let Some(pem) = credentials.dkim.get(&name) else {
                    errors.push(KeyError::Missing(name));
                    continue;
                };
                match load(signing, pem) {
                    Ok(key) => signers
                        .by_tenant
                        .entry(tenant.clone())
                        .or_default()
                        .push(Signer {
                            domain: signing.domain.clone(),
                            selector: signing.selector.clone(),
                            key,
                        }),
                    Err(why) => errors.push(KeyError::Unusable { name, why }),
                }
            }
        }
        (signers, errors)
    }

    pub fn is_empty(&self) -> bool {
        self.by_tenant.is_empty()
    }

    /// Signs `tx` when it is its tenant's own mail in a domain the tenant has keys for: the
    /// signatures go in after the `Received:` header.
    pub fn sign(&self, tx: &mut Transaction, metrics: &Metrics) {
        let Some(tenant) = tx.tenant.as_deref().filter(|_| tx.authorised) else {
            return;
        };
        let Some(keys) = self.by_tenant.get(tenant) else {
            return;
        };
        let message = tx.content.get(tx.received_len..).unwrap_or_default();
        let Some(domain) = signing_domain(keys, message, &tx.mail_from) else {
            return;
        };
        let mut headers = String::new();
        for key in keys.iter().filter(|k| k.domain == domain) {
            let result = match key.sign(message) {
                Ok(header) => {
                    headers.push_str(&header);
                    "signed"
                }
                Err(e) => {
                    tracing::warn!(transaction = %tx.id, tenant, domain = %key.domain, selector = %key.selector, error = %e, "DKIM signing failed; delivered unsigned by this key");
                    "error"
                }
            };
            metrics
                .dkim_signatures
                .get_or_create(&DkimLabels {
                    tenant: tenant.to_owned(),
                    domain: key.domain.to_string(),
                    selector: key.selector.clone(),
                    result,
                })
                .inc();
        }
        if !headers.is_empty() {
            let at = tx.received_len;
            tx.content.splice(at..at, headers.bytes());
            tx.received_len += headers.len();
        }
    }
}

/// The key domain `message` is signed for: the most specific key domain holding the `From:`
/// address's domain, else the envelope sender's.
fn signing_domain(keys: &[Signer], message: &[u8], mail_from: &str) -> Option<Domain> {
    let best = |domain: &str| -> Option<Domain> {
        let domain = domain.parse::<Domain>().ok()?;
        keys.iter()
            .map(|k| &k.domain)
            .filter(|k| domain.is_within(k))
            .max_by_key(|k| k.as_str().len())
            .cloned()
    };
    let from = header_from_domain(message);
    from.as_deref()
        .and_then(best)
        .or_else(|| mail_from.rsplit_once('@').and_then(|(_, d)| best(d)))
}

/// The domain of the first `From:` address, as a mail reader sees it (quoted local parts,
/// comments and display names parsed by `mail-parser`, not split by hand).
fn header_from_domain(message: &[u8]) -> Option<String> {
    let parsed = mail_parser::MessageParser::default().parse_headers(message)?;
    let address = parsed.from()?.first()?.address()?;
    address
        .rsplit_once('@')
        .map(|(_, domain)| domain.to_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_from_domain_is_what_a_reader_sees_not_what_a_quoted_local_part_says() {
        let m = b"From: \"a@evil.example\" <bob@Example.COM>\r\nSubject: x\r\n\r\nbody\r\n";
        assert_eq!(header_from_domain(m).as_deref(), Some("example.com"));
        let m = b"From: bob@example.com (a comment @evil.example)\r\n\r\nbody\r\n";
        assert_eq!(header_from_domain(m).as_deref(), Some("example.com"));
        assert_eq!(header_from_domain(b"Subject: none\r\n\r\nbody\r\n"), None);
    }
}
