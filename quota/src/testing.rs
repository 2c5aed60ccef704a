//! Test support, public so the end-to-end harness can reuse it:
//! [`RedisServer`] (a throwaway `redis-server` per test), [`ManualClock`]
//! (scripts that read the time from the test instead of Redis `TIME`), and
//! read-only views of what the scripts store.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tollgate_proto::quota::v1::Refill;

use crate::scripts::{inspect_script, keys, window_script, Lua};

/// Debian's `redis-server` on a free loopback port, without persistence
/// (`--save '' --appendonly no`), killed on drop.
pub struct RedisServer {
    child: Child,
    port: u16,
    log: PathBuf,
}

impl RedisServer {
    /// Starts one on a free port and waits until it answers PING.
    pub fn start() -> std::io::Result<RedisServer> {
        let mut last = None;
        // The free port is only free when asked: another process may take it
        // before redis-server binds, so try a few.
        for _ in 0..5 {
            let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
            match RedisServer::start_on(port) {
                Ok(server) => return Ok(server),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(e),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| std::io::Error::other("redis-server did not start")))
    }

    /// Starts one on `port` (e.g. the port of a server just dropped, to
    /// restart Redis empty under a running service).
    pub fn start_on(port: u16) -> std::io::Result<RedisServer> {
        let binary = locate(std::env::var_os("PATH"))?;
        let log =
            std::env::temp_dir().join(format!("tollgate-redis-{port}-{}.log", std::process::id()));
        let child = Command::new(binary)
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .args(["--daemonize", "no", "--logfile"])
            .arg(&log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        let mut server = RedisServer { child, port, log };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if ping(port) {
                return Ok(server);
            }
            if let Ok(Some(status)) = server.child.try_wait() {
                return Err(std::io::Error::other(format!(
                    "redis-server on port {port} exited ({status}): {}",
                    server.log_text()
                )));
            }
            if Instant::now() > deadline {
                return Err(std::io::Error::other(format!(
                    "redis-server on port {port} did not answer PING within 10 s: {}",
                    server.log_text()
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `redis://127.0.0.1:<port>/`
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    pub fn client(&self) -> redis::RedisResult<redis::Client> {
        redis::Client::open(self.url())
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.log);
    }
}

/// `redis-server` in one of the directories of `path` (a PATH value).
fn locate(path: Option<std::ffi::OsString>) -> std::io::Result<PathBuf> {
    path.iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join("redis-server"))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "redis-server not found on PATH: install Debian's redis-server (`make redis`)",
            )
        })
}

fn ping(port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
    let mut buf = [0u8; 7];
    s.write_all(b"PING\r\n").is_ok() && s.read_exact(&mut buf).is_ok() && &buf == b"+PONG\r\n"
}

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_redis_server_is_named_with_the_fix() {
        let err = locate(Some("/nonexistent:/also-not-here".into())).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::NotFound);
        assert_eq!(
            err.to_string(),
            "redis-server not found on PATH: install Debian's redis-server (`make redis`)"
        );
        assert!(locate(None).is_err());
    }

    #[test]
    fn finds_redis_server_on_path() {
        // `make redis` installs it in /usr/bin.
        let found = locate(std::env::var_os("PATH")).unwrap();
        assert!(found.ends_with("redis-server"), "{}", found.display());
    }
}
