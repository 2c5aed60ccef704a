//! The SQLite backend: one file next to the gateway's state, in WAL mode so
//! `tollgate audit tail` and `tollgate usage` read while the collector
//! writes.

use super::{
    insert_each, record_params, schema, AuditBackend, Columns, InsertTx, Param, RecordRow, Stored,
    COMPLETE, INSERT, PROVISIONAL,
};
use anyhow::{Context, Result};
use rusqlite::{CachedStatement, OptionalExtension, ToSql};
use std::path::Path;
use std::sync::{Mutex, MutexGuard};
use tollgate_core::audit::AuditRecord;

pub struct SqliteStore {
    conn: Mutex<rusqlite::Connection>,
}

impl SqliteStore {
    /// Opens (creating it and its directory if needed) the database at `path`.
    pub fn open(path: &Path) -> Result<SqliteStore> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let conn = rusqlite::Connection::open(path)
            .with_context(|| format!("opening audit database {}", path.display()))?;
        // WAL lets readers work while the collector writes; NORMAL syncs at
        // checkpoints only, so a commit is a WAL append (a power cut may lose
        // the last commits; the file access log keeps them).
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.execute_batch(&schema("INTEGER PRIMARY KEY"))?;
        Ok(SqliteStore {
            conn: Mutex::new(conn),
        })
    }

    fn lock(&self) -> Result<MutexGuard<'_, rusqlite::Connection>> {
        self.conn
            .lock()
            .map_err(|_| anyhow::anyhow!("audit store lock poisoned"))
    }
}

/// The shared SQL with SQLite's numbered parameters. SQLite reads `$1` as a
/// parameter *named* `$1` and numbers it by first appearance, so in
/// [`COMPLETE`] (whose `$1` comes last) positions would shift; `?1` is
/// parameter 1 wherever it appears.
fn numbered(sql: &str) -> String {
    sql.replace('$', "?")
}

/// The prepared statements of one insert transaction.
struct Tx<'c> {
    insert: CachedStatement<'c>,
    provisional: CachedStatement<'c>,
    complete: CachedStatement<'c>,
}

impl InsertTx for Tx<'_> {
    fn insert(&mut self, row: &RecordRow<'_>) -> Result<bool> {
        Ok(self.insert.execute(&record_params!(row, &dyn ToSql)[..])? == 1)
    }

    fn provisional(&mut self, request_id: &str) -> Result<Option<String>> {
        Ok(self
            .provisional
            .query_row([request_id], |r| r.get("record"))
            .optional()?)
    }

    fn complete(&mut self, row: &RecordRow<'_>) -> Result<bool> {
        Ok(self
            .complete
            .execute(&record_params!(row, &dyn ToSql)[..])?
            == 1)
    }
}

impl AuditBackend for SqliteStore {
    fn insert_batch(&self, records: &[AuditRecord]) -> Result<Vec<Stored>> {
        let mut conn = self.lock()?;
        let tx = conn.transaction()?;
        let stored = insert_each(
            &mut Tx {
                insert: tx.prepare_cached(&numbered(INSERT))?,
                provisional: tx.prepare_cached(&numbered(PROVISIONAL))?,
                complete: tx.prepare_cached(&numbered(COMPLETE))?,
            },
            records,
        )?;
        tx.commit()?;
        Ok(stored)
    }

    fn query(
        &self,
        sql: &str,
        params: &[Param<'_>],
        each: &mut dyn FnMut(&dyn Columns) -> Result<()>,
    ) -> Result<()> {
        let conn = self.lock()?;
        let mut stmt = conn.prepare_cached(&numbered(sql))?;
        let params: Vec<&dyn ToSql> = params
            .iter()
            .map(|p| match p {
                Param::Int(v) => v as &dyn ToSql,
                Param::Text(v) => v as &dyn ToSql,
            })
            .collect();
        let mut rows = stmt.query(params.as_slice())?;
        while let Some(row) = rows.next()? {
            each(row)?;
        }
        Ok(())
    }

    fn day_expr(&self) -> &'static str {
        "date(timestamp_ms / 1000, 'unixepoch')"
    }
}

impl Columns for rusqlite::Row<'_> {
    fn nullable_int(&self, column: &str) -> Result<Option<i64>> {
        self.get(column).with_context(|| format!("column {column}"))
    }
    fn nullable_real(&self, column: &str) -> Result<Option<f64>> {
        self.get(column).with_context(|| format!("column {column}"))
    }
    fn nullable_text(&self, column: &str) -> Result<Option<String>> {
        self.get(column).with_context(|| format!("column {column}"))
    }
}
