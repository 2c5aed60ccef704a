//! Identity from the mesh: who calls when no virtual key is presented.
//!
//! Two kinds of evidence, both established by Envoy before the filter runs
//! and neither writable by the client:
//!
//! - the mTLS peer's SPIFFE ID: the first URI SAN of the client
//!   certificate Envoy verified against the listener's CA (Istio's
//!   sidecars present the workload's `spiffe://<trust domain>/ns/<ns>/sa/<sa>`),
//!   read as the property `connection.uri_san_peer_certificate`;
//! - the claims of every JWT Envoy's `jwt_authn` filter verified, which it
//!   writes into dynamic metadata when a provider sets
//!   `payload_in_metadata`, read as the property
//!   `metadata.filter_metadata["envoy.filters.http.jwt_authn"]`.
//!
//! Why metadata rather than `claim_to_headers`: a header set by `jwt_authn`
//! and a header the client sent look the same to a later filter, and
//! `jwt_authn` writes one only when a token verified: a client without a
//! token (`allow_missing`) would pass its own `x-jwt-groups: finops`
//! through. Dynamic metadata is written by filters only.
//!
//! The property value is not a serialised `google.protobuf.Struct`: Envoy
//! evaluates the path with CEL, which unwraps a `Struct` into a map, and
//! serialises a map as proxy-wasm pairs (a `u32` count, a `u32` key and
//! value length per pair, then each key and value followed by a NUL), each
//! value serialised the same way: a string as its bytes, a number as an
//! 8-byte double, a bool as one byte, a list as pairs with empty values.
//! [`pairs`] decodes that encoding; [`Claim::decode`] tells strings and
//! lists of strings apart, which are what identities match on.

use crate::host::Host;
use crate::policy::{Glob, MeshMatch, Policy};
use serde::{Deserialize, Serialize};

/// Property path of the mTLS peer certificate's first URI SAN.
pub const PEER_URI_SAN: [&str; 2] = ["connection", "uri_san_peer_certificate"];

/// Property path of the payloads `jwt_authn` verified, by its
/// `payload_in_metadata` names.
pub const JWT_PAYLOADS: [&str; 3] = [
    "metadata",
    "filter_metadata",
    "envoy.filters.http.jwt_authn",
];

/// How a request's caller was identified, in its audit record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Method {
    /// A virtual key (`x-api-key` or `Authorization: Bearer`).
    Key,
    /// The mTLS peer's SPIFFE ID.
    Spiffe,
    /// Claims of a JWT verified by `jwt_authn`.
    Jwt,
}

/// One claim's value, as far as matching goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    Text(String),
    List(Vec<String>),
    /// Numbers, booleans, objects: never matched.
    Other,
}

/// A verified JWT's claims, by name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Claims(pub Vec<(String, Claim)>);

/// What the mesh says about the caller of one request.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Evidence {
    pub spiffe: Option<String>,
    pub jwts: Vec<Claims>,
}

/// The identity a request was recognised as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    /// Position of the caller in the policy.
    pub caller: usize,
    pub method: Method,
    /// The SPIFFE ID, or the JWT's `iss/sub` (Istio's request principal).
    pub principal: String,
}

impl Evidence {
    /// Reads what the policy's identities can match on: the peer's SPIFFE
    /// ID only if some identity names one, the JWT payloads only if some
    /// identity names claims (one host call each).
    pub fn read(host: &impl Host, policy: &Policy) -> Evidence {
        let (mut spiffe, mut jwt) = (false, false);
        for i in policy.identities() {
            match i.matcher {
                MeshMatch::Spiffe(_) => spiffe = true,
                MeshMatch::Jwt(_) => jwt = true,
            }
        }
        Evidence {
            spiffe: spiffe
                .then(|| host.property(&PEER_URI_SAN))
                .flatten()
                .and_then(|v| clean_text(&v)),
            jwts: jwt
                .then(|| host.property(&JWT_PAYLOADS))
                .flatten()
                .map(|v| decode_payloads(&v))
                .unwrap_or_default(),
        }
    }

    /// Who the caller claims to be, for the refusal when no identity
    /// matches; `None` when the mesh said nothing at all.
    pub fn describe(&self) -> Option<String> {
        let mut parts: Vec<String> = self.spiffe.iter().cloned().collect();
        parts.extend(self.jwts.iter().map(|c| format!("JWT {}", c.principal())));
        (!parts.is_empty()).then(|| parts.join(", "))
    }
}

impl Claims {
    pub fn get(&self, name: &str) -> Option<&Claim> {
        self.0.iter().find(|(n, _)| n == name).map(|(_, c)| c)
    }

