//! Leader election on a `coordination.k8s.io/v1` Lease (SPEC 7): of several operator replicas,
//! only the holder of the Lease writes. The holder renews every [`Election::renew_every`]; a
//! Lease not renewed for its duration is taken over by another replica. Writes of the Lease
//! carry its `resourceVersion`, so two replicas racing for it cannot both win.
//!
//! [`decide`] is the pure rule; [`Election::tick`] does one round against the API.

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::PostParams;
use kube::{Api, Client};
use std::time::Duration;

/// What a replica does with the Lease as it finds it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// No Lease yet: create it, holding it.
    Create,
    /// We hold it: renew.
    Renew,
    /// Its holder stopped renewing (or released it): take it over.
    TakeOver,
    /// Someone else holds it and is alive: do not write.
    Follow,
}

/// The rule: who may hold `lease` at `now`.
pub fn decide(lease: Option<&Lease>, me: &str, now: Timestamp) -> Action {
    let Some(spec) = lease.and_then(|l| l.spec.as_ref()) else {
        return if lease.is_some() {
            Action::TakeOver
        } else {
            Action::Create
        };
    };
    let holder = spec.holder_identity.as_deref().unwrap_or("");
    if holder == me {
        return Action::Renew;
    }
    if holder.is_empty() {
        return Action::TakeOver;
    }
    let duration = SignedDuration::from_secs(i64::from(spec.lease_duration_seconds.unwrap_or(15)));
    match spec.renew_time.as_ref() {
        Some(renewed) if renewed.0 + duration > now => Action::Follow,
        _ => Action::TakeOver,
    }
}

/// One replica's part in the election.
#[derive(Clone, Debug)]
pub struct Election {
    pub namespace: String,
    pub name: String,
    /// This replica's identity (the pod name).
    pub identity: String,
    pub lease_duration: Duration,
    pub renew_every: Duration,
}

impl Election {
    pub fn new(namespace: &str, identity: &str) -> Self {
        Self {
            namespace: namespace.to_owned(),
            name: "mailroute-operator".to_owned(),
            identity: identity.to_owned(),
            lease_duration: Duration::from_secs(15),
            renew_every: Duration::from_secs(5),
        }
    }

    fn spec(&self, now: Timestamp, acquired: Option<MicroTime>, transitions: i32) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            lease_duration_seconds: Some(
                i32::try_from(self.lease_duration.as_secs()).unwrap_or(15),
            ),
            acquire_time: Some(acquired.unwrap_or(MicroTime(now))),
            renew_time: Some(MicroTime(now)),
            lease_transitions: Some(transitions),
            ..LeaseSpec::default()
        }
    }

    /// One round: returns whether this replica leads now. A lost race or an API error means
    /// not leading (writes stop until a later round wins).
    pub async fn tick(&self, client: &Client) -> Result<bool, kube::Error> {
        let api: Api<Lease> = Api::namespaced(client.clone(), &self.namespace);
        let now = Timestamp::now();
        let current = api.get_opt(&self.name).await?;
        let action = decide(current.as_ref(), &self.identity, now);
        let result = match (action, current) {
            (Action::Follow, _) => return Ok(false),
            (Action::Create, _) => {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(self.name.clone()),
                        namespace: Some(self.namespace.clone()),
                        ..ObjectMeta::default()
                    },
                    spec: Some(self.spec(now, None, 0)),
                };
                api.create(&PostParams::default(), &lease).await.map(|_| ())
            }
            (Action::Renew | Action::TakeOver, Some(mut lease)) => {
                let old = lease.spec.clone().unwrap_or_default();
                let (acquired, transitions) = if action == Action::Renew {
                    (old.acquire_time, old.lease_transitions.unwrap_or(0))
                } else {
                    (None, old.lease_transitions.unwrap_or(0) + 1)
                };
                lease.spec = Some(self.spec(now, acquired, transitions));
                // NB: replace carries metadata.resourceVersion: a concurrent writer makes
                // this fail with 409 instead of both replicas believing they lead.
                api.replace(&self.name, &PostParams::default(), &lease)
                    .await
                    .map(|_| ())
            }
            (Action::Renew | Action::TakeOver, None) => return Ok(false),
        };
        match result {
            Ok(()) => {
                if action == Action::TakeOver || action == Action::Create {
                    tracing::info!(identity = %self.identity, "leading: this replica now writes");
                }
                Ok(true)
            }
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(holder: &str, renewed_secs_ago: i64) -> Lease {
        let now = Timestamp::now();
        Lease {
            metadata: ObjectMeta::default(),
            spec: Some(LeaseSpec {
                holder_identity: Some(holder.into()),
                lease_duration_seconds: Some(15),
                renew_time: Some(MicroTime(now - SignedDuration::from_secs(renewed_secs_ago))),
                ..LeaseSpec::default()
            }),
        }
    }

    #[test]
    fn the_lease_goes_to_whoever_holds_it_until_it_expires() {
        let now = Timestamp::now();
        assert_eq!(decide(None, "a", now), Action::Create);
        assert_eq!(decide(Some(&lease("a", 3)), "a", now), Action::Renew);
        assert_eq!(decide(Some(&lease("b", 3)), "a", now), Action::Follow);
        assert_eq!(decide(Some(&lease("b", 16)), "a", now), Action::TakeOver);
        assert_eq!(decide(Some(&lease("", 1)), "a", now), Action::TakeOver);
    }
}
