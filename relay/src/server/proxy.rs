//! The PROXY protocol (HAProxy v1 text and v2 binary), so the client's own address survives a
//! load balancer: IP ranges and `Received:` see the client, not the balancer.

use ppp::{HeaderResult, PartialResult, v1, v2};
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

/// Longest header accepted (v2 with TLVs); a balancer's header is far shorter.
const MAX_HEADER: usize = 4096;

/// Why a connection was dropped.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("no PROXY header within the time limit")]
    Timeout,
    #[error("connection closed before a complete PROXY header")]
    Closed,
    #[error("not a PROXY protocol header")]
    Invalid,
}

/// Reads the header; returns the client's address (`None` for LOCAL/UNKNOWN, e.g. balancer
/// health checks: the socket's own peer is used) and any bytes that followed it.
pub async fn read_header(
    stream: &mut TcpStream,
    limit: Duration,
) -> Result<(Option<SocketAddr>, Vec<u8>), ProxyError> {
    let mut buf = Vec::with_capacity(256);
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let read = tokio::time::timeout_at(deadline, stream.read_buf(&mut buf)).await;
        match read {
            Err(_) => return Err(ProxyError::Timeout),
            Ok(Ok(0)) | Ok(Err(_)) => return Err(ProxyError::Closed),
            Ok(Ok(_)) => {}
        }
        let parsed = HeaderResult::parse(&buf);
        if parsed.is_incomplete() {
            if buf.len() >= MAX_HEADER {
                return Err(ProxyError::Invalid);
            }
            continue;
        }
        let (source, length) = match parsed {
            HeaderResult::V1(Ok(header)) => (v1_source(&header.addresses), header.header.len()),
            HeaderResult::V2(Ok(header)) => (v2_source(&header), header.header.len()),
            _ => return Err(ProxyError::Invalid),
        };
        let rest = buf.get(length..).map(<[u8]>::to_vec).unwrap_or_default();
        return Ok((source, rest));
    }
}

fn v1_source(addresses: &v1::Addresses) -> Option<SocketAddr> {
    match addresses {
        v1::Addresses::Tcp4(a) => {
            Some(SocketAddr::new(IpAddr::V4(a.source_address), a.source_port))
        }
        v1::Addresses::Tcp6(a) => {
            Some(SocketAddr::new(IpAddr::V6(a.source_address), a.source_port))
        }
        v1::Addresses::Unknown => None,
    }
}

fn v2_source(header: &v2::Header<'_>) -> Option<SocketAddr> {
    if header.command == v2::Command::Local {
        return None;
    }
    match &header.addresses {
        v2::Addresses::IPv4(a) => {
            Some(SocketAddr::new(IpAddr::V4(a.source_address), a.source_port))
        }
        v2::Addresses::IPv6(a) => {
            Some(SocketAddr::new(IpAddr::V6(a.source_address), a.source_port))
        }
        _ => None,
    }
}
