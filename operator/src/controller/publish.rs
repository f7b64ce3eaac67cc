//! What the operator writes for a namespace (SPEC 4): ConfigMap `mailroute-relay-config` with
//! the compiled document, and Secret `mailroute-relay-credentials` with the credentials it
//! references. Pure: the objects are built here and applied by the controller.
//!
//! A document larger than [`PART_BYTES`] (the API server refuses objects over 1 MiB) is split
//! over numbered ConfigMaps `mailroute-relay-config-0`, `-1`, ..., part `i` of `n` under the
//! key `config.json.<i>-of-<n>` ([`mailroute_config::parts`]); the index ConfigMap then holds no
//! document. Annotations (hash, generation, part) are for people; a reader needs only the
//! keys, and the assembled document's own hash tells a mix of two generations.

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use mailroute_config::{Credentials, RelayDocument, parts};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;

pub const CONFIG_MAP: &str = parts::CONFIG_MAP;
pub const SECRET: &str = parts::CREDENTIALS_SECRET;
/// Key of the whole document in the ConfigMap; parts use [`parts::part_key`].
pub const DOCUMENT_KEY: &str = parts::WHOLE_KEY;
/// Key of the credentials in the Secret.
pub const CREDENTIALS_KEY: &str = parts::CREDENTIALS_KEY;
/// Largest document part in one ConfigMap, leaving room for metadata under the 1 MiB limit.
pub const PART_BYTES: usize = 900 * 1024;

pub const HASH_ANNOTATION: &str = "mailroute.io/hash";
pub const GENERATION_ANNOTATION: &str = "mailroute.io/generation";
pub const PARTS_ANNOTATION: &str = parts::PARTS_ANNOTATION;
pub const PART_ANNOTATION: &str = "mailroute.io/part";

/// The objects for one namespace.
#[derive(Clone, Debug, PartialEq)]
pub struct Published {
    /// The index ConfigMap first, then the parts (if split).
    pub config_maps: Vec<ConfigMap>,
    pub secret: Secret,
}

fn meta(
    name: &str,
    namespace: &str,
    annotations: BTreeMap<String, String>,
    owners: &[OwnerReference],
) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.to_owned()),
        namespace: Some(namespace.to_owned()),
        labels: Some(BTreeMap::from([(
            "app.kubernetes.io/managed-by".to_owned(),
            "mailroute-operator".to_owned(),
        )])),
        annotations: Some(annotations),
        owner_references: (!owners.is_empty()).then(|| owners.to_vec()),
        ..ObjectMeta::default()
    }
}

/// A digest of the credentials, for the Secret's annotation (a change there must be written
/// even when the document stays the same).
pub fn credentials_hash(credentials: &Credentials) -> String {
    let json = serde_json::to_vec(credentials).unwrap_or_default();
    let digest = Sha256::digest(&json);
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}

/// Builds the objects for `document` and `credentials`, owned by `owners`.
pub fn publish(
    namespace: &str,
    document: &RelayDocument,
    credentials: &Credentials,
    owners: &[OwnerReference],
) -> Published {
    let json = serde_json::to_string(document).unwrap_or_default();
    let generation = document.generation.to_string();
    let parts = parts::split(&json, PART_BYTES);
    let mut index = BTreeMap::from([
        (HASH_ANNOTATION.to_owned(), document.hash.clone()),
        (GENERATION_ANNOTATION.to_owned(), generation.clone()),
        (PARTS_ANNOTATION.to_owned(), parts.len().to_string()),
    ]);
    let mut config_maps = Vec::with_capacity(parts.len() + 1);
    if parts.len() == 1 {
        config_maps.push(ConfigMap {
            metadata: meta(CONFIG_MAP, namespace, index, owners),
            data: Some(BTreeMap::from([(DOCUMENT_KEY.to_owned(), json)])),
            ..ConfigMap::default()
        });
    } else {
        index.insert(PARTS_ANNOTATION.to_owned(), parts.len().to_string());
        config_maps.push(ConfigMap {
            metadata: meta(CONFIG_MAP, namespace, index, owners),
            data: Some(BTreeMap::new()),
            ..ConfigMap::default()
        });
        for (i, part) in parts.iter().enumerate() {
            let annotations = BTreeMap::from([
                (HASH_ANNOTATION.to_owned(), document.hash.clone()),
                (GENERATION_ANNOTATION.to_owned(), generation.clone()),
                (PARTS_ANNOTATION.to_owned(), parts.len().to_string()),
                (PART_ANNOTATION.to_owned(), i.to_string()),
            ]);
            config_maps.push(ConfigMap {
                metadata: meta(&part_name(i), namespace, annotations, owners),
                data: Some(BTreeMap::from([(
                    parts::part_key(i, parts.len()),
                    (*part).to_owned(),
                )])),
                ..ConfigMap::default()
            });
        }
    }
    let secret_json = serde_json::to_vec(credentials).unwrap_or_default();
    let secret = Secret {
        metadata: meta(
            SECRET,
            namespace,
            BTreeMap::from([(HASH_ANNOTATION.to_owned(), credentials_hash(credentials))]),
            owners,
        ),
        data: Some(BTreeMap::from([(
            CREDENTIALS_KEY.to_owned(),
            ByteString(secret_json),
        )])),
        type_: Some("Opaque".to_owned()),
        ..Secret::default()
    };
    Published {
        config_maps,
        secret,
    }
}

/// Name of part `i` of a split document.
pub fn part_name(i: usize) -> String {
    parts::part_name(CONFIG_MAP, i)
}

#[cfg(test)]
mod tests {
    use super::*;
    use mailroute_config::RelayConfig;

    fn document() -> RelayDocument {
        RelayDocument::new(
            3,
            RelayConfig {
                namespace: "mail".into(),
                ..RelayConfig::default()
            },
        )
    }

    #[test]
    fn a_small_document_is_one_config_map_and_credentials_stay_in_the_secret() {
        let mut credentials = Credentials::default();
        credentials.tenants.insert(
            "acme".into(),
            BTreeMap::from([("app".into(), "s3cret".into())]),
        );
        let p = publish("mail", &document(), &credentials, &[]);
        assert_eq!(p.config_maps.len(), 1);
        let cm = &p.config_maps[0];
        assert_eq!(cm.metadata.name.as_deref(), Some(CONFIG_MAP));
        let annotations = cm.metadata.annotations.clone().unwrap_or_default();
        assert_eq!(annotations[GENERATION_ANNOTATION], "3");
        assert_eq!(annotations[HASH_ANNOTATION], document().hash);
        let data = cm.data.clone().unwrap_or_default();
        let back = RelayDocument::from_json(data[DOCUMENT_KEY].as_bytes());
        assert!(back.is_ok(), "{back:?}");
        assert!(!data[DOCUMENT_KEY].contains("s3cret"));
        let secret = p.secret.data.unwrap_or_default();
        assert!(String::from_utf8_lossy(&secret[CREDENTIALS_KEY].0).contains("s3cret"));
    }
}
