//! The local gateway (`tollgate run`): renders Envoy's configuration into a
//! state directory, starts the audit collector (and the mock provider) in
//! this process, starts the pinned real Envoy with tollgate.wasm, reloads
//! the policy on edits, and stops everything in order.
//!
//! - [`render`]: the bootstrap, ECDS and SDS files from `envoy/` templates;
//! - [`envoy`]: the Envoy child process;
//! - [`reload`]: the policy file watch;
//! - the audit file log's rotation (`crate::audit_log`), on the same tick.
//!
//! [`start`] returns a [`Running`] gateway once Envoy answers;
//! [`Running::serve`] supervises it until a shutdown signal. [`render_only`]
//! writes the same files for an Envoy started elsewhere.

mod envoy;
mod failover;
pub mod reload;
pub mod render;

use crate::audit_log::{self, Rotation};
use crate::audit_service;
use crate::collector::auth::WriteToken;
use crate::collector::store::AuditStore;
use crate::key_service::{self, KeyTable};
use crate::shared_store::{self, Redis, RedisAt};
use crate::shutdown::Stop;
use crate::{atomic_file, policy_file};
use anyhow::{bail, Context, Result};
use render::{Gateway, JwtProvider, Layout, ListenerTls, Upstream, VmOptions};
use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::process::Child;
use tokio::task::JoinHandle;

/// What every gateway needs, whoever runs Envoy.
#[derive(Debug, Clone)]
pub struct Options {
    /// Policy file (JSON), watched for edits.
    pub policy: PathBuf,
    /// Where clients connect (port 0 picks a free port).
    pub listen: SocketAddr,
    /// Envoy's admin interface (port 0 picks a free port).
    pub admin: SocketAddr,
    /// Rendered config, secrets, audit database and logs.
    pub state_dir: PathBuf,
    /// The filter module.
    pub wasm: PathBuf,
    /// Largest request body buffered for a decision (bytes).
    pub body_limit: u64,
    /// How often Envoy flushes audit records to the collector (ms).
    pub audit_flush_ms: u64,
    /// When the audit file log is rotated, and how many rotated files stay.
    pub audit_log: Rotation,
    /// The in-process collector's retention (days); `None` keeps everything.
    pub audit_retain_days: Option<u32>,
    /// Where the in-process collector posts alert events (it watches the
    /// policy's `alerts` either way).
    pub alert_webhook: Option<String>,
    /// Seconds without a byte either way before Envoy cuts a request off.
    pub stream_idle_timeout_s: u64,
    /// Limits shared by every replica through a shared store; `None`: in
    /// this Envoy alone.
    pub shared: Option<Shared>,
    /// TLS, and client certificates (mTLS), on the listener.
    pub listener_tls: Option<ListenerTls>,
    /// JWTs verified by Envoy's jwt_authn before the filter.
    pub jwt: Option<JwtProvider>,
    /// The write token of an external collector (`--collector-token-file`);
    /// the in-process collector gets a fresh one at each start.
    pub collector_token: Option<String>,
}

/// Limits shared by every Envoy replica (`docs/scale-out.md`).
#[derive(Debug, Clone)]
pub struct Shared {
    pub quota: QuotaAt,
    /// How often each Envoy syncs its leases (ms).
    pub sync_period_ms: u64,
}

/// Where the quota service is.
#[derive(Debug, Clone)]
pub enum QuotaAt {
    /// Started in this process on `listen`, in front of `redis`.
    InProcess { redis: Redis, listen: SocketAddr },
    /// Replicas running elsewhere (`tollgate quota`): host and port each.
    External(Vec<(String, u16)>),
}

/// How the Envoy child runs.
#[derive(Debug, Clone)]
pub struct EnvoyOptions {
    /// Envoy binary; `None` for the project's pinned one, else PATH.
    pub binary: Option<PathBuf>,
    pub concurrency: u32,
    pub log_level: String,
}

/// Where audit records go.
#[derive(Debug, Clone)]
pub enum Collector {
    /// A collector in this process, on these gRPC and HTTP listeners.
    InProcess { grpc: SocketAddr, http: SocketAddr },
    /// A collector running elsewhere (`tollgate collector`): host and port.
    External(String, u16),
}

