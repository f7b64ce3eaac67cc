//! A destination's own TLS policy, for routes delivering by MX lookup (SPEC 12): DANE
//! (`mxLookup.dane`, RFC 7672) and MTA-STS (`mxLookup.mtaSts`, RFC 8461). Where an MX host
//! has DNSSEC-validated TLSA records, DANE decides and MTA-STS is not consulted for that host
//! (RFC 8461 section 2). What the policy asks of each host is [`LegTls::demand`]; the session
//! is opened as it says in [`Forwarder::open_under`], and its result counted as a TLS-RPT
//! report (RFC 8460) would give it (`mailroute_relay_tls_policy_results_total`).

use super::Forwarder;
use super::RouteRuntime;
use super::hosts::Candidate;
use super::mta_sts::{Demand, Found, Mode};
use super::upstream::{TlsPlan, Upstream, UpstreamError};
use crate::metrics::TlsPolicyLabels;
use crate::reply::Reply;
use hickory_resolver::proto::rr::{RData, RecordType};
use mailroute_smtp_client::dane::{self, Tlsa};
use mailroute_smtp_client::dnssec::{Answer, Validating};
use mailroute_smtp_client::route;
use std::collections::HashMap;
use std::sync::Arc;

/// What DANE says of one MX host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum HostDane {
    /// Not applicable: the MX or address records are not validated, or there are no TLSA
    /// records.
    None,
    /// Validated usable TLSA records: TLS is mandatory and the certificate must match one.
    Authenticate(Vec<Tlsa>),
    /// Validated TLSA records, none usable: TLS is mandatory, not authenticated (section 2.2).
    Encrypt,
    /// The TLSA lookup failed for a host whose records are signed: the host is not used
    /// (section 2.2.2).
    Unavailable(String),
}

/// What a leg's destination asks of the connection to one host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum HostTls {
    /// DANE applies (not `HostDane::None`).
    Dane(HostDane),
    /// The MTA-STS policy's demand.
    Sts(Demand),
}

/// A leg's destination domain under `mxLookup.mtaSts` or `mxLookup.dane`, and what was found.
pub(crate) struct LegTls {
    domain: Arc<str>,
    /// `Found::Nothing` when the route does not ask for MTA-STS.
    sts: Found,
    /// Per MX host name; empty when the route does not ask for DANE.
    dane: HashMap<String, HostDane>,
}

impl LegTls {
    pub(crate) fn demand(&self, host: &str) -> HostTls {
        match self.dane.get(host) {
            Some(HostDane::None) | None => HostTls::Sts(match &self.sts {
                Found::Policy(policy) => policy.demand(host),
                _ => Demand::Nothing,
            }),
            Some(dane) => HostTls::Dane(dane.clone()),
        }
    }

    /// Whether connections to `host` are opened with its certificate authenticated (kept
    /// apart from others in the pool).
    pub(crate) fn verified(&self, host: &str) -> bool {
        matches!(
            self.demand(host),
            HostTls::Dane(HostDane::Authenticate(_)) | HostTls::Sts(Demand::Verified)
        )
    }
}

