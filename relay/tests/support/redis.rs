//! A private `redis-server` on a free loopback port, without persistence, stopped on drop.
//! It can be stopped and started again on the same port (a store outage).

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct RedisServer {
    child: Option<Child>,
    pub addr: SocketAddr,
}

impl RedisServer {
    pub fn start() -> Self {
        let mut server = Self {
            child: None,
            addr: ([127, 0, 0, 1], super::sink::free_port()).into(),
        };
        server.resume();
        server
    }

    /// `redis://` URL of the server.
    pub fn url(&self) -> String {
        format!("redis://{}/0", self.addr)
    }

    /// Starts the server again after [`RedisServer::stop`] (same port, empty).
    pub fn resume(&mut self) {
        let child = Command::new("redis-server")
            .args([
                "--bind",
                "127.0.0.1",
                "--port",
                &self.addr.port().to_string(),
                "--save",
                "",
                "--appendonly",
                "no",
                "--protected-mode",
                "no",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("redis-server (Debian package redis-server; scripts/test installs it): {e}")
            });
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.ping().is_err() {
            assert!(Instant::now() < deadline, "redis-server never answered");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills the server (clients see connections refused until [`RedisServer::resume`]).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn ping(&self) -> std::io::Result<()> {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect_timeout(&self.addr, Duration::from_millis(200))?;
        s.set_read_timeout(Some(Duration::from_millis(500)))?;
        s.write_all(b"PING\r\n")?;
        let mut buf = [0u8; 7];
        s.read_exact(&mut buf)?;
        if &buf == b"+PONG\r\n" {
            Ok(())
        } else {
            Err(std::io::Error::other("no PONG"))
        }
    }

    /// Runs one command with `redis-cli` and returns its output.
    pub fn cli(&self, args: &[&str]) -> String {
        let out = Command::new("redis-cli")
            .args(["-h", "127.0.0.1", "-p", &self.addr.port().to_string()])
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("redis-cli: {e}"));
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A `redis-server` process with arguments of its own, stopped on drop.
pub struct Node {
    child: Option<Child>,
    pub port: u16,
}

impl Node {
    fn spawn(port: u16, args: &[&str], dir: &std::path::Path) -> Self {
        Self::spawn_program("redis-server", port, args, dir)
    }

    /// `program` (`redis-server`, or `redis-sentinel` from Debian's package of that name).
    fn spawn_program(program: &str, port: u16, args: &[&str], dir: &std::path::Path) -> Self {
        let child = Command::new(program)
            .args(args)
            .current_dir(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("{program} (scripts/test installs it): {e}"));
        let node = Self {
            child: Some(child),
            port,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while cli(port, &["PING"]) != "PONG" {
            assert!(Instant::now() < deadline, "redis on {port} never answered");
            std::thread::sleep(Duration::from_millis(20));
        }
        node
    }

    /// SIGKILL.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `redis-cli -p port args...`, trimmed.
pub fn cli(port: u16, args: &[&str]) -> String {
    Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

fn plain(port: u16) -> Vec<String> {
    [
        "--bind",
        "127.0.0.1",
        "--port",
        &port.to_string(),
        "--save",
        "",
        "--appendonly",
        "no",
        "--protected-mode",
        "no",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// One master, one replica and three sentinels (quorum 2, a master down after 1 s) on
/// loopback, master name `mymaster`.
pub struct Sentinels {
    pub master: Node,
    pub replica: Node,
    pub sentinels: Vec<Node>,
    _dir: tempfile::TempDir,
}

impl Sentinels {
    pub fn start() -> Self {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let (m, r) = (super::sink::free_port(), super::sink::free_port());
        let args = plain(m);
        let master = Node::spawn(
            m,
            &args.iter().map(String::as_str).collect::<Vec<_>>(),
            dir.path(),
        );
        let mut args = plain(r);
        args.extend(["--replicaof".into(), "127.0.0.1".into(), m.to_string()]);
        let replica = Node::spawn(
            r,
            &args.iter().map(String::as_str).collect::<Vec<_>>(),
            dir.path(),
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        while !cli(r, &["INFO", "replication"]).contains("master_link_status:up") {
            assert!(Instant::now() < deadline, "the replica never synchronised");
            std::thread::sleep(Duration::from_millis(50));
        }
        let sentinels = (0..3)
            .map(|i| {
                let port = super::sink::free_port();
                let conf = dir.path().join(format!("sentinel-{i}.conf"));
                std::fs::write(
                    &conf,
                    format!(
                        "port {port}\nbind 127.0.0.1\nprotected-mode no\n\
                         sentinel monitor mymaster 127.0.0.1 {m} 2\n\
                         sentinel down-after-milliseconds mymaster 1000\n\
                         sentinel failover-timeout mymaster 10000\n\
                         sentinel parallel-syncs mymaster 1\n"
                    ),
                )
                .unwrap_or_else(|e| panic!("{e}"));
                let conf = conf.to_string_lossy().into_owned();
                Node::spawn_program("redis-sentinel", port, &[conf.as_str()], dir.path())
            })
            .collect();
        Self {
            master,
            replica,
            sentinels,
            _dir: dir,
        }
    }

    /// `redis-sentinel://.../mymaster/0`.
    pub fn url(&self) -> String {
        let hosts: Vec<String> = self
            .sentinels
            .iter()
            .map(|s| format!("127.0.0.1:{}", s.port))
            .collect();
        format!("redis-sentinel://{}/mymaster/0", hosts.join(","))
    }

    /// The port of the master the sentinels name now.
    pub fn named_master(&self) -> Option<u16> {
        let answer = cli(
            self.sentinels[0].port,
            &["SENTINEL", "get-master-addr-by-name", "mymaster"],
        );
        answer.lines().nth(1).and_then(|p| p.trim().parse().ok())
    }
}

/// A Redis Cluster of three masters on loopback, without replicas.
pub struct Cluster {
    pub nodes: Vec<Node>,
    _dir: tempfile::TempDir,
}

impl Cluster {
    pub fn start() -> Self {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let nodes: Vec<Node> = (0..3)
            .map(|i| {
                let port = super::sink::free_port();
                let mut args = plain(port);
                // The bus port is named: Redis's default (the port + 10000) is past 65535
                // for a fifth of the ports the kernel hands out.
                args.extend([
                    "--cluster-enabled".into(),
                    "yes".into(),
                    "--cluster-config-file".into(),
                    format!("nodes-{i}.conf"),
                    "--cluster-port".into(),
                    super::sink::free_port().to_string(),
                ]);
                Node::spawn(
                    port,
                    &args.iter().map(String::as_str).collect::<Vec<_>>(),
                    dir.path(),
                )
            })
            .collect();
        let addrs: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let mut create = Command::new("redis-cli");
        create.args(["--cluster", "create"]).args(&addrs);
        create.args(["--cluster-replicas", "0", "--cluster-yes"]);
        let out = create
            .output()
            .unwrap_or_else(|e| panic!("redis-cli --cluster create: {e}"));
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stdout)
        );
        let deadline = Instant::now() + Duration::from_secs(20);
        while !nodes
            .iter()
            .all(|n| cli(n.port, &["CLUSTER", "INFO"]).contains("cluster_state:ok"))
        {
            assert!(Instant::now() < deadline, "the cluster never became ok");
            std::thread::sleep(Duration::from_millis(100));
        }
        Self { nodes, _dir: dir }
    }

    pub fn url(&self) -> String {
        let hosts: Vec<String> = self
            .nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        format!("redis-cluster://{}", hosts.join(","))
    }

    /// The port of the node that serves `slot` now, by each node's own view.
    pub fn owner(&self, slot: u16) -> u16 {
        let serves = |port: u16| {
            let nodes = cli(port, &["CLUSTER", "NODES"]);
            let myself = nodes
                .lines()
                .find(|l| l.contains("myself"))
                .map(str::to_owned);
            // Fields 9 onwards are the node's slot ranges (`0-5460`, `42`).
            myself.is_some_and(|line| {
                line.split_whitespace().skip(8).any(|range| {
                    let (a, b) = range.split_once('-').unwrap_or((range, range));
                    matches!((a.parse::<u16>(), b.parse::<u16>()), (Ok(a), Ok(b)) if (a..=b).contains(&slot))
                })
            })
        };
        self.nodes
            .iter()
            .map(|n| n.port)
            .find(|p| serves(*p))
            .unwrap_or_else(|| panic!("no node serves slot {slot}"))
    }

    /// Moves `slot` from the node that serves it to another one, as `redis-cli --cluster
    /// reshard` does, with pauses so that clients meet `ASK` while its keys are half moved
    /// and `MOVED` afterwards. Returns the port of the new owner.
    pub async fn move_slot(&self, slot: u16, pause: Duration) -> u16 {
        let from = self.owner(slot);
        let to = self
            .nodes
            .iter()
            .map(|n| n.port)
            .find(|p| *p != from)
            .unwrap_or(from);
        let id = |port: u16| cli(port, &["CLUSTER", "MYID"]);
        let (from_id, to_id, slot) = (id(from), id(to), slot.to_string());
        assert_eq!(
            cli(to, &["CLUSTER", "SETSLOT", &slot, "IMPORTING", &from_id]),
            "OK"
        );
        assert_eq!(
            cli(from, &["CLUSTER", "SETSLOT", &slot, "MIGRATING", &to_id]),
            "OK"
        );
        tokio::time::sleep(pause).await;
        loop {
            let keys = cli(from, &["CLUSTER", "GETKEYSINSLOT", &slot, "100"]);
            if keys.is_empty() {
                break;
            }
            let mut migrate = vec!["MIGRATE", "127.0.0.1"];
            let port = to.to_string();
            migrate.extend([port.as_str(), "", "0", "5000", "KEYS"]);
            migrate.extend(keys.lines());
            let answer = cli(from, &migrate);
            assert!(answer == "OK" || answer == "NOKEY", "MIGRATE: {answer}");
            tokio::time::sleep(pause).await;
        }
        for node in &self.nodes {
            cli(node.port, &["CLUSTER", "SETSLOT", &slot, "NODE", &to_id]);
        }
        to
    }

    /// `CLUSTER KEYSLOT key`.
    pub fn slot(&self, key: &str) -> u16 {
        cli(self.nodes[0].port, &["CLUSTER", "KEYSLOT", key])
            .parse()
            .unwrap_or_else(|e| panic!("CLUSTER KEYSLOT {key}: {e}"))
    }
}
