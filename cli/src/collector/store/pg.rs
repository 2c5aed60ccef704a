//! The PostgreSQL backend, for teams that outgrow one machine: several
//! collectors may share one database, so a complete record locks the
//! provisional row it replaces. The statements are prepared once per
//! connection.

use super::{
    insert_each, record_params, redact_url, schema, AuditBackend, Columns, InsertTx, Param,
    RecordRow, Stored, COMPLETE, INSERT, PROVISIONAL,
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
        client.batch_execute(&schema("BIGSERIAL PRIMARY KEY"))?;
        let statements = Statements {
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

struct Tx<'c, 't> {
    tx: &'t mut Transaction<'c>,
    statements: &'t Statements,
}

impl InsertTx for Tx<'_, '_> {
    fn insert(&mut self, row: &RecordRow<'_>) -> Result<bool> {
        let params = record_params!(row, &(dyn ToSql + Sync));
        Ok(self.tx.execute(&self.statements.insert, &params)? == 1)
    }

    fn provisional(&mut self, request_id: &str) -> Result<Option<String>> {
        self.tx
            .query_opt(&self.statements.provisional, &[&request_id])?
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
        let stored = insert_each(
            &mut Tx {
                tx: &mut tx,
                statements,
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
        let mut conn = self.lock()?;
        let params: Vec<&(dyn ToSql + Sync)> = params
            .iter()
            .map(|p| match p {
                Param::Int(v) => v as &(dyn ToSql + Sync),
                Param::Text(v) => v as &(dyn ToSql + Sync),
            })
            .collect();
        for row in conn.client.query(sql, &params)? {
            each(&row)?;
        }
        Ok(())
    }

    fn day_expr(&self) -> &'static str {
        "to_char(to_timestamp(timestamp_ms / 1000) AT TIME ZONE 'UTC', 'YYYY-MM-DD')"
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
