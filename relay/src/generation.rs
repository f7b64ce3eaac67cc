//! Turning a loaded configuration into a [`Generation`] the server can put in force: the
//! session's policy tables, the router, the forwarder, the quotas and the RCPT-time gate. The
//! shared stores (ledger, quota counts) outlive generations: counts and ledger entries carry
//! over a reload.

use crate::admission::Gate;
use crate::auth::accounts::Accounts;
use crate::auth::tokens::TokenKeys;
use crate::config_source::Loaded;
use crate::delivery::ledger::Ledger;
use crate::delivery::{self, Forwarder, SetupError};
use crate::metrics::Metrics;
use crate::quota::{QuotaStore, Quotas};
use crate::routing::Router;
use crate::server::Generation;
use crate::smtp::session::SessionConfig;
use crate::tenants::Tenants;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

/// What every generation is built with: the relay's settings and its shared stores.
pub struct Builder {
    /// Name in the greeting, `Received:` and EHLO to upstreams.
    pub hostname: String,
    /// A certificate is loaded: STARTTLS (and AUTH inside it) can be offered.
    pub tls_available: bool,
    pub max_message_size: usize,
    pub max_recipients: usize,
    pub ledger: Arc<dyn Ledger>,
    pub quota_store: Arc<dyn QuotaStore>,
    pub quota_hold: Duration,
    pub store_timeout: Duration,
    pub store_failure_open: bool,
    pub dns_server: Option<SocketAddr>,
    pub mx_port: u16,
    /// The copies' loop-marker key from `--loop-key-file`; without one, the credentials'
    /// `loopKey`, else a key of this process only (markers then verify only here).
    pub loop_key: Option<Arc<delivery::LoopKey>>,
    pub metrics: Arc<Metrics>,
    /// The cluster issuer's keys for service-account tokens (`--jwks-file`), if any.
    pub tokens: Option<Arc<TokenKeys>>,
    /// The memory budget for message content: one for the relay, whatever the generation.
    pub budget: Arc<crate::budget::Budget>,
    /// The routes' OAuth token clients: a route's token survives a reload that keeps its
    /// settings.
    pub token_clients: Arc<delivery::oauth::TokenClients>,
    /// MTA-STS policies: a domain's cached policy survives reloads.
    pub mta_sts: Arc<delivery::mta_sts::Policies>,
    /// Routes with `verifyRecipients` or `rateLimits` are asked at RCPT time; off only for
    /// `explain`, which contacts nothing.
    pub ask_upstreams: bool,
}

impl std::fmt::Debug for Builder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Builder")
            .field("hostname", &self.hostname)
            .finish_non_exhaustive()
    }
}

/// The parts of a generation, before it is sealed (tests reach into them).
pub struct Built {
    pub session: SessionConfig,
    pub forwarder: Arc<Forwarder>,
    pub gate: Arc<Gate>,
    pub accounts: Accounts,
    pub router: Arc<Router>,
}

impl std::fmt::Debug for Built {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Built")
            .field("session", &self.session)
            .finish_non_exhaustive()
    }
}

impl Built {
    pub fn into_generation(self, number: u64, hash: String) -> Generation {
        Generation {
            number,
            hash,
            session: Arc::new(self.session),
            deliver: self.forwarder,
            auth: Arc::new(self.accounts),
            admit: Some(self.gate),
        }
    }
}

impl Builder {
    /// A generation in force at once: numbered and hashed as the document says.
    pub fn generation(&self, loaded: &Loaded) -> Result<Generation, SetupError> {
        Ok(self
            .build(loaded)?
            .into_generation(loaded.document.generation, loaded.fingerprint()))
    }

    fn loop_key(&self, loaded: &Loaded) -> Arc<delivery::LoopKey> {
        static PROCESS: std::sync::OnceLock<Arc<delivery::LoopKey>> = std::sync::OnceLock::new();
        if let Some(key) = &self.loop_key {
            return Arc::clone(key);
        }
        match loaded.credentials.loop_key.as_deref() {
            Some(secret) if !secret.trim().is_empty() => {
                Arc::new(delivery::LoopKey::new(secret.as_bytes()))
            }
            _ => Arc::clone(PROCESS.get_or_init(|| {
                tracing::warn!("no loop key (--loop-key-file or the credentials' loopKey): copies from other replicas will carry markers this relay cannot verify");
                Arc::new(delivery::LoopKey::random())
            })),
        }
    }

    pub fn build(&self, loaded: &Loaded) -> Result<Built, SetupError> {
        let config = &loaded.document.config;
        let accounts = Accounts::from_credentials(&loaded.credentials)
            .with_service_accounts(config, self.tokens.clone());
        // NB: one tenant table per generation, shared by admission, routing and quotas.
        let tenants = Arc::new(Tenants::new(config));
        let router = Arc::new(Router::new(config, tenants));
        let forwarder = Arc::new(
            Forwarder::new(
                config,
                &loaded.credentials,
                Arc::clone(&router),
                Arc::clone(&self.ledger),
                delivery::Settings {
                    hostname: self.hostname.clone(),
                    store_failure_open: self.store_failure_open,
                    dns_server: self.dns_server,
                    mx_port: self.mx_port,
                    loop_key: self.loop_key(loaded),
                    token_clients: Arc::clone(&self.token_clients),
                    mta_sts: Arc::clone(&self.mta_sts),
                },
                Arc::clone(&self.metrics),
            )?
            .with_pacing(delivery::pacing::Pacing {
                store: Arc::clone(&self.quota_store),
                store_timeout: self.store_timeout,
                hold_ttl: self.quota_hold,
                store_failure_open: self.store_failure_open,
            }),
        );
        let mut quotas = Quotas::new(Arc::clone(&self.quota_store), Arc::clone(&self.metrics));
        quotas.hold_ttl = self.quota_hold;
        quotas.store_timeout = self.store_timeout;
        quotas.store_failure_open = self.store_failure_open;
        let gate = Arc::new(Gate::new(
            config,
            Arc::clone(&router),
            accounts.clone(),
            quotas,
            &forwarder,
            self.ask_upstreams,
        ));
        let mut session = SessionConfig::new(self.hostname.clone());
        session.check_recipients = true;
        session.budget = Arc::clone(&self.budget);
        session.tls_available = self.tls_available;
        // AUTH is only ever offered inside TLS, and only when some tenant has accounts or
        // service accounts (with the issuer's keys to check their tokens).
        session.bearer_available = self.tls_available && accounts.takes_bearer();
        session.auth_available =
            self.tls_available && (!accounts.is_empty() || accounts.takes_bearer());
        session.max_message_size = self.max_message_size;
        session.max_recipients = self.max_recipients;
        Ok(Built {
            session,
            forwarder,
            gate,
            accounts,
            router,
        })
    }
}
