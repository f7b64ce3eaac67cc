//! Service-account tokens as SMTP AUTH credentials (SPEC 11): applications in the cluster send
//! their projected service-account token with `AUTH OAUTHBEARER` or `AUTH XOAUTH2`, and the
//! relay checks it against the cluster issuer's public keys (a JWKS document: the API server's
//! `/openid/v1/jwks`, asked of it with `--configmap`, or a file given as `--jwks-file`).
//!
//! A token is accepted when all of these hold: its signature verifies with the key its header
//! names (`kid`; the only key when the set has one), by RS256 or ES256 (the algorithms the
//! Kubernetes API server signs with); it has not expired (60 s of leeway for clock skew, as
//! jsonwebtoken's default); its audience includes the relay's (`--token-audience`, default
//! `mailroute`), so a token minted for another service cannot be replayed here; its subject is
//! `system:serviceaccount:NAMESPACE:NAME`. Which tenant that service account sends for is the
//! configuration's (`RelayPolicy.authentication.serviceAccounts`), checked by
//! [`super::accounts::Accounts`].
//!
//! The keys file is read again when it changes (a rotated issuer key is published beside the
//! old one before tokens are signed with it), polled like the TLS certificate; in a cluster
//! without `--jwks-file` the keys are asked of the API server (`crate::cluster`). A token is
//! never logged: only why it was refused.

use arc_swap::ArcSwap;
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

/// The audience tokens must be minted for unless `--token-audience` says otherwise.
pub const DEFAULT_AUDIENCE: &str = "mailroute";

/// What a service-account token's subject starts with.
pub const SUBJECT_PREFIX: &str = "system:serviceaccount:";

/// Why the keys could not be loaded (`origin`: the file, or the API server's endpoint).
#[derive(Debug, thiserror::Error)]
pub enum KeysError {
    #[error("{origin}: {message}")]
    Read { origin: String, message: String },
    #[error("{origin}: not a JWKS document: {message}")]
    Parse { origin: String, message: String },
    #[error("{origin}: no usable key (RS256 or ES256)")]
    NoKeys { origin: String },
}

/// Why a token was refused (for logs and the failure count; the client hears `535 5.7.8`).
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("not a signed JWT")]
    Malformed,
    #[error("signed with {0:?}; only RS256 and ES256 are accepted")]
    Algorithm(Algorithm),
    #[error("no key {0:?} in the issuer's key set")]
    UnknownKey(String),
    #[error("rejected: {0}")]
    Invalid(String),
    #[error("subject {0:?} is not a service account")]
    NotServiceAccount(String),
}

/// One usable key of the set.
struct Key {
    kid: Option<String>,
    algorithm: Algorithm,
    key: DecodingKey,
}

/// The issuer's keys and the audience tokens must carry.
pub struct TokenKeys {
    /// The file the keys are read from; `None` when they come from the API server
    /// (`crate::cluster::follow_issuer_keys` installs them).
    path: Option<PathBuf>,
    audience: String,
    keys: ArcSwap<Vec<Key>>,
    loaded_at: Mutex<Option<SystemTime>>,
    /// Whether some tenant lists a service account: until then keys from the API server are
    /// not asked for ([`Self::wanted`]).
    wanted: tokio::sync::watch::Sender<bool>,
}

impl std::fmt::Debug for TokenKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenKeys")
            .field("path", &self.path)
            .field("audience", &self.audience)
            .field("keys", &self.keys.load().len())
            .finish()
    }
}

fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

/// The RS256 and ES256 keys of a JWKS document; others (encryption keys, other curves) are
/// skipped.
fn usable(origin: &str, text: &str) -> Result<Vec<Key>, KeysError> {
    let set: JwkSet = serde_json::from_str(text).map_err(|e| KeysError::Parse {
        origin: origin.to_owned(),
        message: e.to_string(),
    })?;
    let keys: Vec<Key> = set
        .keys
        .iter()
        .filter_map(|jwk| {
            let algorithm = match &jwk.algorithm {
                jsonwebtoken::jwk::AlgorithmParameters::RSA(_) => Algorithm::RS256,
                jsonwebtoken::jwk::AlgorithmParameters::EllipticCurve(ec)
                    if ec.curve == jsonwebtoken::jwk::EllipticCurve::P256 =>
                {
                    Algorithm::ES256
                }
                _ => return None,
            };
            let key = DecodingKey::from_jwk(jwk).ok()?;
            Some(Key {
                kid: jwk.common.key_id.clone(),
                algorithm,
                key,
            })
        })
        .collect();
    if keys.is_empty() {
        return Err(KeysError::NoKeys {
            origin: origin.to_owned(),
        });
    }
    Ok(keys)
}

