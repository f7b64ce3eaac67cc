//! MTA-STS (RFC 8461) for routes that deliver by MX lookup with `mxLookup.mtaSts`.
//!
//! The domain's `_mta-sts` TXT record says that a policy exists and names its version (`id`);
//! the policy is fetched over HTTPS from `mta-sts.<domain>` (certificate checked against the
//! trust roots, no redirects, at most 64 KiB, `text/plain`) and cached for its `max_age`. It is
//! fetched again when the TXT id changes. A cached policy outlives an outage of the policy
//! server or of the TXT record until its `max_age` ends (RFC 8461 section 5.1); a domain whose
//! policy cannot be had and is not cached gets mail as without one (section 5), counted.
//!
//! What a policy asks of each MX host is [`Policy::demand`] (pure); the connection is made
//! as it says in `attempt`.

use super::hosts::Resolver;
use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use rustls::ClientConfig;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_rustls::TlsConnector;

/// Largest policy read (RFC 8461 section 3.3 suggests 64 KiB).
pub const MAX_POLICY: usize = 64 * 1024;
/// Longest a fetch (connect, TLS, request, body) may take.
const FETCH_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest `max_age` a policy may give (RFC 8461 section 3.2: about a year).
const MAX_AGE_LIMIT: u64 = 31_557_600;

/// A policy's mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Enforce,
    Testing,
    None,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Enforce => "enforce",
            Mode::Testing => "testing",
            Mode::None => "none",
        }
    }
}

/// A domain's MTA-STS policy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    /// The TXT record's id this policy was fetched for.
    pub id: String,
    pub mode: Mode,
    /// MX host patterns: names, or `*.` and a domain (one leftmost label).
    pub mx: Vec<String>,
    pub max_age: Duration,
}

/// What a policy asks of the connection to one MX host.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Demand {
    /// Nothing (mode `none`).
    Nothing,
    /// TLS with a certificate valid for the host's name, else no delivery (`enforce`).
    Verified,
    /// The host is not listed: not used (`enforce`).
    Unlisted,
    /// Delivered as without a policy; whether TLS with a valid certificate for a listed host
    /// would have worked is counted (`testing`).
    Trial { listed: bool },
}

impl Policy {
    /// Reads a policy file (RFC 8461 section 3.2): `key: value` lines, `version: STSv1`
    /// first, `mode`, `max_age`, and `mx` lines (at least one unless the mode is `none`);
    /// unknown keys are ignored.
    pub fn parse(id: &str, text: &str) -> Result<Self, String> {
        let mut version = None;
        let mut mode = None;
        let mut max_age = None;
        let mut mx = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim_end_matches('\r');
            if line.trim().is_empty() {
                continue;
            }
            let Some((key, value)) = line.split_once(':') else {
                return Err(format!("line {}: not `key: value`", n + 1));
            };
            let value = value.trim();
            match key.trim() {
                "version" if n == 0 || version.is_none() => version = Some(value.to_owned()),
                "mode" => {
                    mode = Some(match value {
                        "enforce" => Mode::Enforce,
                        "testing" => Mode::Testing,
                        "none" => Mode::None,
                        other => {
                            return Err(format!("mode {other:?} is not enforce, testing or none"));
                        }
                    })
                }
                "max_age" => {
                    let seconds: u64 = value
                        .parse()
                        .ok()
                        .filter(|s| *s <= MAX_AGE_LIMIT)
                        .ok_or_else(|| format!("max_age {value:?} is not 0-{MAX_AGE_LIMIT}"))?;
                    max_age = Some(Duration::from_secs(seconds));
                }
                "mx" => mx.push(value.trim_end_matches('.').to_ascii_lowercase()),
                _ => {}
            }
        }
        if version.as_deref() != Some("STSv1") {
            return Err("no `version: STSv1` line".to_owned());
        }
        let mode = mode.ok_or("no mode")?;
        let max_age = max_age.ok_or("no max_age")?;
        if mx.is_empty() && mode != Mode::None {
            return Err("no mx line".to_owned());
        }
        Ok(Self {
            id: id.to_owned(),
            mode,
            mx,
            max_age,
        })
    }

    /// Whether `host` matches one of the `mx` patterns (RFC 8461 section 4.1: a wildcard
    /// stands for exactly one leftmost label).
    pub fn lists(&self, host: &str) -> bool {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        self.mx
            .iter()
            .any(|pattern| match pattern.strip_prefix("*.") {
                Some(parent) => host
                    .split_once('.')
                    .is_some_and(|(label, rest)| !label.is_empty() && rest == parent),
                None => *pattern == host,
            })
    }

    /// What the policy asks of the connection to `host`.
    pub fn demand(&self, host: &str) -> Demand {
        match self.mode {
            Mode::None => Demand::Nothing,
            Mode::Enforce if self.lists(host) => Demand::Verified,
            Mode::Enforce => Demand::Unlisted,
            Mode::Testing => Demand::Trial {
                listed: self.lists(host),
            },
        }
    }
}

