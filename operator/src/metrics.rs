//! The operator's Prometheus metrics (SPEC 8), served on `--admin` with `/healthz` and
//! `/readyz`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

/// Labels of `mailroute_operator_reconciles_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    /// `success` or `error`.
    pub result: String,
}

/// Labels of `mailroute_route_tls_probe_success`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    /// The MailRoute's namespace.
    pub namespace: String,
    /// The MailRoute's name: the relay's `route` label for the same route, so panels and
    /// alerts join the two programs' series on it.
    pub route: String,
}

impl RouteLabels {
    /// The labels of MailRoute `namespace/name`.
    pub fn of(namespace: &str, name: &str) -> Self {
        Self {
            namespace: namespace.to_owned(),
            route: name.to_owned(),
        }
    }
}

/// Labels of the per-namespace gauges.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct NamespaceLabels {
    pub namespace: String,
}

#[derive(Debug)]
pub struct Metrics {
    pub reconciles: Family<ResultLabels, Counter>,
    pub reconcile_duration: Histogram,
    /// The generation published per namespace.
    pub generation: Family<NamespaceLabels, Gauge>,
    /// Resources left out of the document per namespace.
    pub invalid_resources: Family<NamespaceLabels, Gauge>,
    /// 1 while this replica holds the Lease (or runs without election).
    pub leader: Gauge,
    /// 1 when the route's last TLS probe verified, else 0.
    pub route_tls_probe_success: Family<RouteLabels, Gauge>,
    /// When the certificate the route's last probe saw expires (Unix seconds).
    pub route_tls_certificate_expiry: Family<RouteLabels, Gauge>,
}

impl Metrics {
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = Self {
            reconciles: Family::default(),
            reconcile_duration: Histogram::new([
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ]),
            generation: Family::default(),
            invalid_resources: Family::default(),
            leader: Gauge::default(),
            route_tls_probe_success: Family::default(),
            route_tls_certificate_expiry: Family::default(),
        };
        mailroute_admin::register_build_info(registry, "operator", env!("CARGO_PKG_VERSION"));
        registry.register(
            "mailroute_operator_reconciles",
            "Namespace reconcile passes, by result",
            metrics.reconciles.clone(),
        );
        registry.register_with_unit(
            "mailroute_operator_reconcile_duration",
            "Time of one namespace reconcile pass",
            Unit::Seconds,
            metrics.reconcile_duration.clone(),
        );
        registry.register(
            "mailroute_operator_config_generation",
            "Generation of the relay document published, by namespace",
            metrics.generation.clone(),
        );
        registry.register(
            "mailroute_operator_invalid_resources",
            "Resources left out of the relay document, by namespace",
            metrics.invalid_resources.clone(),
        );
        registry.register(
            "mailroute_operator_leader",
            "1 while this replica is the one writing",
            metrics.leader.clone(),
        );
        registry.register(
            "mailroute_route_tls_probe_success",
            "1 when the route's last TLS probe (EHLO, STARTTLS, certificate checks) succeeded",
            metrics.route_tls_probe_success.clone(),
        );
        registry.register(
            "mailroute_route_tls_certificate_expiry_timestamp_seconds",
            "When the certificate seen by the route's last TLS probe expires",
            metrics.route_tls_certificate_expiry.clone(),
        );
        metrics
    }
}
