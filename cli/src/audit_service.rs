//! The audit collector as one service: its gRPC AccessLogService, its
//! HTTP side (dashboard, `/metrics`, `/api/usage`, `/api/ingest`) and its
//! upkeep (retention, the missing-records gauge) over one store, started
//! and stopped together; and the start-up import of Envoy's file access log
//! and its rotated files, the durable copy of what the gRPC stream may have
//! lost.
//!
//! Used by `tollgate collector` and by the gateway's in-process collector.

use crate::audit_log;
use crate::collector::{self, store::AuditStore};
use crate::key_service::{self, KeyTable};
use crate::output::status;
use crate::shutdown::Stop;
use anyhow::Result;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::net::TcpListener;

/// What the collector does besides storing.
#[derive(Debug, Clone, Default)]
pub struct Upkeep {
    /// Roll up and delete raw records older than this many days; `None`
    /// keeps everything.
    pub retain_days: Option<u32>,
    /// The policy whose limits and `alerts` the collector watches (budget
    /// gauges, alerts, the dashboard's burn-down; read again on every edit);
    /// `None`: none of those.
    pub policy: Option<PathBuf>,
    /// Where alert events are posted; without it they are only recorded.
    pub alert_webhook: Option<String>,
    /// What a write (gRPC stream, `POST /api/ingest`) must carry.
    pub write_token: collector::auth::WriteToken,
    /// Serve the policy's keys as a key table (`GET /v1/keys`) on the HTTP
    /// listener ([`crate::key_service`]).
    pub serve_keys: bool,
}

/// Serves both listeners until `shutdown` resolves, then stops the HTTP
/// side and the upkeep and returns once every queued record is stored.
pub async fn serve(
    grpc: TcpListener,
    http: TcpListener,
    store: AuditStore,
    upkeep: Upkeep,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let stats = Arc::new(collector::Stats::default());
    let side_stop = Stop::new();
    let keys = match (&upkeep.policy, upkeep.serve_keys) {
        (Some(path), true) => {
            let table = KeyTable::empty();
            tokio::spawn(key_service::watch(
                table.clone(),
                path.clone(),
                side_stop.stopped(),
            ));
            Some(table)
        }
        _ => None,
    };
    let web = tokio::spawn(collector::http::serve(
        http,
        store.clone(),
        stats.clone(),
        upkeep.policy.clone(),
        upkeep.write_token.clone(),
        keys,
        side_stop.stopped(),
    ));
    let maintain = tokio::spawn(collector::maintain(
        store.clone(),
        stats.clone(),
        upkeep.retain_days,
        side_stop.stopped(),
    ));
    if upkeep.alert_webhook.is_some() {
        stats.alerts.with_webhook();
    }
    let alerts = upkeep.policy.map(|path| {
        tokio::spawn(collector::alerts::keep(
            store.clone(),
            stats.clone(),
            path,
            side_stop.stopped(),
        ))
    });
    let sender = upkeep.alert_webhook.map(|url| {
        tokio::spawn(collector::alerts::webhook::deliver(
            store.clone(),
            stats.clone(),
            url,
            side_stop.stopped(),
        ))
    });
    let result =
        collector::serve_with_stats(grpc, store, stats, upkeep.write_token, shutdown).await;
    side_stop.stop();
    let _ = web.await;
    let _ = maintain.await;
    for task in [alerts, sender].into_iter().flatten() {
        let _ = task.await;
    }
    result
}

/// Imports the durable file copy of the audit log, if there is one, with
/// its rotated files, oldest first (the order Envoy wrote them), and says
/// what each recovered. Problems are
/// reported, never fatal: the gRPC path keeps working without the import.
pub fn import_at_start(store: &AuditStore, live: &Path) {
    for file in audit_log::oldest_first(live) {
        match store.import_jsonl(&file) {
            Ok(s) => status(format_args!(
                "imported {}: {} records, {} recovered, {} invalid lines{}",
                file.display(),
                s.lines,
                s.stored,
                s.invalid,
                if s.expired > 0 {
                    format!(", {} older than the retention horizon", s.expired)
                } else {
                    String::new()
                }
            )),
            Err(e) => eprintln!("warning: importing {} failed: {e:#}", file.display()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tollgate_core::audit::AuditRecord;

    fn line(id: &str, complete: bool) -> String {
        serde_json::to_string(&AuditRecord {
            request_id: id.into(),
            complete,
            route: "anthropic.messages".into(),
            ..Default::default()
        })
        .unwrap()
            + "\n"
    }

    #[test]
    fn the_start_up_import_reads_every_rotated_file() {
        let dir = tempfile::tempdir().unwrap();
        let live = dir.path().join("audit.jsonl");
        // Written before the last two rotations: a request still in flight
        // at a restart (its provisional record) in the oldest file, its
        // complete record in the next.
        std::fs::write(audit_log::rotated(&live, 2), line("r", false)).unwrap();
        std::fs::write(
            audit_log::rotated(&live, 1),
            line("r", true) + &line("s", true),
        )
        .unwrap();
        std::fs::write(&live, line("t", true)).unwrap();
        let store = AuditStore::open(dir.path().join("audit.db")).unwrap();
        import_at_start(&store, &live);
        assert_eq!(store.count().unwrap(), 3);
        assert!(store.get("r").unwrap().unwrap().complete);
        assert!(store.get("t").unwrap().is_some());
        // Without any file: nothing to do, no error.
        import_at_start(&store, &dir.path().join("none.jsonl"));
    }
}
