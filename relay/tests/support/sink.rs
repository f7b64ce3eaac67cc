//! Postfix `smtp-sink` as an upstream: on a free loopback port, dumping every message it
//! accepts to a directory, optionally misbehaving at a chosen stage (`-f` 5xx, `-r` 4xx,
//! `-q` disconnect, `-Q` 421 and disconnect, `-W` stall).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub struct Sink {
    child: Child,
    pub addr: SocketAddr,
    pub dir: tempfile::TempDir,
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap_or_else(|e| panic!("{e}"))
        .port()
}

impl Sink {
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// `args`: extra smtp-sink options, e.g. `["-r", "RCPT"]`.
    pub fn start_with(args: &[&str]) -> Self {
        Self::start_on(([127, 0, 0, 1], free_port()).into(), args)
    }

    /// On a given address (to replace a sink a route points at).
    pub fn start_on(addr: SocketAddr, args: &[&str]) -> Self {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let template = format!("{}/%M.", dir.path().display());
        let child = Command::new("smtp-sink")
            .args(["-u", "root", "-d", &template])
            .args(args)
            .args([&addr.to_string(), "100"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("smtp-sink (Debian package postfix; scripts/test installs it): {e}")
            });
        for _ in 0..300 {
            if std::net::TcpStream::connect(addr).is_ok() {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Self { child, addr, dir }
    }

    /// Every dumped message, oldest first.
    pub fn dumps(&self) -> Vec<Vec<u8>> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(self.dir.path())
            .unwrap_or_else(|e| panic!("{e}"))
            .filter_map(|e| e.ok().map(|e| e.path()))
            .collect();
        files.sort_by_key(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok());
        files
            .iter()
            .map(|p| std::fs::read(p).unwrap_or_default())
            .collect()
    }

    /// [`Sink::count`] once it reaches `expected` or after a second (dumps are written
    /// after the reply). The sink writes lines with LF only.
    pub fn wait_count(&self, needle: &str, expected: usize) -> usize {
        for _ in 0..100 {
            if self.count(needle) >= expected {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        self.count(needle)
    }

    /// How many dumped messages contain `needle`.
    pub fn count(&self, needle: &str) -> usize {
        self.dumps()
            .iter()
            .filter(|d| d.windows(needle.len()).any(|w| w == needle.as_bytes()))
            .count()
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
