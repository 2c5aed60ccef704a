//! `tollgate key new`: mint a virtual key. The key is printed once; the policy
//! only ever holds its SHA-256. `tollgate key list` / `show`: keys as the
//! gateway sees them, never a secret. `tollgate key rotate`: a new secret
//! for the same key id, the old one honoured until a deadline. `tollgate key
//! revoke`: refuse a key, in the policy file and (with `--redis`) on every
//! replica within a sync period.

use crate::clock::{now_ms, parse_duration_ms};
use crate::key_view;
use crate::keys::{self, KeySpec};
use crate::output::{Format, Output};
use crate::policy_file;
use crate::shared_store;
use anyhow::Result;
use std::io::Write;
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct KeyArgs {
    #[command(subcommand)]
    command: KeyCommand,
}

#[derive(clap::Subcommand, Debug)]
enum KeyCommand {
    /// Mint a virtual key and print its policy entry (or add it to a policy with --into).
    New(NewKey),
    /// List the policy's keys: id, user, team, groups, status (active, revoked, expired, rotating until ...), number of secrets.
    List(ListKeys),
    /// Everything about one key: identity, status, secret hashes, resolved models, limits and pools.
    Show(ShowKey),
    /// Give a key a new secret (printed once); the old one keeps working for --grace, under the same key id.
    Rotate(RotateKey),
    /// Revoke a key: mark it revoked in the policy file and, with --redis, on every replica at once.
    Revoke(RevokeKey),
}

#[derive(clap::Args, Debug)]
struct ListKeys {
    /// The policy file.
    #[arg(long)]
    policy: PathBuf,
    #[arg(long, value_enum, default_value_t = Format::Table)]
    format: Format,
}

#[derive(clap::Args, Debug)]
struct ShowKey {
    /// The key's id in the policy.
    #[arg(long)]
    id: String,
    /// The policy file.
    #[arg(long)]
    policy: PathBuf,
    #[arg(long, value_enum, default_value_t = Format::Table)]
    format: Format,
}

#[derive(clap::Args, Debug)]
struct RotateKey {
    /// The key's id in the policy.
    #[arg(long)]
    id: String,
    /// The policy file (validated, written atomically).
    #[arg(long)]
    policy: PathBuf,
    /// How long the old secret keeps working: a number followed by s, m, h or d (30s, 15m, 24h, 7d).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration_ms)]
    grace: u64,
}

#[derive(clap::Args, Debug)]
struct RevokeKey {
    /// The key's id in the policy.
    #[arg(long)]
    id: String,
    /// The policy file (validated, written atomically).
    #[arg(long)]
    policy: PathBuf,
    /// Also record the revocation in this Redis (redis:// URL), so every replica sharing
    /// limits through it refuses the key within one sync period, before the policy file reaches it.
    #[arg(long)]
    redis: Option<String>,
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

impl NewKey {
    fn spec(&self) -> KeySpec {
        let attributes = [
            ("user", &self.user),
            ("team", &self.team),
            ("project", &self.project),
            ("app", &self.app),
            ("agent", &self.agent),
            ("environment", &self.environment),
            ("cost_center", &self.cost_center),
        ]
        .into_iter()
        .filter_map(|(name, v)| Some((name, v.clone()?)))
        .collect();
        KeySpec {
            id: self.id.clone(),
            attributes,
            groups: self.groups.clone(),
            expires_at: self.expires_at.clone(),
        }
    }
}

pub fn run(args: KeyArgs) -> Result<()> {
    match args.command {
        KeyCommand::New(k) => new(k),
        KeyCommand::List(l) => list(l),
        KeyCommand::Show(s) => show(s),
        KeyCommand::Rotate(r) => rotate(r),
        KeyCommand::Revoke(r) => revoke(r),
    }
}

fn list(l: ListKeys) -> Result<()> {
    let (policy, _) = policy_file::open(&l.policy)?;
    let rows = key_view::list(&policy, now_ms());
    print(
        l.format,
        || key_view::list_table(&rows),
        || key_view::list_json(&rows),
    )
}

fn show(s: ShowKey) -> Result<()> {
    let (policy, _) = policy_file::open(&s.policy)?;
    let shown = key_view::show(&policy, &s.id, now_ms())?;
    print(
        s.format,
        || key_view::show_text(&shown),
        || key_view::show_json(&shown),
    )
}

/// Prints a view as text for people or as pretty JSON for programs.
fn print(
    format: Format,
    text: impl FnOnce() -> String,
    json: impl FnOnce() -> serde_json::Value,
) -> Result<()> {
    let mut out = Output::stdout();
    match format {
        Format::Table => writeln!(out, "{}", text())?,
        Format::Json => writeln!(out, "{}", serde_json::to_string_pretty(&json())?)?,
    }
    out.flush()?;
    Ok(())
}

fn rotate(r: RotateKey) -> Result<()> {
    let done = keys::rotate_in_policy(&r.policy, &r.id, r.grace, now_ms())?;
    let mut out = Output::stdout();
    writeln!(
        out,
        "new secret of key {:?} (shown once; give it to its owner, it is not stored anywhere):\n  {}",
        r.id, done.key
    )?;
    writeln!(
        out,
        "the previous secret works until {}; from then only the new one does (audit records carry key id {:?} for both)",
        done.not_after, r.id
    )?;
    if done.dropped > 0 {
        writeln!(
            out,
            "dropped {} earlier secret(s) already past their not_after",
            done.dropped
        )?;
    }
    writeln!(out, "rotated key {:?} in {}", r.id, r.policy.display())?;
    out.flush()?;
    Ok(())
}

fn revoke(r: RevokeKey) -> Result<()> {
    let done = keys::revoke_in_policy(&r.policy, &r.id)?;
    let mut out = Output::stdout();
    if done.changed {
        writeln!(out, "key {:?} revoked in {}", r.id, r.policy.display())?;
    } else {
        writeln!(
            out,
            "key {:?} was already revoked in {}",
            r.id,
            r.policy.display()
        )?;
    }
    if let Some(url) = &r.redis {
        let rt = tokio::runtime::Runtime::new()?;
        let epoch = rt.block_on(shared_store::revoke(url, &done.key_sha256))?;
        writeln!(
            out,
            "revocation recorded in Redis (epoch {epoch}): every replica refuses the key within one sync period"
        )?;
    }
    out.flush()?;
    Ok(())
}

fn new(k: NewKey) -> Result<()> {
    let key = keys::mint();
    let entry = keys::entry(&k.spec(), &key);
    let mut out = Output::stdout();
    if let Some(path) = &k.into {
        keys::add_to_policy(path, &entry)?;
    }
    writeln!(
        out,
        "virtual key (shown once; give it to its owner, it is not stored anywhere):\n  {key}"
    )?;
    match &k.into {
        None => writeln!(
            out,
            "policy entry (add it under \"keys\"):\n{}",
            serde_json::to_string_pretty(&entry)?
        )?,
        Some(path) => writeln!(out, "added key {:?} to {}", k.id, path.display())?,
    }
    out.flush()?;
    Ok(())
}
