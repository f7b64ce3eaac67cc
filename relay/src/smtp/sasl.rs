//! The SASL exchanges of SMTP AUTH (RFC 4954): PLAIN (RFC 4616), LOGIN, and the bearer-token
//! mechanisms OAUTHBEARER (RFC 7628) and XOAUTH2 (Google's), as pure steps from the client's
//! lines to credentials. The session decides when AUTH is allowed at all (only inside TLS);
//! the check of the credentials is the driver's.

use crate::reply::Reply;
use base64::Engine;
use smtp_proto::{AUTH_LOGIN, AUTH_OAUTHBEARER, AUTH_PLAIN, AUTH_XOAUTH2};

/// What the exchange waits for from the client.
#[derive(Debug)]
pub enum Waiting {
    /// The PLAIN response after an empty challenge.
    Plain,
    LoginUser,
    LoginPassword {
        username: String,
    },
    /// The OAUTHBEARER or XOAUTH2 response after an empty challenge.
    Bearer {
        oauthbearer: bool,
    },
    /// A token was refused and the client was sent the error challenge (RFC 7628 3.2.3): its
    /// answer, whatever it is, ends the exchange with `535`.
    BearerRefused,
}

/// What the client proves itself with.
#[derive(Debug, PartialEq, Eq)]
pub enum Secret {
    Password(String),
    /// An OAuth 2.0 bearer token (a service-account token): the identity is the token's.
    Bearer(String),
}

/// The next step of an exchange.
#[derive(Debug)]
pub enum Step {
    /// Send this `334` challenge and wait.
    Challenge(Reply, Waiting),
    /// Check these credentials (`username`: as the client named itself; for a bearer token
    /// only for logs).
    Credentials { username: String, secret: Secret },
    /// End the exchange with this refusal.
    Refused(Reply),
}

