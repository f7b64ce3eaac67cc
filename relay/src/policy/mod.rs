//! Relay policy: who may use the relay and as whom (SPEC 3.3, 5.4). So far: SMTP AUTH accounts.

pub mod accounts;
