//! Mailroute's SMTP client, shared by the relay's delivery and the operator's route TLS probe
//! (so what the probe reports is what delivery does):
//!
//! - [`upstream`]: one connection to an upstream server (mail-send's client: greeting, EHLO,
//!   STARTTLS or implicit TLS, AUTH, pipelined MAIL/RCPT/DATA, a held final `.`).
//! - [`bearer`]: AUTH with an OAuth 2.0 access token (OAUTHBEARER, XOAUTH2).
//! - [`failure`]: what can go wrong with an upstream (one error type, its enhanced codes);
//!   [`stream`]: the plaintext or TLS stream to it.
//! - [`tls`]: client TLS per route policy (certificate verifiers).
//! - [`dane`]: certificates checked by an MX host's TLSA records (RFC 7672).
//! - [`dnssec`]: lookups whose DNSSEC validation matters, by a trusted resolver's AD bit.
//! - [`hosts`]: which hosts to try (host sets, MX lookups).
//! - [`route`]: how a compiled route is dialled (its TLS plan, EHLO name, timeouts).
//! - [`dot`]: dot transparency on the way out.
//! - [`reply`]: SMTP replies with enhanced status codes (the relay's own replies too).

pub mod bearer;
pub mod dane;
pub mod dnssec;
pub mod dot;
pub mod failure;
pub mod hosts;
pub mod reply;
pub mod route;
pub mod stream;
pub mod tls;
pub mod upstream;

pub use reply::Reply;
