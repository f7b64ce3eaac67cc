//! The SASL exchanges of SMTP AUTH (RFC 4954): PLAIN (RFC 4616) and LOGIN, as pure steps from
//! the client's lines to credentials. The session decides when AUTH is allowed at all (only
//! inside TLS); the check of the credentials is the driver's.

use crate::reply::Reply;
use base64::Engine;
use smtp_proto::{AUTH_LOGIN, AUTH_PLAIN};

/// What the exchange waits for from the client.
#[derive(Debug)]
pub enum Waiting {
    /// The PLAIN response after an empty challenge.
    Plain,
    LoginUser,
    LoginPassword {
        username: String,
    },
}

/// The next step of an exchange.
#[derive(Debug)]
pub enum Step {
    /// Send this `334` challenge and wait.
    Challenge(Reply, Waiting),
    /// Check these credentials.
    Credentials { username: String, password: String },
    /// End the exchange with this refusal.
    Refused(Reply),
}

/// `AUTH <mechanism> [initial-response]`.
pub fn start(mechanism: u64, initial: &str) -> Step {
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
            Some(password) => Step::Credentials { username, password },
            None => Step::Refused(bad_base64()),
        },
    }
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
        Some((username, password)) => Step::Credentials { username, password },
        None => Step::Refused(Reply::new(501, "5.5.2", "Malformed AUTH PLAIN response")),
    }
}

fn decode(text: &[u8]) -> Option<String> {
    base64::engine::general_purpose::STANDARD
        .decode(text)
        .ok()
        .and_then(|b| String::from_utf8(b).ok())
}
