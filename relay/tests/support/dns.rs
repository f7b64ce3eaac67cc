//! An authoritative DNS server on a loopback UDP port, built with hickory-proto, answering
//! from a small zone: MX, A, TXT, TLSA and null MX records; NXDOMAIN for names it does not
//! hold. It counts the queries it gets (to see the relay's cache at work). Answers carry a 1 s
//! TTL where a test changes a record ([`DnsServer::set_txt`]). With [`DnsServer::set_authentic`]
//! it answers as a validating resolver that validated everything (the AD bit set), which is
//! what DANE trusts.

use hickory_proto::op::{Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::rdata::{A, MX, TLSA, TXT};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

#[derive(Default)]
struct Zone {
    /// (lowercased name without the final dot, type) -> records.
    records: HashMap<(String, RecordType), Vec<RData>>,
    /// Names whose records a test changes: answered with a TTL of 1 s.
    changing: std::collections::HashSet<String>,
    /// Answers carry the AD bit (validated by DNSSEC).
    authentic: bool,
    /// Names that exist (any type).
    names: std::collections::HashSet<String>,
}

pub struct DnsServer {
    pub addr: SocketAddr,
    zone: Arc<Mutex<Zone>>,
    queries: Arc<Mutex<HashMap<(String, RecordType), usize>>>,
    total: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

fn key(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

fn name(text: &str) -> Name {
    Name::from_ascii(format!("{}.", text.trim_end_matches('.'))).unwrap_or_else(|e| panic!("{e}"))
}

impl DnsServer {
    pub async fn start() -> Self {
        let socket = tokio::net::UdpSocket::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let addr = socket.local_addr().unwrap_or_else(|e| panic!("{e}"));
        let zone: Arc<Mutex<Zone>> = Arc::default();
        let queries: Arc<Mutex<HashMap<(String, RecordType), usize>>> = Arc::default();
        let total = Arc::new(AtomicUsize::new(0));
        let task = {
            let (zone, queries, total) = (zone.clone(), queries.clone(), total.clone());
            tokio::spawn(async move {
                let mut buf = vec![0u8; 1500];
                loop {
                    let Ok((n, from)) = socket.recv_from(&mut buf).await else {
                        return;
                    };
                    let Ok(request) = Message::from_vec(&buf[..n]) else {
                        continue;
                    };
                    total.fetch_add(1, Ordering::SeqCst);
                    let mut response =
                        Message::new(request.metadata.id, MessageType::Response, OpCode::Query);
                    response.metadata.authoritative = true;
                    response.metadata.recursion_desired = request.metadata.recursion_desired;
                    response.metadata.recursion_available = true;
                    response.metadata.authentic_data =
                        zone.lock().map(|z| z.authentic).unwrap_or(false);
                    for q in &request.queries {
                        response.add_query(q.clone());
                        let k = (key(&q.name().to_ascii()), q.query_type());
                        *queries
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .entry(k.clone())
                            .or_default() += 1;
                        let zone = zone.lock().unwrap_or_else(|e| e.into_inner());
                        if !zone.names.contains(&k.0) {
                            response.metadata.response_code = ResponseCode::NXDomain;
                            continue;
                        }
                        let ttl = if zone.changing.contains(&k.0) { 1 } else { 300 };
                        for rdata in zone.records.get(&k).into_iter().flatten() {
                            response.add_answer(Record::from_rdata(
                                q.name().clone(),
                                ttl,
                                rdata.clone(),
                            ));
                        }
                    }
                    if let Ok(bytes) = response.to_vec() {
                        let _ = socket.send_to(&bytes, from).await;
                    }
                }
            })
        };
        Self {
            addr,
            zone,
            queries,
            total,
            task,
        }
    }

    fn add(&self, owner: &str, rdata: RData) {
        let mut zone = self.zone.lock().unwrap_or_else(|e| e.into_inner());
        zone.names.insert(key(owner));
        zone.records
            .entry((key(owner), rdata.record_type()))
            .or_default()
            .push(rdata);
    }

    pub fn mx(&self, domain: &str, preference: u16, exchange: &str) {
        self.add(domain, RData::MX(MX::new(preference, name(exchange))));
    }

    /// `MX 0 .` (RFC 7505): the domain takes no mail.
    pub fn null_mx(&self, domain: &str) {
        self.add(domain, RData::MX(MX::new(0, Name::root())));
    }

    /// Replaces the records of `rdata`'s type at `owner` with it, answered with a 1 s TTL.
    fn set(&self, owner: &str, rdata: RData) {
        let mut zone = self.zone.lock().unwrap_or_else(|e| e.into_inner());
        zone.names.insert(key(owner));
        zone.changing.insert(key(owner));
        zone.records
            .insert((key(owner), rdata.record_type()), vec![rdata]);
    }

    /// Replaces the TXT records of `owner` with one record (1 s TTL).
    pub fn set_txt(&self, owner: &str, text: &str) {
        self.set(owner, RData::TXT(TXT::new(vec![text.to_owned()])));
    }

    /// Replaces the MX records of `domain` with one record (1 s TTL).
    pub fn set_mx(&self, domain: &str, preference: u16, exchange: &str) {
        self.set(domain, RData::MX(MX::new(preference, name(exchange))));
    }

    /// A TLSA record (`usage selector matching data`) at `owner`, e.g. `_25._tcp.mx.example`.
    pub fn tlsa(&self, owner: &str, usage: u8, selector: u8, matching: u8, data: Vec<u8>) {
        self.add(
            owner,
            RData::TLSA(TLSA::new(
                usage.into(),
                selector.into(),
                matching.into(),
                data,
            )),
        );
    }

    /// Whether answers say they were validated (the AD bit).
    pub fn set_authentic(&self, authentic: bool) {
        self.zone
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .authentic = authentic;
    }

    pub fn a(&self, host: &str, ip: Ipv4Addr) {
        self.add(host, RData::A(A(ip)));
    }

    /// Queries received for `name` and `record_type`.
    pub fn queries(&self, name: &str, record_type: RecordType) -> usize {
        self.queries
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&(key(name), record_type))
            .copied()
            .unwrap_or(0)
    }

    pub fn total(&self) -> usize {
        self.total.load(Ordering::SeqCst)
    }
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}
