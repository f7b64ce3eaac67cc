//! A scripted upstream SMTP server, for what `smtp-sink` cannot do: chosen extensions (SIZE,
//! SMTPUTF8), a delay before every reply on the first connections only, an end-of-data reply
//! chosen per message, and a record of messages abandoned before their final `.`.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;

/// How the upstream behaves.
#[derive(Clone)]
pub struct Script {
    /// EHLO keywords after the greeting line, e.g. `PIPELINING`, `SIZE 10000000`.
    pub extensions: Vec<&'static str>,
    /// Waited before every reply on the first `slow_connections` connections.
    pub delay: Duration,
    pub slow_connections: usize,
    /// The reply to the n-th end of data (0-based, over all connections).
    pub end_of_data: Arc<dyn Fn(usize) -> String + Send + Sync>,
    /// The reply to a RCPT command, given its line.
    pub rcpt: Arc<dyn Fn(&str) -> String + Send + Sync>,
    /// How long the first message's end of data waits for its answer (an upstream slow to
    /// commit one message).
    pub first_end_of_data_delay: Duration,
}

impl Default for Script {
    fn default() -> Self {
        Self {
            extensions: vec!["PIPELINING", "8BITMIME", "ENHANCEDSTATUSCODES"],
            delay: Duration::ZERO,
            slow_connections: 0,
            end_of_data: Arc::new(|_| "250 2.0.0 queued".to_owned()),
            rcpt: Arc::new(|_| "250 2.1.5 ok".to_owned()),
            first_end_of_data_delay: Duration::ZERO,
        }
    }
}

/// What the upstream saw.
#[derive(Debug, Default)]
pub struct Seen {
    /// Every MAIL command line, as sent.
    pub mail: Vec<String>,
    /// Messages answered with 2xx at end of data (content before the final `.`).
    pub accepted: Vec<Vec<u8>>,
    /// The accepted RCPT lines of each message in `accepted`.
    pub accepted_for: Vec<Vec<String>>,
    /// Messages whose data ended without a final `.` (connection closed in DATA).
    pub abandoned: usize,
    /// End-of-data replies given, accepted or not.
    pub ended: usize,
    /// Connections open now, and the most that were open at once.
    pub open: usize,
    pub most_open: usize,
}

