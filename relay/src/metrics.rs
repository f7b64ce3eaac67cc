//! The relay's Prometheus metrics (SPEC section 8). Label values come from closed sets
//! (listener kinds, yes/no), never from client input.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// Labels of `mailroute_relay_sessions_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SessionLabels {
    pub listener: String,
    /// `yes` when the session ended inside TLS.
    pub tls: String,
}

/// Every relay metric.
#[derive(Debug, Default)]
pub struct Metrics {
    pub sessions_active: Gauge,
    pub sessions: Family<SessionLabels, Counter>,
    pub bytes_received: Counter,
    pub config_generation: Gauge,
}

impl Metrics {
    /// Creates the metrics and registers them.
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = Self::default();
        registry.register(
            "mailroute_relay_sessions_active",
            "SMTP sessions open now",
            metrics.sessions_active.clone(),
        );
        registry.register(
            "mailroute_relay_sessions",
            "SMTP sessions ended, by listener and whether TLS was in use",
            metrics.sessions.clone(),
        );
        registry.register(
            "mailroute_relay_bytes_received",
            "Octets received from SMTP clients",
            metrics.bytes_received.clone(),
        );
        registry.register(
            "mailroute_relay_config_generation",
            "Generation of the relay configuration in force",
            metrics.config_generation.clone(),
        );
        metrics
    }
}
