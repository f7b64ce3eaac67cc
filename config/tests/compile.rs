//! The compiler as users meet it: manifests in, a relay document and precise problems out.

use mailroute_config::document::{Destination, Host, Matcher};
use mailroute_config::{Compiled, Manifests, RelayDocument, compile};
use std::path::Path;

/// Compiles a YAML stream of namespace `mail`; returns the result and every problem as text.
fn compile_yaml(yaml: &str) -> (Compiled, Vec<String>) {
    let mut manifests = Manifests::default();
    manifests
        .add_yaml(Path::new("test.yaml"), yaml)
        .unwrap_or_else(|e| panic!("{e}"));
    let mut problems: Vec<String> = manifests.problems.iter().map(ToString::to_string).collect();
    let inputs = manifests.namespaces.remove("mail").unwrap_or_default();
    let compiled = compile(&inputs);
    problems.extend(compiled.problems.iter().map(ToString::to_string));
    (compiled, problems)
}

const ROUTES: &str = r#"
apiVersion: mailroute.io/v1alpha1
kind: MailRoute
metadata: {name: mailbox, namespace: mail}
spec: {host: mailbox.mail.svc}
---
apiVersion: mailroute.io/v1alpha1
kind: MailRoute
metadata: {name: archive, namespace: mail}
spec: {host: archive.mail.svc, port: 2525, delivery: BestEffort}
"#;

fn policy(name: &str, extra: &str) -> String {
    format!(
        r#"
---
apiVersion: mailroute.io/v1alpha1
kind: RelayPolicy
metadata: {{name: {name}, namespace: mail}}
spec:
  domains: [{name}.example]
  licenses: 10
{extra}
"#
    )
}

fn ranges(cidrs: &[&str]) -> String {
    let mut s = String::from("  authentication:\n    ipRanges:\n");
    for c in cidrs {
        s.push_str(&format!("      - cidr: \"{c}\"\n"));
    }
    s
}

#[test]
fn a_range_of_more_than_65536_addresses_is_refused() {
    let yaml = policy(
        "acme",
        &ranges(&["10.0.0.0/16", "10.2.0.0/15", "2001:db8::/111"]),
    );
    let (compiled, problems) = compile_yaml(&yaml);
    assert_eq!(
        problems,
        [
            "RelayPolicy/acme: authentication.ipRanges[1].cidr: 10.2.0.0/15 covers more than 65,536 addresses; split it into ranges of at most IPv4 /16 or IPv6 /112",
            "RelayPolicy/acme: authentication.ipRanges[2].cidr: 2001:db8::/111 covers more than 65,536 addresses; split it into ranges of at most IPv4 /16 or IPv6 /112",
        ]
    );
    assert!(
        compiled.config.tenants.is_empty(),
        "an invalid policy is left out"
    );
}

#[test]
fn host_bits_in_a_range_are_refused_naming_both_fixes() {
    let (_, problems) = compile_yaml(&policy("acme", &ranges(&["10.0.0.1/24"])));
    assert_eq!(
        problems,
        [
            "RelayPolicy/acme: authentication.ipRanges[0].cidr: 10.0.0.1/24 has host bits set: write 10.0.0.0/24 for the whole network, or 10.0.0.1/32 for the one address"
        ]
    );
}

#[test]
fn ipv6_ranges_in_any_textual_form_compile_to_one_canonical_form() {
    let yaml = policy(
        "acme",
        &ranges(&[
            "2001:DB8:0:0:0:0:0:0/112",
            "::ffff:192.0.2.0/120",
            "2001:0db8:0001::/128",
            "192.0.2.77",
        ]),
    );
    let (compiled, problems) = compile_yaml(&yaml);
    assert!(problems.is_empty(), "{problems:?}");
    let ranges: Vec<String> = compiled.config.tenants["acme"]
        .ip_ranges
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(
        ranges,
        [
            "192.0.2.0/24",
            "192.0.2.77/32",
            "2001:db8::/112",
            "2001:db8:1::/128"
        ]
    );
}

#[test]
fn disabled_ranges_are_checked_but_not_enforced() {
    let extra = "  authentication:\n    ipRanges:\n      - {cidr: 10.1.0.0/16, enabled: false}\n      - {cidr: 10.9.0.0/24}\n";
    let (compiled, problems) = compile_yaml(&policy("acme", extra));
    assert!(problems.is_empty(), "{problems:?}");
    let ranges: Vec<String> = compiled.config.tenants["acme"]
        .ip_ranges
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(ranges, ["10.9.0.0/24"]);
    let bad = "  authentication:\n    ipRanges:\n      - {cidr: 10.0.0.0/8, enabled: false}\n";
    let (_, problems) = compile_yaml(&policy("acme", bad));
    assert_eq!(problems.len(), 1, "{problems:?}");
}

