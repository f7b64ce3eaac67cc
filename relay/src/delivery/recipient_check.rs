//! RCPT-time recipient verification (SPEC 6.4): a recipient is checked with its primary
//! route's upstream (MAIL, RCPT, RSET; no message), so a per-recipient refusal reaches the
//! client as a per-recipient reply. Not to be confused with the operator's TLS probe.

use super::Forwarder;
use super::attempt::{Done, Failed, Job};
use super::upstream::UpstreamError;
use crate::interfaces::RecipientQuery;
use crate::metrics::VerificationLabels;
use crate::reply::Reply;
use crate::routing::{RecipientRoute, Target};
use std::time::{Duration, Instant};

/// Longest RCPT-time recipient check; past it the recipient is accepted and delivery after
/// DATA decides (the client must not wait on a slow upstream for every recipient).
pub const VERIFY_TIMEOUT: Duration = Duration::from_secs(10);

impl Forwarder {
    /// Refuses a recipient at RCPT whose primary route is already at one of its rate limits
    /// (SPEC 11, `MailRoute.rateLimits`): `451 4.4.5` naming the route, before the client
    /// sends a message that would only be deferred. Only where the route is required.
    pub async fn check_rate_limits(&self, route: &RecipientRoute) -> Result<(), Reply> {
        let Target::Route(name) = &route.target else {
            return Ok(());
        };
        let (Some(runtime), Some(pacing)) = (self.routes.get(&**name), &self.pacing) else {
            return Ok(());
        };
        match &runtime.pace {
            Some(paced) if self.router.is_required(&route.target) => {
                pacing.check(name, paced, &self.metrics).await
            }
            _ => Ok(()),
        }
    }

    /// Whether a route of this configuration is checked at RCPT time (recipient verification
    /// or rate limits).
    pub fn checks_at_rcpt(config: &mailroute_config::RelayConfig) -> bool {
        config
            .routes
            .values()
            .any(|r| r.verify_recipients || r.rate_limits.is_some())
    }

    /// Checks a recipient with its primary route's upstream at RCPT time, when that route has
    /// `verifyRecipients` and is required. `Err`: the upstream's refusal, for the client. An
    /// upstream that cannot be asked (unreachable, slow, TLS policy) accepts: the message's
    /// delivery decides, with the reply rules of SPEC 6.5.
    pub async fn verify_recipient(
        &self,
        query: &RecipientQuery,
        route: &RecipientRoute,
    ) -> Result<(), Reply> {
        let Target::Route(name) = &route.target else {
            return Ok(());
        };
        let Some(runtime) = self.routes.get(&**name) else {
            return Ok(());
        };
        if !runtime.route.verify_recipients || !self.router.is_required(&route.target) {
            return Ok(());
        }
        let deadline = Instant::now() + VERIFY_TIMEOUT;
        let check = async {
            let hosts = self
                .hosts_for(runtime, &route.target)
                .await
                .map_err(|reply| UpstreamError::Protocol {
                    stage: "host lookup",
                    detail: reply.to_string(),
                })?;
            let job = Job::Verify {
                sender: &query.sender,
                recipient: &route.deliver_as,
            };
            match self
                .on_hosts(runtime, &hosts, route.require_tls, deadline, job)
                .await
            {
                Ok(Done::Verified(answer)) => Ok(answer),
                Ok(Done::Delivered(_)) => Err(UpstreamError::Protocol {
                    stage: "recipient check",
                    detail: "a delivery's answer".to_owned(),
                }),
                Err(failed) => Err(match failed {
                    Failed::Busy(busy) => UpstreamError::Protocol {
                        stage: "connection pool",
                        detail: busy.to_string(),
                    },
                    Failed::Limited(reply) => UpstreamError::Protocol {
                        stage: "connection limit",
                        detail: reply.to_string(),
                    },
                    Failed::Hosts(Some(e)) | Failed::Final(e) => e,
                    Failed::Hosts(None) => UpstreamError::Protocol {
                        stage: "host lookup",
                        detail: "no host to ask".to_owned(),
                    },
                }),
            }
        };
        let answer = tokio::time::timeout_at(deadline.into(), check)
            .await
            .unwrap_or(Err(UpstreamError::Timeout {
                stage: "recipient check",
                after: VERIFY_TIMEOUT,
            }));
        let (result, verdict) = match answer {
            Ok(None) => ("accepted", Ok(())),
            Ok(Some(refusal)) if refusal.code() >= 500 => ("refused", Err(refusal)),
            Ok(Some(refusal)) => ("deferred", Err(refusal)),
            Err(e) => {
                tracing::info!(transaction = %query.transaction, route = %runtime.name, error = %e, "recipient check unavailable; accepting");
                ("unavailable", Ok(()))
            }
        };
        self.metrics
            .recipient_verifications
            .get_or_create(&VerificationLabels {
                route: runtime.name.to_string(),
                result: result.to_owned(),
            })
            .inc();
        verdict
    }
}
