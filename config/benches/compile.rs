//! Compile time at scale (SPEC section 10: 10,000 rules and 100,000 users in well under a
//! second). Run with `cargo bench -p mailroute-config --bench compile`.

use criterion::{Criterion, criterion_group, criterion_main};
use mailroute_config::compile::{Inputs, Object, compile};
use mailroute_config::resources::*;
use mailroute_config::{Compiled, RelayDocument};
use std::hint::black_box;

fn route(host: &str) -> MailRouteSpec {
    serde_json::from_value(serde_json::json!({ "host": host }))
        .unwrap_or_else(|e| panic!("route spec: {e}"))
}

/// `tenants` tenants sharing `rules` rules and `users` users; one rule in `pattern_every` uses a
/// regular expression, the rest exact addresses, domains and groups.
fn inputs(tenants: usize, rules: usize, users: usize, pattern_every: usize) -> Inputs {
    let mut inputs = Inputs {
        namespace: "mail".to_owned(),
        ..Inputs::default()
    };
    for r in 0..10 {
        inputs.routes.push(Object::new(
            format!("route-{r}"),
            route(&format!("mx{r}.example.net")),
        ));
    }
    for t in 0..tenants {
        let domain = format!("tenant{t}.example");
        let users: Vec<String> = (0..users / tenants)
            .map(|u| format!("user{u}@{domain}"))
            .collect();
        let spec = serde_json::json!({
            "domains": [domain],
            "licenses": 1000,
            "users": users,
            "groups": [{"name": "staff", "address": format!("staff@{domain}"), "members": users.iter().take(50).collect::<Vec<_>>()}],
            "authentication": {"ipRanges": [{"cidr": format!("10.{}.{}.0/24", t / 250, t % 250)}]},
            "inboundRoute": "route-0",
        });
        let spec: RelayPolicySpec =
            serde_json::from_value(spec).unwrap_or_else(|e| panic!("policy: {e}"));
        inputs
            .policies
            .push(Object::new(format!("tenant-{t}"), spec));
    }
    for r in 0..rules {
        let t = r % tenants;
        let matcher = match r % pattern_every.max(1) {
            0 => {
                serde_json::json!({"pattern": format!("(sales|support)-{r}-[a-z]+@tenant{t}\\.example")})
            }
            _ if r % 3 == 0 => serde_json::json!({"domain": format!("partner{r}.example")}),
            _ if r % 3 == 1 => serde_json::json!({"group": "staff"}),
            _ => serde_json::json!({"address": format!("user{r}@tenant{t}.example")}),
        };
        let spec = serde_json::json!({
            "policyRef": format!("tenant-{t}"),
            "priority": (r * 7919) % 1000,
            "messages": ["Inbound", "Outbound"],
            "envelopeFilter": {"recipients": [matcher]},
            "actions": {"alsoDeliverTo": [{"route": format!("route-{}", r % 10)}]},
        });
        let spec: RoutingRuleSpec =
            serde_json::from_value(spec).unwrap_or_else(|e| panic!("rule: {e}"));
        inputs.rules.push(Object::new(format!("rule-{r:05}"), spec));
    }
    inputs
}

fn checked(compiled: Compiled) -> Compiled {
    assert!(
        compiled.problems.is_empty(),
        "{:?}",
        &compiled.problems[..3.min(compiled.problems.len())]
    );
    compiled
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("compile 10k rules, 100k users");
    group.sample_size(10);
    for (label, tenants, pattern_every) in [
        ("1 tenant, 1 rule in 10 a regex", 1, 10),
        ("100 tenants, 1 rule in 10 a regex", 100, 10),
        ("1 tenant, every rule a regex", 1, 1),
    ] {
        let inputs = inputs(tenants, 10_000, 100_000, pattern_every);
        checked(compile(&inputs));
        group.bench_function(format!("compile + document: {label}"), |b| {
            b.iter(|| {
                let compiled = compile(black_box(&inputs));
                black_box(compiled.document(1))
            })
        });
        let json = checked(compile(&inputs)).document(1).to_json_pretty();
        group.bench_function(format!("relay load (parse + check): {label}"), |b| {
            b.iter(|| RelayDocument::from_json(black_box(json.as_bytes())).map(|_| ()))
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