/// Where provider traffic goes.
#[derive(Debug, Clone)]
pub enum Providers {
    /// Provider URLs; the real keys: `anthropic_keys` (in failover order,
    /// at least one) and `OPENAI_API_KEY`.
    Remote {
        anthropic: Upstream,
        openai: Upstream,
        anthropic_keys: Vec<String>,
    },
    /// The mock provider in this process, which expects its default keys,
    /// or these Anthropic keys (in failover order).
    #[cfg(feature = "mock")]
    Mock {
        listen: SocketAddr,
        event_delay_ms: u64,
        anthropic_keys: Option<Vec<String>>,
    },
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
    quota: Vec<String>,
    redis: Option<String>,
}

/// Files and addresses of a started gateway; its `Display` is the banner.
pub struct Summary {
    pub policy: PathBuf,
    pub keys: usize,
    pub listen: SocketAddr,
    pub admin: SocketAddr,
    pub collector: (String, u16),
    pub collector_http: Option<SocketAddr>,
    pub mock: Option<SocketAddr>,
    pub anthropic: Upstream,
    /// How many Anthropic keys Envoy fails over across (1: no failover).
    pub anthropic_keys: usize,
    pub openai: Upstream,
    pub layout: Layout,
    /// The quota service's replicas and Redis, with a shared store.
    pub quota: Vec<(String, u16)>,
    pub redis: Option<String>,
    /// Whether the listener serves TLS.
    pub tls: bool,
}

/// A gateway whose Envoy answers; [`Running::serve`] supervises it.
pub struct Running {
    pub summary: Summary,
    envoy: Child,
    watch: reload::PolicyWatch,
    /// Stops the in-process collector, quota service and mock provider.
    stop: Stop,
    collector: Option<JoinHandle<Result<()>>>,
    /// The key service Envoy fetches the key table from.
    keys_task: Option<JoinHandle<Result<()>>>,
    quota: Option<QuotaRunning>,
    rotation: Rotation,
    /// When the audit file log was renamed and Envoy has not reopened it
    /// yet: asked again each second until the new file appears.
    reopen_asked: Option<std::time::Instant>,
}

/// The in-process quota service and the Redis it may have started.
struct QuotaRunning {
    task: JoinHandle<Result<()>>,
    /// Stops an embedded redis-server when dropped (after the service).
    _redis: RedisAt,
}

/// The audit collector as the bootstrap addresses it.
struct CollectorAt {
    addr: (String, u16),
    http: Option<SocketAddr>,
    task: Option<JoinHandle<Result<()>>>,
}

/// Upstreams and the real keys Envoy injects for them.
struct ProvidersAt {
    anthropic: Upstream,
    openai: Upstream,
    mock: Option<SocketAddr>,
    /// In failover order; never empty.
    anthropic_keys: Vec<String>,
    openai_key: String,
}

