//! SMTP AUTH accounts from the tenants' credentials Secrets: each value is a password or an
//! `$argon2id$` / bcrypt (`$2a$`, `$2b$`, `$2y$`) hash.
//!
//! - An unknown user costs what a known one does: its password is checked against the costliest
//!   secret of the configuration (same algorithm, same parameters) and refused whatever the
//!   result, so timing tells nobody which usernames exist.
//! - Hash checks run off the async threads, at most [`Accounts::hashing_slots`] at once (an
//!   argon2id check holds its memory cost, 64 MiB with the defaults, while it runs); beyond that
//!   the attempt is answered "busy" at once (`454 4.7.0`), never queued without bound.
//! - Plaintext values are compared in constant time.

use super::tokens::TokenKeys;
use crate::interfaces::{AuthCheck, Authenticator, BoxFuture};
use argon2::{Argon2, PasswordVerifier};
use mailroute_config::Credentials;
use mailroute_config::document::RelayConfig;
use std::collections::HashMap;
use std::sync::Arc;
use subtle::ConstantTimeEq;

#[derive(Clone)]
enum Secret {
    Plain(String),
    Argon2(String),
    Bcrypt(String),
}

impl Secret {
    fn new(value: &str) -> Self {
        if value.starts_with("$argon2") {
            Secret::Argon2(value.to_owned())
        } else if ["$2a$", "$2b$", "$2y$"]
            .iter()
            .any(|p| value.starts_with(p))
        {
            Secret::Bcrypt(value.to_owned())
        } else {
            Secret::Plain(value.to_owned())
        }
    }

    /// How costly a check is, to pick the stand-in for unknown users.
    fn cost(&self) -> u8 {
        match self {
            Secret::Plain(_) => 0,
            Secret::Bcrypt(_) => 1,
            Secret::Argon2(_) => 2,
        }
    }

    fn matches(&self, password: &str) -> bool {
        match self {
            Secret::Plain(expected) => bool::from(expected.as_bytes().ct_eq(password.as_bytes())),
            Secret::Argon2(hash) => Argon2::default()
                .verify_password(password.as_bytes(), hash.as_str())
                .is_ok(),
            Secret::Bcrypt(hash) => bcrypt::verify(password, hash).unwrap_or(false),
        }
    }
}

/// Every tenant's accounts.
#[derive(Clone)]
pub struct Accounts {
    by_username: Arc<HashMap<String, (String, Secret)>>,
    /// Tenant by service account (`system:serviceaccount:NS:NAME`). A Secret's keys (the
    /// usernames) cannot hold `:`, so the two never collide.
    by_service_account: Arc<HashMap<String, String>>,
    /// The issuer's keys; without them no token is accepted.
    tokens: Option<Arc<TokenKeys>>,
    /// What an unknown user's password is checked against (the costliest secret present).
    stand_in: Arc<Secret>,
    slots: Arc<tokio::sync::Semaphore>,
}

impl Default for Accounts {
    fn default() -> Self {
        Self::from_credentials(&Credentials::default())
    }
}

impl std::fmt::Debug for Accounts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // NB: never the secrets.
        f.debug_struct("Accounts")
            .field("users", &self.by_username.len())
            .finish()
    }
}

/// A password no account has, checked for unknown users so they take as long as known ones.
const DUMMY: &str = "mailroute-no-such-account";

impl Accounts {
    /// Collects the accounts of every tenant (the compiler guarantees usernames are unique).
    pub fn from_credentials(credentials: &Credentials) -> Self {
        let mut by_username = HashMap::new();
        for (tenant, accounts) in &credentials.tenants {
            for (username, value) in accounts {
                by_username.insert(username.clone(), (tenant.clone(), Secret::new(value)));
            }
        }
        let stand_in = by_username
            .values()
            .map(|(_, s)| s)
            .max_by_key(|s| s.cost())
            .cloned()
            .unwrap_or_else(|| Secret::Plain(DUMMY.to_owned()));
        Self {
            by_username: Arc::new(by_username),
            by_service_account: Arc::default(),
            tokens: None,
            stand_in: Arc::new(stand_in),
            slots: Arc::new(tokio::sync::Semaphore::new(Self::hashing_slots())),
        }
    }

    /// The tenants' service accounts, checked with `tokens` (SPEC 11).
    pub fn with_service_accounts(
        mut self,
        config: &RelayConfig,
        tokens: Option<Arc<TokenKeys>>,
    ) -> Self {
        let by_service_account = config
            .tenants
            .iter()
            .flat_map(|(name, tenant)| {
                tenant
                    .service_accounts
                    .iter()
                    .map(move |subject| (subject.clone(), name.clone()))
            })
            .collect();
        self.by_service_account = Arc::new(by_service_account);
        if let Some(keys) = &tokens
            && !self.by_service_account.is_empty()
        {
            keys.want();
        }
        self.tokens = tokens;
        self
    }

