//! The SQLite backend: one file next to the gateway's state, in WAL mode so
//! `tollgate audit tail` and `tollgate usage` read while the collector
//! writes.

use super::{
    alerts_table, audit_table, insert_each, migrating_key, record_params, AuditBackend, Columns,
    InsertTx, Param, RecordRow, Sql, Stored, ADDED_COLUMNS, COMPLETE, HORIZON, INDEXES, INSERT,
    PROVISIONAL, TABLES,
};
use anyhow::{Context, Result};
use rusqlite::{CachedStatement, OptionalExtension, ToSql, TransactionBehavior};
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
        let mut conn = rusqlite::Connection::open(path)
            .with_context(|| format!("opening audit database {}", path.display()))?;
        // WAL lets readers work while the collector writes; NORMAL syncs at
        // checkpoints only, so a commit is a WAL append (a power cut may lose
        // the last commits; the file access log keeps them).
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.execute_batch(&audit_table("audit", "INTEGER PRIMARY KEY"))?;
        add_columns(&conn)?;
        migrate_key(&mut conn)?;
        conn.execute_batch(TABLES)?;
        conn.execute_batch(&alerts_table("INTEGER PRIMARY KEY"))?;
        conn.execute_batch(INDEXES)?;
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

/// Adds the columns a store created before them lacks (SQLite has no
/// `ADD COLUMN IF NOT EXISTS`).
fn add_columns(conn: &rusqlite::Connection) -> Result<()> {
    let have = column_names(conn, "audit")?;
    for (column, kind) in ADDED_COLUMNS {
        if !have.iter().any(|c| c == column) {
            conn.execute_batch(&format!("ALTER TABLE audit ADD COLUMN {column} {kind}"))?;
        }
    }
    Ok(())
}

/// Whether `audit` still has the key on `request_id` alone: the automatic
/// index of the column's `UNIQUE` in stores made before `audit_request`.
fn keyed_by_id_alone(conn: &rusqlite::Connection) -> Result<bool> {
    let alone: i64 = conn.query_row(
        "SELECT COUNT(*) FROM pragma_index_list('audit') AS l
         WHERE l.\"unique\" = 1 AND l.origin = 'u'
           AND (SELECT group_concat(name) FROM pragma_index_info(l.name)) = 'request_id'",
        [],
        |r| r.get(0),
    )?;
    Ok(alone > 0)
}

/// Moves a store keyed by `request_id` alone to `audit_request`. SQLite
/// cannot drop a column's `UNIQUE`, so the table is rebuilt in one
/// transaction: a new table, every row copied with its `seq` (readers
/// resume from one with `since`), the old one dropped, the indexes made
/// again. Stores already migrated (the check is one query) are untouched.
fn migrate_key(conn: &mut rusqlite::Connection) -> Result<()> {
    if !keyed_by_id_alone(conn)? {
        return Ok(());
    }
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    // Another process may have migrated it before this one got the lock.
    if !keyed_by_id_alone(&tx)? {
        return Ok(());
    }
    let rows: i64 = tx.query_row("SELECT COUNT(*) FROM audit", [], |r| r.get(0))?;
    migrating_key(rows, move || {
        tx.execute_batch(&audit_table("audit_rekeyed", "INTEGER PRIMARY KEY"))?;
        let columns = column_names(&tx, "audit_rekeyed")?
            .iter()
            .map(|c| format!("\"{c}\""))
            .collect::<Vec<_>>()
            .join(", ");
        tx.execute_batch(&format!(
            "INSERT INTO audit_rekeyed ({columns}) SELECT {columns} FROM audit ORDER BY seq;
             DROP TABLE audit;
             ALTER TABLE audit_rekeyed RENAME TO audit;
             {INDEXES}"
        ))?;
        Ok(tx.commit()?)
    })
}

/// The columns of `table`.
fn column_names(conn: &rusqlite::Connection, table: &str) -> Result<Vec<String>> {
    let mut stmt = conn.prepare("SELECT name FROM pragma_table_info(?1)")?;
    let mut rows = stmt.query([table])?;
    let mut names = Vec::new();
    while let Some(row) = rows.next()? {
        names.push(row.get(0)?);
    }
    Ok(names)
}

