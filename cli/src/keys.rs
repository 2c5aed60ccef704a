//! Virtual keys: minting one, its policy entry (which holds only the key's
//! SHA-256), adding that entry to a policy file without reformatting it,
//! and the edits of a key's lifecycle: rotation (a new secret, the old one
//! kept until a deadline) and revocation.

use crate::atomic_file;
use crate::policy_file;
use anyhow::{bail, Context, Result};
use rand::RngCore;
use serde_json::{Map, Value};
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

/// Where the top-level `keys` array and its object entries sit in a
/// policy's text (byte offsets), found by a scan that knows strings and
/// nesting, so that an edit can leave every other byte as it was.
#[derive(Debug, Default, PartialEq, Eq)]
struct Layout {
    /// `[` and `]` of the top-level `keys` array.
    keys: Option<(usize, usize)>,
    /// Each object element of `keys`: its `{` and one past its `}`.
    entries: Vec<(usize, usize)>,
    /// The `}` closing the root object.
    root_close: Option<usize>,
}

fn layout(text: &str) -> Layout {
    let mut out = Layout::default();
    let mut depth = 0usize;
    // The string seen last at the top level: a field name once a `[` follows.
    let mut last_top_string: Option<&str> = None;
    // The `[` of `keys` while the scan is inside that array.
    let mut keys_open: Option<usize> = None;
    let mut entry_open: Option<usize> = None;
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
                if depth == 1
                    && c == '['
                    && last_top_string == Some("keys")
                    && out.keys.is_none()
                    && keys_open.is_none()
                {
                    keys_open = Some(i);
                }
                if depth == 2 && c == '{' && keys_open.is_some() {
                    entry_open = Some(i);
                }
                depth += 1;
            }
            '}' | ']' => {
                depth = depth.saturating_sub(1);
                match (depth, c) {
                    (2, '}') => {
                        if let Some(open) = entry_open.take() {
                            out.entries.push((open, i + 1));
                        }
                    }
                    (1, ']') => {
                        if let Some(open) = keys_open.take() {
                            out.keys = Some((open, i));
                        }
                    }
                    (0, _) => out.root_close = Some(i),
                    _ => {}
                }
            }
            ',' if depth == 1 => last_top_string = None,
            _ => {}
        }
    }
    out
}

/// Inserts one entry at the end of the top-level `keys` array, touching no
/// other byte of the file so reviews show a one-entry diff. Adds `"keys"`
/// if the policy has none.
pub fn insert_key(text: &str, entry: &str) -> Result<String> {
    let layout = layout(text);
    if let Some((open, close)) = layout.keys {
        return Ok(append_to_array(text, open, close, entry));
    }
    let Some(close) = layout.root_close else {
        bail!("the policy is not a JSON object");
    };
    let (before, after) = cut(text, close);
    let before = before.trim_end();
    let comma = if before.ends_with('{') { "" } else { "," };
    Ok(format!(
        "{before}{comma}\n  \"keys\": [\n    {entry}\n  ]\n{after}"
    ))
}

/// `text` with the `index`-th object of its `keys` array replaced by
/// `entry`, every other byte kept: on one line if the old entry was, else
/// pretty-printed at its indentation. `None` if the scan does not find
/// `keys_len` object entries (a `keys` array holding other values), so
/// the caller cannot replace the wrong one.
fn replace_entry(text: &str, keys_len: usize, index: usize, entry: &Value) -> Option<String> {
    let layout = layout(text);
    if layout.entries.len() != keys_len {
        return None;
    }
    let (start, end) = *layout.entries.get(index)?;
    let old = text.get(start..end)?;
    let new = if old.contains('\n') {
        let indent = line_indent(text, start);
        serde_json::to_string_pretty(entry)
            .ok()?
            .replace('\n', &format!("\n{indent}"))
    } else {
        serde_json::to_string(entry).ok()?
    };
    Some(format!("{}{new}{}", text.get(..start)?, text.get(end..)?))
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

/// Applies `edit` to the entry of key `id` in the policy file at `path`;
/// when it reports a change, validates the whole policy and replaces the
/// file atomically, so the gateway watching it never sees a bad policy.
/// Only that entry's text changes (a one-entry diff for reviewers).
fn edit_key<T>(
    path: &Path,
    id: &str,
    edit: impl FnOnce(&mut Map<String, Value>) -> Result<(T, bool)>,
) -> Result<T> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut doc: Value =
        serde_json::from_str(&text).with_context(|| format!("{} is not JSON", path.display()))?;
    let keys = doc
        .get_mut("keys")
        .and_then(Value::as_array_mut)
        .with_context(|| format!("{} has no \"keys\"", path.display()))?;
    let keys_len = keys.len();
    let Some((index, entry)) = keys
        .iter_mut()
        .enumerate()
        .find(|(_, k)| k.get("id").and_then(Value::as_str) == Some(id))
    else {
        let known: Vec<&str> = keys.iter().filter_map(|k| k.get("id")?.as_str()).collect();
        bail!(
            "no key with id {id:?} in {} (ids: {})",
            path.display(),
            known.join(", ")
        );
    };
    let Some(fields) = entry.as_object_mut() else {
        bail!("key {id:?} is not an object");
    };
    let (out, changed) = edit(fields)?;
    if changed {
        let updated = match replace_entry(&text, keys_len, index, entry) {
            Some(updated) => updated,
            None => serde_json::to_string_pretty(&doc)? + "\n",
        };
        if let Err(errors) = policy_file::validate(&updated, path) {
            bail!(
                "not written: the policy would be invalid:\n{}",
                errors.join("\n")
            );
        }
        atomic_file::write(path, &updated, 0o644)?;
    }
    Ok(out)
}

