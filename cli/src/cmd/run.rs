//! `tollgate run`: one local command that renders the Envoy configuration,
//! starts the collector (and the mock provider with `--upstream mock`) in
//! this process, starts the pinned real Envoy with tollgate.wasm, watches the
//! policy file for edits, and stops everything on Ctrl-C.

use super::limits::AdminApiArgs;
use crate::audit_log::Rotation;
use crate::gateway::render::Upstream;
use crate::gateway::{self, Collector, EnvoyOptions, Providers};
use crate::output::{status, Output};
use crate::provider_limits::{self, Refresh};
use crate::{policy_file, shared_store, shutdown};
use anyhow::{bail, Context, Result};
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;

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
    /// Environment variable holding an Anthropic API key (repeatable; default ANTHROPIC_API_KEY).
    /// With several, Anthropic routes go out with the first, and a 429 or 529 from one key
    /// is retried once on the next, in order. With --upstream mock, the mock accepts these keys.
    #[arg(long, value_name = "NAME")]
    pub anthropic_key_env: Vec<String>,
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
    /// The external collector's write token (its --write-token-file), sent with Envoy's
    /// access-log stream. The in-process collector gets a fresh token at each start,
    /// written to <state dir>/collector-token for log shippers.
    #[arg(long, value_name = "FILE", requires = "external_collector")]
    pub collector_token_file: Option<PathBuf>,
    /// Write the Envoy configuration (bootstrap, ECDS policy, SDS secrets, a copy of
    /// the wasm) into --state-dir and exit, for an Envoy started elsewhere
    /// (Docker Compose). Needs --external-collector.
    #[arg(long)]
    pub render_only: bool,
    /// Mock provider listener (with --upstream mock).
    #[cfg(feature = "mock")]
    #[arg(long, default_value = "127.0.0.1:0")]
    pub mock_listen: SocketAddr,
    /// Delay between streamed events of the mock provider.
    #[cfg(feature = "mock")]
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
    /// Rotate the audit file log (<state-dir>/audit.jsonl) once it reaches this size:
    /// it is renamed audit.jsonl.1 and Envoy reopens a new one.
    #[arg(long, default_value_t = 100 << 20, value_parser = clap::value_parser!(u64).range(1..))]
    pub audit_log_max_bytes: u64,
    /// Rotated audit file logs kept (audit.jsonl.1 … .N); older ones are deleted.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..))]
    pub audit_log_keep: u64,
    /// Roll audit records older than this many days up into daily sums, then delete
    /// them (usage reports keep covering those days). Default: keep everything.
    #[arg(long, conflicts_with = "external_collector", value_parser = clap::value_parser!(u32).range(1..))]
    pub audit_retain_days: Option<u32>,
    /// POST one JSON event (with a Slack-compatible `text`) here each time a key or pool
    /// first reaches one of its `alerts` thresholds in a day or month (in-process collector).
    #[arg(long, value_name = "URL", conflicts_with = "external_collector")]
    pub alert_webhook: Option<String>,
    /// Seconds a request may go without a byte in either direction before
    /// Envoy cuts it off (504 `timeout_error` before the response starts).
    /// Generations pause between events; keep this generous.
    #[arg(long, default_value_t = 600)]
    pub stream_idle_timeout: u64,
    /// Envoy log level (trace, debug, info, warn, error).
    #[arg(long, default_value = "warn")]
    pub envoy_log_level: String,
    /// Share every limit with the other replicas through Redis: a redis:// URL, or `embedded`
    /// to start a local redis-server (the system package). Starts the quota service in this process.
    #[arg(long, conflicts_with = "quota")]
    pub redis: Option<String>,
    /// Share limits through quota services running elsewhere (`tollgate quota`), as HOST:PORT (repeatable).
    #[arg(long)]
    pub quota: Vec<String>,
    /// The in-process quota service's gRPC listener (with --redis).
    #[arg(long, default_value = "127.0.0.1:0")]
    pub quota_listen: SocketAddr,
    /// How often each Envoy syncs its leases with the quota service (ms).
    #[arg(long, default_value_t = 100)]
    pub sync_period_ms: u64,
    /// Pull the provider's own limits (Anthropic's Rate Limits API, ANTHROPIC_ADMIN_KEY) into
    /// --provider-limits-file at start and then this often (`3h`, `30m`, `1d`); the policy
    /// includes that file, and a change applies like any policy edit.
    #[arg(long, value_parser = provider_limits::parse_period)]
    pub provider_limits_refresh: Option<std::time::Duration>,
    /// Where --provider-limits-refresh writes the provider pools
    /// (default: provider-limits.json beside the policy).
    #[arg(long)]
    pub provider_limits_file: Option<PathBuf>,
    /// Serve TLS on the listener with this certificate chain (PEM); needs --tls-key.
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The private key (PEM) of --tls-cert.
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Verify client certificates against this CA bundle (PEM): a verified certificate's
    /// SPIFFE ID (URI SAN) identifies the policy's "spiffe" identities. Needs --tls-cert.
    #[arg(long, requires = "tls_cert")]
    pub client_ca: Option<PathBuf>,
    /// Refuse connections without a client certificate --client-ca verifies (by default a
    /// client without one may still call with a virtual key).
    #[arg(long, requires = "client_ca")]
    pub require_client_cert: bool,
    /// Verify JWTs (`Authorization: Bearer`) from this issuer with Envoy's jwt_authn before
    /// the filter: a verified token's claims identify the policy's "jwt" identities.
    /// Needs --jwt-jwks.
    #[arg(long, requires = "jwt_jwks")]
    pub jwt_issuer: Option<String>,
    /// The issuer's keys as a local JWKS file (JSON).
    #[arg(long, requires = "jwt_issuer")]
    pub jwt_jwks: Option<PathBuf>,
    /// An accepted `aud` of the JWTs (repeatable); without one, `aud` is not checked.
    #[arg(long, requires = "jwt_issuer")]
    pub jwt_audience: Vec<String>,
    #[command(flatten)]
    pub admin_api: AdminApiArgs,
}

