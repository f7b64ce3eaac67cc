//! The metrics both programs export, the chart's Grafana dashboard and its alert rules, checked
//! together: every metric a panel or an alert queries is one the relay or the operator
//! exports (SPEC 8), the dashboard is a loadable Grafana dashboard, every name SPEC 8 lists is
//! exported, and `promtool check metrics` accepts both `/metrics` outputs.

use prometheus_client::registry::Registry;
use std::collections::BTreeSet;
use std::path::Path;

fn chart(path: &str) -> String {
    let full = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../charts/mailroute")
        .join(path);
    std::fs::read_to_string(&full).unwrap_or_else(|e| panic!("{}: {e}", full.display()))
}

/// Both programs' `/metrics` text, with a sample in every family (an empty family prints
/// nothing, not even its `# TYPE`).
fn exposition() -> (String, String) {
    use mailroute_relay::metrics as r;
    let mut relay_registry = Registry::default();
    let relay = r::Metrics::register(&mut relay_registry);
    let s = String::from;
    relay
        .sessions
        .get_or_create(&r::SessionLabels {
            listener: s("smtp"),
            tls: s("no"),
        })
        .inc();
    let traffic = r::TrafficLabels {
        tenant: s("t"),
        direction: s("outbound"),
        outcome: s("delivered"),
    };
    relay.messages.get_or_create(&traffic).inc();
    relay.recipients.get_or_create(&traffic).inc();
    relay
        .delivery_duration
        .get_or_create(&r::RouteLabels { route: s("r") })
        .observe(0.01);
    relay
        .upstream_replies
        .get_or_create(&r::UpstreamLabels {
            route: s("r"),
            class: s("2xx"),
        })
        .inc();
    relay
        .rule_matches
        .get_or_create(&r::RuleLabels {
            tenant: s("t"),
            rule: s("x"),
            mode: s("enforce"),
        })
        .inc();
    relay
        .config_reloads
        .get_or_create(&r::ReloadLabels {
            result: s("success"),
        })
        .inc();
    relay
        .quota_rejections
        .get_or_create(&r::QuotaLabels {
            tenant: s("t"),
            limit: s("customer_recipients_per_day"),
        })
        .inc();
    relay
        .recipient_verifications
        .get_or_create(&r::VerificationLabels {
            route: s("r"),
            result: s("accepted"),
        })
        .inc();
    relay
        .tls_policy_results
        .get_or_create(&r::TlsPolicyLabels {
            domain: s("partner.example"),
            policy_type: "sts",
            mode: "enforce",
            result: "success",
        })
        .inc();
    use mailroute_operator::metrics as o;
    let mut operator_registry = Registry::default();
    let operator = o::Metrics::register(&mut operator_registry);
    operator
        .reconciles
        .get_or_create(&o::ResultLabels {
            result: s("success"),
        })
        .inc();
    operator.reconcile_duration.observe(0.01);
    let ns = o::NamespaceLabels {
        namespace: s("mail"),
    };
    operator.generation.get_or_create(&ns).set(3);
    operator.invalid_resources.get_or_create(&ns).set(0);
    let route = o::RouteLabels::of("mail", "mailbox");
    operator
        .route_tls_probe_success
        .get_or_create(&route)
        .set(1);
    operator
        .route_tls_certificate_expiry
        .get_or_create(&route)
        .set(1_900_000_000);
    let encode = |r: &Registry| {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, r).unwrap_or_else(|e| panic!("{e}"));
        out
    };
    (encode(&relay_registry), encode(&operator_registry))
}

/// OpenMetrics text as Prometheus's classic text format names it (what `promtool check
/// metrics` lints): a counter's `# HELP`/`# TYPE` carry the `_total` name, no `_created`
/// series, no `# EOF`. Prometheus itself scrapes the OpenMetrics text as served.
fn classic(openmetrics: &str) -> String {
    let families = |kind: &str| -> BTreeSet<String> {
        let suffix = format!(" {kind}");
        openmetrics
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .filter_map(|l| l.strip_suffix(suffix.as_str()))
            .map(str::to_owned)
            .collect()
    };
    let (counters, infos) = (families("counter"), families("info"));
    let mut out = String::new();
    for line in openmetrics.lines() {
        if line == "# EOF" {
            continue;
        }
        let mut line = line.to_owned();
        // An OpenMetrics info family is a gauge named `<name>_info` in the classic format.
        if let Some(name) = line
            .strip_prefix("# TYPE ")
            .and_then(|l| l.strip_suffix(" info"))
        {
            line = format!("# TYPE {name}_info gauge");
        } else if let Some(rest) = line.strip_prefix("# HELP ")
            && let Some((name, help)) = rest.split_once(' ')
            && infos.contains(name)
        {
            line = format!("# HELP {name}_info {help}");
        }
        for c in &counters {
            for prefix in ["# HELP ", "# TYPE "] {
                let head = format!("{prefix}{c} ");
                if line.starts_with(&head) {
                    line = format!("{prefix}{c}_total {}", &line[head.len()..]);
                }
            }
        }
        out.push_str(&line);
        out.push('\n');
    }
    out
}

/// The series names a query may use, from the `# TYPE` lines.
fn series(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        if words.next() != Some("#") || words.next() != Some("TYPE") {
            continue;
        }
        let (Some(name), Some(kind)) = (words.next(), words.next()) else {
            continue;
        };
        match kind {
            "counter" => {
                out.insert(format!("{name}_total"));
            }
            "info" => {
                out.insert(format!("{name}_info"));
            }
            "histogram" => {
                for suffix in ["_bucket", "_sum", "_count"] {
                    out.insert(format!("{name}{suffix}"));
                }
            }
            _ => {
                out.insert(name.to_owned());
            }
        }
    }
    out
}

