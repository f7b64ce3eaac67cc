//! What can go wrong with an upstream, as one error type shared by the session and its AUTH
//! steps, with the enhanced code each failure gives the client.

use crate::reply::Reply;
use smtp_proto::Response;
use std::io;
use std::net::SocketAddr;
use std::time::Duration;

/// The stage whose failure may have delivered the message (its end of data was sent).
pub(crate) const END_OF_DATA: &str = "end of data";

/// Why no access token could be had (the token endpoint failed or refused the client).
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct TokenError(pub String);

/// Why an upstream could not take a message.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("connect to {addr}: {source}")]
    Connect { addr: SocketAddr, source: io::Error },
    #[error("{stage} timed out after {after:?}")]
    Timeout {
        stage: &'static str,
        after: Duration,
    },
    #[error("{stage}: {detail}")]
    Protocol { stage: &'static str, detail: String },
    /// The upstream answered with a failure outside a transaction (greeting, EHLO, AUTH).
    #[error("{stage}: upstream said {}", .reply.code())]
    Refused { stage: &'static str, reply: Reply },
    #[error("TLS required but the upstream does not offer STARTTLS")]
    TlsNotOffered,
    #[error("TLS handshake: {0}")]
    Tls(String),
    /// The handshake failed on the upstream's certificate (the checks the TLS settings ask for).
    #[error("TLS handshake: certificate {problem}: {detail}")]
    Certificate {
        problem: crate::tls::CertificateProblem,
        detail: String,
    },
    #[error("AUTH credentials are never sent without TLS")]
    AuthWithoutTls,
    /// No OAuth access token could be had for the upstream's AUTH.
    #[error("no OAuth access token: {0}")]
    Token(TokenError),
    /// The client's reply bound passed before the end of data was written: the message was
    /// abandoned unterminated.
    #[error("{stage} not done within the reply bound")]
    Bound { stage: &'static str },
    /// A copy whose primary legs did not all accept the message: abandoned before its final
    /// `.` (SPEC 6.3).
    #[error("copy withheld: the message's primary delivery did not succeed")]
    Withheld,
}

impl UpstreamError {
    /// Whether the failure came before the message content was sent: nothing can have been
    /// delivered, so another host (or a fresh connection) may be tried.
    pub fn is_before_data(&self) -> bool {
        match self {
            UpstreamError::Timeout { stage, .. } | UpstreamError::Protocol { stage, .. } => {
                *stage != END_OF_DATA
            }
            // NB: the bound is spent, and a withheld copy must not go to another host.
            UpstreamError::Bound { .. } | UpstreamError::Withheld => false,
            _ => true,
        }
    }

    /// Enhanced code for the client's `451` (RFC 3463).
    pub fn enhanced(&self) -> &'static str {
        match self {
            UpstreamError::Connect { .. } => "4.4.1",
            UpstreamError::Timeout { .. } => "4.4.2",
            UpstreamError::TlsNotOffered
            | UpstreamError::Tls(_)
            | UpstreamError::Certificate { .. } => "4.7.5",
            UpstreamError::AuthWithoutTls => "4.7.5",
            UpstreamError::Token(_) => "4.7.0",
            UpstreamError::Bound { .. } => "4.4.5",
            UpstreamError::Refused { .. }
            | UpstreamError::Protocol { .. }
            | UpstreamError::Withheld => "4.4.0",
        }
    }
}

pub(crate) fn from_mail_send(
    stage: &'static str,
    error: mail_send::Error,
    after: Duration,
) -> UpstreamError {
    match error {
        mail_send::Error::Timeout => UpstreamError::Timeout { stage, after },
        mail_send::Error::UnexpectedReply(r) | mail_send::Error::AuthenticationFailed(r) => {
            UpstreamError::Refused {
                stage,
                reply: to_reply(&r),
            }
        }
        mail_send::Error::Tls(e) => UpstreamError::Tls(e.to_string()),
        other => UpstreamError::Protocol {
            stage,
            detail: other.to_string(),
        },
    }
}

/// An upstream reply as a [`Reply`] (its enhanced code kept when well formed).
pub fn to_reply(response: &Response<String>) -> Reply {
    let esc = response.esc;
    let enhanced = (esc[0] != 0).then(|| format!("{}.{}.{}", esc[0], esc[1], esc[2]));
    Reply::relayed(
        response.code,
        enhanced.as_deref(),
        response.message.replace(['\r', '\n'], " "),
    )
}
