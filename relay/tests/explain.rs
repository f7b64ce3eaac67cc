//! `explain` against the running relay: the seed scenarios (dual delivery, split delivery, an
//! outbound gateway, a quota refusal, an open-relay attempt) played by explain, then the same
//! commands sent to a relay built from the same manifests, delivering to Postfix `smtp-sink`
//! upstreams. Every reply must be the one explain printed, and every leg explain planned must
//! reach its upstream with the recipients it named (and nothing else any upstream).

mod support;

use base64::Engine as _;
use mailroute_relay::config_source;
use mailroute_relay::explain::{self, Envelope, Explanation};
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;
use support::sink::Sink;
use support::{Client, Options, Relay, Stores, bounded, builder, plain_route};

/// An example's manifests with every MailRoute pointed at a fresh `smtp-sink` (in clear, on
/// loopback), and tenant ranges replaced as `ranges` says: the directory and the sinks by route.
fn scenario(
    manifests: &str,
    ranges: &[(&str, &str)],
) -> (tempfile::TempDir, BTreeMap<String, Sink>) {
    let mut sinks = BTreeMap::new();
    let mut out = String::new();
    for doc in manifests.split("\n---") {
        if doc.contains("kind: MailRoute") {
            let name = doc
                .lines()
                .skip_while(|l| !l.starts_with("metadata:"))
                .find_map(|l| l.trim().strip_prefix("name: "))
                .unwrap_or_else(|| panic!("a MailRoute without a name: {doc}"))
                .to_owned();
            let sink = Sink::start();
            out.push_str(&plain_route(&name, sink.addr));
            sinks.insert(name, sink);
        } else {
            let mut doc = doc.to_owned();
            for (from, to) in ranges {
                doc = doc.replace(from, to);
            }
            out.push_str(&doc);
            out.push_str("\n---\n");
        }
    }
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    std::fs::write(dir.path().join("resources.yaml"), out).unwrap_or_else(|e| panic!("{e}"));
    (dir, sinks)
}

