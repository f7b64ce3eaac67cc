//! `mailroute-operator explain` runs the relay's own `explain` (which links the relay's session,
//! admission and routing; the operator does not): its arguments reach `mailroute-relay explain`
//! unchanged, its output and exit status are the relay's, and without a relay program the user
//! is told where it was looked for. A stand-in relay program records what it was given (the
//! real command is tested in `relay/tests/explain_cli.rs`).

use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Output};

fn operator_explain(relay: &std::path::Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_mailroute-operator"))
        .arg("explain")
        .args(args)
        .env("MAILROUTE_RELAY_BIN", relay)
        .output()
        .unwrap_or_else(|e| panic!("running mailroute-operator: {e}"))
}

#[test]
fn explain_hands_every_argument_to_the_relay_and_keeps_its_answer() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let relay = dir.path().join("mailroute-relay");
    std::fs::write(
        &relay,
        "#!/bin/sh\nfor a in \"$@\"; do printf '[%s]' \"$a\"; done\necho\necho refused >&2\nexit 1\n",
    )
    .unwrap_or_else(|e| panic!("{e}"));
    std::fs::set_permissions(&relay, std::fs::Permissions::from_mode(0o755))
        .unwrap_or_else(|e| panic!("{e}"));
    let out = operator_explain(
        &relay,
        &[
            "-f",
            "dir with space",
            "--from",
            "",
            "--to",
            "a@example.com,b@example.com",
            "-o",
            "json",
            "--help",
        ],
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "[explain][-f][dir with space][--from][][--to][a@example.com,b@example.com][-o][json][--help]"
    );
    assert_eq!(String::from_utf8_lossy(&out.stderr).trim(), "refused");
    assert_eq!(out.status.code(), Some(1), "the relay's exit status");
}

#[test]
fn without_a_relay_program_explain_says_where_it_looked_and_exits_2() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let out = operator_explain(&dir.path().join("absent"), &["--from", "a", "--to", "b"]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("explain needs mailroute-relay beside mailroute-operator, on PATH, or named by MAILROUTE_RELAY_BIN"),
        "{stderr}"
    );
}
