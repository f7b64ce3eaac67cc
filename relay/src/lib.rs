//! The Mailroute SMTP relay.
//!
//! # Layout
//! - [`cluster`]: `--configmap`: the operator's ConfigMap(s) and Secret, followed through the
//!   Kubernetes API with kube's watcher (the only module that uses kube).
//! - [`config_source`]: where the relay's configuration comes from (`--manifests DIR`, compiled
//!   in-process, or `--config FILE`, a compiled document) and the checks it passes before use.
//! - [`smtp`]: the protocol, free of I/O: command framing and parsing, the strict
//!   DATA/BDAT receiver and dot-stuffing writer, and the session state machine.
//! - [`reply`]: every SMTP reply the relay sends, with its enhanced status code (bottom level;
//!   the type lives in `mailroute-smtp-client`, which the operator shares).
//! - [`budget`]: the memory budget for message content across sessions (`--max-inflight-bytes`).
//! - [`interfaces`]: the traits the driver calls and the values that cross them (bottom level).
//! - [`tenants`]: one configuration's tenants, built once: by name, by domain, by client range.
//! - [`auth`]: SMTP AUTH accounts (bounded password hashing) and the failed-attempt throttle.
//! - [`admission`]: the RCPT decision, in one order: binding, relay policy, rules, quotas,
//!   recipient verification; what each recipient is refused with, or where it goes.
//! - [`quota`]: sending limits per user and tenant: what counts, counters, reserve, settle,
//!   release.
//! - [`store`]: the shared store (quotas and the delivery ledger; memory or Redis).
//! - [`routing`]: which upstreams each recipient goes to (rules, copies, legs): pure functions.
//! - [`delivery`]: carrying a plan out: legs, copies, the reply bound, pooling, the ledger, the
//!   reply; the SMTP client itself is the `mailroute-smtp-client` crate.
//! - [`generation`]: a loaded configuration built into what sessions use; [`reload`]: watching
//!   the configuration files and swapping generations in.
//! - [`explain`]: one envelope played offline through the session, the RCPT decision and the
//!   delivery plan, reported (`mailroute-relay explain`, which `mailroute-operator explain` runs).
//! - [`server`]: listeners, TLS, the per-connection driver, AUTH throttling, graceful shutdown.
//! - [`metrics`]: the relay's Prometheus metrics.

pub mod admission;
pub mod auth;
pub mod budget;
pub mod cluster;
pub mod config_source;
pub mod delivery;
pub mod dev_sink;
pub mod explain;
pub mod generation;
pub mod interfaces;
pub mod metrics;
pub mod quota;
pub mod reload;
pub use mailroute_smtp_client::reply;
pub mod routing;
pub mod server;
pub mod smtp;
pub use mailroute_store as store;
pub mod tenants;
