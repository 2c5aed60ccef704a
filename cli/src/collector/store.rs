//! The audit store: one row per request id, in an embedded SQLite database
//! by default or in PostgreSQL (`--db postgres://…`) for teams that outgrow
//! one machine. Inserts are idempotent, so replaying the gRPC stream or
//! importing the file access log never duplicates a request. Both backends
//! run the same SQL (`$n` parameters, portable aggregates); only the day
//! expression and the schema's key column differ.

use anyhow::{Context, Result};
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

/// The one parameter (`$1`) of a read query.
enum Param<'a> {
    Int(i64),
    Text(&'a str),
}

#[derive(Clone)]
enum Db {
    Sqlite(Arc<Mutex<rusqlite::Connection>>),
    Postgres(Arc<Mutex<postgres::Client>>),
}

#[derive(Clone)]
pub struct AuditStore {
    db: Db,
}

/// One value of a query result.
#[derive(Debug, Clone, PartialEq)]
pub enum Cell {
    Null,
    Int(i64),
    Real(f64),
    Text(String),
}

impl Cell {
    pub fn int(&self) -> i64 {
        match self {
            Cell::Int(v) => *v,
            Cell::Real(v) => *v as i64,
            _ => 0,
        }
    }
    pub fn real(&self) -> f64 {
        match self {
            Cell::Int(v) => *v as f64,
            Cell::Real(v) => *v,
            _ => 0.0,
        }
    }
    pub fn text(&self) -> String {
        match self {
            Cell::Text(v) => v.clone(),
            Cell::Int(v) => v.to_string(),
            Cell::Real(v) => v.to_string(),
            Cell::Null => String::new(),
        }
    }
}

const COLUMNS: &str = "
    request_id    TEXT NOT NULL UNIQUE,
    timestamp_ms  BIGINT NOT NULL,
    complete      INTEGER NOT NULL,
    key_id        TEXT,
    \"user\"        TEXT,
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
    input_tokens  BIGINT,
    output_tokens BIGINT,
    cache_write_tokens BIGINT,
    cache_read_tokens  BIGINT,
    cost_usd      DOUBLE PRECISION,
    record        TEXT NOT NULL";

const INDEXES: &str = "
CREATE INDEX IF NOT EXISTS audit_time ON audit(timestamp_ms);
CREATE INDEX IF NOT EXISTS audit_key ON audit(key_id);";

const UPSERT: &str = "INSERT INTO audit (request_id, timestamp_ms, complete, key_id, \"user\", team, project, app, agent,
        route, model_requested, model_served, decision, reason, status,
        input_tokens, output_tokens, cache_write_tokens, cache_read_tokens, cost_usd, record)
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19, $20, $21)
     ON CONFLICT(request_id) DO UPDATE SET
        timestamp_ms = excluded.timestamp_ms, complete = excluded.complete, key_id = excluded.key_id,
        \"user\" = excluded.\"user\", team = excluded.team, project = excluded.project, app = excluded.app,
        agent = excluded.agent, route = excluded.route, model_requested = excluded.model_requested,
        model_served = excluded.model_served, decision = excluded.decision, reason = excluded.reason,
        status = excluded.status, input_tokens = excluded.input_tokens,
        output_tokens = excluded.output_tokens, cache_write_tokens = excluded.cache_write_tokens,
        cache_read_tokens = excluded.cache_read_tokens, cost_usd = excluded.cost_usd,
        record = excluded.record
     WHERE audit.complete = 0 AND excluded.complete = 1";

fn is_url(target: &str) -> bool {
    target.starts_with("postgres://") || target.starts_with("postgresql://")
}

/// The row values of one record, in UPSERT order.
struct RowValues {
    ints: [Option<i64>; 7],
    texts: [Option<String>; 13],
    cost: Option<f64>,
}

