//! SMTP AUTH (SPEC 3.3, 5.3, 11): the tenants' accounts and password checks
//! ([`accounts::Accounts`], a bounded pool for hashing), service-account tokens checked
//! against the cluster issuer's keys ([`tokens::TokenKeys`]), and the throttle on failed
//! attempts per client address ([`throttle::AuthThrottle`]). The SASL exchange itself is
//! `crate::smtp::sasl`.

pub mod accounts;
pub mod throttle;
pub mod tokens;
