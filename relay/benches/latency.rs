//! Latency at concurrency 1 (SPEC section 10): the client's time from MAIL to the 250 after
//! DATA, for 1 KiB messages over one kept-open session, straight into Postfix's `smtp-sink`
//! ("direct"), through the release `mailroute-relay` binary to the same sink, and through a
//! relay that also copies every message to a second sink (an archive: the copy's final `.`
//! waits for the primary's 250, SPEC 6.3), side by side.
//! Run: `cargo bench -p mailroute-relay --bench latency` (figures in docs/benchmarks.md).
//! Bounded: MESSAGES transactions per path on loopback, then everything stops.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

const MESSAGES: usize = 5_000;
const WARMUP: usize = 200;

struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap_or_else(|e| panic!("{e}"))
}

fn wait_for(addr: SocketAddr) {
    for _ in 0..500 {
        if std::net::TcpStream::connect(addr).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("{addr} never listened");
}

async fn reply(reader: &mut BufReader<TcpStream>) -> String {
    let mut all = String::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).await.unwrap_or(0) == 0 {
            return all;
        }
        all.push_str(&line);
        if line.as_bytes().get(3) == Some(&b' ') {
            return all;
        }
    }
}

/// MAIL, RCPT, DATA and the content in the order a non-pipelining client sends them; returns
/// the sorted latencies in microseconds.
async fn measure(addr: SocketAddr) -> Vec<u64> {
    let stream = TcpStream::connect(addr)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    stream.set_nodelay(true).unwrap_or_else(|e| panic!("{e}"));
    let mut s = BufReader::new(stream);
    reply(&mut s).await;
    s.get_mut()
        .write_all(b"EHLO client.bench.example\r\n")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    reply(&mut s).await;
    let body = format!(
        "Subject: latency\r\n\r\n{}\r\n.\r\n",
        "x".repeat(1022)
            .as_bytes()
            .chunks(70)
            .map(|c| String::from_utf8_lossy(c).into_owned())
            .collect::<Vec<_>>()
            .join("\r\n")
    );
    let mut out = Vec::with_capacity(MESSAGES);
    for i in 0..MESSAGES + WARMUP {
        let start = Instant::now();
        for command in [
            "MAIL FROM:<bench@bench.example>\r\n",
            "RCPT TO:<user@bench.example>\r\n",
            "DATA\r\n",
        ] {
            s.get_mut()
                .write_all(command.as_bytes())
                .await
                .unwrap_or_else(|e| panic!("{e}"));
            reply(&mut s).await;
        }
        s.get_mut()
            .write_all(body.as_bytes())
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let answer = reply(&mut s).await;
        assert!(answer.starts_with("250"), "{answer}");
        if i >= WARMUP {
            out.push(start.elapsed().as_micros() as u64);
        }
    }
    out.sort_unstable();
    out
}

fn percentile(sorted: &[u64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i] as f64 / 1000.0
}

fn main() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap_or_else(|e| panic!("{e}"));
    let sink_addr = free_addr();
    let _sink = Process(
        Command::new("smtp-sink")
            .args(["-u", "root", &sink_addr.to_string(), "100"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("smtp-sink (package postfix): {e}")),
    );
    wait_for(sink_addr);
    let archive_addr = free_addr();
    let _archive = Process(
        Command::new("smtp-sink")
            .args(["-u", "root", &archive_addr.to_string(), "100"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("smtp-sink (package postfix): {e}")),
    );
    wait_for(archive_addr);
    let route = |name: &str, addr: SocketAddr| {
        format!(
            "apiVersion: mailroute.io/v1alpha1\nkind: MailRoute\nmetadata: {{name: {name}, namespace: bench}}\n\
             spec: {{host: 127.0.0.1, port: {}, tls: {{mode: Disabled}}}}\n---\n",
            addr.port()
        )
    };
    let policy = "apiVersion: mailroute.io/v1alpha1\nkind: RelayPolicy\nmetadata: {name: bench, namespace: bench}\n\
                  spec: {domains: [bench.example], licenses: 100000, inboundRoute: sink}\n";
    let copy_rule = "---\napiVersion: mailroute.io/v1alpha1\nkind: RoutingRule\nmetadata: {name: journal, namespace: bench}\n\
                     spec: {policyRef: bench, priority: 1, messages: [Inbound], actions: {alsoDeliverTo: [{route: archive}]}}\n";
    let plain = format!("{}{policy}", route("sink", sink_addr));
    let copying = format!(
        "{}{}{policy}{copy_rule}",
        route("sink", sink_addr),
        route("archive", archive_addr)
    );
    let (relay_addr, _relay, _dir) = start_relay(&plain);
    let (copy_addr, _copy_relay, _copy_dir) = start_relay(&copying);
    println!("MAIL -> 250 after DATA, 1 KiB, concurrency 1, {MESSAGES} messages each (ms)");
    println!("{:<12} {:>8} {:>8} {:>8}", "path", "p50", "p99", "max");
    for (name, addr) in [
        ("direct", sink_addr),
        ("relay", relay_addr),
        ("relay+copy", copy_addr),
    ] {
        let lat = runtime.block_on(measure(addr));
        println!(
            "{:<12} {:>8.3} {:>8.3} {:>8.3}",
            name,
            percentile(&lat, 0.5),
            percentile(&lat, 0.99),
            percentile(&lat, 1.0)
        );
    }
}

/// The release relay on a free port, serving `manifests`.
fn start_relay(manifests: &str) -> (SocketAddr, Process, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    std::fs::write(dir.path().join("bench.yaml"), manifests).unwrap_or_else(|e| panic!("{e}"));
    let addr = free_addr();
    let binary = env!("CARGO_BIN_EXE_mailroute-relay");
    let relay = Process(
        Command::new(binary)
            .args(["--manifests"])
            .arg(dir.path())
            .args([
                "--hostname",
                "relay.bench.example",
                "--max-sessions-per-ip",
                "1000",
            ])
            .args(["--smtp"])
            .arg(addr.to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("{e}")),
    );
    wait_for(addr);
    (addr, relay, dir)
}
