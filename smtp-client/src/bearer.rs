//! Upstream AUTH with an OAuth 2.0 access token: SASL OAUTHBEARER (RFC 7628) when the
//! upstream offers it, else XOAUTH2 (Google's and Microsoft's), a refused token replaced once.
//!
//! Hand-written rather than mail-send's `authenticate`: on the error challenge a server sends
//! for a refused token (`334 <base64 JSON status>`), mail-send answers with the credentials
//! again instead of the dummy response RFC 7628 3.2.3 asks for, and its OAUTHBEARER lacks the
//! GS2 header (`n,a=...,`). Where the tokens come from is the caller's ([`TokenSource`]).

use crate::failure::{UpstreamError, from_mail_send, to_reply};
use crate::stream::Stream;
use base64::Engine;
use mail_send::SmtpClient;
use smtp_proto::{AUTH_OAUTHBEARER, AUTH_XOAUTH2, EhloResponse};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

pub use crate::failure::TokenError;

/// Where a route's access tokens come from, shared by every connection of the route.
pub trait TokenSource: Send + Sync {
    /// A token valid now. `refused` is the token an upstream just refused: the source gets a
    /// new one unless it already holds another.
    fn token<'a>(
        &'a self,
        refused: Option<&'a str>,
    ) -> Pin<Box<dyn Future<Output = Result<Arc<str>, TokenError>> + Send + 'a>>;
}

/// How the relay authenticates to an upstream.
#[derive(Clone)]
pub enum Login {
    /// SASL PLAIN or LOGIN (mail-send picks what the upstream offers).
    Password { username: String, password: String },
    /// SASL OAUTHBEARER or XOAUTH2 with a token for `username` (the mailbox).
    Bearer {
        username: String,
        tokens: Arc<dyn TokenSource>,
    },
}

impl Login {
    /// The user name the upstream is logged in as.
    pub fn username(&self) -> &str {
        match self {
            Login::Password { username, .. } | Login::Bearer { username, .. } => username,
        }
    }
}

impl std::fmt::Debug for Login {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // NB: never the password or a token.
        match self {
            Login::Password { username, .. } => f
                .debug_struct("Password")
                .field("username", username)
                .finish_non_exhaustive(),
            Login::Bearer { username, .. } => f
                .debug_struct("Bearer")
                .field("username", username)
                .finish_non_exhaustive(),
        }
    }
}

/// The bearer-token mechanisms, in order of preference.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mechanism {
    OAuthBearer,
    XOAuth2,
}

impl Mechanism {
    /// The mechanism to use with an upstream offering `mechanisms` (EHLO's AUTH bits).
    pub fn choose(mechanisms: u64) -> Option<Self> {
        if mechanisms & AUTH_OAUTHBEARER != 0 {
            Some(Mechanism::OAuthBearer)
        } else if mechanisms & AUTH_XOAUTH2 != 0 {
            Some(Mechanism::XOAuth2)
        } else {
            None
        }
    }

    fn name(self) -> &'static str {
        match self {
            Mechanism::OAuthBearer => "OAUTHBEARER",
            Mechanism::XOAuth2 => "XOAUTH2",
        }
    }

    /// The client's response, before base64: OAUTHBEARER's GS2 header with the authorization
    /// identity (`,` and `=` escaped as RFC 5801 says) then `auth=Bearer`; XOAUTH2's `user=`.
    pub fn response(self, username: &str, token: &str) -> String {
        match self {
            Mechanism::OAuthBearer => {
                let user = username.replace('=', "=3D").replace(',', "=2C");
                format!("n,a={user},\x01auth=Bearer {token}\x01\x01")
            }
            Mechanism::XOAuth2 => format!("user={username}\x01auth=Bearer {token}\x01\x01"),
        }
    }

    /// What the client sends after an error challenge to end the exchange: `%x01` for
    /// OAUTHBEARER (RFC 7628 3.2.3), an empty line for XOAUTH2.
    fn dummy(self) -> &'static [u8] {
        match self {
            Mechanism::OAuthBearer => b"AQ==\r\n",
            Mechanism::XOAuth2 => b"\r\n",
        }
    }
}

/// RFC 4954 4: an AUTH command with its initial response longer than an SMTP command line
/// (512 octets with CRLF) sends the response after an empty challenge instead.
const MAX_COMMAND_LINE: usize = 512;