#[test]
fn a_dangling_route_reference_names_the_rule_field_and_namespace() {
    let yaml = format!(
        "{ROUTES}{}\n---\napiVersion: mailroute.io/v1alpha1\nkind: RoutingRule\nmetadata: {{name: split, namespace: mail}}\nspec:\n  policyRef: acme\n  messages: [Inbound]\n  actions: {{route: legacy}}\n",
        policy("acme", "")
    );
    let (compiled, problems) = compile_yaml(&yaml);
    assert_eq!(
        problems,
        [r#"RoutingRule/split: actions.route: no MailRoute "legacy" in namespace mail"#]
    );
    assert!(compiled.config.tenants["acme"].rules.is_empty());
    assert!(
        compiled.config.routes.contains_key("mailbox"),
        "valid resources still compile"
    );
}

#[test]
fn a_reference_to_an_invalid_route_says_it_is_invalid_not_missing() {
    let yaml = format!(
        "{ROUTES}\n---\napiVersion: mailroute.io/v1alpha1\nkind: MailRoute\nmetadata: {{name: broken, namespace: mail}}\nspec: {{host: broken.example, port: 80}}\n{}",
        policy("acme", "  outboundRoute: broken\n  inboundRoute: mailbox")
    );
    let (compiled, problems) = compile_yaml(&yaml);
    assert_eq!(
        problems,
        [
            "MailRoute/broken: port: 80 is not allowed: use 25, 465, 587 or 1024-65535",
            r#"RelayPolicy/acme: outboundRoute: MailRoute "broken" is invalid (see its status)"#,
        ]
    );
    assert_eq!(compiled.config.routes.len(), 2);
}

fn rule(name: &str, body: &str) -> String {
    format!(
        "\n---\napiVersion: mailroute.io/v1alpha1\nkind: RoutingRule\nmetadata: {{name: {name}, namespace: mail}}\nspec:\n  policyRef: acme\n{body}\n"
    )
}

#[test]
fn an_invalid_regex_is_reported_in_one_line_and_the_rule_left_out() {
    let yaml = format!(
        "{ROUTES}{}{}{}",
        policy("acme", ""),
        rule(
            "bad-regex",
            "  messages: [Inbound]\n  envelopeFilter:\n    recipients:\n      - pattern: \"(unclosed@acme\\\\.example\"\n  actions: {route: archive}"
        ),
        rule(
            "good",
            "  messages: [Inbound]\n  envelopeFilter:\n    recipients:\n      - pattern: \"sales-.*@acme\\\\.example\"\n  actions: {route: archive}"
        ),
    );
    let (compiled, problems) = compile_yaml(&yaml);
    assert_eq!(
        problems,
        [
            "RoutingRule/bad-regex: envelopeFilter.recipients[0].pattern: invalid regular expression: unclosed group"
        ]
    );
    let rules = &compiled.config.tenants["acme"].rules;
    assert_eq!(rules.len(), 1);
    let Matcher::Pattern(p) = &rules[0].recipients[0] else {
        panic!("expected a pattern, got {:?}", rules[0].recipients[0]);
    };
    assert!(p.is_match("sales-eu@acme.example"));
    assert!(
        !p.is_match("xsales-eu@acme.example.evil"),
        "patterns are anchored at both ends"
    );
}

#[test]
fn an_unknown_group_is_reported() {
    let groups =
        "  groups:\n    - {name: sales, address: sales@acme.example, members: [a@acme.example]}";
    let yaml = format!(
        "{ROUTES}{}{}{}",
        policy("acme", groups),
        rule(
            "by-group",
            "  messages: [Outbound]\n  envelopeFilter:\n    senders: [{group: sales}]\n  actions: {alsoDeliverTo: [{route: archive}]}"
        ),
        rule(
            "bad-group",
            "  messages: [Outbound]\n  envelopeFilter:\n    senders: [{group: marketing}]\n  actions: {alsoDeliverTo: [{route: archive}]}"
        ),
    );
    let (compiled, problems) = compile_yaml(&yaml);
    assert_eq!(
        problems,
        [
            r#"RoutingRule/bad-group: envelopeFilter.senders[0].group: no group "marketing" in the rule's RelayPolicy"#
        ]
    );
    assert_eq!(compiled.config.tenants["acme"].rules.len(), 1);
}

#[test]
fn duplicate_names_leave_every_definition_out() {
    let dup = "\n---\napiVersion: mailroute.io/v1alpha1\nkind: MailRoute\nmetadata: {name: mailbox, namespace: mail}\nspec: {host: other.mail.svc}\n";
    let (compiled, problems) = compile_yaml(&format!("{ROUTES}{dup}"));
    assert_eq!(
        problems,
        ["MailRoute/mailbox: metadata.name: defined more than once; every definition is left out"]
    );
    assert!(!compiled.config.routes.contains_key("mailbox"));
    assert!(compiled.config.routes.contains_key("archive"));
}

#[test]
fn a_domain_or_range_claimed_by_two_policies_is_refused_on_the_later_one() {
    let a = "  authentication:\n    ipRanges: [{cidr: 10.1.0.0/24}]";
    let b = "  authentication:\n    ipRanges: [{cidr: 10.1.0.0/24}]\n  domains: [acme.example]";
    let yaml = format!(
        "{}{}",
        policy("acme", a),
        policy("zeta", b).replace("  domains: [zeta.example]\n", "")
    );
    let (compiled, problems) = compile_yaml(&yaml);
    assert_eq!(
        problems,
        [
            r#"RelayPolicy/zeta: authentication.ipRanges[0].cidr: 10.1.0.0/24 already belongs to RelayPolicy "acme""#,
            r#"RelayPolicy/zeta: domains[0]: acme.example already belongs to RelayPolicy "acme""#,
        ]
    );
    assert_eq!(compiled.config.tenants.keys().collect::<Vec<_>>(), ["acme"]);
}

#[test]
fn require_smtp_auth_without_credentials_is_refused() {
    let extra = "  authentication:\n    requireSMTPAuth: true";
    let (_, problems) = compile_yaml(&policy("acme", extra));
    assert_eq!(
        problems,
        [
            "RelayPolicy/acme: authentication.credentialsSecretRef: requireSMTPAuth is true but neither a credentials Secret nor serviceAccounts is given"
        ]
    );
    let missing =
        "  authentication:\n    requireSMTPAuth: true\n    credentialsSecretRef: {name: nope}";
    let (_, problems) = compile_yaml(&policy("acme", missing));
    assert_eq!(
        problems,
        [
            r#"RelayPolicy/acme: authentication.credentialsSecretRef: no Secret "nope" in namespace mail"#
        ]
    );
}

#[test]
fn trial_and_standard_limits_reach_the_document() {
    let yaml = format!(
        "{}{}",
        policy("acme", "  tier: Trial"),
        policy("big", "").replace("licenses: 10", "licenses: 1000000")
    );
    let (compiled, problems) = compile_yaml(&yaml);
    assert!(problems.is_empty(), "{problems:?}");
    let trial = &compiled.config.tenants["acme"].limits;
    assert_eq!(
        (
            trial.per_customer_recipients_per_day,
            trial.per_customer_recipients_per_10_minutes
        ),
        (100, 50)
    );
    let big = &compiled.config.tenants["big"].limits;
    assert_eq!(
        (
            big.per_customer_recipients_per_day,
            big.per_customer_recipients_per_10_minutes
        ),
        (4_600_000, 319_444)
    );
}

const SECRET_PASSWORD: &str = "s3cret-upstream-pa55word";
const SECRET_HASH: &str = "$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHQ$secretdigestvalue";
const SECRET_PEM: &str =
    "-----BEGIN CERTIFICATE-----\nMIIBsecretcabundle\n-----END CERTIFICATE-----";

fn with_credentials() -> String {
    format!(
        r#"
apiVersion: v1
kind: Secret
metadata: {{name: upstream, namespace: mail}}
stringData: {{username: relay-user, password: "{SECRET_PASSWORD}"}}
---
apiVersion: v1
kind: Secret
metadata: {{name: accounts, namespace: mail}}
data: {{app: "{}"}}
---
apiVersion: v1
kind: Secret
metadata: {{name: roots, namespace: mail}}
stringData:
  ca.pem: "{}"
---
apiVersion: mailroute.io/v1alpha1
kind: MailRoute
metadata: {{name: gateway, namespace: mail}}
spec:
  host: smtp.gateway.example
  port: 587
  tls: {{mode: Required, caBundleSecretRef: {{name: roots, key: ca.pem}}}}
  auth: {{secretRef: {{name: upstream}}}}
{}"#,
        base64_encode(SECRET_HASH),
        SECRET_PEM.replace('\n', "\\n"),
        policy(
            "acme",
            "  outboundRoute: gateway\n  authentication:\n    requireSMTPAuth: true\n    credentialsSecretRef: {name: accounts}"
        )
    )
}

fn base64_encode(s: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(s)
}

#[test]
fn credentials_never_appear_in_the_document() {
    let (compiled, problems) = compile_yaml(&with_credentials());
    assert!(problems.is_empty(), "{problems:?}");
    let json = compiled.document(1).to_json_pretty();
    for secret in [
        SECRET_PASSWORD,
        "relay-user",
        SECRET_HASH,
        "secretdigestvalue",
        "MIIBsecretcabundle",
    ] {
        assert!(
            !json.contains(secret),
            "{secret:?} leaked into the document"
        );
    }
    // ... but they are all in the credentials bundle, where the relay will find them.
    let creds = &compiled.credentials;
    assert_eq!(creds.routes["gateway"].password, SECRET_PASSWORD);
    assert_eq!(creds.tenants["acme"]["app"], SECRET_HASH);
    assert!(creds.ca_bundles["gateway"].contains("MIIBsecretcabundle"));
    assert!(compiled.config.routes["gateway"].auth);
    // And Debug output (which may end up in a log) redacts them.
    let debug = format!("{creds:?}");
    assert!(
        !debug.contains(SECRET_PASSWORD) && !debug.contains(SECRET_HASH),
        "{debug}"
    );
}

#[test]
fn a_route_secret_without_password_names_the_missing_key() {
    let yaml = with_credentials().replace(&format!(", password: \"{SECRET_PASSWORD}\""), "");
    let (compiled, problems) = compile_yaml(&yaml);
    assert_eq!(
        problems,
        [
            r#"MailRoute/gateway: auth.secretRef: Secret "upstream" has no key "password""#,
            r#"RelayPolicy/acme: outboundRoute: MailRoute "gateway" is invalid (see its status)"#,
        ]
    );
    assert!(
        compiled.credentials.routes.is_empty(),
        "nothing is kept of an invalid route"
    );
}

#[test]
fn the_same_inputs_in_any_order_give_byte_identical_output() {
    let groups = "  groups:\n    - {name: sales, address: sales@acme.example, members: [b@acme.example, a@acme.example]}\n  users: [z@acme.example, a@acme.example, A@acme.example]";
    let documents: Vec<String> = [
        ROUTES.to_owned(),
        policy("acme", groups),
        policy("zeta", &ranges(&["10.7.0.0/24", "10.6.0.0/24"])),
        rule("r1", "  priority: 5\n  messages: [Outbound, Inbound]\n  actions: {alsoDeliverTo: [{route: archive}]}"),
        rule("r2", "  priority: 5\n  messages: [Inbound]\n  actions: {route: archive}"),
        rule("r0", "  priority: -1\n  messages: [Inbound]\n  actions: {route: mailbox}"),
        with_credentials().replace("name: acme", "name: acme2").replace("acme.example", "acme2.example"),
    ]
    .into_iter()
    .flat_map(|chunk| chunk.split("\n---\n").map(str::to_owned).collect::<Vec<_>>())
    .filter(|d| !d.trim().is_empty())
    .collect();

    let render = |order: &[usize]| {
        let yaml: Vec<&str> = order.iter().map(|i| documents[*i].as_str()).collect();
        let (compiled, problems) = compile_yaml(&yaml.join("\n---\n"));
        assert!(problems.is_empty(), "{problems:?}");
        compiled.document(7).to_json_pretty()
    };
    let forward: Vec<usize> = (0..documents.len()).collect();
    let expected = render(&forward);
    let mut order = forward.clone();
    // A fixed pseudo-random walk over permutations (xorshift), plus the reverse order.
    let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
    for round in 0..40 {
        if round == 0 {
            order.reverse();
        } else {
            for i in (1..order.len()).rev() {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                order.swap(i, (seed % (i as u64 + 1)) as usize);
            }
        }
        assert_eq!(render(&order), expected, "order {order:?}");
    }
    let document = RelayDocument::from_json(expected.as_bytes()).unwrap_or_else(|e| panic!("{e}"));
    let rules: Vec<&str> = document.config.tenants["acme"]
        .rules
        .iter()
        .map(|r| r.name.as_str())
        .collect();
    assert_eq!(rules, ["r0", "r1", "r2"], "priority first, then name");
    let users: Vec<String> = document.config.tenants["acme"]
        .users
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(
        users,
        ["A@acme.example", "a@acme.example", "z@acme.example"],
        "local parts keep their case"
    );
}

#[test]
fn a_schema_error_names_the_field_path_and_leaves_the_rest() {
    let yaml = format!(
        "{ROUTES}\n---\napiVersion: mailroute.io/v1alpha1\nkind: MailRoute\nmetadata: {{name: typo, namespace: mail}}\nspec: {{host: a.example, tls: {{mod: Required}}}}\n"
    );
    let (compiled, problems) = compile_yaml(&yaml);
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(
        problems[0].starts_with(
            "MailRoute/typo: spec.tls.mod: unknown field `mod`, expected one of `mode`"
        ),
        "{}",
        problems[0]
    );
    assert_eq!(compiled.config.routes.len(), 2);
}

#[test]
fn hosts_routes_mx_routes_and_ip_literals_compile() {
    let yaml = r#"
apiVersion: mailroute.io/v1alpha1
kind: MailRoute
metadata: {name: split, namespace: mail}
spec:
  port: 2525
  hosts:
    primary: [{host: "[IPv6:2001:DB8::1]", weight: 3}, {host: a.example, port: 25}]
    secondary: [{host: 192.0.2.1}]
---
apiVersion: mailroute.io/v1alpha1
kind: MailRoute
metadata: {name: direct, namespace: mail}
spec: {host: Example.ORG, mxLookup: {mtaSts: true}}
---
apiVersion: mailroute.io/v1alpha1
kind: MailRoute
metadata: {name: nothing, namespace: mail}
spec: {hosts: {primary: [{host: a.example, weight: 0}]}}
---
apiVersion: mailroute.io/v1alpha1
kind: MailRoute
metadata: {name: both, namespace: mail}
spec: {host: a.example, hosts: {primary: [{host: b.example}]}}
---
apiVersion: mailroute.io/v1alpha1
kind: MailRoute
metadata: {name: mxip, namespace: mail}
spec: {host: 192.0.2.1, mxLookup: {}}
"#;
    let (compiled, problems) = compile_yaml(yaml);
    assert_eq!(
        problems,
        [
            "MailRoute/both: host: set exactly one of host or hosts",
            "MailRoute/mxip: host: \"192.0.2.1\" is an IP address literal; name a domain here (mxLookup needs a domain)",
            "MailRoute/nothing: hosts.primary: every weight is 0: no host would receive mail",
        ]
    );
    let Destination::HostSets { primary, secondary } = &compiled.config.routes["split"].destination
    else {
        panic!("expected host sets");
    };
    assert_eq!(
        primary[0].host,
        Host::Ip("2001:db8::1".parse().unwrap_or_else(|e| panic!("{e}")))
    );
    assert_eq!(
        (primary[0].port, primary[0].weight, primary[1].port),
        (2525, 3, 25)
    );
    assert_eq!(secondary[0].host.to_string(), "192.0.2.1");
    let Destination::Mx {
        domain,
        port,
        mta_sts,
        ..
    } = &compiled.config.routes["direct"].destination
    else {
        panic!("expected MX");
    };
    assert_eq!(
        (domain.as_str(), *port, *mta_sts),
        ("example.org", 25, true)
    );
}

#[test]
fn rule_actions_are_checked_field_by_field() {
    let yaml = format!(
        "{ROUTES}{}{}{}{}",
        policy("acme", ""),
        rule(
            "headers",
            "  messages: [Inbound]\n  actions:\n    addHeaders: [{name: Subject, value: x}, {name: X-Ok, value: \"a\\r\\nBcc: evil@x\"}]"
        ),
        rule(
            "reject",
            "  messages: [Inbound]\n  actions:\n    reject: {code: 550, enhancedCode: \"4.7.1\", text: \"no\"}\n    route: archive"
        ),
        rule(
            "copies",
            "  messages: [Outbound]\n  actions:\n    alsoDeliverTo: [{route: archive}, {route: archive}, {recipient: \"bad address\"}, {suppressBounces: false}]\n    rewriteRecipientDomain: \"acme.example.\""
        ),
    );
    let (_, problems) = compile_yaml(&yaml);
    assert_eq!(
        problems,
        [
            "RoutingRule/copies: actions.alsoDeliverTo[1]: the same copy is listed twice",
            "RoutingRule/copies: actions.alsoDeliverTo[2].recipient: \"bad address\" has no '@'",
            "RoutingRule/copies: actions.alsoDeliverTo[3]: set route, recipient, or both",
            "RoutingRule/copies: actions.rewriteRecipientDomain: \"acme.example.\" has a trailing dot; write the domain without it",
            "RoutingRule/headers: actions.addHeaders[0].name: \"Subject\" must start with X- and contain only printable ASCII without ':'",
            "RoutingRule/headers: actions.addHeaders[1].value: must be one line: no CR, LF or control characters",
            "RoutingRule/reject: actions.reject: cannot be combined with route, alsoDeliverTo or rewriteRecipientDomain",
            "RoutingRule/reject: actions.reject.enhancedCode: \"4.7.1\" must look like 5.x.y, of the same class as code 550",
        ]
    );
}

#[test]
fn a_rule_of_an_unknown_or_invalid_policy_is_reported() {
    let yaml = format!(
        "{}{}{}",
        policy("acme", "  licenses: 0").replace("  licenses: 10\n", ""),
        rule("orphan", "  messages: [Inbound]").replace("policyRef: acme", "policyRef: nobody"),
        rule("of-invalid", "  messages: [Inbound]"),
    );
    let (_, problems) = compile_yaml(&yaml);
    assert_eq!(
        problems,
        [
            "RelayPolicy/acme: licenses: must be at least 1",
            r#"RoutingRule/of-invalid: policyRef: RelayPolicy "acme" is invalid (see its status)"#,
            r#"RoutingRule/orphan: policyRef: no RelayPolicy "nobody" in namespace mail"#,
        ]
    );
}

#[test]
fn users_from_a_config_map_are_merged_and_bad_lines_named() {
    let yaml = format!(
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: dir, namespace: mail}}\ndata:\n  users: |\n    # directory\n    b@acme.example\n\n    a@acme.example\n    not an address\n{}",
        policy(
            "acme",
            "  users: [a@acme.example]\n  usersFrom: {configMapRef: {name: dir, key: users}}"
        )
    );
    let (_, problems) = compile_yaml(&yaml);
    assert_eq!(
        problems,
        ["RelayPolicy/acme: usersFrom.configMapRef: line 5: \"not an address\" has no '@'"]
    );
    let fixed = yaml.replace("    not an address\n", "");
    let (compiled, problems) = compile_yaml(&fixed);
    assert!(problems.is_empty(), "{problems:?}");
    assert_eq!(compiled.config.tenants["acme"].users.len(), 2);
}

