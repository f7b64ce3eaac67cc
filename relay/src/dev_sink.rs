//! `--dev-sink DIR`: a development upstream inside the relay, so a newcomer sees dual and
//! split delivery land without installing an MTA. Every route of the configuration is sent to
//! its own loopback listener (TLS off, no AUTH, no recipient checks), which accepts every
//! message and writes it to `DIR/<route>-<n>.eml`, with the envelope as `X-Dev-Sink-*` lines
//! before the message, and prints where it went. Never for production: it replaces every
//! destination.
//!
//! NB: hand-written (a few SMTP commands, one message per DATA) because no maintained crate
//! offers an SMTP receiver, and the relay's own session is the thing under test.

use crate::config_source::Loaded;
use mailroute_config::document::{Destination, Host, HostPort};
use mailroute_config::resources::TlsMode;
use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

/// The largest message the sink keeps (the relay's own limit applies first).
const MAX_MESSAGE: usize = 64 * 1024 * 1024;

/// One listener per route name, started on demand.
#[derive(Debug)]
pub struct DevSink {
    dir: PathBuf,
    listeners: std::sync::Mutex<BTreeMap<String, SocketAddr>>,
    count: Arc<AtomicU64>,
}

impl DevSink {
    /// A sink writing into `dir` (created if missing).
    pub fn new(dir: &Path) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        Ok(Self {
            dir: dir.to_owned(),
            listeners: Default::default(),
            count: Arc::default(),
        })
    }

    /// Points every route of `loaded` at its own sink listener (starting the missing ones;
    /// within the runtime).
    pub fn redirect(&self, loaded: &mut Loaded) -> std::io::Result<()> {
        for (name, route) in &mut loaded.document.config.routes {
            let addr = self.listener(name)?;
            route.destination = Destination::Host(HostPort {
                host: Host::Ip(addr.ip()),
                port: addr.port(),
            });
            route.tls.mode = TlsMode::Disabled;
            route.auth = false;
            route.verify_recipients = false;
        }
        Ok(())
    }

    fn listener(&self, route: &str) -> std::io::Result<SocketAddr> {
        if let Some(addr) = self
            .listeners
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(route)
        {
            return Ok(*addr);
        }
        let listener = std::net::TcpListener::bind((IpAddr::V4(Ipv4Addr::LOCALHOST), 0))?;
        listener.set_nonblocking(true)?;
        let listener = TcpListener::from_std(listener)?;
        let addr = listener.local_addr()?;
        let (route_name, dir, count) = (route.to_owned(), self.dir.clone(), self.count.clone());
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (route, dir, count) = (route_name.clone(), dir.clone(), count.clone());
                tokio::spawn(async move {
                    if let Err(e) = session(stream, &route, &dir, &count).await {
                        tracing::debug!(error = %e, route, "dev sink session ended");
                    }
                });
            }
        });
        self.listeners
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(route.to_owned(), addr);
        Ok(addr)
    }
}

/// One SMTP session: every message accepted and written to a file.
async fn session(
    stream: TcpStream,
    route: &str,
    dir: &Path,
    count: &AtomicU64,
) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut read = BufReader::new(read);
    write.write_all(b"220 dev-sink ESMTP\r\n").await?;
    let mut envelope: Vec<String> = Vec::new();
    let mut line = String::new();
    loop {
        line.clear();
        if read.read_line(&mut line).await? == 0 {
            return Ok(());
        }
        let command = line.trim_end().to_owned();
        let verb = command
            .split_whitespace()
            .next()
            .unwrap_or_default()
            .to_ascii_uppercase();
        let reply: &[u8] = match verb.as_str() {
            "EHLO" => b"250-dev-sink\r\n250-8BITMIME\r\n250-SMTPUTF8\r\n250 PIPELINING\r\n",
            "HELO" | "NOOP" => b"250 OK\r\n",
            "MAIL" => {
                envelope = vec![format!("X-Dev-Sink-Mail: {command}")];
                b"250 OK\r\n"
            }
            "RCPT" => {
                envelope.push(format!("X-Dev-Sink-Rcpt: {command}"));
                b"250 OK\r\n"
            }
            "RSET" => {
                envelope.clear();
                b"250 OK\r\n"
            }
            "DATA" => {
                write.write_all(b"354 end with .\r\n").await?;
                let message = content(&mut read).await?;
                let n = count.fetch_add(1, Ordering::Relaxed) + 1;
                let file = dir.join(format!("{route}-{n}.eml"));
                let mut text = format!("X-Dev-Sink-Route: {route}\r\n").into_bytes();
                for e in &envelope {
                    text.extend_from_slice(e.as_bytes());
                    text.extend_from_slice(b"\r\n");
                }
                text.extend_from_slice(&message);
                tokio::fs::write(&file, text).await?;
                println!("dev sink: route {route} delivered {}", file.display());
                envelope.clear();
                b"250 OK\r\n"
            }
            "QUIT" => {
                write.write_all(b"221 bye\r\n").await?;
                return Ok(());
            }
            _ => b"502 5.5.1 not in the dev sink\r\n",
        };
        write.write_all(reply).await?;
    }
}