/// The challenge that tells a client its token was refused (RFC 7628 3.2.2): a JSON status,
/// base64-encoded; the client answers with a dummy line and hears `535`.
pub fn bearer_refused() -> Step {
    let status = base64::engine::general_purpose::STANDARD
        .encode(br#"{"status":"invalid_token","schemes":"bearer"}"#);
    Step::Challenge(Reply::auth_challenge(status), Waiting::BearerRefused)
}

/// `AUTH <mechanism> [initial-response]`.
pub fn start(mechanism: u64, initial: &str) -> Step {
    if mechanism == AUTH_OAUTHBEARER || mechanism == AUTH_XOAUTH2 {
        let oauthbearer = mechanism == AUTH_OAUTHBEARER;
        return if initial.is_empty() {
            Step::Challenge(Reply::auth_challenge(""), Waiting::Bearer { oauthbearer })
        } else {
            bearer(initial.as_bytes(), oauthbearer)
        };
    }
    if mechanism == AUTH_PLAIN {
        if initial.is_empty() {
            Step::Challenge(Reply::auth_challenge(""), Waiting::Plain)
        } else {
            plain(initial.as_bytes())
        }
    } else if mechanism == AUTH_LOGIN {
        if initial.is_empty() {
            Step::Challenge(Reply::auth_challenge("VXNlcm5hbWU6"), Waiting::LoginUser)
        } else {
            login_user(initial.as_bytes())
        }
    } else {
        Step::Refused(Reply::auth_mechanism_unsupported())
    }
}

/// One line of the client's in answer to a challenge.
pub fn respond(waiting: Waiting, line: &[u8]) -> Step {
    let line = line.strip_suffix(b"\r\n").unwrap_or(line);
    if line == b"*" {
        return Step::Refused(Reply::auth_cancelled());
    }
    match waiting {
        Waiting::Plain => plain(line),
        Waiting::LoginUser => login_user(line),
        Waiting::LoginPassword { username } => match decode(line) {
            Some(password) => Step::Credentials {
                username,
                secret: Secret::Password(password),
            },
            None => Step::Refused(bad_base64()),
        },
        Waiting::Bearer { oauthbearer } => bearer(line, oauthbearer),
        Waiting::BearerRefused => Step::Refused(Reply::auth_failed()),
    }
}

/// OAUTHBEARER: `gs2-header ^A key=value ^A ... ^A ^A` with `auth=Bearer <token>` among the
/// pairs and the user in the gs2 header's `a=`; XOAUTH2: `user=<user> ^A auth=Bearer <token>
/// ^A ^A`.
fn bearer(response: &[u8], oauthbearer: bool) -> Step {
    let malformed = || {
        Step::Refused(Reply::new(
            501,
            "5.5.2",
            if oauthbearer {
                "Malformed AUTH OAUTHBEARER response"
            } else {
                "Malformed AUTH XOAUTH2 response"
            },
        ))
    };
    let Some(text) = decode(response) else {
        return Step::Refused(bad_base64());
    };
    let mut fields = text.split('\x01');
    let mut username = String::new();
    if oauthbearer {
        // gs2-header: "n,a=user," or "n,,"; channel binding ("p=") is not offered.
        let Some(header) = fields.next() else {
            return malformed();
        };
        let mut parts = header.split(',');
        if parts.next() != Some("n") {
            return malformed();
        }
        if let Some(user) = parts.next().and_then(|a| a.strip_prefix("a=")) {
            let Some(user) = saslname(user) else {
                return malformed();
            };
            username = user;
        }
    }
    let mut token = None;
    for field in fields {
        if let Some(user) = field.strip_prefix("user=") {
            username = user.to_owned();
        } else if let Some(auth) = field.strip_prefix("auth=") {
            let (scheme, value) = auth.split_once(' ').unwrap_or((auth, ""));
            if scheme.eq_ignore_ascii_case("bearer") && !value.trim().is_empty() {
                token = Some(value.trim().to_owned());
            }
        }
    }
    match token {
        Some(token) => Step::Credentials {
            username,
            secret: Secret::Bearer(token),
        },
        None => malformed(),
    }
}

/// A GS2 header's `saslname` (RFC 5801 section 4): `,` is written `=2C` and `=` is written
/// `=3D`; any other `=` is malformed.
fn saslname(text: &str) -> Option<String> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find('=') {
        out.push_str(&rest[..at]);
        let escape = rest.get(at..at + 3)?;
        out.push(match escape {
            "=2C" | "=2c" => ',',
            "=3D" | "=3d" => '=',
            _ => return None,
        });
        rest = &rest[at + 3..];
    }
    out.push_str(rest);
    Some(out)
}

fn bad_base64() -> Reply {
    Reply::new(501, "5.5.2", "Invalid base64")
}

fn login_user(text: &[u8]) -> Step {
    match decode(text) {
        Some(username) => Step::Challenge(
            Reply::auth_challenge("UGFzc3dvcmQ6"),
            Waiting::LoginPassword { username },
        ),
        None => Step::Refused(bad_base64()),
    }
}

/// `[authzid] NUL authcid NUL password` (RFC 4616); an authzid other than the authcid is
/// refused: nobody may act as someone else.
fn plain(response: &[u8]) -> Step {
    if response == b"*" {
        return Step::Refused(Reply::auth_cancelled());
    }
    let decoded = if response == b"=" {
        Some(Vec::new())
    } else {
        base64::engine::general_purpose::STANDARD
            .decode(response)
            .ok()
    };
    let parts: Option<(String, String)> = decoded.and_then(|bytes| {
        let mut fields = bytes.split(|b| *b == 0);
        let authzid = fields.next()?;
        let authcid = String::from_utf8(fields.next()?.to_vec()).ok()?;
        let password = String::from_utf8(fields.next()?.to_vec()).ok()?;
        if fields.next().is_some() || (!authzid.is_empty() && authzid != authcid.as_bytes()) {
            return None;
        }
        Some((authcid, password))
    });
    match parts {
        Some((username, password)) => Step::Credentials {
            username,
            secret: Secret::Password(password),
        },
        None => Step::Refused(Reply::new(501, "5.5.2", "Malformed AUTH PLAIN response")),
    }
}