fn read(path: &Path) -> Result<Vec<Key>, KeysError> {
    let origin = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| KeysError::Read {
        origin: origin.clone(),
        message: e.to_string(),
    })?;
    usable(&origin, &text)
}

/// The claims the relay reads.
#[derive(serde::Deserialize)]
struct Claims {
    sub: String,
}

impl TokenKeys {
    /// Loads `path` (a JWKS document); an error here stops the relay from starting.
    pub fn load(path: &Path, audience: &str) -> Result<Arc<Self>, KeysError> {
        let keys = read(path)?;
        Ok(Arc::new(Self {
            path: Some(path.to_owned()),
            audience: audience.to_owned(),
            keys: ArcSwap::from_pointee(keys),
            loaded_at: Mutex::new(modified(path)),
            wanted: tokio::sync::watch::Sender::new(false),
        }))
    }

    /// No keys yet (every token refused) until [`Self::install`] gives some: the API server's.
    pub fn empty(audience: &str) -> Arc<Self> {
        Arc::new(Self {
            path: None,
            audience: audience.to_owned(),
            keys: ArcSwap::from_pointee(Vec::new()),
            loaded_at: Mutex::new(None),
            wanted: tokio::sync::watch::Sender::new(false),
        })
    }

    /// Some tenant lists a service account: the keys are needed (a configuration that lists
    /// none costs the API server no request for them).
    pub fn want(&self) {
        self.wanted
            .send_if_modified(|wanted| !std::mem::replace(wanted, true));
    }

    /// Waits until [`Self::want`] was called.
    pub async fn wanted(&self) {
        let mut wanted = self.wanted.subscribe();
        let _ = wanted.wait_for(|w| *w).await;
    }

    /// Puts the keys of JWKS document `text` from `origin` in force; a document without a
    /// usable key leaves the keys in use. Returns how many keys it holds.
    pub fn install(&self, origin: &str, text: &str) -> Result<usize, KeysError> {
        let keys = usable(origin, text)?;
        let count = keys.len();
        self.keys.store(Arc::new(keys));
        Ok(count)
    }

    /// Reads the file again when it changed; a broken file is logged and the old keys kept.
    pub fn reload_if_changed(&self) -> bool {
        let Some(path) = &self.path else {
            return false;
        };
        let now = modified(path);
        let mut seen = self
            .loaded_at
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if *seen == now {
            return false;
        }
        match read(path) {
            Ok(keys) => {
                let count = keys.len();
                self.keys.store(Arc::new(keys));
                *seen = now;
                tracing::info!(path = %path.display(), keys = count, "service-account token keys reloaded");
                true
            }
            Err(e) => {
                tracing::warn!(error = %e, "service-account token keys not reloaded; keeping the previous ones");
                false
            }
        }
    }

    /// Polls the file every `interval` until the returned task is dropped.
    pub fn watch(self: &Arc<Self>, interval: Duration) -> tokio::task::JoinHandle<()> {
        let keys = Arc::clone(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                keys.reload_if_changed();
            }
        })
    }

    /// The service account `token` proves (`system:serviceaccount:NS:NAME`).
    pub fn verify(&self, token: &str) -> Result<String, TokenError> {
        let header = jsonwebtoken::decode_header(token).map_err(|_| TokenError::Malformed)?;
        if !matches!(header.alg, Algorithm::RS256 | Algorithm::ES256) {
            return Err(TokenError::Algorithm(header.alg));
        }
        let keys = self.keys.load();
        let key = match &header.kid {
            Some(kid) => keys.iter().find(|k| k.kid.as_deref() == Some(kid.as_str())),
            None if keys.len() == 1 => keys.first(),
            None => None,
        }
        .filter(|k| k.algorithm == header.alg)
        .ok_or_else(|| TokenError::UnknownKey(header.kid.clone().unwrap_or_default()))?;
        let mut validation = Validation::new(header.alg);
        validation.set_audience(&[&self.audience]);
        validation.set_required_spec_claims(&["exp", "aud", "sub"]);
        let data = jsonwebtoken::decode::<Claims>(token, &key.key, &validation)
            .map_err(|e| TokenError::Invalid(e.to_string()))?;
        let subject = data.claims.sub;
        match subject.strip_prefix(SUBJECT_PREFIX) {
            Some(rest) if rest.split(':').count() == 2 => Ok(subject),
            _ => Err(TokenError::NotServiceAccount(subject)),
        }
    }
}
