//! Real MTAs as the relay's clients, each private to a test: a Postfix instance with `relayhost`
//! pointing at the relay (its own configuration directory, queue and free port, stopped on
//! drop), and Exim handing one message to a smarthost (`exim4 -C`, no daemon).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// A private Postfix relaying everything it receives to `relayhost`.
pub struct Postfix {
    pub dir: tempfile::TempDir,
    /// Its smtpd listener.
    pub smtp: SocketAddr,
}

impl Postfix {
    pub fn start(relayhost: SocketAddr) -> Self {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let root = dir.path();
        // NB: Postfix's daemons run as user postfix and must reach the queue.
        set_mode(root, 0o755);
        let config = root.join("postfix");
        let queue = config.join("queue");
        let data = config.join("data");
        for d in [&config, &queue, &data] {
            std::fs::create_dir_all(d).unwrap_or_else(|e| panic!("{e}"));
        }
        let _ = Command::new("chown").args(["postfix"]).arg(&data).status();
        let port = super::sink::free_port();
        let main_cf = format!(
            "compatibility_level = 3.6\nqueue_directory = {queue}\ndata_directory = {data}\n\
             mail_owner = postfix\nsetgid_group = postdrop\ninet_interfaces = 127.0.0.1\n\
             inet_protocols = ipv4\nmyhostname = postfix.test.example\nmydestination =\n\
             mynetworks = 127.0.0.0/8\nrelayhost = [{host}]:{rport}\n\
             smtpd_relay_restrictions = permit_mynetworks, reject\n\
             maillog_file_prefixes = {root}\nmaillog_file = {root}/maillog\n",
            queue = queue.display(),
            data = data.display(),
            host = relayhost.ip(),
            rport = relayhost.port(),
            root = root.display(),
        );
        std::fs::write(config.join("main.cf"), main_cf).unwrap_or_else(|e| panic!("{e}"));
        let master = std::fs::read_to_string("/etc/postfix/master.cf")
            .unwrap_or_else(|e| panic!("Postfix (Debian package postfix) is not installed: {e}"));
        let master: String = master
            .lines()
            .map(|line| {
                let fields: Vec<&str> = line.split_whitespace().collect();
                if line.starts_with("smtp ") && fields.get(1) == Some(&"inet") {
                    format!("127.0.0.1:{port} inet n - n - - smtpd")
                } else if fields.len() >= 5 && fields[1] == "unix" && fields[4] == "y" {
                    // No chroot: the private queue is not inside one.
                    let mut f: Vec<String> = fields.iter().map(|s| (*s).to_owned()).collect();
                    f[4] = "n".into();
                    f.join(" ")
                } else {
                    line.to_owned()
                }
            })
            .collect::<Vec<_>>()
            .join("\n");
        std::fs::write(config.join("master.cf"), master + "\n").unwrap_or_else(|e| panic!("{e}"));
        let _ = Command::new("postfix")
            .arg("-c")
            .arg(&config)
            .arg("start")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let smtp = SocketAddr::from(([127, 0, 0, 1], port));
        let deadline = Instant::now() + Duration::from_secs(15);
        while std::net::TcpStream::connect(smtp).is_err() {
            assert!(
                Instant::now() < deadline,
                "Postfix never listened; its log: {}",
                std::fs::read_to_string(root.join("maillog")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Self { dir, smtp }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("maillog")).unwrap_or_default()
    }
}

impl Drop for Postfix {
    fn drop(&mut self) {
        let _ = Command::new("postfix")
            .arg("-c")
            .arg(self.dir.path().join("postfix"))
            .arg("stop")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

fn set_mode(path: &std::path::Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode));
}

/// Hands `message` from `from` to `to` to Exim, which delivers it at once to the smarthost
/// `relay` (its spool and log in a temporary directory). Returns Exim's main log.
pub fn exim_send(relay: SocketAddr, from: &str, to: &str, message: &str) -> String {
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    set_mode(dir.path(), 0o755);
    let spool = dir.path().join("spool");
    let log = dir.path().join("log");
    for d in [&spool, &log] {
        std::fs::create_dir_all(d).unwrap_or_else(|e| panic!("{e}"));
        let _ = Command::new("chown").arg("Debian-exim").arg(d).status();
    }
    let conf: PathBuf = dir.path().join("exim.conf");
    std::fs::write(
        &conf,
        format!(
            "keep_environment =\nprimary_hostname = exim.test.example\n\
             exim_user = Debian-exim\nexim_group = Debian-exim\ntrusted_users = root\n\
             spool_directory = {spool}\nlog_file_path = {log}/%slog\n\
             begin routers\nsmarthost:\n  driver = manualroute\n  domains = *\n\
             \x20 transport = relay_smtp\n  route_list = * {host}\n  self = send\n  no_more\n\
             begin transports\nrelay_smtp:\n  driver = smtp\n  port = {port}\n\
             begin retry\n* * F,1m,1m\n",
            spool = spool.display(),
            log = log.display(),
            host = relay.ip(),
            port = relay.port(),
        ),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let mut child = Command::new("/usr/sbin/exim4")
        .arg("-C")
        .arg(&conf)
        .args(["-odi", "-f", from, to])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| {
            panic!("exim4 (scripts/test extracts it from Debian's exim4-daemon-light): {e}")
        });
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(message.as_bytes());
    }
    let _ = child.wait();
    std::fs::read_to_string(log.join("mainlog")).unwrap_or_default()
}
