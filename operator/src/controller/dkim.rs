//! A tenant's DKIM keys as its status shows them (SPEC 12): for each key, the TXT record to
//! publish at `SELECTOR._domainkey.DOMAIN`, derived from the private key the operator already
//! reads for the relays (the record holds only the public key). Pure.
//!
//! - `rsa-sha256`: `v=DKIM1; k=rsa; p=` the base64 of the public key's SubjectPublicKeyInfo
//!   (what `openssl pkey -pubout` prints, and what every verifier reads).
//! - `ed25519-sha256`: `v=DKIM1; k=ed25519; p=` the base64 of the raw 32-octet key (RFC 8463).
//!
//! With each probe pass, the leader asks DNS for every record and sets the policy's
//! `DKIMPublished` condition ([`published`], pure): `True` when each name publishes the key
//! the relay signs with, `False` naming the records missing or holding another key, `Unknown`
//! when DNS did not answer.

use base64::Engine;
use mailroute_config::Credentials;
use mailroute_config::document::Tenant;
use mailroute_config::resources::{Condition, DkimAlgorithm, DkimPublication};
use rustls_pki_types::PrivateKeyDer;
use rustls_pki_types::pem::PemObject;

/// The record of each of `tenant`'s keys, in the policy's order; a key that cannot be read
/// says why in place of its record.
pub fn publications(tenant: &Tenant, credentials: &Credentials) -> Vec<DkimPublication> {
    tenant
        .dkim
        .iter()
        .map(|signing| {
            let name = signing.record_name();
            let record = credentials
                .dkim
                .get(&name)
                .ok_or_else(|| "no private key".to_owned())
                .and_then(|pem| record(signing.algorithm, pem));
            let (record, error) = match record {
                Ok(r) => (Some(r), None),
                Err(e) => (None, Some(e)),
            };
            DkimPublication {
                domain: signing.domain.to_string(),
                selector: signing.selector.clone(),
                name,
                record,
                error,
            }
        })
        .collect()
}

/// The TXT record for the private key `pem`.
pub fn record(algorithm: DkimAlgorithm, pem: &str) -> Result<String, String> {
    let der = PrivateKeyDer::from_pem_slice(pem.as_bytes())
        .map_err(|e| format!("not a PEM private key: {e}"))?;
    let b64 = base64::engine::general_purpose::STANDARD;
    match (algorithm, &der) {
        (DkimAlgorithm::RsaSha256, PrivateKeyDer::Pkcs8(k)) => {
            rsa(ring::rsa::KeyPair::from_pkcs8(k.secret_pkcs8_der()))
        }
        (DkimAlgorithm::RsaSha256, PrivateKeyDer::Pkcs1(k)) => {
            rsa(ring::rsa::KeyPair::from_der(k.secret_pkcs1_der()))
        }
        (DkimAlgorithm::Ed25519Sha256, PrivateKeyDer::Pkcs8(k)) => {
            use ring::signature::KeyPair;
            let pair =
                ring::signature::Ed25519KeyPair::from_pkcs8_maybe_unchecked(k.secret_pkcs8_der())
                    .map_err(|e| format!("not an Ed25519 key: {e}"))?;
            Ok(format!(
                "v=DKIM1; k=ed25519; p={}",
                b64.encode(pair.public_key().as_ref())
            ))
        }
        _ => Err(format!("not a key for {algorithm:?}")),
    }
}

fn rsa(pair: Result<ring::rsa::KeyPair, ring::error::KeyRejected>) -> Result<String, String> {
    let pair = pair.map_err(|e| format!("not an RSA key: {e}"))?;
    let spki = rsa_spki(pair.public().as_ref());
    Ok(format!(
        "v=DKIM1; k=rsa; p={}",
        base64::engine::general_purpose::STANDARD.encode(spki)
    ))
}

/// `SubjectPublicKeyInfo { AlgorithmIdentifier { rsaEncryption, NULL }, BIT STRING { key } }`.
/// Hand-written: a fixed prefix and two lengths; ring gives the inner `RSAPublicKey` only.
fn rsa_spki(rsa_public_key: &[u8]) -> Vec<u8> {
    const ALGORITHM: [u8; 15] = [
        0x30, 0x0d, 0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01, 0x05, 0x00,
    ];
    let mut bits = vec![0x03];
    der_len(rsa_public_key.len() + 1, &mut bits);
    bits.push(0x00);
    bits.extend_from_slice(rsa_public_key);
    let mut out = vec![0x30];
    der_len(ALGORITHM.len() + bits.len(), &mut out);
    out.extend_from_slice(&ALGORITHM);
    out.extend_from_slice(&bits);
    out
}