/// The policy's id from a domain's `_mta-sts` TXT records: `None` when none is an MTA-STS
/// record; an error when there are several (RFC 8461 section 3.1) or the one is malformed.
pub fn announced(records: &[String]) -> Result<Option<String>, String> {
    use mail_auth::common::parse::TxtRecordParser;
    let sts: Vec<&String> = records
        .iter()
        .filter(|r| r.trim_start().starts_with("v=STSv1"))
        .collect();
    match sts.as_slice() {
        [] => Ok(None),
        [one] => mail_auth::mta_sts::MtaSts::parse(one.as_bytes())
            .map(|r| Some(r.id))
            .map_err(|e| format!("TXT record {one:?}: {e}")),
        _ => Err(format!("{} MTA-STS TXT records", sts.len())),
    }
}

/// What was found for a domain.
#[derive(Clone, Debug)]
pub enum Found {
    /// The domain has no policy (no TXT record, nothing cached).
    Nothing,
    Policy(Arc<Policy>),
    /// A policy is announced but could not be had and none is cached: mail goes as without
    /// one (RFC 8461 section 5); `result` is the TLS-RPT result type.
    Unusable {
        result: &'static str,
        detail: String,
    },
}

struct Cached {
    policy: Arc<Policy>,
    until: Instant,
}

/// The relay's MTA-STS policies, kept across configuration generations.
pub struct Policies {
    /// Port of the policy servers: 443, except in test setups.
    port: u16,
    tls: Result<Arc<ClientConfig>, String>,
    cache: Mutex<HashMap<String, Cached>>,
    /// One fetch per domain at a time; the others wait and find it cached.
    fetching: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl std::fmt::Debug for Policies {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Policies")
            .field("port", &self.port)
            .finish()
    }
}

impl Policies {
    /// Policies fetched from `port` with certificates checked against the system's roots and
    /// `roots` (extra PEM certificates).
    pub fn new(port: u16, roots: Option<&str>) -> Self {
        let tls = super::tls::client_config(
            super::tls::Checks {
                ca_signed: true,
                hostname: true,
            },
            roots,
        )
        .map(Arc::new)
        .map_err(|e| e.to_string());
        Self {
            port,
            tls,
            cache: Mutex::default(),
            fetching: Mutex::default(),
        }
    }

    /// The TLS settings MX hosts are checked with under an `enforce` policy (the same trust
    /// as the policy servers').
    pub fn connector(&self) -> Result<TlsConnector, String> {
        self.tls.clone().map(TlsConnector::from)
    }

    fn cached(&self, domain: &str) -> Option<Arc<Policy>> {
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        match cache.get(domain) {
            Some(c) if Instant::now() < c.until => Some(Arc::clone(&c.policy)),
            Some(_) => {
                cache.remove(domain);
                None
            }
            None => None,
        }
    }