fn values(r: &AuditRecord) -> Result<RowValues> {
    let decision = serde_json::to_value(r.decision)?
        .as_str()
        .unwrap_or_default()
        .to_string();
    Ok(RowValues {
        ints: [
            Some(r.timestamp_ms as i64),
            Some(i64::from(r.complete)),
            Some(i64::from(r.status)),
            r.tokens.input.map(|v| v as i64),
            r.tokens.output.map(|v| v as i64),
            r.tokens.cache_write.map(|v| v as i64),
            r.tokens.cache_read.map(|v| v as i64),
        ],
        texts: [
            Some(r.request_id.clone()),
            r.key_id.clone(),
            r.user.clone(),
            r.team.clone(),
            r.project.clone(),
            r.app.clone(),
            r.agent.clone(),
            Some(r.route.clone()),
            r.model_requested.clone(),
            r.model_served.clone(),
            Some(decision),
            Some(r.reason.as_str().to_string()),
            Some(serde_json::to_string(r)?),
        ],
        cost: r.cost_usd,
    })
}

impl AuditStore {
    /// Opens (creating if needed) the store at a SQLite path or a
    /// `postgres://` URL.
    pub fn open(target: impl AsRef<Path>) -> Result<AuditStore> {
        let target = target.as_ref();
        let text = target.to_string_lossy();
        if is_url(&text) {
            let mut client = postgres::Client::connect(&text, postgres::NoTls)
                .with_context(|| format!("connecting to PostgreSQL {}", redact_url(&text)))?;
            client.batch_execute(&format!(
                "CREATE TABLE IF NOT EXISTS audit (seq BIGSERIAL PRIMARY KEY, {COLUMNS});{INDEXES}"
            ))?;
            return Ok(AuditStore {
                db: Db::Postgres(Arc::new(Mutex::new(client))),
            });
        }
        if let Some(dir) = target.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let conn = rusqlite::Connection::open(target)
            .with_context(|| format!("opening audit database {}", target.display()))?;
        // WAL lets `tollgate audit tail` read while the collector writes.
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.execute_batch(&format!(
            "CREATE TABLE IF NOT EXISTS audit (seq INTEGER PRIMARY KEY, {COLUMNS});{INDEXES}"
        ))?;
        Ok(AuditStore {
            db: Db::Sqlite(Arc::new(Mutex::new(conn))),
        })
    }

    /// Opens an existing store for reading; a missing SQLite file is an error
    /// that says how to create one.
    pub fn open_existing(target: impl AsRef<Path>) -> Result<AuditStore> {
        let path = target.as_ref();
        if !is_url(&path.to_string_lossy()) && !path.exists() {
            anyhow::bail!(
                "no audit database at {} — start the gateway with `tollgate run` (or `tollgate collector --db {}`) first",
                path.display(),
                path.display()
            );
        }
        AuditStore::open(path)
    }

