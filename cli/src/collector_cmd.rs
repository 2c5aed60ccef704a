//! `tollgate collector`: the audit collector on its own (for deployments
//! where Envoy runs elsewhere).

use crate::collector::{self, store::AuditStore};
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
    /// Import this JSON-lines audit log (Envoy's file access log) at start-up,
    /// recovering records the gRPC stream lost while the collector was down.
    #[arg(long)]
    pub import: Option<PathBuf>,
}

pub fn run(args: CollectorArgs) -> Result<()> {
    let rt = tokio::runtime::Runtime::new()?;
    // Opened before entering the runtime: the PostgreSQL client blocks on a
    // runtime of its own, which tokio forbids inside an async context.
    let store = AuditStore::open(&args.db)?;
    if let Some(file) = &args.import {
        import_at_start(&store, file);
    }
    rt.block_on(async {
        let listener = tokio::net::TcpListener::bind(args.listen)
            .await
            .with_context(|| format!("binding {}", args.listen))?;
        let http = tokio::net::TcpListener::bind(args.http)
            .await
            .with_context(|| format!("binding {}", args.http))?;
        println!(
            "collector listening on {} (gRPC access log), http://{} (dashboard, /metrics, /api/usage), storing to {}",
            listener.local_addr()?,
            http.local_addr()?,
            args.db.display()
        );
        let stats = std::sync::Arc::new(collector::Stats::default());
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let web = tokio::spawn(collector::http::serve(http, store.clone(), stats.clone(), wait(stop_rx)));
        let result = collector::serve_with_stats(listener, store, stats, shutdown_signal()).await;
        let _ = stop_tx.send(true);
        let _ = web.await;
        result
    })
}

/// Resolves on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
}

async fn wait(mut rx: tokio::sync::watch::Receiver<bool>) {
    let _ = rx.wait_for(|stop| *stop).await;
}

/// Imports the durable file copy of the audit log; problems are reported,
/// never fatal (the gRPC path keeps working).
pub fn import_at_start(store: &AuditStore, file: &std::path::Path) {
    if !file.exists() {
        return;
    }
    match store.import_jsonl(file) {
        Ok(s) => println!(
            "imported {}: {} records, {} recovered, {} invalid lines",
            file.display(),
            s.lines,
            s.stored,
            s.invalid
        ),
        Err(e) => eprintln!("warning: importing {} failed: {e:#}", file.display()),
    }
}
