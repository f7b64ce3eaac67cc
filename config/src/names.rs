//! Mail addresses and domains as checked, normalised values.
//!
//! Domains are compared case-insensitively and stored in lower case without a trailing dot, an
//! internationalised name in its IDNA (UTS 46) ASCII form, so `Bücher.example` and
//! `xn--bcher-kva.example` are one domain. Local parts keep their case for delivery (RFC 5321
//! section 2.4: only the destination host may interpret it), and a quoted local part that needs
//! no quoting is stored unquoted (`"john"@x` is `john@x`).
//!
//! Whenever the relay asks whether two addresses are the same mailbox (registered users, group
//! members, `{address}` matchers, quota keys), it compares their [`Mailbox`]: the local part
//! lower-cased as well, as every mail system in use does. That is the one normalisation.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;
use std::str::FromStr;

/// Why a domain or address was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("is empty")]
    Empty,
    #[error("is longer than {max} octets")]
    TooLong { max: usize },
    #[error("has a trailing dot; write the domain without it")]
    TrailingDot,
    #[error("has an empty label (two dots in a row, or a leading dot)")]
    EmptyLabel,
    #[error("has a label longer than 63 octets")]
    LabelTooLong,
    #[error("has a label that starts or ends with '-'")]
    HyphenAtEdge,
    #[error("contains {0:?}, which is not allowed in a domain name")]
    BadDomainChar(char),
    #[error("has no '@'")]
    NoAt,
    #[error("has an invalid local part: {0}")]
    BadLocalPart(&'static str),
    #[error("has an invalid domain: {0}")]
    BadDomain(Box<NameError>),
    #[error("is an IP address literal; name a domain here")]
    AddressLiteral,
}

/// A DNS domain name in canonical form: lower case, no trailing dot, each label 1-63 octets of
/// letters, digits, '-', or UTF-8 (internationalised names are kept as written, lower-cased).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Domain(String);

impl Domain {
    /// The domain as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether `self` is `other` or one of its subdomains.
    pub fn is_within(&self, other: &Domain) -> bool {
        self.0 == other.0
            || (self.0.len() > other.0.len()
                && self.0.ends_with(&other.0)
                && self.0.as_bytes()[self.0.len() - other.0.len() - 1] == b'.')
    }

    /// The parent domains of `self` down to and including its registrable domain (the public
    /// suffix plus one label, per the Public Suffix List), nearest first. Empty when `self` is
    /// itself registrable, or has no registrable domain.
    pub fn parents_to_registrable(&self) -> Vec<Domain> {
        let Some(registrable) = psl::domain_str(&self.0) else {
            return Vec::new();
        };
        let mut parents = Vec::new();
        let mut rest = self.0.as_str();
        while rest.len() > registrable.len() {
            match rest.split_once('.') {
                Some((_, parent)) => {
                    parents.push(Domain(parent.to_owned()));
                    rest = parent;
                }
                None => break,
            }
        }
        parents
    }
}

impl FromStr for Domain {
    type Err = NameError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.is_empty() {
            return Err(NameError::Empty);
        }
        if s.starts_with('[') {
            return Err(NameError::AddressLiteral);
        }
        if s.ends_with('.') && s.len() > 1 {
            return Err(NameError::TrailingDot);
        }
        if s.len() > 253 {
            return Err(NameError::TooLong { max: 253 });
        }
        for label in s.split('.') {
            if label.is_empty() {
                return Err(NameError::EmptyLabel);
            }
            if label.len() > 63 {
                return Err(NameError::LabelTooLong);
            }
            if label.starts_with('-') || label.ends_with('-') {
                return Err(NameError::HyphenAtEdge);
            }
            if let Some(c) = label
                .chars()
                .find(|c| !(c.is_ascii_alphanumeric() || *c == '-' || !c.is_ascii()))
            {
                return Err(NameError::BadDomainChar(c));
            }
            if label
                .chars()
                .any(|c| !c.is_ascii() && (c.is_whitespace() || c.is_control()))
            {
                return Err(NameError::BadDomainChar(' '));
            }
        }
        if s.parse::<std::net::Ipv4Addr>().is_ok() {
            return Err(NameError::AddressLiteral);
        }
        if s.is_ascii() {
            return Ok(Domain(s.to_ascii_lowercase()));
        }
        // NB: UTS 46 mapping (case folding, NFC) then Punycode: one spelling per name.
        let ascii = idna::domain_to_ascii(s).map_err(|_| NameError::BadDomainChar(' '))?;
        if ascii.len() > 253 {
            return Err(NameError::TooLong { max: 253 });
        }
        Ok(Domain(ascii))
    }
}

impl fmt::Display for Domain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A mail address `local@domain` (RFC 5321 `Mailbox`, with SMTPUTF8 local parts allowed).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Address {
    local: String,
    domain: Domain,
}

impl Address {
    /// The local part, as it is compared: unquoted where quoting is not needed.
    pub fn local_part(&self) -> &str {
        &self.local
    }

    /// The domain.
    pub fn domain(&self) -> &Domain {
        &self.domain
    }

    /// The same local part at another domain.
    pub fn with_domain(&self, domain: Domain) -> Address {
        Address {
            local: self.local.clone(),
            domain,
        }
    }

    /// Whether `self` and `other` are one mailbox: what comparing their [`Mailbox`]es says,
    /// without building them.
    pub fn same_mailbox(&self, other: &Address) -> bool {
        self.domain == other.domain
            && (self.local.eq_ignore_ascii_case(&other.local)
                || (!(self.local.is_ascii() && other.local.is_ascii())
                    && self.local.to_lowercase() == other.local.to_lowercase()))
    }

