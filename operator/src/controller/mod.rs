//! The controller (SPEC 7): reconciling a namespace means reading its `MailRoute`,
//! `RoutingRule` and `RelayPolicy` resources and the Secrets and ConfigMaps they reference,
//! compiling them, writing the document and credentials when they changed (server-side apply),
//! and setting each resource's `Ready` condition, with an Event when one becomes invalid.
//!
//! - [`publish`]: the ConfigMap(s) and Secret for a compiled namespace (pure).
//! - [`status`]: the `Ready` condition and a policy's facts (pure); [`conditions`]: one condition
//!   per type, as every status writer replaces its own.
//! - [`reconcile_namespace`]: the I/O, one pass; idempotent: a namespace whose document,
//!   credentials and statuses are what they should be gets no write at all.
//! - [`run`]: watches and leader-less single-writer loop for `mailroute-operator run`.
//! - [`probe`]: the route TLS probe; [`usage`]: a route's use of its rate limits (read from
//!   the shared store with each probe).

pub mod conditions;
pub mod dkim;
pub mod leader;
pub mod probe;
pub mod publish;
pub mod readiness;
pub mod run;
pub mod status;
pub mod usage;

use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{ListParams, Patch, PatchParams};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::{Api, Client, Resource, ResourceExt};
use mailroute_config::resources::{Condition, MailRoute, RelayPolicy, RoutingRule};
use mailroute_config::{Inputs, Kind, Object, Problem, compile};
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};

/// The operator's field manager for server-side apply.
pub const FIELD_MANAGER: &str = "mailroute-operator";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Api(#[from] kube::Error),
}

/// What one reconcile did.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Summary {
    /// The valid routes and the credentials they use, for the TLS probe.
    pub routes: BTreeMap<String, mailroute_config::document::Route>,
    pub credentials: mailroute_config::Credentials,
    /// Each valid policy's DKIM records, for the check that they are published.
    pub dkim: BTreeMap<String, Vec<mailroute_config::resources::DkimPublication>>,
    /// The generation now published.
    pub generation: u64,
    /// The document (ConfigMaps) was written.
    pub document_written: bool,
    /// The credentials Secret was written.
    pub credentials_written: bool,
    /// Resources whose status was patched.
    pub statuses_patched: usize,
    /// Resources left out of the document.
    pub invalid: usize,
    /// Events published.
    pub events: usize,
}

/// The Secrets and ConfigMaps the resources reference (only those are read: the operator
/// never lists a namespace's Secrets).
pub fn references(
    routes: &[MailRoute],
    policies: &[RelayPolicy],
) -> (BTreeSet<String>, BTreeSet<String>) {
    let mut secrets = BTreeSet::new();
    let mut config_maps = BTreeSet::new();
    for r in routes {
        if let Some(ca) = &r.spec.tls.ca_bundle_secret_ref {
            secrets.insert(ca.name.clone());
        }
        if let Some(auth) = &r.spec.auth {
            secrets.extend(auth.secret_ref.iter().map(|s| s.name.clone()));
            if let Some(o) = &auth.oauth2 {
                let refs = [
                    Some(&o.client_id_secret_ref),
                    o.client_secret_secret_ref.as_ref(),
                    o.refresh_token_secret_ref.as_ref(),
                    o.ca_bundle_secret_ref.as_ref(),
                ];
                secrets.extend(refs.into_iter().flatten().map(|k| k.name.clone()));
            }
        }
    }
    for p in policies {
        if let Some(from) = &p.spec.users_from {
            if let Some(cm) = &from.config_map_ref {
                config_maps.insert(cm.name.clone());
            }
            if let Some(s) = &from.secret_ref {
                secrets.insert(s.name.clone());
            }
        }
        if let Some(s) = &p.spec.authentication.credentials_secret_ref {
            secrets.insert(s.name.clone());
        }
        secrets.extend(
            p.spec
                .dkim
                .iter()
                .map(|k| k.private_key_secret_ref.name.clone()),
        );
    }
    (secrets, config_maps)
}

fn object<S: Clone, K: Resource<DynamicType = ()>>(resource: &K, spec: &S) -> Object<S> {
    Object {
        name: resource.meta().name.clone().unwrap_or_default(),
        generation: resource.meta().generation,
        spec: spec.clone(),
    }
}

fn annotation(cm: Option<&ConfigMap>, key: &str) -> Option<String> {
    cm.and_then(|c| c.metadata.annotations.as_ref())
        .and_then(|a| a.get(key).cloned())
}