    /// The policy in force for `domain`.
    pub async fn lookup(&self, domain: &str, resolver: &Resolver) -> Found {
        let domain = domain.trim_end_matches('.').to_ascii_lowercase();
        let cached = self.cached(&domain);
        let keep = |found: Found| cached.clone().map_or(found, Found::Policy);
        let id = match resolver.txt(&format!("_mta-sts.{domain}")).await {
            Ok(records) => match announced(&records) {
                Ok(Some(id)) => id,
                Ok(None) => return keep(Found::Nothing),
                Err(detail) => {
                    return keep(Found::Unusable {
                        result: "sts-policy-invalid",
                        detail,
                    });
                }
            },
            Err(e) => {
                tracing::info!(domain = %domain, error = %e, "MTA-STS TXT lookup failed");
                return keep(Found::Nothing);
            }
        };
        if let Some(policy) = &cached
            && policy.id == id
        {
            return Found::Policy(Arc::clone(policy));
        }
        let lock = {
            let mut fetching = self.fetching.lock().unwrap_or_else(|e| e.into_inner());
            Arc::clone(fetching.entry(domain.clone()).or_default())
        };
        let _fetching = lock.lock().await;
        if let Some(policy) = self.cached(&domain)
            && policy.id == id
        {
            return Found::Policy(policy);
        }
        let fetched = tokio::time::timeout(FETCH_TIMEOUT, self.fetch(&domain, resolver))
            .await
            .unwrap_or_else(|_| {
                Err((
                    "sts-policy-fetch-error",
                    format!("no policy within {}s", FETCH_TIMEOUT.as_secs()),
                ))
            })
            .and_then(|text| Policy::parse(&id, &text).map_err(|e| ("sts-policy-invalid", e)));
        match fetched {
            Ok(policy) => {
                tracing::info!(domain = %domain, id = %policy.id, mode = policy.mode.as_str(), max_age = policy.max_age.as_secs(), "MTA-STS policy fetched");
                let policy = Arc::new(policy);
                self.cache.lock().unwrap_or_else(|e| e.into_inner()).insert(
                    domain,
                    Cached {
                        policy: Arc::clone(&policy),
                        until: Instant::now() + policy.max_age,
                    },
                );
                Found::Policy(policy)
            }
            Err((result, detail)) => {
                tracing::warn!(domain = %domain, result, error = %detail, cached = cached.is_some(), "MTA-STS policy could not be fetched");
                keep(Found::Unusable { result, detail })
            }
        }
    }