    /// SQL for the UTC day of a record, per backend.
    pub fn day_expr(&self) -> &'static str {
        match self.db {
            Db::Sqlite(_) => "date(timestamp_ms / 1000, 'unixepoch')",
            Db::Postgres(_) => {
                "to_char(to_timestamp(timestamp_ms / 1000) AT TIME ZONE 'UTC', 'YYYY-MM-DD')"
            }
        }
    }

    /// Inserts records in one transaction. A complete record replaces a
    /// provisional one of the same request; nothing replaces a complete one.
    /// Returns how many rows were inserted or upgraded.
    pub fn insert_batch(&self, records: &[AuditRecord]) -> Result<usize> {
        let rows: Vec<RowValues> = records.iter().map(values).collect::<Result<_>>()?;
        let mut changed = 0usize;
        match &self.db {
            Db::Sqlite(c) => {
                let mut conn = c
                    .lock()
                    .map_err(|_| anyhow::anyhow!("audit store lock poisoned"))?;
                let tx = conn.transaction()?;
                {
                    let mut stmt = tx.prepare_cached(UPSERT)?;
                    for v in &rows {
                        let [ts, complete, status, input, output, cw, cr] = &v.ints;
                        let [id, key, user, team, project, app, agent, route, mreq, mserv, decision, reason, json] =
                            &v.texts;
                        changed += stmt.execute(rusqlite::params![
                            id, ts, complete, key, user, team, project, app, agent, route, mreq,
                            mserv, decision, reason, status, input, output, cw, cr, v.cost, json
                        ])?;
                    }
                }
                tx.commit()?;
            }
            Db::Postgres(c) => {
                let mut client = c
                    .lock()
                    .map_err(|_| anyhow::anyhow!("audit store lock poisoned"))?;
                let mut tx = client.transaction()?;
                let stmt = tx.prepare(UPSERT)?;
                for v in &rows {
                    let [ts, complete, status, input, output, cw, cr] = &v.ints;
                    let complete = complete.map(|c| c as i32);
                    let status = status.map(|s| s as i32);
                    let [id, key, user, team, project, app, agent, route, mreq, mserv, decision, reason, json] =
                        &v.texts;
                    changed += tx.execute(
                        &stmt,
                        &[
                            id, ts, &complete, key, user, team, project, app, agent, route, mreq,
                            mserv, decision, reason, &status, input, output, cw, cr, &v.cost, json,
                        ],
                    )? as usize;
                }
                tx.commit()?;
            }
        }
        Ok(changed)
    }

    /// Runs a read query with one integer parameter (`$1`).
    pub fn rows(&self, sql: &str, param: i64) -> Result<Vec<Vec<Cell>>> {
        self.query(sql, Param::Int(param))
    }

    fn query(&self, sql: &str, param: Param<'_>) -> Result<Vec<Vec<Cell>>> {
        match &self.db {
            Db::Sqlite(c) => {
                let conn = c
                    .lock()
                    .map_err(|_| anyhow::anyhow!("audit store lock poisoned"))?;
                let mut stmt = conn.prepare(sql)?;
                let n = stmt.column_count();
                let param: &dyn rusqlite::ToSql = match &param {
                    Param::Int(v) => v,
                    Param::Text(v) => v,
                };
                let rows = stmt.query_map([param], |row| {
                    (0..n)
                        .map(|i| {
                            Ok(match row.get_ref(i)? {
                                rusqlite::types::ValueRef::Null => Cell::Null,
                                rusqlite::types::ValueRef::Integer(v) => Cell::Int(v),
                                rusqlite::types::ValueRef::Real(v) => Cell::Real(v),
                                rusqlite::types::ValueRef::Text(t)
                                | rusqlite::types::ValueRef::Blob(t) => {
                                    Cell::Text(String::from_utf8_lossy(t).into_owned())
                                }
                            })
                        })
                        .collect::<rusqlite::Result<Vec<Cell>>>()
                })?;
                Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
            }
            Db::Postgres(c) => {
                let mut client = c
                    .lock()
                    .map_err(|_| anyhow::anyhow!("audit store lock poisoned"))?;
                let param: &(dyn postgres::types::ToSql + Sync) = match &param {
                    Param::Int(v) => v,
                    Param::Text(v) => v,
                };
                let mut out = Vec::new();
                for row in client.query(sql, &[param])? {
                    let mut cells = Vec::with_capacity(row.len());
                    for (i, col) in row.columns().iter().enumerate() {
                        use postgres::types::Type;
                        let t = col.type_();
                        cells.push(if *t == Type::INT8 {
                            row.get::<_, Option<i64>>(i).map_or(Cell::Null, Cell::Int)
                        } else if *t == Type::INT4 {
                            row.get::<_, Option<i32>>(i)
                                .map_or(Cell::Null, |v| Cell::Int(v.into()))
                        } else if *t == Type::FLOAT8 {
                            row.get::<_, Option<f64>>(i).map_or(Cell::Null, Cell::Real)
                        } else if *t == Type::NUMERIC {
                            anyhow::bail!("query returns NUMERIC in column {i}: CAST it to BIGINT")
                        } else {
                            row.get::<_, Option<String>>(i)
                                .map_or(Cell::Null, Cell::Text)
                        });
                    }
                    out.push(cells);
                }
                Ok(out)
            }
        }
    }

    fn records(&self, sql: &str, param: Param<'_>) -> Result<Vec<(i64, AuditRecord)>> {
        self.query(sql, param)?
            .into_iter()
            .map(|r| {
                let seq = r.first().map(Cell::int).unwrap_or_default();
                let json = r.get(1).map(Cell::text).unwrap_or_default();
                Ok((seq, serde_json::from_str(&json)?))
            })
            .collect()
    }

    /// The newest `n` records, newest first.
    pub fn tail(&self, n: usize) -> Result<Vec<AuditRecord>> {
        let rows = self.records(
            "SELECT seq, record FROM audit ORDER BY timestamp_ms DESC, seq DESC LIMIT $1",
            Param::Int(i64::try_from(n).unwrap_or(i64::MAX)),
        )?;
        Ok(rows.into_iter().map(|(_, r)| r).collect())
    }

    /// Records stored after `seq`, oldest first, with the last seq seen.
    pub fn since(&self, seq: i64) -> Result<(Vec<AuditRecord>, i64)> {
        let rows = self.records(
            "SELECT seq, record FROM audit WHERE seq > $1 ORDER BY seq",
            Param::Int(seq),
        )?;
        let last = rows.iter().map(|(s, _)| *s).max().unwrap_or(seq);
        Ok((rows.into_iter().map(|(_, r)| r).collect(), last))
    }

    /// The position of the newest stored row (0 when empty), for reading
    /// only what arrives after it with [`AuditStore::since`].
    pub fn last_seq(&self) -> Result<i64> {
        Ok(self
            .rows("SELECT COALESCE(MAX(seq), $1) FROM audit", 0)?
            .first()
            .and_then(|r| r.first())
            .map(Cell::int)
            .unwrap_or(0))
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
        Ok(self
            .rows("SELECT COUNT(*) FROM audit WHERE seq > $1", 0)?
            .first()
            .and_then(|r| r.first())
            .map(Cell::int)
            .unwrap_or(0) as u64)
    }

    #[cfg_attr(not(test), allow(dead_code))] // tests and future tools
    pub fn get(&self, request_id: &str) -> Result<Option<AuditRecord>> {
        let rows = self.records(
            "SELECT seq, record FROM audit WHERE request_id = $1",
            Param::Text(request_id),
        )?;
        Ok(rows.into_iter().next().map(|(_, r)| r))
    }
}

