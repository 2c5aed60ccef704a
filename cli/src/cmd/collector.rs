//! `tollgate collector`: the audit collector on its own (for deployments
//! where Envoy runs elsewhere).

use crate::audit_service;
use crate::collector::auth::WriteToken;
use crate::collector::store::AuditStore;
use crate::output::status;
use crate::shutdown;
use anyhow::{Context, Result};
use std::net::SocketAddr;
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct CollectorArgs {
    /// gRPC AccessLogService listener (Envoy's http_grpc access logger points here).
    /// Loopback by default: put TLS or a network policy in front before exposing it.
    #[arg(long, default_value = "127.0.0.1:9611")]
    pub listen: SocketAddr,
    /// SQLite database for audit records.
    #[arg(long, default_value = ".tollgate/audit.db")]
    pub db: PathBuf,
    /// HTTP listener for /metrics, /api/usage and the dashboard.
    #[arg(long, default_value = "127.0.0.1:9613")]
    pub http: SocketAddr,
    /// Import this JSON-lines audit log (Envoy's file access log) and its rotated
    /// files (FILE.N … FILE.1, oldest first) at start-up, recovering records the
    /// gRPC stream lost while the collector was down.
    #[arg(long)]
    pub import: Option<PathBuf>,
    /// Roll raw records older than this many days up into daily sums, then delete
    /// them (usage reports keep covering those days). Default: keep everything.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub retain_days: Option<u32>,
    /// Policy file (JSON) whose daily and monthly limits the budget gauges, alerts and the
    /// dashboard's burn-down follow; read again on every edit. Without it: none of those.
    #[arg(long)]
    pub policy: Option<PathBuf>,
    /// POST one JSON event (with a Slack-compatible `text`) here each time an entity
    /// first reaches one of its `alerts` thresholds in a window. Needs --policy.
    #[arg(long, value_name = "URL", requires = "policy")]
    pub alert_webhook: Option<String>,
    /// Also serve the policy's keys to Envoy as a key table (GET /v1/keys on the --http
    /// listener), for filters rendered with `tollgate policy render --key-service-cluster`:
    /// a key change then reaches every Envoy as that change alone (docs/keys-at-scale.md).
    /// Needs --policy.
    #[arg(long, requires = "policy")]
    pub serve_keys: bool,
    /// File holding the write token: Envoy's access-log stream and POST /api/ingest must
    /// send `authorization: Bearer <token>` (Envoy: the grpc_service's initial_metadata).
    /// Without it every write is accepted.
    #[arg(long, value_name = "FILE")]
    pub write_token_file: Option<PathBuf>,
}

pub fn run(args: CollectorArgs) -> Result<()> {
    let rt = tokio::runtime::Runtime::new()?;
    // Opened before entering the runtime: the PostgreSQL client blocks on a
    // runtime of its own, which tokio forbids inside an async context.
    let write_token = match &args.write_token_file {
        Some(file) => WriteToken::new(&WriteToken::read(file)?),
        None => WriteToken::open(),
    };
    let store = AuditStore::open(&args.db)?;
    if let Some(file) = &args.import {
        audit_service::import_at_start(&store, file);
    }
    rt.block_on(async {
        let grpc = tokio::net::TcpListener::bind(args.listen)
            .await
            .with_context(|| format!("binding {}", args.listen))?;
        let http = tokio::net::TcpListener::bind(args.http)
            .await
            .with_context(|| format!("binding {}", args.http))?;
        status(format_args!(
            "collector listening on {} (gRPC access log), http://{} (dashboard, /metrics, /api/usage), storing to {}",
            grpc.local_addr()?,
            http.local_addr()?,
            args.db.display()
        ));
        if write_token.is_open() {
            eprintln!(
                "warning: no --write-token-file: anyone who reaches {} or POST /api/ingest can write audit records",
                grpc.local_addr()?
            );
        }
        let upkeep = audit_service::Upkeep {
            retain_days: args.retain_days,
            policy: args.policy.clone(),
            alert_webhook: args.alert_webhook,
            write_token,
            serve_keys: args.serve_keys,
        };
        audit_service::serve(grpc, http, store, upkeep, shutdown::signal()).await
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<CollectorArgs, clap::Error> {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            collector: CollectorArgs,
        }
        <Cli as clap::Parser>::try_parse_from(
            std::iter::once("collector").chain(args.iter().copied()),
        )
        .map(|c| c.collector)
    }

    #[test]
    fn serving_keys_needs_the_policy_that_holds_them() {
        let err = parse(&["--serve-keys"]).err().unwrap().to_string();
        assert!(err.contains("--policy"), "{err}");
        assert!(
            parse(&["--serve-keys", "--policy", "p.json"])
                .unwrap()
                .serve_keys
        );
    }

    #[test]
    fn retention_is_off_by_default_and_takes_whole_days() {
        assert_eq!(parse(&[]).unwrap().retain_days, None);
        assert_eq!(
            parse(&["--retain-days", "90"]).unwrap().retain_days,
            Some(90)
        );
        let err = parse(&["--retain-days", "0"]).err().unwrap().to_string();
        assert!(err.contains("--retain-days"), "{err}");
    }

    #[test]
    fn an_alert_webhook_needs_the_policy_that_declares_the_alerts() {
        let err = parse(&["--alert-webhook", "http://hooks.example/x"])
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("--policy <POLICY>"), "{err}");
        let args = parse(&[
            "--policy",
            "p.json",
            "--alert-webhook",
            "http://hooks.example/x",
        ])
        .unwrap();
        assert_eq!(
            args.alert_webhook.as_deref(),
            Some("http://hooks.example/x")
        );
    }
}
