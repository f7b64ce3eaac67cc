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
        Self::start_with(relayhost, "")
    }

    /// With `extra` lines appended to main.cf (timeouts, retry intervals).
    pub fn start_with(relayhost: SocketAddr, extra: &str) -> Self {
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
             maillog_file_prefixes = {root}\nmaillog_file = {root}/maillog\n{extra}\n",
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

/// Where scripts/test puts the MTAs whose Debian packages conflict with postfix.
const MTA_DIR: &str = "/usr/local/lib/mailroute-test";

/// Hands `message` from `from` to `to` to Sendmail 8.17, which delivers it at once (`-odi`) to
/// its `SMART_HOST`, the relay, with STARTTLS (the relay's certificate checked against `ca_pem`)
/// and AUTH PLAIN as `user`/`password` from its `authinfo` map. Returns Sendmail's exit status
/// and its SMTP transcript (`-v`).
///
/// Sendmail looks up its own host name before it reads its configuration, and this machine's
/// name may be known only to a DNS server a test cannot reach (the lookup then hangs): it runs
/// in mount and UTS namespaces of its own (`unshare`), with a host name and an /etc/hosts that
/// name it. `DONT_PROBE_INTERFACES` keeps 127.0.0.1 out of its own addresses (class `w`), which
/// would otherwise make the smart host "this host" and the message local.
pub fn sendmail_send(
    relay: SocketAddr,
    (from, to): (&str, &str),
    message: &str,
    (user, password): (&str, &str),
    ca_pem: &str,
) -> (bool, String) {
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let root = dir.path();
    std::fs::create_dir_all(root.join("queue")).unwrap_or_else(|e| panic!("{e}"));
    std::fs::write(root.join("ca.pem"), ca_pem).unwrap_or_else(|e| panic!("{e}"));
    std::fs::write(
        root.join("hosts"),
        "127.0.0.9 sendmail.test.example\n127.0.0.1 localhost\n",
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let authinfo = root.join("authinfo");
    std::fs::write(
        &authinfo,
        format!(
            "AuthInfo:{ip} \"U:{user}\" \"P:{password}\" \"M:PLAIN\"\n",
            ip = relay.ip()
        ),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    set_mode(&authinfo, 0o600);
    let sendmail = format!("{MTA_DIR}/sendmail");
    let r = root.display();
    let mc = format!(
        "divert(-1)\ninclude(`{MTA_DIR}/sendmail-cf/m4/cf.m4')\ndivert(0)dnl\n\
         OSTYPE(`linux')dnl\n\
         define(`confDONT_BLAME_SENDMAIL', `GroupWritableDirPathSafe,MapInUnsafeDirPath')dnl\n\
         define(`QUEUE_DIR', `{r}/queue')dnl\n\
         define(`STATUS_FILE', `{r}/statistics')dnl\n\
         define(`ALIAS_FILE', `')dnl\n\
         define(`confHELP_FILE', `')dnl\n\
         define(`confPID_FILE', `{r}/sendmail.pid')dnl\n\
         define(`confDONT_PROBE_INTERFACES', `True')dnl\n\
         define(`SMART_HOST', `[{ip}]')dnl\n\
         define(`RELAY_MAILER_ARGS', `TCP $h {port}')dnl\n\
         define(`ESMTP_MAILER_ARGS', `TCP $h {port}')dnl\n\
         define(`confCACERT_PATH', `{r}')dnl\n\
         define(`confCACERT', `{r}/ca.pem')dnl\n\
         define(`confAUTH_MECHANISMS', `PLAIN')dnl\n\
         FEATURE(`authinfo', `hash -o {r}/authinfo')dnl\n\
         FEATURE(`nocanonify')dnl\n\
         MAILER(`local')dnl\nMAILER(`smtp')dnl\n",
        ip = relay.ip(),
        port = relay.port(),
    );
    let cf = Command::new("m4")
        .arg("-")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .and_then(|mut m4| {
            if let Some(mut stdin) = m4.stdin.take() {
                stdin.write_all(mc.as_bytes())?;
            }
            m4.wait_with_output()
        })
        .unwrap_or_else(|e| panic!("m4 (scripts/test installs it): {e}"));
    std::fs::write(root.join("sendmail.cf"), &cf.stdout).unwrap_or_else(|e| panic!("{e}"));
    // NB: makemap reads the configuration for its trusted users.
    let made = Command::new(format!("{sendmail}/makemap"))
        .arg("-C")
        .arg(root.join("sendmail.cf"))
        .arg("hash")
        .arg(&authinfo)
        .stdin(std::fs::File::open(&authinfo).unwrap_or_else(|e| panic!("{e}")))
        .status()
        .unwrap_or_else(|e| {
            panic!("Sendmail (scripts/test extracts it from Debian's sendmail-bin): {e}")
        });
    assert!(made.success(), "makemap failed");
    let script = format!(
        "mount --bind {r}/hosts /etc/hosts && hostname sendmail.test.example && \
         exec {sendmail}/sendmail -C {r}/sendmail.cf -odi -v -f {from} {to}"
    );
    let mut child = Command::new("unshare")
        .args(["--mount", "--uts", "sh", "-c", &script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("unshare: {e}"));
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(message.as_bytes());
    }
    let output = child.wait_with_output().unwrap_or_else(|e| panic!("{e}"));
    let transcript = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), transcript)
}

/// OpenSMTPD 6.8 relaying everything it receives to `relay` with mandatory STARTTLS and AUTH
/// (`relay host smtp+tls://…` with a secrets table); stopped on drop. Its queue and control
/// socket are compiled in (/var/spool/smtpd, /var/run/smtpd.sock): one instance at a time.
pub struct OpenSmtpd {
    pub dir: tempfile::TempDir,
    pub smtp: SocketAddr,
    child: std::process::Child,
}

impl OpenSmtpd {
    pub fn start(relay: SocketAddr, (user, password): (&str, &str)) -> Self {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let root = dir.path();
        let port = super::sink::free_port();
        let secrets = root.join("secrets");
        std::fs::write(&secrets, format!("relay {user}:{password}\n"))
            .unwrap_or_else(|e| panic!("{e}"));
        set_mode(&secrets, 0o600);
        let conf = root.join("smtpd.conf");
        std::fs::write(
            &conf,
            format!(
                "table secrets file:{secrets}\n\
                 listen on 127.0.0.1 port {port} hostname opensmtpd.test.example\n\
                 action \"relay\" relay host smtp+tls://relay@{ip}:{rport} auth <secrets> tls no-verify\n\
                 match from any for any action \"relay\"\n",
                secrets = secrets.display(),
                ip = relay.ip(),
                rport = relay.port(),
            ),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        set_mode(&conf, 0o644);
        let log = std::fs::File::create(root.join("smtpd.log")).unwrap_or_else(|e| panic!("{e}"));
        let child = Command::new(format!("{MTA_DIR}/opensmtpd/smtpd"))
            .arg("-f")
            .arg(&conf)
            .args(["-d", "-v"])
            .stdout(log.try_clone().unwrap_or_else(|e| panic!("{e}")))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| {
                panic!("OpenSMTPD (scripts/test extracts it from Debian's opensmtpd): {e}")
            });
        let smtp: SocketAddr = format!("127.0.0.1:{port}")
            .parse()
            .unwrap_or_else(|e| panic!("{e}"));
        let started = Self { dir, smtp, child };
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(smtp).is_err() {
            assert!(
                Instant::now() < deadline,
                "OpenSMTPD did not listen: {}",
                started.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        started
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("smtpd.log")).unwrap_or_default()
    }
}

impl Drop for OpenSmtpd {
    fn drop(&mut self) {
        // NB: SIGTERM, so the parent stops its privilege-separated children too.
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
