//! The `tollgate.quota.v1.Quota` service: each RPC is validated, becomes one
//! script call (Sync: one pipeline of them) and its reply is parsed back.
//! Nothing is kept between calls but the Redis connection, so any number of
//! quota replicas can serve the same Envoys.

use std::collections::HashSet;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{ErrorKind, RedisError, ServerErrorKind, Value};
use tokio::net::TcpListener;
use tollgate_proto::quota::v1::{
    admit_response::Outcome, AdmitRequest, AdmitResponse, Bucket, BucketView, Grant, Refill,
    RevokeRequest, RevokeResponse, SettleRequest, SettleResponse, SyncRequest, SyncResponse,
};
use tonic::{Request, Response, Status};

use crate::grpc::quota_server::{Quota, QuotaServer};
use crate::scripts::{keys, ClockSource, Lua, Scripts};
use crate::testing::ManualClock;

/// Replicas that synced within this window count as active (the lease rule
/// and the `local` fallback divide by them).
const ACTIVE_WINDOW_MS: i64 = 10_000;
/// Lua numbers are doubles: limits, amounts and sequence numbers stay below
/// 2^53 to stay exact (9e15 micro-USD is 9 billion dollars).
const MAX_EXACT: i64 = 1 << 53;
const MAX_NAME_LEN: usize = 512;
/// Offsets within a day either side of UTC (real zones span -12:00..+14:00).
const MAX_OFFSET_MIN: i32 = 1440;
/// How long an idle bucket outlives the moment it is full again (or its
/// window's end), beyond the lease reclaim time.
const KEEP_MS: i64 = 60_000;

/// Service settings; limits travel with every call, so these are all.
#[derive(Debug, Clone)]
pub struct Settings {
    /// T, how often each Envoy's sync leader syncs. A lease expires 3T after
    /// its grant; Redis reclaims an unsynced lease 3T after that.
    pub sync_period: Duration,
    /// How long an Admit answer and a Settle marker are kept for retries.
    pub idempotency_ttl: Duration,
    /// Most revoked key hashes in one SyncResponse; the rest follow on the
    /// next syncs.
    pub max_revocations: u32,
    /// A Redis call slower than this (connecting included) is answered
    /// UNAVAILABLE, so the filter applies its failure mode instead of waiting.
    pub redis_timeout: Duration,
}

impl Default for Settings {
    fn default() -> Settings {
        Settings {
            sync_period: Duration::from_millis(100),
            idempotency_ttl: Duration::from_secs(600),
            max_revocations: 1000,
            redis_timeout: Duration::from_secs(1),
        }
    }
}

impl Settings {
    fn lease_ms(&self) -> i64 {
        3 * self.sync_period.as_millis() as i64
    }

    fn keep_ms(&self) -> i64 {
        2 * self.lease_ms() + KEEP_MS
    }

    fn idempotency_secs(&self) -> u64 {
        self.idempotency_ttl.as_secs().max(1)
    }
}

/// Why the service could not start or stopped.
#[derive(Debug)]
pub enum Error {
    /// The Redis client configuration was refused.
    Redis(RedisError),
    /// The gRPC server failed.
    Serve(tonic::transport::Error),
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Error::Redis(e) => write!(f, "redis: {e}"),
            Error::Serve(e) => write!(f, "quota gRPC server: {e}"),
        }
    }
}

impl std::error::Error for Error {}

/// The shared-limit service. Cheap to clone (one multiplexed Redis
/// connection, reconnected on failure). The RPCs are plain async methods,
/// callable without a network; [`serve`] puts them behind gRPC.
#[derive(Clone)]
pub struct QuotaService {
    inner: Arc<Inner>,
}

struct Inner {
    conn: ConnectionManager,
    scripts: Scripts,
    settings: Settings,
    clock: Option<ManualClock>,
}

impl QuotaService {
    /// A service on `redis` (e.g. `redis::Client::open("redis://127.0.0.1:6379/")`).
    /// Connects lazily: a service started while Redis is down answers
    /// UNAVAILABLE until it is back.
    pub fn new(redis: redis::Client, settings: Settings) -> Result<QuotaService, Error> {
        QuotaService::build(redis, settings, None)
    }

    /// Test only: a service whose scripts read the time from `clock` instead
    /// of Redis `TIME` (a different script text, never loaded by [`new`](Self::new)).
    pub fn with_manual_clock(
        redis: redis::Client,
        settings: Settings,
        clock: ManualClock,
    ) -> Result<QuotaService, Error> {
        QuotaService::build(redis, settings, Some(clock))
    }

