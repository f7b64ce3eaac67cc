//! `mailroute-operator run`: watches the three kinds (metadata only) in the chosen namespaces
//! (all when none is given), and reconciles each namespace that changed, at most once per
//! debounce window, plus every namespace it knows on a periodic resync (which also picks up
//! changes of referenced Secrets and ConfigMaps, which are not watched: the operator never
//! lists a namespace's Secrets). A failed pass is retried with exponential backoff, per
//! namespace, never in a hot loop.

use super::leader::Election;
use super::readiness::Readiness;
use super::{probe, usage};
use super::{reconcile_namespace, recorder};
use crate::metrics::{Metrics, NamespaceLabels, ResultLabels, RouteLabels};
use futures_util::StreamExt;
use kube::core::PartialObjectMeta;
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client, Resource, ResourceExt};
use mailroute_config::Credentials;
use mailroute_config::document::Route;
use mailroute_config::resources::{DkimPublication, MailRoute, RelayPolicy, RoutingRule};
use mailroute_smtp_client::hosts::Resolver;
use mailroute_store::QuotaStore;
use serde::de::DeserializeOwned;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Debug;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

/// How the loop paces itself.
#[derive(Clone, Debug)]
pub struct Pacing {
    /// Changes within this window are reconciled together.
    pub debounce: Duration,
    /// Every known namespace is reconciled this often.
    pub resync: Duration,
    pub backoff_min: Duration,
    pub backoff_max: Duration,
}

impl Default for Pacing {
    fn default() -> Self {
        Self {
            debounce: Duration::from_millis(200),
            resync: Duration::from_secs(60),
            backoff_min: Duration::from_secs(2),
            backoff_max: Duration::from_secs(300),
        }
    }
}

