//! The paths of `MAIL FROM:<...>` and `RCPT TO:<...>`, read as the client wrote them (RFC 5321
//! section 4.1.2, RFC 6531 for UTF-8), validated, and kept verbatim: a quoted local part keeps
//! its quotes, so what is written to an upstream is exactly the client's address and can never
//! turn into parameters or commands there.
//!
//! NB: hand-written because smtp-proto 0.2.5 strips the quotes of a quoted local part and hands
//! back its content (`"x> RET=FULL"@a` becomes `x> RET=FULL@a`), which written back out is a
//! parameter injection, and because it refuses `<postmaster>` (RFC 5321 section 4.5.1). The
//! parameters after the path are still smtp-proto's to parse.

/// Where the path of a MAIL or RCPT line is, and what it holds.
#[derive(Debug, PartialEq, Eq)]
pub struct Path {
    /// Offsets of the text between `<` and `>` in the line.
    pub start: usize,
    pub end: usize,
}

/// Why a path was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PathError {
    /// No closing `>`, an unbalanced quote, a bad character: a syntax error.
    Syntax,
    /// Non-ASCII without SMTPUTF8 is checked by the session; this is for characters no address
    /// may hold (controls, a backslash or space outside quotes, ...).
    Invalid,
}

/// Finds the `<...>` path of a `MAIL FROM:` or `RCPT TO:` line (`None` for other commands, or
/// a MAIL/RCPT line without angle brackets, left to smtp-proto).
pub fn find(line: &[u8]) -> Option<Result<Path, PathError>> {
    let prefix = if starts_with_ignore_case(line, b"MAIL FROM:") {
        10
    } else if starts_with_ignore_case(line, b"RCPT TO:") {
        8
    } else {
        return None;
    };
    let mut i = prefix;
    while line.get(i) == Some(&b' ') {
        i += 1;
    }
    if line.get(i) != Some(&b'<') {
        return None;
    }
    let start = i + 1;
    let mut quoted = false;
    let mut j = start;
    while j < line.len() {
        match (quoted, line[j]) {
            (_, b'\r' | b'\n' | 0) => return Some(Err(PathError::Syntax)),
            (true, b'\\') => j += 1,
            (true, b'"') => quoted = false,
            (false, b'"') => quoted = true,
            (false, b'>') => return Some(Ok(Path { start, end: j })),
            _ => {}
        }
        j += 1;
    }
    Some(Err(PathError::Syntax))
}

fn starts_with_ignore_case(line: &[u8], prefix: &[u8]) -> bool {
    line.len() >= prefix.len() && line[..prefix.len()].eq_ignore_ascii_case(prefix)
}

/// Checks the text of a path and returns the mailbox as written (a source route, `@a,@b:`,
/// is dropped as RFC 5321 section 4.1.1.3 allows). Empty stays empty (the null sender; an empty
/// recipient is the session's to refuse). `postmaster` alone is kept for the admission.
pub fn mailbox(path: &str) -> Result<String, PathError> {
    let path = strip_source_route(path)?;
    if path.is_empty() || path.eq_ignore_ascii_case("postmaster") {
        return Ok(path.to_owned());
    }
    // NB: the domain holds no '@' and no quote, so the last '@' separates it.
    let (local, domain) = path.rsplit_once('@').ok_or(PathError::Syntax)?;
    if local.is_empty() || local.len() > 64 || domain.is_empty() || domain.len() > 255 {
        return Err(PathError::Syntax);
    }
    check_local(local)?;
    check_domain(domain)?;
    Ok(path.to_owned())
}

fn strip_source_route(path: &str) -> Result<&str, PathError> {
    if !path.starts_with('@') {
        return Ok(path);
    }
    let (route, rest) = path.split_once(':').ok_or(PathError::Syntax)?;
    let valid = route.split(',').all(|hop| {
        hop.strip_prefix('@')
            .is_some_and(|d| check_domain(d).is_ok())
    });
    if valid && !rest.is_empty() {
        Ok(rest)
    } else {
        Err(PathError::Syntax)
    }
}

/// `atext` of RFC 5322, with UTF-8 (RFC 6531).
fn is_atext(c: char) -> bool {
    c.is_ascii_alphanumeric() || "!#$%&'*+-/=?^_`{|}~".contains(c) || !c.is_ascii()
}