pub fn run(args: RunArgs) -> Result<()> {
    let collector = collector(&args)?;
    let refresh = refresh(&args)?;
    if args.render_only {
        if refresh.is_some() {
            bail!("--render-only runs nothing that could refresh: pull with `tollgate limits pull` before rendering instead of --provider-limits-refresh");
        }
        let Collector::External(host, port) = collector else {
            bail!("--render-only needs --external-collector HOST:PORT (no collector runs in this process)");
        };
        if is_mock(&args) {
            bail!("--render-only serves no mock provider: pass --upstream URL (e.g. http://mock:9612)");
        }
        let (anthropic, openai) = remote_upstreams(&args)?;
        let rendered = gateway::render_only(
            options(&args)?,
            (host, port),
            (anthropic, anthropic_keys(&args)?),
            openai,
        )?;
        let mut out = Output::stdout();
        writeln!(out, "{rendered}")?;
        out.flush()?;
        return Ok(());
    }
    let providers = providers(&args)?;
    let envoy = EnvoyOptions {
        binary: args.envoy.clone(),
        concurrency: args.concurrency,
        log_level: args.envoy_log_level.clone(),
    };
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        if let Some(r) = &refresh {
            r.first().await?;
        }
        let running = gateway::start(options(&args)?, envoy, collector, providers).await?;
        status(&running.summary);
        // The refresh only rewrites the included file; the policy watch
        // does the rest, as for an edit by hand.
        let refresher = refresh.map(|r| tokio::spawn(r.run()));
        let result = running.serve(shutdown::signal()).await;
        if let Some(task) = refresher {
            task.abort();
        }
        status("Tollgate stopped.");
        result
    })
}

/// The schedule of `--provider-limits-refresh`, if asked for.
fn refresh(args: &RunArgs) -> Result<Option<Refresh>> {
    let Some(every) = args.provider_limits_refresh else {
        if args.provider_limits_file.is_some() {
            bail!("--provider-limits-file is written by --provider-limits-refresh; pass both (or use `tollgate limits pull --out`)");
        }
        return Ok(None);
    };
    let file = args
        .provider_limits_file
        .clone()
        .unwrap_or_else(|| args.policy.with_file_name("provider-limits.json"));
    if !policy_file::read(&args.policy).includes(&file) {
        eprintln!(
            "warning: {} does not include {}: its provider pools will not apply (add \"include\": [\"{}\"])",
            args.policy.display(),
            file.display(),
            file.file_name().and_then(|n| n.to_str()).unwrap_or("provider-limits.json")
        );
    }
    Ok(Some(Refresh {
        source: args.admin_api.source()?,
        file,
        every,
    }))
}