    fn build(
        redis: redis::Client,
        settings: Settings,
        clock: Option<ManualClock>,
    ) -> Result<QuotaService, Error> {
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(settings.redis_timeout))
            .set_response_timeout(Some(settings.redis_timeout))
            .set_number_of_retries(1)
            .set_min_delay(Duration::from_millis(50))
            .set_max_delay(Duration::from_secs(1));
        let conn = ConnectionManager::new_lazy_with_config(redis, config).map_err(Error::Redis)?;
        let source = match clock {
            Some(_) => ClockSource::Manual,
            None => ClockSource::Redis,
        };
        Ok(QuotaService {
            inner: Arc::new(Inner {
                conn,
                scripts: Scripts::new(source),
                settings,
                clock,
            }),
        })
    }

    /// Connects and loads the scripts: a readiness check.
    pub async fn ping(&self) -> Result<(), Status> {
        let mut conn = self.inner.conn.clone();
        within(
            self.inner.settings.redis_timeout,
            self.load_scripts(&mut conn),
        )
        .await
    }

    /// All-or-nothing admission over the request's buckets.
    pub async fn admit(&self, req: AdmitRequest) -> Result<AdmitResponse, Status> {
        check_name("request_id", &req.request_id)?;
        if !req.key_sha256.is_empty() {
            check_key_hash(&req.key_sha256)?;
        }
        let mut seen = HashSet::new();
        let mut specs = Vec::with_capacity(req.charges.len());
        for (i, charge) in req.charges.iter().enumerate() {
            let at = format!("charges[{i}]");
            let spec = Spec::of(charge.bucket.as_ref(), &at)?;
            spec.unique(&mut seen, &at)?;
            if charge.amount < 0 || charge.amount > MAX_EXACT {
                return Err(invalid(format!(
                    "{at}: amount {} must be between 0 and 2^53",
                    charge.amount
                )));
            }
            // The caller settles against what it reserved, so the cap must
            // be the caller's (the local meter caps the same way).
            if spec.refill == Refill::PerMinute && charge.amount > spec.limit {
                return Err(invalid(format!(
                    "{at}: amount {} exceeds the capacity {} of per-minute bucket '{}' (cap reservations at the capacity)",
                    charge.amount, spec.limit, spec.id
                )));
            }
            specs.push((spec, charge.amount));
        }

        let mut keys = vec![keys::admitted(&req.request_id), keys::REVOKED.to_string()];
        for (spec, _) in &specs {
            keys.push(keys::bucket(spec.id));
            keys.push(keys::leases(spec.id));
        }
        let s = &self.inner.settings;
        let mut cmd = self.evalsha(&self.inner.scripts.admit, &keys);
        cmd.arg(req.key_sha256.as_slice())
            .arg(s.idempotency_secs())
            .arg(s.keep_ms())
            .arg(s.lease_ms());
        for (spec, amount) in &specs {
            spec.args(&mut cmd).arg(*amount);
        }
        let reply = self.run_one(cmd, "admit").await?;
        parse_admit(&reply).ok_or_else(|| bad_reply("admit", &reply))
    }

    /// Signed settlement of an admitted request, applied once per request_id.
    pub async fn settle(&self, req: SettleRequest) -> Result<SettleResponse, Status> {
        check_name("request_id", &req.request_id)?;
        let mut keys = vec![keys::settled(&req.request_id)];
        let mut specs = Vec::with_capacity(req.deltas.len());
        for (i, delta) in req.deltas.iter().enumerate() {
            let at = format!("deltas[{i}]");
            let spec = Spec::of(delta.bucket.as_ref(), &at)?;
            if delta.amount.abs() > MAX_EXACT {
                return Err(invalid(format!(
                    "{at}: amount {} is beyond ±2^53",
                    delta.amount
                )));
            }
            keys.push(keys::bucket(spec.id));
            keys.push(keys::leases(spec.id));
            specs.push((spec, delta.amount));
        }
        let s = &self.inner.settings;
        let mut cmd = self.evalsha(&self.inner.scripts.settle, &keys);
        cmd.arg(s.idempotency_secs()).arg(s.keep_ms());
        for (spec, amount) in &specs {
            spec.args(&mut cmd).arg(*amount);
        }
        let reply = self.run_one(cmd, "settle").await?;
        match reply.as_str() {
            "1" => Ok(SettleResponse { applied: true }),
            "0" => Ok(SettleResponse { applied: false }),
            _ => Err(bad_reply("settle", &reply)),
        }
    }

    /// One Envoy's lease sync: one pipeline, the replica's registration and
    /// revocations first, then one script call per bucket.
    pub async fn sync(&self, req: SyncRequest) -> Result<SyncResponse, Status> {
        check_name("replica", &req.replica)?;
        let mut seen = HashSet::new();
        let mut specs = Vec::with_capacity(req.buckets.len());
        for (i, b) in req.buckets.iter().enumerate() {
            let at = format!("buckets[{i}]");
            let spec = Spec::of(b.bucket.as_ref(), &at)?;
            spec.unique(&mut seen, &at)?;
            if b.seq > MAX_EXACT as u64 {
                return Err(invalid(format!("{at}: seq {} is beyond 2^53", b.seq)));
            }
            if b.consumed.abs() > MAX_EXACT {
                return Err(invalid(format!(
                    "{at}: consumed {} is beyond ±2^53",
                    b.consumed
                )));
            }
            if b.want < 0 || b.want > MAX_EXACT {
                return Err(invalid(format!(
                    "{at}: want {} must be between 0 and 2^53",
                    b.want
                )));
            }
            specs.push((spec, b));
        }

        let s = &self.inner.settings;
        let scripts = &self.inner.scripts;
        let mut pipe = redis::pipe();
        let mut hello = self.evalsha(
            &scripts.sync_replica,
            &[keys::REPLICAS, keys::REVOKED, keys::EPOCH],
        );
        hello
            .arg(req.replica.as_str())
            .arg(req.revocation_epoch)
            .arg(s.max_revocations.max(1))
            .arg(ACTIVE_WINDOW_MS);
        pipe.add_command(hello);
        for (spec, b) in &specs {
            let keys = [
                keys::bucket(spec.id),
                keys::leases(spec.id),
                keys::REPLICAS.to_string(),
            ];
            let mut cmd = self.evalsha(&scripts.sync_bucket, &keys);
            cmd.arg(req.replica.as_str());
            spec.args(&mut cmd)
                .arg(b.seq)
                .arg(b.consumed)
                .arg(b.want)
                .arg(b.window)
                .arg(s.lease_ms())
                .arg(s.lease_ms())
                .arg(s.keep_ms())
                .arg(ACTIVE_WINDOW_MS);
            pipe.add_command(cmd);
        }

        let values = self.run(&pipe).await?;
        let mut values = values.into_iter();
        let head: Vec<Vec<u8>> = values
            .next()
            .and_then(|v| redis::from_redis_value(v).ok())
            .ok_or_else(|| bad_reply("sync_replica", "not a list"))?;
        let mut head = head.into_iter();
        let mut number = |what: &str| -> Result<i64, Status> {
            head.next()
                .and_then(|b| String::from_utf8(b).ok())
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| bad_reply("sync_replica", what))
        };
        let now_ms = number("now")?;
        let replicas = number("replicas")?;
        let epoch = number("epoch")?;
        let revoked_keys: Vec<Vec<u8>> = head.collect();

        let mut grants = Vec::with_capacity(specs.len());
        for value in values {
            let reply: String = redis::from_redis_value(value)
                .map_err(|e| bad_reply("sync_bucket", &e.to_string()))?;
            grants.push(parse_grant(&reply).ok_or_else(|| bad_reply("sync_bucket", &reply))?);
        }
        if grants.len() != specs.len() {
            return Err(bad_reply("sync", "one grant per bucket"));
        }
        Ok(SyncResponse {
            grants,
            revoked_keys,
            revocation_epoch: u64::try_from(epoch).unwrap_or(0),
            replicas: u32::try_from(replicas).unwrap_or(u32::MAX),
            now_ms,
        })
    }

    /// Records a key revocation; every replica learns it on its next sync.
    pub async fn revoke(&self, req: RevokeRequest) -> Result<RevokeResponse, Status> {
        check_key_hash(&req.key_sha256)?;
        let mut cmd = self.evalsha(&self.inner.scripts.revoke, &[keys::EPOCH, keys::REVOKED]);
        cmd.arg(req.key_sha256.as_slice());
        let reply = self.run_one(cmd, "revoke").await?;
        let epoch = reply.parse().map_err(|_| bad_reply("revoke", &reply))?;
        Ok(RevokeResponse { epoch })
    }

    /// Raises a calendar bucket's use in its current window to `used` (base
    /// units), for rebuilding daily and monthly windows from the audit
    /// store after Redis lost its data. Never lowers it. Returns the use.
    pub async fn reseed(&self, bucket: &Bucket, used: i64) -> Result<i64, Status> {
        let spec = Spec::of(Some(bucket), "bucket")?;
        if spec.refill == Refill::PerMinute {
            return Err(invalid(format!(
                "bucket '{}': per-minute buckets refill on their own; only DAY and MONTH windows are reseeded",
                spec.id
            )));
        }
        if !(0..=MAX_EXACT).contains(&used) {
            return Err(invalid(format!("used {used} must be between 0 and 2^53")));
        }
        let keys = [keys::bucket(spec.id), keys::leases(spec.id)];
        let mut cmd = self.evalsha(&self.inner.scripts.reseed, &keys);
        cmd.arg(self.inner.settings.keep_ms());
        spec.args(&mut cmd).arg(used);
        let reply = self.run_one(cmd, "reseed").await?;
        reply.parse().map_err(|_| bad_reply("reseed", &reply))
    }

    /// `EVALSHA sha numkeys keys... clock`: every script's ARGV[1] is the
    /// test clock, empty in production (the script reads Redis TIME).
    fn evalsha<K: redis::ToRedisArgs>(&self, script: &Lua, keys: &[K]) -> redis::Cmd {
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(script.sha.as_str()).arg(keys.len()).arg(keys);
        match &self.inner.clock {
            Some(clock) => cmd.arg(clock.now_ms()),
            None => cmd.arg(""),
        };
        cmd
    }

    async fn run_one(&self, cmd: redis::Cmd, script: &str) -> Result<String, Status> {
        let mut pipe = redis::pipe();
        pipe.add_command(cmd);
        let value = self
            .run(&pipe)
            .await?
            .into_iter()
            .next()
            .ok_or_else(|| bad_reply(script, "no reply"))?;
        redis::from_redis_value(value).map_err(|e| bad_reply(script, &e.to_string()))
    }

    /// Runs a pipeline of script calls within the Redis timeout. Redis
    /// forgets loaded scripts on restart, failover or SCRIPT FLUSH: on
    /// NOSCRIPT the scripts are loaded and the pipeline sent once more (a
    /// refused EVALSHA ran nothing, and every script is idempotent anyway).
    async fn run(&self, pipe: &redis::Pipeline) -> Result<Vec<Value>, Status> {
        let mut conn = self.inner.conn.clone();
        within(self.inner.settings.redis_timeout, async {
            match pipe.query_async::<Vec<Value>>(&mut conn).await {
                Err(e) if e.kind() == ErrorKind::Server(ServerErrorKind::NoScript) => {
                    tracing::info!(
                        "Redis has not got the quota scripts (restarted or flushed): loading them"
                    );
                    self.load_scripts(&mut conn).await?;
                    pipe.query_async(&mut conn).await.map_err(store_error)
                }
                other => other.map_err(store_error),
            }
        })
        .await
    }

    async fn load_scripts(&self, conn: &mut ConnectionManager) -> Result<(), Status> {
        let mut pipe = redis::pipe();
        for script in self.inner.scripts.all() {
            pipe.cmd("SCRIPT").arg("LOAD").arg(script.code.as_str());
        }
        pipe.query_async::<Vec<String>>(conn)
            .await
            .map(|_| ())
            .map_err(store_error)
    }
}

