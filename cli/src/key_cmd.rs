//! `tollgate key new`: mint a virtual key. The key is printed once; the policy
//! only ever holds its SHA-256.

use crate::run::render::write_atomic;
use anyhow::{bail, Context, Result};
use rand::RngCore;
use std::path::PathBuf;
use tollgate_core::vkey;

#[derive(clap::Args, Debug)]
pub struct KeyArgs {
    #[command(subcommand)]
    command: KeyCommand,
}

#[derive(clap::Subcommand, Debug)]
enum KeyCommand {
    /// Mint a virtual key and print its policy entry (or add it to a policy with --into).
    New(NewKey),
}

#[derive(clap::Args, Debug)]
struct NewKey {
    #[arg(long)]
    id: String,
    #[arg(long)]
    user: Option<String>,
    #[arg(long)]
    team: Option<String>,
    #[arg(long)]
    project: Option<String>,
    #[arg(long)]
    app: Option<String>,
    #[arg(long)]
    agent: Option<String>,
    #[arg(long)]
    environment: Option<String>,
    #[arg(long)]
    cost_center: Option<String>,
    /// Group membership (repeatable).
    #[arg(long = "group")]
    groups: Vec<String>,
    /// RFC 3339 expiry.
    #[arg(long)]
    expires_at: Option<String>,
    /// Add the entry to this policy file in place (validated, written atomically).
    #[arg(long)]
    into: Option<PathBuf>,
}

pub fn run(args: KeyArgs) -> Result<()> {
    match args.command {
        KeyCommand::New(k) => new_key(k),
    }
}

/// `tg-` and 48 hex characters: 192 bits from the OS-seeded CSPRNG.
pub fn mint() -> String {
    let mut bytes = [0u8; 24];
    rand::rng().fill_bytes(&mut bytes);
    format!("{}{}", vkey::PREFIX, hex::encode(bytes))
}

fn entry(k: &NewKey, key: &str) -> serde_json::Value {
    let mut e = serde_json::Map::new();
    e.insert("id".into(), k.id.clone().into());
    e.insert("key_sha256".into(), vkey::sha256_hex(key).into());
    for (name, v) in [
        ("user", &k.user),
        ("team", &k.team),
        ("project", &k.project),
        ("app", &k.app),
        ("agent", &k.agent),
        ("environment", &k.environment),
        ("cost_center", &k.cost_center),
    ] {
        if let Some(v) = v {
            e.insert(name.into(), v.clone().into());
        }
    }
    if !k.groups.is_empty() {
        e.insert("groups".into(), k.groups.clone().into());
    }
    if let Some(x) = &k.expires_at {
        e.insert("expires_at".into(), x.clone().into());
    }
    serde_json::Value::Object(e)
}

fn new_key(k: NewKey) -> Result<()> {
    let key = mint();
    let entry = entry(&k, &key);
    match &k.into {
        None => {
            println!("virtual key (shown once; give it to its owner, it is not stored anywhere):\n  {key}");
            println!(
                "policy entry (add it under \"keys\"):\n{}",
                serde_json::to_string_pretty(&entry)?
            );
        }
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            let updated = insert_key(&text, &serde_json::to_string(&entry)?)?;
            let name = path.display().to_string();
            if let Err(errors) =
                tollgate_core::policy::compile(updated.as_bytes(), &name, crate::run::now_ms())
            {
                let lines: Vec<String> = errors.iter().map(ToString::to_string).collect();
                bail!(
                    "not written: the policy would be invalid:\n{}",
                    lines.join("\n")
                );
            }
            write_atomic(path, &updated, 0o644)?;
            println!("virtual key (shown once; give it to its owner, it is not stored anywhere):\n  {key}");
            println!("added key {:?} to {}", k.id, path.display());
        }
    }
    Ok(())
}

/// Inserts one entry at the end of the top-level `keys` array, touching no
/// other byte of the file so reviews show a one-entry diff. Adds `"keys"`
/// if the policy has none.
pub fn insert_key(text: &str, entry: &str) -> Result<String> {
    let b = text.as_bytes();
    let (mut depth, mut i, mut in_str) = (0i32, 0usize, false);
    let mut keys_array: Option<usize> = None; // index of '[' of keys
    let mut last_top_key = String::new();
    let mut root_close = None;
    while i < b.len() {
        let c = b[i];
        if in_str {
            if c == b'\\' {
                i += 1;
            } else if c == b'"' {
                in_str = false;
            }
        } else {
            match c {
                b'"' => {
                    let end = (i + 1..b.len())
                        .find(|&j| b[j] == b'"' && b[j - 1] != b'\\')
                        .unwrap_or(b.len());
                    if depth == 1 {
                        last_top_key = text[i + 1..end].to_string();
                    }
                    in_str = true;
                }
                b'{' | b'[' => {
                    if depth == 1 && c == b'[' && last_top_key == "keys" && keys_array.is_none() {
                        keys_array = Some(i);
                    }
                    depth += 1;
                }
                b'}' | b']' => {
                    depth -= 1;
                    if depth == 1 {
                        if let Some(open) = keys_array.filter(|_| c == b']') {
                            let inner = text[open + 1..i].trim();
                            let indent = line_indent(text, open) + "  ";
                            return Ok(if inner.is_empty() {
                                format!(
                                    "{}\n{indent}{entry}\n{}{}",
                                    &text[..open + 1],
                                    line_indent(text, open),
                                    &text[i..]
                                )
                            } else {
                                let last = text[..i].trim_end().len();
                                format!("{},\n{indent}{entry}{}", &text[..last], &text[last..])
                            });
                        }
                    }
                    if depth == 0 {
                        root_close = Some(i);
                    }
                }
                b':' | b',' if depth == 1 && c == b',' => last_top_key.clear(),
                _ => {}
            }
        }
        i += 1;
    }
    match root_close {
        Some(close) => {
            let before = text[..close].trim_end();
            let comma = if before.ends_with('{') { "" } else { "," };
            Ok(format!(
                "{before}{comma}\n  \"keys\": [\n    {entry}\n  ]\n{}",
                &text[close..]
            ))
        }
        None => bail!("the policy is not a JSON object"),
    }
}

fn line_indent(text: &str, pos: usize) -> String {
    let start = text[..pos].rfind('\n').map_or(0, |n| n + 1);
    text[start..]
        .chars()
        .take_while(|c| *c == ' ' || *c == '\t')
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