    fn text(&self, name: &str) -> Option<&str> {
        match self.get(name) {
            Some(Claim::Text(t)) => Some(t),
            _ => None,
        }
    }

    /// `iss/sub`, as Istio writes a request principal.
    pub fn principal(&self) -> String {
        match (self.text("iss"), self.text("sub")) {
            (Some(iss), Some(sub)) => format!("{iss}/{sub}"),
            (Some(one), None) | (None, Some(one)) => one.to_string(),
            (None, None) => "(no iss or sub)".to_string(),
        }
    }

    /// Whether every (claim, pattern) matches: a text claim itself, a
    /// list claim by one of its elements.
    pub fn matches(&self, wanted: &[(String, Glob)]) -> bool {
        wanted.iter().all(|(name, pattern)| match self.get(name) {
            Some(Claim::Text(t)) => pattern.matches(t),
            Some(Claim::List(items)) => items.iter().any(|t| pattern.matches(t)),
            Some(Claim::Other) | None => false,
        })
    }
}

/// The first identity of the policy, in file order, the evidence matches.
pub fn identify(policy: &Policy, evidence: &Evidence) -> Option<Found> {
    policy.identities().iter().find_map(|i| match &i.matcher {
        MeshMatch::Spiffe(pattern) => {
            let id = evidence.spiffe.as_ref().filter(|id| pattern.matches(id))?;
            Some(Found {
                caller: i.caller,
                method: Method::Spiffe,
                principal: id.clone(),
            })
        }
        MeshMatch::Jwt(wanted) => {
            let claims = evidence.jwts.iter().find(|c| c.matches(wanted))?;
            Some(Found {
                caller: i.caller,
                method: Method::Jwt,
                principal: claims.principal(),
            })
        }
    })
}

/// Decodes proxy-wasm pairs: a little-endian `u32` count, a `u32` key
/// length and value length per pair, then each key and each value followed
/// by a NUL. `None` unless the bytes are exactly that.
pub fn pairs(bytes: &[u8]) -> Option<Vec<(&[u8], &[u8])>> {
    let u32_at = |at: usize| -> Option<usize> {
        let b: [u8; 4] = bytes.get(at..at + 4)?.try_into().ok()?;
        usize::try_from(u32::from_le_bytes(b)).ok()
    };
    let count = u32_at(0)?;
    // Each pair takes at least 10 bytes: its two lengths and two NULs.
    if count > bytes.len() / 10 {
        return None;
    }
    let mut at = 4 + count * 8;
    let mut out = Vec::with_capacity(count);
    for i in 0..count {
        let (klen, vlen) = (u32_at(4 + i * 8)?, u32_at(8 + i * 8)?);
        let key = bytes.get(at..at.checked_add(klen)?)?;
        at += klen;
        if bytes.get(at) != Some(&0) {
            return None;
        }
        at += 1;
        let value = bytes.get(at..at.checked_add(vlen)?)?;
        at += vlen;
        if bytes.get(at) != Some(&0) {
            return None;
        }
        at += 1;
        out.push((key, value));
    }
    (at == bytes.len()).then_some(out)
}

/// Text with no control characters: what a claim string or a SPIFFE ID
/// is. An encoded number, bool, list or map always holds a NUL or another
/// control byte (its lengths' high bytes, its terminators), so nothing
/// else passes for text.
fn clean_text(bytes: &[u8]) -> Option<String> {
    let s = std::str::from_utf8(bytes).ok()?;
    (!s.is_empty() && !s.chars().any(char::is_control)).then(|| s.to_string())
}

impl Claim {
    /// A claim value as the host serialised it.
    pub fn decode(bytes: &[u8]) -> Claim {
        if let Some(text) = clean_text(bytes) {
            return Claim::Text(text);
        }
        // A list: pairs whose values are all empty.
        let list = pairs(bytes).and_then(|items| {
            items
                .into_iter()
                .map(|(item, rest)| {
                    if rest.is_empty() {
                        clean_text(item)
                    } else {
                        None
                    }
                })
                .collect::<Option<Vec<String>>>()
        });
        list.map_or(Claim::Other, Claim::List)
    }
}

/// The payloads under `jwt_authn`'s metadata: a map from each
/// `payload_in_metadata` name to a map of claims.
pub fn decode_payloads(bytes: &[u8]) -> Vec<Claims> {
    let Some(providers) = pairs(bytes) else {
        log::warn!(
            "tollgate: jwt_authn metadata is not the map encoding this filter reads ({} bytes); no JWT identity applies",
            bytes.len()
        );
        return Vec::new();
    };
    providers
        .into_iter()
        .filter_map(|(_, payload)| {
            let claims = pairs(payload)?;
            Some(Claims(
                claims
                    .into_iter()
                    .filter_map(|(name, value)| Some((clean_text(name)?, Claim::decode(value))))
                    .collect(),
            ))
        })
        .collect()
}

