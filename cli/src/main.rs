//! `tollgate`: run the gateway locally, the audit collector, the mock
//! provider; check and render policies; mint keys; read audit and usage.
//!
//! Read top-down: this file parses the command line and hands each
//! subcommand to `cmd/<name>.rs`, which holds its arguments and one `run()`
//! calling the libraries below. Libraries never import `cmd`.

// Commands: arguments and one `run()` each.
mod cmd;

// Libraries.
/// Files replaced by rename, so their readers never see half of one.
mod atomic_file;
/// Envoy's file access log of audit records: its rotated files and rotation.
mod audit_log;
/// The collector as one service (gRPC + HTTP over one store) and its start-up import.
mod audit_service;
/// Audit records as `tollgate audit tail` shows them, and the follow loop.
mod audit_view;
/// Unix milliseconds now.
mod clock;
/// The audit collector's pieces: gRPC AccessLogService, store, reports, HTTP side.
mod collector;
/// The local gateway: Envoy's rendered configuration and its supervision.
mod gateway;
/// The key service: the policy's keys served to Envoy as a table.
mod key_service;
/// Keys as `key list` and `key show` print them.
mod key_view;
/// Minting virtual keys, adding their entries to a policy file, rotating and revoking them.
mod keys;
/// Istio WasmPlugin and Envoy Gateway EnvoyExtensionPolicy renders.
mod mesh;
/// tollgate.wasm as an OCI image.
mod oci;
/// Stdout that treats a closed pipe as the end of the output.
mod output;
/// Reading, validating and checking policy files.
mod policy_file;
/// The effective price table as `tollgate prices` shows it.
mod price_view;
/// The provider's own limits (Anthropic's Rate Limits API) as provider pools.
mod provider_limits;
/// The quota service and Redis behind limits shared by every replica.
mod shared_store;
/// Ctrl-C/SIGTERM and the stop switch shared by a process's services.
mod shutdown;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "tollgate",
    version,
    about = "Govern LLM API traffic in Envoy: virtual keys, token buckets, budgets, audit"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

// Parsed once per process; boxing the large variant would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Run the gateway locally: real Envoy with tollgate.wasm, the collector, optionally the mock provider.
    Run(cmd::run::RunArgs),
    /// Run the audit collector (Envoy gRPC access-log service + embedded database).
    Collector(cmd::collector::CollectorArgs),
    /// Read audit records from the collector's database.
    Audit(cmd::audit::AuditArgs),
    /// Run the mock provider that replays recorded Anthropic/OpenAI exchanges.
    #[cfg(feature = "mock")]
    Mock(cmd::mock::MockArgs),
    /// Validate policies, render Envoy's filter config, print the JSON Schema.
    Policy(cmd::policy::PolicyArgs),
    /// Run the shared-limit service in front of Redis, so every Envoy replica meters one set of limits.
    Quota(cmd::quota::QuotaArgs),
    /// Mint, list, show, rotate and revoke virtual keys.
    Key(cmd::key::KeyArgs),
    /// The provider's own limits: pull Anthropic's organization (and workspace) rate limits into provider pools.
    Limits(cmd::limits::LimitsArgs),
    /// Package tollgate.wasm as an OCI image (layout directory and tarball) for Istio and Envoy Gateway.
    Package(cmd::package::PackageArgs),
    /// Usage report: requests, tokens by class, cost and denials by key, user, team, project, app, agent, model or day.
    Usage(cmd::usage::UsageArgs),
    /// The effective price table: the shipped prices, with a policy's own merged over them (--policy).
    Prices(cmd::prices::PricesArgs),
}

/// The log lines of the collector, the quota service and the key service
/// (the `tracing` macros: a refused access-log stream, a full audit queue,
/// Redis unavailable, an alert) on stderr: Tollgate's own from info up,
/// other crates' warnings. `TOLLGATE_LOG` overrides it, in `RUST_LOG`'s
/// syntax (`TOLLGATE_LOG=debug`). A closed stderr loses the lines, not the
/// process.
fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("TOLLGATE_LOG").unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new("warn,tollgate=info,tollgate_quota=info")
    });
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        // A line that cannot be written is dropped, not reported on the
        // same closed stderr (whose `eprintln!` would panic).
        .log_internal_errors(false)
        .try_init();
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The one TLS provider for `rediss://` and HTTPS, installed rather than
    // left to rustls, which picks none (and refuses to connect) once two are
    // compiled in. *ring*, not aws-lc-rs: reqwest already builds it, and
    // aws-lc-rs needs a build toolchain a fresh machine may lack. rustls
    // 0.23.48 deprecates it for lacking post-quantum key exchange, which
    // neither Redis nor the provider APIs offer yet.
    #[allow(deprecated)]
    let _ = rustls::crypto::ring::default_provider().install_default();
    init_logging();
    let result = match cli.command {
        Command::Run(args) => cmd::run::run(args),
        Command::Collector(args) => cmd::collector::run(args),
        Command::Audit(args) => cmd::audit::run(args),
        #[cfg(feature = "mock")]
        Command::Mock(args) => cmd::mock::run(args),
        Command::Policy(args) => cmd::policy::run(args),
        Command::Quota(args) => cmd::quota::run(args),
        Command::Key(args) => cmd::key::run(args),
        Command::Limits(args) => cmd::limits::run(args),
        Command::Usage(args) => cmd::usage::run(args),
        Command::Package(args) => cmd::package::run(args),
        Command::Prices(args) => cmd::prices::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // The reader took what it wanted (`| head`): nothing failed.
        Err(e) if output::is_closed_stdout(&e) => ExitCode::SUCCESS,
        Err(e) => {
            use std::io::Write;
            let _ = writeln!(std::io::stderr(), "tollgate: {e:#}");
            ExitCode::FAILURE
        }
    }
}