async fn within<T>(
    limit: Duration,
    call: impl Future<Output = Result<T, Status>>,
) -> Result<T, Status> {
    match tokio::time::timeout(limit, call).await {
        Ok(result) => result,
        Err(_) => Err(Status::unavailable(format!(
            "quota store unavailable: Redis did not answer within {} ms",
            limit.as_millis()
        ))),
    }
}

/// Redis down, unreachable, loading, read-only or out of memory is
/// UNAVAILABLE: the filter then applies the limit's failure mode (`local`,
/// `closed`, `open`). A Lua runtime error (code ERR from a user script), a
/// key of the wrong type or a reply we cannot read is a bug of ours or a
/// foreign writer on our keys: INTERNAL. (Errors of commands called inside
/// a script keep their own code, such as OOM or READONLY.)
fn store_error(e: RedisError) -> Status {
    let text = e.to_string();
    let ours = matches!(e.kind(), ErrorKind::Parse | ErrorKind::UnexpectedReturnType)
        || (e.kind() == ErrorKind::Server(ServerErrorKind::ResponseError)
            && text.contains("user_script"))
        || text.contains("WRONGTYPE");
    if ours {
        tracing::error!("quota script failed: {text}");
        Status::internal(format!("quota script failed: {text}"))
    } else {
        if let Some(also) = UNAVAILABLE_LOG.due() {
            tracing::warn!(
                "quota store unavailable: {text}{}",
                also.map_or(String::new(), |n| format!(
                    " ({n} more since the last line)"
                ))
            );
        }
        Status::unavailable(format!("quota store unavailable: {text}"))
    }
}

