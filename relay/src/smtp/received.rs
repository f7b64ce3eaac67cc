//! The one `Received:` header the relay prepends (RFC 5321 section 4.4, RFC 3848 protocol
//! names), folded, with every client-supplied value made safe for a header.

use crate::interfaces::Recipient;
use std::net::IpAddr;
use std::time::SystemTime;

/// The negotiated TLS parameters, for `Received:` and logs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsInfo {
    pub version: String,
    pub cipher: String,
}

/// What the header says.
#[derive(Debug)]
pub struct Facts<'a> {
    pub helo: Option<&'a str>,
    pub client: IpAddr,
    pub hostname: &'a str,
    pub esmtp: bool,
    pub tls: Option<&'a TlsInfo>,
    pub authenticated: bool,
    pub id: &'a str,
    pub recipients: &'a [Recipient],
    pub now: SystemTime,
}

/// The header, ending in CRLF.
pub fn header(facts: &Facts<'_>) -> String {
    let helo = sanitize(facts.helo.unwrap_or("unknown"));
    let protocol = match (facts.esmtp, facts.tls.is_some(), facts.authenticated) {
        (false, _, _) => "SMTP",
        (true, false, false) => "ESMTP",
        (true, false, true) => "ESMTPA",
        (true, true, false) => "ESMTPS",
        (true, true, true) => "ESMTPSA",
    };
    let mut header = format!(
        "Received: from {helo} ([{}])\r\n\tby {} (Mailroute) with {protocol} id {}",
        facts.client,
        sanitize(facts.hostname),
        facts.id,
    );
    if let Some(tls) = facts.tls {
        header.push_str(&format!(
            "\r\n\t(using {} with cipher {})",
            sanitize(&tls.version),
            sanitize(&tls.cipher)
        ));
    }
    if let [only] = facts.recipients {
        header.push_str(&format!("\r\n\tfor <{}>", sanitize(&only.address)));
    }
    let date = httpdate::fmt_http_date(facts.now).replace(" GMT", " +0000");
    header.push_str(&format!(";\r\n\t{date}\r\n"));
    header
}

/// Client-supplied text in a header: printable ASCII without parentheses or angle brackets
/// (so it cannot close a comment or an address), UTF-8 kept for SMTPUTF8 addresses.
fn sanitize(text: &str) -> String {
    text.chars()
        .map(|c| match c {
            '(' | ')' | '<' | '>' | ';' | '\\' => '_',
            c if c.is_control() || c == ' ' => '_',
            c => c,
        })
        .collect()
}