pub struct Scripted {
    pub addr: SocketAddr,
    pub seen: Arc<Mutex<Seen>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Scripted {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Scripted {
    pub async fn start(script: Script) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let addr = listener.local_addr().unwrap_or_else(|e| panic!("{e}"));
        let seen = Arc::new(Mutex::new(Seen::default()));
        let state = Arc::clone(&seen);
        let task = tokio::spawn(async move {
            let mut connections = 0usize;
            while let Ok((socket, _)) = listener.accept().await {
                let slow = connections < script.slow_connections;
                connections += 1;
                let (script, state) = (script.clone(), Arc::clone(&state));
                if let Ok(mut s) = state.lock() {
                    s.open += 1;
                    s.most_open = s.most_open.max(s.open);
                }
                tokio::spawn(async move {
                    let delay = if slow { script.delay } else { Duration::ZERO };
                    let _ = serve(socket, &script, delay, &state).await;
                    if let Ok(mut s) = state.lock() {
                        s.open -= 1;
                    }
                });
            }
        });
        Self { addr, seen, task }
    }

    pub fn accepted(&self) -> Vec<Vec<u8>> {
        self.seen
            .lock()
            .map(|s| s.accepted.clone())
            .unwrap_or_default()
    }

    /// Accepted messages whose content contains `needle`.
    pub fn count(&self, needle: &str) -> usize {
        self.accepted()
            .iter()
            .filter(|m| String::from_utf8_lossy(m).contains(needle))
            .count()
    }

    pub fn mail_lines(&self) -> Vec<String> {
        self.seen.lock().map(|s| s.mail.clone()).unwrap_or_default()
    }

    /// How many accepted messages had a RCPT line containing `needle`.
    pub fn delivered_to(&self, needle: &str) -> usize {
        self.seen
            .lock()
            .map(|s| {
                s.accepted_for
                    .iter()
                    .filter(|rcpts| rcpts.iter().any(|r| r.contains(needle)))
                    .count()
            })
            .unwrap_or(0)
    }

    /// The most connections that were open at once.
    pub fn most_open(&self) -> usize {
        self.seen.lock().map(|s| s.most_open).unwrap_or(0)
    }

    pub fn abandoned(&self) -> usize {
        self.seen.lock().map(|s| s.abandoned).unwrap_or(0)
    }
}

async fn serve(
    socket: tokio::net::TcpStream,
    script: &Script,
    delay: Duration,
    seen: &Mutex<Seen>,
) -> std::io::Result<()> {
    let (read, mut write) = socket.into_split();
    let mut read = BufReader::new(read);
    let mut reply = async |text: String| -> std::io::Result<()> {
        tokio::time::sleep(delay).await;
        write.write_all(text.as_bytes()).await
    };
    reply("220 scripted ESMTP\r\n".to_owned()).await?;
    let mut line = String::new();
    let mut recipients = Vec::new();
    loop {
        line.clear();
        if read.read_line(&mut line).await? == 0 {
            return Ok(());
        }
        let verb = line.get(..4).unwrap_or("").to_ascii_uppercase();
        match verb.as_str() {
            "EHLO" => {
                let mut text = String::from("250-scripted\r\n");
                for (i, e) in script.extensions.iter().enumerate() {
                    let sep = if i + 1 == script.extensions.len() {
                        ' '
                    } else {
                        '-'
                    };
                    text.push_str(&format!("250{sep}{e}\r\n"));
                }
                if script.extensions.is_empty() {
                    text = "250 scripted\r\n".to_owned();
                }
                reply(text).await?;
            }
            "MAIL" => {
                recipients.clear();
                if let Ok(mut s) = seen.lock() {
                    s.mail.push(line.trim_end().to_owned());
                }
                reply("250 2.1.0 ok\r\n".to_owned()).await?;
            }
            "RCPT" => {
                let answer = (script.rcpt)(line.trim_end());
                if answer.starts_with('2') {
                    recipients.push(line.trim_end().to_owned());
                }
                reply(format!("{answer}\r\n")).await?;
            }
            "DATA" => {
                reply("354 go ahead\r\n".to_owned()).await?;
                let mut content = Vec::new();
                let complete = loop {
                    let mut buf = [0u8; 4096];
                    let n = read.read(&mut buf).await?;
                    if n == 0 {
                        break false;
                    }
                    content.extend_from_slice(&buf[..n]);
                    if content.ends_with(b"\r\n.\r\n") || content == b".\r\n" {
                        break true;
                    }
                };
                if !complete {
                    if let Ok(mut s) = seen.lock() {
                        s.abandoned += 1;
                    }
                    return Ok(());
                }
                content.truncate(content.len().saturating_sub(3));
                let n = seen
                    .lock()
                    .map(|mut s| {
                        s.ended += 1;
                        s.ended - 1
                    })
                    .unwrap_or(0);
                if n == 0 {
                    tokio::time::sleep(script.first_end_of_data_delay).await;
                }
                let answer = (script.end_of_data)(n);
                if answer.starts_with('2')
                    && let Ok(mut s) = seen.lock()
                {
                    s.accepted.push(content);
                    s.accepted_for.push(std::mem::take(&mut recipients));
                }
                reply(format!("{answer}\r\n")).await?;
            }
            "RSET" | "NOOP" => reply("250 2.0.0 ok\r\n".to_owned()).await?,
            "QUIT" => {
                reply("221 2.0.0 bye\r\n".to_owned()).await?;
                return Ok(());
            }
            _ => reply("502 5.5.2 not here\r\n".to_owned()).await?,
        }
    }
}