/// Parameters as rusqlite takes them.
fn sql_params<'p>(params: &'p [Param<'_>]) -> Vec<&'p dyn ToSql> {
    params
        .iter()
        .map(|p| match p {
            Param::Int(v) => v as &dyn ToSql,
            Param::Text(v) => v as &dyn ToSql,
        })
        .collect()
}

/// Runs a statement on a connection or transaction.
fn execute_on(conn: &rusqlite::Connection, sql: &str, params: &[Param<'_>]) -> Result<u64> {
    let mut stmt = conn.prepare_cached(&numbered(sql))?;
    Ok(stmt.execute(sql_params(params).as_slice())? as u64)
}

/// Runs a read query on a connection or transaction.
fn query_on(
    conn: &rusqlite::Connection,
    sql: &str,
    params: &[Param<'_>],
    each: &mut dyn FnMut(&dyn Columns) -> Result<()>,
) -> Result<()> {
    let mut stmt = conn.prepare_cached(&numbered(sql))?;
    let mut rows = stmt.query(sql_params(params).as_slice())?;
    while let Some(row) = rows.next()? {
        each(row)?;
    }
    Ok(())
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

    fn provisional(&mut self, row: &RecordRow<'_>) -> Result<Option<String>> {
        Ok(self
            .provisional
            .query_row(rusqlite::params![row.request_id, row.timestamp_ms], |r| {
                r.get("record")
            })
            .optional()?)
    }

    fn complete(&mut self, row: &RecordRow<'_>) -> Result<bool> {
        Ok(self
            .complete
            .execute(&record_params!(row, &dyn ToSql)[..])?
            == 1)
    }
}

/// Statements of a retention step.
struct Step<'c>(&'c rusqlite::Transaction<'c>);

impl Sql for Step<'_> {
    fn execute(&mut self, sql: &str, params: &[Param<'_>]) -> Result<u64> {
        execute_on(self.0, sql, params)
    }

    fn query(
        &mut self,
        sql: &str,
        params: &[Param<'_>],
        each: &mut dyn FnMut(&dyn Columns) -> Result<()>,
    ) -> Result<()> {
        query_on(self.0, sql, params, each)
    }
}

impl AuditBackend for SqliteStore {
    /// In an immediate transaction: it takes the write lock before reading
    /// the horizon, so a retention step in another process cannot roll up
    /// a day between that read and the inserts.
    fn insert_batch(&self, records: &[AuditRecord]) -> Result<Vec<Stored>> {
        let mut conn = self.lock()?;
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let horizon: i64 = tx.query_row(HORIZON, [], |r| r.get(0))?;
        let stored = insert_each(
            &mut Tx {
                insert: tx.prepare_cached(&numbered(INSERT))?,
                provisional: tx.prepare_cached(&numbered(PROVISIONAL))?,
                complete: tx.prepare_cached(&numbered(COMPLETE))?,
            },
            records,
            horizon,
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
        query_on(&*self.lock()?, sql, params, each)
    }

    fn execute(&self, sql: &str, params: &[Param<'_>]) -> Result<u64> {
        execute_on(&*self.lock()?, sql, params)
    }

    /// SQLite has one writer at a time: an immediate transaction is the lock.
    fn retention_tx(&self, work: &mut dyn FnMut(&mut dyn Sql) -> Result<()>) -> Result<()> {
        let mut conn = self.lock()?;
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        work(&mut Step(&tx))?;
        tx.commit()?;
        Ok(())
    }

    fn day_expr(&self) -> &'static str {
        "date(timestamp_ms / 1000, 'unixepoch')"
    }

    // The `->` operators rather than `json_extract`: its `$` path would be
    // read as a parameter by `numbered`.
    fn cache_write_1h_expr(&self) -> &'static str {
        "COALESCE(record -> 'tokens' ->> 'cache_write_1h', 0)"
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
