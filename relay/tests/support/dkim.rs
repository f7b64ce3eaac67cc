//! DKIM verification in tests without DNS: the records a test publishes, handed to the
//! `mail-auth` verifier as its TXT cache.

use mail_auth::{ResolverCache, Txt};
use std::borrow::Borrow;
use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Mutex;
use std::time::Instant;

/// DNS answers known in advance, so verification never leaves the machine.
#[derive(Default)]
pub struct TxtCache(Mutex<HashMap<Box<str>, Txt>>);

impl ResolverCache<Box<str>, Txt> for TxtCache {
    fn get<Q>(&self, name: &Q) -> Option<Txt>
    where
        Box<str>: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.0.lock().ok()?.get(name).cloned()
    }
    fn remove<Q>(&self, name: &Q) -> Option<Txt>
    where
        Box<str>: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.0.lock().ok()?.remove(name)
    }
    fn insert(&self, key: Box<str>, value: Txt, _valid_until: Instant) {
        if let Ok(mut map) = self.0.lock() {
            map.insert(key, value);
        }
    }
}
