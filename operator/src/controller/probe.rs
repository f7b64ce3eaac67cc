//! The route TLS probe (SPEC 3.1): connect, EHLO, STARTTLS (or implicit TLS), verify as the
//! route says, QUIT; never MAIL. It runs the relay's own upstream code
//! (`mailroute_smtp_client::{upstream, tls, hosts}`), so what it reports is exactly what a
//! delivery over the route would meet: the "test TLS connection" button, made continuous.
//!
//! The outcome is the route's `TLSVerified` condition and `status.lastProbe` (time, host
//! probed, TLS version, certificate subject, issuer and expiry, or the error), and the
//! `mailroute_route_tls_probe_success{route}` gauge.

use mailroute_config::Credentials;
use mailroute_config::document::Route;
use mailroute_config::resources::{Condition, ProbeResult, TlsMode};
use mailroute_smtp_client::hosts::Resolver;
use mailroute_smtp_client::route as dialling;
use mailroute_smtp_client::upstream::Upstream;

/// What one probe found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Probe {
    /// `True`, `False`, or `Unknown` (TLS disabled on the route: nothing to verify).
    pub status: &'static str,
    /// CamelCase reason for the condition.
    pub reason: &'static str,
    pub result: ProbeResult,
}

impl Probe {
    /// The `TLSVerified` condition; `previous` keeps its transition time when unchanged.
    pub fn condition(
        &self,
        generation: Option<i64>,
        previous: &[Condition],
        now: &str,
    ) -> Condition {
        let message = match (&self.result.error, &self.result.tls_version) {
            (Some(e), _) => e.clone(),
            (None, Some(v)) => format!(
                "{v} with {}",
                self.result.certificate_subject.as_deref().unwrap_or("?")
            ),
            (None, None) => "TLS is disabled on this route".to_owned(),
        };
        let last_transition_time = previous
            .iter()
            .find(|c| c.type_ == "TLSVerified" && c.status == self.status)
            .map(|c| c.last_transition_time.clone())
            .unwrap_or_else(|| now.to_owned());
        Condition {
            type_: "TLSVerified".to_owned(),
            status: self.status.to_owned(),
            reason: self.reason.to_owned(),
            message,
            last_transition_time,
            observed_generation: generation,
        }
    }
}

/// Probes route `name` of `namespace` and records the outcome in its status (`TLSVerified`,
/// `lastProbe`, and `rateLimits` when `usage` was read), keeping its other conditions.
/// Returns what the probe found.
#[allow(clippy::too_many_arguments)]
pub async fn probe_and_report(
    client: &kube::Client,
    namespace: &str,
    name: &str,
    route: &Route,
    credentials: &Credentials,
    resolver: &Resolver,
    helo: &str,
    now: &str,
    usage: Option<mailroute_config::resources::RateLimitsStatus>,
) -> Result<Probe, kube::Error> {
    use kube::api::{Patch, PatchParams};
    let outcome = probe(name, route, credentials, resolver, helo, now).await;
    let api: kube::Api<mailroute_config::resources::MailRoute> =
        kube::Api::namespaced(client.clone(), namespace);
    let Some(current) = api.get_opt(name).await? else {
        return Ok(outcome);
    };
    let previous = current
        .status
        .as_ref()
        .map(|s| s.conditions.clone())
        .unwrap_or_default();
    let condition = outcome.condition(current.metadata.generation, &previous, now);
    let conditions = super::conditions::merged(&previous, condition);
    let mut patch = serde_json::json!({
        "status": {"conditions": conditions, "lastProbe": outcome.result}
    });
    if let Some(usage) = usage {
        patch["status"]["rateLimits"] = serde_json::json!(usage);
    }
    api.patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    if outcome.status == "False" {
        tracing::warn!(
            namespace,
            route = name,
            reason = outcome.reason,
            "TLS probe failed"
        );
    }
    Ok(outcome)
}

impl Probe {
    /// Seconds since the Unix epoch at which the certificate seen expires.
    pub fn certificate_expiry(&self) -> Option<i64> {
        self.result
            .certificate_not_after
            .as_deref()
            .and_then(|t| t.parse::<k8s_openapi::jiff::Timestamp>().ok())
            .map(|t| t.as_second())
    }
}

fn failed(now: &str, target: Option<String>, reason: &'static str, error: String) -> Probe {
    Probe {
        status: "False",
        reason,
        result: ProbeResult {
            time: now.to_owned(),
            target,
            error: Some(error),
            ..ProbeResult::default()
        },
    }
}

/// Probes route `name` as the relay would reach it. `helo` is the relay's default EHLO name.
pub async fn probe(
    name: &str,
    route: &Route,
    credentials: &Credentials,
    resolver: &Resolver,
    helo: &str,
    now: &str,
) -> Probe {
    if route.tls.mode == TlsMode::Disabled {
        return Probe {
            status: "Unknown",
            reason: "TLSDisabled",
            result: ProbeResult {
                time: now.to_owned(),
                ..ProbeResult::default()
            },
        };
    }
    let candidates = match resolver.route_hosts(&route.destination).await {
        Ok(c) if !c.is_empty() => c,
        Ok(_) => return failed(now, None, "Unreachable", "no host to probe".into()),
        Err(e) => return failed(now, None, "Unreachable", e.to_string()),
    };
    let candidate = &candidates[0];
    let target = Some(format!("{} ({})", candidate.name, candidate.addr));
    // NB: Opportunistic routes are probed as if TLS were required: the probe's question is
    // whether TLS works, and with which certificate. The route is dialled as a delivery
    // dials it, without AUTH: the probe checks the transport and never sends a credential.
    let connector =
        dialling::connector(route, credentials.ca_bundles.get(name).map(String::as_str))
            .map_err(|e| e.to_string());
    if let Err(e) = &connector {
        return failed(now, target, "InvalidSettings", e.clone());
    }
    let tls = match dialling::tls_plan(route.tls.mode, true, &connector, name) {
        Ok(tls) => tls,
        Err(e) => return failed(now, target, "InvalidSettings", e.to_string()),
    };
    let dial = dialling::dial(route, candidate, helo, tls, None);
    let upstream = match Upstream::connect(&dial).await {
        Ok(u) => u,
        Err(e) => {
            let reason = match &e {
                mailroute_smtp_client::upstream::UpstreamError::TlsNotOffered => {
                    "STARTTLSNotOffered"
                }
                mailroute_smtp_client::upstream::UpstreamError::Tls(_)
                | mailroute_smtp_client::upstream::UpstreamError::Certificate { .. } => {
                    "HandshakeFailed"
                }
                _ => "Unreachable",
            };
            return failed(now, target, reason, e.to_string());
        }
    };
    let (version, chain) = upstream.tls_peer().unwrap_or_default();
    upstream.quit().await;
    let mut result = ProbeResult {
        time: now.to_owned(),
        target,
        tls_version: Some(version),
        ..ProbeResult::default()
    };
    if let Some(leaf) = chain.first()
        && let Ok((_, cert)) = x509_parser::parse_x509_certificate(leaf)
    {
        result.certificate_subject = Some(cert.subject().to_string());
        result.certificate_issuer = Some(cert.issuer().to_string());
        result.certificate_not_after =
            k8s_openapi::jiff::Timestamp::from_second(cert.validity().not_after.timestamp())
                .ok()
                .map(|t| t.to_string());
    }
    Probe {
        status: "True",
        reason: "Verified",
        result,
    }
}
