//! `mailroute-relay explain` (what `mailroute-operator explain` runs) as a user runs it: text for
//! people, JSON for scripts, an exit status a script can branch on, and a clear message when the
//! envelope or the source is wrong. (That its answers are the running relay's is
//! `relay/tests/explain.rs`.)

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn explain(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_mailroute-relay"))
        .arg("explain")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running mailroute-relay: {e}"))
}

fn example(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../examples")
        .join(name)
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn dual_delivery_is_explained_for_people_and_for_scripts() {
    let dir = example("dual-delivery");
    let dir = dir.to_string_lossy();
    let args = [
        "-f",
        &dir,
        "--from",
        "partner@outside.example",
        "--to",
        "alice@example.com",
    ];
    let out = explain(&args);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}{}", text(&out.stderr));
    for expected in [
        "alice@example.com: 250 2.1.5",
        "tenant example, inbound, account type Users",
        "rule copy-to-legacy",
        "copy to legacy-exchange: alice@example.com",
        "legacy-exchange (copy)",
        "S: 250 2.0.0 OK",
    ] {
        assert!(
            stdout.contains(expected),
            "{expected:?} missing from:\n{stdout}"
        );
    }

    let json = explain(&[&args[..], &["-o", "json"]].concat());
    let value: serde_json::Value =
        serde_json::from_slice(&json.stdout).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(value["recipients"][0]["direction"], "inbound");
    assert_eq!(value["legs"][1]["target"], "legacy-exchange");
    assert_eq!(value["legs"][1]["copy"], true);
}

#[test]
fn a_refused_envelope_exits_1_and_a_missing_source_exits_2_with_a_message() {
    let dir = example("dual-delivery");
    let dir = dir.to_string_lossy();
    let refused = explain(&[
        "-f",
        &dir,
        "--from",
        "spammer@prober.example",
        "--to",
        "victim@external.example",
    ]);
    let stdout = text(&refused.stdout);
    assert_eq!(refused.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.contains("victim@external.example: 550 5.7.1"),
        "{stdout}"
    );
    assert!(stdout.contains("refused: relay_denied"), "{stdout}");

    let nothing = explain(&["--from", "a@example.com", "--to", "b@example.com"]);
    assert_eq!(nothing.status.code(), Some(2));
    assert!(
        text(&nothing.stderr).contains("--filename <DIR>|--config <PATH>|--configmap"),
        "{}",
        text(&nothing.stderr)
    );

    let bracketed = explain(&[
        "-f",
        &dir,
        "--from",
        "<a@example.com>",
        "--to",
        "b@example.com",
    ]);
    assert_eq!(bracketed.status.code(), Some(2));
    assert!(
        text(&bracketed.stderr).contains("without <>"),
        "{}",
        text(&bracketed.stderr)
    );
}
