//! Delivery (SPEC 6.3-6.7): carries out a message's plan synchronously. Legs run concurrently
//! over pooled upstream connections, each route's TLS policy is enforced, copies are completed
//! only once the primary legs accepted, and the client's reply follows what the required
//! upstreams said within the reply bound. Deliveries that succeeded for a message the client
//! must retry are recorded in the ledger, so the retry re-sends only what failed.
//!
//! - [`run`]: the leg plan runner (one transaction: legs, the copies' hold, the bound).
//! - [`attempt`]: the host-by-host loop over pooled connections, shared by delivery and
//!   recipient verification; how a route is dialled.
//! - [`recipient_check`]: RCPT-time recipient verification with the primary route.
//! - [`outcome`]: the reply rules and the copies' rule (pure).
//! - [`pacing`]: a route's sending limits across replicas (`MailRoute.rateLimits`).
//! - [`signing`]: DKIM signatures of a tenant's own mail, made once before the legs.
//! - [`destination_tls`]: a destination's own TLS policy (DANE, MTA-STS) per MX host.
//! - [`mta_sts`]: MTA-STS policies of the domains delivered to by MX lookup.
//! - [`report`]: metrics and the transaction's log line.
//! - [`loop_marker`]: the copies' loop marker and its MAC.
//! - [`pool`]: connection reuse per route and host.
//! - [`ledger`]: the delivery ledger's keys (stored in `crate::store`).
//! - [`upstream`], [`hosts`], [`tls`]: the SMTP client (`mailroute-smtp-client`, shared with
//!   the operator's TLS probe).

pub mod attempt;
mod destination_tls;
pub mod ledger;
pub mod loop_marker;
pub mod mta_sts;
pub mod oauth;
pub mod outcome;
pub mod pacing;
pub mod pool;
pub mod recipient_check;
mod report;
mod run;
pub mod signing;

pub use crate::interfaces::BoxFuture;
pub use loop_marker::LoopKey;
pub use mailroute_smtp_client::{hosts, tls, upstream};
pub use recipient_check::VERIFY_TIMEOUT;

use crate::interfaces::{Deliver, Transaction};
use crate::metrics::Metrics;
use crate::reply::Reply;
use crate::routing::{Router, Target};
use hosts::Resolver;
use ledger::Ledger;
use mailroute_config::document::{Destination, Pool as PoolConfig, Route, RouteTimeouts, RouteTls};
use mailroute_config::resources::{DeliveryMode, TlsMode};
use mailroute_config::{Credentials, RelayConfig};
use mailroute_smtp_client::bearer::Login;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;
use tokio_rustls::TlsConnector;

/// Relay-wide delivery settings.
#[derive(Clone, Debug)]
pub struct Settings {
    /// EHLO name for routes without `heloName`, and the loop marker's relay name.
    pub hostname: String,
    /// `--store-failure open`: when the ledger cannot be read, deliver anyway.
    pub store_failure_open: bool,
    /// Name server for MX and host lookups (default: the system's).
    pub dns_server: Option<std::net::SocketAddr>,
    /// Port of direct (MX) delivery: 25, except in test setups.
    pub mx_port: u16,
    /// The loop marker's key (`--loop-key-file`, else the credentials' `loopKey`).
    pub loop_key: Arc<LoopKey>,
    /// The routes' OAuth token clients, kept across generations.
    pub token_clients: Arc<oauth::TokenClients>,
    /// MTA-STS policies of the domains of routes with `mxLookup.mtaSts`, kept across
    /// generations.
    pub mta_sts: Arc<mta_sts::Policies>,
}

/// Why delivery could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("DNS resolver: {0}")]
    Resolver(String),
}

/// Where routes with `auth.oauth2` get their token clients.
struct Tokens<'a> {
    clients: &'a oauth::TokenClients,
    metrics: &'a Arc<Metrics>,
}

/// One route, ready to use.
pub(crate) struct RouteRuntime {
    name: Arc<str>,
    route: Route,
    connector: Result<TlsConnector, String>,
    login: Option<Login>,
    /// The route's `rateLimits`, with what they are counted for.
    pace: Option<pacing::Paced>,
    permits: Arc<Semaphore>,
}

impl RouteRuntime {
    fn new(name: &str, route: Route, credentials: &Credentials, tokens: &Tokens<'_>) -> Self {
        let connector = mailroute_smtp_client::route::connector(
            &route,
            credentials.ca_bundles.get(name).map(String::as_str),
        )
        .map_err(|e| e.to_string());
        let login = match (credentials.routes.get(name), credentials.oauth2.get(name)) {
            (Some(account), _) => Some(Login::Password {
                username: account.username.clone(),
                password: account.password.clone(),
            }),
            (None, Some(oauth2)) => Some(Login::Bearer {
                username: oauth2.username.clone(),
                tokens: tokens.clients.client(name, oauth2, tokens.metrics),
            }),
            (None, None) => None,
        };
        let permits = Arc::new(Semaphore::new(route.pool.max_connections.max(1) as usize));
        let pace = route
            .rate_limits
            .as_ref()
            .map(|limits| pacing::Paced::new(name, limits, login.as_ref().map(Login::username)));
        Self {
            name: Arc::from(name),
            route,
            connector,
            login,
            pace,
            permits,
        }
    }

