//! `mailroute-operator render -f DIR`: compile a directory of manifests offline.

use mailroute_config::{Manifests, Problem, RelayDocument, compile};
use std::path::Path;

/// The outcome of a render.
#[derive(Debug)]
pub struct Rendered {
    /// The document of the chosen namespace (every valid resource in it).
    pub document: RelayDocument,
    /// Every problem: resources that did not fit the schema and those that did not compile.
    pub problems: Vec<Problem>,
    /// Objects that were skipped.
    pub warnings: Vec<String>,
}

/// Why nothing could be rendered.
#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    #[error(transparent)]
    Manifests(#[from] mailroute_config::manifests::ManifestError),
    #[error("{dir}: no MailRoute, RoutingRule or RelayPolicy found")]
    Nothing { dir: String },
    #[error("the manifests span namespaces {}: choose one with --namespace", .0.join(", "))]
    Ambiguous(Vec<String>),
    #[error("no Mailroute resources in namespace {wanted:?} (found: {})", .found.join(", "))]
    NoSuchNamespace { wanted: String, found: Vec<String> },
}

/// Compiles the manifests of `dir` for one namespace (the only one present, or `namespace`).
pub fn render(
    dir: &Path,
    namespace: Option<&str>,
    generation: u64,
) -> Result<Rendered, RenderError> {
    let mut manifests = Manifests::read_dir(dir)?;
    let with_resources: Vec<String> = manifests
        .namespaces
        .iter()
        .filter(|(_, i)| !(i.routes.is_empty() && i.policies.is_empty() && i.rules.is_empty()))
        .map(|(ns, _)| ns.clone())
        .collect();
    let chosen = match namespace {
        Some(ns) if manifests.namespaces.contains_key(ns) => ns.to_owned(),
        Some(ns) => {
            return Err(RenderError::NoSuchNamespace {
                wanted: ns.to_owned(),
                found: with_resources,
            });
        }
        None => match with_resources.as_slice() {
            [] if manifests.problems.is_empty() => {
                return Err(RenderError::Nothing {
                    dir: dir.display().to_string(),
                });
            }
            [] => mailroute_config::manifests::DEFAULT_NAMESPACE.to_owned(),
            [one] => one.clone(),
            many => return Err(RenderError::Ambiguous(many.to_vec())),
        },
    };
    let inputs = manifests.namespaces.remove(&chosen).unwrap_or_default();
    let compiled = compile(&inputs);
    let mut problems = manifests.problems;
    problems.extend(compiled.problems.iter().cloned());
    problems.sort();
    Ok(Rendered {
        document: compiled.document(generation),
        problems,
        warnings: manifests.warnings,
    })
}