/// Authenticates `client` as `username` with a token from `tokens`; a token the upstream
/// refuses (`535`, or an error challenge) is replaced once and tried again on the same
/// connection.
pub(crate) async fn authenticate(
    client: &mut SmtpClient<Stream>,
    ehlo: &EhloResponse<String>,
    username: &str,
    tokens: &dyn TokenSource,
    timeout: Duration,
) -> Result<(), UpstreamError> {
    let mechanism = Mechanism::choose(ehlo.auth_mechanisms).ok_or(UpstreamError::Protocol {
        stage: "AUTH",
        detail: "the upstream offers neither OAUTHBEARER nor XOAUTH2 for OAuth".into(),
    })?;
    let token = tokens.token(None).await.map_err(UpstreamError::Token)?;
    let first = match attempt(client, mechanism, username, &token, timeout).await? {
        Attempt::Accepted => return Ok(()),
        Attempt::Refused {
            reply,
            retry: false,
        } => return Err(refused(reply)),
        Attempt::Refused { reply, retry: true } => reply,
    };
    tracing::debug!(
        username,
        code = first.code,
        "upstream refused the access token; asking for a new one"
    );
    let fresh = tokens
        .token(Some(&*token))
        .await
        .map_err(UpstreamError::Token)?;
    match attempt(client, mechanism, username, &fresh, timeout).await? {
        Attempt::Accepted => Ok(()),
        Attempt::Refused { reply, .. } => Err(refused(reply)),
    }
}

enum Attempt {
    Accepted,
    /// `retry`: the token itself was refused (worth a new one), not the exchange.
    Refused {
        reply: smtp_proto::Response<String>,
        retry: bool,
    },
}

fn refused(reply: smtp_proto::Response<String>) -> UpstreamError {
    UpstreamError::Refused {
        stage: "AUTH",
        reply: to_reply(&reply),
    }
}

async fn attempt(
    client: &mut SmtpClient<Stream>,
    mechanism: Mechanism,
    username: &str,
    token: &str,
    timeout: Duration,
) -> Result<Attempt, UpstreamError> {
    let fail = |e| from_mail_send("AUTH", e, timeout);
    let response =
        base64::engine::general_purpose::STANDARD.encode(mechanism.response(username, token));
    let command = format!("AUTH {} {response}\r\n", mechanism.name());
    let mut reply = if command.len() <= MAX_COMMAND_LINE {
        client.cmd(command.as_bytes()).await.map_err(fail)?
    } else {
        let challenge = client
            .cmd(format!("AUTH {}\r\n", mechanism.name()).as_bytes())
            .await
            .map_err(fail)?;
        if challenge.code != 334 {
            return Ok(Attempt::Refused {
                reply: challenge,
                retry: false,
            });
        }
        client
            .cmd(format!("{response}\r\n").as_bytes())
            .await
            .map_err(fail)?
    };
    let mut challenged = false;
    if reply.code == 334 {
        // The error challenge: the token was refused; the server ends with a failure reply.
        challenged = true;
        reply = client.cmd(mechanism.dummy()).await.map_err(fail)?;
    }
    Ok(match reply.code {
        235 => Attempt::Accepted,
        code => Attempt::Refused {
            retry: challenged || code == 535,
            reply,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oauthbearer_is_preferred_and_neither_is_none() {
        assert_eq!(
            Mechanism::choose(AUTH_OAUTHBEARER | AUTH_XOAUTH2),
            Some(Mechanism::OAuthBearer)
        );
        assert_eq!(Mechanism::choose(AUTH_XOAUTH2), Some(Mechanism::XOAuth2));
        assert_eq!(Mechanism::choose(smtp_proto::AUTH_PLAIN), None);
    }

    #[test]
    fn responses_are_what_rfc_7628_and_xoauth2_say() {
        assert_eq!(
            Mechanism::OAuthBearer.response("relay@example.com", "tok"),
            "n,a=relay@example.com,\x01auth=Bearer tok\x01\x01"
        );
        // RFC 5801: the authorization identity escapes `,` and `=`.
        assert_eq!(
            Mechanism::OAuthBearer.response("a,b=c", "t"),
            "n,a=a=2Cb=3Dc,\x01auth=Bearer t\x01\x01"
        );
        assert_eq!(
            Mechanism::XOAuth2.response("relay@example.com", "tok"),
            "user=relay@example.com\x01auth=Bearer tok\x01\x01"
        );
    }
}
