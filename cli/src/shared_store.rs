//! The shared store behind limits shared by every Envoy replica: the quota
//! service (`tollgate-quota`, a stateless gRPC front of Redis) started in
//! this process, and with `--redis embedded` a local `redis-server` from
//! the system package. `tollgate quota` runs the service on its own;
//! `tollgate run --redis` starts it beside Envoy, as it does the collector.

use anyhow::{Context, Result};
use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;
use tokio::net::TcpListener;
use tollgate_quota::local_redis::RedisServer;
use tollgate_quota::{QuotaService, Settings};

/// Where Redis is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Redis {
    /// A Redis (or Sentinel-fronted, or managed) instance at this URL.
    Url(String),
    /// A `redis-server` started by this process (the system package).
    Embedded,
}

impl Redis {
    /// `embedded`, or a `redis://` / `rediss://` URL.
    pub fn parse(s: &str) -> Result<Redis> {
        if s == "embedded" {
            return Ok(Redis::Embedded);
        }
        if !(s.starts_with("redis://") || s.starts_with("rediss://") || s.starts_with("unix://")) {
            anyhow::bail!("--redis {s:?} must be a redis:// URL or `embedded`");
        }
        Ok(Redis::Url(s.to_string()))
    }
}

/// A Redis this process may have started, and its URL.
pub struct RedisAt {
    pub url: String,
    /// Kept alive for as long as the gateway runs; stopped on drop.
    _server: Option<RedisServer>,
}

/// Connects to (or starts) Redis. The embedded one logs to `log`.
pub fn redis(redis: &Redis, log: &Path) -> Result<RedisAt> {
    match redis {
        Redis::Url(url) => Ok(RedisAt {
            url: url.clone(),
            _server: None,
        }),
        Redis::Embedded => {
            let server = RedisServer::start_logging_to(log)
                .context("starting the embedded redis-server (`make redis` installs it)")?;
            Ok(RedisAt {
                url: server.url(),
                _server: Some(server),
            })
        }
    }
}

/// The quota service's settings for a sync period.
pub fn settings(sync_period_ms: u64) -> Settings {
    Settings {
        sync_period: Duration::from_millis(sync_period_ms),
        ..Settings::default()
    }
}

/// Binds the quota service's listener and serves it until `shutdown`.
/// Returns the bound address and the serving task.
pub async fn start_quota(
    listen: SocketAddr,
    redis_url: &str,
    settings: Settings,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(SocketAddr, tokio::task::JoinHandle<Result<()>>)> {
    let client =
        redis::Client::open(redis_url).with_context(|| format!("Redis URL {redis_url:?}"))?;
    let service = QuotaService::new(client, settings)?;
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding the quota service on {listen}"))?;
    let addr = listener.local_addr()?;
    let task = tokio::spawn(async move {
        tollgate_quota::serve(listener, service, shutdown)
            .await
            .map_err(anyhow::Error::from)
    });
    Ok((addr, task))
}

/// Records a key revocation for every replica (the Revoke script), one
/// call per secret of the key; returns the last revocation epoch.
pub async fn revoke(redis_url: &str, key_sha256: &[[u8; 32]]) -> Result<u64> {
    let client =
        redis::Client::open(redis_url).with_context(|| format!("Redis URL {redis_url:?}"))?;
    let service = QuotaService::new(client, Settings::default())?;
    let mut epoch = 0;
    for hash in key_sha256 {
        let answer = service
            .revoke(tollgate_quota::tollgate_proto::quota::v1::RevokeRequest {
                key_sha256: hash.to_vec(),
            })
            .await
            .map_err(|status| anyhow::anyhow!("{}", status.message()))
            .with_context(|| format!("recording the revocation in Redis at {redis_url}"))?;
        epoch = answer.epoch;
    }
    Ok(epoch)
}
