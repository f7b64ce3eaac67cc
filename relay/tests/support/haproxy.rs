//! HAProxy in TCP mode in front of a relay listener, sending PROXY protocol v2 headers: the real
//! load balancer of SPEC 5.1, on a free loopback port, stopped on drop.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Haproxy {
    child: Child,
    pub addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Haproxy {
    /// Listens on a free port and forwards every connection to `backend` with `send-proxy-v2`.
    pub fn start(backend: SocketAddr) -> Self {
        let addr: SocketAddr = ([127, 0, 0, 1], super::sink::free_port()).into();
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let config = dir.path().join("haproxy.cfg");
        std::fs::write(
            &config,
            format!(
                "global\n    maxconn 500\ndefaults\n    mode tcp\n    timeout connect 5s\n    timeout client 30s\n    timeout server 30s\nfrontend smtps\n    bind {addr}\n    default_backend relay\nbackend relay\n    server relay {backend} send-proxy-v2\n"
            ),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let child = Command::new("haproxy")
            .arg("-db")
            .arg("-f")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("haproxy (Debian package haproxy; scripts/test installs it): {e}")
            });
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(addr).is_err() {
            assert!(Instant::now() < deadline, "haproxy did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        Self {
            child,
            addr,
            _dir: dir,
        }
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
