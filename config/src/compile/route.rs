//! MailRoute -> [`Route`].

use super::{Object, Report, duration_ms, secret_value};
use crate::document::{
    Credentials, Destination, Host, HostPort, OAuth2Client, Pool, Route, RouteCredentials,
    RouteTimeouts, RouteTls, WeightedHostPort,
};
use crate::names::Domain;
use crate::resources::{KeyRef, MailRouteSpec, RouteOAuth2, TlsMode, WeightedHost};

/// Ports a route may use: the three mail ports and any unprivileged port.
pub(crate) fn port_allowed(port: u16) -> bool {
    matches!(port, 25 | 465 | 587) || port >= 1024
}

const MIN_PROBE_INTERVAL_MS: u64 = 10_000;
/// The longest an upstream may take after end of data: the relay answers its client within 5
/// minutes (SPEC section 5.2), so waiting longer could only end in a client timeout.
const MAX_DATA_END_MS: u64 = 5 * 60 * 1000;

pub(super) fn compile(
    object: &Object<MailRouteSpec>,
    inputs: &super::Inputs,
    report: &mut Report<'_>,
    credentials: &mut Credentials,
) -> Option<Route> {
    let spec = &object.spec;
    if !port_allowed(spec.port) {
        report.bad(
            "port",
            format!(
                "{} is not allowed: use 25, 465, 587 or 1024-65535",
                spec.port
            ),
        );
    }
    let destination = destination(spec, report);

    let (ca_default, hostname_default) = match spec.tls.mode {
        TlsMode::Required | TlsMode::Implicit => (true, true),
        TlsMode::Opportunistic | TlsMode::Disabled => (false, false),
    };
    let require_ca_signed = spec.tls.require_ca_signed.unwrap_or(ca_default);
    let validate_hostname = spec.tls.validate_hostname.unwrap_or(hostname_default);
    if spec.tls.mode == TlsMode::Disabled && (require_ca_signed || validate_hostname) {
        report.bad(
            "tls.mode",
            "Disabled cannot be combined with requireCASigned or validateHostname",
        );
    }
    if spec.tls.mode == TlsMode::Disabled && spec.tls.ca_bundle_secret_ref.is_some() {
        report.bad(
            "tls.caBundleSecretRef",
            "has no effect when tls.mode is Disabled",
        );
    }
    let ca_bundle = match &spec.tls.ca_bundle_secret_ref {
        Some(r) => match ca_bundle(inputs, r) {
            Ok(pem) => {
                credentials.ca_bundles.insert(object.name.clone(), pem);
                true
            }
            Err(why) => {
                report.bad("tls.caBundleSecretRef", why);
                false
            }
        },
        None => false,
    };

    let auth = match &spec.auth {
        Some(auth) => {
            if spec.tls.mode == TlsMode::Disabled {
                report.bad(
                    "auth",
                    "credentials would be sent in clear: tls.mode Disabled cannot be combined with auth",
                );
            }
            match (&auth.secret_ref, &auth.oauth2) {
                (Some(secret), None) => match password(inputs, &secret.name) {
                    Ok(account) => {
                        credentials.routes.insert(object.name.clone(), account);
                        true
                    }
                    Err(why) => {
                        report.bad("auth.secretRef", why);
                        false
                    }
                },
                (None, Some(oauth2)) => match oauth2_client(oauth2, inputs) {
                    Ok(client) => {
                        credentials.oauth2.insert(object.name.clone(), client);
                        true
                    }
                    Err((field, why)) => {
                        report.bad(format!("auth.oauth2.{field}"), why);
                        false
                    }
                },
                _ => {
                    report.bad("auth", "set exactly one of secretRef or oauth2");
                    false
                }
            }
        }
        None => false,
    };

    let helo_name = match &spec.helo_name {
        Some(name) => match name.parse::<Domain>() {
            Ok(domain)
                if domain.as_str() == "localhost" || domain.as_str().ends_with(".localhost") =>
            {
                report.bad(
                    "heloName",
                    "must not be localhost: upstreams refuse or distrust it",
                );
                None
            }
            Ok(domain) => Some(domain),
            Err(e) => {
                report.bad("heloName", format!("{name:?} {e}"));
                None
            }
        },
        None => None,
    };

    let mut ms = |field: &str, text: &str| match duration_ms(text) {
        Ok(0) => {
            report.bad(field, "must be longer than 0");
            0
        }
        Ok(ms) => ms,
        Err(why) => {
            report.bad(field, why);
            0
        }
    };
    let pool = Pool {
        max_connections: spec.connection_pool.max_connections,
        max_messages_per_connection: spec.connection_pool.max_messages_per_connection,
        idle_timeout_ms: ms(
            "connectionPool.idleTimeout",
            &spec.connection_pool.idle_timeout,
        ),
    };
    let timeouts = RouteTimeouts {
        connect_ms: ms("timeouts.connect", &spec.timeouts.connect),
        command_ms: ms("timeouts.command", &spec.timeouts.command),
        data_end_ms: ms("timeouts.dataEnd", &spec.timeouts.data_end),
    };
    let probe_interval_ms = ms("probeInterval", &spec.probe_interval);
    if timeouts.data_end_ms > MAX_DATA_END_MS {
        report.bad(
            "timeouts.dataEnd",
            "must be at most 5m: the relay answers its client within 5 minutes",
        );
    }
    if probe_interval_ms != 0 && probe_interval_ms < MIN_PROBE_INTERVAL_MS {
        report.bad("probeInterval", "must be at least 10s");
    }
    if pool.max_connections == 0 {
        report.bad("connectionPool.maxConnections", "must be at least 1");
    }
    if pool.max_messages_per_connection == 0 {
        report.bad(
            "connectionPool.maxMessagesPerConnection",
            "must be at least 1",
        );
    }

    if let Some(limits) = &spec.rate_limits
        && limits.per == crate::resources::RateLimitScope::Credential
        && spec.auth.is_none()
    {
        report.bad(
            "rateLimits.per",
            "Credential needs auth (the credential the limits are counted for)",
        );
    }

    Some(Route {
        destination: destination?,
        tls: RouteTls {
            mode: spec.tls.mode,
            require_ca_signed,
            validate_hostname,
            ca_bundle,
        },
        auth,
        helo_name,
        pool,
        timeouts,
        delivery: spec.delivery,
        probe_interval_ms,
        verify_recipients: spec.verify_recipients,
        rate_limits: spec
            .rate_limits
            .clone()
            .filter(|r| *r != Default::default()),
    })
}