fn watch<K>(
    api: Api<PartialObjectMeta<K>>,
    tx: mpsc::UnboundedSender<String>,
    readiness: Readiness,
) -> tokio::task::JoinHandle<()>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
{
    tokio::spawn(async move {
        let mut stream = watcher::watcher(api, watcher::Config::default()).boxed();
        while let Some(event) = stream.next().await {
            match event {
                Ok(Event::Apply(o) | Event::Delete(o) | Event::InitApply(o)) => {
                    readiness.succeeded();
                    if let Some(ns) = o.namespace() {
                        let _ = tx.send(ns);
                    }
                }
                Ok(Event::Init | Event::InitDone) => readiness.succeeded(),
                Err(e) => {
                    readiness.failed();
                    tracing::warn!(kind = %K::kind(&()), error = %e, "watch failed; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    })
}

/// What the probes look at in one namespace, as the last reconcile compiled it.
#[derive(Clone, Debug, Default)]
struct Probed {
    routes: BTreeMap<String, Route>,
    credentials: Credentials,
    /// Each policy's DKIM records.
    dkim: BTreeMap<String, Vec<DkimPublication>>,
}

/// Per namespace.
type Targets = Arc<std::sync::Mutex<BTreeMap<String, Probed>>>;

/// How often the leader checks that DKIM records are published.
const DKIM_CHECK_INTERVAL: Duration = Duration::from_secs(300);

/// Probes every route on change and every `probeInterval` (at least 10 s), and checks every
/// policy's DKIM records on change and every 5 minutes, while leading.
fn probe_loop(
    client: Client,
    targets: Targets,
    leading: watch::Receiver<bool>,
    metrics: Arc<Metrics>,
    probing: Probing,
) -> tokio::task::JoinHandle<()> {
    let Probing { helo, store } = probing;
    tokio::spawn(async move {
        let resolver = match Resolver::new(None) {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %e, "no DNS resolver: routes are not probed");
                return;
            }
        };
        // (namespace, route) -> (settings last probed, when next).
        let mut schedule: BTreeMap<(String, String), (String, Instant)> = BTreeMap::new();
        // (namespace, policy) -> (records last checked, when next).
        let mut dkim_schedule: BTreeMap<(String, String), (String, Instant)> = BTreeMap::new();
        let mut tick = tokio::time::interval(Duration::from_secs(2));
        loop {
            tick.tick().await;
            if !*leading.borrow() {
                continue;
            }
            let snapshot = targets.lock().map(|t| t.clone()).unwrap_or_default();
            schedule.retain(|(ns, name), _| {
                snapshot
                    .get(ns)
                    .is_some_and(|p| p.routes.contains_key(name))
            });
            dkim_schedule.retain(|(ns, name), _| {
                snapshot.get(ns).is_some_and(|p| p.dkim.contains_key(name))
            });
            for (ns, probed) in &snapshot {
                for (name, publications) in &probed.dkim {
                    let settings = serde_json::to_string(publications).unwrap_or_default();
                    let key = (ns.clone(), name.clone());
                    let due = dkim_schedule
                        .get(&key)
                        .is_none_or(|(seen, next)| *seen != settings || *next <= Instant::now());
                    if !due {
                        continue;
                    }
                    let stamp = k8s_openapi::jiff::Timestamp::now().to_string();
                    if let Err(e) = super::dkim::check_and_report(
                        &client,
                        ns,
                        name,
                        publications,
                        &resolver,
                        &stamp,
                    )
                    .await
                    {
                        tracing::warn!(namespace = %ns, policy = %name, error = %e, "recording the DKIM check failed");
                    }
                    dkim_schedule.insert(key, (settings, Instant::now() + DKIM_CHECK_INTERVAL));
                }
                let (routes, credentials) = (&probed.routes, &probed.credentials);
                for (name, route) in routes {
                    let settings = serde_json::to_string(route).unwrap_or_default();
                    let key = (ns.clone(), name.clone());
                    let due = schedule
                        .get(&key)
                        .is_none_or(|(seen, next)| *seen != settings || *next <= Instant::now());
                    if !due {
                        continue;
                    }
                    let stamp = k8s_openapi::jiff::Timestamp::now().to_string();
                    let usage = match &store {
                        Some(store) => {
                            usage::read(store.as_ref(), name, route, credentials, &stamp).await
                        }
                        None => None,
                    };
                    let verified = probe::probe_and_report(
                        &client,
                        ns,
                        name,
                        route,
                        credentials,
                        &resolver,
                        &helo,
                        &stamp,
                        usage,
                    )
                    .await;
                    match verified {
                        Ok(outcome) => {
                            let labels = RouteLabels::of(ns, name);
                            metrics
                                .route_tls_probe_success
                                .get_or_create(&labels)
                                .set(i64::from(outcome.status == "True"));
                            if let Some(expiry) = outcome.certificate_expiry() {
                                metrics
                                    .route_tls_certificate_expiry
                                    .get_or_create(&labels)
                                    .set(expiry);
                            }
                        }
                        Err(e) => {
                            tracing::warn!(namespace = %ns, route = %name, error = %e, "recording the TLS probe failed")
                        }
                    }
                    let every = Duration::from_millis(route.probe_interval_ms.max(10_000));
                    schedule.insert(key, (settings, Instant::now() + every));
                }
            }
        }
    })
}

/// Keeps `leading` up to date with this replica's part in `election`.
fn elect(
    client: Client,
    election: Election,
    leading: watch::Sender<bool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(election.renew_every);
        loop {
            tick.tick().await;
            let now = match election.tick(&client).await {
                Ok(lead) => lead,
                Err(e) => {
                    tracing::warn!(error = %e, "leader election round failed; not writing");
                    false
                }
            };
            if *leading.borrow() != now {
                tracing::info!(leading = now, "leadership changed");
                let _ = leading.send(now);
            }
        }
    })
}

/// Runs until the process is stopped. With an `election`, only while this replica holds the
/// Lease does it write; a replica that loses it stops writing at its next pass.
/// Which namespaces the operator manages.
#[derive(Clone, Debug, Default)]
pub struct Scope {
    /// Watched and compiled; empty: every namespace.
    pub namespaces: Vec<String>,
    /// Published from the start, before any resource appears in them (`--publish-namespace`).
    pub publish: Vec<String>,
}

impl Scope {
    /// The namespaces reconciled before any event: the watched ones and those to publish, in
    /// the watched scope (a namespace outside `namespaces`, when it is set, is never published).
    pub fn initial(&self) -> BTreeSet<String> {
        let watched = |ns: &String| self.namespaces.is_empty() || self.namespaces.contains(ns);
        self.namespaces
            .iter()
            .chain(self.publish.iter().filter(|ns| watched(ns)))
            .cloned()
            .collect()
    }
}

/// What the route probes need: the EHLO name, and the shared store the relays count routes'
/// rate limits in (read for `status.rateLimits`; `None`: not shown).
pub struct Probing {
    pub helo: String,
    pub store: Option<Arc<dyn QuotaStore>>,
}

impl std::fmt::Debug for Probing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Probing")
            .field("helo", &self.helo)
            .field("store", &self.store.is_some())
            .finish()
    }
}