/// The DANE state of each of `candidates`, MX hosts of `domain` reached on `port`. The MX
/// records (or, without any, the domain's address) must be validated for any TLSA record to
/// count, and each host's own address records too (RFC 7672 sections 2.2.1, 2.2.2).
async fn dane_hosts(
    validating: &Validating,
    domain: &str,
    candidates: &[Candidate],
    port: u16,
) -> HashMap<String, HostDane> {
    let mut names: Vec<&str> = candidates.iter().map(|c| c.name.as_str()).collect();
    names.dedup();
    let all = |state: HostDane| {
        names
            .iter()
            .map(|n| ((*n).to_owned(), state.clone()))
            .collect::<HashMap<_, _>>()
    };
    let secure_mx = match validating.lookup(domain, RecordType::MX).await {
        Answer::Found { records, secure } if records.is_empty() => {
            secure && validating.lookup(domain, RecordType::A).await.secure()
        }
        Answer::Found { secure, .. } => secure,
        Answer::Failed(e) => return all(HostDane::Unavailable(e)),
    };
    if !secure_mx {
        return all(HostDane::None);
    }
    let mut out = HashMap::new();
    for name in names {
        let state = if name.parse::<std::net::IpAddr>().is_ok()
            || !validating.lookup(name, RecordType::A).await.secure()
        {
            HostDane::None
        } else {
            match validating
                .lookup(&format!("_{port}._tcp.{name}"), RecordType::TLSA)
                .await
            {
                Answer::Found {
                    records,
                    secure: true,
                } if !records.is_empty() => {
                    let records: Vec<Tlsa> = records
                        .iter()
                        .filter_map(|r| match r {
                            RData::TLSA(t) => Some(Tlsa::from(t)),
                            _ => None,
                        })
                        .collect();
                    if records.iter().any(Tlsa::usable) {
                        HostDane::Authenticate(records)
                    } else {
                        HostDane::Encrypt
                    }
                }
                Answer::Found { .. } => HostDane::None,
                Answer::Failed(e) => HostDane::Unavailable(e),
            }
        };
        out.insert(name.to_owned(), state);
    }
    out
}

/// A session's TLS result for a TLS-RPT count: `success`, or the result type of a TLS
/// failure; `None` when it failed before TLS was a question (connect, greeting).
fn tls_result(opened: &Result<Upstream, UpstreamError>) -> Option<(&'static str, String)> {
    match opened {
        Ok(_) => Some(("success", String::new())),
        Err(UpstreamError::TlsNotOffered) => {
            Some(("starttls-not-supported", "STARTTLS not offered".to_owned()))
        }
        Err(e @ UpstreamError::Certificate { problem, .. }) => {
            Some((problem.result_type(), e.to_string()))
        }
        Err(e @ UpstreamError::Tls(_)) => Some(("validation-failure", e.to_string())),
        Err(_) => None,
    }
}

impl Forwarder {
    /// The destination TLS policy of a route delivering to `domain` by MX lookup, for its
    /// `candidates`: under an `enforce` MTA-STS policy only the hosts it lists (or that have
    /// DANE records) are kept; none left: `451 4.4.0` for the client, and nothing is tried.
    pub(crate) async fn leg_tls(
        &self,
        domain: &str,
        (mta_sts, use_dane): (bool, bool),
        port: u16,
        candidates: &mut Vec<Candidate>,
    ) -> Result<LegTls, Reply> {
        let sts = if mta_sts {
            self.settings.mta_sts.lookup(domain, &self.resolver).await
        } else {
            Found::Nothing
        };
        let dane = if use_dane {
            dane_hosts(&self.validating, domain, candidates, port).await
        } else {
            HashMap::new()
        };
        let leg = LegTls {
            domain: Arc::from(domain),
            sts,
            dane,
        };
        if let Found::Policy(policy) = &leg.sts
            && policy.mode == Mode::Enforce
        {
            candidates.retain(|c| leg.demand(&c.name) != HostTls::Sts(Demand::Unlisted));
            if candidates.is_empty() {
                self.tls_policy_result(
                    &leg,
                    false,
                    "-",
                    "validation-failure",
                    "no MX host is listed in the policy",
                );
                return Err(Reply::new(
                    451,
                    "4.7.5",
                    format!("no MX host of {domain} is listed in its MTA-STS policy (enforce)"),
                ));
            }
        }
        Ok(leg)
    }

    /// Counts one session's result under a destination's TLS policy (the data of a TLS-RPT
    /// report); a failure is logged with the MX host and why. `under_dane`: the session was
    /// under the host's TLSA records.
    fn tls_policy_result(
        &self,
        leg: &LegTls,
        under_dane: bool,
        host: &str,
        result: &'static str,
        detail: &str,
    ) {
        let (policy_type, mode) = match (&leg.sts, under_dane) {
            (_, true) => ("tlsa", "enforce"),
            (Found::Policy(p), false) if p.mode != Mode::None => ("sts", p.mode.as_str()),
            (Found::Unusable { .. }, false) => ("sts", "none"),
            _ => ("no-policy-found", "none"),
        };
        if result != "success" {
            tracing::warn!(domain = %leg.domain, mx_host = host, policy_type, mode, result, error = detail, "TLS policy failure");
        }
        self.metrics
            .tls_policy_results
            .get_or_create(&TlsPolicyLabels {
                domain: leg.domain.to_string(),
                policy_type,
                mode,
                result,
            })
            .inc();
    }

