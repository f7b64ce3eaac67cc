//! How a compiled route is dialled: the one mapping from a route's settings (TLS policy,
//! certificate checks, EHLO name, timeouts) to a [`Dial`], used by the relay's delivery and by
//! the operator's TLS probe, so the probe meets exactly what a delivery would.

use crate::bearer::Login;
use crate::hosts::Candidate;
use crate::tls::{self, Checks, TlsSetupError};
use crate::upstream::{Dial, TlsPlan, UpstreamError};
use mailroute_config::document::Route;
use mailroute_config::resources::TlsMode;
use std::time::Duration;
use tokio_rustls::TlsConnector;

/// The TLS connector for a route: its certificate checks, plus its CA bundle when it has one.
pub fn connector(route: &Route, ca_bundle: Option<&str>) -> Result<TlsConnector, TlsSetupError> {
    let checks = Checks {
        ca_signed: route.tls.require_ca_signed,
        hostname: route.tls.validate_hostname,
    };
    tls::connector(checks, ca_bundle)
}

/// The TLS a connection for this route must have (SPEC 3.1 `tls`, and a rule's `requireTLS`
/// as `requires_tls`): the one place a route's TLS policy is decided. A connector that could
/// not be built fails a connection that needs TLS and leaves an opportunistic one in clear.
pub fn tls_plan(
    mode: TlsMode,
    requires_tls: bool,
    connector: &Result<TlsConnector, String>,
    route: &str,
) -> Result<TlsPlan, UpstreamError> {
    let connector = || {
        connector
            .clone()
            .map_err(|e| UpstreamError::Tls(format!("TLS settings of route {route}: {e}")))
    };
    Ok(match (mode, requires_tls) {
        (TlsMode::Implicit, _) => TlsPlan::Implicit(connector()?),
        (TlsMode::Required, _) | (_, true) => TlsPlan::Required(connector()?),
        (TlsMode::Opportunistic, false) => match connector() {
            Ok(c) => TlsPlan::Opportunistic(c),
            Err(_) => TlsPlan::Off,
        },
        (TlsMode::Disabled, false) => TlsPlan::Off,
    })
}

/// How one host of `route` is dialled: its `heloName` (else `default_helo`), its timeouts,
/// the given TLS plan and upstream login.
pub fn dial(
    route: &Route,
    candidate: &Candidate,
    default_helo: &str,
    tls: TlsPlan,
    login: Option<Login>,
) -> Dial {
    Dial {
        addr: candidate.addr,
        host: candidate.name.clone(),
        helo: route
            .helo_name
            .as_ref()
            .map_or_else(|| default_helo.to_owned(), ToString::to_string),
        tls,
        login,
        connect_timeout: Duration::from_millis(route.timeouts.connect_ms),
        command_timeout: Duration::from_millis(route.timeouts.command_ms),
    }
}