fn destination(spec: &MailRouteSpec, report: &mut Report<'_>) -> Option<Destination> {
    match (&spec.host, &spec.hosts) {
        (Some(_), Some(_)) | (None, None) => {
            report.bad("host", "set exactly one of host or hosts");
            None
        }
        (Some(host), None) if let Some(mx) = &spec.mx_lookup => match host.parse::<Domain>() {
            Ok(domain) => Some(Destination::Mx {
                domain,
                port: spec.port,
                mta_sts: mx.mta_sts,
                dane: mx.dane,
            }),
            Err(e) => {
                report.bad("host", format!("{host:?} {e} (mxLookup needs a domain)"));
                None
            }
        },
        (Some(host), None) => match host.parse::<Host>() {
            Ok(host) => Some(Destination::Host(HostPort {
                host,
                port: spec.port,
            })),
            Err(e) => {
                report.bad("host", format!("{host:?} {e}"));
                None
            }
        },
        (None, Some(sets)) => {
            if spec.mx_lookup.is_some() {
                report.bad("mxLookup", "needs host (the domain to look up), not hosts");
            }
            let primary = weighted(&sets.primary, spec.port, "hosts.primary", report);
            let secondary = weighted(&sets.secondary, spec.port, "hosts.secondary", report);
            if sets.primary.is_empty() {
                report.bad("hosts.primary", "needs at least one host");
            } else if sets.primary.iter().all(|h| h.weight == 0) {
                report.bad(
                    "hosts.primary",
                    "every weight is 0: no host would receive mail",
                );
            }
            Some(Destination::HostSets { primary, secondary })
        }
    }
}

fn weighted(
    hosts: &[WeightedHost],
    default_port: u16,
    field: &str,
    report: &mut Report<'_>,
) -> Vec<WeightedHostPort> {
    let mut out = Vec::with_capacity(hosts.len());
    for (i, h) in hosts.iter().enumerate() {
        let port = h.port.unwrap_or(default_port);
        if !port_allowed(port) {
            report.bad(
                format!("{field}[{i}].port"),
                format!("{port} is not allowed: use 25, 465, 587 or 1024-65535"),
            );
        }
        match h.host.parse::<Host>() {
            Ok(host) => out.push(WeightedHostPort {
                host,
                port,
                weight: h.weight,
            }),
            Err(e) => report.bad(format!("{field}[{i}].host"), format!("{:?} {e}", h.host)),
        }
    }
    out
}