    /// Opens a connection to `candidate` as its destination's TLS policy asks: with DANE,
    /// TLS whose certificate matches the host's TLSA records (or, all unusable, any TLS);
    /// under `enforce`, TLS with a certificate valid for the listed host; under `testing`,
    /// that first, then as the route says when it fails (the failure counted).
    pub(crate) async fn open_under(
        &self,
        leg: &LegTls,
        runtime: &RouteRuntime,
        candidate: &Candidate,
        leg_requires_tls: bool,
    ) -> Result<Upstream, UpstreamError> {
        let name = candidate.name.as_str();
        let demand = leg.demand(name);
        let (connector, under_dane) = match &demand {
            HostTls::Dane(HostDane::Unavailable(e)) => {
                self.tls_policy_result(leg, true, name, "dnssec-invalid", e);
                return Err(UpstreamError::Protocol {
                    stage: "DANE",
                    detail: format!("TLSA records of {name}: {e}"),
                });
            }
            HostTls::Dane(HostDane::Authenticate(records)) => (
                dane::connector(
                    records.clone(),
                    vec![name.to_owned(), leg.domain.to_string()],
                )
                .map_err(|e| UpstreamError::Tls(format!("DANE TLS settings: {e}")))?,
                true,
            ),
            HostTls::Dane(_) => (
                mailroute_smtp_client::tls::connector(
                    mailroute_smtp_client::tls::Checks {
                        ca_signed: false,
                        hostname: false,
                    },
                    None,
                )
                .map_err(|e| UpstreamError::Tls(format!("TLS settings: {e}")))?,
                true,
            ),
            HostTls::Sts(Demand::Verified | Demand::Trial { listed: true }) => (
                self.settings
                    .mta_sts
                    .connector()
                    .map_err(|e| UpstreamError::Tls(format!("MTA-STS TLS settings: {e}")))?,
                false,
            ),
            HostTls::Sts(Demand::Trial { listed: false }) => {
                self.tls_policy_result(
                    leg,
                    false,
                    name,
                    "validation-failure",
                    "MX host not listed in the policy",
                );
                return self
                    .open_as_route(runtime, candidate, leg_requires_tls)
                    .await;
            }
            HostTls::Sts(Demand::Unlisted) => {
                return Err(UpstreamError::Protocol {
                    stage: "MTA-STS",
                    detail: format!("{name} is not listed in the policy"),
                });
            }
            HostTls::Sts(Demand::Nothing) => {
                let opened = self
                    .open_as_route(runtime, candidate, leg_requires_tls)
                    .await;
                let counted = match (&leg.sts, tls_result(&opened)) {
                    (_, None) => None,
                    (Found::Unusable { result, detail }, Some(_)) => {
                        Some((*result, detail.clone()))
                    }
                    (_, Some(session)) => Some(session),
                };
                if let Some((result, detail)) = counted {
                    self.tls_policy_result(leg, false, name, result, &detail);
                }
                return opened;
            }
        };
        let dial = route::dial(
            &runtime.route,
            candidate,
            &self.settings.hostname,
            TlsPlan::Required(connector),
            runtime.login.clone(),
        );
        let opened = Upstream::connect(&dial).await;
        if let Some((result, detail)) = tls_result(&opened) {
            self.tls_policy_result(leg, under_dane, name, result, &detail);
        }
        if opened.is_ok() || demand != HostTls::Sts(Demand::Trial { listed: true }) {
            return opened;
        }
        // NB: `testing`: the failure is counted, the mail goes as without a policy.
        self.open_as_route(runtime, candidate, leg_requires_tls)
            .await
    }
}