/// The message up to its final `.`, dot-unstuffed.
async fn content(read: &mut BufReader<tokio::net::tcp::OwnedReadHalf>) -> std::io::Result<Vec<u8>> {
    let mut message = Vec::new();
    let mut line = Vec::new();
    loop {
        line.clear();
        if read.read_until(b'\n', &mut line).await? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        if line == b".\r\n" || line == b".\n" {
            return Ok(message);
        }
        let body = line.strip_prefix(b".").unwrap_or(&line);
        if message.len() + body.len() > MAX_MESSAGE {
            return Err(std::io::Error::other("message over the dev sink's limit"));
        }
        message.extend_from_slice(body);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    #[tokio::test]
    async fn every_route_goes_to_its_own_listener_and_each_message_to_a_file() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let quickstart = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/quickstart");
        let mut loaded =
            crate::config_source::from_manifests(&quickstart, 1).unwrap_or_else(|e| panic!("{e}"));
        let sink = DevSink::new(dir.path()).unwrap_or_else(|e| panic!("{e}"));
        sink.redirect(&mut loaded).unwrap_or_else(|e| panic!("{e}"));
        let routes = &loaded.document.config.routes;
        let addr = |name: &str| match &routes[name].destination {
            Destination::Host(HostPort {
                host: Host::Ip(ip),
                port,
            }) => SocketAddr::new(*ip, *port),
            other => panic!("{other:?}"),
        };
        assert_ne!(addr("mailbox"), addr("archive"));
        assert!(
            routes
                .values()
                .all(|r| r.tls.mode == TlsMode::Disabled && !r.auth)
        );
        // A dot-stuffed line arrives unstuffed, after the envelope.
        let mut c = TcpStream::connect(addr("mailbox"))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        c.write_all(b"EHLO t\r\nMAIL FROM:<b@x.example>\r\nRCPT TO:<a@example.com>\r\nDATA\r\n")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        c.write_all(b"Subject: s\r\n\r\n..leading dot\r\n.\r\nQUIT\r\n")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let mut replies = String::new();
        c.read_to_string(&mut replies)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(replies.ends_with("250 OK\r\n221 bye\r\n"), "{replies}");
        let text = std::fs::read_to_string(dir.path().join("mailbox-1.eml"))
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(text.starts_with("X-Dev-Sink-Route: mailbox\r\nX-Dev-Sink-Mail: MAIL FROM:<b@x.example>\r\nX-Dev-Sink-Rcpt: RCPT TO:<a@example.com>\r\nSubject: s\r\n"), "{text}");
        assert!(text.ends_with("\r\n.leading dot\r\n"), "{text}");
        // A reload keeps each route on its listener.
        let before = addr("mailbox");
        sink.redirect(&mut loaded).unwrap_or_else(|e| panic!("{e}"));
        let routes = &loaded.document.config.routes;
        assert!(
            matches!(&routes["mailbox"].destination, Destination::Host(h) if h.port == before.port())
        );
    }
}
