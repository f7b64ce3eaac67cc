//! `--configmap NAMESPACE/NAME`: the operator's ConfigMap(s) and credentials Secret, followed
//! through the Kubernetes API with kube's watcher (SPEC 5.1), so a change is in force as soon
//! as the API server tells of it, without polling: in steady state a relay holds one watch per
//! object and makes no other request.
//!
//! What is followed: ConfigMap `NAME` (the whole document under `config.json`, or, for a split
//! one, its part count in the `mailroute.io/parts` annotation), its parts `NAME-0`, `NAME-1`,
//! ... while the index names them, and Secret `mailroute-relay-credentials`
//! (`credentials.json`). Each is watched by name ([`watch`]); the entries are put together as a
//! `--config` directory would be ([`crate::config_source::from_entries`]): a generation whose
//! parts are not all there, or are of different generations, is refused and the previous one
//! stays in force.
//!
//! This is the only module of the relay that knows of kube: the rest sees [`ClusterSource`],
//! its [`Snapshot`]s and plain entries (the check in `scripts/test` says so).

mod client;
pub mod issuer;
pub mod watch;

pub use client::connect;
pub use issuer::follow_issuer_keys;

use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::Duration;
use watch::Report;

/// The operator's credentials Secret.
pub const CREDENTIALS_SECRET: &str = mailroute_config::parts::CREDENTIALS_SECRET;
const PARTS_ANNOTATION: &str = mailroute_config::parts::PARTS_ANNOTATION;

/// How often a failure that lasts is logged again.
pub const FAILURE_LOG_EVERY: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("--configmap: expected NAMESPACE/NAME, got {0:?}")]
    Name(String),
    #[error("connecting to the Kubernetes API: {0}")]
    Connect(String),
    #[error("configmap {namespace}/{name} does not exist (yet)")]
    Missing { namespace: String, name: String },
    #[error("the first list of configmap {namespace}/{name} and its Secret is not complete yet")]
    Listing { namespace: String, name: String },
    #[error("secret {namespace}/{CREDENTIALS_SECRET}: key {key} is not UTF-8")]
    Decode { namespace: String, key: String },
}

/// `NAMESPACE/NAME`.
pub fn parse_name(text: &str) -> Result<(String, String), ClusterError> {
    match text.split_once('/') {
        Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
            Ok((ns.to_owned(), name.to_owned()))
        }
        _ => Err(ClusterError::Name(text.to_owned())),
    }
}

/// Which object a watch follows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Key {
    Index,
    Part(usize),
    Secret,
}

/// What the relay keeps of one published object.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Published {
    pub data: BTreeMap<String, String>,
    /// The index's `mailroute.io/parts` annotation.
    pub parts: Option<usize>,
    /// Secret keys whose value is not UTF-8.
    pub undecodable: Vec<String>,
}

impl Published {
    fn of_config_map(map: ConfigMap) -> Self {
        let parts = map
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(PARTS_ANNOTATION))
            .and_then(|p| p.parse().ok());
        Self {
            data: map.data.unwrap_or_default(),
            parts,
            undecodable: Vec::new(),
        }
    }

    fn of_secret(secret: Secret) -> Self {
        let mut published = Self::default();
        for (key, value) in secret.data.unwrap_or_default() {
            match String::from_utf8(value.0) {
                Ok(text) => {
                    published.data.insert(key, text);
                }
                Err(_) => published.undecodable.push(key),
            }
        }
        published
    }
}

/// One followed object: still being listed, known absent, or present.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub enum Watched {
    #[default]
    Listing,
    Absent,
    Present(Published),
}

/// What the source knows now. Pure: [`Snapshot::apply`] folds in a report and says which part
/// watches to start and stop; [`Snapshot::entries`] puts the objects together.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Snapshot {
    pub index: Watched,
    pub parts: BTreeMap<usize, Watched>,
    pub secret: Watched,
    /// The watches whose last attempt failed.
    pub failing: BTreeSet<Key>,
}