fn options(args: &RunArgs) -> Result<gateway::Options> {
    Ok(gateway::Options {
        policy: args.policy.clone(),
        listen: args.listen,
        admin: args.admin,
        state_dir: args.state_dir.clone(),
        wasm: args.wasm.clone(),
        body_limit: args.body_limit,
        audit_flush_ms: args.audit_flush_ms,
        audit_log: Rotation {
            max_bytes: args.audit_log_max_bytes,
            keep: usize::try_from(args.audit_log_keep).unwrap_or(usize::MAX),
        },
        audit_retain_days: args.audit_retain_days,
        alert_webhook: args.alert_webhook.clone(),
        stream_idle_timeout_s: args.stream_idle_timeout,
        shared: shared(args)?,
        listener_tls: listener_tls(args)?,
        jwt: jwt(args)?,
        collector_token: args
            .collector_token_file
            .as_deref()
            .map(crate::collector::auth::WriteToken::read)
            .transpose()?,
    })
}

/// A file Envoy reads, as an absolute path (Envoy's working directory is
/// not the caller's), which must exist now.
fn input_file(path: &std::path::Path, flag: &str) -> Result<PathBuf> {
    std::fs::canonicalize(path).with_context(|| format!("{flag} {}: not found", path.display()))
}

fn listener_tls(args: &RunArgs) -> Result<Option<gateway::render::ListenerTls>> {
    let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) else {
        return Ok(None);
    };
    Ok(Some(gateway::render::ListenerTls {
        cert: input_file(cert, "--tls-cert")?,
        key: input_file(key, "--tls-key")?,
        client_ca: args
            .client_ca
            .as_deref()
            .map(|ca| input_file(ca, "--client-ca"))
            .transpose()?,
        require_client_cert: args.require_client_cert,
    }))
}

fn jwt(args: &RunArgs) -> Result<Option<gateway::render::JwtProvider>> {
    let (Some(issuer), Some(jwks)) = (&args.jwt_issuer, &args.jwt_jwks) else {
        return Ok(None);
    };
    Ok(Some(gateway::render::JwtProvider {
        issuer: issuer.clone(),
        audiences: args.jwt_audience.clone(),
        jwks: input_file(jwks, "--jwt-jwks")?,
    }))
}

/// Limits shared through Redis (`--redis`) or external quota services
/// (`--quota`), or `None` for this Envoy alone.
fn shared(args: &RunArgs) -> Result<Option<gateway::Shared>> {
    let quota = if let Some(redis) = &args.redis {
        gateway::QuotaAt::InProcess {
            redis: shared_store::Redis::parse(redis)?,
            listen: args.quota_listen,
        }
    } else if !args.quota.is_empty() {
        gateway::QuotaAt::External(
            args.quota
                .iter()
                .map(|a| host_port(a, "--quota"))
                .collect::<Result<_>>()?,
        )
    } else {
        return Ok(None);
    };
    if args.sync_period_ms == 0 {
        bail!("--sync-period-ms must be at least 1");
    }
    Ok(Some(gateway::Shared {
        quota,
        sync_period_ms: args.sync_period_ms,
    }))
}

/// `HOST:PORT` (IPv6 hosts in brackets).
fn host_port(addr: &str, flag: &str) -> Result<(String, u16)> {
    addr.rsplit_once(':')
        .and_then(|(h, p)| {
            Some((
                h.trim_matches(['[', ']']).to_string(),
                p.parse::<u16>().ok()?,
            ))
        })
        .with_context(|| format!("{flag} {addr:?} must be HOST:PORT"))
}

fn collector(args: &RunArgs) -> Result<Collector> {
    let Some(addr) = &args.external_collector else {
        return Ok(Collector::InProcess {
            grpc: args.collector,
            http: args.collector_http,
        });
    };
    let (host, port) = host_port(addr, "--external-collector")?;
    Ok(Collector::External(host, port))
}

fn is_mock(args: &RunArgs) -> bool {
    args.upstream.as_deref() == Some("mock")
}

fn providers(args: &RunArgs) -> Result<Providers> {
    if is_mock(args) {
        return mock_provider(args);
    }
    let (anthropic, openai) = remote_upstreams(args)?;
    Ok(Providers::Remote {
        anthropic,
        openai,
        anthropic_keys: anthropic_keys(args)?,
    })
}

#[cfg(feature = "mock")]
fn mock_provider(args: &RunArgs) -> Result<Providers> {
    Ok(Providers::Mock {
        listen: args.mock_listen,
        event_delay_ms: args.mock_event_delay_ms,
        anthropic_keys: if args.anthropic_key_env.is_empty() {
            None
        } else {
            Some(anthropic_keys(args)?)
        },
    })
}