/// The hash under `key_sha256` of a key entry or a previous secret.
fn hash_of(holder: &Map<String, Value>) -> Option<[u8; 32]> {
    holder
        .get("key_sha256")
        .and_then(Value::as_str)
        .and_then(|h| tollgate_core::policy::leaf::sha256(h).ok())
}

/// What `revoke_in_policy` did.
#[derive(Debug, PartialEq, Eq)]
pub struct Revoked {
    /// The SHA-256 of every secret of the key, current first (what the
    /// shared store's revocation list holds: a client still on a previous
    /// secret is refused too).
    pub key_sha256: Vec<[u8; 32]>,
    /// False when the policy already said `"revoked": true`.
    pub changed: bool,
}

/// Marks the key `id` revoked in the policy file at `path` (see
/// [`edit_key`]).
pub fn revoke_in_policy(path: &Path, id: &str) -> Result<Revoked> {
    edit_key(path, id, |entry| {
        let current =
            hash_of(entry).with_context(|| format!("key {id:?} has no valid key_sha256"))?;
        let previous = entry
            .get("previous")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|p| hash_of(p.as_object()?));
        let key_sha256 = std::iter::once(current).chain(previous).collect();
        let changed = entry.get("revoked") != Some(&Value::Bool(true));
        if changed {
            entry.insert("revoked".to_string(), Value::Bool(true));
        }
        Ok((
            Revoked {
                key_sha256,
                changed,
            },
            changed,
        ))
    })
}

/// What `rotate_in_policy` did.
#[derive(Debug, PartialEq, Eq)]
pub struct Rotated {
    /// The key's new secret: shown once, never stored.
    pub key: String,
    /// When the secret it replaced stops working (RFC 3339, whole seconds).
    pub not_after: String,
    /// Previous secrets dropped from the entry because their `not_after`
    /// had passed (they were refused already).
    pub dropped: usize,
}

