//! The PostgreSQL backend, for teams that outgrow one machine: several
//! collectors may share one database, so a complete record locks the
//! provisional row it replaces. The statements are prepared once per
//! connection.

use super::{
    alerts_table, audit_table, insert_each, migrating_key, record_params, redact_url, AuditBackend,
    Columns, InsertTx, Param, RecordRow, Sql, Stored, ADDED_COLUMNS, COMPLETE, HORIZON, INDEXES,
    INSERT, PROVISIONAL, TABLES,
};
use anyhow::{Context, Result};
use postgres::types::ToSql;
use postgres::{Client, Statement, Transaction};
use std::sync::{Mutex, MutexGuard};
use tollgate_core::audit::AuditRecord;

pub struct PostgresStore {
    conn: Mutex<Connection>,
}

struct Connection {
    client: Client,
    statements: Statements,
}

struct Statements {
    /// The horizon, read under a share lock: a retention step (which locks
    /// the row for update) waits for the inserts under way, and inserts wait
    /// for it, so no record lands in a day as it is rolled up.
    horizon: Statement,
    insert: Statement,
    provisional: Statement,
    complete: Statement,
}

impl PostgresStore {
    /// Connects to `url` (`postgres://user:password@host:port/database`) and
    /// creates the table if needed. Plain TCP: keep the database on a
    /// private network.
    pub fn connect(url: &str) -> Result<PostgresStore> {
        let mut client = Client::connect(url, postgres::NoTls)
            .with_context(|| format!("connecting to PostgreSQL {}", redact_url(url)))?;
        client.batch_execute(&audit_table("audit", "BIGSERIAL PRIMARY KEY"))?;
        // Only the columns missing: an ALTER TABLE locks the table against
        // every other collector's inserts, even when it changes nothing.
        let have: Vec<String> = client
            .query(
                "SELECT CAST(column_name AS TEXT) FROM information_schema.columns
                 WHERE table_schema = current_schema() AND table_name = 'audit'",
                &[],
            )?
            .iter()
            .map(|row| row.get(0))
            .collect();
        for (column, kind) in ADDED_COLUMNS {
            if !have.iter().any(|c| c == column) {
                client.batch_execute(&format!(
                    "ALTER TABLE audit ADD COLUMN IF NOT EXISTS {column} {kind}"
                ))?;
            }
        }
        migrate_key(&mut client)?;
        client.batch_execute(TABLES)?;
        client.batch_execute(&alerts_table("BIGSERIAL PRIMARY KEY"))?;
        client.batch_execute(INDEXES)?;
        let statements = Statements {
            horizon: client.prepare(&format!("{HORIZON} FOR SHARE"))?,
            insert: client.prepare(INSERT)?,
            // Another collector may complete the same request concurrently.
            provisional: client.prepare(&format!("{PROVISIONAL} FOR UPDATE"))?,
            complete: client.prepare(COMPLETE)?,
        };
        Ok(PostgresStore {
            conn: Mutex::new(Connection { client, statements }),
        })
    }

    fn lock(&self) -> Result<MutexGuard<'_, Connection>> {
        self.conn
            .lock()
            .map_err(|_| anyhow::anyhow!("audit store lock poisoned"))
    }
}

/// The unique constraint on `request_id` alone of stores made before
/// `audit_request`, by name (`audit_request_id_key` unless renamed).
const KEYED_BY_ID_ALONE: &str = "SELECT CAST(c.conname AS TEXT) AS name FROM pg_constraint c
    JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = c.conkey[1]
    WHERE c.conrelid = to_regclass('audit') AND c.contype = 'u'
      AND cardinality(c.conkey) = 1 AND a.attname = 'request_id'";

/// Moves a store keyed by `request_id` alone to `audit_request`: the new
/// index is built, the old constraint dropped, in one transaction that
/// holds the table (other collectors' inserts wait; one that connects
/// meanwhile finds the work done). Only when the old key is there: a
/// migrated store costs one catalog query.
fn migrate_key(client: &mut Client) -> Result<()> {
    if client.query(KEYED_BY_ID_ALONE, &[])?.is_empty() {
        return Ok(());
    }
    let mut tx = client.transaction()?;
    tx.batch_execute("LOCK TABLE audit IN ACCESS EXCLUSIVE MODE")?;
    let old = tx.query(KEYED_BY_ID_ALONE, &[])?;
    if old.is_empty() {
        return Ok(());
    }
    let rows: i64 = tx
        .query_one("SELECT COUNT(*) FROM audit", &[])?
        .try_get(0)?;
    migrating_key(rows, move || {
        let mut sql = format!("{INDEXES};");
        for row in old {
            let name: String = row.try_get("name")?;
            sql.push_str(&format!(
                "ALTER TABLE audit DROP CONSTRAINT \"{}\";",
                name.replace('"', "\"\"")
            ));
        }
        tx.batch_execute(&sql)?;
        Ok(tx.commit()?)
    })
}