/// A password account from a Secret's `username` and `password` keys.
fn password(inputs: &super::Inputs, secret: &str) -> Result<RouteCredentials, String> {
    let key = |key: &str| KeyRef {
        name: secret.to_owned(),
        key: key.to_owned(),
    };
    Ok(RouteCredentials {
        username: text_secret(inputs, &key("username"))?,
        password: text_secret(inputs, &key("password"))?,
    })
}

/// An OAuth 2.0 client from `auth.oauth2` and its Secrets, or the field at fault and why.
fn oauth2_client(
    spec: &RouteOAuth2,
    inputs: &super::Inputs,
) -> Result<OAuth2Client, (&'static str, String)> {
    token_url(&spec.token_url).map_err(|why| ("tokenURL", why))?;
    let username = spec.username.trim();
    if username.is_empty() || username.chars().any(|c| c.is_control() || c == ' ') {
        return Err((
            "username",
            format!(
                "{:?} must be a mailbox name without spaces or control characters",
                spec.username
            ),
        ));
    }
    if let Some(scope) = spec.scopes.iter().find(|s| {
        s.is_empty()
            || s.chars()
                .any(|c| c.is_whitespace() || c == '"' || c == '\\')
    }) {
        return Err((
            "scopes",
            format!("{scope:?} is not one scope (no spaces, quotes or backslashes)"),
        ));
    }
    if spec.client_secret_secret_ref.is_none() && spec.refresh_token_secret_ref.is_none() {
        return Err((
            "clientSecretSecretRef",
            "set clientSecretSecretRef, refreshTokenSecretRef, or both".to_owned(),
        ));
    }
    let secret = |field: &'static str, r: &Option<KeyRef>| {
        r.as_ref()
            .map(|r| text_secret(inputs, r))
            .transpose()
            .map_err(|why| (field, why))
    };
    Ok(OAuth2Client {
        token_url: spec.token_url.clone(),
        username: username.to_owned(),
        client_id: text_secret(inputs, &spec.client_id_secret_ref)
            .map_err(|why| ("clientIDSecretRef", why))?,
        client_secret: secret("clientSecretSecretRef", &spec.client_secret_secret_ref)?,
        refresh_token: secret("refreshTokenSecretRef", &spec.refresh_token_secret_ref)?,
        scopes: spec.scopes.clone(),
        ca_bundle: spec
            .ca_bundle_secret_ref
            .as_ref()
            .map(|r| ca_bundle(inputs, r))
            .transpose()
            .map_err(|why| ("caBundleSecretRef", why))?,
    })
}

/// A token endpoint must be `https://HOST[:PORT]/...`: client secrets never go in clear.
fn token_url(url: &str) -> Result<(), String> {
    let Some(rest) = url.strip_prefix("https://") else {
        return Err(format!("{url:?} must be an https:// URL"));
    };
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    if authority.is_empty()
        || authority.contains('@')
        || url.chars().any(|c| c.is_whitespace() || c.is_control())
    {
        return Err(format!(
            "{url:?} must be https://HOST[:PORT]/PATH, without spaces or user information"
        ));
    }
    Ok(())
}

fn text_secret(inputs: &super::Inputs, r: &KeyRef) -> Result<String, String> {
    let bytes = secret_value(inputs, r)?;
    let text = std::str::from_utf8(bytes)
        .map_err(|_| format!("Secret {:?} key {:?} is not UTF-8 text", r.name, r.key))?;
    let text = text.trim_end_matches(['\r', '\n']);
    if text.is_empty() {
        return Err(format!("Secret {:?} key {:?} is empty", r.name, r.key));
    }
    Ok(text.to_owned())
}

fn ca_bundle(inputs: &super::Inputs, r: &KeyRef) -> Result<String, String> {
    let pem = text_secret(inputs, r)?;
    if !pem.contains("-----BEGIN CERTIFICATE-----") {
        return Err(format!(
            "Secret {:?} key {:?} holds no PEM certificate (-----BEGIN CERTIFICATE-----)",
            r.name, r.key
        ));
    }
    Ok(pem)
}