/// The patch of one resource's status: its `Ready` condition and observed generation.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct StatusPatch {
    conditions: Vec<Condition>,
    observed_generation: Option<i64>,
}

/// One pass over `namespace`; `now` is the RFC 3339 time stamped on changed conditions.
pub async fn reconcile_namespace(
    client: &Client,
    recorder: &Recorder,
    namespace: &str,
    now: &str,
) -> Result<Summary, Error> {
    let lp = ListParams::default();
    let routes_api: Api<MailRoute> = Api::namespaced(client.clone(), namespace);
    let policies_api: Api<RelayPolicy> = Api::namespaced(client.clone(), namespace);
    let rules_api: Api<RoutingRule> = Api::namespaced(client.clone(), namespace);
    let routes = routes_api.list(&lp).await?.items;
    let policies = policies_api.list(&lp).await?.items;
    let rules = rules_api.list(&lp).await?.items;

    let (secret_names, config_map_names) = references(&routes, &policies);
    let secrets_api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let config_maps_api: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
    let mut secrets = BTreeMap::new();
    for name in secret_names {
        if let Some(s) = secrets_api.get_opt(&name).await? {
            let mut data: BTreeMap<String, Vec<u8>> = s
                .data
                .unwrap_or_default()
                .into_iter()
                .map(|(k, v)| (k, v.0))
                .collect();
            for (k, v) in s.string_data.unwrap_or_default() {
                data.insert(k, v.into_bytes());
            }
            secrets.insert(name, data);
        }
    }
    let mut config_maps = BTreeMap::new();
    for name in config_map_names {
        if let Some(cm) = config_maps_api.get_opt(&name).await? {
            config_maps.insert(name, cm.data.unwrap_or_default());
        }
    }
    let inputs = Inputs {
        namespace: namespace.to_owned(),
        routes: routes.iter().map(|r| object(r, &r.spec)).collect(),
        policies: policies.iter().map(|p| object(p, &p.spec)).collect(),
        rules: rules.iter().map(|r| object(r, &r.spec)).collect(),
        secrets,
        config_maps,
    };
    let compiled = compile(&inputs);
    let mut summary = Summary::default();

    // The document: written only when its content changed, with the next generation number.
    let current = config_maps_api.get_opt(publish::CONFIG_MAP).await?;
    let current_hash = annotation(current.as_ref(), publish::HASH_ANNOTATION);
    let current_generation: u64 = annotation(current.as_ref(), publish::GENERATION_ANNOTATION)
        .and_then(|g| g.parse().ok())
        .unwrap_or(0);
    let hash = compiled.config.content_hash();
    let unchanged = current_hash.as_deref() == Some(hash.as_str());
    summary.generation = if unchanged {
        current_generation
    } else {
        current_generation + 1
    };
    let owners: Vec<OwnerReference> = policies
        .iter()
        .filter_map(|p| p.controller_owner_ref(&()))
        .map(|mut o| {
            // NB: every policy owns the output; it goes when the last one goes.
            o.controller = Some(false);
            o
        })
        .collect();
    let published = publish::publish(
        namespace,
        &compiled.document(summary.generation),
        &compiled.credentials,
        &owners,
    );
    let apply = PatchParams::apply(FIELD_MANAGER).force();
    if !unchanged {
        // Parts before the index, so a reader following the index finds them all.
        for cm in published
            .config_maps
            .iter()
            .skip(1)
            .chain(published.config_maps.first())
        {
            let name = cm.metadata.name.clone().unwrap_or_default();
            config_maps_api
                .patch(&name, &apply, &Patch::Apply(cm))
                .await?;
        }
        summary.document_written = true;
    }
    let current_secret = secrets_api.get_opt(publish::SECRET).await?;
    let secret_hash = current_secret
        .as_ref()
        .and_then(|s| s.metadata.annotations.as_ref())
        .and_then(|a| a.get(publish::HASH_ANNOTATION).cloned());
    if secret_hash.as_deref() != Some(publish::credentials_hash(&compiled.credentials).as_str()) {
        secrets_api
            .patch(publish::SECRET, &apply, &Patch::Apply(&published.secret))
            .await?;
        summary.credentials_written = true;
    }

    // Statuses and Events.
    let problems_of = |kind: Kind, name: &str| -> Vec<&Problem> {
        compiled
            .problems
            .iter()
            .filter(|p| p.kind == kind && p.name == name)
            .collect()
    };
    let conditions = |c: Option<&Vec<Condition>>| c.cloned().unwrap_or_default();
    let mut changes = Vec::new();
    for r in &routes {
        let previous = conditions(r.status.as_ref().map(|s| &s.conditions));
        changes.push(change(Kind::MailRoute, r, previous, None));
    }
    for p in &policies {
        let previous = conditions(p.status.as_ref().map(|s| &s.conditions));
        let facts = (
            status::policy_facts(
                compiled.config.tenants.get(&p.name_any()),
                &compiled.credentials,
            ),
            status::stored_policy_facts(p.status.as_ref()),
        );
        changes.push(change(Kind::RelayPolicy, p, previous, Some(facts)));
    }
    for r in &rules {
        let previous = conditions(r.status.as_ref().map(|s| &s.conditions));
        changes.push(change(Kind::RoutingRule, r, previous, None));
    }
    for (kind, name, generation, previous, reference, facts) in changes {
        let problems = problems_of(kind, &name);
        if !problems.is_empty() {
            summary.invalid += 1;
        }
        let ready = status::ready(&problems, generation, &previous, now);
        let before = previous.iter().find(|c| c.type_ == "Ready");
        let same = before.is_some_and(|b| {
            b.status == ready.status
                && b.reason == ready.reason
                && b.message == ready.message
                && b.observed_generation == ready.observed_generation
        });
        let facts_same = facts
            .as_ref()
            .is_none_or(|(desired, stored)| desired == stored);
        if same && facts_same {
            continue;
        }
        let became_invalid = ready.status == "False"
            && before.is_none_or(|b| b.status != "False" || b.message != ready.message);
        let mut body = serde_json::to_value(StatusPatch {
            conditions: conditions::merged(&previous, ready.clone()),
            observed_generation: generation,
        })
        .unwrap_or_default();
        if let (Some((desired, _)), Some(map)) = (&facts, body.as_object_mut())
            && let Some(extra) = desired.as_object()
        {
            map.extend(extra.clone());
        }
        let patch = serde_json::json!({ "status": body });
        let params = PatchParams::default();
        match kind {
            Kind::MailRoute => {
                routes_api
                    .patch_status(&name, &params, &Patch::Merge(&patch))
                    .await?;
            }
            Kind::RelayPolicy => {
                policies_api
                    .patch_status(&name, &params, &Patch::Merge(&patch))
                    .await?;
            }
            Kind::RoutingRule => {
                rules_api
                    .patch_status(&name, &params, &Patch::Merge(&patch))
                    .await?;
            }
        }
        summary.statuses_patched += 1;
        if became_invalid {
            recorder
                .publish(
                    &Event {
                        type_: EventType::Warning,
                        reason: "Invalid".into(),
                        note: Some(truncate(&ready.message, 1000)),
                        action: "Compile".into(),
                        secondary: None,
                    },
                    &reference,
                )
                .await?;
            summary.events += 1;
        }
    }
    summary.routes = compiled.config.routes.clone();
    summary.credentials = compiled.credentials.clone();
    summary.dkim = compiled
        .config
        .tenants
        .iter()
        .filter(|(_, t)| !t.dkim.is_empty())
        .map(|(name, t)| (name.clone(), dkim::publications(t, &compiled.credentials)))
        .collect();
    tracing::info!(
        namespace,
        generation = summary.generation,
        written = summary.document_written,
        invalid = summary.invalid,
        "reconciled"
    );
    Ok(summary)
}

/// One resource's part in the status pass: kind, name, generation, its current conditions,
/// a reference for Events, and (policies) the desired and stored counts.
type Change = (
    Kind,
    String,
    Option<i64>,
    Vec<Condition>,
    k8s_openapi::api::core::v1::ObjectReference,
    Option<(serde_json::Value, serde_json::Value)>,
);

fn change<K: Resource<DynamicType = ()>>(
    kind: Kind,
    resource: &K,
    previous: Vec<Condition>,
    facts: Option<(serde_json::Value, serde_json::Value)>,
) -> Change {
    (
        kind,
        resource.name_any(),
        resource.meta().generation,
        previous,
        resource.object_ref(&()),
        facts,
    )
}

fn truncate(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let mut cut = max;
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}…", &text[..cut])
}

/// The Event reporter of this operator.
pub fn reporter() -> Reporter {
    Reporter {
        controller: FIELD_MANAGER.into(),
        instance: std::env::var("POD_NAME").ok(),
    }
}

/// A recorder for `client`.
pub fn recorder(client: Client) -> Recorder {
    Recorder::new(client, reporter())
}
