//! Reading Kubernetes manifests from files (SPEC section 4): every `*.yaml`/`*.yml` file of a
//! directory, multi-document, with `List` objects unwrapped. Mailroute resources, and the `v1`
//! Secrets and ConfigMaps they reference (`data` or `stringData`), are collected per namespace;
//! objects of other API groups are ignored with a warning. An object that claims our group
//! (`mailroute.io/...`) but cannot be read as one of our kinds (a typo in `kind` or
//! `apiVersion`, no name) is an error naming the file and document: skipping it would drop a
//! tenant or a route without anyone noticing.
//!
//! A resource whose spec does not fit the schema (unknown field, wrong type) is reported as a
//! [`Problem`] naming the field, like any other invalid resource, so one typo does not hide the
//! rest of the directory. A file that is not YAML at all is an error.

use crate::compile::{Inputs, Kind, Object, Problem};
use crate::resources::{GROUP, VERSION};
use base64::Engine;
use serde::de::DeserializeOwned;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Namespace of objects that name none, as `kubectl apply` would use by default.
pub const DEFAULT_NAMESPACE: &str = "default";

/// Why manifests could not be read at all.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not valid YAML: {message}")]
    Yaml { path: PathBuf, message: String },
    #[error("{0}: no *.yaml or *.yml files")]
    Empty(PathBuf),
    /// An object of the `mailroute.io` group that is not one of ours as written: a typo in its
    /// `kind` or `apiVersion`, or no name. Skipping it would silently drop a tenant or a route.
    #[error("{path}: document {document}: {message}")]
    Unreadable {
        path: PathBuf,
        /// 1-based position of the document in the file.
        document: usize,
        message: String,
    },
}

/// What a set of manifests holds.
#[derive(Debug, Default)]
pub struct Manifests {
    /// Compiler inputs by namespace.
    pub namespaces: BTreeMap<String, Inputs>,
    /// Resources that could not be read, each naming the field.
    pub problems: Vec<Problem>,
    /// Objects that were skipped, and why.
    pub warnings: Vec<String>,
}