#[test]
fn parent_domains_up_to_the_registrable_domain_are_internal() {
    let yaml = policy("acme", "").replace(
        "[acme.example]",
        "[eu.mail.acme.co.uk, sub.acme.example, acme.example]",
    );
    let (compiled, problems) = compile_yaml(&yaml);
    assert!(problems.is_empty(), "{problems:?}");
    let parents: Vec<&str> = compiled.config.tenants["acme"]
        .parent_domains
        .iter()
        .map(|d| d.as_str())
        .collect();
    // acme.example is a tenant domain itself, so it is not listed again as a parent.
    assert_eq!(parents, ["acme.co.uk", "mail.acme.co.uk"]);
}

#[test]
fn an_auth_username_in_two_tenants_is_refused_on_the_later_one() {
    let secret = |name: &str| {
        format!(
            "\n---\napiVersion: v1\nkind: Secret\nmetadata: {{name: {name}, namespace: mail}}\nstringData: {{app: pw, other-{name}: pw}}\n"
        )
    };
    let auth = |secret: &str| {
        format!(
            "  authentication:\n    requireSMTPAuth: true\n    credentialsSecretRef: {{name: {secret}}}"
        )
    };
    let yaml = format!(
        "{}{}{}{}",
        secret("a"),
        secret("z"),
        policy("acme", &auth("a")),
        policy("zeta", &auth("z"))
    );
    let (compiled, problems) = compile_yaml(&yaml);
    assert_eq!(
        problems,
        [
            r#"RelayPolicy/zeta: authentication.credentialsSecretRef: Secret "z": username "app" already belongs to RelayPolicy "acme""#
        ]
    );
    assert!(
        compiled.credentials.tenants.contains_key("acme")
            && !compiled.credentials.tenants.contains_key("zeta")
    );
}

