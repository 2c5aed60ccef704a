//! The audit store: one row per request id in an embedded SQLite database.
//! Inserts are idempotent, so replaying the gRPC stream or importing the
//! file access log never duplicates a request.

use anyhow::{Context, Result};
use rusqlite::{params, Connection, OptionalExtension};
use std::path::Path;
use std::sync::{Arc, Mutex};
use tollgate_core::audit::AuditRecord;

/// What an import did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ImportStats {
    /// Lines holding a record.
    pub lines: usize,
    /// Rows inserted or upgraded from provisional to complete.
    pub stored: usize,
    /// Lines that were not a valid record.
    pub invalid: usize,
}

#[derive(Clone)]
pub struct AuditStore {
    conn: Arc<Mutex<Connection>>,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS audit (
    request_id    TEXT PRIMARY KEY,
    timestamp_ms  INTEGER NOT NULL,
    complete      INTEGER NOT NULL,
    key_id        TEXT,
    user          TEXT,
    team          TEXT,
    project       TEXT,
    app           TEXT,
    agent         TEXT,
    route         TEXT NOT NULL,
    model_requested TEXT,
    model_served  TEXT,
    decision      TEXT NOT NULL,
    reason        TEXT NOT NULL,
    status        INTEGER NOT NULL,
    input_tokens  INTEGER,
    output_tokens INTEGER,
    cache_write_tokens INTEGER,
    cache_read_tokens  INTEGER,
    cost_usd      REAL,
    record        TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS audit_time ON audit(timestamp_ms);
CREATE INDEX IF NOT EXISTS audit_key ON audit(key_id);
";

impl AuditStore {
    pub fn open(path: &Path) -> Result<AuditStore> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let conn = Connection::open(path)
            .with_context(|| format!("opening audit database {}", path.display()))?;
        // WAL lets `tollgate audit tail` read while the collector writes.
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.execute_batch(SCHEMA)?;
        Ok(AuditStore {
            conn: Arc::new(Mutex::new(conn)),
        })
    }

    /// Opens an existing database for reading; a missing file is an error
    /// that says how to create one.
    pub fn open_existing(path: &Path) -> Result<AuditStore> {
        if !path.exists() {
            anyhow::bail!(
                "no audit database at {} — start the gateway with `tollgate run` (or `tollgate collector --db {}`) first",
                path.display(),
                path.display()
            );
        }
        AuditStore::open(path)
    }

    /// Inserts records in one transaction. A complete record replaces a
    /// provisional one of the same request; nothing replaces a complete one.
    /// Returns how many rows were inserted or upgraded.
    pub fn insert_batch(&self, records: &[AuditRecord]) -> Result<usize> {
        let mut conn = self
            .conn
            .lock()
            .map_err(|_| anyhow::anyhow!("audit store lock poisoned"))?;
        let tx = conn.transaction()?;
        let mut changed = 0;
        {
            let mut stmt = tx.prepare_cached(
                "INSERT INTO audit (request_id, timestamp_ms, complete, key_id, user, team, project, app, agent,
                    route, model_requested, model_served, decision, reason, status,
                    input_tokens, output_tokens, cache_write_tokens, cache_read_tokens, cost_usd, record)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19, ?20, ?21)
                 ON CONFLICT(request_id) DO UPDATE SET
                    timestamp_ms = excluded.timestamp_ms, complete = excluded.complete, key_id = excluded.key_id,
                    user = excluded.user, team = excluded.team, project = excluded.project, app = excluded.app,
                    agent = excluded.agent, route = excluded.route, model_requested = excluded.model_requested,
                    model_served = excluded.model_served, decision = excluded.decision, reason = excluded.reason,
                    status = excluded.status, input_tokens = excluded.input_tokens,
                    output_tokens = excluded.output_tokens, cache_write_tokens = excluded.cache_write_tokens,
                    cache_read_tokens = excluded.cache_read_tokens, cost_usd = excluded.cost_usd,
                    record = excluded.record
                 WHERE audit.complete = 0 AND excluded.complete = 1",
            )?;
            for r in records {
                let json = serde_json::to_string(r)?;
                changed += stmt.execute(params![
                    r.request_id,
                    r.timestamp_ms as i64,
                    r.complete,
                    r.key_id,
                    r.user,
                    r.team,
                    r.project,
                    r.app,
                    r.agent,
                    r.route,
                    r.model_requested,
                    r.model_served,
                    serde_json::to_value(r.decision)?
                        .as_str()
                        .unwrap_or_default(),
                    r.reason.as_str(),
                    r.status,
                    r.tokens.input.map(|v| v as i64),
                    r.tokens.output.map(|v| v as i64),
                    r.tokens.cache_write.map(|v| v as i64),
                    r.tokens.cache_read.map(|v| v as i64),
                    r.cost_usd,
                    json,
                ])?;
            }
        }
        tx.commit()?;
        Ok(changed)
    }

    /// The newest `n` records, newest first.
    pub fn tail(&self, n: usize) -> Result<Vec<AuditRecord>> {
        let conn = self
            .conn
            .lock()
            .map_err(|_| anyhow::anyhow!("audit store lock poisoned"))?;
        let mut stmt = conn
            .prepare("SELECT record FROM audit ORDER BY timestamp_ms DESC, rowid DESC LIMIT ?1")?;
        let rows = stmt.query_map([n as i64], |row| row.get::<_, String>(0))?;
        let mut out = Vec::new();
        for row in rows {
            out.push(serde_json::from_str(&row?)?);
        }
        Ok(out)
    }

    /// Records stored after `rowid`, oldest first, with the last rowid seen.
    pub fn since(&self, rowid: i64) -> Result<(Vec<AuditRecord>, i64)> {
        let conn = self
            .conn
            .lock()
            .map_err(|_| anyhow::anyhow!("audit store lock poisoned"))?;
        let mut stmt =
            conn.prepare("SELECT rowid, record FROM audit WHERE rowid > ?1 ORDER BY rowid")?;
        let rows = stmt.query_map([rowid], |row| {
            Ok((row.get::<_, i64>(0)?, row.get::<_, String>(1)?))
        })?;
        let (mut out, mut last) = (Vec::new(), rowid);
        for row in rows {
            let (id, json) = row?;
            last = last.max(id);
            out.push(serde_json::from_str(&json)?);
        }
        Ok((out, last))
    }

    /// Runs a read query with one integer parameter.
    pub fn query<T>(
        &self,
        sql: &str,
        param: u64,
        map: impl FnMut(&rusqlite::Row<'_>) -> rusqlite::Result<T>,
    ) -> Result<Vec<T>> {
        let conn = self
            .conn
            .lock()
            .map_err(|_| anyhow::anyhow!("audit store lock poisoned"))?;
        let mut stmt = conn.prepare(sql)?;
        let rows = stmt.query_map([param as i64], map)?;
        Ok(rows.collect::<rusqlite::Result<Vec<T>>>()?)
    }

    /// Imports a JSON-lines audit log (Envoy's file access log): one record
    /// per line, lines without a record (`-`) skipped. Idempotent.
    pub fn import_jsonl(&self, path: &Path) -> Result<ImportStats> {
        use std::io::BufRead;
        let file =
            std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
        let mut stats = ImportStats::default();
        let mut batch = Vec::with_capacity(1024);
        for line in std::io::BufReader::new(file).lines() {
            let line = line?;
            let line = line.trim();
            if line.is_empty() || line == "-" {
                continue;
            }
            stats.lines += 1;
            match serde_json::from_str::<AuditRecord>(line) {
                Ok(r) => batch.push(r),
                Err(_) => stats.invalid += 1,
            }
            if batch.len() == 1024 {
                stats.stored += self.insert_batch(&batch)?;
                batch.clear();
            }
        }
        stats.stored += self.insert_batch(&batch)?;
        Ok(stats)
    }

    #[cfg_attr(not(test), allow(dead_code))] // tests and future tools
    pub fn count(&self) -> Result<u64> {
        let conn = self
            .conn
            .lock()
            .map_err(|_| anyhow::anyhow!("audit store lock poisoned"))?;
        Ok(conn.query_row("SELECT COUNT(*) FROM audit", [], |r| r.get::<_, i64>(0))? as u64)
    }

    #[cfg_attr(not(test), allow(dead_code))] // tests and future tools
    pub fn get(&self, request_id: &str) -> Result<Option<AuditRecord>> {
        let conn = self
            .conn
            .lock()
            .map_err(|_| anyhow::anyhow!("audit store lock poisoned"))?;
        let json: Option<String> = conn
            .query_row(
                "SELECT record FROM audit WHERE request_id = ?1",
                [request_id],
                |r| r.get(0),
            )
            .optional()?;
        Ok(match json {
            Some(j) => Some(serde_json::from_str(&j)?),
            None => None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tollgate_core::audit::{Outcome, Reason};

    fn record(id: &str, complete: bool) -> AuditRecord {
        AuditRecord {
            request_id: id.into(),
            complete,
            route: "anthropic.messages".into(),
            status: if complete { 200 } else { 0 },
            ..Default::default()
        }
    }

    #[test]
    fn inserts_are_idempotent_by_request_id_and_complete_wins() {
        let dir = tempfile::tempdir().unwrap();
        let store = AuditStore::open(&dir.path().join("a.db")).unwrap();
        assert_eq!(store.insert_batch(&[record("r1", false)]).unwrap(), 1);
        assert_eq!(
            store.insert_batch(&[record("r1", false)]).unwrap(),
            0,
            "same provisional twice: no change"
        );
        assert_eq!(
            store.insert_batch(&[record("r1", true)]).unwrap(),
            1,
            "complete replaces provisional"
        );
        assert_eq!(
            store.insert_batch(&[record("r1", false)]).unwrap(),
            0,
            "provisional never replaces complete"
        );
        assert_eq!(store.insert_batch(&[record("r1", true)]).unwrap(), 0);
        assert_eq!(store.count().unwrap(), 1);
        assert_eq!(store.get("r1").unwrap().unwrap().status, 200);
    }

    #[test]
    fn tail_is_newest_first_and_keeps_the_whole_record() {
        let dir = tempfile::tempdir().unwrap();
        let store = AuditStore::open(&dir.path().join("a.db")).unwrap();
        let mut a = record("a", true);
        a.timestamp_ms = 1;
        a.decision = Outcome::Denied;
        a.reason = Reason::RateLimited;
        let mut b = record("b", true);
        b.timestamp_ms = 2;
        store.insert_batch(&[a.clone(), b]).unwrap();
        let t = store.tail(10).unwrap();
        assert_eq!(
            t.iter().map(|r| r.request_id.as_str()).collect::<Vec<_>>(),
            ["b", "a"]
        );
        assert_eq!(t[1], a);
    }

    #[test]
    fn reading_a_missing_database_says_how_to_create_one() {
        let err = AuditStore::open_existing(Path::new("/nonexistent/audit.db"))
            .err()
            .unwrap()
            .to_string();
        assert!(err.starts_with("no audit database at /nonexistent/audit.db — start the gateway with `tollgate run`"), "{err}");
    }
}
