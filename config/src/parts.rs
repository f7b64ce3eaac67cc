//! A relay document split over several ConfigMaps (SPEC 4: an object holds at most 1 MiB).
//! Part `i` of `n` is stored under the key `config.json.<i>-of-<n>` (three digits each), so the
//! keys of every part can share one directory (a projected volume) or one listing, and a
//! reader can tell when it has them all. Mixing parts of two generations cannot go unnoticed:
//! the assembled document carries its content hash, which
//! [`RelayDocument::from_json`](crate::RelayDocument::from_json) checks.

use std::collections::BTreeMap;

/// The key of a whole document.
pub const WHOLE_KEY: &str = "config.json";

// The objects the operator publishes and the relay reads: named here once, for both.

/// ConfigMap holding the document (parts: `<name>-0`, `<name>-1`, ...).
pub const CONFIG_MAP: &str = "mailroute-relay-config";
/// Secret holding the credentials.
pub const CREDENTIALS_SECRET: &str = "mailroute-relay-credentials";
/// Key (and file name) of the credentials in that Secret.
pub const CREDENTIALS_KEY: &str = "credentials.json";
/// Annotation of the first ConfigMap: how many parts the document has.
pub const PARTS_ANNOTATION: &str = "mailroute.io/parts";

/// The name of part `i` (from 0) of the document published as ConfigMap `index`.
pub fn part_name(index: &str, i: usize) -> String {
    format!("{index}-{i}")
}

/// The key of part `i` (from 0) of `n`.
pub fn part_key(i: usize, n: usize) -> String {
    format!("{WHOLE_KEY}.{i:03}-of-{n:03}")
}

/// Splits `text` into pieces of at most `limit` bytes, on character boundaries.
pub fn split(text: &str, limit: usize) -> Vec<&str> {
    let mut parts = Vec::new();
    let mut rest = text;
    while rest.len() > limit.max(4) {
        let mut cut = limit.max(4);
        while !rest.is_char_boundary(cut) {
            cut -= 1;
        }
        let (head, tail) = rest.split_at(cut);
        parts.push(head);
        rest = tail;
    }
    parts.push(rest);
    parts
}

/// Why no document could be put together.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum PartsError {
    #[error("no {WHOLE_KEY} and no parts")]
    Nothing,
    #[error("parts of different splits (of {0} and of {1})")]
    Mixed(usize, usize),
    #[error("part {missing} of {count} is missing")]
    Missing { missing: usize, count: usize },
}

fn parse_key(key: &str) -> Option<(usize, usize)> {
    let rest = key.strip_prefix(WHOLE_KEY)?.strip_prefix('.')?;
    let (i, n) = rest.split_once("-of-")?;
    Some((i.parse().ok()?, n.parse().ok()?))
}

/// The document from `entries` (key -> content): the whole one when present, else the parts
/// in order when every part of one split is there.
pub fn assemble(entries: &BTreeMap<String, String>) -> Result<String, PartsError> {
    if let Some(whole) = entries.get(WHOLE_KEY) {
        return Ok(whole.clone());
    }
    let mut count = None;
    let mut parts: BTreeMap<usize, &str> = BTreeMap::new();
    for (key, value) in entries {
        let Some((i, n)) = parse_key(key) else {
            continue;
        };
        match count {
            None => count = Some(n),
            Some(c) if c != n => return Err(PartsError::Mixed(c, n)),
            Some(_) => {}
        }
        parts.insert(i, value);
    }
    let count = count.ok_or(PartsError::Nothing)?;
    let mut out = String::new();
    for i in 0..count {
        let part = parts
            .get(&i)
            .ok_or(PartsError::Missing { missing: i, count })?;
        out.push_str(part);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_split_reassembles_only_when_complete_and_consistent() {
        let text = "é".repeat(1000) + &"x".repeat(3001);
        let parts = split(&text, 1001);
        assert!(parts.len() >= 4 && parts.iter().all(|p| p.len() <= 1001));
        let mut entries: BTreeMap<String, String> = parts
            .iter()
            .enumerate()
            .map(|(i, p)| (part_key(i, parts.len()), (*p).to_owned()))
            .collect();
        entries.insert("unrelated".into(), "x".into());
        assert_eq!(assemble(&entries).as_deref(), Ok(text.as_str()));
        let mut missing = entries.clone();
        missing.remove(&part_key(1, parts.len()));
        assert_eq!(
            assemble(&missing),
            Err(PartsError::Missing {
                missing: 1,
                count: parts.len()
            })
        );
        let mut mixed = entries.clone();
        mixed.insert(part_key(0, 9), "y".into());
        assert!(matches!(assemble(&mixed), Err(PartsError::Mixed(..))));
        assert_eq!(assemble(&BTreeMap::new()), Err(PartsError::Nothing));
    }
}