/// Part watches to start and to stop after a report.
#[derive(Debug, Default, PartialEq)]
pub struct PartChanges {
    pub start: Vec<usize>,
    pub stop: Vec<usize>,
}

impl Snapshot {
    /// Whether the API answers every watch: `mailroute_relay_config_source_up`.
    pub fn up(&self) -> bool {
        self.failing.is_empty()
    }

    /// Folds in a report from `key`'s watch. A report from a part no longer wanted is ignored.
    pub fn apply(&mut self, key: Key, report: Report<Published>) -> PartChanges {
        let slot = match key {
            Key::Index => &mut self.index,
            Key::Secret => &mut self.secret,
            Key::Part(i) => match self.parts.get_mut(&i) {
                Some(slot) => slot,
                None => return PartChanges::default(),
            },
        };
        match report {
            Report::Object(object) => {
                *slot = object.map_or(Watched::Absent, Watched::Present);
                self.failing.remove(&key);
            }
            Report::Failed(_) => {
                self.failing.insert(key);
            }
        }
        let wanted = match &self.index {
            Watched::Present(index) => index.parts.filter(|n| *n > 1).unwrap_or(0),
            // NB: while the index is being listed again, its parts stay followed.
            Watched::Listing => self.parts.len(),
            Watched::Absent => 0,
        };
        let mut changes = PartChanges::default();
        for i in 0..wanted {
            if let std::collections::btree_map::Entry::Vacant(slot) = self.parts.entry(i) {
                slot.insert(Watched::Listing);
                changes.start.push(i);
            }
        }
        let unwanted: Vec<usize> = self.parts.range(wanted..).map(|(i, _)| *i).collect();
        for i in unwanted {
            self.parts.remove(&i);
            self.failing.remove(&Key::Part(i));
            changes.stop.push(i);
        }
        changes
    }

    /// Whether a watch that matters has not finished its first list: nothing to judge yet
    /// ([`Snapshot::entries`] is `Ok(None)` exactly then).
    pub fn listing(&self) -> bool {
        match &self.index {
            Watched::Listing => true,
            Watched::Absent => false,
            Watched::Present(_) => {
                self.secret == Watched::Listing
                    || self.parts.values().any(|p| *p == Watched::Listing)
            }
        }
    }

    /// A hash of what the entries would be, without putting them together; `None` while
    /// listing or while the index does not exist.
    pub fn stamp(&self) -> Option<u64> {
        use std::hash::{Hash, Hasher};
        if self.listing() || !matches!(self.index, Watched::Present(_)) {
            return None;
        }
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        self.index.hash(&mut hasher);
        self.parts.hash(&mut hasher);
        self.secret.hash(&mut hasher);
        Some(hasher.finish())
    }

    /// The entries a `--config` directory would hold; `Ok(None)` while a watch has not
    /// finished its first list (nothing to judge yet).
    pub fn entries(
        &self,
        namespace: &str,
        name: &str,
    ) -> Result<Option<BTreeMap<String, String>>, ClusterError> {
        let index = match &self.index {
            Watched::Listing => return Ok(None),
            Watched::Absent => {
                return Err(ClusterError::Missing {
                    namespace: namespace.to_owned(),
                    name: name.to_owned(),
                });
            }
            Watched::Present(index) => index,
        };
        let mut entries = index.data.clone();
        for part in self.parts.values() {
            match part {
                Watched::Listing => return Ok(None),
                // NB: left out: assembling names the missing part.
                Watched::Absent => {}
                Watched::Present(part) => entries.extend(part.data.clone()),
            }
        }
        match &self.secret {
            Watched::Listing => return Ok(None),
            Watched::Absent => {}
            Watched::Present(secret) => {
                if let Some(key) = secret.undecodable.first() {
                    return Err(ClusterError::Decode {
                        namespace: namespace.to_owned(),
                        key: key.clone(),
                    });
                }
                entries.extend(secret.data.clone());
            }
        }
        Ok(Some(entries))
    }
}