/// Encodes pairs as the host does, for tests and fakes.
pub fn encode_pairs(pairs: &[(&[u8], &[u8])]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&(pairs.len() as u32).to_le_bytes());
    for (k, v) in pairs {
        out.extend_from_slice(&(k.len() as u32).to_le_bytes());
        out.extend_from_slice(&(v.len() as u32).to_le_bytes());
    }
    for (k, v) in pairs {
        out.extend_from_slice(k);
        out.push(0);
        out.extend_from_slice(v);
        out.push(0);
    }
    out
}

/// A JWT payload as `jwt_authn` metadata holds it, encoded as the host
/// serialises it, from JSON claims (strings, lists of strings, numbers,
/// booleans): for tests and fakes.
pub fn encode_payloads(payloads: &[(&str, serde_json::Value)]) -> Vec<u8> {
    fn value(v: &serde_json::Value) -> Vec<u8> {
        match v {
            serde_json::Value::String(s) => s.as_bytes().to_vec(),
            serde_json::Value::Number(n) => n.as_f64().unwrap_or(0.0).to_le_bytes().to_vec(),
            serde_json::Value::Bool(b) => vec![u8::from(*b)],
            serde_json::Value::Array(items) => {
                let items: Vec<Vec<u8>> = items.iter().map(value).collect();
                let p: Vec<(&[u8], &[u8])> =
                    items.iter().map(|i| (i.as_slice(), &[][..])).collect();
                encode_pairs(&p)
            }
            serde_json::Value::Object(m) => {
                let items: Vec<(Vec<u8>, Vec<u8>)> = m
                    .iter()
                    .map(|(k, v)| (k.as_bytes().to_vec(), value(v)))
                    .collect();
                let p: Vec<(&[u8], &[u8])> = items
                    .iter()
                    .map(|(k, v)| (k.as_slice(), v.as_slice()))
                    .collect();
                encode_pairs(&p)
            }
            serde_json::Value::Null => Vec::new(),
        }
    }
    let encoded: Vec<(&str, Vec<u8>)> = payloads.iter().map(|(n, p)| (*n, value(p))).collect();
    let p: Vec<(&[u8], &[u8])> = encoded
        .iter()
        .map(|(n, v)| (n.as_bytes(), v.as_slice()))
        .collect();
    encode_pairs(&p)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use serde_json::json;

    #[test]
    fn decodes_the_hosts_map_encoding_of_a_jwt_payload() {
        let bytes = encode_payloads(&[(
            "https://idp.example.com",
            json!({"iss": "https://idp.example.com", "sub": "alice@example.com",
                   "groups": ["eng", "finops"], "exp": 1_900_000_000, "email_verified": true,
                   "org": {"id": "x"}}),
        )]);
        let payloads = decode_payloads(&bytes);
        assert_eq!(payloads.len(), 1);
        let c = &payloads[0];
        assert_eq!(c.get("sub"), Some(&Claim::Text("alice@example.com".into())));
        assert_eq!(
            c.get("groups"),
            Some(&Claim::List(vec!["eng".into(), "finops".into()]))
        );
        assert_eq!(c.get("exp"), Some(&Claim::Other));
        assert_eq!(c.get("email_verified"), Some(&Claim::Other));
        assert_eq!(c.get("org"), Some(&Claim::Other));
        assert_eq!(c.principal(), "https://idp.example.com/alice@example.com");
        let g = |p: &str| Glob::parse(p).unwrap();
        assert!(c.matches(&[("groups".into(), g("finops"))]));
        assert!(c.matches(&[
            ("sub".into(), g("*@example.com")),
            ("groups".into(), g("eng"))
        ]));
        assert!(!c.matches(&[("groups".into(), g("fin"))]));
        assert!(!c.matches(&[("exp".into(), g("*"))]), "numbers never match");
        assert!(!c.matches(&[("missing".into(), g("*"))]));
    }

    #[test]
    fn refuses_bytes_that_are_not_exactly_pairs() {
        let ok = encode_pairs(&[(b"a", b"b")]);
        assert_eq!(pairs(&ok).unwrap(), vec![(&b"a"[..], &b"b"[..])]);
        assert_eq!(pairs(&ok[..ok.len() - 1]), None, "cut short");
        let mut long = ok.clone();
        long.push(0);
        assert_eq!(pairs(&long), None, "trailing bytes");
        assert_eq!(pairs(&[0xff, 0xff, 0xff, 0xff]), None, "huge count");
        assert_eq!(pairs(b""), None);
        assert!(decode_payloads(b"not a map").is_empty());
    }
}
