//! The Mailroute SMTP relay.
//!
//! # Layout
//! - [`config_source`]: where the relay's configuration comes from (`--manifests DIR`, compiled
//!   in-process, or `--config FILE`, a compiled document) and the checks it passes before use.

pub mod config_source;
pub mod smtp;
