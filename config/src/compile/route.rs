//! MailRoute -> [`Route`].

use super::{Object, Report, duration_ms, secret_value};
use crate::document::{
    Credentials, Destination, Host, HostPort, Pool, Route, RouteCredentials, RouteTimeouts,
    RouteTls, WeightedHostPort,
};
use crate::names::Domain;
use crate::resources::{KeyRef, MailRouteSpec, TlsMode, WeightedHost};

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
            let key = |key: &str| KeyRef {
                name: auth.secret_ref.name.clone(),
                key: key.to_owned(),
            };
            let username = text_secret(inputs, &key("username"));
            let password = text_secret(inputs, &key("password"));
            match (username, password) {
                (Ok(username), Ok(password)) => {
                    if spec.tls.mode == TlsMode::Disabled {
                        report.bad(
                            "auth",
                            "credentials would be sent in clear: tls.mode Disabled cannot be combined with auth",
                        );
                    }
                    credentials
                        .routes
                        .insert(object.name.clone(), RouteCredentials { username, password });
                    true
                }
                (Err(why), _) | (_, Err(why)) => {
                    report.bad("auth.secretRef", why);
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
        (Some(host), None) if spec.mx_lookup => match host.parse::<Domain>() {
            Ok(domain) => Some(Destination::Mx {
                domain,
                port: spec.port,
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
            if spec.mx_lookup {
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
