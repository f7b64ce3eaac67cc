//! `mailroute-operator render -f DIR` as a user runs it.

use std::path::Path;
use std::process::{Command, Output};

fn render(dir: &Path, extra: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_mailroute-operator"))
        .arg("render")
        .arg("-f")
        .arg(dir)
        .args(extra)
        .output()
        .unwrap_or_else(|e| panic!("running mailroute-operator: {e}"))
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn examples() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples")
}

#[test]
fn every_example_renders_cleanly() {
    for name in [
        "dual-delivery",
        "split-delivery",
        "outbound-gateway",
        "application-relay",
        "archive-copy",
    ] {
        let out = render(&examples().join(name), &[]);
        assert!(out.status.success(), "{name}: {}", text(&out.stderr));
        assert_eq!(text(&out.stderr), "", "{name}");
        let document: serde_json::Value =
            serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(document["apiVersion"], "mailroute.io/relay-config/v1");
        assert_eq!(document["config"]["namespace"], "mail");
    }
}

#[test]
fn render_is_repeatable_and_stamps_the_generation() {
    let dir = examples().join("split-delivery");
    let a = render(&dir, &["--generation", "42"]);
    let b = render(&dir, &["--generation", "42"]);
    assert_eq!(a.stdout, b.stdout);
    let document: serde_json::Value =
        serde_json::from_slice(&a.stdout).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(document["generation"], 42);
}

#[test]
fn invalid_resources_are_named_on_stderr_with_exit_1_and_the_rest_still_rendered() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    std::fs::write(
        dir.path().join("a.yaml"),
        r#"
apiVersion: mailroute.io/v1alpha1
kind: MailRoute
metadata: {name: mailbox, namespace: mail}
spec: {host: mailbox.mail.svc}
---
apiVersion: mailroute.io/v1alpha1
kind: RoutingRule
metadata: {name: split, namespace: mail}
spec: {policyRef: acme, messages: [Inbound], actions: {route: legacy}}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: app, namespace: mail}
"#,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    std::fs::write(
        dir.path().join("b.yml"),
        "apiVersion: mailroute.io/v1alpha1\nkind: RelayPolicy\nmetadata: {name: acme, namespace: mail}\nspec: {domains: [acme.example], licenses: 5}\n",
    )
    .unwrap_or_else(|e| panic!("{e}"));
    std::fs::write(dir.path().join("notes.txt"), "not a manifest")
        .unwrap_or_else(|e| panic!("{e}"));

    let out = render(dir.path(), &[]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains(
            r#"error: RoutingRule/split: actions.route: no MailRoute "legacy" in namespace mail"#
        ),
        "{stderr}"
    );
    assert!(
        stderr.contains("apps/v1 Deployment/app is not a Mailroute resource"),
        "{stderr}"
    );
    let document: serde_json::Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}"));
    assert!(document["config"]["routes"]["mailbox"].is_object());
    assert!(document["config"]["tenants"]["acme"].is_object());
}

#[test]
fn unreadable_input_is_a_clear_error_with_exit_2() {
    let out = render(Path::new("/nonexistent/manifests"), &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("/nonexistent/manifests"),
        "{}",
        text(&out.stderr)
    );

    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    std::fs::write(
        dir.path().join("bad.yaml"),
        "kind: MailRoute\nspec: {host: [unclosed\n",
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let out = render(dir.path(), &[]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = text(&out.stderr);
    assert!(stderr.contains("bad.yaml: not valid YAML"), "{stderr}");

    let empty = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let out = render(empty.path(), &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("no *.yaml or *.yml files"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn several_namespaces_need_a_choice() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    for ns in ["blue", "green"] {
        std::fs::write(
            dir.path().join(format!("{ns}.yaml")),
            format!("apiVersion: mailroute.io/v1alpha1\nkind: MailRoute\nmetadata: {{name: r, namespace: {ns}}}\nspec: {{host: {ns}.example}}\n"),
        )
        .unwrap_or_else(|e| panic!("{e}"));
    }
    let out = render(dir.path(), &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr)
            .contains("the manifests span namespaces blue, green: choose one with --namespace"),
        "{}",
        text(&out.stderr)
    );
    let out = render(dir.path(), &["--namespace", "green"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("green.example"));
}

#[test]
fn a_public_suffix_as_a_tenant_domain_is_named_and_left_out() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    std::fs::write(
        dir.path().join("policy.yaml"),
        "apiVersion: mailroute.io/v1alpha1\nkind: RelayPolicy\nmetadata: {name: acme, namespace: mail}\nspec:\n  domains: [co.uk]\n  licenses: 3\n",
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let out = render(dir.path(), &[]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("RelayPolicy/acme: domains[0]: co.uk is a public suffix"),
        "{stderr}"
    );
}
