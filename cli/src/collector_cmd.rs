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
}

pub fn run(args: CollectorArgs) -> Result<()> {
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let store = AuditStore::open(&args.db)?;
        let listener = tokio::net::TcpListener::bind(args.listen)
            .await
            .with_context(|| format!("binding {}", args.listen))?;
        println!(
            "collector listening on {}, storing to {}",
            listener.local_addr()?,
            args.db.display()
        );
        collector::serve(listener, store, shutdown_signal()).await
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