struct Tx<'c, 't> {
    tx: &'t mut Transaction<'c>,
    statements: &'t Statements,
}

impl InsertTx for Tx<'_, '_> {
    fn insert(&mut self, row: &RecordRow<'_>) -> Result<bool> {
        let params = record_params!(row, &(dyn ToSql + Sync));
        Ok(self.tx.execute(&self.statements.insert, &params)? == 1)
    }

    fn provisional(&mut self, row: &RecordRow<'_>) -> Result<Option<String>> {
        self.tx
            .query_opt(
                &self.statements.provisional,
                &[&row.request_id, &row.timestamp_ms],
            )?
            .map(|row| row.text("record"))
            .transpose()
    }

    fn complete(&mut self, row: &RecordRow<'_>) -> Result<bool> {
        let params = record_params!(row, &(dyn ToSql + Sync));
        Ok(self.tx.execute(&self.statements.complete, &params)? == 1)
    }
}

impl AuditBackend for PostgresStore {
    fn insert_batch(&self, records: &[AuditRecord]) -> Result<Vec<Stored>> {
        let mut conn = self.lock()?;
        let Connection { client, statements } = &mut *conn;
        let mut tx = client.transaction()?;
        let horizon: i64 = tx.query_one(&statements.horizon, &[])?.try_get(0)?;
        let stored = insert_each(
            &mut Tx {
                tx: &mut tx,
                statements,
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
        let mut conn = self.lock()?;
        for row in conn.client.query(sql, &pg_params(params))? {
            each(&row)?;
        }
        Ok(())
    }

    fn execute(&self, sql: &str, params: &[Param<'_>]) -> Result<u64> {
        Ok(self.lock()?.client.execute(sql, &pg_params(params))?)
    }

    /// Locks the horizon row for update: other collectors' retention steps
    /// and inserts wait until this transaction ends.
    fn retention_tx(&self, work: &mut dyn FnMut(&mut dyn Sql) -> Result<()>) -> Result<()> {
        let mut conn = self.lock()?;
        let mut tx = conn.client.transaction()?;
        tx.query_one(&format!("{HORIZON} FOR UPDATE"), &[])?;
        work(&mut Step(&mut tx))?;
        tx.commit()?;
        Ok(())
    }

    fn day_expr(&self) -> &'static str {
        "to_char(to_timestamp(timestamp_ms / 1000) AT TIME ZONE 'UTC', 'YYYY-MM-DD')"
    }

    fn cache_write_1h_expr(&self) -> &'static str {
        "COALESCE((record::json -> 'tokens' ->> 'cache_write_1h')::bigint, 0)"
    }
}

/// Parameters as the postgres crate takes them.
fn pg_params<'p>(params: &'p [Param<'_>]) -> Vec<&'p (dyn ToSql + Sync)> {
    params
        .iter()
        .map(|p| match p {
            Param::Int(v) => v as &(dyn ToSql + Sync),
            Param::Text(v) => v as &(dyn ToSql + Sync),
        })
        .collect()
}

/// Statements of a retention step.
struct Step<'t, 'c>(&'t mut Transaction<'c>);

impl Sql for Step<'_, '_> {
    fn execute(&mut self, sql: &str, params: &[Param<'_>]) -> Result<u64> {
        Ok(self.0.execute(sql, &pg_params(params))?)
    }

    fn query(
        &mut self,
        sql: &str,
        params: &[Param<'_>],
        each: &mut dyn FnMut(&dyn Columns) -> Result<()>,
    ) -> Result<()> {
        for row in self.0.query(sql, &pg_params(params))? {
            each(&row)?;
        }
        Ok(())
    }
}

impl Columns for postgres::Row {
    /// `BIGINT` columns and aggregates, and the `INTEGER` ones (`status`,
    /// `complete`).
    fn nullable_int(&self, column: &str) -> Result<Option<i64>> {
        match self.try_get::<_, Option<i64>>(column) {
            Ok(v) => Ok(v),
            Err(_) => Ok(self
                .try_get::<_, Option<i32>>(column)
                .with_context(|| format!("column {column} (CAST a NUMERIC sum to BIGINT)"))?
                .map(i64::from)),
        }
    }
    fn nullable_real(&self, column: &str) -> Result<Option<f64>> {
        self.try_get(column)
            .with_context(|| format!("column {column}"))
    }
    fn nullable_text(&self, column: &str) -> Result<Option<String>> {
        self.try_get(column)
            .with_context(|| format!("column {column}"))
    }
}