/// An outage fails every call, hundreds a second: one log line per
/// [`LOG_EVERY`] says it, with how many it stood for.
static UNAVAILABLE_LOG: Throttle = Throttle::new(LOG_EVERY);

const LOG_EVERY: Duration = Duration::from_secs(10);

/// At most one line per period, counting the ones left out.
struct Throttle {
    every: Duration,
    last: std::sync::Mutex<Option<std::time::Instant>>,
    skipped: std::sync::atomic::AtomicU64,
}

impl Throttle {
    const fn new(every: Duration) -> Throttle {
        Throttle {
            every,
            last: std::sync::Mutex::new(None),
            skipped: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// `Some` when a line is due, with the lines left out since the last
    /// one (`None` for the first); `None` when it is not.
    fn due(&self) -> Option<Option<u64>> {
        use std::sync::atomic::Ordering;
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        let now = std::time::Instant::now();
        match *last {
            Some(at) if now.duration_since(at) < self.every => {
                self.skipped.fetch_add(1, Ordering::Relaxed);
                None
            }
            previous => {
                *last = Some(now);
                let skipped = self.skipped.swap(0, Ordering::Relaxed);
                Some(previous.map(|_| skipped))
            }
        }
    }
}

fn bad_reply(script: &str, reply: &str) -> Status {
    Status::internal(format!(
        "unexpected reply from the {script} script: {reply}"
    ))
}

fn invalid(message: String) -> Status {
    Status::invalid_argument(message)
}

fn check_name(field: &str, value: &str) -> Result<(), Status> {
    if value.is_empty() {
        return Err(invalid(format!("{field} is empty")));
    }
    if value.len() > MAX_NAME_LEN {
        return Err(invalid(format!(
            "{field} is {} bytes long; at most {MAX_NAME_LEN}",
            value.len()
        )));
    }
    Ok(())
}

fn check_key_hash(hash: &[u8]) -> Result<(), Status> {
    if hash.len() != 32 {
        return Err(invalid(format!(
            "key_sha256 must be the 32-byte SHA-256 of the virtual key, got {} bytes",
            hash.len()
        )));
    }
    Ok(())
}

/// A bucket of a request, checked.
struct Spec<'a> {
    id: &'a str,
    refill: Refill,
    limit: i64,
    utc_offset_min: i32,
}

impl<'a> Spec<'a> {
    fn of(bucket: Option<&'a Bucket>, at: &str) -> Result<Spec<'a>, Status> {
        let b = bucket.ok_or_else(|| invalid(format!("{at}.bucket is missing")))?;
        check_name(&format!("{at}.bucket.id"), &b.id)?;
        let refill = match Refill::try_from(b.refill) {
            Ok(r @ (Refill::PerMinute | Refill::Day | Refill::Month)) => r,
            _ => {
                return Err(invalid(format!(
                    "{at}.bucket '{}': refill must be PER_MINUTE, DAY or MONTH, got {}",
                    b.id, b.refill
                )))
            }
        };
        if b.limit <= 0 || b.limit > MAX_EXACT {
            return Err(invalid(format!(
                "{at}.bucket '{}': limit {} must be between 1 and 2^53",
                b.id, b.limit
            )));
        }
        if b.utc_offset_min.abs() > MAX_OFFSET_MIN {
            return Err(invalid(format!(
                "{at}.bucket '{}': utc_offset_min {} is more than a day from UTC",
                b.id, b.utc_offset_min
            )));
        }
        Ok(Spec {
            id: &b.id,
            refill,
            limit: b.limit,
            utc_offset_min: b.utc_offset_min,
        })
    }

    /// One call takes a bucket once: all-or-nothing admission checks every
    /// bucket before it charges any.
    fn unique(&self, seen: &mut HashSet<&'a str>, at: &str) -> Result<(), Status> {
        if seen.insert(self.id) {
            Ok(())
        } else {
            Err(invalid(format!(
                "{at}.bucket '{}' appears twice in one call",
                self.id
            )))
        }
    }

    /// The bucket's script arguments: refill kind, limit, offset.
    fn args<'c>(&self, cmd: &'c mut redis::Cmd) -> &'c mut redis::Cmd {
        cmd.arg(self.refill as i32)
            .arg(self.limit)
            .arg(self.utc_offset_min)
    }
}

