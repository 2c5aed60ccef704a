//! `tollgate quota`: the shared-limit service on its own, in front of Redis,
//! for deployments where Envoy runs elsewhere (one or more replicas behind
//! the `tollgate_quota` cluster; they are interchangeable).
//! `tollgate quota reseed`: rebuild daily and monthly windows in Redis from
//! the audit store after Redis lost its data.

use crate::collector::store::AuditStore;
use crate::output::{status, Output};
use crate::{clock, policy_file, shared_store, shutdown};
use anyhow::{bail, Result};
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
#[command(args_conflicts_with_subcommands = true)]
pub struct QuotaArgs {
    #[command(subcommand)]
    command: Option<QuotaCommand>,
    #[command(flatten)]
    serve: ServeArgs,
}

#[derive(clap::Subcommand, Debug)]
enum QuotaCommand {
    /// Rebuild the daily and monthly windows (token quotas, USD budgets) in Redis from the
    /// audit store, after Redis lost its data. Raises each window's use to what was audited.
    Reseed(ReseedArgs),
}

#[derive(clap::Args, Debug)]
struct ServeArgs {
    /// Redis URL (redis://HOST:PORT/), or `embedded` for a local redis-server.
    #[arg(long)]
    redis: Option<String>,
    /// gRPC listener (the Envoy cluster `tollgate_quota` points here).
    /// Loopback by default: put mTLS or a network policy in front before exposing it.
    #[arg(long, default_value = "127.0.0.1:9614")]
    listen: SocketAddr,
    /// The filters' sync period (ms): leases last 3 periods.
    #[arg(long, default_value_t = 100)]
    sync_period_ms: u64,
    /// Where the embedded redis-server logs (with --redis embedded).
    #[arg(long, default_value = ".tollgate/redis.log")]
    redis_log: PathBuf,
}

#[derive(clap::Args, Debug)]
struct ReseedArgs {
    /// The audit store (SQLite file or postgres:// URL) to read usage from.
    #[arg(long)]
    from_audit: PathBuf,
    /// The policy whose keys and pools name the windows.
    #[arg(long)]
    policy: PathBuf,
    /// Redis URL (redis://HOST:PORT/).
    #[arg(long)]
    redis: String,
}

pub fn run(args: QuotaArgs) -> Result<()> {
    match args.command {
        Some(QuotaCommand::Reseed(r)) => reseed(r),
        None => serve(args.serve),
    }
}

fn serve(args: ServeArgs) -> Result<()> {
    let Some(redis) = &args.redis else {
        bail!("tollgate quota needs --redis URL (or --redis embedded)");
    };
    let redis = shared_store::Redis::parse(redis)?;
    if let Some(dir) = args
        .redis_log
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
    {
        std::fs::create_dir_all(dir)?;
    }
    let redis = shared_store::redis(&redis, &args.redis_log)?;
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let (addr, task) = shared_store::start_quota(
            args.listen,
            &redis.url,
            shared_store::settings(args.sync_period_ms),
            shutdown::signal(),
        )
        .await?;
        status(format!(
            "quota service listening on {addr} (gRPC tollgate.quota.v1), Redis {}",
            redis.url
        ));
        task.await?
    })
}

fn reseed(args: ReseedArgs) -> Result<()> {
    let (policy, _) = policy_file::compiled(&args.policy).map_err(|errors| {
        anyhow::anyhow!(
            "policy {} has {} error(s):\n{}",
            args.policy.display(),
            errors.len(),
            errors.join("\n")
        )
    })?;
    let store = AuditStore::open_existing(&args.from_audit)?;
    let mut out = Output::stdout();
    let rt = tokio::runtime::Runtime::new()?;
    let mut lines = Vec::new();
    let done = rt.block_on(shared_store::reseed(
        &args.redis,
        &policy,
        &store,
        clock::now_ms(),
        &mut |r| lines.push(r.clone()),
    ))?;
    for r in &lines {
        writeln!(
            out,
            "{}: audited {} since {}, Redis now {}",
            r.bucket,
            r.audited,
            tollgate_core::time::format_rfc3339(r.window_start_ms),
            r.stored
        )?;
    }
    writeln!(
        out,
        "reseeded {} daily and monthly windows from {}",
        done.len(),
        args.from_audit.display()
    )?;
    out.flush()?;
    Ok(())
}