/// Dot-string or Quoted-string (RFC 5321 section 4.1.2).
fn check_local(local: &str) -> Result<(), PathError> {
    if let Some(inner) = local.strip_prefix('"') {
        let inner = inner.strip_suffix('"').ok_or(PathError::Syntax)?;
        let mut chars = inner.chars();
        while let Some(c) = chars.next() {
            match c {
                // quoted-pairSMTP: a backslash and one printable ASCII character.
                '\\' => match chars.next() {
                    Some(q) if (' '..='~').contains(&q) => {}
                    _ => return Err(PathError::Syntax),
                },
                '"' => return Err(PathError::Syntax),
                c if c.is_control() => return Err(PathError::Invalid),
                _ => {}
            }
        }
        return Ok(());
    }
    let atoms_ok = local
        .split('.')
        .all(|atom| !atom.is_empty() && atom.chars().all(is_atext));
    if atoms_ok {
        Ok(())
    } else if local
        .chars()
        .any(|c| c.is_control() || c == ' ' || c == '\\')
    {
        Err(PathError::Invalid)
    } else {
        Err(PathError::Syntax)
    }
}

/// A domain (letters, digits, '-', dots, UTF-8 labels) or an address literal `[...]`.
fn check_domain(domain: &str) -> Result<(), PathError> {
    if let Some(literal) = domain.strip_prefix('[') {
        let literal = literal.strip_suffix(']').ok_or(PathError::Syntax)?;
        let ok = !literal.is_empty()
            && literal
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || ".:-".contains(c));
        return if ok { Ok(()) } else { Err(PathError::Syntax) };
    }
    let ok = domain.split('.').all(|label| {
        !label.is_empty()
            && label.len() <= 63
            && label
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || !c.is_ascii())
            && !label
                .chars()
                .any(|c| !c.is_ascii() && (c.is_whitespace() || c.is_control()))
    });
    if ok { Ok(()) } else { Err(PathError::Syntax) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn path(line: &str) -> Result<String, PathError> {
        let found = find(line.as_bytes()).unwrap_or(Err(PathError::Syntax))?;
        mailbox(&line[found.start..found.end])
    }

    #[test]
    fn addresses_are_kept_as_written_quotes_and_all() {
        for (line, want) in [
            ("MAIL FROM:<a@example.com> SIZE=10", "a@example.com"),
            ("MAIL FROM:<>", ""),
            ("mail from: <A.b+tag@Example.COM>", "A.b+tag@Example.COM"),
            (
                "MAIL FROM:<\"x> RET=FULL ENVID=abc\"@ext.example>",
                "\"x> RET=FULL ENVID=abc\"@ext.example",
            ),
            (
                "RCPT TO:<\"john smith\"@example.com>",
                "\"john smith\"@example.com",
            ),
            ("RCPT TO:<\"a\\\"b\"@example.com>", "\"a\\\"b\"@example.com"),
            ("RCPT TO:<postmaster>", "postmaster"),
            (
                "RCPT TO:<@relay.example,@b.example:user@example.com>",
                "user@example.com",
            ),
            ("RCPT TO:<user@[192.0.2.1]>", "user@[192.0.2.1]"),
            ("RCPT TO:<jörg@bücher.example>", "jörg@bücher.example"),
        ] {
            assert_eq!(path(line).as_deref(), Ok(want), "{line}");
        }
    }

    #[test]
    fn what_cannot_be_an_address_is_refused() {
        for line in [
            "MAIL FROM:<a@example.com",
            "MAIL FROM:<\"unterminated@example.com>",
            "MAIL FROM:<a b@example.com>",
            "MAIL FROM:<a\\b@example.com>",
            "MAIL FROM:<a@exa mple.com>",
            "MAIL FROM:<a@>",
            "MAIL FROM:<@example.com>",
            "MAIL FROM:<a..b@example.com>",
            "MAIL FROM:<\"a\"b\"@example.com>",
            "RCPT TO:<user>",
            "RCPT TO:<@relay.example:>",
        ] {
            assert!(path(line).is_err(), "{line}: {:?}", path(line));
        }
        // Characters after the closing bracket are parameters, smtp-proto's to judge.
        let found = find(b"MAIL FROM:<a@example.com>> X").and_then(Result::ok);
        assert_eq!(found, Some(Path { start: 11, end: 24 }));
    }
}