/// Gives the key `id` a new secret: its current hash moves to `previous`
/// with `not_after = now + grace` (rounded up to the second, so the grace
/// is never shorter than asked), the new secret's hash becomes
/// `key_sha256`, and previous secrets already past their `not_after` are
/// dropped. Written as [`edit_key`] writes. A revoked or expired key is
/// refused: its new secret would be refused too.
pub fn rotate_in_policy(path: &Path, id: &str, grace_ms: u64, now_ms: u64) -> Result<Rotated> {
    edit_key(path, id, |entry| {
        if entry.get("revoked") == Some(&Value::Bool(true)) {
            bail!("key {id:?} is revoked: a new secret would be refused too (mint a new key with `tollgate key new`)");
        }
        if let Some(at) = entry.get("expires_at").and_then(Value::as_str) {
            if tollgate_core::time::parse_rfc3339(at).is_ok_and(|ms| ms <= now_ms) {
                bail!("key {id:?} expired at {at}: a new secret would be refused too (move its expires_at first)");
            }
        }
        let current = entry
            .get("key_sha256")
            .cloned()
            .with_context(|| format!("key {id:?} has no key_sha256"))?;
        let deadline_ms = now_ms
            .checked_add(grace_ms)
            .map(|ms| ms.div_ceil(1000) * 1000)
            .context("the grace period ends too far in the future")?;
        let not_after = tollgate_core::time::format_rfc3339(deadline_ms);
        let mut previous = match entry.get("previous") {
            None => Vec::new(),
            Some(Value::Array(list)) => list.clone(),
            Some(_) => bail!("key {id:?}: \"previous\" is not a list"),
        };
        let before = previous.len();
        // An entry whose time does not parse is kept: validation names it.
        previous.retain(|p| {
            let at = p.get("not_after").and_then(Value::as_str);
            at.and_then(|t| tollgate_core::time::parse_rfc3339(t).ok())
                .is_none_or(|ms| ms > now_ms)
        });
        let dropped = before - previous.len();
        previous.push(serde_json::json!({ "key_sha256": current, "not_after": not_after }));
        let key = mint();
        // Rebuilt so that `previous` sits right after `key_sha256`, where a
        // reviewer reads the rotation as one change.
        let old = std::mem::take(entry);
        for (name, value) in old {
            match name.as_str() {
                "previous" => {}
                "key_sha256" => {
                    entry.insert(name, vkey::sha256_hex(&key).into());
                    entry.insert(
                        "previous".to_string(),
                        Value::Array(std::mem::take(&mut previous)),
                    );
                }
                _ => {
                    entry.insert(name, value);
                }
            }
        }
        Ok((
            Rotated {
                key,
                not_after,
                dropped,
            },
            true,
        ))
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
        assert_eq!(r.key_sha256, [tollgate_core::vkey::sha256(b"tg-a")]);
        assert_eq!(hex::encode(r.key_sha256[0]), hash);
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

    /// 2026-12-05T12:00:00.250Z
    const NOW: u64 = 1_796_472_000_250;

    fn policy_file(keys: &str) -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.json");
        std::fs::write(&path, format!(r#"{{"version":1,"keys":[{keys}]}}"#)).unwrap();
        (dir, path)
    }

    fn doc(path: &Path) -> Value {
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
    }

    #[test]
    fn rotating_moves_the_hash_to_previous_with_a_deadline_and_keeps_the_id() {
        let old = vkey::sha256_hex("tg-a");
        let (_dir, path) = policy_file(&format!(
            r#"{{"id":"a","key_sha256":"{old}","team":"t"}},{{"id":"b","key_sha256":"{}"}}"#,
            vkey::sha256_hex("tg-b")
        ));
        let r = rotate_in_policy(&path, "a", 24 * 3_600_000, NOW).unwrap();
        // 24h after 12:00:00.250, rounded up to the second.
        assert_eq!(r.not_after, "2026-12-06T12:00:01Z");
        assert_eq!(r.dropped, 0);
        assert!(r.key.starts_with("tg-") && r.key.len() == 51);
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(!text.contains(&r.key), "the policy never holds a secret");
        let d = doc(&path);
        let a = d["keys"][0].as_object().unwrap();
        assert_eq!(
            a.keys().collect::<Vec<_>>(),
            ["id", "key_sha256", "previous", "team"],
            "previous sits right after key_sha256"
        );
        assert_eq!(a["key_sha256"], vkey::sha256_hex(&r.key));
        assert_eq!(
            a["previous"],
            serde_json::json!([{"key_sha256": old, "not_after": "2026-12-06T12:00:01Z"}])
        );
        assert_eq!(d["keys"][1]["id"], "b", "other keys untouched");
        // The rotated policy compiles: both secrets open key "a".
        let (p, _) = tollgate_core::policy::compile(text.as_bytes(), "p.json", NOW).unwrap();
        for k in ["tg-a", &r.key] {
            assert_eq!(
                p.lookup(&vkey::sha256(k.as_bytes())).map(|k| k.id.clone()),
                Some("a".to_string())
            );
        }
    }

    #[test]
    fn rotating_again_keeps_live_previous_secrets_and_drops_expired_ones() {
        let (_dir, path) = policy_file(&format!(
            r#"{{"id":"a","key_sha256":"{}","previous":[
                {{"key_sha256":"{}","not_after":"2026-12-05T12:00:00Z"}},
                {{"key_sha256":"{}","not_after":"2026-12-05T13:00:00Z"}}]}}"#,
            vkey::sha256_hex("tg-3"),
            vkey::sha256_hex("tg-1"),
            vkey::sha256_hex("tg-2"),
        ));
        let r = rotate_in_policy(&path, "a", 30_000, NOW).unwrap();
        assert_eq!(
            (r.not_after.as_str(), r.dropped),
            ("2026-12-05T12:00:31Z", 1)
        );
        assert_eq!(
            doc(&path)["keys"][0]["previous"],
            serde_json::json!([
                {"key_sha256": vkey::sha256_hex("tg-2"), "not_after": "2026-12-05T13:00:00Z"},
                {"key_sha256": vkey::sha256_hex("tg-3"), "not_after": "2026-12-05T12:00:31Z"}
            ])
        );
        // Revoking the key names every secret it still has, current first.
        let revoked = revoke_in_policy(&path, "a").unwrap();
        assert_eq!(
            revoked.key_sha256,
            [
                vkey::sha256(r.key.as_bytes()),
                vkey::sha256(b"tg-2"),
                vkey::sha256(b"tg-3")
            ]
        );
    }

    #[test]
    fn rotation_refuses_revoked_expired_and_unknown_keys_leaving_the_file_as_it_was() {
        let (_dir, path) = policy_file(&format!(
            r#"{{"id":"r","key_sha256":"{}","revoked":true}},{{"id":"e","key_sha256":"{}","expires_at":"2026-01-01T00:00:00Z"}}"#,
            vkey::sha256_hex("tg-r"),
            vkey::sha256_hex("tg-e"),
        ));
        let before = std::fs::read_to_string(&path).unwrap();
        let err = |id: &str| {
            rotate_in_policy(&path, id, 1000, NOW)
                .unwrap_err()
                .to_string()
        };
        assert_eq!(
            err("r"),
            "key \"r\" is revoked: a new secret would be refused too (mint a new key with `tollgate key new`)"
        );
        assert_eq!(
            err("e"),
            "key \"e\" expired at 2026-01-01T00:00:00Z: a new secret would be refused too (move its expires_at first)"
        );
        assert_eq!(
            err("x"),
            format!("no key with id \"x\" in {} (ids: r, e)", path.display())
        );
        assert_eq!(std::fs::read_to_string(&path).unwrap(), before);
        // A policy already invalid elsewhere is not rewritten.
        let (_dir, bad) = policy_file(&format!(
            r#"{{"id":"a","key_sha256":"{}","groups":["nope"]}}"#,
            vkey::sha256_hex("tg-a")
        ));
        let before = std::fs::read_to_string(&bad).unwrap();
        let e = rotate_in_policy(&bad, "a", 1000, NOW)
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("not written: the policy would be invalid:\n")
                && e.ends_with("keys[0].groups[0]: unknown group (no groups are defined under \"groups\") (value: \"nope\")"),
            "{e}"
        );
        assert_eq!(std::fs::read_to_string(&bad).unwrap(), before);
    }

    #[test]
    fn edits_replace_only_the_entry_one_line_or_pretty_at_its_indentation() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.json");
        let (a, b) = (vkey::sha256_hex("tg-a"), vkey::sha256_hex("tg-b"));
        let text = format!(
            "{{\n  \"version\": 1,\n  \"keys\": [\n    {{ \"id\": \"a\", \"key_sha256\": \"{a}\" }},\n    {{\n      \"id\": \"b\",\n      \"key_sha256\": \"{b}\", \"team\": \"t\"\n    }}\n  ],\n  \"groups\": {{ \"g\": {{}} }}\n}}\n"
        );
        std::fs::write(&path, &text).unwrap();
        revoke_in_policy(&path, "a").unwrap();
        revoke_in_policy(&path, "b").unwrap();
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            format!(
                "{{\n  \"version\": 1,\n  \"keys\": [\n    {{\"id\":\"a\",\"key_sha256\":\"{a}\",\"revoked\":true}},\n    {{\n      \"id\": \"b\",\n      \"key_sha256\": \"{b}\",\n      \"team\": \"t\",\n      \"revoked\": true\n    }}\n  ],\n  \"groups\": {{ \"g\": {{}} }}\n}}\n"
            )
        );
    }

    #[test]
    fn layout_finds_the_top_level_keys_entries_only() {
        let text = r#"{"groups": {"keys": [{"x": 1}]}, "note": "\"keys\": [{", "keys": [ {"a": {"b": [1]}}, 2, {} ]}"#;
        let l = layout(text);
        let spans: Vec<&str> = l.entries.iter().map(|(s, e)| &text[*s..*e]).collect();
        assert_eq!(spans, [r#"{"a": {"b": [1]}}"#, "{}"]);
        // Three elements, two objects: no entry is replaced by position.
        assert_eq!(replace_entry(text, 3, 1, &Value::Null), None);
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
