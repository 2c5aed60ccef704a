//! A local `redis-server` from the system package (Debian's here), for
//! `tollgate run --redis embedded` and for tests: on a free loopback port,
//! without persistence (`--save '' --appendonly no`: per-minute buckets need
//! none, and calendar windows can be rebuilt from the audit store), killed
//! when dropped and, on Linux, when this process dies.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Debian's `redis-server` on a free loopback port, without persistence
/// (`--save '' --appendonly no`), killed on drop.
pub struct RedisServer {
    child: Child,
    port: u16,
    /// A second port that speaks only TLS ([`RedisServer::start_tls`]).
    tls_port: Option<u16>,
    log: PathBuf,
    remove_log: bool,
}

/// The files of a TLS listener: the server's certificate chain and key
/// (PEM), and the CA it names for client certificates (not required).
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

impl RedisServer {
    /// Starts one on a free port and waits until it answers PING.
    pub fn start() -> std::io::Result<RedisServer> {
        RedisServer::on_free_ports(RedisServer::start_on)
    }

    /// Runs `start` on a free port until it works: the free port is only
    /// free when asked, and another process may take it before
    /// redis-server binds, so a few are tried.
    fn on_free_ports(
        start: impl Fn(u16) -> std::io::Result<RedisServer>,
    ) -> std::io::Result<RedisServer> {
        let mut last = None;
        for _ in 0..5 {
            let port = free_port()?;
            match start(port) {
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
        RedisServer::spawn(port, temp_log(port), true, None)
    }

    /// Starts one that also listens for TLS (`rediss://`, [`Self::tls_url`])
    /// on a second free port, with the certificate in `tls`.
    pub fn start_tls(tls: &TlsFiles) -> std::io::Result<RedisServer> {
        RedisServer::on_free_ports(|port| {
            RedisServer::spawn(port, temp_log(port), true, Some((free_port()?, tls)))
        })
    }

    /// Starts one on a free port that logs to `log` (kept after it stops).
    pub fn start_logging_to(log: &Path) -> std::io::Result<RedisServer> {
        RedisServer::on_free_ports(|port| RedisServer::spawn(port, log.to_path_buf(), false, None))
    }

    fn spawn(
        port: u16,
        log: PathBuf,
        remove_log: bool,
        tls: Option<(u16, &TlsFiles)>,
    ) -> std::io::Result<RedisServer> {
        let binary = locate(std::env::var_os("PATH"))?;
        let mut command = Command::new(binary);
        if let Some((tls_port, files)) = tls {
            command
                .args(["--tls-port", &tls_port.to_string()])
                .arg("--tls-cert-file")
                .arg(&files.cert)
                .arg("--tls-key-file")
                .arg(&files.key)
                .arg("--tls-ca-cert-file")
                .arg(&files.ca)
                .args(["--tls-auth-clients", "no"]);
        }
        // SAFETY: prctl is async-signal-safe; it makes the kernel stop
        // redis-server if this process dies without cleaning up.
        unsafe {
            command.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                Ok(())
            });
        }
        let child = command
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .args(["--daemonize", "no", "--logfile"])
            .arg(&log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        let mut server = RedisServer {
            child,
            port,
            tls_port: tls.map(|(p, _)| p),
            log,
            remove_log,
        };
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

    /// `rediss://127.0.0.1:<TLS port>/` when started with
    /// [`Self::start_tls`] (its certificate must name 127.0.0.1).
    pub fn tls_url(&self) -> Option<String> {
        self.tls_port.map(|p| format!("rediss://127.0.0.1:{p}/"))
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
        if self.remove_log {
            let _ = std::fs::remove_file(&self.log);
        }
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

/// The log of a server a test starts, removed when it stops.
fn temp_log(port: u16) -> PathBuf {
    std::env::temp_dir().join(format!("tollgate-redis-{port}-{}.log", std::process::id()))
}

/// A loopback port nothing listens on now.
fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn ping(port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
    let mut buf = [0u8; 7];
    s.write_all(b"PING\r\n").is_ok() && s.read_exact(&mut buf).is_ok() && &buf == b"+PONG\r\n"
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
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
