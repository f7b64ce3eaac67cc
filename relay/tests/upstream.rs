//! What an upstream receives: messages accepted by the relay are written to a real Postfix
//! `smtp-sink` with the relay's dot-stuffing writer, and the sink's dump equals what the client
//! sent plus the relay's one `Received:` header: no line added, removed or changed.

mod support;

use mailroute_relay::server::{BoxFuture, Deliver};
use mailroute_relay::smtp::data::dot_stuff;
use mailroute_relay::smtp::reply::Reply;
use mailroute_relay::smtp::session::Transaction;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command};
use std::sync::Arc;
use std::time::Duration;
use support::{Client, Options, Relay, bounded};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// A Postfix smtp-sink on a free loopback port, dumping every message to a directory.
struct Sink {
    child: Child,
    addr: SocketAddr,
    dir: tempfile::TempDir,
}

impl Sink {
    fn start() -> Self {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .unwrap_or_else(|e| panic!("{e}"))
            .port();
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let template = format!("{}/%M.", dir.path().display());
        let child = Command::new("smtp-sink")
            .args(["-u", "root", "-d", &template, &addr.to_string(), "50"])
            .spawn()
            .unwrap_or_else(|e| {
                panic!("smtp-sink (Debian package postfix; scripts/test installs it): {e}")
            });
        for _ in 0..200 {
            if std::net::TcpStream::connect(addr).is_ok() {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Self { child, addr, dir }
    }

    fn dumps(&self) -> Vec<Vec<u8>> {
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
}

impl Drop for Sink {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Forwards each message to the sink: envelope commands, then the content dot-stuffed and
/// written together with its end-of-data line in one write.
struct ToSink(SocketAddr);

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

impl Deliver for ToSink {
    fn deliver(&self, t: Transaction) -> BoxFuture<'_, Reply> {
        Box::pin(async move {
            let Ok(stream) = TcpStream::connect(self.0).await else {
                return Reply::new(451, "4.4.1", "sink unreachable");
            };
            let mut s = BufReader::new(stream);
            reply(&mut s).await;
            let mut commands = format!("EHLO relay.test\r\nMAIL FROM:<{}>\r\n", t.mail_from);
            for r in &t.recipients {
                commands.push_str(&format!("RCPT TO:<{r}>\r\n"));
            }
            for line in commands.lines() {
                let _ = s
                    .get_mut()
                    .write_all(format!("{line}\r\n").as_bytes())
                    .await;
                if !reply(&mut s).await.starts_with('2') {
                    return Reply::new(451, "4.4.0", "sink refused");
                }
            }
            let _ = s.get_mut().write_all(b"DATA\r\n").await;
            if !reply(&mut s).await.starts_with("354") {
                return Reply::new(451, "4.4.0", "sink refused DATA");
            }
            let mut wire = Vec::with_capacity(t.content.len() + 16);
            dot_stuff(&t.content, &mut wire);
            let _ = s.get_mut().write_all(&wire).await;
            let answer = reply(&mut s).await;
            let _ = s.get_mut().write_all(b"QUIT\r\n").await;
            if answer.starts_with("250") {
                Reply::message_accepted(&t.id)
            } else {
                Reply::new(451, "4.4.0", "sink refused the content")
            }
        })
    }
}

/// The sink's dump without its own trace headers: from the relay's Received: header on.
fn after_sink_headers(dump: &[u8]) -> &[u8] {
    let marker = b"Received: from client.test";
    let at = dump
        .windows(marker.len())
        .position(|w| w == marker)
        .unwrap_or_else(|| {
            panic!(
                "no relay Received: header in {}",
                String::from_utf8_lossy(dump)
            )
        });
    &dump[at..]
}

#[tokio::test]
async fn the_upstream_receives_exactly_what_the_client_sent_plus_one_received_header() {
    bounded(60, async {
        let sink = Sink::start();
        let relay = Relay::start(Options {
            deliver: Some(Arc::new(ToSink(sink.addr))),
            ..Options::default()
        })
        .await;
        let messages: Vec<Vec<u8>> = vec![
            b"Subject: one\r\n\r\nbody\r\n".to_vec(),
            b"Subject: dots\r\n\r\n.\r\n..\r\n.leading\r\n...three\r\n".to_vec(),
            b"Subject: trailing blank lines\r\n\r\nx\r\n\r\n\r\n".to_vec(),
            format!("Subject: long\r\n\r\n{}\r\n", "z".repeat(998)).into_bytes(),
            "Subject: 8bit\r\n\r\n\u{e9}t\u{e9}\r\n".as_bytes().to_vec(),
        ];
        let mut client = Client::connect(relay.smtp).await;
        client.reply().await;
        client.command("EHLO client.test").await;
        for (i, message) in messages.iter().enumerate() {
            assert!(
                client
                    .command("MAIL FROM:<a@example.com>")
                    .await
                    .starts_with("250")
            );
            assert!(
                client
                    .command("RCPT TO:<b@example.com>")
                    .await
                    .starts_with("250")
            );
            if i % 2 == 0 {
                assert!(client.command("DATA").await.starts_with("354"));
                let mut wire = Vec::new();
                dot_stuff(message, &mut wire);
                client.send(&wire).await;
            } else {
                client
                    .send(
                        &[
                            format!("BDAT {} LAST\r\n", message.len()).as_bytes(),
                            message,
                        ]
                        .concat(),
                    )
                    .await;
            }
            let answer = client.reply().await;
            assert!(answer.starts_with("250 2.0.0"), "message {i}: {answer}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        let dumps = sink.dumps();
        assert_eq!(dumps.len(), messages.len());
        for (i, sent) in messages.iter().enumerate() {
            let subject_line = String::from_utf8_lossy(sent)
                .lines()
                .next()
                .unwrap_or_default()
                .to_owned();
            let dump = dumps
                .iter()
                .find(|d| String::from_utf8_lossy(d).contains(&format!("\n{subject_line}\n")))
                .unwrap_or_else(|| panic!("message {i} ({subject_line}) never reached the sink"));
            let received_and_message = after_sink_headers(dump);
            let text = String::from_utf8_lossy(received_and_message);
            let body_at =
                text.find("+0000\n").unwrap_or_else(|| panic!("{text}")) + "+0000\n".len();
            // smtp-sink stores lines with LF, and ends every dump with one extra LF.
            let mut expected = String::from_utf8_lossy(sent).replace("\r\n", "\n");
            expected.push('\n');
            assert_eq!(&text[body_at..], expected, "message {i}");
            assert_eq!(
                text.matches("Received: ").count(),
                1,
                "message {i}: one Received: header"
            );
        }
    })
    .await;
}