    /// The key this address is compared by (see the module's documentation).
    pub fn mailbox(&self) -> Mailbox {
        let mut key = self.local.to_lowercase();
        key.push('@');
        key.push_str(self.domain.as_str());
        Mailbox(key)
    }
}

/// The canonical form of an address for comparisons: local part and domain lower-cased, the
/// domain in IDNA ASCII form. Never written to an upstream (the address as written is).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Mailbox(String);

impl Mailbox {
    /// The mailbox of `text`, if it is an address.
    pub fn parse(text: &str) -> Option<Mailbox> {
        text.parse::<Address>().ok().map(|a| a.mailbox())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Mailbox {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

fn is_atext(c: char) -> bool {
    c.is_ascii_alphanumeric() || "!#$%&'*+-/=?^_`{|}~".contains(c) || !c.is_ascii()
}

fn is_dot_atom(s: &str) -> bool {
    !s.is_empty()
        && s.split('.')
            .all(|atom| !atom.is_empty() && atom.chars().all(is_atext))
}

/// Checks a local part and returns its canonical form.
fn parse_local_part(local: &str) -> Result<String, &'static str> {
    if local.is_empty() {
        return Err("it is empty");
    }
    if local.len() > 64 {
        return Err("it is longer than 64 octets");
    }
    if let Some(inner) = local.strip_prefix('"').and_then(|l| l.strip_suffix('"')) {
        let mut unescaped = String::with_capacity(inner.len());
        let mut chars = inner.chars();
        while let Some(c) = chars.next() {
            match c {
                '\\' => match chars.next() {
                    Some(q) if (' '..='~').contains(&q) => unescaped.push(q),
                    _ => return Err("it has a bad quoted pair"),
                },
                '"' => return Err("it has an unescaped quote"),
                c if c.is_control() => return Err("it contains a control character"),
                c => unescaped.push(c),
            }
        }
        if is_dot_atom(&unescaped) {
            return Ok(unescaped);
        }
        return Ok(local.to_owned());
    }
    if local.chars().any(|c| c.is_control() || c == ' ') {
        return Err("it contains a space or control character (quote it)");
    }
    if !is_dot_atom(local) {
        return Err(
            "it is not a dot-atom: check for '..', a leading or trailing '.', or characters such as '(' ',' ':' '<' that need quoting",
        );
    }
    Ok(local.to_owned())
}

impl FromStr for Address {
    type Err = NameError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.is_empty() {
            return Err(NameError::Empty);
        }
        if s.len() > 320 {
            return Err(NameError::TooLong { max: 320 });
        }
        let (local, domain) = s.rsplit_once('@').ok_or(NameError::NoAt)?;
        let local = parse_local_part(local).map_err(NameError::BadLocalPart)?;
        let domain = domain
            .parse()
            .map_err(|e| NameError::BadDomain(Box::new(e)))?;
        Ok(Address { local, domain })
    }
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.local, self.domain)
    }
}

macro_rules! serde_via_str {
    ($ty:ty) => {
        impl Serialize for $ty {
            fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.collect_str(self)
            }
        }
        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                let text = std::borrow::Cow::<str>::deserialize(deserializer)?;
                text.parse()
                    .map_err(|e| serde::de::Error::custom(format!("{text:?} {e}")))
            }
        }
    };
}

serde_via_str!(Domain);
serde_via_str!(Address);

#[cfg(test)]
mod tests {
    use super::*;

    fn domain(s: &str) -> Domain {
        s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn domains_are_lower_cased_and_checked() {
        assert_eq!(domain("Example.COM").as_str(), "example.com");
        assert_eq!(
            "example.com.".parse::<Domain>(),
            Err(NameError::TrailingDot)
        );
        assert_eq!("a..b".parse::<Domain>(), Err(NameError::EmptyLabel));
        assert_eq!("-a.b".parse::<Domain>(), Err(NameError::HyphenAtEdge));
        assert_eq!(
            "a_b.c".parse::<Domain>(),
            Err(NameError::BadDomainChar('_'))
        );
        assert_eq!(
            "[10.0.0.1]".parse::<Domain>(),
            Err(NameError::AddressLiteral)
        );
        assert_eq!("10.0.0.1".parse::<Domain>(), Err(NameError::AddressLiteral));
        assert_eq!(domain("Bücher.Example").as_str(), "xn--bcher-kva.example");
        assert_eq!(domain("xn--BCHER-kva.example"), domain("bücher.example"));
    }

    #[test]
    fn subdomains_are_within_but_lookalikes_are_not() {
        let example = domain("example.com");
        assert!(domain("mail.example.com").is_within(&example));
        assert!(domain("example.com").is_within(&example));
        assert!(!domain("badexample.com").is_within(&example));
        assert!(!domain("com").is_within(&example));
    }

    #[test]
    fn parents_stop_at_the_registrable_domain() {
        let parents = domain("eu.mail.example.co.uk").parents_to_registrable();
        let parents: Vec<_> = parents.iter().map(Domain::as_str).collect();
        assert_eq!(parents, ["mail.example.co.uk", "example.co.uk"]);
        assert!(domain("example.com").parents_to_registrable().is_empty());
    }

    #[test]
    fn addresses_keep_local_case_and_unquote_when_harmless() {
        let a: Address = "\"John.Doe\"@Example.COM"
            .parse()
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(a.to_string(), "John.Doe@example.com");
        let b: Address = "\"john doe\"@example.com"
            .parse()
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(b.to_string(), "\"john doe\"@example.com");
        assert!("john..doe@example.com".parse::<Address>().is_err());
        assert!("john@".parse::<Address>().is_err());
        assert!("@example.com".parse::<Address>().is_err());
        assert!("john example.com".parse::<Address>().is_err());
        assert!("josé@exämple.com".parse::<Address>().is_ok());
    }
}