#[test]
fn a_public_suffix_is_not_a_tenant_domain() {
    for suffix in ["co.uk", "com"] {
        let yaml = policy("acme", "").replace("[acme.example]", &format!("[{suffix}]"));
        let (compiled, problems) = compile_yaml(&yaml);
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(
            problems[0].starts_with(&format!(
                "RelayPolicy/acme: domains[0]: {suffix} is a public suffix"
            )),
            "{problems:?}"
        );
        assert!(compiled.config.tenants.is_empty());
    }
}

#[test]
fn an_object_of_our_group_that_cannot_be_read_is_an_error_naming_the_document() {
    for (typo, expect) in [
        ("kind: RelayPolicy", "kind: RelayPolcy"),
        (
            "apiVersion: mailroute.io/v1alpha1\nkind: RelayPolicy",
            "apiVersion: mailroute.io/v1alpa1\nkind: RelayPolicy",
        ),
    ] {
        let yaml = format!("{ROUTES}{}", policy("acme", "")).replacen(typo, expect, 1);
        let mut manifests = Manifests::default();
        let err = manifests
            .add_yaml(Path::new("policy.yaml"), &yaml)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.starts_with("policy.yaml: document 3: "), "{err}");
    }
    // Other groups are still only a warning.
    let mut manifests = Manifests::default();
    let other = "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web}\n";
    assert!(manifests.add_yaml(Path::new("x.yaml"), other).is_ok());
    assert_eq!(manifests.warnings.len(), 1);
}

