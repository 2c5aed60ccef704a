//! `tollgate`: run the gateway locally, the audit collector, the mock
//! provider; check and render policies; mint keys; read audit and usage.

mod audit;
mod collector;
mod collector_cmd;
mod key_cmd;
mod mock;
mod mock_cmd;
mod package;
mod policy_cmd;
mod run;
mod usage_cmd;

use clap::{Parser, Subcommand};

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
    Run(run::RunArgs),
    /// Run the audit collector (Envoy gRPC access-log service + embedded database).
    Collector(collector_cmd::CollectorArgs),
    /// Read audit records from the collector's database.
    Audit(audit::AuditArgs),
    /// Run the mock provider that replays recorded Anthropic/OpenAI exchanges.
    Mock(mock_cmd::MockArgs),
    /// Validate policies, render Envoy's filter config, print the JSON Schema.
    Policy(policy_cmd::PolicyArgs),
    /// Mint virtual keys.
    Key(key_cmd::KeyArgs),
    /// Package tollgate.wasm as an OCI image (layout directory and tarball) for Istio and Envoy Gateway.
    Package(package::PackageArgs),
    /// Usage report: requests, tokens by class, cost and denials by key, user, team, project, app, agent, model or day.
    Usage(usage_cmd::UsageArgs),
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => run::run(args),
        Command::Collector(args) => collector_cmd::run(args),
        Command::Audit(args) => audit::run(args),
        Command::Mock(args) => mock_cmd::run(args),
        Command::Policy(args) => policy_cmd::run(args),
        Command::Key(args) => key_cmd::run(args),
        Command::Usage(args) => usage_cmd::run(args),
        Command::Package(args) => package::run(args),
    };
    if let Err(e) = result {
        eprintln!("tollgate: {e:#}");
        std::process::exit(1);
    }
}