    /// Whether tokens are checked: the issuer's keys are loaded and some tenant lists a
    /// service account.
    pub fn takes_bearer(&self) -> bool {
        self.tokens.is_some() && !self.by_service_account.is_empty()
    }

    /// Password checks run at once, at most: one per core.
    pub fn hashing_slots() -> usize {
        std::thread::available_parallelism().map_or(2, |n| n.get())
    }

    pub fn is_empty(&self) -> bool {
        self.by_username.is_empty()
    }

    /// The tenant whose account `identity` is: a username, or a service account.
    pub fn tenant_of(&self, identity: &str) -> Option<&str> {
        match self.by_username.get(identity) {
            Some((tenant, _)) => Some(tenant),
            None => self.by_service_account.get(identity).map(String::as_str),
        }
    }

    /// Checks a password (blocking: hash verification is deliberately slow).
    pub fn verify(&self, username: &str, password: &str) -> bool {
        match self.by_username.get(username) {
            Some((_, secret)) => secret.matches(password),
            None => {
                // The same work as the costliest account, so a wrong username and a wrong
                // password look alike from outside; refused whatever the stand-in says.
                let _ = self.stand_in.matches(password);
                false
            }
        }
    }
}

impl Authenticator for Accounts {
    fn check<'a>(&'a self, username: &'a str, password: &'a str) -> BoxFuture<'a, AuthCheck> {
        Box::pin(async move {
            let Ok(slot) = Arc::clone(&self.slots).try_acquire_owned() else {
                return AuthCheck::Busy;
            };
            let accounts = self.clone();
            let (username, password) = (username.to_owned(), password.to_owned());
            let ok = tokio::task::spawn_blocking(move || {
                let ok = accounts.verify(&username, &password);
                drop(slot);
                ok
            })
            .await
            .unwrap_or(false);
            if ok {
                AuthCheck::Accepted
            } else {
                AuthCheck::Refused
            }
        })
    }

    fn check_bearer<'a>(&'a self, token: &'a str) -> BoxFuture<'a, Result<String, String>> {
        Box::pin(async move {
            let Some(keys) = self.tokens.as_ref().filter(|_| self.takes_bearer()) else {
                return Err("bearer tokens are not accepted".to_owned());
            };
            let subject = keys.verify(token).map_err(|e| e.to_string())?;
            if self.by_service_account.contains_key(&subject) {
                Ok(subject)
            } else {
                Err(format!("{subject} is not listed by any RelayPolicy"))
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn accounts(entries: &[(&str, &str, &str)]) -> Accounts {
        let mut credentials = Credentials::default();
        for (tenant, user, secret) in entries {
            credentials
                .tenants
                .entry((*tenant).to_owned())
                .or_insert_with(BTreeMap::new)
                .insert((*user).to_owned(), (*secret).to_owned());
        }
        Accounts::from_credentials(&credentials)
    }

    #[test]
    fn plaintext_argon2id_and_bcrypt_values_are_all_accepted() {
        use argon2::PasswordHasher;
        let argon = Argon2::default()
            .hash_password_with_salt(b"argon-secret", b"fixed-salt-16byt")
            .map(|h| h.to_string())
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(argon.starts_with("$argon2id$"));
        let bcrypt_hash = bcrypt::hash("bcrypt-secret", 4).unwrap_or_else(|e| panic!("{e}"));
        let a = accounts(&[
            ("acme", "app", "plain-secret"),
            ("acme", "billing", &argon),
            ("zeta", "tickets", &bcrypt_hash),
        ]);
        assert!(a.verify("app", "plain-secret"));
        assert!(!a.verify("app", "plain-secreT"));
        assert!(!a.verify("app", ""));
        assert!(a.verify("billing", "argon-secret"));
        assert!(!a.verify("billing", "wrong"));
        assert!(a.verify("tickets", "bcrypt-secret"));
        assert!(!a.verify("tickets", "bcrypt-secre"));
        assert!(!a.verify("nobody", "plain-secret"));
        assert!(!a.verify("nobody", DUMMY));
        assert_eq!(a.tenant_of("tickets"), Some("zeta"));
        assert!(!format!("{a:?}").contains("plain-secret"));
    }

    #[test]
    fn a_malformed_hash_never_matches() {
        let a = accounts(&[
            ("acme", "x", "$argon2id$garbage"),
            ("acme", "y", "$2b$garbage"),
        ]);
        assert!(!a.verify("x", "$argon2id$garbage"));
        assert!(!a.verify("y", "$2b$garbage"));
    }
}