#[test]
fn service_accounts_compile_to_token_subjects_and_belong_to_one_policy() {
    let acme = "  authentication:\n    requireSMTPAuth: true\n    serviceAccounts: [{name: ticketing}, {namespace: billing, name: invoices.v2}]";
    let (compiled, problems) = compile_yaml(&policy("acme", acme));
    assert!(problems.is_empty(), "{problems:?}");
    // The policy's own namespace unless one is named; requireSMTPAuth met by tokens alone.
    assert_eq!(
        compiled.config.tenants["acme"].service_accounts,
        [
            "system:serviceaccount:billing:invoices.v2",
            "system:serviceaccount:mail:ticketing"
        ]
    );
    // A second policy listing the same service account, and names Kubernetes cannot have.
    let zeta = "  authentication:\n    serviceAccounts: [{name: ticketing}, {namespace: Billing, name: x}, {name: \"app:admin\"}]";
    let (compiled, problems) =
        compile_yaml(&format!("{}{}", policy("acme", acme), policy("zeta", zeta)));
    assert_eq!(
        problems,
        [
            r#"RelayPolicy/zeta: authentication.serviceAccounts[0]: mail/ticketing already belongs to RelayPolicy "acme""#,
            r#"RelayPolicy/zeta: authentication.serviceAccounts[1].namespace: "Billing" is not a namespace name (lowercase letters, digits and '-', at most 63)"#,
            r#"RelayPolicy/zeta: authentication.serviceAccounts[2].name: "app:admin" is not a service account name (lowercase letters, digits, '-' and '.')"#,
        ]
    );
    assert_eq!(compiled.config.tenants.keys().collect::<Vec<_>>(), ["acme"]);
}