    /// `GET https://mta-sts.<domain>/.well-known/mta-sts.txt`: the body of a `200` with a
    /// `text/plain` type. Errors carry their TLS-RPT result type.
    async fn fetch(
        &self,
        domain: &str,
        resolver: &Resolver,
    ) -> Result<String, (&'static str, String)> {
        let fetch_error = |e: String| ("sts-policy-fetch-error", e);
        let host = format!("mta-sts.{domain}");
        let tls = self.tls.clone().map_err(fetch_error)?;
        let addresses = resolver
            .host(&host, self.port)
            .await
            .map_err(|e| fetch_error(e.to_string()))?;
        let mut tcp = None;
        let mut last = String::from("no address");
        for candidate in &addresses {
            match tokio::net::TcpStream::connect(candidate.addr).await {
                Ok(stream) => {
                    tcp = Some(stream);
                    break;
                }
                Err(e) => last = format!("connect to {}: {e}", candidate.addr),
            }
        }
        let tcp = tcp.ok_or_else(|| fetch_error(format!("{host}: {last}")))?;
        let name = super::tls::server_name(&host)
            .ok_or_else(|| fetch_error(format!("{host:?} is not a TLS server name")))?;
        let stream = TlsConnector::from(tls)
            .connect(name, tcp)
            .await
            .map_err(|e| {
                let result = match super::tls::CertificateProblem::of(&e) {
                    Some(_) => "sts-webpki-invalid",
                    None => "sts-policy-fetch-error",
                };
                (result, format!("{host}: {e}"))
            })?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| fetch_error(format!("{host}: {e}")))?;
        let driver = tokio::spawn(connection);
        let request = http::Request::get("/.well-known/mta-sts.txt")
            .header(http::header::HOST, &host)
            .body(Empty::<Bytes>::new())
            .map_err(|e| fetch_error(e.to_string()))?;
        let answer = async {
            let response = sender
                .send_request(request)
                .await
                .map_err(|e| fetch_error(format!("{host}: {e}")))?;
            // NB: redirects are not followed (RFC 8461 section 3.3).
            if response.status() != http::StatusCode::OK {
                return Err(fetch_error(format!(
                    "{host} answered {}",
                    response.status().as_u16()
                )));
            }
            let plain = response
                .headers()
                .get(http::header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| {
                    v.trim_start()
                        .to_ascii_lowercase()
                        .starts_with("text/plain")
                });
            if !plain {
                return Err((
                    "sts-policy-invalid",
                    format!("{host}: the policy is not served as text/plain"),
                ));
            }
            let body = Limited::new(response.into_body(), MAX_POLICY)
                .collect()
                .await
                .map_err(|e| fetch_error(format!("{host}: reading the policy: {e}")))?
                .to_bytes();
            String::from_utf8(body.to_vec())
                .map_err(|_| ("sts-policy-invalid", format!("{host}: not UTF-8")))
        }
        .await;
        driver.abort();
        answer
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(text: &str) -> Result<Policy, String> {
        Policy::parse("20260101", text)
    }

    #[test]
    fn the_rfc_example_policy_reads() {
        let p = policy(
            "version: STSv1\r\nmode: enforce\r\nmx: mail.example.com\r\nmx: *.example.net\r\nmx: backupmx.example.com\r\nmax_age: 604800\r\n",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(p.mode, Mode::Enforce);
        assert_eq!(p.max_age, Duration::from_secs(604_800));
        assert_eq!(p.mx.len(), 3);
        assert!(p.lists("mail.example.com"));
        assert!(p.lists("MX1.example.NET."));
        assert!(!p.lists("a.b.example.net"), "a wildcard is one label");
        assert!(!p.lists("example.net"));
        assert!(!p.lists("evil-mail.example.com"));
        assert_eq!(p.demand("mail.example.com"), Demand::Verified);
        assert_eq!(p.demand("other.example.org"), Demand::Unlisted);
    }

    #[test]
    fn malformed_policies_are_refused() {
        for (text, why) in [
            ("mode: enforce\nmx: a.example\nmax_age: 60\n", "version"),
            ("version: STSv1\nmode: enforce\nmax_age: 60\n", "no mx"),
            ("version: STSv1\nmode: strict\nmx: a\nmax_age: 60\n", "mode"),
            (
                "version: STSv1\nmode: testing\nmx: a\nmax_age: 99999999999\n",
                "max_age",
            ),
            ("version: STSv1\nmode: testing\nmx: a\n", "no max_age"),
            ("version: STSv1\nmode testing\n", "key: value"),
        ] {
            let e = policy(text).err().unwrap_or_default();
            assert!(e.contains(why), "{text:?}: {e}");
        }
        let none = policy("version: STSv1\nmode: none\nmax_age: 86400\n");
        assert_eq!(none.map(|p| p.demand("any.example")), Ok(Demand::Nothing));
    }

    #[test]
    fn the_txt_record_names_the_policy_id() {
        let txt = |r: &[&str]| announced(&r.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>());
        assert_eq!(
            txt(&["v=STSv1; id=20160831085700Z;"]),
            Ok(Some("20160831085700Z".into()))
        );
        assert_eq!(txt(&["v=spf1 -all"]), Ok(None));
        assert!(txt(&["v=STSv1; id=a;", "v=STSv1; id=b;"]).is_err());
    }
}