/// Validates the policy, starts the collector and providers, renders the
/// configuration and starts Envoy; returns once Envoy answers.
pub async fn start(
    opts: Options,
    envoy_opts: EnvoyOptions,
    collector: Collector,
    providers: Providers,
) -> Result<Running> {
    let wasm = find_wasm(&opts.wasm)?;
    let layout = create_layout(&opts.state_dir)?;
    // The whole policy is checked while Envoy starts (at 100,000 keys the
    // checks take ~0.4 s, Envoy ~0.8 s): Envoy gets the policy without its
    // keys at once (its filter checks that part itself), the key table only
    // once every check passed. A policy that fails stops everything.
    let document = policy_file::read(&opts.policy)
        .document()
        .map_err(|errors| policy_errors(&opts.policy, Some(errors)))?;
    let document = std::sync::Arc::new(document);
    let checking = {
        let document = document.clone();
        tokio::task::spawn_blocking(move || document.check())
    };
    // The keys' part, for the key table, is parsed beside Envoy's start;
    // the rest first, for Envoy's filter configuration.
    let parsing = {
        let document = document.clone();
        tokio::task::spawn_blocking(move || document.parse())
    };
    let base = {
        let document = document.clone();
        tokio::task::spawn_blocking(move || document.parse_base()).await?
    };
    let base = match base {
        Ok(base) => base,
        // Not even JSON: the checks say where, with every other error.
        Err(_) => return Err(policy_errors(&opts.policy, checking.await?.err())),
    };
    let stop = Stop::new();
    // Collector first: Envoy connects to it as soon as it starts.
    // The write token: Envoy sends it with its access-log stream; log
    // shippers read it from the state directory.
    let token = match &collector {
        Collector::InProcess { .. } => {
            let token = WriteToken::generate();
            atomic_file::write(&layout.collector_token(), &token, 0o600)?;
            Some(token)
        }
        Collector::External(..) => opts.collector_token.clone(),
    };
    let upkeep = audit_service::Upkeep {
        retain_days: opts.audit_retain_days,
        policy: Some(opts.policy.clone()),
        alert_webhook: opts.alert_webhook.clone(),
        write_token: token.as_deref().map(WriteToken::new).unwrap_or_default(),
        // This process serves the key table itself, on its own listener.
        serve_keys: false,
    };
    let collector = start_collector(collector, &layout, upkeep, &stop).await?;
    // The keys travel as a table from this process, not in Envoy's
    // filter configuration (`docs/keys-at-scale.md`).
    let keys = KeyTable::empty();
    let (keys_at, keys_task) =
        key_service::serve(keys.clone(), KEYS_LISTEN.into(), stop.stopped()).await?;
    let (quota_at, quota) = start_quota(opts.shared.as_ref(), &layout, &stop).await?;
    let providers = start_providers(providers, &stop).await?;
    let (listen, admin) = (free_port(opts.listen)?, free_port(opts.admin)?);
    let gateway = Gateway {
        collector_token: token,
        keys: Some(keys_at),
        ..gateway(&opts, listen, admin, &collector.addr, &providers, &quota_at)
    };
    let vm = VmOptions {
        keys: Some(render::KEYS_CLUSTER.to_string()),
        ..vm_options(&opts)
    };
    let configured = base.to_string();
    write_config(&layout, &configured, &wasm, &vm, &gateway, &providers)?;

    let binary = envoy::binary(envoy_opts.binary);
    let mut child = envoy::spawn(
        &binary,
        &layout,
        envoy_opts.concurrency,
        &envoy_opts.log_level,
    )?;
    // Ready once every check passed, Envoy answers and has the key table.
    let ready = async {
        let key_count = match checking.await? {
            Ok(n) => n,
            Err(errors) => return Err(policy_errors(&opts.policy, Some(errors))),
        };
        let doc = parsing
            .await?
            .map_err(|errors| policy_errors(&opts.policy, Some(errors)))?;
        let table = keys.clone();
        tokio::task::spawn_blocking(move || table.update(&doc)).await?;
        envoy::wait_ready(&mut child, admin, listen, &layout).await?;
        keys.confirmed(KEYS_LOAD_TIMEOUT).await?;
        Ok(key_count)
    };
    let key_count = match ready.await {
        Ok(n) => n,
        Err(e) => {
            stop.stop();
            let _ = child.kill().await;
            return Err(e);
        }
    };
    let summary = Summary {
        policy: opts.policy.clone(),
        keys: key_count,
        listen,
        admin,
        collector: collector.addr,
        collector_http: collector.http,
        mock: providers.mock,
        anthropic: providers.anthropic,
        anthropic_keys: providers.anthropic_keys.len(),
        openai: providers.openai,
        layout: layout.clone(),
        redis: quota.as_ref().map(|q| q._redis.url.clone()),
        quota: quota_at,
        tls: opts.listener_tls.is_some(),
    };
    write_ready(&summary, child.id())?;
    Ok(Running {
        summary,
        watch: reload::PolicyWatch::new(&opts.policy, configured, &wasm, vm, &layout, Some(keys)),
        keys_task: Some(keys_task),
        envoy: child,
        stop,
        collector: collector.task,
        quota,
        rotation: opts.audit_log,
        reopen_asked: None,
    })
}

fn vm_options(opts: &Options) -> VmOptions {
    VmOptions {
        hold_request_headers: true,
        shared: opts.shared.as_ref().map(|s| render::SharedVm {
            cluster: render::QUOTA_CLUSTER.to_string(),
            sync_period_ms: s.sync_period_ms,
        }),
        keys: None,
    }
}

/// How long `tollgate run` waits for Envoy to load the key table once it
/// answers: a 100,000-key table loads in well under a second.
const KEYS_LOAD_TIMEOUT: Duration = Duration::from_secs(60);

/// The key service listens where only this host's Envoy reaches it.
const KEYS_LISTEN: ([u8; 4], u16) = ([127, 0, 0, 1], 0);