#[cfg(not(feature = "mock"))]
fn mock_provider(_: &RunArgs) -> Result<Providers> {
    bail!(
        "--upstream mock: this tollgate was built without the mock provider \
         (cargo feature `mock`); pass --upstream URL, or build it with the default features"
    )
}

/// The Anthropic keys, in failover order, from the variables
/// `--anthropic-key-env` names (by default `ANTHROPIC_API_KEY` alone, which
/// may be unset: the provider then refuses, as without Tollgate). A variable
/// named explicitly must hold a key: failing over to an empty one would
/// only turn a 429 into a 401.
fn anthropic_keys(args: &RunArgs) -> Result<Vec<String>> {
    if args.anthropic_key_env.is_empty() {
        let key = std::env::var("ANTHROPIC_API_KEY").unwrap_or_default();
        if key.is_empty() {
            eprintln!(
                "warning: ANTHROPIC_API_KEY is not set: Anthropic routes will be refused by the provider"
            );
        }
        return Ok(vec![key]);
    }
    let mut keys = Vec::with_capacity(args.anthropic_key_env.len());
    for name in &args.anthropic_key_env {
        let key = std::env::var(name).unwrap_or_default();
        if key.is_empty() {
            bail!("--anthropic-key-env {name}: {name} is not set or empty");
        }
        if keys.contains(&key) {
            bail!("--anthropic-key-env {name}: holds the same key as an earlier variable");
        }
        keys.push(key);
    }
    Ok(keys)
}

/// One --upstream serves both route families; the per-provider flags win.
fn remote_upstreams(args: &RunArgs) -> Result<(Upstream, Upstream)> {
    let pick = |own: &Option<String>, default: &str| {
        Upstream::parse(
            own.as_deref()
                .or(args.upstream.as_deref())
                .unwrap_or(default),
        )
    };
    Ok((
        pick(&args.anthropic_upstream, "https://api.anthropic.com")?,
        pick(&args.openai_upstream, "https://api.openai.com")?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<RunArgs, clap::Error> {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            run: RunArgs,
        }
        <Cli as clap::Parser>::try_parse_from(std::iter::once("run").chain(args.iter().copied()))
            .map(|c| c.run)
    }

    #[test]
    fn the_audit_file_log_rotates_at_100_mib_keeping_5_and_records_are_kept_forever() {
        let o = options(&parse(&[]).unwrap()).unwrap();
        assert_eq!(
            (o.audit_log, o.audit_retain_days),
            (
                Rotation {
                    max_bytes: 100 << 20,
                    keep: 5
                },
                None
            )
        );
        let o = options(
            &parse(&[
                "--audit-log-max-bytes",
                "4096",
                "--audit-log-keep",
                "2",
                "--audit-retain-days",
                "30",
            ])
            .unwrap(),
        )
        .unwrap();
        assert_eq!(
            (o.audit_log, o.audit_retain_days),
            (
                Rotation {
                    max_bytes: 4096,
                    keep: 2
                },
                Some(30)
            )
        );
    }

    #[test]
    fn a_failover_key_variable_that_is_not_set_starts_nothing() {
        let args = parse(&[
            "--anthropic-key-env",
            "PATH",
            "--anthropic-key-env",
            "TOLLGATE_TEST_NO_SUCH_KEY",
        ])
        .unwrap();
        assert_eq!(
            anthropic_keys(&args).unwrap_err().to_string(),
            "--anthropic-key-env TOLLGATE_TEST_NO_SUCH_KEY: TOLLGATE_TEST_NO_SUCH_KEY is not set or empty"
        );
        let twice = parse(&["--anthropic-key-env", "PATH", "--anthropic-key-env", "PATH"]).unwrap();
        assert_eq!(
            anthropic_keys(&twice).unwrap_err().to_string(),
            "--anthropic-key-env PATH: holds the same key as an earlier variable"
        );
    }

    #[test]
    fn rotation_and_retention_flags_refuse_what_cannot_work() {
        for (args, flag) in [
            (&["--audit-log-keep", "0"][..], "--audit-log-keep"),
            (&["--audit-log-max-bytes", "0"][..], "--audit-log-max-bytes"),
            (&["--audit-retain-days", "0"][..], "--audit-retain-days"),
            // Retention is the in-process collector's: an external one has its own.
            (
                &["--audit-retain-days", "7", "--external-collector", "c:9611"][..],
                "--external-collector",
            ),
        ] {
            let err = parse(args).err().unwrap().to_string();
            assert!(err.contains(flag), "{args:?}: {err}");
        }
    }
}
