//! Configuration reloads from the filesystem (SPEC 5.1): `--manifests DIR` and `--config FILE`
//! are watched; a change is loaded and checked like the first configuration, built into a new
//! [`Generation`] and swapped in atomically. A configuration that
//! fails to load or to build is refused, counted in
//! `mailroute_relay_config_reloads_total{result="error"}`, and the previous one stays in force.
//!
//! `--configmap` is not polled: the cluster source follows its objects with watches and wakes
//! the reload as soon as one of them changes ([`crate::cluster`]).
//!
//! Every source covers the credentials as well: a change is what changes
//! [`Loaded::fingerprint`], the document's hash *and* a digest of the credentials. A new
//! generation has its own forwarder and connection pool, so upstream connections opened with a
//! replaced credential are retired with the generation they belong to.
//!
//! The watch polls a cheap stamp of the files (names, sizes, modification times) rather than
//! relying on inotify: Kubernetes updates mounted ConfigMaps and Secrets by swapping symlinks,
//! which inotify watchers notoriously miss, and a stat of a few files per interval costs
//! nothing.

use crate::cluster::{ClusterError, ClusterSource};
use crate::config_source::{self, LoadError, Loaded};
use crate::metrics::ReloadLabels;
use crate::server::{Generation, Shared};
use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch::Receiver;

/// Where the configuration comes from.
#[derive(Clone, Debug)]
pub enum Source {
    /// Kubernetes manifests of one namespace, compiled in-process.
    Manifests(PathBuf),
    /// A compiled document (`mailroute-operator render` output), or a directory holding the
    /// operator's ConfigMap(s) and Secret.
    Document(PathBuf),
    /// The operator's ConfigMap(s) and Secret, followed through the Kubernetes API.
    Cluster(Arc<ClusterSource>),
}

/// Why no configuration source could be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("give --manifests DIR, --config PATH or --configmap NAMESPACE/NAME")]
    Nothing,
    /// Not NAMESPACE/NAME (the error says so, naming the flag).
    #[error(transparent)]
    Name(ClusterError),
    #[error("--configmap: {0}")]
    Connect(ClusterError),
}

impl Source {
    /// The source the command line names, the first given of `--manifests`, `--config` and
    /// `--configmap` (a cluster source starts following the API server at once).
    pub async fn open(
        manifests: Option<&Path>,
        config: Option<&Path>,
        configmap: Option<&str>,
    ) -> Result<Source, OpenError> {
        match (manifests, config, configmap) {
            (Some(dir), _, _) => Ok(Source::Manifests(dir.to_owned())),
            (None, Some(path), _) => Ok(Source::Document(path.to_owned())),
            (None, None, Some(name)) => {
                let (namespace, name) =
                    crate::cluster::parse_name(name).map_err(OpenError::Name)?;
                let client = crate::cluster::connect(None)
                    .await
                    .map_err(OpenError::Connect)?;
                Ok(Source::Cluster(Arc::new(ClusterSource::start(
                    client, &namespace, &name,
                ))))
            }
            (None, None, None) => Err(OpenError::Nothing),
        }
    }

    /// Loads and checks the configuration; `generation` numbers a compiled-in-process one (a
    /// document carries its own).
    pub async fn load(&self, generation: u64) -> Result<Loaded, LoadError> {
        match self {
            Source::Cluster(cluster) => {
                config_source::from_entries(&cluster.origin(), &cluster.complete_entries()?)
            }
            Source::Manifests(_) | Source::Document(_) => {
                let source = self.clone();
                tokio::task::spawn_blocking(move || source.load_files(generation))
                    .await
                    .map_err(|e| LoadError::Task(e.to_string()))?
            }
        }
    }

    fn load_files(&self, generation: u64) -> Result<Loaded, LoadError> {
        match self {
            Source::Manifests(dir) => config_source::from_manifests(dir, generation),
            Source::Document(file) => config_source::from_document_file(file),
            Source::Cluster(cluster) => Err(LoadError::Task(format!(
                "{} is not a file",
                cluster.origin().display()
            ))),
        }
    }

    /// A fingerprint of what the source holds now: for files, as the file system describes
    /// them (it changes when a file is written, added, removed or replaced); for the cluster,
    /// of the objects' contents. `None` when nothing can be read (for the cluster: not yet, or
    /// the ConfigMap does not exist).
    pub fn stamp(&self) -> Option<u64> {
        let mut hasher = DefaultHasher::new();
        match self {
            Source::Cluster(cluster) => return cluster.stamp(),
            Source::Document(file) if !file.is_dir() => stamp_file(file, &mut hasher)?,
            Source::Document(dir) | Source::Manifests(dir) => {
                let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
                    .ok()?
                    .filter_map(|e| e.ok().map(|e| e.path()))
                    .collect();
                entries.sort();
                for path in entries {
                    path.hash(&mut hasher);
                    let _ = stamp_file(&path, &mut hasher);
                }
            }
        }
        Some(hasher.finish())
    }
}

fn stamp_file(path: &Path, hasher: &mut DefaultHasher) -> Option<()> {
    // NB: metadata follows symlinks, so a swapped `..data` link counts as a change.
    let meta = std::fs::metadata(path).ok()?;
    meta.len().hash(hasher);
    meta.modified().ok()?.hash(hasher);
    Some(())
}

