//! Relay policy: who may use the relay and as whom (SPEC 3.3, 5.4): SMTP AUTH accounts, the
//! binding of a session to a tenant, and the no-open-relay decision at RCPT.

pub mod accounts;
pub mod domains;
pub mod tenants;