/// Whether a failure that lasts is due to be logged again: at its start, then at most once
/// per `every`.
#[derive(Debug)]
pub struct LogEvery {
    every: Duration,
    last: Option<tokio::time::Instant>,
}

impl LogEvery {
    pub fn new(every: Duration) -> Self {
        Self { every, last: None }
    }

    /// A failure now: log it?
    pub fn failed(&mut self, now: tokio::time::Instant) -> bool {
        let due = self
            .last
            .is_none_or(|at| now.duration_since(at) >= self.every);
        if due {
            self.last = Some(now);
        }
        due
    }

    /// The failure is over: was it logged (so its end should be)?
    pub fn recovered(&mut self) -> bool {
        self.last.take().is_some()
    }
}

/// The followed objects of one `--configmap NAMESPACE/NAME`. Dropping it stops the watches.
pub struct ClusterSource {
    client: kube::Client,
    namespace: String,
    name: String,
    state: tokio::sync::watch::Receiver<Snapshot>,
    driver: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for ClusterSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterSource")
            .field("namespace", &self.namespace)
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl Drop for ClusterSource {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

impl ClusterSource {
    /// Starts following `namespace/name` and the credentials Secret through `client`.
    pub fn start(client: kube::Client, namespace: &str, name: &str) -> Self {
        let (state, receiver) = tokio::sync::watch::channel(Snapshot::default());
        let driver = tokio::spawn(drive(
            client.clone(),
            namespace.to_owned(),
            name.to_owned(),
            state,
        ));
        Self {
            client,
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            state: receiver,
            driver,
        }
    }

    /// The API client the source follows the cluster with (shared by what else asks it).
    pub fn client(&self) -> kube::Client {
        self.client.clone()
    }

    /// How the source is named in messages: `configmap NAMESPACE/NAME`.
    pub fn origin(&self) -> PathBuf {
        PathBuf::from(format!("configmap {}/{}", self.namespace, self.name))
    }

    /// Whether every watch answers (`mailroute_relay_config_source_up`).
    pub fn up(&self) -> bool {
        self.state.borrow().up()
    }

    /// Whether a first list is still under way ([`Snapshot::listing`]).
    pub fn listing(&self) -> bool {
        self.state.borrow().listing()
    }

    /// A hash of the objects now ([`Snapshot::stamp`]).
    pub fn stamp(&self) -> Option<u64> {
        self.state.borrow().stamp()
    }

    /// The entries now; `Ok(None)` while the first lists are not complete.
    pub fn entries(&self) -> Result<Option<BTreeMap<String, String>>, ClusterError> {
        self.state.borrow().entries(&self.namespace, &self.name)
    }

    /// The entries now, or why there are none: the first lists are not complete, the
    /// ConfigMap does not exist.
    pub fn complete_entries(&self) -> Result<BTreeMap<String, String>, ClusterError> {
        self.entries()?.ok_or_else(|| ClusterError::Listing {
            namespace: self.namespace.clone(),
            name: self.name.clone(),
        })
    }

    /// A receiver that wakes on the next change (of an object, or of the API's health).
    pub fn changes(&self) -> tokio::sync::watch::Receiver<Snapshot> {
        let mut receiver = self.state.clone();
        receiver.mark_unchanged();
        receiver
    }
}

/// Runs the watches and folds their reports into `state`, starting and stopping part watches
/// as the index asks; logs a failure at its start, then at most once a minute while it lasts.
async fn drive(
    client: kube::Client,
    namespace: String,
    name: String,
    state: tokio::sync::watch::Sender<Snapshot>,
) {
    let config_maps: kube::Api<ConfigMap> = kube::Api::namespaced(client.clone(), &namespace);
    let secrets: kube::Api<Secret> = kube::Api::namespaced(client, &namespace);
    let (reports, mut received) = tokio::sync::mpsc::channel::<(Key, Report<Published>)>(16);
    let follow_map = |key: Key, object: String| {
        tokio::spawn(watch::follow(
            config_maps.clone(),
            object,
            Published::of_config_map,
            key,
            reports.clone(),
        ))
    };
    let mut watches = BTreeMap::new();
    watches.insert(Key::Index, follow_map(Key::Index, name.clone()));
    watches.insert(
        Key::Secret,
        tokio::spawn(watch::follow(
            secrets,
            CREDENTIALS_SECRET.to_owned(),
            Published::of_secret,
            Key::Secret,
            reports.clone(),
        )),
    );
    let mut log = LogEvery::new(FAILURE_LOG_EVERY);
    while let Some((key, report)) = received.recv().await {
        if !watches.contains_key(&key) {
            continue;
        }
        if let Report::Failed(error) = &report
            && log.failed(tokio::time::Instant::now())
        {
            tracing::warn!(%error, configmap = %format!("{namespace}/{name}"),
                "the Kubernetes API cannot be watched; serving on the configuration in force (logged again each minute while it lasts)");
        }
        let mut changes = PartChanges::default();
        state.send_modify(|snapshot| changes = snapshot.apply(key, report));
        if state.borrow().up() && log.recovered() {
            tracing::info!(configmap = %format!("{namespace}/{name}"), "the Kubernetes API is watched again");
        }
        for i in changes.start {
            watches.insert(
                Key::Part(i),
                follow_map(Key::Part(i), mailroute_config::parts::part_name(&name, i)),
            );
        }
        for i in changes.stop {
            if let Some(watch) = watches.remove(&Key::Part(i)) {
                watch.abort();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn index(parts: usize) -> Report<Published> {
        Report::Object(Some(Published {
            data: BTreeMap::from([("config.json".to_owned(), "{}".to_owned())]),
            parts: Some(parts),
            undecodable: Vec::new(),
        }))
    }

    fn part(i: usize) -> Report<Published> {
        Report::Object(Some(Published {
            data: BTreeMap::from([(format!("part-{i}"), i.to_string())]),
            ..Published::default()
        }))
    }

    #[test]
    fn nothing_is_judged_before_every_first_list_is_complete() {
        let mut s = Snapshot::default();
        assert!(matches!(s.entries("mail", "cfg"), Ok(None)));
        s.apply(Key::Index, index(1));
        assert!(
            matches!(s.entries("mail", "cfg"), Ok(None)),
            "the Secret is still being listed"
        );
        s.apply(Key::Secret, Report::Object(None));
        assert!(matches!(s.entries("mail", "cfg"), Ok(Some(e)) if e.contains_key("config.json")));
    }

    #[test]
    fn listing_and_the_stamp_agree_with_the_entries() {
        let mut s = Snapshot::default();
        assert!(s.listing() && s.stamp().is_none());
        s.apply(Key::Index, index(1));
        assert!(s.listing(), "the Secret is still being listed");
        s.apply(Key::Secret, Report::Object(None));
        assert!(!s.listing());
        let first = s.stamp();
        assert!(first.is_some());
        s.apply(Key::Secret, Report::Object(Some(Published::default())));
        assert_ne!(
            s.stamp(),
            first,
            "a change of the Secret alone changes the stamp"
        );
        s.apply(Key::Secret, Report::Failed("timeout".into()));
        assert!(s.stamp().is_some(), "a failing watch keeps what it knew");
        s.apply(Key::Index, Report::Object(None));
        assert!(!s.listing() && s.stamp().is_none() && s.entries("mail", "cfg").is_err());
    }

    #[test]
    fn a_missing_index_is_named() {
        let mut s = Snapshot::default();
        s.apply(Key::Index, Report::Object(None));
        s.apply(Key::Secret, Report::Object(None));
        let e = s
            .entries("mail", "cfg")
            .map(|_| ())
            .map_err(|e| e.to_string());
        assert_eq!(e, Err("configmap mail/cfg does not exist (yet)".to_owned()));
    }

    #[test]
    fn parts_are_followed_while_the_index_names_them() {
        let mut s = Snapshot::default();
        assert_eq!(
            s.apply(Key::Index, index(3)),
            PartChanges {
                start: vec![0, 1, 2],
                stop: vec![]
            }
        );
        s.apply(Key::Secret, Report::Object(None));
        s.apply(Key::Part(0), part(0));
        s.apply(Key::Part(2), part(2));
        assert!(
            matches!(s.entries("mail", "cfg"), Ok(None)),
            "part 1 is being listed"
        );
        s.apply(Key::Part(1), Report::Object(None));
        let entries = s.entries("mail", "cfg").ok().flatten().unwrap_or_default();
        assert!(entries.contains_key("part-0") && entries.contains_key("part-2"));
        assert!(
            !entries.contains_key("part-1"),
            "an absent part is left for assembly to name"
        );
        // The document shrinks to one ConfigMap: the parts' watches stop.
        assert_eq!(
            s.apply(Key::Index, index(1)),
            PartChanges {
                start: vec![],
                stop: vec![0, 1, 2]
            }
        );
        // A late report from a stopped part changes nothing.
        assert_eq!(s.apply(Key::Part(1), part(1)), PartChanges::default());
        assert!(s.parts.is_empty());
    }

    #[test]
    fn the_source_is_down_while_any_watch_fails_and_up_when_each_answers_again() {
        let mut s = Snapshot::default();
        s.apply(Key::Index, index(1));
        s.apply(Key::Secret, Report::Object(None));
        assert!(s.up());
        s.apply(Key::Index, Report::Failed("connection refused".into()));
        s.apply(Key::Secret, Report::Failed("connection refused".into()));
        assert!(!s.up());
        // What was known stays known: the relay goes on serving it.
        assert!(matches!(s.entries("mail", "cfg"), Ok(Some(_))));
        s.apply(Key::Index, index(1));
        assert!(!s.up(), "the Secret's watch still fails");
        s.apply(Key::Secret, Report::Object(None));
        assert!(s.up());
    }

    #[test]
    fn a_secret_that_is_not_utf8_is_named_not_used() {
        let secret = Secret {
            data: Some(BTreeMap::from([(
                "credentials.json".to_owned(),
                k8s_openapi::ByteString(vec![0xff, 0xfe]),
            )])),
            ..Secret::default()
        };
        let mut s = Snapshot::default();
        s.apply(Key::Index, index(1));
        s.apply(
            Key::Secret,
            Report::Object(Some(Published::of_secret(secret))),
        );
        let e = s
            .entries("mail", "cfg")
            .map(|_| ())
            .map_err(|e| e.to_string());
        assert!(e.is_err_and(|e| e.contains("credentials.json is not UTF-8")));
    }

    #[test]
    fn a_lasting_failure_is_logged_at_once_then_once_a_minute() {
        let start = tokio::time::Instant::now();
        let mut log = LogEvery::new(Duration::from_secs(60));
        let logged: Vec<u64> = (0..=150)
            .filter(|s| log.failed(start + Duration::from_secs(*s)))
            .collect();
        assert_eq!(logged, vec![0, 60, 120]);
        assert!(log.recovered(), "the end of a logged failure is logged");
        assert!(!log.recovered());
        assert!(
            log.failed(start + Duration::from_secs(151)),
            "a new failure is logged at once"
        );
    }

    #[test]
    fn names_are_namespace_slash_name() {
        assert!(matches!(parse_name("mail/cfg"), Ok((ns, n)) if ns == "mail" && n == "cfg"));
        for bad in ["no-slash", "/cfg", "mail/", "a/b/c"] {
            assert!(
                matches!(parse_name(bad), Err(ClusterError::Name(_))),
                "{bad}"
            );
        }
    }
}