/// The quota service's replicas as Envoy addresses them, starting Redis
/// (embedded) and the service in this process when asked.
async fn start_quota(
    shared: Option<&Shared>,
    layout: &Layout,
    stop: &Stop,
) -> Result<(Vec<(String, u16)>, Option<QuotaRunning>)> {
    let Some(shared) = shared else {
        return Ok((Vec::new(), None));
    };
    let (redis, listen) = match &shared.quota {
        QuotaAt::External(replicas) => return Ok((replicas.clone(), None)),
        QuotaAt::InProcess { redis, listen } => (redis, *listen),
    };
    let redis = shared_store::redis(redis, &layout.dir.join("redis.log"))?;
    let (addr, task) = shared_store::start_quota(
        listen,
        &redis.url,
        shared_store::settings(shared.sync_period_ms),
        stop.stopped(),
    )
    .await?;
    Ok((
        vec![(addr.ip().to_string(), addr.port())],
        Some(QuotaRunning {
            task,
            _redis: redis,
        }),
    ))
}

/// Waits up to `secs` for a service's task to end, and says how it ended
/// if not cleanly.
async fn stopped(name: &str, verb: &str, task: JoinHandle<Result<()>>, secs: u64) {
    match tokio::time::timeout(Duration::from_secs(secs), task).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => eprintln!("{name}: {e:#}"),
        Ok(Err(e)) => eprintln!("{name} task: {e}"),
        Err(_) => eprintln!("{name} did not {verb} within {secs}s"),
    }
}

impl Running {
    /// Runs until `shutdown` resolves or Envoy exits, applying policy edits;
    /// then stops Envoy, the mock and the collector, in that order.
    pub async fn serve(mut self, shutdown: impl Future<Output = ()>) -> Result<()> {
        let result = self.supervise(shutdown).await;
        // Envoy first: its last access-log entries still reach the collector,
        // which then ends the streams and saves its queue.
        envoy::stop(&mut self.envoy).await;
        self.stop.stop();
        if let Some(task) = self.collector.take() {
            stopped("collector", "flush", task, 10).await;
        }
        if let Some(task) = self.keys_task.take() {
            stopped("key service", "stop", task, 5).await;
        }
        if let Some(quota) = self.quota.take() {
            stopped("quota service", "stop", quota.task, 5).await;
        }
        let _ = std::fs::remove_file(self.summary.layout.ready());
        result
    }

    async fn supervise(&mut self, shutdown: impl Future<Output = ()>) -> Result<()> {
        tokio::pin!(shutdown);
        let mut tick = tokio::time::interval(reload::EVERY);
        loop {
            tokio::select! {
                _ = &mut shutdown => return Ok(()),
                e = envoy::exited(&mut self.envoy, &self.summary.layout) => return Err(e),
                _ = tick.tick() => {
                    self.watch.poll()?;
                    self.rotate_audit_log().await;
                }
            }
        }
    }

    /// Rotates the audit file log once it reaches its size: renames it and
    /// asks Envoy to reopen it (Envoy writes to the renamed file until then,
    /// so no line is lost). Failures are reported and retried, never fatal:
    /// the file only grows meanwhile.
    async fn rotate_audit_log(&mut self) {
        let live = self.summary.layout.audit_log();
        if let Some(asked) = self.reopen_asked {
            if live.exists() {
                self.reopen_asked = None;
            } else if asked.elapsed() >= Duration::from_secs(1) {
                self.reopen_logs().await;
            }
            return;
        }
        if !audit_log::due(&live, self.rotation) {
            return;
        }
        match audit_log::rotate(&live, self.rotation.keep) {
            Ok(true) => self.reopen_logs().await,
            Ok(false) => {}
            Err(e) => eprintln!("warning: rotating {} failed: {e}", live.display()),
        }
    }

    async fn reopen_logs(&mut self) {
        self.reopen_asked = Some(std::time::Instant::now());
        if let Err(e) = envoy::admin_post(self.summary.admin, "/reopen_logs").await {
            eprintln!("warning: asking Envoy to reopen its access logs failed: {e:#}");
        }
    }
}

/// What [`render_only`] wrote.
pub struct Rendered {
    pub layout: Layout,
    pub listen: SocketAddr,
    pub collector: (String, u16),
}

