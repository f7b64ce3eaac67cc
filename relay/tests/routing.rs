//! Routing tables for each seed scenario (SPEC 6.1-6.3): which legs a message becomes, from the
//! examples users start from, plus the rule semantics the examples do not exercise.

mod support;

use mailroute_relay::config_source;
use mailroute_relay::routing::{Direction, Plan, Router, Target};
use mailroute_relay::tenants::Tenants;
use std::path::Path;
use std::sync::Arc;

fn router(config: &mailroute_config::RelayConfig) -> Router {
    Router::new(config, Arc::new(Tenants::new(config)))
}

fn example(name: &str) -> Router {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../examples")
        .join(name);
    let loaded = config_source::from_manifests(&dir, 1).unwrap_or_else(|e| panic!("{name}: {e}"));
    router(&loaded.document.config)
}

fn from_yaml(yaml: &str) -> Router {
    router(&support::compile_yaml(yaml).config)
}

/// A plan as `target[copy]: recipients` lines, sorted, for table comparison.
fn legs(plan: &Plan) -> Vec<String> {
    let mut lines: Vec<String> = plan
        .legs
        .iter()
        .map(|leg| {
            let mut rcpts: Vec<String> = leg
                .recipients
                .iter()
                .map(|r| {
                    if r.notify_never {
                        format!("{} (NOTIFY=NEVER)", r.address)
                    } else {
                        r.address.clone()
                    }
                })
                .collect();
            rcpts.sort();
            format!(
                "{}{}{}{}: {}",
                leg.target,
                if leg.copy { " copy" } else { "" },
                if leg.required { "" } else { " best-effort" },
                if leg.require_tls { " tls" } else { "" },
                rcpts.join(", ")
            )
        })
        .collect();
    lines.sort();
    lines
}

fn rcpts(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

struct Case {
    what: &'static str,
    bound: Option<&'static str>,
    sender: &'static str,
    recipients: &'static [&'static str],
    legs: &'static [&'static str],
}

fn run(router: &Router, cases: &[Case]) {
    for case in cases {
        let plan = router.plan(case.bound, case.sender, &rcpts(case.recipients), false);
        assert!(plan.refused.is_empty(), "{}: {:?}", case.what, plan.refused);
        let expected: Vec<String> = case.legs.iter().map(|s| s.to_string()).collect();
        assert_eq!(legs(&plan), expected, "{}", case.what);
    }
}

#[test]
fn dual_delivery_sends_our_users_mail_to_the_primary_and_a_copy_to_the_legacy_server() {
    let router = example("dual-delivery");
    run(
        &router,
        &[
            Case {
                what: "inbound to a user: primary plus a bounce-suppressed copy",
                bound: None,
                sender: "someone@partner.example",
                recipients: &["alice@example.com"],
                legs: &[
                    "legacy-exchange copy: alice@example.com (NOTIFY=NEVER)",
                    "mailbox: alice@example.com",
                ],
            },
            Case {
                what: "a group address is copied too",
                bound: None,
                sender: "someone@partner.example",
                recipients: &["sales@example.com", "bob@example.com"],
                legs: &[
                    "legacy-exchange copy: bob@example.com (NOTIFY=NEVER), sales@example.com (NOTIFY=NEVER)",
                    "mailbox: bob@example.com, sales@example.com",
                ],
            },
            Case {
                what: "an unknown address of our domain is not a user: primary only",
                bound: None,
                sender: "someone@partner.example",
                recipients: &["nobody@example.com"],
                legs: &["mailbox: nobody@example.com"],
            },
            Case {
                what: "internal mail counts as InternalReceiving",
                bound: Some("example"),
                sender: "bob@example.com",
                recipients: &["alice@example.com"],
                legs: &[
                    "legacy-exchange copy: alice@example.com (NOTIFY=NEVER)",
                    "mailbox: alice@example.com",
                ],
            },
            Case {
                what: "the same recipient twice is delivered once per route",
                bound: None,
                sender: "someone@partner.example",
                recipients: &["alice@example.com", "alice@EXAMPLE.com"],
                legs: &[
                    "legacy-exchange copy: alice@example.com (NOTIFY=NEVER)",
                    "mailbox: alice@example.com",
                ],
            },
        ],
    );
}