/// `outcome refused wait_ms now_ms` then `remaining reset_at` per bucket.
fn parse_admit(reply: &str) -> Option<AdmitResponse> {
    let mut f = reply.split_ascii_whitespace();
    let outcome = match f.next()? {
        "1" => Outcome::Admitted,
        "2" => Outcome::Limited,
        "3" => Outcome::Revoked,
        _ => return None,
    };
    let refused = f.next()?.parse().ok()?;
    let wait_ms = f.next()?.parse().ok()?;
    let now_ms = f.next()?.parse().ok()?;
    let rest: Vec<&str> = f.collect();
    let views = rest
        .chunks(2)
        .map(|pair| match pair {
            [remaining, reset] => Some(BucketView {
                remaining: remaining.parse().ok()?,
                reset_at_ms: reset.parse().ok()?,
            }),
            _ => None,
        })
        .collect::<Option<Vec<_>>>()?;
    Some(AdmitResponse {
        outcome: outcome.into(),
        refused,
        wait_ms,
        views,
        now_ms,
    })
}

/// `lease expires_at remaining reset_at window`.
fn parse_grant(reply: &str) -> Option<Grant> {
    let mut f = reply.split_ascii_whitespace();
    let lease = f.next()?.parse().ok()?;
    let expires_at_ms = f.next()?.parse().ok()?;
    let remaining = f.next()?.parse().ok()?;
    let reset_at_ms = f.next()?.parse().ok()?;
    let window = f.next()?.parse().ok()?;
    Some(Grant {
        lease,
        expires_at_ms,
        view: Some(BucketView {
            remaining,
            reset_at_ms,
        }),
        window,
    })
}