/// Writes the configuration for an Envoy started elsewhere (Docker
/// Compose) that mounts the state directory at the same path: bootstrap,
/// ECDS policy, SDS secrets and a copy of the module beside them.
pub fn render_only(
    opts: Options,
    collector: (String, u16),
    anthropic: (Upstream, Vec<String>),
    openai: Upstream,
) -> Result<Rendered> {
    let (policy, wasm, layout) = prepare(&opts)?;
    let providers = remote(anthropic, openai);
    let copy = layout.dir.join("tollgate.wasm");
    if copy != wasm {
        std::fs::copy(&wasm, &copy)
            .with_context(|| format!("copying the filter to {}", copy.display()))?;
    }
    let (listen, admin) = (free_port(opts.listen)?, free_port(opts.admin)?);
    let quota = match opts.shared.as_ref().map(|s| &s.quota) {
        Some(QuotaAt::External(replicas)) => replicas.clone(),
        Some(QuotaAt::InProcess { .. }) => {
            bail!("--render-only runs no quota service: pass --quota HOST:PORT (a `tollgate quota` elsewhere)")
        }
        None => Vec::new(),
    };
    let gateway = gateway(&opts, listen, admin, &collector, &providers, &quota);
    write_config(
        &layout,
        &policy.json,
        &copy,
        &vm_options(&opts),
        &gateway,
        &providers,
    )?;
    Ok(Rendered {
        layout,
        listen,
        collector,
    })
}

/// What is checked before anything starts: a valid policy, the filter
/// module, the state directory.
fn prepare(opts: &Options) -> Result<(policy_file::Loaded, PathBuf, Layout)> {
    let policy = load_policy(&opts.policy)?;
    let wasm = find_wasm(&opts.wasm)?;
    let layout = create_layout(&opts.state_dir)?;
    Ok((policy, wasm, layout))
}

fn load_policy(path: &Path) -> Result<policy_file::Loaded> {
    policy_file::load(path).map_err(|errors| policy_errors(path, Some(errors)))
}

/// Each error on stderr, then one error saying how many.
fn policy_errors(path: &Path, errors: Option<Vec<String>>) -> anyhow::Error {
    let errors = errors.unwrap_or_default();
    for e in &errors {
        eprintln!("error: {e}");
    }
    anyhow::anyhow!(
        "policy {} has {} error(s); nothing started",
        path.display(),
        errors.len()
    )
}

fn find_wasm(path: &Path) -> Result<PathBuf> {
    std::fs::canonicalize(path).with_context(|| {
        format!(
            "filter module {} not found (build it with `make build`)",
            path.display()
        )
    })
}

fn create_layout(state_dir: &Path) -> Result<Layout> {
    std::fs::create_dir_all(state_dir)
        .with_context(|| format!("creating {}", state_dir.display()))?;
    Ok(Layout {
        dir: std::fs::canonicalize(state_dir)?,
    })
}

/// A fixed address as is; port 0 resolved to a free port now, because the
/// address goes into the bootstrap before Envoy binds it. The port is
/// picked below the kernel's ephemeral range (32768 and up on Linux):
/// between this check and Envoy's bind, an outgoing connection of any
/// process may take a port from that range, never from below it.
fn free_port(addr: SocketAddr) -> Result<SocketAddr> {
    if addr.port() != 0 {
        return Ok(addr);
    }
    for _ in 0..64 {
        let port = rand::random_range(20_000..32_768);
        if let Ok(l) = std::net::TcpListener::bind(SocketAddr::new(addr.ip(), port)) {
            return Ok(l.local_addr()?);
        }
    }
    let l = std::net::TcpListener::bind(addr).with_context(|| format!("binding {addr}"))?;
    Ok(l.local_addr()?)
}

/// The in-process collector, after importing the file access log so the
/// records the gRPC stream lost while no collector listened are recovered.
async fn start_collector(
    collector: Collector,
    layout: &Layout,
    upkeep: audit_service::Upkeep,
    stop: &Stop,
) -> Result<CollectorAt> {
    let (grpc, http) = match collector {
        Collector::External(host, port) => {
            return Ok(CollectorAt {
                addr: (host, port),
                http: None,
                task: None,
            })
        }
        Collector::InProcess { grpc, http } => (grpc, http),
    };
    // On a blocking thread: store clients may block on a runtime of their own.
    let (db, log) = (layout.audit_db(), layout.audit_log());
    let store = tokio::task::spawn_blocking(move || -> Result<AuditStore> {
        let store = AuditStore::open(&db)?;
        audit_service::import_at_start(&store, &log);
        Ok(store)
    })
    .await??;
    let grpc = TcpListener::bind(grpc)
        .await
        .with_context(|| format!("binding collector {grpc}"))?;
    let http = TcpListener::bind(http)
        .await
        .with_context(|| format!("binding collector http {http}"))?;
    let local = grpc.local_addr()?;
    let http_addr = http.local_addr()?;
    let task = tokio::spawn(audit_service::serve(
        grpc,
        http,
        store,
        upkeep,
        stop.stopped(),
    ));
    Ok(CollectorAt {
        addr: (local.ip().to_string(), local.port()),
        http: Some(http_addr),
        task: Some(task),
    })
}

