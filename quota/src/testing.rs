//! Test support, public so the end-to-end harness can reuse it:
//! [`RedisServer`] (re-exported from [`crate::local_redis`]), [`ManualClock`]
//! (scripts that read the time from the test instead of Redis `TIME`), and
//! read-only views of what the scripts store.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

use tollgate_proto::quota::v1::Refill;

use crate::scripts::{inspect_script, keys, window_script, Lua};

pub use crate::local_redis::{RedisServer, TlsFiles};

/// The time the scripts of a [`crate::QuotaService::with_manual_clock`]
/// service see, in ms since the Unix epoch. Production scripts read Redis
/// `TIME` and have no such input.
#[derive(Debug, Clone)]
pub struct ManualClock(Arc<AtomicI64>);

impl ManualClock {
    pub fn new(now_ms: i64) -> ManualClock {
        ManualClock(Arc::new(AtomicI64::new(now_ms)))
    }

    pub fn now_ms(&self) -> i64 {
        self.0.load(Ordering::SeqCst)
    }

    pub fn set(&self, now_ms: i64) {
        self.0.store(now_ms, Ordering::SeqCst);
    }

    pub fn advance(&self, ms: i64) {
        self.0.fetch_add(ms, Ordering::SeqCst);
    }
}

async fn eval(
    client: &redis::Client,
    lua: &Lua,
    keys: &[String],
    args: &[String],
) -> redis::RedisResult<redis::Value> {
    let mut conn = client.get_multiplexed_async_connection().await?;
    redis::cmd("EVAL")
        .arg(lua.code.as_str())
        .arg(keys.len())
        .arg(keys)
        .arg("0")
        .arg(args)
        .query_async(&mut conn)
        .await
}

fn parse_error(e: impl std::fmt::Display) -> redis::RedisError {
    redis::RedisError::from((
        redis::ErrorKind::Parse,
        "unexpected test script reply",
        e.to_string(),
    ))
}

/// The `[start, end)` windows the Lua scripts compute for each
/// (refill, time in ms, UTC offset in minutes).
pub async fn lua_windows(
    client: &redis::Client,
    queries: &[(Refill, i64, i32)],
) -> redis::RedisResult<Vec<(i64, i64)>> {
    let args: Vec<String> = queries
        .iter()
        .flat_map(|(refill, t, off)| [(*refill as i32).to_string(), t.to_string(), off.to_string()])
        .collect();
    let value = eval(client, &window_script(), &[], &args).await?;
    let lines: Vec<String> = redis::from_redis_value(value).map_err(parse_error)?;
    lines
        .iter()
        .map(|line| {
            let (a, b) = line.split_once(' ').ok_or_else(|| parse_error(line))?;
            Ok((
                a.parse().map_err(parse_error)?,
                b.parse().map_err(parse_error)?,
            ))
        })
        .collect()
}

/// A bucket as stored in Redis.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Stored {
    /// Per-minute: the unleased balance at its last write (not refilled to
    /// now). Calendar: used in the stored window.
    pub value: f64,
    /// The bucket's sum of outstanding leases.
    pub leased: i64,
    /// The sum of the replicas' lease records that count (should equal
    /// `leased`).
    pub record_leases: i64,
    /// Calendar: the stored window's start (0 per-minute).
    pub window: i64,
}

/// Reads a bucket's stored state without changing it.
pub async fn inspect(client: &redis::Client, bucket_id: &str) -> redis::RedisResult<Stored> {
    let keys = [keys::bucket(bucket_id), keys::leases(bucket_id)];
    let value = eval(client, &inspect_script(), &keys, &[]).await?;
    let line: String = redis::from_redis_value(value).map_err(parse_error)?;
    let f: Vec<&str> = line.split(' ').collect();
    match f.as_slice() {
        [value, leased, record_leases, window] => Ok(Stored {
            value: value.parse().map_err(parse_error)?,
            leased: leased.parse().map_err(parse_error)?,
            record_leases: record_leases.parse().map_err(parse_error)?,
            window: window.parse().map_err(parse_error)?,
        }),
        _ => Err(parse_error(line)),
    }
}
