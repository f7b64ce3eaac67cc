//! Sessions benchmark: memory per idle session, greeting latency with thousands of idle
//! sessions open, and sessions accepted per second, against the real `mailroute-relay` binary on
//! loopback. Run: `cargo bench -p mailroute-relay --bench sessions` (figures in
//! docs/benchmarks.md). Bounded: at most IDLE sessions, a fixed run time, then it stops.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

const IDLE: usize = 10_000;
const ACCEPT_SECONDS: u64 = 5;
const ACCEPT_CONCURRENCY: usize = 50;

struct RelayProcess(Child);

impl Drop for RelayProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

async fn greeting(addr: SocketAddr) -> Option<BufReader<TcpStream>> {
    let stream = TcpStream::connect(addr).await.ok()?;
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader.read_line(&mut line).await.ok()?;
    line.starts_with("220").then_some(reader)
}

async fn one_session(addr: SocketAddr) -> bool {
    let Some(mut s) = greeting(addr).await else {
        return false;
    };
    if s.get_mut().write_all(b"QUIT\r\n").await.is_err() {
        return false;
    }
    let mut line = String::new();
    s.read_line(&mut line).await.is_ok() && line.starts_with("221")
}

#[tokio::main]
async fn main() {
    let (_, hard) = rlimit::Resource::NOFILE.get().unwrap_or((1024, 1024));
    let _ = rlimit::Resource::NOFILE.set(hard, hard);
    let idle = IDLE.min((hard as usize).saturating_sub(500));

    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(25_252);
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let examples = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/dual-delivery");
    let child = Command::new(env!("CARGO_BIN_EXE_mailroute-relay"))
        .args([
            "--manifests",
            examples,
            "--hostname",
            "bench.test",
            "--max-sessions",
            "30000",
            "--max-sessions-per-ip",
            "30000",
        ])
        .args(["--smtp", &addr.to_string()])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("starting mailroute-relay: {e}"));
    let relay = RelayProcess(child);
    let pid = relay.0.id();
    for _ in 0..500 {
        if TcpStream::connect(addr).await.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    eprintln!("relay up (pid {pid}); warming up");
    // Warm up the runtime (worker threads, allocator arenas) before the baseline.
    for _ in 0..200 {
        one_session(addr).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let baseline = rss_kib(pid);
    eprintln!("baseline RSS {baseline} KiB; opening {idle} idle sessions");

    let mut held = Vec::with_capacity(idle);
    let started = Instant::now();
    let mut opening = tokio::task::JoinSet::new();
    for _ in 0..idle {
        // A rolling window of 200 connects in flight.
        while opening.len() >= 200 {
            if let Some(Ok(Some(s))) = opening.join_next().await {
                held.push(s);
            }
        }
        opening.spawn(greeting(addr));
    }
    while let Some(r) = opening.join_next().await {
        if let Ok(Some(s)) = r {
            held.push(s);
        }
    }
    let open_time = started.elapsed();
    eprintln!("{} sessions open; measuring", held.len());
    tokio::time::sleep(Duration::from_millis(500)).await;
    let loaded = rss_kib(pid);
    let per_session = (loaded.saturating_sub(baseline) as f64 * 1024.0) / held.len().max(1) as f64;

    let mut latencies = Vec::new();
    for _ in 0..50 {
        let t = Instant::now();
        if greeting(addr).await.is_some() {
            latencies.push(t.elapsed());
        }
    }
    latencies.sort();
    let p50 = latencies
        .get(latencies.len() / 2)
        .copied()
        .unwrap_or_default();
    let max = latencies.last().copied().unwrap_or_default();
    let open = held.len();
    drop(held);
    tokio::time::sleep(Duration::from_millis(500)).await;

    eprintln!("measuring sessions accepted per second for {ACCEPT_SECONDS} s");
    let done = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(ACCEPT_SECONDS);
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..ACCEPT_CONCURRENCY {
        let done = Arc::clone(&done);
        workers.spawn(async move {
            while Instant::now() < deadline {
                if one_session(addr).await {
                    done.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
    }
    while workers.join_next().await.is_some() {}
    let rate = done.load(Ordering::Relaxed) as f64 / ACCEPT_SECONDS as f64;

    println!(
        "idle sessions held:                   {open} (opened in {:.2} s)",
        open_time.as_secs_f64()
    );
    println!("relay RSS before / with them:         {baseline} KiB / {loaded} KiB");
    println!(
        "memory per idle session:              {:.1} KiB",
        per_session / 1024.0
    );
    println!(
        "fresh client greeted, with them open: p50 {:.2} ms, max {:.2} ms (50 tries)",
        p50.as_secs_f64() * 1e3,
        max.as_secs_f64() * 1e3
    );
    println!(
        "sessions accepted per second:         {rate:.0} (connect, greeting, QUIT, 221; concurrency {ACCEPT_CONCURRENCY}, {ACCEPT_SECONDS} s)"
    );
}