// Without the mock, nothing of the providers' runs in this process to stop.
#[cfg_attr(not(feature = "mock"), allow(unused_variables))]
async fn start_providers(providers: Providers, stop: &Stop) -> Result<ProvidersAt> {
    match providers {
        Providers::Remote {
            anthropic,
            openai,
            anthropic_keys,
        } => Ok(remote((anthropic, anthropic_keys), openai)),
        #[cfg(feature = "mock")]
        Providers::Mock {
            listen,
            event_delay_ms,
            anthropic_keys,
        } => start_mock(listen, event_delay_ms, anthropic_keys, stop).await,
    }
}

/// The mock provider on `listen`, expecting its default keys (or the
/// given Anthropic keys, every one of a failover).
#[cfg(feature = "mock")]
async fn start_mock(
    listen: SocketAddr,
    event_delay_ms: u64,
    anthropic_keys: Option<Vec<String>>,
    stop: &Stop,
) -> Result<ProvidersAt> {
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding mock provider {listen}"))?;
    let addr = listener.local_addr()?;
    let mut config = tollgate_mock::MockConfig::with_default_keys(event_delay_ms);
    if let Some((first, rest)) = anthropic_keys.as_deref().and_then(<[String]>::split_first) {
        config.anthropic_key = first.clone();
        config.failover_anthropic_keys = rest.to_vec();
    }
    let mut keys = vec![config.anthropic_key.clone()];
    keys.extend(config.failover_anthropic_keys.iter().cloned());
    let openai_key = config.openai_key.clone();
    tokio::spawn(tollgate_mock::serve(listener, config, stop.stopped()));
    Ok(ProvidersAt {
        anthropic: Upstream::local(addr.port()),
        openai: Upstream::local(addr.port()),
        mock: Some(addr),
        anthropic_keys: keys,
        openai_key,
    })
}

/// Real providers: their keys from the environment, never the policy.
fn remote((anthropic, anthropic_keys): (Upstream, Vec<String>), openai: Upstream) -> ProvidersAt {
    let openai_key = std::env::var("OPENAI_API_KEY").unwrap_or_default();
    if openai_key.is_empty() {
        eprintln!(
            "warning: OPENAI_API_KEY is not set: OpenAI routes will be refused by the provider"
        );
    }
    ProvidersAt {
        anthropic,
        openai,
        mock: None,
        anthropic_keys: if anthropic_keys.is_empty() {
            vec![String::new()]
        } else {
            anthropic_keys
        },
        openai_key,
    }
}

fn gateway(
    opts: &Options,
    listen: SocketAddr,
    admin: SocketAddr,
    collector: &(String, u16),
    providers: &ProvidersAt,
    quota: &[(String, u16)],
) -> Gateway {
    Gateway {
        listen,
        admin_port: admin.port(),
        collector: collector.clone(),
        anthropic: providers.anthropic.clone(),
        anthropic_keys: providers.anthropic_keys.len(),
        openai: providers.openai.clone(),
        body_limit_bytes: opts.body_limit,
        audit_flush_interval_ms: opts.audit_flush_ms,
        stream_idle_timeout_s: opts.stream_idle_timeout_s,
        ca_bundle: PathBuf::from("/etc/ssl/certs/ca-certificates.crt"),
        quota: quota.to_vec(),
        listener_tls: opts.listener_tls.clone(),
        jwt: opts.jwt.clone(),
        collector_token: opts.collector_token.clone(),
        keys: None,
    }
}

