//! `tollgate quota`: the shared-limit service on its own, in front of Redis,
//! for deployments where Envoy runs elsewhere (one or more replicas behind
//! the `tollgate_quota` cluster; they are interchangeable).

use crate::output::status;
use crate::{shared_store, shutdown};
use anyhow::Result;
use std::net::SocketAddr;

#[derive(clap::Args, Debug)]
pub struct QuotaArgs {
    /// Redis URL (redis://HOST:PORT/), or `embedded` for a local redis-server.
    #[arg(long)]
    pub redis: String,
    /// gRPC listener (the Envoy cluster `tollgate_quota` points here).
    /// Loopback by default: put mTLS or a network policy in front before exposing it.
    #[arg(long, default_value = "127.0.0.1:9614")]
    pub listen: SocketAddr,
    /// The filters' sync period (ms): leases last 3 periods.
    #[arg(long, default_value_t = 100)]
    pub sync_period_ms: u64,
    /// Where the embedded redis-server logs (with --redis embedded).
    #[arg(long, default_value = ".tollgate/redis.log")]
    pub redis_log: std::path::PathBuf,
}

pub fn run(args: QuotaArgs) -> Result<()> {
    let redis = shared_store::Redis::parse(&args.redis)?;
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