    fn limits(&self) -> pool::Limits {
        pool::Limits {
            max_messages: self.route.pool.max_messages_per_connection.max(1),
            idle_timeout: Duration::from_millis(self.route.pool.idle_timeout_ms),
        }
    }
}

/// Direct delivery's settings (no MailRoute): port 25, opportunistic TLS, Internet-sized
/// timeouts. The destination is a placeholder: MX targets are resolved per recipient domain.
fn mx_route() -> Route {
    Route {
        destination: Destination::Host(mailroute_config::document::HostPort {
            host: mailroute_config::document::Host::Ip(std::net::Ipv4Addr::UNSPECIFIED.into()),
            port: 25,
        }),
        tls: RouteTls {
            mode: TlsMode::Opportunistic,
            require_ca_signed: false,
            validate_hostname: false,
            ca_bundle: false,
        },
        auth: false,
        helo_name: None,
        pool: PoolConfig {
            max_connections: 200,
            max_messages_per_connection: 100,
            idle_timeout_ms: 30_000,
        },
        timeouts: RouteTimeouts {
            connect_ms: 30_000,
            command_ms: 300_000,
            data_end_ms: 600_000,
        },
        delivery: DeliveryMode::Required,
        probe_interval_ms: 0,
        verify_recipients: false,
        rate_limits: None,
    }
}

/// Delivers messages as the configuration says. Implements [`Deliver`].
pub struct Forwarder {
    router: Arc<Router>,
    routes: HashMap<Arc<str>, RouteRuntime>,
    mx: RouteRuntime,
    pool: pool::Pool,
    resolver: Resolver,
    /// Where DANE's DNSSEC-validated answers come from (the same name server).
    validating: mailroute_smtp_client::dnssec::Validating,
    ledger: Arc<dyn Ledger>,
    /// Where routes with `rateLimits` count (none: their limits are not kept).
    pacing: Option<pacing::Pacing>,
    /// The tenants' DKIM keys.
    signers: signing::Signers,
    settings: Settings,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for Forwarder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Forwarder")
            .field("routes", &self.routes.keys().collect::<Vec<_>>())
            .field("settings", &self.settings)
            .finish()
    }
}

impl Forwarder {
    pub fn new(
        config: &RelayConfig,
        credentials: &Credentials,
        router: Arc<Router>,
        ledger: Arc<dyn Ledger>,
        settings: Settings,
        metrics: Arc<Metrics>,
    ) -> Result<Self, SetupError> {
        let tokens = Tokens {
            clients: &settings.token_clients,
            metrics: &metrics,
        };
        let routes = config
            .routes
            .iter()
            .map(|(name, route)| {
                let runtime = RouteRuntime::new(name, route.clone(), credentials, &tokens);
                if let Err(e) = &runtime.connector {
                    tracing::warn!(route = %name, error = %e, "route TLS settings unusable; its TLS legs will be deferred");
                }
                (Arc::clone(&runtime.name), runtime)
            })
            .collect();
        let (signers, unusable) = signing::Signers::new(config, credentials);
        for e in &unusable {
            tracing::error!(error = %e, "DKIM key not usable; mail of its domain is sent without its signature");
        }
        Ok(Self {
            router,
            routes,
            signers,
            mx: RouteRuntime::new("mx", mx_route(), &Credentials::default(), &tokens),
            pool: pool::Pool::default(),
            resolver: Resolver::new(settings.dns_server).map_err(SetupError::Resolver)?,
            validating: mailroute_smtp_client::dnssec::Validating::new(settings.dns_server),
            ledger,
            pacing: None,
            settings,
            metrics,
        })
    }

    /// Keeps the routes' `rateLimits` in `pacing`'s store.
    pub fn with_pacing(mut self, pacing: pacing::Pacing) -> Self {
        self.pacing = Some(pacing);
        self
    }

    /// Idle upstream connections (for tests).
    pub fn idle_connections(&self) -> usize {
        self.pool.idle_count()
    }

    /// Closes connections idle longer than their route allows; call periodically.
    pub fn sweep(&self) {
        self.pool.sweep(|route| {
            self.routes
                .get(route)
                .unwrap_or(&self.mx)
                .limits()
                .idle_timeout
        });
    }

    fn runtime(&self, target: &Target) -> Option<&RouteRuntime> {
        match target {
            Target::Route(name) => self.routes.get(name),
            Target::Mx(_) => Some(&self.mx),
        }
    }
}

impl Deliver for Forwarder {
    fn deliver(
        self: Arc<Self>,
        transaction: Transaction,
        deadline: Instant,
    ) -> BoxFuture<'static, Reply> {
        Box::pin(run::forward(self, transaction, deadline))
    }

    fn sweep(&self) {
        Forwarder::sweep(self);
    }

    fn observe(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            let Some(pacing) = &self.pacing else {
                return;
            };
            for (name, runtime) in &self.routes {
                if let Some(paced) = &runtime.pace {
                    pacing.observe(name, paced, &self.metrics).await;
                }
            }
        })
    }
}
