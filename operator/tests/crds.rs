//! The committed CRDs are what the Rust types generate, and their CEL rules accept the examples
//! and refuse what the compiler refuses, as an API server would.

use kube::core::cel::Validator;
use mailroute_operator::crdgen;
use serde_json::{Value, json};
use std::path::Path;

#[test]
fn committed_crds_are_up_to_date() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../crds");
    for crd in crdgen::crds() {
        let file = dir.join(crdgen::file_name(&crd));
        let committed = std::fs::read_to_string(&file).unwrap_or_default();
        let generated = crdgen::to_yaml(&crd).unwrap_or_else(|e| panic!("{e}"));
        assert!(
            committed == generated,
            "{} is stale: run `cargo run -p mailroute-operator -- crdgen --out crds` and commit the result",
            file.display()
        );
    }
}

/// `kubectl get <category> <name>` must mean one thing: a category that is also some kind's
/// singular, plural, short name or kind makes `kubectl get mailroute X` ambiguous ("you must
/// specify only one resource").
#[test]
fn no_category_is_also_a_resource_name() {
    let crds = crdgen::crds();
    let mut names = Vec::new();
    for crd in &crds {
        let n = &crd.spec.names;
        names.push(n.plural.to_lowercase());
        names.push(n.kind.to_lowercase());
        names.extend(n.singular.iter().map(|s| s.to_lowercase()));
        names.extend(n.short_names.iter().flatten().map(|s| s.to_lowercase()));
    }
    for crd in &crds {
        let categories = crd.spec.names.categories.clone().unwrap_or_default();
        assert!(
            !categories.is_empty(),
            "{} has no category",
            crd.spec.names.kind
        );
        for category in categories {
            assert!(
                !names.contains(&category.to_lowercase()),
                "category {category} of {} is also a resource name: {names:?}",
                crd.spec.names.kind
            );
        }
    }
}

/// `kubectl get` shows what users look for: the hosts of a `hosts:` route, a policy's domains,
/// and with `-o wide` why a resource is not Ready; conditions merge by type (a list-map, as
/// Kubernetes' own conditions).
#[test]
fn printer_columns_and_conditions_are_what_kubectl_users_expect() {
    for crd in crdgen::crds() {
        let kind = crd.spec.names.kind.clone();
        let version = &crd.spec.versions[0];
        let columns = version
            .additional_printer_columns
            .clone()
            .unwrap_or_default();
        let column = |name: &str| columns.iter().find(|c| c.name == name).cloned();
        for wide in ["Reason", "Message"] {
            let c = column(wide).unwrap_or_else(|| panic!("{kind}: no {wide} column"));
            assert_eq!(c.priority, Some(1), "{kind}: {wide} belongs to -o wide");
            assert!(
                c.json_path.contains(r#"@.type=="Ready""#),
                "{kind}: {}",
                c.json_path
            );
        }
        match kind.as_str() {
            "MailRoute" => {
                assert!(column("Host").is_some());
                let hosts = column("Hosts").unwrap_or_else(|| panic!("no Hosts column"));
                assert_eq!(hosts.json_path, ".spec.hosts.primary[*].host");
            }
            "RelayPolicy" => {
                let domains = column("Domains").unwrap_or_else(|| panic!("no Domains column"));
                assert_eq!(domains.json_path, ".spec.domains");
            }
            _ => {}
        }
        let conditions = &schema(&kind)["properties"]["status"]["properties"]["conditions"];
        assert_eq!(conditions["x-kubernetes-list-type"], "map", "{kind}");
        assert_eq!(
            conditions["x-kubernetes-list-map-keys"],
            json!(["type"]),
            "{kind}"
        );
        let required = conditions["items"]["required"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        assert!(
            required.contains(&json!("type")),
            "{kind}: a list-map key must be required"
        );
    }
}

/// The openAPIV3Schema of the CRD for `kind`.
fn schema(kind: &str) -> Value {
    let crd = crdgen::crds()
        .into_iter()
        .find(|c| c.spec.names.kind == kind)
        .unwrap_or_else(|| panic!("no CRD for {kind}"));
    let schema = crd.spec.versions[0]
        .schema
        .as_ref()
        .and_then(|s| s.open_api_v3_schema.clone())
        .unwrap_or_else(|| panic!("no schema for {kind}"));
    serde_json::to_value(schema).unwrap_or_else(|e| panic!("{e}"))
}

/// CEL messages the API server would return for `object`, after applying schema defaults the
/// way it does (the examples omit defaulted fields the rules read).
fn cel_errors(object: &Value) -> Vec<String> {
    let kind = object["kind"].as_str().unwrap_or_default();
    let schema = schema(kind);
    let mut object = object.clone();
    apply_defaults(&schema, &mut object);
    match Validator::new().validate(&schema, &object, None) {
        Ok(()) => Vec::new(),
        Err(errors) => errors.to_string().lines().map(str::to_owned).collect(),
    }
}

/// Structural defaulting as the API server does it: a missing property with a `default` gets it.
fn apply_defaults(schema: &Value, value: &mut Value) {
    if let (Some(props), Some(obj)) = (
        schema.get("properties").and_then(Value::as_object),
        value.as_object_mut(),
    ) {
        for (name, prop) in props {
            if !obj.contains_key(name)
                && let Some(default) = prop.get("default")
            {
                obj.insert(name.clone(), default.clone());
            }
            if let Some(child) = obj.get_mut(name) {
                apply_defaults(prop, child);
            }
        }
    }
    if let (Some(items), Some(array)) = (schema.get("items"), value.as_array_mut()) {
        for item in array {
            apply_defaults(items, item);
        }
    }
}

fn examples() -> Vec<Value> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let mut objects = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{e}")) {
        let path = entry.unwrap_or_else(|e| panic!("{e}")).path();
        for file in std::fs::read_dir(&path).into_iter().flatten().flatten() {
            if file.path().extension().is_some_and(|e| e == "yaml") {
                let text = std::fs::read_to_string(file.path()).unwrap_or_else(|e| panic!("{e}"));
                let docs: Vec<Value> =
                    serde_saphyr::from_multiple(&text).unwrap_or_else(|e| panic!("{e}"));
                objects.extend(
                    docs.into_iter()
                        .filter(|d| d["apiVersion"] == "mailroute.io/v1alpha1"),
                );
            }
        }
    }
    objects
}

