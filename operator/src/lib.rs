//! The Mailroute operator.
//!
//! # Layout
//! - [`crdgen`]: the CustomResourceDefinitions of the three kinds, as committed in `crds/`.
//! - [`render`]: the offline compile of a directory of manifests (`mailroute-operator render`).
//!
//! The resource types and the pure compiler live in `mailroute-config`, which the relay shares.

pub mod controller;
pub mod crdgen;
pub mod metrics;
pub mod render;