/// A Microsoft 365 route with OAuth: the client id and secret come from a Secret.
fn oauth2_route(oauth2: &str) -> String {
    format!(
        r#"
apiVersion: v1
kind: Secret
metadata: {{name: m365, namespace: mail}}
stringData: {{client-id: 00000000-app, client-secret: oauth-client-secret-value, refresh: oauth-refresh-token-value}}
---
apiVersion: mailroute.io/v1alpha1
kind: MailRoute
metadata: {{name: m365, namespace: mail}}
spec:
  host: smtp.office365.com
  port: 587
  tls: {{mode: Required}}
  auth:
    oauth2:
{oauth2}
"#
    )
}

const M365: &str = "      tokenURL: https://login.microsoftonline.com/tenant-id/oauth2/v2.0/token\n      username: relay@example.com\n      clientIDSecretRef: {name: m365, key: client-id}\n      clientSecretSecretRef: {name: m365, key: client-secret}\n      scopes: [https://outlook.office365.com/.default]";

#[test]
fn an_oauth2_route_keeps_its_client_in_the_credentials_never_the_document() {
    let (compiled, problems) = compile_yaml(&oauth2_route(M365));
    assert!(problems.is_empty(), "{problems:?}");
    assert!(compiled.config.routes["m365"].auth);
    let client = &compiled.credentials.oauth2["m365"];
    assert_eq!(client.client_id, "00000000-app");
    assert_eq!(
        client.client_secret.as_deref(),
        Some("oauth-client-secret-value")
    );
    assert_eq!(client.refresh_token, None);
    assert_eq!(client.username, "relay@example.com");
    assert_eq!(client.scopes, ["https://outlook.office365.com/.default"]);
    let json = compiled.document(1).to_json_pretty();
    assert!(!json.contains("oauth-client-secret-value"), "{json}");
    let debug = format!("{:?}", compiled.credentials);
    assert!(!debug.contains("oauth-client-secret-value"), "{debug}");
    let debug = format!("{client:?}");
    assert!(!debug.contains("oauth-client-secret-value"), "{debug}");

    // A refresh token (delegated access, as Google's SMTP needs) with the client secret.
    let google = format!("{M365}\n      refreshTokenSecretRef: {{name: m365, key: refresh}}");
    let (compiled, problems) = compile_yaml(&oauth2_route(&google));
    assert!(problems.is_empty(), "{problems:?}");
    let client = &compiled.credentials.oauth2["m365"];
    assert_eq!(
        client.refresh_token.as_deref(),
        Some("oauth-refresh-token-value")
    );
    assert!(!format!("{client:?}").contains("oauth-refresh-token-value"));
}