fn example(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../examples")
        .join(name)
        .join("resources.yaml");
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The transaction id in the reply to the content differs between two sessions.
fn normalised(line: &str) -> String {
    match line.split_once(" OK queued-less as ") {
        Some((head, _)) => format!("{head} OK queued-less as <id>"),
        None => line.to_owned(),
    }
}

/// Plays explain's commands against a running relay built from the same directory and asserts
/// that every reply is the one explain gave; then that the upstreams received exactly explain's
/// legs.
async fn explained_as_run(
    dir: &Path,
    sinks: &BTreeMap<String, Sink>,
    envelope: Envelope,
) -> Explanation {
    explained_as_run_with(dir, sinks, envelope, None).await
}

/// [`explained_as_run`], authenticating to the running relay with `password` (explain takes
/// any password as right).
async fn explained_as_run_with(
    dir: &Path,
    sinks: &BTreeMap<String, Sink>,
    envelope: Envelope,
    password: Option<&str>,
) -> Explanation {
    let loaded = config_source::from_manifests(dir, 1).unwrap_or_else(|e| panic!("{e}"));
    let explanation = explain::explain(&loaded, "relay.test", &envelope)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    print!("{}", explain::render_text(&explanation));

    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = Arc::new(mailroute_relay::metrics::Metrics::register(&mut registry));
    let built = builder(Stores::memory(), metrics)
        .build(&loaded)
        .unwrap_or_else(|e| panic!("{e}"));
    let relay = Relay::start(Options {
        deliver: Some(built.forwarder),
        admit: Some(built.gate),
        session: built.session,
        auth: Some(Arc::new(built.accounts)),
        ..Options::default()
    })
    .await;
    let mut client = Some(Client::connect_from(relay.smtp, envelope.client).await);
    for step in &explanation.commands {
        let Some(c) = client.as_mut() else {
            panic!("no client")
        };
        let reply = match step.command.as_str() {
            "(connect)" => c.reply().await,
            "(message content)" => {
                c.send(explain::CONTENT).await;
                c.reply().await
            }
            "STARTTLS" => {
                let reply = c.command("STARTTLS").await;
                if reply.starts_with("220") {
                    let plain = client.take().unwrap_or_else(|| panic!("no client"));
                    client = Some(plain.starttls(&relay.certs.cert_pem).await);
                }
                reply
            }
            command if command.starts_with("AUTH PLAIN ") => {
                let user = envelope.auth.as_deref().unwrap_or_default();
                let secret = format!("\0{user}\0{}", password.unwrap_or_default());
                c.command(&format!(
                    "AUTH PLAIN {}",
                    base64::engine::general_purpose::STANDARD.encode(secret)
                ))
                .await
            }
            command => c.command(command).await,
        };
        let got: Vec<String> = reply.lines().map(normalised).collect();
        let said: Vec<String> = step.reply.iter().map(|l| normalised(l)).collect();
        assert_eq!(
            got, said,
            "{}: the relay and explain disagree",
            step.command
        );
    }

    for (route, sink) in sinks {
        let planned: Vec<&explain::LegReport> = explanation
            .legs
            .iter()
            .filter(|l| l.target == *route)
            .collect();
        let expected = planned.len();
        sink.wait_count("X-Rcpt-Args", expected);
        let dumps: Vec<String> = sink
            .dumps()
            .iter()
            .map(|d| String::from_utf8_lossy(d).into_owned())
            .collect();
        assert_eq!(dumps.len(), expected, "route {route}: one message per leg");
        for (leg, dump) in planned.iter().zip(&dumps) {
            let mut received: Vec<&str> = dump
                .lines()
                .filter_map(|l| l.strip_prefix("X-Rcpt-Args: <"))
                .filter_map(|l| l.split('>').next())
                .collect();
            received.sort_unstable();
            let mut named: Vec<&str> = leg.recipients.iter().map(String::as_str).collect();
            named.sort_unstable();
            assert_eq!(received, named, "route {route}: the leg's recipients");
        }
    }
    explanation
}

fn envelope(client: &str, from: &str, to: &[&str]) -> Envelope {
    Envelope {
        client: client.parse::<IpAddr>().unwrap_or_else(|e| panic!("{e}")),
        helo: "client.test".to_owned(),
        auth: None,
        tls: false,
        from: from.to_owned(),
        to: to.iter().map(|t| (*t).to_owned()).collect(),
    }
}

#[tokio::test]
async fn dual_delivery_copies_users_to_the_legacy_server_as_the_relay_does() {
    bounded(60, async {
        // With a rule on trial: it matches, is marked, and changes nothing the relay does.
        let manifests = format!(
            "{}\n---\napiVersion: mailroute.io/v1alpha1\nkind: RoutingRule\nmetadata: {{name: trial-reject-outsiders, namespace: mail}}\nspec:\n  policyRef: example\n  priority: 5\n  mode: Audit\n  messages: [Inbound]\n  actions: {{reject: {{code: 550, enhancedCode: \"5.7.1\", text: \"Outsiders refused\"}}}}\n",
            example("dual-delivery")
        );
        let (dir, sinks) = scenario(&manifests, &[]);
        let e = explained_as_run(
            dir.path(),
            &sinks,
            envelope(
                "127.0.0.1",
                "partner@outside.example",
                &["alice@example.com", "nobody@example.com"],
            ),
        )
        .await;
        assert_eq!(e.recipients[0].direction, Some("inbound"));
        assert_eq!(e.recipients[0].account_type.as_deref(), Some("Users"));
        let rules = |i: usize| -> Vec<(&str, bool)> {
            e.recipients[i]
                .rules
                .iter()
                .map(|r| (r.rule.as_str(), r.audit))
                .collect()
        };
        assert_eq!(
            rules(0),
            [("trial-reject-outsiders", true), ("copy-to-legacy", false)]
        );
        assert_eq!(
            e.recipients[1].account_type.as_deref(),
            Some("Unrecognized")
        );
        assert_eq!(rules(1), [("trial-reject-outsiders", true)]);
        let copy = e
            .legs
            .iter()
            .find(|l| l.copy)
            .unwrap_or_else(|| panic!("no copy leg"));
        assert_eq!(
            (copy.target.as_str(), copy.recipients.as_slice()),
            ("legacy-exchange", &["alice@example.com".to_owned()][..])
        );
        assert!(e.accepted());
    })
    .await;
}

#[tokio::test]
async fn split_delivery_sends_unknown_mailboxes_to_legacy_as_the_relay_does() {
    bounded(60, async {
        let (dir, sinks) = scenario(&example("split-delivery"), &[]);
        let e = explained_as_run(
            dir.path(),
            &sinks,
            envelope(
                "127.0.0.1",
                "partner@outside.example",
                &["alice@example.com", "zed@example.com"],
            ),
        )
        .await;
        assert_eq!(e.recipients[0].target.as_deref(), Some("mailbox"));
        assert_eq!(e.recipients[1].target.as_deref(), Some("legacy"));
        assert_eq!(e.recipients[1].rules[0].rule, "unknown-to-legacy");
        assert_eq!(e.legs.len(), 2);
    })
    .await;
}

#[tokio::test]
async fn an_outbound_gateway_takes_an_authorised_range_s_mail_as_the_relay_does() {
    bounded(60, async {
        let (dir, sinks) = scenario(
            &example("outbound-gateway"),
            &[("cidr: 10.20.0.0/16", "cidr: 127.0.0.2/32")],
        );
        let e = explained_as_run(
            dir.path(),
            &sinks,
            envelope(
                "127.0.0.2",
                "billing@example.org",
                &["customer@external.example"],
            ),
        )
        .await;
        assert_eq!(e.session.tenant.as_deref(), Some("example-org"));
        assert_eq!(e.session.bound_by, Some("range"));
        assert!(e.session.authorised);
        assert_eq!(e.recipients[0].direction, Some("outbound"));
        assert_eq!(e.legs[0].target, "gateway");
        assert!(
            e.recipients[0]
                .quota
                .iter()
                .any(|c| c.key == "{example-org}:customer:day"),
            "the tenant's daily counter is spent: {:?}",
            e.recipients[0].quota
        );
        // The same envelope from outside the range is an open-relay attempt.
        let outside = explained_as_run(
            dir.path(),
            &BTreeMap::new(),
            envelope(
                "127.0.0.1",
                "billing@example.org",
                &["customer@external.example"],
            ),
        )
        .await;
        assert!(!outside.session.authorised);
        assert_eq!(outside.recipients[0].refused_for, Some("relay_denied"));
        assert!(outside.legs.is_empty() && !outside.accepted());
    })
    .await;
}

#[tokio::test]
async fn a_quota_reached_within_one_message_refuses_its_last_recipients_as_the_relay_does() {
    bounded(60, async {
        let (dir, sinks) = scenario(
            "apiVersion: mailroute.io/v1alpha1\nkind: MailRoute\nmetadata:\n  name: gateway\n  namespace: mail\nspec: {host: 127.0.0.1}\n---\napiVersion: mailroute.io/v1alpha1\nkind: RelayPolicy\nmetadata: {name: trial, namespace: mail}\nspec:\n  domains: [trial.example]\n  licenses: 1\n  tier: Trial\n  outboundRoute: gateway\n  authentication:\n    ipRanges: [{cidr: 127.0.0.3/32}]\n",
            &[],
        );
        let to: Vec<String> = (0..52).map(|i| format!("r{i}@external.example")).collect();
        let to: Vec<&str> = to.iter().map(String::as_str).collect();
        let e = explained_as_run(
            dir.path(),
            &sinks,
            envelope("127.0.0.3", "app@trial.example", &to),
        )
        .await;
        let refused: Vec<&str> = e.recipients.iter().filter_map(|r| r.refused_for).collect();
        assert_eq!(refused, ["quota", "quota"], "the 51st and 52nd recipients");
        assert_eq!(e.legs[0].recipients.len(), 50);
    })
    .await;
}

#[tokio::test]
async fn an_open_relay_attempt_is_refused_at_rcpt_and_its_data_too_as_the_relay_does() {
    bounded(60, async {
        let (dir, sinks) = scenario(&example("dual-delivery"), &[]);
        let e = explained_as_run(
            dir.path(),
            &sinks,
            envelope(
                "127.0.0.1",
                "spammer@prober.example",
                &[
                    "victim@external.example",
                    "victim%external.example@example.com",
                    "victim@external..example",
                ],
            ),
        )
        .await;
        assert!(e.recipients.iter().all(|r| !r.accepted));
        assert_eq!(e.recipients.len(), 3, "{:?}", e.recipients);
        assert_eq!(e.recipients[0].refused_for, Some("relay_denied"));
        // Refused by the session's own parser, before any RCPT decision.
        assert_eq!(e.recipients[2].refused_for, Some("syntax"));
        assert!(e.recipients[2].reply.starts_with("501 5.1.3"));
        assert!(e.recipients[0].reply.starts_with("550 5.7.1"));
        assert!(e.legs.is_empty());
        assert!(!e.accepted());
    })
    .await;
}

#[tokio::test]
async fn an_application_authenticated_over_tls_in_its_range_relays_as_the_relay_does() {
    bounded(90, async {
        let manifests = format!(
            "apiVersion: mailroute.io/v1alpha1\nkind: MailRoute\nmetadata:\n  name: gateway\n  namespace: mail\nspec: {{host: 127.0.0.1}}\n---\n{}",
            example("application-relay")
        );
        let in_range = [
            ("cidr: 10.42.0.0/16", "cidr: 127.0.0.4/32"),
            (
                "  allowedSenders: RegisteredUsers",
                "  outboundRoute: gateway\n  allowedSenders: RegisteredUsers",
            ),
        ];
        let (dir, sinks) = scenario(&manifests, &in_range);
        let mut authenticated = envelope(
            "127.0.0.4",
            "billing@example.com",
            &["customer@external.example"],
        );
        authenticated.auth = Some("billing".to_owned());
        authenticated.tls = true;
        // bcrypt: the example Secret's hash of this password.
        let e = explained_as_run_with(
            dir.path(),
            &sinks,
            authenticated,
            Some("billing-example-password"),
        )
        .await;
        assert_eq!(e.session.bound_by, Some("auth"));
        assert!(e.session.authorised && e.accepted());
        assert!(
            e.recipients[0]
                .quota
                .iter()
                .any(|c| c.limit == "user_messages_per_day"),
            "a registered user's own counter: {:?}",
            e.recipients[0].quota
        );

        // The same client without TLS: requireTLS refuses before anything else.
        let plain = explained_as_run(
            dir.path(),
            &BTreeMap::new(),
            envelope(
                "127.0.0.4",
                "billing@example.com",
                &["customer@external.example"],
            ),
        )
        .await;
        assert!(!plain.accepted());
        assert!(plain.recipients[0].refused_for.is_some());
    })
    .await;
}