/// Builds a generation from a loaded configuration.
pub type Build = dyn Fn(&Loaded) -> Result<Generation, String> + Send + Sync;

/// How often a relay that has no configuration yet tries again (a cluster source also tries
/// as soon as one of its objects changes).
pub const FIRST_LOAD_RETRY: Duration = Duration::from_secs(2);

/// How often a first load that keeps failing is logged.
const FIRST_LOAD_LOG_EVERY: Duration = Duration::from_secs(60);

impl Source {
    /// For the cluster, a receiver that wakes on each change of its objects or of the API's
    /// health; files have none (they are looked at every interval).
    fn changes(&self) -> Option<Receiver<crate::cluster::Snapshot>> {
        match self {
            Source::Cluster(cluster) => Some(cluster.changes()),
            Source::Manifests(_) | Source::Document(_) => None,
        }
    }

    /// Whether the source can be read now (`mailroute_relay_config_source_up`): every watch
    /// answers, or (files) `stamp` found them.
    fn up(&self, stamp: Option<u64>) -> bool {
        match self {
            Source::Cluster(cluster) => cluster.up(),
            Source::Manifests(_) | Source::Document(_) => stamp.is_some(),
        }
    }

    /// A cluster source whose watches are still listing (a new part appeared): nothing to judge.
    fn listing(&self) -> bool {
        matches!(self, Source::Cluster(cluster) if cluster.listing())
    }
}

/// Waits for the next change: the cluster's next snapshot, or the files' next tick. `false`
/// when the source is gone.
async fn next_change(
    changes: &mut Option<Receiver<crate::cluster::Snapshot>>,
    tick: &mut tokio::time::Interval,
) -> bool {
    match changes {
        Some(changes) => changes.changed().await.is_ok(),
        None => {
            tick.tick().await;
            true
        }
    }
}

/// The first configuration. From files it is there or it is an error (a mistake to fix before
/// starting). From the cluster it may not exist yet: at first install the relay starts before
/// the operator has published anything, so it waits (trying again on each change of its
/// objects and every `retry`, logging the reason at once and then at most once a minute)
/// instead of exiting into a crash loop.
pub async fn first_load(source: &Source, retry: Duration) -> Result<Loaded, LoadError> {
    let mut changes = source.changes();
    let mut logged: Option<tokio::time::Instant> = None;
    loop {
        match source.load(1).await {
            Ok(loaded) => {
                if logged.is_some() {
                    tracing::info!("configuration found; starting");
                }
                return Ok(loaded);
            }
            Err(e) => {
                let Some(changes) = &mut changes else {
                    return Err(e);
                };
                let listing = matches!(e, LoadError::Cluster(ClusterError::Listing { .. }));
                if !listing && logged.is_none_or(|at| at.elapsed() >= FIRST_LOAD_LOG_EVERY) {
                    tracing::warn!(error = %e, "no configuration yet; waiting for the operator to publish it");
                    logged = Some(tokio::time::Instant::now());
                }
                let _ = tokio::time::timeout(retry, changes.changed()).await;
            }
        }
    }
}

/// Loads now; a cluster source first waits (`bound` at most) for its first lists to complete.
pub async fn load_listed(source: &Source, bound: Duration) -> Result<Loaded, LoadError> {
    let mut changes = source.changes();
    let deadline = tokio::time::Instant::now() + bound;
    loop {
        let result = source.load(1).await;
        let listing = matches!(
            result,
            Err(LoadError::Cluster(ClusterError::Listing { .. }))
        );
        match &mut changes {
            Some(changes) if listing && tokio::time::Instant::now() < deadline => {
                let _ = tokio::time::timeout_at(deadline, changes.changed()).await;
            }
            _ => return result,
        }
    }
}

/// Installs each valid change of `source` into `shared`: on each change of a cluster source's
/// objects, or each `interval` for files. Keeps `mailroute_relay_config_source_up`. Runs until
/// the task is dropped.
pub async fn watch(source: Source, interval: Duration, shared: Arc<Shared>, build: Arc<Build>) {
    let mut stamp = source.stamp();
    let mut hash = shared.generation.load().hash.clone();
    let mut next = shared.generation.load().number + 1;
    let mut changes = source.changes();
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    shared.metrics.config_source_up.set(1);
    while next_change(&mut changes, &mut tick).await {
        let now = source.stamp();
        shared
            .metrics
            .config_source_up
            .set(i64::from(source.up(now)));
        if source.listing() {
            continue;
        }
        if now == stamp {
            continue;
        }
        stamp = now;
        let result = match source.load(next).await {
            // NB: the credentials too: a rotated password alone is a change.
            Ok(loaded) if loaded.fingerprint() == hash => continue,
            Ok(loaded) => build(&loaded).map(|generation| (loaded, generation)),
            Err(e) => Err(e.to_string()),
        };
        let label = match result {
            Ok((loaded, generation)) => {
                tracing::info!(summary = %config_source::summary(&loaded), "configuration reloaded");
                hash = loaded.fingerprint();
                next = generation.number.max(next) + 1;
                shared.install(generation);
                "success"
            }
            Err(e) => {
                tracing::warn!(error = %e, "configuration change refused; the previous one stays in force");
                "error"
            }
        };
        shared
            .metrics
            .config_reloads
            .get_or_create(&ReloadLabels {
                result: label.to_owned(),
            })
            .inc();
    }
}