#[test]
fn every_example_passes_the_crd_cel_rules() {
    let examples = examples();
    assert!(
        examples.len() >= 12,
        "found only {} example resources",
        examples.len()
    );
    for object in &examples {
        assert_eq!(
            cel_errors(object),
            Vec::<String>::new(),
            "{}",
            object["metadata"]["name"]
        );
    }
}

fn resource(kind: &str, spec: Value) -> Value {
    json!({"apiVersion": "mailroute.io/v1alpha1", "kind": kind, "metadata": {"name": "x"}, "spec": spec})
}

/// `auth.oauth2` with its required fields, and `extra` over them.
fn oauth2(extra: Value) -> Value {
    let mut o = json!({"tokenURL": "https://login.example/token", "username": "relay@a.example", "clientIDSecretRef": {"name": "s", "key": "id"}});
    if let (Some(o), Some(extra)) = (o.as_object_mut(), extra.as_object()) {
        o.extend(extra.clone());
    }
    o
}

/// One object per CEL rule that the rule must refuse, with the message it must give.
fn refused_samples() -> Vec<(Value, &'static str)> {
    vec![
        (
            resource(
                "MailRoute",
                json!({"host": "a.example", "hosts": {"primary": [{"host": "b.example"}]}}),
            ),
            "set exactly one of host or hosts",
        ),
        (
            resource("MailRoute", json!({})),
            "set exactly one of host or hosts",
        ),
        (
            resource(
                "MailRoute",
                json!({"hosts": {"primary": [{"host": "b.example"}]}, "mxLookup": {}}),
            ),
            "mxLookup needs host",
        ),
        (
            resource("MailRoute", json!({"host": "a.example", "port": 80})),
            "port must be 25, 465, 587 or 1024-65535",
        ),
        (
            resource(
                "MailRoute",
                json!({"host": "a.example", "tls": {"mode": "Disabled", "caBundleSecretRef": {"name": "s", "key": "k"}}}),
            ),
            "caBundleSecretRef has no effect",
        ),
        (
            resource(
                "MailRoute",
                json!({"host": "a.example", "auth": {"secretRef": {"name": "s"}, "oauth2": oauth2(json!({"clientSecretSecretRef": {"name": "s", "key": "c"}}))}}),
            ),
            "set exactly one of secretRef or oauth2",
        ),
        (
            resource("MailRoute", json!({"host": "a.example", "auth": {}})),
            "set exactly one of secretRef or oauth2",
        ),
        (
            resource(
                "MailRoute",
                json!({"host": "a.example", "auth": {"oauth2": oauth2(json!({}))}}),
            ),
            "set clientSecretSecretRef, refreshTokenSecretRef, or both",
        ),
        (
            resource(
                "MailRoute",
                json!({"host": "a.example", "auth": {"oauth2": oauth2(json!({"tokenURL": "http://login.example/token", "refreshTokenSecretRef": {"name": "s", "key": "r"}}))}}),
            ),
            "tokenURL must be an https:// URL",
        ),
        (
            resource(
                "MailRoute",
                json!({"host": "a.example", "rateLimits": {"messagesPerMinute": 30, "per": "Credential"}}),
            ),
            "rateLimits.per Credential needs auth",
        ),
        (
            resource(
                "RelayPolicy",
                json!({"domains": ["a.example"], "licenses": 1, "authentication": {"requireSMTPAuth": true}}),
            ),
            "requireSMTPAuth needs credentialsSecretRef or serviceAccounts",
        ),
        (
            resource(
                "RelayPolicy",
                json!({"domains": ["a.example"], "licenses": 1, "usersFrom": {}}),
            ),
            "set exactly one of configMapRef or secretRef",
        ),
        (
            resource(
                "RoutingRule",
                json!({"policyRef": "p", "messages": ["Inbound"], "envelopeFilter": {"senders": [{"address": "a@b.example", "domain": "b.example"}]}}),
            ),
            "set exactly one of address, pattern, domain or group",
        ),
        (
            resource(
                "RoutingRule",
                json!({"policyRef": "p", "messages": ["Inbound"], "actions": {"alsoDeliverTo": [{"suppressBounces": false}]}}),
            ),
            "set route, recipient, or both",
        ),
        (
            resource(
                "RoutingRule",
                json!({"policyRef": "p", "messages": ["Inbound"], "actions": {"route": "r", "reject": {"code": 550, "enhancedCode": "5.7.1", "text": "no"}}}),
            ),
            "reject cannot be combined",
        ),
        (
            resource(
                "RoutingRule",
                json!({"policyRef": "p", "messages": ["Inbound"], "actions": {"reject": {"code": 550, "enhancedCode": "4.7.1", "text": "no"}}}),
            ),
            "enhancedCode must have the same class as code",
        ),
    ]
}

