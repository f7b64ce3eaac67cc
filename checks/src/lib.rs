//! Checks across Mailroute's programs, in `tests/`: the metrics the relay and the operator
//! export against the chart's Grafana dashboard and alert rules (SPEC 8). The crate exists so
//! that neither program depends on the other, even for a test.
