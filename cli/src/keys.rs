//! Virtual keys: minting one, its policy entry (which holds only the key's
//! SHA-256), and adding that entry to a policy file without reformatting it.

use crate::atomic_file;
use crate::policy_file;
use anyhow::{bail, Context, Result};
use rand::RngCore;
use std::path::Path;
use tollgate_core::vkey;

/// Who a new key belongs to, as its policy entry says.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeySpec {
    pub id: String,
    /// Identity attributes in entry order (`user`, `team`, ...), set ones only.
    pub attributes: Vec<(&'static str, String)>,
    pub groups: Vec<String>,
    /// RFC 3339 expiry.
    pub expires_at: Option<String>,
}

/// `tg-` and 48 hex characters: 192 bits from the OS-seeded CSPRNG.
pub fn mint() -> String {
    let mut bytes = [0u8; 24];
    rand::rng().fill_bytes(&mut bytes);
    format!("{}{}", vkey::PREFIX, hex::encode(bytes))
}

/// Inserts one entry at the end of the top-level `keys` array, touching no
/// other byte of the file so reviews show a one-entry diff. Adds `"keys"`
/// if the policy has none.
pub fn insert_key(text: &str, entry: &str) -> Result<String> {
    let mut depth = 0usize;
    // The string seen last at the top level: a field name once a `[` follows.
    let mut last_top_string: Option<&str> = None;
    let mut keys_open: Option<usize> = None;
    let mut root_close = None;
    let mut chars = text.char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            '"' => {
                let mut end = text.len();
                while let Some((j, c)) = chars.next() {
                    match c {
                        '\\' => {
                            chars.next();
                        }
                        '"' => {
                            end = j;
                            break;
                        }
                        _ => {}
                    }
                }
                if depth == 1 {
                    last_top_string = text.get(i + 1..end);
                }
            }
            '{' | '[' => {
                if depth == 1 && c == '[' && last_top_string == Some("keys") && keys_open.is_none()
                {
                    keys_open = Some(i);
                }
                depth += 1;
            }
            '}' | ']' => {
                depth = depth.saturating_sub(1);
                if let Some(open) = keys_open.filter(|_| depth == 1 && c == ']') {
                    return Ok(append_to_array(text, open, i, entry));
                }
                if depth == 0 {
                    root_close = Some(i);
                }
            }
            ',' if depth == 1 => last_top_string = None,
            _ => {}
        }
    }
    let Some(close) = root_close else {
        bail!("the policy is not a JSON object");
    };
    let (before, after) = cut(text, close);
    let before = before.trim_end();
    let comma = if before.ends_with('{') { "" } else { "," };
    Ok(format!(
        "{before}{comma}\n  \"keys\": [\n    {entry}\n  ]\n{after}"
    ))
}

/// `entry` as the last element of the array between byte offsets `open`
/// (`[`) and `close` (`]`), indented one level deeper than the line of `[`.
fn append_to_array(text: &str, open: usize, close: usize, entry: &str) -> String {
    let indent = line_indent(text, open);
    let (before_close, from_close) = cut(text, close);
    let (through_open, inner) = cut(before_close, open + 1);
    if inner.trim().is_empty() {
        format!("{through_open}\n{indent}  {entry}\n{indent}{from_close}")
    } else {
        let (items, rest) = cut(text, before_close.trim_end().len());
        format!("{items},\n{indent}  {entry}{rest}")
    }
}

/// `text` split at byte offset `at` (all of it before, if `at` is not a
/// character boundary inside it).
fn cut(text: &str, at: usize) -> (&str, &str) {
    text.split_at_checked(at).unwrap_or((text, ""))
}

/// The spaces and tabs that start the line holding byte offset `pos`.
fn line_indent(text: &str, pos: usize) -> String {
    let (head, _) = cut(text, pos);
    let start = head.rfind('\n').map_or(0, |n| n + 1);
    cut(text, start)
        .1
        .chars()
        .take_while(|c| *c == ' ' || *c == '\t')
        .collect()
}

/// The policy entry of `key`: its id, its SHA-256, its identity.
pub fn entry(spec: &KeySpec, key: &str) -> serde_json::Value {
    let mut e = serde_json::Map::new();
    e.insert("id".into(), spec.id.clone().into());
    e.insert("key_sha256".into(), vkey::sha256_hex(key).into());
    for (name, v) in &spec.attributes {
        e.insert((*name).into(), v.clone().into());
    }
    if !spec.groups.is_empty() {
        e.insert("groups".into(), spec.groups.clone().into());
    }
    if let Some(x) = &spec.expires_at {
        e.insert("expires_at".into(), x.clone().into());
    }
    serde_json::Value::Object(e)
}

/// Adds `entry` to the policy file at `path` in place: validated first,
/// written atomically, so the gateway watching it never sees a bad policy.
pub fn add_to_policy(path: &Path, entry: &serde_json::Value) -> Result<()> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let updated = insert_key(&text, &serde_json::to_string(entry)?)?;
    if let Err(errors) = policy_file::validate(&updated, path) {
        bail!(
            "not written: the policy would be invalid:\n{}",
            errors.join("\n")
        );
    }
    atomic_file::write(path, &updated, 0o644)
}

/// What `revoke_in_policy` did.
#[derive(Debug, PartialEq, Eq)]
pub struct Revoked {
    /// The key's SHA-256 (what the shared store's revocation list holds).
    pub key_sha256: [u8; 32],
    /// False when the policy already said `"revoked": true`.
    pub changed: bool,
}