impl Manifests {
    /// Reads every `*.yaml` and `*.yml` file of `dir` (not recursive), in name order.
    pub fn read_dir(dir: &Path) -> Result<Self, ManifestError> {
        let io = |source| ManifestError::Io {
            path: dir.to_owned(),
            source,
        };
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(io)?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| {
                p.is_file()
                    && matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml"))
            })
            .collect();
        if files.is_empty() {
            return Err(ManifestError::Empty(dir.to_owned()));
        }
        files.sort();
        let mut manifests = Manifests::default();
        for path in files {
            let text = std::fs::read_to_string(&path).map_err(|source| ManifestError::Io {
                path: path.clone(),
                source,
            })?;
            manifests.add_yaml(&path, &text)?;
        }
        Ok(manifests)
    }

    /// Adds the objects of one YAML stream; `origin` names it in messages.
    pub fn add_yaml(&mut self, origin: &Path, text: &str) -> Result<(), ManifestError> {
        let documents: Vec<Value> =
            serde_saphyr::from_multiple(text).map_err(|e| ManifestError::Yaml {
                path: origin.to_owned(),
                message: e.to_string(),
            })?;
        for (i, document) in documents.into_iter().enumerate() {
            self.add_object(origin, document)
                .map_err(|message| ManifestError::Unreadable {
                    path: origin.to_owned(),
                    document: i + 1,
                    message,
                })?;
        }
        Ok(())
    }

    /// Adds one object; `Err` says why an object of our API group cannot be read.
    fn add_object(&mut self, origin: &Path, object: Value) -> Result<(), String> {
        let origin_name = origin.display();
        let api_version = object
            .get("apiVersion")
            .and_then(Value::as_str)
            .unwrap_or("");
        let kind = object.get("kind").and_then(Value::as_str).unwrap_or("");
        if object.is_null() {
            return Ok(());
        }
        if kind == "List" {
            if let Some(Value::Array(items)) = object.get("items") {
                for item in items.clone() {
                    self.add_object(origin, item)?;
                }
            }
            return Ok(());
        }
        let group = api_version.split_once('/').map_or("", |(g, _)| g);
        let ours = api_version == format!("{GROUP}/{VERSION}");
        if group == GROUP || (api_version.is_empty() && KINDS.contains(&kind)) {
            if !ours {
                return Err(format!(
                    "apiVersion {api_version:?} is not served; Mailroute resources are {GROUP}/{VERSION}"
                ));
            }
            if !KINDS.contains(&kind) {
                return Err(format!(
                    "kind {kind:?} is not a Mailroute resource (one of {})",
                    KINDS.join(", ")
                ));
            }
        }
        let metadata = object.get("metadata");
        let name = metadata
            .and_then(|m| m.get("name"))
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_owned();
        let namespace = metadata
            .and_then(|m| m.get("namespace"))
            .and_then(Value::as_str)
            .unwrap_or(DEFAULT_NAMESPACE)
            .to_owned();
        let generation = metadata
            .and_then(|m| m.get("generation"))
            .and_then(Value::as_i64);
        if name.is_empty() {
            if ours {
                return Err(format!("{kind} has no metadata.name"));
            }
            self.warnings.push(format!(
                "{origin_name}: a {} object has no metadata.name; skipped",
                if kind.is_empty() { "kind-less" } else { kind }
            ));
            return Ok(());
        }
        let inputs = self
            .namespaces
            .entry(namespace.clone())
            .or_insert_with(|| Inputs {
                namespace: namespace.clone(),
                ..Inputs::default()
            });
        let spec = object.get("spec").cloned().unwrap_or(Value::Null);
        match (ours, kind) {
            (true, "MailRoute") => {
                if let Some(o) = typed(Kind::MailRoute, &name, generation, spec, &mut self.problems) {
                    inputs.routes.push(o);
                }
            }
            (true, "RelayPolicy") => {
                if let Some(o) = typed(Kind::RelayPolicy, &name, generation, spec, &mut self.problems) {
                    inputs.policies.push(o);
                }
            }
            (true, "RoutingRule") => {
                if let Some(o) = typed(Kind::RoutingRule, &name, generation, spec, &mut self.problems) {
                    inputs.rules.push(o);
                }
            }
            (false, "Secret") if api_version == "v1" => {
                match secret_data(&object) {
                    Ok(data) => {
                        inputs.secrets.insert(name, data);
                    }
                    Err(why) => self
                        .warnings
                        .push(format!("{origin_name}: Secret/{name}: {why}; skipped")),
                }
            }
            (false, "ConfigMap") if api_version == "v1" => {
                inputs.config_maps.insert(name, config_map_data(&object));
            }
            _ => self.warnings.push(format!(
                "{origin_name}: {api_version} {kind}/{name} is not a Mailroute resource, Secret or ConfigMap; ignored"
            )),
        }
        Ok(())
    }
}

/// The kinds of the `mailroute.io` group.
const KINDS: [&str; 3] = ["MailRoute", "RelayPolicy", "RoutingRule"];

/// Deserialises a spec, reporting the path of the first field that does not fit.
fn typed<S: DeserializeOwned>(
    kind: Kind,
    name: &str,
    generation: Option<i64>,
    spec: Value,
    problems: &mut Vec<Problem>,
) -> Option<Object<S>> {
    match serde_path_to_error::deserialize::<_, S>(spec) {
        Ok(spec) => Some(Object {
            name: name.to_owned(),
            generation,
            spec,
        }),
        Err(e) => {
            let path = e.path().to_string();
            problems.push(Problem {
                kind,
                name: name.to_owned(),
                field: if path == "." {
                    "spec".to_owned()
                } else {
                    format!("spec.{path}")
                },
                message: e.into_inner().to_string(),
            });
            None
        }
    }
}

fn secret_data(object: &Value) -> Result<BTreeMap<String, Vec<u8>>, String> {
    let mut out = BTreeMap::new();
    if let Some(Value::Object(data)) = object.get("data") {
        for (key, value) in data {
            let text = value.as_str().unwrap_or("");
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(text.trim())
                .map_err(|_| format!("data.{key} is not base64"))?;
            out.insert(key.clone(), bytes);
        }
    }
    if let Some(Value::Object(data)) = object.get("stringData") {
        for (key, value) in data {
            out.insert(
                key.clone(),
                value.as_str().unwrap_or("").as_bytes().to_vec(),
            );
        }
    }
    Ok(out)
}

fn config_map_data(object: &Value) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    if let Some(Value::Object(data)) = object.get("data") {
        for (key, value) in data {
            out.insert(key.clone(), value.as_str().unwrap_or("").to_owned());
        }
    }
    out
}
