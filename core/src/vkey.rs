//! Virtual keys: where a client puts one, and the SHA-256 the policy stores.

use crate::host::{header, HeaderList};
use sha2::{Digest, Sha256};

/// Prefix of keys minted by `tollgate key new`; recognisable in leaks.
pub const PREFIX: &str = "tg-";

/// Where the key was found; the filter removes that header before forwarding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Presented {
    /// No `x-api-key` and no `Authorization: Bearer`.
    Missing,
    /// The key's SHA-256.
    Key([u8; 32]),
    /// Two different keys in `x-api-key` and `Authorization`; refused rather
    /// than guessing which one the caller meant.
    Conflicting,
}

/// Reads the virtual key from `x-api-key` or `Authorization: Bearer <key>`.
/// Surrounding whitespace is trimmed; an empty value counts as missing.
pub fn presented(headers: &HeaderList) -> Presented {
    // A header repeated with different values is as ambiguous as two
    // different headers: refuse rather than pick one.
    let mut api_keys = headers
        .iter()
        .filter(|(n, _)| n == "x-api-key")
        .map(|(_, v)| trim(v))
        .filter(|v| !v.is_empty());
    let api_key = api_keys.next();
    if api_key.is_some_and(|first| api_keys.any(|other| other != first)) {
        return Presented::Conflicting;
    }
    let bearer = header(headers, "authorization")
        .map(trim)
        .and_then(|v| {
            let scheme = v.get(..7)?;
            scheme
                .eq_ignore_ascii_case(b"bearer ")
                .then(|| trim(v.get(7..).unwrap_or_default()))
        })
        .filter(|v| !v.is_empty());
    match (api_key, bearer) {
        (None, None) => Presented::Missing,
        (Some(k), None) | (None, Some(k)) => Presented::Key(sha256(k)),
        (Some(a), Some(b)) if a == b => Presented::Key(sha256(a)),
        (Some(_), Some(_)) => Presented::Conflicting,
    }
}

fn trim(v: &[u8]) -> &[u8] {
    let start = v
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .unwrap_or(v.len());
    let end = v
        .iter()
        .rposition(|b| !b.is_ascii_whitespace())
        .map_or(start, |e| e + 1);
    v.get(start..end).unwrap_or_default()
}

pub fn sha256(key: &[u8]) -> [u8; 32] {
    Sha256::digest(key).into()
}

/// Lower-case hex SHA-256, the form stored in policies as `key_sha256`.
pub fn sha256_hex(key: &str) -> String {
    hex::encode(sha256(key.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(pairs: &[(&str, &str)]) -> HeaderList {
        pairs
            .iter()
            .map(|(n, v)| (n.to_string(), v.as_bytes().to_vec()))
            .collect()
    }

    #[test]
    fn reads_x_api_key_or_bearer_and_trims() {
        let k = sha256(b"tg-abc");
        assert_eq!(
            presented(&h(&[("x-api-key", " tg-abc ")])),
            Presented::Key(k)
        );
        assert_eq!(
            presented(&h(&[("authorization", "Bearer tg-abc")])),
            Presented::Key(k)
        );
        assert_eq!(
            presented(&h(&[("authorization", "bearer   tg-abc")])),
            Presented::Key(k)
        );
        assert_eq!(
            presented(&h(&[
                ("x-api-key", "tg-abc"),
                ("authorization", "Bearer tg-abc")
            ])),
            Presented::Key(k)
        );
    }

    #[test]
    fn empty_basic_or_conflicting_keys_are_not_keys() {
        assert_eq!(presented(&h(&[])), Presented::Missing);
        assert_eq!(
            presented(&h(&[("x-api-key", "tg-a"), ("x-api-key", "tg-b")])),
            Presented::Conflicting
        );
        assert_eq!(
            presented(&h(&[("x-api-key", "tg-a"), ("x-api-key", " tg-a")])),
            Presented::Key(sha256(b"tg-a"))
        );
        assert_eq!(presented(&h(&[("x-api-key", "  ")])), Presented::Missing);
        assert_eq!(
            presented(&h(&[("authorization", "Basic dXNlcg==")])),
            Presented::Missing
        );
        assert_eq!(
            presented(&h(&[
                ("x-api-key", "tg-a"),
                ("authorization", "Bearer tg-b")
            ])),
            Presented::Conflicting
        );
    }

    #[test]
    fn hex_matches_known_digest() {
        assert_eq!(
            sha256_hex("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