fn der_len(len: usize, out: &mut Vec<u8>) {
    if len < 0x80 {
        out.push(len as u8);
        return;
    }
    let bytes: Vec<u8> = len
        .to_be_bytes()
        .into_iter()
        .skip_while(|b| *b == 0)
        .collect();
    out.push(0x80 | bytes.len() as u8);
    out.extend(bytes);
}

/// What DNS answered for one record name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Lookup {
    /// The TXT records there (none: the name publishes nothing).
    Found(Vec<String>),
    /// DNS did not answer.
    Failed(String),
}

/// The `p=` and `k=` tags of a key record, whitespace removed (`k` defaults to `rsa`).
fn key_of(record: &str) -> Option<(String, String)> {
    let mut key = None;
    let mut kind = "rsa".to_owned();
    for tag in record.split(';') {
        let Some((name, value)) = tag.split_once('=') else {
            continue;
        };
        let value: String = value.chars().filter(|c| !c.is_whitespace()).collect();
        match name.trim() {
            "p" => key = Some(value),
            "k" => kind = value.to_ascii_lowercase(),
            _ => {}
        }
    }
    key.map(|k| (kind, k))
}

/// The `DKIMPublished` condition's status, reason and message for `expected` (one per key)
/// and what DNS answered for each, in the same order.
pub fn published(
    expected: &[DkimPublication],
    found: &[Lookup],
) -> (&'static str, &'static str, String) {
    let mut missing = Vec::new();
    let mut differing = Vec::new();
    let mut failed = Vec::new();
    for (publication, lookup) in expected.iter().zip(found) {
        let Some(wanted) = publication.record.as_deref().and_then(key_of) else {
            continue;
        };
        match lookup {
            Lookup::Failed(e) => failed.push(format!("{}: {e}", publication.name)),
            Lookup::Found(records) => {
                let keys: Vec<(String, String)> =
                    records.iter().filter_map(|r| key_of(r)).collect();
                if keys.is_empty() {
                    missing.push(publication.name.clone());
                } else if !keys.contains(&wanted) {
                    differing.push(publication.name.clone());
                }
            }
        }
    }
    let mut problems = Vec::new();
    if !missing.is_empty() {
        problems.push(format!("no key record at {}", missing.join(", ")));
    }
    if !differing.is_empty() {
        problems.push(format!(
            "another key than the relay signs with at {}",
            differing.join(", ")
        ));
    }
    match (problems.is_empty(), failed.is_empty()) {
        (false, _) => ("False", "NotPublished", problems.join("; ")),
        (true, false) => ("Unknown", "LookupFailed", failed.join("; ")),
        (true, true) => (
            "True",
            "Published",
            format!(
                "{} published",
                expected
                    .iter()
                    .map(|p| p.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        ),
    }
}

/// Asks DNS for each of policy `name`'s records and sets its `DKIMPublished` condition (no
/// write when it is unchanged). Returns the condition's status.
pub async fn check_and_report(
    client: &kube::Client,
    namespace: &str,
    name: &str,
    publications: &[DkimPublication],
    resolver: &mailroute_smtp_client::hosts::Resolver,
    now: &str,
) -> Result<&'static str, kube::Error> {
    use kube::api::{Patch, PatchParams};
    let mut found = Vec::with_capacity(publications.len());
    for p in publications {
        found.push(match resolver.txt(&p.name).await {
            Ok(records) => Lookup::Found(records),
            Err(e) => Lookup::Failed(e.to_string()),
        });
    }
    let (status, reason, message) = published(publications, &found);
    let api: kube::Api<mailroute_config::resources::RelayPolicy> =
        kube::Api::namespaced(client.clone(), namespace);
    let Some(current) = api.get_opt(name).await? else {
        return Ok(status);
    };
    let previous = current.status.map(|s| s.conditions).unwrap_or_default();
    let last_transition_time = previous
        .iter()
        .find(|c| c.type_ == "DKIMPublished" && c.status == status)
        .map(|c| c.last_transition_time.clone())
        .unwrap_or_else(|| now.to_owned());
    let condition = Condition {
        type_: "DKIMPublished".to_owned(),
        status: status.to_owned(),
        reason: reason.to_owned(),
        message,
        last_transition_time,
        observed_generation: current.metadata.generation,
    };
    if previous.contains(&condition) {
        return Ok(status);
    }
    if status == "False" {
        tracing::warn!(namespace, policy = name, message = %condition.message, "DKIM key not published");
    }
    let conditions = super::conditions::merged(&previous, condition);
    let patch = serde_json::json!({"status": {"conditions": conditions}});
    api.patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    Ok(status)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    /// A key made by openssl, and the public key openssl prints for it (SPKI, DER).
    fn openssl_key(algorithm: &str) -> (String, Vec<u8>) {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let path = dir.path().join("key.pem");
        let mut genpkey = Command::new("openssl");
        genpkey
            .args(["genpkey", "-algorithm", algorithm, "-out"])
            .arg(&path);
        if algorithm == "RSA" {
            genpkey.args(["-pkeyopt", "rsa_keygen_bits:2048"]);
        }
        assert!(genpkey.status().is_ok_and(|s| s.success()));
        let public = Command::new("openssl")
            .args(["pkey", "-pubout", "-outform", "DER", "-in"])
            .arg(&path)
            .output()
            .unwrap_or_else(|e| panic!("{e}"));
        let pem = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{e}"));
        (pem, public.stdout)
    }

    #[test]
    fn the_record_holds_the_public_key_openssl_derives() {
        let b64 = base64::engine::general_purpose::STANDARD;
        let (pem, spki) = openssl_key("RSA");
        assert_eq!(
            record(DkimAlgorithm::RsaSha256, &pem),
            Ok(format!("v=DKIM1; k=rsa; p={}", b64.encode(&spki)))
        );
        // The same key in the older PKCS#1 form gives the same record.
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let (pkcs8, pkcs1) = (dir.path().join("k8.pem"), dir.path().join("k1.pem"));
        std::fs::write(&pkcs8, &pem).unwrap_or_else(|e| panic!("{e}"));
        let converted = Command::new("openssl")
            .args(["rsa", "-traditional", "-in"])
            .arg(&pkcs8)
            .arg("-out")
            .arg(&pkcs1)
            .status();
        assert!(converted.is_ok_and(|s| s.success()));
        let traditional = std::fs::read_to_string(&pkcs1).unwrap_or_else(|e| panic!("{e}"));
        assert!(traditional.contains("BEGIN RSA PRIVATE KEY"));
        assert_eq!(
            record(DkimAlgorithm::RsaSha256, &traditional),
            record(DkimAlgorithm::RsaSha256, &pem)
        );

        let (pem, spki) = openssl_key("ed25519");
        assert_eq!(
            record(DkimAlgorithm::Ed25519Sha256, &pem),
            Ok(format!(
                "v=DKIM1; k=ed25519; p={}",
                b64.encode(&spki[spki.len() - 32..])
            ))
        );
        // A key of the other algorithm, or no key, says so.
        assert!(
            record(DkimAlgorithm::RsaSha256, &pem).is_err_and(|e| e.starts_with("not an RSA key"))
        );
        assert!(
            record(DkimAlgorithm::RsaSha256, "junk").is_err_and(|e| e.starts_with("not a PEM"))
        );
    }

    fn publication(name: &str, record: &str) -> DkimPublication {
        DkimPublication {
            domain: "example.com".into(),
            selector: name.split('.').next().unwrap_or_default().into(),
            name: name.into(),
            record: Some(record.into()),
            error: None,
        }
    }

    #[test]
    fn published_means_every_name_holds_the_key_the_relay_signs_with() {
        let expected = [
            publication("a._domainkey.example.com", "v=DKIM1; k=rsa; p=AAAA"),
            publication("b._domainkey.example.com", "v=DKIM1; k=ed25519; p=BBBB"),
        ];
        let found = |a: &str, b: &str| {
            [
                Lookup::Found(vec![a.to_owned()]),
                Lookup::Found(vec![b.to_owned()]),
            ]
        };
        // Folded into strings by the DNS operator, `k=` left to its default: still the key.
        assert_eq!(
            published(
                &expected,
                &found("v=DKIM1; p=AA AA", "v=DKIM1;k=ed25519;p=BBBB")
            )
            .0,
            "True"
        );
        assert_eq!(
            published(
                &expected,
                &found("v=DKIM1; p=AAAA", "v=DKIM1; k=ed25519; p=OLD")
            ),
            (
                "False",
                "NotPublished",
                "another key than the relay signs with at b._domainkey.example.com".to_owned()
            )
        );
        assert_eq!(
            published(
                &expected,
                &[Lookup::Found(vec![]), Lookup::Failed("timed out".into())]
            ),
            (
                "False",
                "NotPublished",
                "no key record at a._domainkey.example.com".to_owned()
            )
        );
        assert_eq!(
            published(
                &expected,
                &[
                    Lookup::Found(vec!["v=DKIM1; p=AAAA".into()]),
                    Lookup::Failed("timed out".into())
                ]
            )
            .0,
            "Unknown"
        );
    }
}