fn decode(text: &[u8]) -> Option<String> {
    base64::engine::general_purpose::STANDARD
        .decode(text)
        .ok()
        .and_then(|b| String::from_utf8(b).ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encode(text: &str) -> String {
        base64::engine::general_purpose::STANDARD.encode(text)
    }

    fn token_of(step: Step) -> Option<(String, String)> {
        match step {
            Step::Credentials {
                username,
                secret: Secret::Bearer(token),
            } => Some((username, token)),
            _ => None,
        }
    }

    #[test]
    fn oauthbearer_and_xoauth2_responses_give_the_token() {
        let oauthbearer =
            encode("n,a=app@example.com,\x01host=relay\x01port=587\x01auth=Bearer eyJ.a.b\x01\x01");
        assert_eq!(
            token_of(start(AUTH_OAUTHBEARER, &oauthbearer)),
            Some(("app@example.com".into(), "eyJ.a.b".into()))
        );
        // RFC 5801's escapes in the authorisation identity: `=2C` is `,` and `=3D` is `=`.
        let escaped = encode("n,a=odd=2Cname=3Dx@example.com,\x01auth=Bearer eyJ.g.h\x01\x01");
        assert_eq!(
            token_of(start(AUTH_OAUTHBEARER, &escaped)),
            Some(("odd,name=x@example.com".into(), "eyJ.g.h".into()))
        );
        let no_user = encode("n,,\x01auth=bearer eyJ.c.d\x01\x01");
        assert_eq!(
            token_of(start(AUTH_OAUTHBEARER, &no_user)),
            Some((String::new(), "eyJ.c.d".into()))
        );
        let xoauth2 = encode("user=app@example.com\x01auth=Bearer eyJ.e.f\x01\x01");
        assert_eq!(
            token_of(start(AUTH_XOAUTH2, &xoauth2)),
            Some(("app@example.com".into(), "eyJ.e.f".into()))
        );
        // Without an initial response: an empty challenge, then the same response.
        let Step::Challenge(reply, waiting) = start(AUTH_XOAUTH2, "") else {
            panic!("no challenge");
        };
        assert_eq!(reply.code(), 334);
        assert_eq!(
            token_of(respond(waiting, xoauth2.as_bytes())),
            Some(("app@example.com".into(), "eyJ.e.f".into()))
        );
    }

    #[test]
    fn malformed_bearer_responses_are_refused_with_501() {
        for (mechanism, text) in [
            (AUTH_OAUTHBEARER, "y,,\x01auth=Bearer t\x01\x01"),
            (AUTH_OAUTHBEARER, "n,,\x01host=x\x01\x01"),
            (AUTH_OAUTHBEARER, "n,a=bad=name,\x01auth=Bearer t\x01\x01"),
            (AUTH_XOAUTH2, "user=a\x01auth=Basic dXNlcg==\x01\x01"),
            (AUTH_XOAUTH2, "user=a\x01auth=Bearer \x01\x01"),
        ] {
            match start(mechanism, &encode(text)) {
                Step::Refused(reply) => assert_eq!(reply.code(), 501, "{text:?}"),
                other => panic!("{text:?}: {other:?}"),
            }
        }
        assert!(matches!(start(AUTH_XOAUTH2, "%%%"), Step::Refused(_)));
    }

    #[test]
    fn a_refused_token_gets_the_error_challenge_then_535() {
        let Step::Challenge(reply, waiting) = bearer_refused() else {
            panic!("no challenge");
        };
        assert_eq!(reply.code(), 334);
        match respond(waiting, b"AQ==") {
            Step::Refused(reply) => {
                assert_eq!((reply.code(), reply.enhanced()), (535, Some("5.7.8")))
            }
            other => panic!("{other:?}"),
        }
    }
}