#[test]
fn oauth2_mistakes_name_the_field() {
    let cases = [
        (
            M365.replace("https://login", "http://login"),
            r#"MailRoute/m365: auth.oauth2.tokenURL: "http://login.microsoftonline.com/tenant-id/oauth2/v2.0/token" must be an https:// URL"#,
        ),
        (
            M365.replace(
                "https://login.microsoftonline.com",
                "https://user:pw@login.microsoftonline.com",
            ),
            r#"MailRoute/m365: auth.oauth2.tokenURL: "https://user:pw@login.microsoftonline.com/tenant-id/oauth2/v2.0/token" must be https://HOST[:PORT]/PATH, without spaces or user information"#,
        ),
        (
            M365.replace("key: client-secret", "key: nope"),
            r#"MailRoute/m365: auth.oauth2.clientSecretSecretRef: Secret "m365" has no key "nope""#,
        ),
        (
            M365.replace(
                "\n      clientSecretSecretRef: {name: m365, key: client-secret}",
                "",
            ),
            "MailRoute/m365: auth.oauth2.clientSecretSecretRef: set clientSecretSecretRef, refreshTokenSecretRef, or both",
        ),
        (
            M365.replace(
                "username: relay@example.com",
                "username: \"relay @example.com\"",
            ),
            r#"MailRoute/m365: auth.oauth2.username: "relay @example.com" must be a mailbox name without spaces or control characters"#,
        ),
        (
            M365.replace("[https://outlook.office365.com/.default]", "[\"a b\"]"),
            r#"MailRoute/m365: auth.oauth2.scopes: "a b" is not one scope (no spaces, quotes or backslashes)"#,
        ),
    ];
    for (oauth2, expected) in cases {
        let (compiled, problems) = compile_yaml(&oauth2_route(&oauth2));
        assert_eq!(problems, [expected], "{oauth2}");
        assert!(compiled.credentials.oauth2.is_empty());
    }
    // Both a password and OAuth, and OAuth in clear.
    let both = oauth2_route(M365).replace("  auth:\n", "  auth:\n    secretRef: {name: m365}\n");
    let (_, problems) = compile_yaml(&both);
    assert_eq!(
        problems,
        ["MailRoute/m365: auth: set exactly one of secretRef or oauth2"]
    );
    let clear = oauth2_route(M365).replace("mode: Required", "mode: Disabled");
    let (_, problems) = compile_yaml(&clear);
    assert_eq!(
        problems,
        [
            "MailRoute/m365: auth: credentials would be sent in clear: tls.mode Disabled cannot be combined with auth"
        ]
    );
}

