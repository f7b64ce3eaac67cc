//! Loading the relay's configuration from files.
//!
//! `--manifests DIR` compiles Kubernetes manifests with the same compiler the operator runs;
//! `--config FILE` reads a document the operator compiled (`mailroute-operator render` output or
//! the ConfigMap's content). Either way the result has passed [`RelayDocument::from_json`]'s
//! checks. A relay refuses to start on a configuration with any problem: running with a tenant
//! silently left out would refuse or misroute its mail.

use mailroute_config::manifests::ManifestError;
use mailroute_config::{Credentials, Manifests, Problem, RelayDocument, compile};
use std::path::{Path, PathBuf};

/// A configuration ready for use.
#[derive(Clone, Debug)]
pub struct Loaded {
    pub document: RelayDocument,
    pub credentials: Credentials,
}

impl Loaded {
    /// What tells one configuration from another: the document's content hash and a digest of
    /// the credentials (which the document leaves out), so a rotated password, CA bundle or
    /// upstream credential is a change like a rule's. Never shows a secret.
    pub fn fingerprint(&self) -> String {
        use sha2::{Digest, Sha256};
        let credentials = serde_json::to_vec(&self.credentials).unwrap_or_default();
        let digest = Sha256::digest(&credentials);
        let short: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
        format!("{}+{short}", self.document.hash)
    }
}

/// Why a configuration was not loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(transparent)]
    Manifests(#[from] ManifestError),
    #[error("{} invalid resource(s):\n  {}", .0.len(), .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n  "))]
    Invalid(Vec<Problem>),
    #[error("{dir}: the manifests span namespaces {}; give the relay one namespace's manifests", .namespaces.join(", "))]
    SeveralNamespaces {
        dir: PathBuf,
        namespaces: Vec<String>,
    },
    #[error("{0}: no MailRoute, RoutingRule or RelayPolicy found")]
    Nothing(PathBuf),
    #[error("{path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Cluster(#[from] crate::cluster::ClusterError),
    #[error("loading the configuration: {0}")]
    Task(String),
    #[error("{dir}: {source}")]
    Parts {
        dir: PathBuf,
        source: mailroute_config::parts::PartsError,
    },
    #[error("{path}: not valid credentials: {detail}")]
    Credentials { path: PathBuf, detail: String },
    #[error("{path}: {source}")]
    Document {
        path: PathBuf,
        source: mailroute_config::document::DocumentError,
    },
}

/// Compiles the manifests of `dir` (one namespace) into a configuration.
pub fn from_manifests(dir: &Path, generation: u64) -> Result<Loaded, LoadError> {
    let manifests = Manifests::read_dir(dir)?;
    for warning in &manifests.warnings {
        tracing::warn!(%warning, "manifest skipped");
    }
    let mut namespaces: Vec<String> = manifests
        .namespaces
        .iter()
        .filter(|(_, i)| !(i.routes.is_empty() && i.policies.is_empty() && i.rules.is_empty()))
        .map(|(ns, _)| ns.clone())
        .collect();
    if !manifests.problems.is_empty() {
        return Err(LoadError::Invalid(manifests.problems));
    }
    let namespace = match namespaces.len() {
        0 => return Err(LoadError::Nothing(dir.to_owned())),
        1 => namespaces.remove(0),
        _ => {
            return Err(LoadError::SeveralNamespaces {
                dir: dir.to_owned(),
                namespaces,
            });
        }
    };
    let mut manifests = manifests;
    let inputs = manifests.namespaces.remove(&namespace).unwrap_or_default();
    let compiled = compile(&inputs);
    if !compiled.problems.is_empty() {
        return Err(LoadError::Invalid(compiled.problems));
    }
    Ok(Loaded {
        document: compiled.document(generation),
        credentials: compiled.credentials,
    })
}

/// Reads a compiled document: a file, or a directory as a projected volume of the operator's
/// ConfigMap(s) and Secret shows it: the document whole (`config.json`) or in parts
/// (`config.json.<i>-of-<n>`, all of them needed), and `credentials.json` when present.
pub fn from_document_file(path: &Path) -> Result<Loaded, LoadError> {
    if path.is_dir() {
        return from_document_dir(path);
    }
    let bytes = std::fs::read(path).map_err(|source| LoadError::Read {
        path: path.to_owned(),
        source,
    })?;
    let document = RelayDocument::from_json(&bytes).map_err(|source| LoadError::Document {
        path: path.to_owned(),
        source,
    })?;
    Ok(Loaded {
        document,
        credentials: Credentials::default(),
    })
}

fn from_document_dir(dir: &Path) -> Result<Loaded, LoadError> {
    let read_error = |source| LoadError::Read {
        path: dir.to_owned(),
        source,
    };
    let mut entries = std::collections::BTreeMap::new();
    for entry in std::fs::read_dir(dir).map_err(read_error)? {
        let path = entry.map_err(read_error)?.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        // NB: kubelet's `..data` and `..<timestamp>` entries; the visible names are symlinks
        // into the current one.
        if name.starts_with('.') || !path.is_file() {
            continue;
        }
        let text = std::fs::read_to_string(&path).map_err(|source| LoadError::Read {
            path: path.clone(),
            source,
        })?;
        entries.insert(name.to_owned(), text);
    }
    from_entries(dir, &entries)
}

/// A configuration from the entries of a `--config` directory or of the operator's objects
/// (`--configmap`): `config.json` or all its parts, and `credentials.json` if present. `origin`
/// names where they came from in errors.
pub fn from_entries(
    origin: &Path,
    entries: &std::collections::BTreeMap<String, String>,
) -> Result<Loaded, LoadError> {
    let dir = origin;
    let json = mailroute_config::parts::assemble(entries).map_err(|e| LoadError::Parts {
        dir: dir.to_owned(),
        source: e,
    })?;
    let document =
        RelayDocument::from_json(json.as_bytes()).map_err(|source| LoadError::Document {
            path: dir.to_owned(),
            source,
        })?;
    let credentials = match entries.get(CREDENTIALS_FILE) {
        Some(text) => serde_json::from_str(text).map_err(|e| LoadError::Credentials {
            path: dir.join(CREDENTIALS_FILE),
            detail: e.to_string(),
        })?,
        None => Credentials::default(),
    };
    Ok(Loaded {
        document,
        credentials,
    })
}

/// The credentials' file name in a `--config` directory (the operator's Secret key).
pub const CREDENTIALS_FILE: &str = mailroute_config::parts::CREDENTIALS_KEY;

/// A one-line description of a configuration, for logs and `--check`.
pub fn summary(loaded: &Loaded) -> String {
    let config = &loaded.document.config;
    let rules: usize = config.tenants.values().map(|t| t.rules.len()).sum();
    let users: usize = config.tenants.values().map(|t| t.users.len()).sum();
    format!(
        "namespace {}, generation {}, {}: {} route(s), {} tenant(s), {} rule(s), {} user(s)",
        config.namespace,
        loaded.document.generation,
        loaded.document.hash,
        config.routes.len(),
        config.tenants.len(),
        rules,
        users
    )
}