/// Secrets (0600: they hold the real keys), then the ECDS policy, then the
/// bootstrap that references both.
fn write_config(
    layout: &Layout,
    policy_json: &str,
    wasm: &Path,
    vm: &VmOptions,
    gateway: &Gateway,
    providers: &ProvidersAt,
) -> Result<()> {
    for (i, key) in providers.anthropic_keys.iter().enumerate() {
        let (file, name) = failover::anthropic_secret(i);
        atomic_file::write(&layout.secret(&file), &render::secret(&name, key)?, 0o600)?;
    }
    atomic_file::write(
        &layout.secret("openai"),
        &render::secret(
            "openai_api_key",
            &format!("Bearer {}", providers.openai_key),
        )?,
        0o600,
    )?;
    atomic_file::write(&layout.ecds(), &render::ecds(policy_json, wasm, vm)?, 0o644)?;
    atomic_file::write(
        &layout.bootstrap(),
        &render::bootstrap(gateway, layout)?,
        0o644,
    )
}

fn write_ready(s: &Summary, envoy_pid: Option<u32>) -> Result<()> {
    let ready = Ready {
        listen: s.listen.to_string(),
        admin: s.admin.to_string(),
        collector: format!("{}:{}", s.collector.0, s.collector.1),
        collector_http: s.collector_http.map(|a| a.to_string()),
        mock: s.mock.map(|a| a.to_string()),
        audit_db: s.layout.audit_db().display().to_string(),
        audit_log: s.layout.audit_log().display().to_string(),
        envoy_pid,
        quota: s.quota.iter().map(|(h, p)| format!("{h}:{p}")).collect(),
        redis: s.redis.clone(),
    };
    atomic_file::write(
        &s.layout.ready(),
        &serde_json::to_string_pretty(&ready)?,
        0o644,
    )
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (listen, admin, layout) = (self.listen, self.admin, &self.layout);
        let (host, port) = (&self.collector.0, self.collector.1);
        let scheme = if self.tls { "https" } else { "http" };
        writeln!(f, "Tollgate is listening on {scheme}://{listen}")?;
        writeln!(f, "  routes:    Anthropic /v1/messages, /v1/messages/count_tokens; OpenAI /v1/chat/completions, /v1/responses")?;
        match self.mock {
            Some(a) => writeln!(f, "  upstream:  built-in mock provider on http://{a}")?,
            None => writeln!(
                f,
                "  upstream:  Anthropic {}, OpenAI {}",
                self.anthropic, self.openai
            )?,
        }
        if self.anthropic_keys > 1 {
            writeln!(
                f,
                "  failover:  {} Anthropic keys; a 429 or 529 is retried on the next",
                self.anthropic_keys
            )?;
        }
        writeln!(
            f,
            "  policy:    {} ({} keys); edits apply on save",
            self.policy.display(),
            self.keys
        )?;
        match self.collector_http {
            Some(http) => {
                let db = layout.audit_db();
                writeln!(
                    f,
                    "  audit:     collector {host}:{port} -> {} (`tollgate audit tail --db {}`)",
                    db.display(),
                    db.display()
                )?;
                writeln!(
                    f,
                    "  dashboard: http://{http}/  (metrics: http://{http}/metrics)"
                )?;
            }
            None => writeln!(
                f,
                "  audit:     external collector {host}:{port}; durable copy {}",
                layout.audit_log().display()
            )?,
        }
        if let Some((host, port)) = self.quota.first() {
            writeln!(
                f,
                "  limits:    shared by every replica through the quota service {host}:{port}{}",
                match &self.redis {
                    Some(url) => format!(" (Redis {url})"),
                    None => format!(" and {} more", self.quota.len() - 1),
                }
            )?;
        }
        writeln!(
            f,
            "  envoy:     admin http://{admin}, log {}",
            layout.envoy_log().display()
        )?;
        write!(f, "Press Ctrl-C to stop.")
    }
}

impl fmt::Display for Rendered {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let layout = &self.layout;
        writeln!(
            f,
            "Envoy configuration written to {}:",
            layout.dir.display()
        )?;
        writeln!(
            f,
            "  bootstrap: {} (envoy -c)",
            layout.bootstrap().display()
        )?;
        writeln!(
            f,
            "  policy:    {} (ECDS, watched: re-render to apply edits)",
            layout.ecds().display()
        )?;
        writeln!(
            f,
            "  secrets:   {} (mode 0600)",
            layout.dir.join("secrets").display()
        )?;
        write!(
            f,
            "  listener:  {}; audit to collector {}:{}",
            self.listen, self.collector.0, self.collector.1
        )
    }
}
