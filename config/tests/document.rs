//! What a relay accepts as a document, and what it refuses.

use mailroute_config::document::DocumentError;
use mailroute_config::{Manifests, RelayDocument, compile};
use std::path::Path;

fn example_document(name: &str) -> RelayDocument {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../examples")
        .join(name);
    let mut manifests = Manifests::read_dir(&dir).unwrap_or_else(|e| panic!("{e}"));
    let inputs = manifests
        .namespaces
        .remove("mail")
        .unwrap_or_else(|| panic!("no namespace mail"));
    let compiled = compile(&inputs);
    assert!(compiled.problems.is_empty(), "{:?}", compiled.problems);
    compiled.document(3)
}

#[test]
fn every_example_document_loads_back_unchanged() {
    for name in [
        "dual-delivery",
        "split-delivery",
        "outbound-gateway",
        "application-relay",
        "archive-copy",
    ] {
        let document = example_document(name);
        let json = document.to_json_pretty();
        let loaded =
            RelayDocument::from_json(json.as_bytes()).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(loaded, document, "{name}");
        assert_eq!(loaded.generation, 3);
    }
}

#[test]
fn a_document_edited_after_compilation_is_refused() {
    let json = example_document("dual-delivery").to_json_pretty();
    let edited = json.replace("exchange.corp.example.com", "exchange.evil.example.com");
    assert!(matches!(
        RelayDocument::from_json(edited.as_bytes()),
        Err(DocumentError::Hash { .. })
    ));
    let truncated = &json[..json.len() / 2];
    assert!(matches!(
        RelayDocument::from_json(truncated.as_bytes()),
        Err(DocumentError::Syntax(_))
    ));
}

#[test]
fn another_format_version_is_refused_by_name() {
    let json = example_document("archive-copy").to_json_pretty().replace(
        "mailroute.io/relay-config/v1",
        "mailroute.io/relay-config/v2",
    );
    let err = RelayDocument::from_json(json.as_bytes())
        .err()
        .map(|e| e.to_string());
    assert_eq!(
        err.as_deref(),
        Some(
            r#"apiVersion is "mailroute.io/relay-config/v2"; this relay reads "mailroute.io/relay-config/v1""#
        )
    );
}

#[test]
fn a_consistently_hashed_but_dangling_document_is_refused() {
    let mut document = example_document("dual-delivery");
    document.config.routes.remove("legacy-exchange");
    let document = RelayDocument::new(4, document.config);
    let err = RelayDocument::from_json(document.to_json_pretty().as_bytes())
        .err()
        .map(|e| e.to_string());
    assert_eq!(
        err.as_deref(),
        Some(
            r#"inconsistent document: tenant example rule copy-to-legacy: actions.alsoDeliverTo.route: no route "legacy-exchange""#
        )
    );
}

#[test]
fn bad_values_inside_a_document_are_refused_by_their_types() {
    let json = example_document("application-relay").to_json_pretty();
    for (from, to, expect) in [
        ("10.42.0.0/16", "10.42.0.0/99", "invalid IP address"),
        (
            "noreply@example.com",
            "noreply@@example.com",
            "noreply@@example.com",
        ),
        ("\"allowedSenders\"", "\"allowedSendersX\"", "unknown field"),
    ] {
        assert!(json.contains(from), "{from}");
        let err = RelayDocument::from_json(json.replace(from, to).as_bytes())
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains(expect), "{from} -> {to}: {err}");
    }
}
