//! The PROXY protocol (HAProxy v1 text and v2 binary), so the client's own address survives a
//! load balancer: IP ranges and `Received:` see the client, not the balancer.
//!
//! A header is believed only from the balancers named with `--proxy-trusted` (or from anyone
//! with `--proxy-protocol` alone, SPEC 5.1). It is read however the network segments it (a v1
//! line byte by byte, a v2 header split anywhere), and what follows it in the same read (a TLS
//! ClientHello on smtps, sent by the balancer together with the header) is handed on through
//! [`Rewind`], never dropped.

use ppp::{HeaderResult, v1, v2};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// Longest header accepted (v2 with TLVs); a balancer's header is far shorter.
const MAX_HEADER: usize = 4096;
/// A v1 header is one line of at most 107 octets.
const MAX_V1: usize = 107;
const V2_SIGNATURE: &[u8] = b"\r\n\r\n\0\r\nQUIT\n";

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

/// How many octets the header at the start of `buf` has: `Ok(None)` while more are needed.
fn header_length(buf: &[u8]) -> Result<Option<usize>, ProxyError> {
    let v2_prefix = buf.len().min(V2_SIGNATURE.len());
    if buf[..v2_prefix] == V2_SIGNATURE[..v2_prefix] {
        if buf.len() < 16 {
            return Ok(None);
        }
        let total = 16 + usize::from(u16::from_be_bytes([buf[14], buf[15]]));
        return if total > MAX_HEADER {
            Err(ProxyError::Invalid)
        } else if buf.len() < total {
            Ok(None)
        } else {
            Ok(Some(total))
        };
    }
    let v1_prefix = buf.len().min(6);
    if buf[..v1_prefix] != b"PROXY "[..v1_prefix] {
        return Err(ProxyError::Invalid);
    }
    match buf.windows(2).position(|w| w == b"\r\n") {
        Some(at) if at + 2 <= MAX_V1 => Ok(Some(at + 2)),
        Some(_) => Err(ProxyError::Invalid),
        None if buf.len() >= MAX_V1 => Err(ProxyError::Invalid),
        None => Ok(None),
    }
}

/// Reads the header; returns the client's address (`None` for LOCAL/UNKNOWN, e.g. balancer
/// health checks: the socket's own peer is used) and any bytes that followed it.
pub async fn read_header(
    stream: &mut TcpStream,
    limit: Duration,
) -> Result<(Option<SocketAddr>, Vec<u8>), ProxyError> {
    let mut buf = Vec::with_capacity(256);
    let deadline = tokio::time::Instant::now() + limit;
    let length = loop {
        let read = tokio::time::timeout_at(deadline, stream.read_buf(&mut buf)).await;
        match read {
            Err(_) => return Err(ProxyError::Timeout),
            Ok(Ok(0)) | Ok(Err(_)) => return Err(ProxyError::Closed),
            Ok(Ok(_)) => {}
        }
        if let Some(length) = header_length(&buf)? {
            break length;
        }
    };
    let source = match HeaderResult::parse(&buf[..length]) {
        HeaderResult::V1(Ok(header)) => v1_source(&header.addresses),
        HeaderResult::V2(Ok(header)) => v2_source(&header),
        _ => return Err(ProxyError::Invalid),
    };
    Ok((source, buf.split_off(length)))
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

/// A stream that first gives back bytes already read from it (what followed a PROXY header),
/// then reads on. Writes go straight through.
#[derive(Debug)]
pub struct Rewind<S> {
    early: Vec<u8>,
    at: usize,
    inner: S,
}

impl<S> Rewind<S> {
    pub fn new(inner: S, early: Vec<u8>) -> Self {
        Self {
            early,
            at: 0,
            inner,
        }
    }

    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// Whether early bytes are still waiting to be read.
    pub fn has_early(&self) -> bool {
        self.at < self.early.len()
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Rewind<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.has_early() {
            let n = (self.early.len() - self.at).min(buf.remaining());
            let from = self.at;
            buf.put_slice(&self.early[from..from + n]);
            self.at += n;
            if !self.has_early() {
                self.early = Vec::new();
                self.at = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Rewind<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_header_is_complete_only_when_all_of_it_arrived() {
        let v1 = b"PROXY TCP4 203.0.113.7 192.0.2.1 40000 25\r\nEHLO";
        for end in 0..v1.len() {
            let got = header_length(&v1[..end.max(1)]).ok().flatten();
            let want = (end >= 43).then_some(43);
            assert_eq!(got, want, "{end}");
        }
        let mut v2 = V2_SIGNATURE.to_vec();
        v2.extend_from_slice(&[0x21, 0x11, 0, 12]);
        v2.extend_from_slice(&[203, 0, 113, 7, 192, 0, 2, 1, 0x9c, 0x40, 0, 25]);
        v2.extend_from_slice(b"\x16\x03\x01");
        for end in 1..v2.len() {
            let got = header_length(&v2[..end]).ok().flatten();
            assert_eq!(got, (end >= 28).then_some(28), "{end}");
        }
        assert!(header_length(b"EHLO x\r\n").is_err());
        assert!(header_length(&[b'P'; 200]).is_err());
    }
}