#[tonic::async_trait]
impl Quota for QuotaService {
    async fn admit(
        &self,
        request: Request<AdmitRequest>,
    ) -> Result<Response<AdmitResponse>, Status> {
        QuotaService::admit(self, request.into_inner())
            .await
            .map(Response::new)
    }

    async fn settle(
        &self,
        request: Request<SettleRequest>,
    ) -> Result<Response<SettleResponse>, Status> {
        QuotaService::settle(self, request.into_inner())
            .await
            .map(Response::new)
    }

    async fn sync(&self, request: Request<SyncRequest>) -> Result<Response<SyncResponse>, Status> {
        QuotaService::sync(self, request.into_inner())
            .await
            .map(Response::new)
    }

    async fn revoke(
        &self,
        request: Request<RevokeRequest>,
    ) -> Result<Response<RevokeResponse>, Status> {
        QuotaService::revoke(self, request.into_inner())
            .await
            .map(Response::new)
    }
}

/// Serves `tollgate.quota.v1.Quota` on `listener` until `shutdown`
/// resolves, then lets calls in flight finish.
pub async fn serve(
    listener: TcpListener,
    service: QuotaService,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), Error> {
    // Admit sits on a request's critical path: no Nagle delay on replies.
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    tonic::transport::Server::builder()
        .add_service(QuotaServer::new(service))
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
        .map_err(Error::Serve)
}

#[cfg(test)]
mod throttle_tests {
    use super::*;

    #[test]
    fn an_outage_logs_a_line_per_period_with_what_it_left_out() {
        let t = Throttle::new(Duration::from_millis(200));
        assert_eq!(t.due(), Some(None), "the first failure is said at once");
        assert_eq!((t.due(), t.due()), (None, None));
        std::thread::sleep(Duration::from_millis(250));
        assert_eq!(t.due(), Some(Some(2)), "then once a period, with the count");
        assert_eq!(t.due(), None);
    }
}
