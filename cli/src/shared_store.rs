//! The shared store behind limits shared by every Envoy replica: the quota
//! service (`tollgate-quota`, a stateless gRPC front of Redis) started in
//! this process, and with `--redis embedded` a local `redis-server` from
//! the system package. `tollgate quota` runs the service on its own;
//! `tollgate run --redis` starts it beside Envoy, as it does the collector.

use crate::collector::store::{AuditStore, Param};
use anyhow::{Context, Result};
use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;
use tokio::net::TcpListener;
use tollgate_core::audit::{AuditRecord, Outcome};
use tollgate_core::meter::cell::Refill;
use tollgate_core::meter::shared::{base_units, wire_bucket};
use tollgate_core::meter::{buckets_for, Bucket, Clock};
use tollgate_core::policy::{Policy, POOL_KINDS};
use tollgate_core::time::{day_window, month_window};
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
    tokio::spawn(probe(client.clone(), redis_url.to_string()));
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

/// Says once, at start, when Redis does not answer. Not an error: the
/// limits ride an outage out (each by its failure mode, `docs/scale-out.md`),
/// and Redis may come up later. But at start it is usually a wrong host,
/// password or CA (`rediss://`), and otherwise nothing would say so.
async fn probe(client: redis::Client, url: String) {
    const WITHIN: Duration = Duration::from_secs(3);
    let answer = tokio::time::timeout(WITHIN, async {
        let mut conn = client.get_multiplexed_async_connection().await?;
        redis::cmd("PING").query_async::<String>(&mut conn).await
    })
    .await;
    let problem = match answer {
        Ok(Ok(_)) => return,
        Ok(Err(e)) => e.to_string(),
        Err(_) => format!("no answer within {} s", WITHIN.as_secs()),
    };
    eprintln!(
        "tollgate: warning: Redis at {} does not answer ({problem}); until it does, each shared limit applies its failure mode",
        crate::collector::store::redact_url(&url)
    );
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

/// One calendar bucket rebuilt from the audit store.
#[derive(Debug, Clone, PartialEq)]
pub struct Reseeded {
    /// `key:alice:tokens_per_day`, `pool:team:payments:budget_usd_per_month`.
    pub bucket: String,
    /// What the audit store says was used in the current window (base
    /// units: tokens, or micro-USD for budgets).
    pub audited: i64,
    /// The window's use in Redis afterwards (never lowered).
    pub stored: i64,
    pub window_start_ms: u64,
}

/// What one audited request used: tokens of every class (what daily token
/// quotas count) and its cost. A request that ended before its usage was
/// read counts what it was charged: its reservation.
fn audited_use(r: &AuditRecord) -> (u64, f64) {
    let t = &r.tokens;
    let tokens = match t.counted() {
        Some(n) => n,
        None if r.decision == Outcome::Allowed => t.input_estimated + t.output_reserved,
        None => 0,
    };
    (tokens, r.cost_usd.unwrap_or(0.0))
}

/// The scopes a record's request drew from: its key and the pools of its
/// identity attributes.
fn scopes_of(r: &AuditRecord) -> Vec<String> {
    let mut out: Vec<String> = r.key_id.iter().map(|k| format!("key:{k}")).collect();
    for (kind, value) in POOL_KINDS
        .iter()
        .zip([&r.team, &r.project, &r.user, &r.app, &r.agent])
    {
        if let Some(v) = value {
            out.push(format!("pool:{kind}:{v}"));
        }
    }
    out
}

/// Rebuilds the daily and monthly windows (token quotas, USD budgets) of
/// every key and pool of `policy` in Redis from the audit store, after
/// Redis lost its data: each window's use becomes what the audited
/// requests of that window used (raised, never lowered). Per-minute
/// buckets are left alone: they refill within a minute. `progress` gets a
/// line per bucket.
pub async fn reseed(
    redis_url: &str,
    policy: &Policy,
    store: &AuditStore,
    now_ms: u64,
    progress: &mut dyn FnMut(&Reseeded),
) -> Result<Vec<Reseeded>> {
    let clock = Clock {
        now: now_ms,
        utc_offset_min: policy.settings.utc_offset_minutes,
    };
    let mut buckets: Vec<(Bucket, u64)> = Vec::new();
    // Identities' windows too: their audit records carry their id as key_id.
    for key in policy.callers() {
        // Provider pools hold per-minute limits only: no window to rebuild.
        for b in buckets_for(policy, key, None) {
            if !b.metric.is_quota() || buckets.iter().any(|(o, _)| o.label() == b.label()) {
                continue;
            }
            let start = match b.metric.refill() {
                Refill::Month => month_window(now_ms, clock.utc_offset_min).start,
                _ => day_window(now_ms, clock.utc_offset_min).start,
            };
            buckets.push((b, start));
        }
    }
    let Some(earliest) = buckets.iter().map(|(_, s)| *s).min() else {
        return Ok(Vec::new());
    };
    // One pass over the records of the longest window, summed per scope
    // and window start.
    let mut used: HashMap<(String, u64), (u64, f64)> = HashMap::new();
    let starts: Vec<u64> = {
        let mut s: Vec<u64> = buckets.iter().map(|(_, s)| *s).collect();
        s.sort_unstable();
        s.dedup();
        s
    };
    store.query(
        "SELECT record FROM audit WHERE timestamp_ms >= $1",
        &[Param::Int(i64::try_from(earliest).unwrap_or(i64::MAX))],
        &mut |row| {
            let r: AuditRecord = serde_json::from_str(&row.text("record")?)?;
            let (tokens, usd) = audited_use(&r);
            for scope in scopes_of(&r) {
                for &start in starts.iter().filter(|s| r.timestamp_ms >= **s) {
                    let e = used.entry((scope.clone(), start)).or_default();
                    e.0 += tokens;
                    e.1 += usd;
                }
            }
            Ok(())
        },
    )?;
    let client =
        redis::Client::open(redis_url).with_context(|| format!("Redis URL {redis_url:?}"))?;
    let service = QuotaService::new(client, Settings::default())?;
    let mut out = Vec::with_capacity(buckets.len());
    for (b, start) in &buckets {
        let (tokens, usd) = used
            .get(&(b.scope.clone(), *start))
            .copied()
            .unwrap_or_default();
        let amount = if b.metric.is_usd() {
            usd
        } else {
            tokens as f64
        };
        let audited = base_units(b, amount);
        let stored = service
            .reseed(&wire_bucket(b, clock), audited)
            .await
            .map_err(|status| anyhow::anyhow!("{}", status.message()))
            .with_context(|| format!("reseeding {} in Redis at {redis_url}", b.label()))?;
        let done = Reseeded {
            bucket: b.label(),
            audited,
            stored,
            window_start_ms: *start,
        };
        progress(&done);
        out.push(done);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tollgate_core::audit::Tokens;
    use tollgate_quota::testing::{inspect, RedisServer};

    fn record(id: &str, key: &str, team: &str, at: u64, tokens: u64, usd: f64) -> AuditRecord {
        AuditRecord {
            request_id: id.into(),
            timestamp_ms: at,
            complete: true,
            key_id: Some(key.into()),
            team: Some(team.into()),
            status: 200,
            tokens: Tokens {
                input: Some(tokens / 2),
                output: Some(tokens - tokens / 2),
                ..Default::default()
            },
            cost_usd: Some(usd),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn reseed_rebuilds_todays_and_this_months_windows_from_the_audit_store() {
        let redis = RedisServer::start().expect("redis-server (make redis installs it)");
        let dir = tempfile::tempdir().unwrap();
        let store = AuditStore::open(dir.path().join("audit.db")).unwrap();
        // Redis computes windows from its own clock: use the real time.
        let now = crate::clock::now_ms();
        let day = day_window(now, 0).start;
        let month = month_window(now, 0).start;
        store
            .insert_batch(&[
                record("today-1", "alice", "payments", day, 300, 0.25),
                record("today-2", "alice", "payments", now - 10, 200, 0.5),
                // Earlier this month (or, on the 1st, this day too).
                record("month-1", "alice", "payments", month, 5_000, 1.0),
                // Before this month: nothing.
                record("old-1", "alice", "payments", month - 5, 9_999, 9.0),
            ])
            .unwrap();
        let json = format!(
            r#"{{"version":1,"defaults":{{"models":["claude-*"]}},
                "pools":{{"team:payments":{{"budget_usd_per_month":100}}}},
                "keys":[{{"id":"alice","key_sha256":"{}","team":"payments",
                          "limits":{{"tokens_per_day":100000,"requests_per_minute":60}}}}]}}"#,
            tollgate_core::vkey::sha256_hex("tg-alice")
        );
        let (policy, _) = tollgate_core::policy::compile(json.as_bytes(), "p.json", 0).unwrap();
        let mut seen = Vec::new();
        let done = reseed(&redis.url(), &policy, &store, now, &mut |r| {
            seen.push(r.bucket.clone())
        })
        .await
        .unwrap();
        assert_eq!(
            seen,
            [
                "key:alice:tokens_per_day",
                "pool:team:payments:budget_usd_per_month"
            ],
            "calendar windows only, each once"
        );
        let today = if month == day { 5_500 } else { 500 };
        assert_eq!(done[0].audited, today, "today's requests");
        assert_eq!(done[0].window_start_ms, day);
        assert_eq!(
            done[1].audited, 1_750_000,
            "this month's USD in micro-dollars"
        );
        let client = redis.client().unwrap();
        let tokens = inspect(&client, "key:alice:tokens_per_day").await.unwrap();
        assert_eq!((tokens.value, tokens.window), (today as f64, day as i64));
        let usd = inspect(&client, "pool:team:payments:budget_usd_per_month")
            .await
            .unwrap();
        assert_eq!(usd.value, 1_750_000.0);
        // Reseeding again never lowers what Redis holds.
        let again = reseed(&redis.url(), &policy, &store, now, &mut |_| {})
            .await
            .unwrap();
        assert_eq!(again[0].stored, today);
    }
}
