//! The audit collector as one service: its gRPC AccessLogService and its
//! HTTP side (dashboard, `/metrics`, `/api/usage`) over one store, started
//! and stopped together; and the start-up import of Envoy's file access log,
//! the durable copy of what the gRPC stream may have lost.
//!
//! Used by `tollgate collector` and by the gateway's in-process collector.

use crate::collector::{self, store::AuditStore};
use crate::output::status;
use crate::shutdown::Stop;
use anyhow::Result;
use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use tokio::net::TcpListener;

/// Serves both listeners until `shutdown` resolves, then stops the HTTP
/// side and returns once every queued record is stored.
pub async fn serve(
    grpc: TcpListener,
    http: TcpListener,
    store: AuditStore,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let stats = Arc::new(collector::Stats::default());
    let web_stop = Stop::new();
    let web = tokio::spawn(collector::http::serve(
        http,
        store.clone(),
        stats.clone(),
        web_stop.stopped(),
    ));
    let result = collector::serve_with_stats(grpc, store, stats, shutdown).await;
    web_stop.stop();
    let _ = web.await;
    result
}

/// Imports the durable file copy of the audit log, if there is one, and
/// says what it recovered. Problems are reported, never fatal: the gRPC
/// path keeps working without the import.
pub fn import_at_start(store: &AuditStore, file: &Path) {
    if !file.exists() {
        return;
    }
    match store.import_jsonl(file) {
        Ok(s) => status(format_args!(
            "imported {}: {} records, {} recovered, {} invalid lines",
            file.display(),
            s.lines,
            s.stored,
            s.invalid
        )),
        Err(e) => eprintln!("warning: importing {} failed: {e:#}", file.display()),
    }
}