#[test]
fn rate_limits_per_credential_need_a_credential() {
    let route = |extra: &str| {
        format!(
            r#"
apiVersion: mailroute.io/v1alpha1
kind: MailRoute
metadata: {{name: m365, namespace: mail}}
spec:
  host: smtp.office365.com
  port: 587
  rateLimits: {{messagesPerMinute: 30, maxConcurrentConnections: 3, per: Credential}}
{extra}"#
        )
    };
    let (_, problems) = compile_yaml(&route(""));
    assert_eq!(
        problems,
        [
            "MailRoute/m365: rateLimits.per: Credential needs auth (the credential the limits are counted for)"
        ]
    );
    let with_auth = oauth2_route(M365).replace(
        "  tls: {mode: Required}\n",
        "  tls: {mode: Required}\n  rateLimits: {messagesPerMinute: 30, maxConcurrentConnections: 3, per: Credential}\n",
    );
    let (compiled, problems) = compile_yaml(&with_auth);
    assert!(problems.is_empty(), "{problems:?}");
    let limits = compiled.config.routes["m365"]
        .rate_limits
        .clone()
        .unwrap_or_default();
    assert_eq!(limits.max_concurrent_connections, Some(3));
    assert_eq!(
        limits.per,
        mailroute_config::resources::RateLimitScope::Credential
    );
}

#[test]
fn dkim_keys_reach_the_credentials_never_the_document_and_mistakes_name_the_field() {
    let policy = |keys: &str| {
        format!(
            r#"
apiVersion: v1
kind: Secret
metadata: {{name: dkim, namespace: mail}}
stringData:
  key.pem: "-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIDKIMpretendkeymaterial=\n-----END PRIVATE KEY-----\n"
  junk: not a key
---
apiVersion: mailroute.io/v1alpha1
kind: RelayPolicy
metadata: {{name: example, namespace: mail}}
spec:
  domains: [example.com]
  licenses: 1
  dkim:
{keys}"#
        )
    };
    let (compiled, problems) = compile_yaml(&policy(
        "    - {domain: mail.example.com, selector: MR2026, algorithm: ed25519-sha256, headers: [Subject, From, subject], privateKeySecretRef: {name: dkim, key: key.pem}}\n",
    ));
    assert!(problems.is_empty(), "{problems:?}");
    let signing = &compiled.config.tenants["example"].dkim[0];
    assert_eq!(signing.record_name(), "mr2026._domainkey.mail.example.com");
    assert_eq!(signing.headers, ["from", "subject"]);
    assert!(signing.relaxed_headers && signing.relaxed_body);
    assert!(
        compiled.credentials.dkim["mr2026._domainkey.mail.example.com"]
            .contains("pretendkeymaterial")
    );
    let json = compiled.document(1).to_json_pretty();
    assert!(!json.contains("pretendkeymaterial"), "{json}");
    assert!(!format!("{:?}", compiled.credentials).contains("pretendkeymaterial"));

    for (keys, expected) in [
        (
            "    - {domain: other.example, selector: s, privateKeySecretRef: {name: dkim, key: key.pem}}\n",
            "RelayPolicy/example: dkim[0].domain: other.example is not one of the tenant's domains or their subdomains",
        ),
        (
            "    - {domain: example.com, selector: s, privateKeySecretRef: {name: dkim, key: junk}}\n",
            r#"RelayPolicy/example: dkim[0].privateKeySecretRef: Secret "dkim" key "junk" holds no PEM private key (-----BEGIN PRIVATE KEY-----)"#,
        ),
        (
            "    - {domain: example.com, selector: s, canonicalization: loose, privateKeySecretRef: {name: dkim, key: key.pem}}\n",
            r#"RelayPolicy/example: dkim[0].canonicalization: "loose": expected relaxed/relaxed, relaxed/simple, simple/relaxed or simple/simple"#,
        ),
        (
            "    - {domain: example.com, selector: \"a b\", privateKeySecretRef: {name: dkim, key: key.pem}}\n",
            r#"RelayPolicy/example: dkim[0].selector: "a b" is not a DNS name (letters, digits, '-', '.')"#,
        ),
    ] {
        let (_, problems) = compile_yaml(&policy(keys));
        assert_eq!(problems, [expected]);
    }
}
