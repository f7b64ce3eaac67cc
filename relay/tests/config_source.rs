//! `mailroute-relay --check` on the configurations users give it.

use std::path::Path;
use std::process::{Command, Output};

fn relay(args: &[&std::ffi::OsStr]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_mailroute-relay"))
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running mailroute-relay: {e}"))
}

fn examples() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples")
}

#[test]
fn every_example_loads_from_manifests() {
    for name in [
        "dual-delivery",
        "split-delivery",
        "outbound-gateway",
        "microsoft-365-oauth",
        "application-relay",
        "archive-copy",
        "smarthost-clients",
    ] {
        let dir = examples().join(name);
        let out = relay(&["--manifests".as_ref(), dir.as_os_str(), "--check".as_ref()]);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            stdout.starts_with("configuration OK: namespace mail, generation 1, sha256:"),
            "{stdout}"
        );
    }
}

#[test]
fn a_rendered_document_loads_and_a_tampered_one_does_not() {
    let manifests = examples().join("archive-copy");
    let loaded = mailroute_relay::config_source::from_manifests(&manifests, 9)
        .unwrap_or_else(|e| panic!("{e}"));
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let file = dir.path().join("relay.json");
    std::fs::write(&file, loaded.document.to_json_pretty()).unwrap_or_else(|e| panic!("{e}"));
    let out = relay(&["--config".as_ref(), file.as_os_str(), "--check".as_ref()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("generation 9"));

    std::fs::write(
        &file,
        loaded.document.to_json_pretty().replace("2525", "2526"),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let out = relay(&["--config".as_ref(), file.as_os_str(), "--check".as_ref()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("hash mismatch"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_relay_refuses_to_start_with_any_invalid_resource() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    std::fs::write(
        dir.path().join("policy.yaml"),
        "apiVersion: mailroute.io/v1alpha1\nkind: RelayPolicy\nmetadata: {name: acme}\nspec:\n  domains: [acme.example]\n  licenses: 3\n  authentication:\n    ipRanges: [{cidr: 10.0.0.0/8}]\n",
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let out = relay(&[
        "--manifests".as_ref(),
        dir.path().as_os_str(),
        "--check".as_ref(),
    ]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("RelayPolicy/acme: authentication.ipRanges[0].cidr: 10.0.0.0/8 covers more than 65,536 addresses"),
        "{stderr}"
    );
}

#[test]
fn a_public_suffix_as_a_tenant_domain_is_refused_naming_the_field() {
    for suffix in ["co.uk", "com"] {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        std::fs::write(
            dir.path().join("policy.yaml"),
            format!("apiVersion: mailroute.io/v1alpha1\nkind: RelayPolicy\nmetadata: {{name: acme}}\nspec:\n  domains: [{suffix}]\n  licenses: 3\n"),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let out = relay(&[
            "--manifests".as_ref(),
            dir.path().as_os_str(),
            "--check".as_ref(),
        ]);
        assert_eq!(out.status.code(), Some(2));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains(&format!(
                "RelayPolicy/acme: domains[0]: {suffix} is a public suffix"
            )),
            "{stderr}"
        );
    }
}

#[test]
fn no_configuration_source_is_a_usage_error() {
    let out = relay(&["--check".as_ref()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--manifests"));
}