pub async fn run(
    client: Client,
    scope: Scope,
    pacing: Pacing,
    election: Option<Election>,
    metrics: Arc<Metrics>,
    probing: Probing,
    readiness: Readiness,
) {
    let (leading_tx, mut leading) = watch::channel(election.is_none());
    metrics.leader.set(i64::from(*leading.borrow()));
    let _elector = election.map(|e| elect(client.clone(), e, leading_tx));
    let (tx, mut rx) = mpsc::unbounded_channel::<String>();
    let mut watchers = Vec::new();
    let scopes: Vec<Option<String>> = if scope.namespaces.is_empty() {
        vec![None]
    } else {
        scope.namespaces.iter().cloned().map(Some).collect()
    };
    for scope in &scopes {
        macro_rules! api {
            ($k:ty) => {
                match scope {
                    Some(ns) => Api::<PartialObjectMeta<$k>>::namespaced(client.clone(), ns),
                    None => Api::<PartialObjectMeta<$k>>::all(client.clone()),
                }
            };
        }
        watchers.push(watch(api!(MailRoute), tx.clone(), readiness.clone()));
        watchers.push(watch(api!(RelayPolicy), tx.clone(), readiness.clone()));
        watchers.push(watch(api!(RoutingRule), tx.clone(), readiness.clone()));
    }
    let recorder = recorder(client.clone());
    let targets: Targets = Arc::default();
    let _prober = probe_loop(
        client.clone(),
        Arc::clone(&targets),
        leading.clone(),
        Arc::clone(&metrics),
        probing,
    );
    let mut known: BTreeSet<String> = scope.initial();
    // Namespace -> (when it may run next, failures so far).
    let mut due: BTreeMap<String, (Instant, u32)> = BTreeMap::new();
    let mut resync = tokio::time::interval(pacing.resync);
    loop {
        let next = due.values().map(|(at, _)| *at).min();
        tokio::select! {
            Some(ns) = rx.recv() => {
                known.insert(ns.clone());
                let at = Instant::now() + pacing.debounce;
                due.entry(ns).and_modify(|(t, _)| *t = (*t).min(at).max(Instant::now())).or_insert((at, 0));
            }
            _ = resync.tick() => {
                readiness.check();
                for ns in &known {
                    due.entry(ns.clone()).or_insert((Instant::now(), 0));
                }
            }
            Ok(()) = leading.changed() => {
                metrics.leader.set(i64::from(*leading.borrow()));
                // Newly leading: everything may have changed while another replica wrote.
                if *leading.borrow() {
                    for ns in &known {
                        due.entry(ns.clone()).or_insert((Instant::now(), 0));
                    }
                }
            }
            () = async { if let Some(at) = next { tokio::time::sleep_until(at).await } else { std::future::pending().await } } => {
                let now = Instant::now();
                let ready: Vec<(String, u32)> = due
                    .iter()
                    .filter(|(_, (at, _))| *at <= now)
                    .map(|(ns, (_, failures))| (ns.clone(), *failures))
                    .collect();
                if !*leading.borrow() {
                    // Following: the leader writes; passes resume on taking over.
                    due.clear();
                    continue;
                }
                for (ns, failures) in ready {
                    due.remove(&ns);
                    let stamp = k8s_openapi::jiff::Timestamp::now().to_string();
                    let started = std::time::Instant::now();
                    let outcome = reconcile_namespace(&client, &recorder, &ns, &stamp).await;
                    metrics.reconcile_duration.observe(started.elapsed().as_secs_f64());
                    if outcome.is_ok() { readiness.succeeded() } else { readiness.failed() }
                    let result = if outcome.is_ok() { "success" } else { "error" };
                    metrics
                        .reconciles
                        .get_or_create(&ResultLabels { result: result.to_owned() })
                        .inc();
                    match outcome {
                        Ok(summary) => {
                            if let Ok(mut t) = targets.lock() {
                                t.insert(ns.clone(), Probed {
                                    routes: summary.routes.clone(),
                                    credentials: summary.credentials.clone(),
                                    dkim: summary.dkim.clone(),
                                });
                            }
                            let labels = NamespaceLabels { namespace: ns.clone() };
                            metrics
                                .generation
                                .get_or_create(&labels)
                                .set(i64::try_from(summary.generation).unwrap_or(i64::MAX));
                            metrics
                                .invalid_resources
                                .get_or_create(&labels)
                                .set(i64::try_from(summary.invalid).unwrap_or(i64::MAX));
                        }
                        Err(e) => {
                            let backoff = pacing
                                .backoff_min
                                .saturating_mul(2u32.saturating_pow(failures.min(16)))
                                .min(pacing.backoff_max);
                            tracing::warn!(namespace = %ns, error = %e, retry_in = ?backoff, "reconcile failed");
                            due.insert(ns, (Instant::now() + backoff, failures + 1));
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod scope_tests {
    use super::Scope;

    #[test]
    fn the_relays_namespace_is_published_from_the_start_within_the_watched_scope() {
        let all = Scope {
            namespaces: vec![],
            publish: vec!["mail".into()],
        };
        assert_eq!(all.initial().into_iter().collect::<Vec<_>>(), ["mail"]);
        let some = Scope {
            namespaces: vec!["mail".into(), "eu".into()],
            publish: vec!["mail".into(), "elsewhere".into()],
        };
        assert_eq!(
            some.initial().into_iter().collect::<Vec<_>>(),
            ["eu", "mail"]
        );
    }
}