/// Every `mailroute_...` name in a PromQL expression.
fn queried(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let bytes = expr.as_bytes();
    let mut i = 0;
    while let Some(pos) = expr[i..].find("mailroute_") {
        let start = i + pos;
        let mut end = start;
        while end < bytes.len() && (bytes[end].is_ascii_alphanumeric() || bytes[end] == b'_') {
            end += 1;
        }
        names.push(expr[start..end].to_owned());
        i = end;
    }
    names
}

#[test]
fn every_metric_the_dashboard_and_alerts_query_is_exported() {
    let (relay, operator) = exposition();
    let known: BTreeSet<String> = series(&relay).union(&series(&operator)).cloned().collect();

    let dashboard: serde_json::Value = serde_json::from_str(&chart("dashboards/mailroute.json"))
        .unwrap_or_else(|e| panic!("dashboard JSON: {e}"));
    assert_eq!(dashboard["uid"], "mailroute");
    assert!(dashboard["schemaVersion"].as_u64().unwrap_or(0) >= 36);
    let panels = dashboard["panels"].as_array().cloned().unwrap_or_default();
    assert!(panels.len() >= 10);
    let mut ids = BTreeSet::new();
    let mut exprs = Vec::new();
    for p in &panels {
        assert!(
            ids.insert(p["id"].as_u64().unwrap_or(0)),
            "duplicate panel id: {p}"
        );
        assert!(
            p["gridPos"]["w"].as_u64().is_some(),
            "panel without a position: {p}"
        );
        assert_eq!(p["datasource"]["uid"], "${datasource}");
        let targets = p["targets"].as_array().cloned().unwrap_or_default();
        assert!(!targets.is_empty(), "panel without a query: {}", p["title"]);
        for t in targets {
            exprs.push(t["expr"].as_str().unwrap_or_default().to_owned());
        }
    }
    let rules = chart("alerts/mailroute.rules.yaml");
    for line in rules.lines() {
        if line.contains("mailroute_")
            && !line.trim_start().starts_with("description")
            && !line.trim_start().starts_with("summary")
        {
            exprs.push(line.to_owned());
        }
    }
    let mut used = BTreeSet::new();
    for expr in &exprs {
        for name in queried(expr) {
            assert!(
                known.contains(&name),
                "{name} is queried but not exported (in {expr:?})"
            );
            used.insert(name);
        }
    }
    assert!(used.len() >= 15, "{used:?}");
}

#[test]
fn the_metric_names_of_spec_section_8_are_exported() {
    let (relay, operator) = exposition();
    let known: BTreeSet<String> = series(&relay).union(&series(&operator)).cloned().collect();
    for name in [
        "mailroute_relay_sessions_active",
        "mailroute_relay_sessions_total",
        "mailroute_relay_messages_total",
        "mailroute_relay_recipients_total",
        "mailroute_relay_delivery_duration_seconds_bucket",
        "mailroute_relay_upstream_replies_total",
        "mailroute_relay_quota_rejections_total",
        "mailroute_relay_bytes_received_total",
        "mailroute_relay_config_generation",
        "mailroute_relay_config_reloads_total",
        "mailroute_relay_config_source_up",
        "mailroute_operator_reconciles_total",
        "mailroute_operator_reconcile_duration_seconds_bucket",
        "mailroute_route_tls_probe_success",
        "mailroute_build_info",
    ] {
        assert!(known.contains(name), "{name} missing");
    }
}

#[test]
fn promtool_accepts_both_metrics_outputs() {
    let Ok(_) = std::process::Command::new("promtool")
        .arg("--version")
        .output()
    else {
        panic!("promtool (Debian package prometheus; scripts/test installs it) is not installed");
    };
    let (relay, operator) = exposition();
    for (program, text) in [("relay", classic(&relay)), ("operator", classic(&operator))] {
        let mut child = std::process::Command::new("promtool")
            .args(["check", "metrics"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("{e}"));
        {
            use std::io::Write;
            let mut stdin = child.stdin.take().unwrap_or_else(|| panic!("no stdin"));
            stdin
                .write_all(text.as_bytes())
                .unwrap_or_else(|e| panic!("{e}"));
        }
        let out = child.wait_with_output().unwrap_or_else(|e| panic!("{e}"));
        assert!(
            out.status.success(),
            "{program}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// A route's series join across the programs: the relay labels a route by its name in the
/// compiled document, the operator labels its probe of the same MailRoute with the same value
/// (and the namespace apart).
#[test]
fn both_programs_label_a_route_with_the_same_value() {
    let yaml = "apiVersion: mailroute.io/v1alpha1\nkind: MailRoute\nmetadata: {name: mailbox, namespace: mail}\nspec: {host: mx.example.com, port: 25}\n";
    let mut manifests = mailroute_config::Manifests::default();
    manifests
        .add_yaml(std::path::Path::new("route.yaml"), yaml)
        .unwrap_or_else(|e| panic!("{e}"));
    let inputs = manifests.namespaces.remove("mail").unwrap_or_default();
    let compiled = mailroute_config::compile(&inputs);
    let document = compiled.document(1);
    let relay_label: Vec<&String> = document.config.routes.keys().collect();
    let operator_label = mailroute_operator::metrics::RouteLabels::of("mail", "mailbox");
    assert_eq!(relay_label, [&operator_label.route]);
    assert_eq!(operator_label.namespace, "mail");
}
