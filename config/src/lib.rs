//! Mailroute's configuration model, shared by the operator and the relay.
//!
//! # Layout
//! - [`resources`]: the `MailRoute`, `RoutingRule` and `RelayPolicy` custom resources as users
//!   write them (CRD source of truth; the `kube` feature adds the kube derive).
//! - [`manifests`]: reading those resources, with the Secrets and ConfigMaps they reference, from
//!   YAML files.
//! - [`compile`]: the pure compiler from resources to a relay configuration, collecting every
//!   problem with the resource and field it is about.
//! - [`document`]: the compiled, versioned relay document, and the checks a relay runs on load.
//! - [`names`], [`net`]: addresses, domains and IP ranges as checked, normalised values.
//!
//! No Kubernetes client and no async runtime here: the relay depends on this crate and never
//! on kube.

pub mod compile;
pub mod document;
pub mod manifests;
pub mod names;
pub mod net;
pub mod parts;
pub mod resources;

pub use compile::{Compiled, Inputs, Kind, Object, Problem, compile};
pub use document::{Credentials, RelayConfig, RelayDocument};
pub use manifests::Manifests;