/// A connection URL with its password replaced, for messages.
fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let creds = &url[scheme + 3..at];
            let user = creds.split(':').next().unwrap_or_default();
            format!("{}{user}:***{}", &url[..scheme + 3], &url[at..])
        }
        _ => url.to_string(),
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
        let store = AuditStore::open(dir.path().join("a.db")).unwrap();
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
        let store = AuditStore::open(dir.path().join("a.db")).unwrap();
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
    fn get_finds_one_request_and_since_reads_only_newer_rows() {
        let dir = tempfile::tempdir().unwrap();
        let store = AuditStore::open(dir.path().join("a.db")).unwrap();
        assert_eq!(store.last_seq().unwrap(), 0);
        store
            .insert_batch(&[record("a", true), record("b", true)])
            .unwrap();
        let last = store.last_seq().unwrap();
        store.insert_batch(&[record("c", false)]).unwrap();
        assert_eq!(store.get("c").unwrap().unwrap(), record("c", false));
        assert_eq!(store.get("nope").unwrap(), None);
        let (new, next) = store.since(last).unwrap();
        assert_eq!(
            new.iter()
                .map(|r| r.request_id.as_str())
                .collect::<Vec<_>>(),
            ["c"]
        );
        assert_eq!(next, store.last_seq().unwrap());
        assert_eq!(store.since(next).unwrap(), (vec![], next));
    }

    #[test]
    fn columns_hold_what_usage_reports_aggregate() {
        let dir = tempfile::tempdir().unwrap();
        let store = AuditStore::open(dir.path().join("a.db")).unwrap();
        let mut r = record("r1", true);
        r.key_id = Some("alice-laptop".into());
        r.user = Some("alice".into());
        r.team = Some("payments".into());
        r.model_served = Some("claude-sonnet-4-5".into());
        r.tokens.input = Some(25);
        r.tokens.output = Some(120);
        r.tokens.cache_read = Some(1000);
        r.cost_usd = Some(0.5);
        store.insert_batch(&[r]).unwrap();
        let rows = store
            .rows(
                "SELECT key_id, \"user\", team, model_served, decision, reason, status,
                        input_tokens, output_tokens, cache_write_tokens, cache_read_tokens,
                        cost_usd, complete
                 FROM audit WHERE timestamp_ms >= $1",
                0,
            )
            .unwrap();
        assert_eq!(
            rows,
            [vec![
                Cell::Text("alice-laptop".into()),
                Cell::Text("alice".into()),
                Cell::Text("payments".into()),
                Cell::Text("claude-sonnet-4-5".into()),
                Cell::Text("allowed".into()),
                Cell::Text("ok".into()),
                Cell::Int(200),
                Cell::Int(25),
                Cell::Int(120),
                Cell::Null,
                Cell::Int(1000),
                Cell::Real(0.5),
                Cell::Int(1),
            ]]
        );
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