/// Every `x-kubernetes-validations` message in `schema`, wherever the rule sits.
fn rule_messages(schema: &Value, out: &mut Vec<String>) {
    match schema {
        Value::Object(map) => {
            if let Some(rules) = map
                .get("x-kubernetes-validations")
                .and_then(Value::as_array)
            {
                for rule in rules {
                    out.push(rule["message"].as_str().unwrap_or_default().to_owned());
                }
            }
            map.values().for_each(|v| rule_messages(v, out));
        }
        Value::Array(items) => items.iter().for_each(|v| rule_messages(v, out)),
        _ => {}
    }
}

/// A rule no sample trips could be one that never fires (or one the API server would not
/// compile, which the evaluation would show): each must refuse at least one sample.
#[test]
fn every_cel_rule_refuses_a_sample_of_its_own() {
    let samples = refused_samples();
    for kind in ["MailRoute", "RoutingRule", "RelayPolicy"] {
        let mut messages = Vec::new();
        rule_messages(&schema(kind), &mut messages);
        assert!(!messages.is_empty(), "{kind} has no CEL rule");
        for message in messages {
            assert!(
                samples.iter().any(|(o, expected)| o["kind"] == kind
                    && message.contains(expected)
                    && cel_errors(o).iter().any(|e| e.contains(expected))),
                "{kind}: no sample is refused by the rule {message:?}"
            );
        }
    }
}

#[test]
fn cel_rules_refuse_cross_field_mistakes() {
    for (object, expected) in refused_samples() {
        let errors = cel_errors(&object);
        assert!(
            errors.iter().any(|e| e.contains(expected)),
            "{object}: expected {expected:?}, got {errors:?}"
        );
    }
    let fine = resource(
        "RoutingRule",
        json!({"policyRef": "p", "messages": ["Inbound"], "actions": {"reject": {"code": 450, "enhancedCode": "4.7.1", "text": "later"}}}),
    );
    assert_eq!(cel_errors(&fine), Vec::<String>::new());
}

/// Paths of schema properties without a description (what `kubectl explain` would show empty).
fn undescribed(schema: &Value, path: &str, out: &mut Vec<String>) {
    if let Some(props) = schema.get("properties").and_then(Value::as_object) {
        for (name, prop) in props {
            let here = format!("{path}.{name}");
            if prop
                .get("description")
                .and_then(Value::as_str)
                .is_none_or(str::is_empty)
            {
                out.push(here.clone());
            }
            undescribed(prop, &here, out);
        }
    }
    if let Some(items) = schema.get("items") {
        undescribed(items, &format!("{path}[]"), out);
    }
}

#[test]
fn kubectl_explain_has_a_description_for_every_field() {
    for kind in ["MailRoute", "RoutingRule", "RelayPolicy"] {
        let mut missing = Vec::new();
        let schema = schema(kind);
        undescribed(&schema["properties"]["spec"], "spec", &mut missing);
        undescribed(&schema["properties"]["status"], "status", &mut missing);
        assert_eq!(missing, Vec::<String>::new(), "{kind}");
    }
}