#[test]
fn split_delivery_sends_known_users_to_the_primary_and_unknown_addresses_to_legacy() {
    let router = example("split-delivery");
    run(
        &router,
        &[
            Case {
                what: "a migrated user",
                bound: None,
                sender: "a@partner.example",
                recipients: &["alice@example.com"],
                legs: &["mailbox: alice@example.com"],
            },
            Case {
                what: "not migrated yet",
                bound: None,
                sender: "a@partner.example",
                recipients: &["zed@example.com"],
                legs: &["legacy: zed@example.com"],
            },
            Case {
                what: "one message, both systems",
                bound: None,
                sender: "a@partner.example",
                recipients: &["carol@example.com", "zed@example.com", "yan@example.com"],
                legs: &[
                    "legacy: yan@example.com, zed@example.com",
                    "mailbox: carol@example.com",
                ],
            },
        ],
    );
    let route = router
        .route_recipient(None, "a@partner.example", "zed@example.com")
        .unwrap_or_else(|r| panic!("{r:?}"));
    assert_eq!(route.direction, Direction::Inbound);
    assert_eq!(&*route.matches[0].rule, "unknown-to-legacy");
}

#[test]
fn outbound_gateway_and_archive_copy() {
    run(
        &example("outbound-gateway"),
        &[Case {
            what: "outbound through the gateway, every recipient in one transaction",
            bound: Some("example-org"),
            sender: "app@example.org",
            recipients: &["a@one.example", "b@two.example"],
            legs: &["gateway: a@one.example, b@two.example"],
        }],
    );
    let archive = example("archive-copy");
    run(
        &archive,
        &[Case {
            what: "outbound via the smarthost, a best-effort archive copy",
            bound: Some("example-net"),
            sender: "app@example.net",
            recipients: &["x@customer.example"],
            legs: &[
                "archive copy best-effort: x@customer.example (NOTIFY=NEVER)",
                "smarthost: x@customer.example",
            ],
        }],
    );
    let plan = archive.plan(
        Some("example-net"),
        "app@example.net",
        &rcpts(&["x@customer.example"]),
        false,
    );
    let primary = plan
        .legs
        .iter()
        .find(|l| !l.copy)
        .unwrap_or_else(|| panic!());
    assert_eq!(primary.headers.len(), 1);
    assert_eq!(primary.headers[0].name, "X-Archived-By");
    // A message that is already a copy gets none: two relays copying to each other stop.
    let plan = archive.plan(
        Some("example-net"),
        "app@example.net",
        &rcpts(&["x@customer.example"]),
        true,
    );
    assert_eq!(legs(&plan), ["smarthost: x@customer.example"]);
    assert_eq!(plan.copies_suppressed, 1);
}

const RULES: &str = r#"
apiVersion: mailroute.io/v1alpha1
kind: MailRoute
metadata: {name: mailbox, namespace: mail}
spec: {host: mailbox.example.net}
---
apiVersion: mailroute.io/v1alpha1
kind: MailRoute
metadata: {name: migration, namespace: mail}
spec: {host: migration.example.net}
---
apiVersion: mailroute.io/v1alpha1
kind: MailRoute
metadata: {name: quarantine, namespace: mail}
spec: {host: quarantine.example.net}
---
apiVersion: mailroute.io/v1alpha1
kind: RelayPolicy
metadata: {name: acme, namespace: mail}
spec:
  domains: [acme.example]
  licenses: 10
  users: [ann@acme.example, ben@acme.example]
  groups: [{name: board, address: board@acme.example, members: [ann@acme.example]}]
  authentication: {ipRanges: [{cidr: 10.0.0.0/24}]}
  inboundRoute: mailbox
