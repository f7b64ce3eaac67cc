//! A tenant's DKIM keys (SPEC 12, `RelayPolicy.dkim`): each key's domain must be the tenant's
//! (one of its domains or a subdomain: a tenant never signs for a domain it does not hold), its
//! selector a DNS label, its header list sane (From always signed, first), its canonicalization
//! one of the four of RFC 6376; the private key is read from its Secret into the credentials,
//! never the document. Whether the key parses is the relay's to say (it holds the crypto); a
//! key that does not look like PEM at all is refused here.

use super::{Inputs, Report, secret_value};
use crate::document::DkimSigning;
use crate::names::Domain;
use crate::resources::DkimKey;
use std::collections::{BTreeMap, BTreeSet};

/// Signed when a key does not list its own header fields.
pub const DEFAULT_HEADERS: [&str; 12] = [
    "from",
    "to",
    "cc",
    "subject",
    "date",
    "message-id",
    "reply-to",
    "in-reply-to",
    "references",
    "mime-version",
    "content-type",
    "content-transfer-encoding",
];

/// The keys that compile, and their private keys by record name.
pub(super) fn compile(
    keys: &[DkimKey],
    domains: &BTreeSet<Domain>,
    inputs: &Inputs,
    report: &mut Report<'_>,
) -> (Vec<DkimSigning>, BTreeMap<String, String>) {
    let mut out = Vec::new();
    let mut private = BTreeMap::new();
    for (i, key) in keys.iter().enumerate() {
        let field = |name: &str| format!("dkim[{i}].{name}");
        let domain = match key.domain.parse::<Domain>() {
            Ok(d) if domains.iter().any(|own| d.is_within(own)) => d,
            Ok(d) => {
                report.bad(
                    field("domain"),
                    format!("{d} is not one of the tenant's domains or their subdomains"),
                );
                continue;
            }
            Err(e) => {
                report.bad(field("domain"), format!("{:?} {e}", key.domain));
                continue;
            }
        };
        let selector = key.selector.to_ascii_lowercase();
        let label = |l: &str| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        };
        if !selector.split('.').all(label) {
            report.bad(
                field("selector"),
                format!(
                    "{:?} is not a DNS name (letters, digits, '-', '.')",
                    key.selector
                ),
            );
            continue;
        }
        let (relaxed_headers, relaxed_body) = match key.canonicalization.as_str() {
            "relaxed/relaxed" | "relaxed" => (true, true),
            "relaxed/simple" => (true, false),
            "simple/relaxed" => (false, true),
            "simple/simple" | "simple" => (false, false),
            other => {
                report.bad(
                    field("canonicalization"),
                    format!(
                        "{other:?}: expected relaxed/relaxed, relaxed/simple, simple/relaxed or simple/simple"
                    ),
                );
                continue;
            }
        };
        let mut headers = vec!["from".to_owned()];
        let listed: Vec<String> = if key.headers.is_empty() {
            DEFAULT_HEADERS.iter().map(|h| (*h).to_owned()).collect()
        } else {
            key.headers
                .iter()
                .map(|h| h.trim().to_ascii_lowercase())
                .collect()
        };
        if let Some(bad) = listed
            .iter()
            .find(|h| h.is_empty() || !h.bytes().all(|b| b.is_ascii_graphic() && b != b':'))
        {
            report.bad(
                field("headers"),
                format!("{bad:?} is not a header field name"),
            );
            continue;
        }
        for h in listed {
            if !headers.contains(&h) {
                headers.push(h);
            }
        }
        let signing = DkimSigning {
            domain,
            selector,
            algorithm: key.algorithm,
            headers,
            relaxed_headers,
            relaxed_body,
        };
        let name = signing.record_name();
        if private.contains_key(&name) {
            report.bad(field("selector"), format!("{name} is listed twice"));
            continue;
        }
        let pem = match secret_value(inputs, &key.private_key_secret_ref) {
            Ok(bytes) => String::from_utf8_lossy(bytes).trim().to_owned(),
            Err(e) => {
                report.bad(field("privateKeySecretRef"), e);
                continue;
            }
        };
        if !pem.starts_with("-----BEGIN ") || !pem.contains("PRIVATE KEY-----") {
            report.bad(
                field("privateKeySecretRef"),
                format!(
                    "Secret {:?} key {:?} holds no PEM private key (-----BEGIN PRIVATE KEY-----)",
                    key.private_key_secret_ref.name, key.private_key_secret_ref.key
                ),
            );
            continue;
        }
        private.insert(name, pem);
        out.push(signing);
    }
    (out, private)
}