/// Marks the key `id` revoked in the policy file at `path`: validated
/// first, written atomically (the gateway watching it never sees a bad
/// policy). The file is rewritten as pretty JSON with its fields in order.
pub fn revoke_in_policy(path: &Path, id: &str) -> Result<Revoked> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut doc: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{} is not JSON", path.display()))?;
    let keys = doc
        .get_mut("keys")
        .and_then(serde_json::Value::as_array_mut)
        .with_context(|| format!("{} has no \"keys\"", path.display()))?;
    let known: Vec<String> = keys
        .iter()
        .filter_map(|k| Some(k.get("id")?.as_str()?.to_string()))
        .collect();
    let Some(entry) = keys
        .iter_mut()
        .find(|k| k.get("id").and_then(serde_json::Value::as_str) == Some(id))
    else {
        bail!(
            "no key with id {id:?} in {} (ids: {})",
            path.display(),
            known.join(", ")
        );
    };
    let hash = entry
        .get("key_sha256")
        .and_then(serde_json::Value::as_str)
        .and_then(|h| tollgate_core::policy::leaf::sha256(h).ok())
        .with_context(|| format!("key {id:?} has no valid key_sha256"))?;
    let changed = entry.get("revoked") != Some(&serde_json::Value::Bool(true));
    if changed {
        if let Some(obj) = entry.as_object_mut() {
            obj.insert("revoked".to_string(), serde_json::Value::Bool(true));
        }
        let updated = serde_json::to_string_pretty(&doc)? + "\n";
        if let Err(errors) = policy_file::validate(&updated, path) {
            bail!(
                "not written: the policy would be invalid:\n{}",
                errors.join("\n")
            );
        }
        atomic_file::write(path, &updated, 0o644)?;
    }
    Ok(Revoked {
        key_sha256: hash,
        changed,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn revoking_sets_the_flag_keeps_the_rest_and_names_unknown_ids() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.json");
        let hash = vkey::sha256_hex("tg-a");
        std::fs::write(
            &path,
            format!(
                r#"{{"version":1,"keys":[{{"id":"a","key_sha256":"{hash}","team":"t"}},{{"id":"b","key_sha256":"{}"}}]}}"#,
                vkey::sha256_hex("tg-b")
            ),
        )
        .unwrap();
        let r = revoke_in_policy(&path, "a").unwrap();
        assert!(r.changed);
        assert_eq!(hex::encode(r.key_sha256), hash);
        let doc: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        assert_eq!(doc["keys"][0]["revoked"], true);
        assert_eq!(doc["keys"][0]["team"], "t");
        assert_eq!(doc["keys"][1].get("revoked"), None);
        assert!(!revoke_in_policy(&path, "a").unwrap().changed);
        assert_eq!(
            revoke_in_policy(&path, "zz").unwrap_err().to_string(),
            format!("no key with id \"zz\" in {} (ids: a, b)", path.display())
        );
    }

    #[test]
    fn minted_keys_are_prefixed_random_and_long() {
        let (a, b) = (mint(), mint());
        assert!(a.starts_with("tg-") && a.len() == 51, "{a}");
        assert_ne!(a, b);
    }

    #[test]
    fn insert_touches_only_the_end_of_the_keys_array() {
        let text = "{\n  \"version\": 1,\n  \"keys\": [\n    {\"id\": \"a\", \"key_sha256\": \"x\"}\n  ],\n  \"prices\": {}\n}\n";
        let out = insert_key(text, "{\"id\":\"b\"}").unwrap();
        assert_eq!(out, "{\n  \"version\": 1,\n  \"keys\": [\n    {\"id\": \"a\", \"key_sha256\": \"x\"},\n    {\"id\":\"b\"}\n  ],\n  \"prices\": {}\n}\n");
    }

    #[test]
    fn insert_handles_empty_and_missing_keys() {
        let out = insert_key("{\"version\": 1, \"keys\": []}", "{\"id\":\"b\"}").unwrap();
        assert_eq!(out, "{\"version\": 1, \"keys\": [\n  {\"id\":\"b\"}\n]}");
        let out = insert_key("{\n  \"version\": 1\n}\n", "{\"id\":\"b\"}").unwrap();
        assert_eq!(
            out,
            "{\n  \"version\": 1,\n  \"keys\": [\n    {\"id\":\"b\"}\n  ]\n}\n"
        );
        // A "keys" field nested elsewhere is not the top-level one.
        let out = insert_key("{\"groups\": {\"keys\": []}, \"keys\": [1]}", "2").unwrap();
        assert_eq!(out, "{\"groups\": {\"keys\": []}, \"keys\": [1,\n  2]}");
    }

    #[test]
    fn insert_reads_escapes_inside_strings() {
        // `\\` ends in a backslash: the quote after it closes the string.
        let out = insert_key(r#"{"note": "c:\\", "keys": []}"#, "1").unwrap();
        assert_eq!(out, "{\"note\": \"c:\\\\\", \"keys\": [\n  1\n]}");
        // An escaped quote does not: `keys` here is text, not a field.
        let out = insert_key(r#"{"note": "\" \"keys\": [", "keys": [2]}"#, "3").unwrap();
        assert_eq!(
            out,
            r#"{"note": "\" \"keys\": [", "keys": [2,"#.to_string() + "\n  3]}"
        );
    }

    #[test]
    fn entry_holds_the_hash_and_the_given_identity_only() {
        let spec = KeySpec {
            id: "ci-bot".into(),
            attributes: vec![("team", "payments".into()), ("agent", "nightly".into())],
            groups: vec!["eng".into()],
            expires_at: None,
        };
        let e = entry(&spec, "tg-secret");
        assert_eq!(
            e.to_string(),
            format!(
                r#"{{"id":"ci-bot","key_sha256":"{}","team":"payments","agent":"nightly","groups":["eng"]}}"#,
                vkey::sha256_hex("tg-secret")
            )
        );
    }
}
