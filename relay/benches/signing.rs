//! What DKIM signing costs per message (SPEC 12, `RelayPolicy.dkim`): the relay's own signing
//! step (`delivery::signing::Signers::sign`: the From: parse, one SHA-256 pass over the body and
//! one private-key operation per key, the header spliced in) on 1 KiB and 100 KiB messages,
//! with an RSA-2048 key, an Ed25519 key, and both (a rotation), keys made by `openssl`.
//! Run: `cargo bench -p mailroute-relay --bench signing` (figures in docs/benchmarks.md).
//! Bounded: a fixed number of signings per case, in this process; no network.

use mailroute_relay::delivery::signing::Signers;
use mailroute_relay::interfaces::Transaction;
use mailroute_relay::metrics::Metrics;
use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

const ROUNDS: usize = 2_000;

fn key(algorithm: &str) -> String {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let path = dir.path().join("key.pem");
    let mut genpkey = Command::new("openssl");
    genpkey
        .args(["genpkey", "-algorithm", algorithm, "-out"])
        .arg(&path);
    if algorithm == "RSA" {
        genpkey.args(["-pkeyopt", "rsa_keygen_bits:2048"]);
    }
    genpkey.stderr(std::process::Stdio::null());
    assert!(
        genpkey.status().is_ok_and(|s| s.success()),
        "openssl genpkey"
    );
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{e}"))
}

fn signers(keys: &[(&str, &str, &str)]) -> Signers {
    let secret: String = keys
        .iter()
        .map(|(selector, _, pem)| {
            let body: String = pem.lines().map(|l| format!("    {l}\n")).collect();
            format!("  {selector}: |\n{body}")
        })
        .collect();
    let entries: String = keys
        .iter()
        .map(|(selector, algorithm, _)| {
            format!("    - {{domain: example.com, selector: {selector}, algorithm: {algorithm}, privateKeySecretRef: {{name: dkim, key: {selector}}}}}\n")
        })
        .collect();
    let yaml = format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: dkim, namespace: mail}}\nstringData:\n{secret}---\napiVersion: mailroute.io/v1alpha1\nkind: RelayPolicy\nmetadata: {{name: example, namespace: mail}}\nspec:\n  domains: [example.com]\n  licenses: 1\n  dkim:\n{entries}"
    );
    let mut manifests = mailroute_config::Manifests::default();
    manifests
        .add_yaml(std::path::Path::new("bench.yaml"), &yaml)
        .unwrap_or_else(|e| panic!("{e}"));
    let inputs = manifests.namespaces.remove("mail").unwrap_or_default();
    let compiled = mailroute_config::compile(&inputs);
    assert!(compiled.problems.is_empty(), "{:?}", compiled.problems);
    let (signers, errors) = Signers::new(&compiled.config, &compiled.credentials);
    assert!(errors.is_empty(), "{errors:?}");
    signers
}

fn transaction(size: usize) -> Transaction {
    let received = "Received: from client.test by relay.test; Fri, 4 Dec 2026 10:00:00 +0000\r\n";
    let mut content = received.as_bytes().to_vec();
    content.extend_from_slice(b"From: Alice <alice@example.com>\r\nTo: bob@partner.example\r\nSubject: bench\r\nDate: Fri, 04 Dec 2026 10:00:00 +0000\r\nMessage-ID: <b@example.com>\r\n\r\n");
    while content.len() < size {
        content.extend_from_slice(b"a line of the body, as a message's text would have it.\r\n");
    }
    Transaction {
        id: Arc::from("bench.1"),
        mail_from: "alice@example.com".to_owned(),
        original_sender: None,
        recipients: Vec::new(),
        body_8bit: false,
        smtputf8: false,
        declared_size: 0,
        received_len: received.len(),
        content,
        tenant: Some(Arc::from("example")),
        authorised: true,
        memory: None,
    }
}

fn main() {
    let rsa = key("RSA");
    let ed = key("ed25519");
    let metrics = Metrics::register(&mut prometheus_client::registry::Registry::default());
    println!("keys                 size      µs/message");
    for (name, keys) in [
        ("rsa-2048", vec![("rsa", "rsa-sha256", rsa.as_str())]),
        ("ed25519", vec![("ed", "ed25519-sha256", ed.as_str())]),
        (
            "rsa-2048 + ed25519",
            vec![
                ("rsa", "rsa-sha256", rsa.as_str()),
                ("ed", "ed25519-sha256", ed.as_str()),
            ],
        ),
    ] {
        let signers = signers(&keys);
        for (size, rounds) in [(1024, ROUNDS), (100 * 1024, ROUNDS / 4)] {
            // NB: the messages are made before the clock starts: only signing is timed.
            let mut txs: Vec<Transaction> = (0..rounds).map(|_| transaction(size)).collect();
            let unsigned = txs.first().map_or(0, |t| t.received_len);
            let started = Instant::now();
            for tx in &mut txs {
                signers.sign(tx, &metrics);
            }
            let elapsed = started.elapsed();
            let signed = txs.iter().filter(|t| t.received_len > unsigned).count();
            let per = elapsed.as_secs_f64() * 1e6 / rounds as f64;
            assert_eq!(signed, rounds, "every message signed");
            println!("{name:<20} {:>4} KiB  {per:>10.1}", size / 1024);
        }
    }
}