---
apiVersion: mailroute.io/v1alpha1
kind: RoutingRule
metadata: {name: a-reject-spoof, namespace: mail}
spec:
  policyRef: acme
  priority: 1
  messages: [Inbound]
  envelopeFilter: {senders: [{pattern: '.*@acme-support\.example'}]}
  actions: {reject: {code: 550, enhancedCode: "5.7.1", text: "Lookalike domain refused"}}
---
apiVersion: mailroute.io/v1alpha1
kind: RoutingRule
metadata: {name: b-audit-quarantine, namespace: mail}
spec:
  policyRef: acme
  priority: 2
  mode: Audit
  messages: [Inbound]
  actions: {route: quarantine}
---
apiVersion: mailroute.io/v1alpha1
kind: RoutingRule
metadata: {name: c-board-migration, namespace: mail}
spec:
  policyRef: acme
  priority: 3
  messages: [Inbound, InternalReceiving]
  envelopeFilter: {recipients: [{group: board}]}
  actions:
    route: migration
    rewriteRecipientDomain: acme.example.alias.example
    requireTLS: true
    addHeaders: [{name: X-Migrated, value: "yes"}]
  stopProcessing: true
---
apiVersion: mailroute.io/v1alpha1
kind: RoutingRule
metadata: {name: d-copy-legal, namespace: mail}
spec:
  policyRef: acme
  priority: 4
  messages: [Inbound, InternalReceiving, Outbound]
  actions:
    alsoDeliverTo: [{recipient: legal@acme.example, suppressBounces: false}, {route: mailbox}]
"#;

#[test]
fn rule_actions_filters_priority_stop_processing_and_audit() {
    let router = from_yaml(RULES);
    // Reject at RCPT time with the rule's own codes.
    let refused = router
        .route_recipient(None, "ceo@acme-support.example", "ben@acme.example")
        .err()
        .unwrap_or_else(|| panic!("not refused"))
        .reply();
    assert_eq!((refused.code(), refused.enhanced()), (550, Some("5.7.1")));
    assert_eq!(refused.text(), "Lookalike domain refused");

    // The board member: changed route, rewritten domain, TLS, header; stopProcessing keeps
    // the later copy rule away; the audited rule matched but changed nothing.
    let ann = router
        .route_recipient(None, "x@partner.example", "ann@acme.example")
        .unwrap_or_else(|r| panic!("{r:?}"));
    assert_eq!(ann.target, Target::Route("migration".into()));
    assert_eq!(ann.deliver_as, "ann@acme.example.alias.example");
    assert!(ann.require_tls);
    assert!(ann.copies.is_empty());
    let names: Vec<(&str, bool)> = ann.matches.iter().map(|m| (&*m.rule, m.audit)).collect();
    assert_eq!(
        names,
        [("b-audit-quarantine", true), ("c-board-migration", false)]
    );

    // Ben: not in the group; the copy rule adds legal@ (with bounces) and a same-route copy
    // that is deduplicated against the primary.
    let plan = router.plan(
        None,
        "x@partner.example",
        &rcpts(&["ben@acme.example", "ann@acme.example"]),
        false,
    );
    assert_eq!(
        legs(&plan),
        [
            "mailbox copy: legal@acme.example",
            "mailbox: ben@acme.example",
            "migration tls: ann@acme.example.alias.example",
        ]
    );

    // Outbound from an authorised client: the copy rule applies, the inbound-only ones don't;
    // with no outbound route the recipient's MX is the target.
    let plan = router.plan(
        Some("acme"),
        "ben@acme.example",
        &rcpts(&["z@elsewhere.example"]),
        false,
    );
    assert_eq!(
        legs(&plan),
        [
            "mailbox copy: legal@acme.example, z@elsewhere.example (NOTIFY=NEVER)",
            "mx:elsewhere.example: z@elsewhere.example",
        ]
    );
    assert_eq!(
        plan.recipients[0].as_ref().map(|r| r.1),
        Some(Direction::Outbound)
    );
}
