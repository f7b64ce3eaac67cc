//! Lookups whose DNSSEC status matters (DANE for SMTP, RFC 7672): sent to the configured
//! resolver with the AD and DO bits set (RFC 6840 section 5.7), and the answer's AD bit taken
//! as that resolver's word that it validated the answer. The bit is not protected on the way,
//! so the resolver must be a validating one the relay trusts, reached over a path it trusts
//! (in the pod or on the node), as Postfix requires for `smtp_dns_support_level = dnssec`.
//! Not cached here: the validating resolver caches, and these lookups are made only when a
//! new connection is opened.

use futures_util::StreamExt;
use hickory_resolver::net::DnsHandle;
use hickory_resolver::net::client::Client;
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::net::udp::UdpClientStream;
use hickory_resolver::proto::op::{
    DnsRequest, DnsRequestOptions, Edns, Message, Query, ResponseCode,
};
use hickory_resolver::proto::rr::{Name, RData, RecordType};
use std::net::SocketAddr;
use std::time::Duration;

/// How long one lookup may take, retries included.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(5);

/// What a validated lookup found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Answer {
    /// Records of the asked type (none: the name has none, or does not exist); `secure`: the
    /// resolver validated them (or their absence).
    Found { records: Vec<RData>, secure: bool },
    /// The lookup failed (timeout, SERVFAIL: for a signed zone, possibly a forged answer).
    Failed(String),
}

impl Answer {
    /// Whether this is a validated answer.
    pub fn secure(&self) -> bool {
        matches!(self, Answer::Found { secure: true, .. })
    }
}

/// The resolver DNSSEC answers are asked of.
#[derive(Clone, Debug)]
pub struct Validating {
    server: Option<SocketAddr>,
}

impl Validating {
    /// `server`, or the first name server of the system's configuration (`/etc/resolv.conf`).
    pub fn new(server: Option<SocketAddr>) -> Self {
        let server = server.or_else(|| {
            let (config, _) = hickory_resolver::system_conf::read_system_conf().ok()?;
            let ns = config.name_servers().first()?;
            let port = ns.connections.first().map_or(53, |c| c.port);
            Some(SocketAddr::new(ns.ip, port))
        });
        Self { server }
    }

    /// The `record_type` records of `name`, with whether the resolver validated them.
    pub async fn lookup(&self, name: &str, record_type: RecordType) -> Answer {
        let Some(server) = self.server else {
            return Answer::Failed("no name server configured".to_owned());
        };
        let fqdn = match Name::from_ascii(format!("{}.", name.trim_end_matches('.'))) {
            Ok(n) => n,
            Err(e) => return Answer::Failed(format!("{name:?}: {e}")),
        };
        let mut message = Message::query();
        message.queries.push(Query::query(fqdn, record_type));
        message.metadata.recursion_desired = true;
        message.metadata.authentic_data = true;
        let mut edns = Edns::new();
        edns.set_max_payload(1232).set_dnssec_ok(true);
        message.edns = Some(edns);
        let mut options = DnsRequestOptions::default();
        options.edns_set_dnssec_ok = true;
        let stream = UdpClientStream::builder(server, TokioRuntimeProvider::default())
            .with_timeout(Some(LOOKUP_TIMEOUT / 2))
            .build();
        let (client, background) = Client::<TokioRuntimeProvider>::from_sender(stream);
        let background = tokio::spawn(background);
        let response = tokio::time::timeout(
            LOOKUP_TIMEOUT,
            client.send(DnsRequest::new(message, options)).next(),
        )
        .await;
        background.abort();
        let response = match response {
            Ok(Some(Ok(r))) => r,
            Ok(Some(Err(e))) => return Answer::Failed(format!("{record_type} {name}: {e}")),
            Ok(None) => return Answer::Failed(format!("{record_type} {name}: no answer")),
            Err(_) => return Answer::Failed(format!("{record_type} {name}: timed out")),
        };
        let secure = response.metadata.authentic_data;
        match response.metadata.response_code {
            ResponseCode::NoError | ResponseCode::NXDomain => Answer::Found {
                records: response
                    .answers
                    .iter()
                    .filter(|r| r.record_type() == record_type)
                    .map(|r| r.data.clone())
                    .collect(),
                secure,
            },
            code => Answer::Failed(format!("{record_type} {name}: {code}")),
        }
    }
}
