//! The three custom resources of API group `mailroute.io`, version `v1alpha1`, as users write
//! them. These types are the source of truth for the CRD YAML in `crds/` (generated with
//! schemars); every doc comment on a field is what `kubectl explain` prints, so it is written for
//! users.
//!
//! Cross-field rules that the API server can check are attached as CEL
//! (`x-kubernetes-validations`); every rule is checked again, with a message naming the field,
//! by the compiler in [`crate::compile`], because `mailroute-relay --manifests` has no API server.

mod policy;
mod route;
mod rule;

pub use policy::*;
pub use route::*;
pub use rule::*;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The API group of every Mailroute resource.
pub const GROUP: &str = "mailroute.io";
/// The version of the resources in this crate.
pub const VERSION: &str = "v1alpha1";

/// A reference to a Secret in the same namespace.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SecretRef {
    /// Name of the Secret, in the same namespace as this resource.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

/// A reference to one key of a Secret or ConfigMap in the same namespace.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct KeyRef {
    /// Name of the object, in the same namespace as this resource.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// The key inside the object's `data` (or `stringData`).
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
}

/// A condition in the form of Kubernetes' `metav1.Condition`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// The kind of condition: `Ready`, or `TLSVerified` on a MailRoute.
    #[serde(rename = "type")]
    pub type_: String,
    /// `True`, `False` or `Unknown`.
    pub status: String,
    /// A one-word, CamelCase reason for the last transition.
    pub reason: String,
    /// A human-readable message; for an invalid resource it names the offending field.
    #[serde(default)]
    pub message: String,
    /// When the condition last changed status (RFC 3339).
    pub last_transition_time: String,
    /// The `metadata.generation` this condition was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}
