//! `tollgate key new`: mint a virtual key. The key is printed once; the policy
//! only ever holds its SHA-256. `tollgate key revoke`: refuse a key, in the
//! policy file and (with `--redis`) on every replica within a sync period.

use crate::keys::{self, KeySpec};
use crate::output::Output;
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
    /// Revoke a key: mark it revoked in the policy file and, with --redis, on every replica at once.
    Revoke(RevokeKey),
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
        KeyCommand::Revoke(r) => revoke(r),
    }
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
        let epoch = rt.block_on(shared_store::revoke(url, done.key_sha256))?;
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
