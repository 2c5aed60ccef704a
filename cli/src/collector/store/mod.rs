//! The audit store: one row per request, in an embedded SQLite database
//! by default or in PostgreSQL (`--db postgres://…`) for teams that outgrow
//! one machine. Inserts are idempotent, so replaying the gRPC stream or
//! importing the file access log never duplicates a request.
//!
//! A request is keyed by its start time and its id, `(timestamp_ms,
//! request_id)`, unique, in that order: every record of a request (the
//! provisional one, the complete one, and their copies from the gRPC stream,
//! a file import or `POST /api/ingest`) carries the time the filter set when
//! the request started, and new requests land at the index's right edge,
//! where one commit's records share a few pages. Envoy's ids are random
//! UUIDs: a key on the id alone took each record to a random page of its
//! index, rewritten per record at every commit (`docs/audit.md`, "Collector
//! cost"). Stores made with that key are migrated when opened.
//!
//! [`AuditBackend`] is what the collector and the CLI need from a store.
//! [`SqliteStore`] and [`PostgresStore`] implement its three primitives (a
//! batch insert, a read query, the day expression); every read is written
//! once on top of them, so both backends run the same SQL (`$n` parameters,
//! portable aggregates). [`AuditStore`] is an opened store of either kind,
//! picked by [`AuditStore::open`] from the target.
//!
//! Beside the `audit` table of raw records: `audit_daily`, the daily rollups
//! that retention (`retention.rs`) writes before it deletes expired records;
//! `audit_retention`, the horizon below which records live only in rollups;
//! and `audit_expired_seq`, the highest audit sequence number each Envoy had
//! among the expired records, so gaps (`gaps.rs`) are not reported where
//! retention deleted.

#[cfg(test)]
pub(crate) mod contract;
mod pg;
mod sqlite;

pub use pg::PostgresStore;
pub use sqlite::SqliteStore;

use super::filter::Filter;
use super::gaps::Gap;
use super::report::{GroupBy, Report};
use super::retention::Retained;
use super::series::{Bucket, Series};
use anyhow::{Context, Result};
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use tollgate_core::audit::{AuditRecord, Outcome};

/// What an import did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct ImportStats {
    /// Lines holding a record.
    pub lines: usize,
    /// Rows inserted or upgraded from provisional to complete.
    pub stored: usize,
    /// Records older than the retention horizon: their day lives only in
    /// the rollups, so they are not stored again.
    pub expired: usize,
    /// Lines that were not a valid record.
    pub invalid: usize,
}

impl ImportStats {
    /// Records the store already had (or a complete version of).
    pub fn duplicates(&self) -> usize {
        self.lines
            .saturating_sub(self.stored)
            .saturating_sub(self.expired)
            .saturating_sub(self.invalid)
    }

    /// Adds what storing a batch did.
    pub fn count(&mut self, stored: &[Stored]) {
        self.stored += stored.iter().filter(|s| s.changed()).count();
        self.expired += stored.iter().filter(|s| **s == Stored::Expired).count();
    }
}

/// One line of a JSON-lines audit log: `None` for a line without a record
/// (blank, or Envoy's `-` for an entry without Tollgate's filter state),
/// else the record or why the line is not one. A line may also be a record
/// wrapped by a log shipper that did not parse it: an object whose `log`
/// (Fluent Bit) or `message` (Vector) field holds the record's JSON.
pub fn parse_line(line: &str) -> Option<Result<AuditRecord, serde_json::Error>> {
    let line = line.trim();
    if line.is_empty() || line == "-" {
        return None;
    }
    let direct = serde_json::from_str::<AuditRecord>(line);
    if direct.is_ok() {
        return Some(direct);
    }
    #[derive(serde::Deserialize)]
    struct Shipped {
        log: Option<String>,
        message: Option<String>,
    }
    match serde_json::from_str::<Shipped>(line) {
        Ok(Shipped {
            log: Some(inner), ..
        })
        | Ok(Shipped {
            message: Some(inner),
            ..
        }) => match parse_line(&inner) {
            // A wrapper around a line without a record is such a line.
            None => None,
            Some(Ok(r)) => Some(Ok(r)),
            Some(Err(_)) => Some(direct),
        },
        _ => Some(direct),
    }
}

/// What storing one record did.
#[derive(Debug, Clone, PartialEq)]
pub enum Stored {
    /// The first record of its request: a new row.
    New,
    /// The complete record replaced this provisional one.
    Replaced(Box<AuditRecord>),
    /// The request already had this record or a complete one: no change.
    Kept,
    /// The record is older than the retention horizon: its day is already
    /// rolled up, so it is not stored (it would be counted twice).
    Expired,
}

impl Stored {
    pub fn changed(&self) -> bool {
        !matches!(self, Stored::Kept | Stored::Expired)
    }
}

/// A parameter of a query.
#[derive(Debug, Clone, Copy)]
pub enum Param<'a> {
    Int(i64),
    Text(&'a str),
}

/// Statements inside a transaction (see [`AuditBackend::retention_tx`]).
pub trait Sql {
    /// Runs a statement; how many rows it changed.
    fn execute(&mut self, sql: &str, params: &[Param<'_>]) -> Result<u64>;
    /// Runs a read query, handing each row to `each`.
    fn query(
        &mut self,
        sql: &str,
        params: &[Param<'_>],
        each: &mut dyn FnMut(&dyn Columns) -> Result<()>,
    ) -> Result<()>;
}

/// One row of a query result, read by column name (the `AS` alias).
pub trait Columns {
    fn nullable_int(&self, column: &str) -> Result<Option<i64>>;
    fn nullable_real(&self, column: &str) -> Result<Option<f64>>;
    fn nullable_text(&self, column: &str) -> Result<Option<String>>;

    fn int(&self, column: &str) -> Result<i64> {
        self.nullable_int(column)?
            .with_context(|| format!("column {column} is NULL"))
    }
    fn real(&self, column: &str) -> Result<f64> {
        self.nullable_real(column)?
            .with_context(|| format!("column {column} is NULL"))
    }
    fn text(&self, column: &str) -> Result<String> {
        self.nullable_text(column)?
            .with_context(|| format!("column {column} is NULL"))
    }
    /// A count or sum, which SQL types as signed.
    fn count(&self, column: &str) -> Result<u64> {
        Ok(u64::try_from(self.int(column)?).unwrap_or(0))
    }
}

/// One label set of the collector's metrics with its sums over every stored
/// row (see `metrics.rs`): what a restarted collector starts counting from.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SeriesTotals {
    pub team: String,
    pub app: String,
    pub agent: String,
    pub model: String,
    pub decision: String,
    pub reason: String,
    pub requests: u64,
    /// `input`, `output`, `cache_write`, `cache_read`.
    pub tokens: [u64; 4],
    pub cost_usd: f64,
}

/// What one identity used in a window (see [`AuditBackend::window_usage`]).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct IdentityUsage {
    pub key_id: Option<String>,
    pub user: Option<String>,
    pub team: Option<String>,
    pub project: Option<String>,
    pub app: Option<String>,
    pub agent: Option<String>,
    /// Every token of every class, as daily token quotas count them.
    pub tokens: u64,
    pub usd: f64,
}

/// An alert event to record once (see [`AuditBackend::record_alert`]).
#[derive(Debug, Clone, Copy)]
pub struct NewAlert<'a> {
    pub entity: &'a str,
    pub limit: &'a str,
    /// The threshold in millionths of the limit (0.8: 800,000), so equal
    /// thresholds compare equal in SQL.
    pub threshold_ppm: u32,
    pub window_start_ms: u64,
    /// The JSON body the webhook receives.
    pub event: &'a str,
    pub now_ms: u64,
}

/// An alert waiting for the webhook.
#[derive(Debug, Clone, PartialEq)]
pub struct PendingAlert {
    pub id: i64,
    pub event: String,
    /// Delivery attempts so far.
    pub attempts: u64,
}

/// A recorded alert, delivered or not.
#[cfg_attr(not(test), allow(dead_code))] // tests and future tools
#[derive(Debug, Clone, PartialEq)]
pub struct StoredAlert {
    pub entity: String,
    pub limit: String,
    pub threshold_ppm: u32,
    pub window_start_ms: u64,
    pub event: String,
    pub attempts: u64,
    pub delivered_ms: Option<u64>,
    pub last_error: Option<String>,
}

/// What the collector and the CLI need from an audit store.
pub trait AuditBackend: Send + Sync {
    /// Stores records in one transaction, in order. A new request (start
    /// time and id) is inserted; a complete record replaces a provisional one of the same
    /// request; nothing replaces a complete one. Says what happened to each
    /// record, in the order given.
    fn insert_batch(&self, records: &[AuditRecord]) -> Result<Vec<Stored>>;

    /// Runs a read query, handing each row to `each`.
    fn query(
        &self,
        sql: &str,
        params: &[Param<'_>],
        each: &mut dyn FnMut(&dyn Columns) -> Result<()>,
    ) -> Result<()>;

    /// SQL for the UTC day (`YYYY-MM-DD`) of a row's `timestamp_ms`.
    fn day_expr(&self) -> &'static str;

    /// Runs one statement in a transaction of its own; how many rows it
    /// changed.
    fn execute(&self, sql: &str, params: &[Param<'_>]) -> Result<u64>;

    /// Runs `work` in one transaction that holds the retention lock: no
    /// other retention step and no insert runs meanwhile (an insert reads
    /// the horizon under the same lock), so a day is rolled up exactly once
    /// and no record of it is stored after.
    fn retention_tx(&self, work: &mut dyn FnMut(&mut dyn Sql) -> Result<()>) -> Result<()>;

    /// The stored record of one request (the newest, should two requests
    /// share an id). No index leads with the id (see the module's doc), so
    /// this reads the key index through, whose entries hold the id: about
    /// 50 ms per million rows (`docs/audit.md`, "The request's key"). Tests
    /// and tools only; nothing on the collector's path looks a request up.
    #[cfg_attr(not(test), allow(dead_code))] // tests and future tools
    fn get(&self, request_id: &str) -> Result<Option<AuditRecord>> {
        let rows = records(
            self,
            "SELECT seq, record FROM audit WHERE request_id = $1
             ORDER BY timestamp_ms DESC, seq DESC LIMIT 1",
            &[Param::Text(request_id)],
        )?;
        Ok(rows.into_iter().next().map(|(_, r)| r))
    }

    /// The newest `n` records, newest first.
    fn tail(&self, n: usize) -> Result<Vec<AuditRecord>> {
        let rows = records(
            self,
            "SELECT seq, record FROM audit ORDER BY timestamp_ms DESC, seq DESC LIMIT $1",
            &[Param::Int(i64::try_from(n).unwrap_or(i64::MAX))],
        )?;
        Ok(rows.into_iter().map(|(_, r)| r).collect())
    }

    /// Records stored after `seq`, oldest first, with the last seq seen.
    fn since(&self, seq: i64) -> Result<(Vec<AuditRecord>, i64)> {
        let rows = records(
            self,
            "SELECT seq, record FROM audit WHERE seq > $1 ORDER BY seq",
            &[Param::Int(seq)],
        )?;
        let last = rows.iter().map(|(s, _)| *s).max().unwrap_or(seq);
        Ok((rows.into_iter().map(|(_, r)| r).collect(), last))
    }

    /// The position of the newest stored row (0 when empty), for reading
    /// only what arrives after it with [`AuditBackend::since`].
    fn last_seq(&self) -> Result<i64> {
        scalar(self, "SELECT COALESCE(MAX(seq), 0) AS n FROM audit")
    }

    /// How many requests are stored.
    #[cfg_attr(not(test), allow(dead_code))] // tests and future tools
    fn count(&self) -> Result<u64> {
        Ok(u64::try_from(scalar(self, "SELECT COUNT(*) AS n FROM audit")?).unwrap_or(0))
    }

    /// Usage since `since_ms`, grouped by `by` (see `report.rs`): raw
    /// records above the retention horizon, daily rollups below it.
    fn report(&self, by: GroupBy, since_ms: u64) -> Result<Report> {
        self.usage(by, &Filter::since(since_ms))
    }

    /// Usage in a view (a time range and filters), grouped by `by`.
    fn usage(&self, by: GroupBy, view: &Filter) -> Result<Report> {
        super::report::build(self, by, view)
    }

    /// A view's sums per UTC hour or day, every bucket of its range present
    /// (see `series.rs`).
    fn series(&self, view: &Filter, bucket: Bucket, now_ms: u64) -> Result<Series> {
        super::series::build(self, view, bucket, now_ms)
    }

    /// The newest `n` records of a view, newest first; only denials when
    /// `denied_only`. Rolled-up days have no records left to show.
    fn recent(&self, view: &Filter, denied_only: bool, n: usize) -> Result<Vec<AuditRecord>> {
        let mut params = vec![Param::Int(i64::try_from(view.since_ms).unwrap_or(i64::MAX))];
        let mut filter = view.conditions(self.day_expr(), &mut params);
        if denied_only {
            filter.push_str(" AND decision = 'denied'");
        }
        params.push(Param::Int(i64::try_from(n).unwrap_or(i64::MAX)));
        let rows = records(
            self,
            &format!(
                "SELECT seq, record FROM audit WHERE timestamp_ms >= $1{filter}
                 ORDER BY timestamp_ms DESC, seq DESC LIMIT ${}",
                params.len()
            ),
            &params,
        )?;
        Ok(rows.into_iter().map(|(_, r)| r).collect())
    }

    /// The retention horizon: records before it live only in the daily
    /// rollups (0 until retention first ran).
    fn horizon(&self) -> Result<i64> {
        scalar(self, HORIZON)
    }

    /// Rolls up and deletes the records older than `days` days before
    /// `now_ms` (whole UTC days), in small batches, until done or `stop` is
    /// set (see `retention.rs`).
    fn retain(&self, days: u32, now_ms: u64, stop: &AtomicBool) -> Result<Retained> {
        super::retention::run(self, days, now_ms, stop)
    }

    /// Runs of audit sequence numbers the store lacks, per Envoy, among the
    /// records since `since_ms`, whose next record started at or before
    /// `settled_ms` (see `gaps.rs`).
    fn gaps(&self, since_ms: u64, settled_ms: u64) -> Result<Vec<Gap>> {
        super::gaps::find(self, since_ms, settled_ms)
    }

    /// Every request summed by metric label set, busiest first: the raw
    /// records above the retention horizon and the rollups below it, in one
    /// aggregate query each. What a restarted collector starts counting from.
    fn series_totals(&self) -> Result<Vec<SeriesTotals>> {
        let horizon = self.horizon()?;
        let mut by_labels: std::collections::HashMap<[String; 6], SeriesTotals> =
            std::collections::HashMap::new();
        for (requests, from, filter) in [
            ("COUNT(*)", "audit", "timestamp_ms >= $1"),
            ("SUM(requests)", "audit_daily", "timestamp_ms < $1"),
        ] {
            self.query(
                &format!(
                    "SELECT COALESCE(team, '') AS team, COALESCE(app, '') AS app,
                        COALESCE(agent, '') AS agent,
                        COALESCE(model_served, model_requested, '') AS model,
                        decision, reason, CAST({requests} AS BIGINT) AS requests,
                        CAST(COALESCE(SUM(input_tokens), 0) AS BIGINT) AS input_tokens,
                        CAST(COALESCE(SUM(output_tokens), 0) AS BIGINT) AS output_tokens,
                        CAST(COALESCE(SUM(cache_write_tokens), 0) AS BIGINT) AS cache_write_tokens,
                        CAST(COALESCE(SUM(cache_read_tokens), 0) AS BIGINT) AS cache_read_tokens,
                        COALESCE(SUM(cost_usd), 0) AS cost_usd
                     FROM {from} WHERE {filter} GROUP BY 1, 2, 3, 4, 5, 6"
                ),
                &[Param::Int(horizon)],
                &mut |row| {
                    let t = SeriesTotals {
                        team: row.text("team")?,
                        app: row.text("app")?,
                        agent: row.text("agent")?,
                        model: row.text("model")?,
                        decision: row.text("decision")?,
                        reason: row.text("reason")?,
                        requests: row.count("requests")?,
                        tokens: [
                            row.count("input_tokens")?,
                            row.count("output_tokens")?,
                            row.count("cache_write_tokens")?,
                            row.count("cache_read_tokens")?,
                        ],
                        cost_usd: row.real("cost_usd")?,
                    };
                    let key = [
                        t.team.clone(),
                        t.app.clone(),
                        t.agent.clone(),
                        t.model.clone(),
                        t.decision.clone(),
                        t.reason.clone(),
                    ];
                    match by_labels.get_mut(&key) {
                        Some(sum) => {
                            sum.requests += t.requests;
                            for (s, n) in sum.tokens.iter_mut().zip(t.tokens) {
                                *s += n;
                            }
                            sum.cost_usd += t.cost_usd;
                        }
                        None => {
                            by_labels.insert(key, t);
                        }
                    }
                    Ok(())
                },
            )?;
        }
        let mut out: Vec<SeriesTotals> = by_labels.into_values().collect();
        out.sort_by(|a, b| {
            b.requests.cmp(&a.requests).then_with(|| {
                (&a.team, &a.app, &a.agent, &a.model, &a.decision, &a.reason).cmp(&(
                    &b.team,
                    &b.app,
                    &b.agent,
                    &b.model,
                    &b.decision,
                    &b.reason,
                ))
            })
        });
        Ok(out)
    }

    /// SQL for a row's 1-hour cache-write tokens, which have no column of
    /// their own (0 when the record has none).
    fn cache_write_1h_expr(&self) -> &'static str;

    /// What each identity used in `[start_ms, end_ms)`: raw records above
    /// the retention horizon, daily rollups below it (which carry no 1-hour
    /// cache writes). What the alerts start counting a window from.
    fn window_usage(&self, start_ms: u64, end_ms: u64) -> Result<Vec<IdentityUsage>> {
        let big = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        let (start, end) = (big(start_ms), big(end_ms));
        let horizon = self.horizon()?;
        let mut out = Vec::new();
        let tokens = "COALESCE(input_tokens, 0) + COALESCE(output_tokens, 0)
            + COALESCE(cache_write_tokens, 0) + COALESCE(cache_read_tokens, 0)";
        let raw = format!("{tokens} + {}", self.cache_write_1h_expr());
        for (from, sum, lo, hi) in [
            ("audit", raw.as_str(), start.max(horizon), end),
            ("audit_daily", tokens, start, end.min(horizon)),
        ] {
            if lo >= hi {
                continue;
            }
            self.query(
                &format!(
                    "SELECT key_id, \"user\" AS user_id, team, project, app, agent,
                        CAST(COALESCE(SUM({sum}), 0) AS BIGINT) AS tokens,
                        COALESCE(SUM(cost_usd), 0) AS usd
                     FROM {from} WHERE timestamp_ms >= $1 AND timestamp_ms < $2
                     GROUP BY 1, 2, 3, 4, 5, 6"
                ),
                &[Param::Int(lo), Param::Int(hi)],
                &mut |row| {
                    out.push(IdentityUsage {
                        key_id: row.nullable_text("key_id")?,
                        user: row.nullable_text("user_id")?,
                        team: row.nullable_text("team")?,
                        project: row.nullable_text("project")?,
                        app: row.nullable_text("app")?,
                        agent: row.nullable_text("agent")?,
                        tokens: row.count("tokens")?,
                        usd: row.real("usd")?,
                    });
                    Ok(())
                },
            )?;
        }
        Ok(out)
    }

    /// Records an alert event unless one of its (entity, limit, threshold,
    /// window) is already recorded, by this collector or any other sharing
    /// the store: `true` when this call recorded it (and so must send it).
    /// `delivered` records it as sent already (no webhook to send it to).
    fn record_alert(&self, alert: &NewAlert<'_>, delivered: bool) -> Result<bool> {
        let sql = if delivered {
            "INSERT INTO audit_alerts (entity, limit_name, threshold_ppm, window_start, event,
                created_ms, attempts, next_attempt_ms, delivered_ms)
             VALUES ($1, $2, $3, $4, $5, $6, 0, $6, $6)
             ON CONFLICT (entity, limit_name, threshold_ppm, window_start) DO NOTHING"
        } else {
            "INSERT INTO audit_alerts (entity, limit_name, threshold_ppm, window_start, event,
                created_ms, attempts, next_attempt_ms)
             VALUES ($1, $2, $3, $4, $5, $6, 0, $6)
             ON CONFLICT (entity, limit_name, threshold_ppm, window_start) DO NOTHING"
        };
        let big = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        Ok(self.execute(
            sql,
            &[
                Param::Text(alert.entity),
                Param::Text(alert.limit),
                Param::Int(i64::from(alert.threshold_ppm)),
                Param::Int(big(alert.window_start_ms)),
                Param::Text(alert.event),
                Param::Int(big(alert.now_ms)),
            ],
        )? == 1)
    }

    /// Undelivered alerts whose next attempt is due at `now_ms`, oldest
    /// first, at most `n`.
    fn due_alerts(&self, now_ms: u64, n: usize) -> Result<Vec<PendingAlert>> {
        let mut out = Vec::new();
        self.query(
            "SELECT id, event, attempts FROM audit_alerts
             WHERE delivered_ms IS NULL AND next_attempt_ms <= $1 ORDER BY id LIMIT $2",
            &[
                Param::Int(i64::try_from(now_ms).unwrap_or(i64::MAX)),
                Param::Int(i64::try_from(n).unwrap_or(i64::MAX)),
            ],
            &mut |row| {
                out.push(PendingAlert {
                    id: row.int("id")?,
                    event: row.text("event")?,
                    attempts: row.count("attempts")?,
                });
                Ok(())
            },
        )?;
        Ok(out)
    }

    /// Takes an alert for one delivery attempt, until `lease_until_ms`:
    /// `false` when it was delivered or taken meanwhile (another collector
    /// sharing the store), so an event is posted by one sender at a time.
    /// A sender that dies mid-attempt leaves the alert due again at the
    /// lease's end.
    fn claim_alert(&self, id: i64, now_ms: u64, lease_until_ms: u64) -> Result<bool> {
        let big = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        Ok(self.execute(
            "UPDATE audit_alerts SET attempts = attempts + 1, next_attempt_ms = $3
             WHERE id = $1 AND delivered_ms IS NULL AND next_attempt_ms <= $2",
            &[
                Param::Int(id),
                Param::Int(big(now_ms)),
                Param::Int(big(lease_until_ms)),
            ],
        )? == 1)
    }

    /// The webhook took the alert.
    fn alert_delivered(&self, id: i64, now_ms: u64) -> Result<()> {
        self.execute(
            "UPDATE audit_alerts SET delivered_ms = $2, last_error = NULL WHERE id = $1",
            &[
                Param::Int(id),
                Param::Int(i64::try_from(now_ms).unwrap_or(i64::MAX)),
            ],
        )?;
        Ok(())
    }

    /// The webhook refused the alert or could not be reached: try again at
    /// `retry_at_ms`.
    fn alert_failed(&self, id: i64, retry_at_ms: u64, error: &str) -> Result<()> {
        self.execute(
            "UPDATE audit_alerts SET next_attempt_ms = $2, last_error = $3 WHERE id = $1",
            &[
                Param::Int(id),
                Param::Int(i64::try_from(retry_at_ms).unwrap_or(i64::MAX)),
                Param::Text(error),
            ],
        )?;
        Ok(())
    }

    /// Every recorded alert, oldest first.
    #[cfg_attr(not(test), allow(dead_code))] // tests and future tools
    fn alerts(&self) -> Result<Vec<StoredAlert>> {
        let mut out = Vec::new();
        self.query(
            "SELECT entity, limit_name, threshold_ppm, window_start, event, attempts,
                delivered_ms, last_error
             FROM audit_alerts ORDER BY id",
            &[],
            &mut |row| {
                out.push(StoredAlert {
                    entity: row.text("entity")?,
                    limit: row.text("limit_name")?,
                    threshold_ppm: u32::try_from(row.int("threshold_ppm")?).unwrap_or(0),
                    window_start_ms: row.count("window_start")?,
                    event: row.text("event")?,
                    attempts: row.count("attempts")?,
                    delivered_ms: row
                        .nullable_int("delivered_ms")?
                        .map(|v| u64::try_from(v).unwrap_or(0)),
                    last_error: row.nullable_text("last_error")?,
                });
                Ok(())
            },
        )?;
        Ok(out)
    }

    /// Imports a JSON-lines audit log (Envoy's file access log): one record
    /// per line, lines without a record (`-`) skipped. Idempotent.
    fn import_jsonl(&self, path: &Path) -> Result<ImportStats> {
        use std::io::BufRead;
        const BATCH: usize = 1024;
        let file =
            std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
        let mut stats = ImportStats::default();
        let mut batch = Vec::with_capacity(BATCH);
        for line in std::io::BufReader::new(file).lines() {
            let Some(parsed) = parse_line(&line?) else {
                continue;
            };
            stats.lines += 1;
            match parsed {
                Ok(r) => batch.push(r),
                Err(_) => stats.invalid += 1,
            }
            if batch.len() == BATCH {
                stats.count(&self.insert_batch(&batch)?);
                batch.clear();
            }
        }
        stats.count(&self.insert_batch(&batch)?);
        Ok(stats)
    }
}

/// The one integer a query selects as `n` (0 without a row).
fn scalar<B: AuditBackend + ?Sized>(store: &B, sql: &str) -> Result<i64> {
    let mut n = 0;
    store.query(sql, &[], &mut |row| {
        n = row.int("n")?;
        Ok(())
    })?;
    Ok(n)
}

/// `(seq, record)` rows of a query selecting those two columns.
fn records<B: AuditBackend + ?Sized>(
    store: &B,
    sql: &str,
    params: &[Param<'_>],
) -> Result<Vec<(i64, AuditRecord)>> {
    let mut out = Vec::new();
    store.query(sql, params, &mut |row| {
        let json = row.text("record")?;
        let record = serde_json::from_str(&json)
            .with_context(|| format!("stored record is not valid: {json}"))?;
        out.push((row.int("seq")?, record));
        Ok(())
    })?;
    Ok(out)
}

/// An opened audit store of either backend; clones share the connection.
#[derive(Clone)]
pub struct AuditStore(Arc<dyn AuditBackend>);

impl std::ops::Deref for AuditStore {
    type Target = dyn AuditBackend;

    fn deref(&self) -> &Self::Target {
        &*self.0
    }
}

impl AuditStore {
    /// Opens (creating if needed) the store at a SQLite path or a
    /// `postgres://` URL.
    pub fn open(target: impl AsRef<Path>) -> Result<AuditStore> {
        let target = target.as_ref();
        let text = target.to_string_lossy();
        Ok(AuditStore(if is_url(&text) {
            Arc::new(PostgresStore::connect(&text)?)
        } else {
            Arc::new(SqliteStore::open(target)?)
        }))
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
}

fn is_url(target: &str) -> bool {
    target.starts_with("postgres://") || target.starts_with("postgresql://")
}

/// The `audit` table, after its key column (which differs per backend).
const COLUMNS: &str = "
    request_id    TEXT NOT NULL,
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
    record        TEXT NOT NULL,
    origin_envoy  TEXT,
    origin_seq    BIGINT";

/// Columns added to `audit` after its first release, with their types:
/// a store created before them gets them at open.
const ADDED_COLUMNS: [(&str, &str); 2] = [("origin_envoy", "TEXT"), ("origin_seq", "BIGINT")];

/// The tables besides `audit`. `audit_daily` holds one row per UTC day
/// (`timestamp_ms`: the day's start) and identity, model, decision and
/// reason, with the sums of the records it replaced.
const TABLES: &str = "
CREATE TABLE IF NOT EXISTS audit_daily (
    timestamp_ms  BIGINT NOT NULL,
    key_id        TEXT,
    \"user\"        TEXT,
    team          TEXT,
    project       TEXT,
    app           TEXT,
    agent         TEXT,
    model_requested TEXT,
    model_served  TEXT,
    decision      TEXT NOT NULL,
    reason        TEXT NOT NULL,
    requests      BIGINT NOT NULL,
    input_tokens  BIGINT NOT NULL,
    output_tokens BIGINT NOT NULL,
    cache_write_tokens BIGINT NOT NULL,
    cache_read_tokens  BIGINT NOT NULL,
    cost_usd      DOUBLE PRECISION NOT NULL);
CREATE INDEX IF NOT EXISTS audit_daily_time ON audit_daily(timestamp_ms);
CREATE TABLE IF NOT EXISTS audit_retention (
    id            INTEGER PRIMARY KEY CHECK (id = 1),
    horizon_ms    BIGINT NOT NULL);
INSERT INTO audit_retention (id, horizon_ms) VALUES (1, 0) ON CONFLICT (id) DO NOTHING;
CREATE TABLE IF NOT EXISTS audit_expired_seq (
    envoy         TEXT PRIMARY KEY,
    seq           BIGINT NOT NULL);";

/// `audit_alerts`: every alert event recorded, one per (entity, limit,
/// threshold, window) whichever collector saw the crossing, with its
/// delivery state (the outbox the webhook sender drains).
fn alerts_table(id_column: &str) -> String {
    format!(
        "CREATE TABLE IF NOT EXISTS audit_alerts (
    id            {id_column},
    entity        TEXT NOT NULL,
    limit_name    TEXT NOT NULL,
    threshold_ppm BIGINT NOT NULL,
    window_start  BIGINT NOT NULL,
    event         TEXT NOT NULL,
    created_ms    BIGINT NOT NULL,
    attempts      BIGINT NOT NULL,
    next_attempt_ms BIGINT NOT NULL,
    delivered_ms  BIGINT,
    last_error    TEXT,
    UNIQUE (entity, limit_name, threshold_ppm, window_start));
CREATE INDEX IF NOT EXISTS audit_alerts_due ON audit_alerts(next_attempt_ms)
    WHERE delivered_ms IS NULL;"
    )
}

/// `audit_request` is the request's key (see the module's doc): what
/// [`INSERT`] conflicts on, and [`PROVISIONAL`] and [`COMPLETE`] find.
/// `audit_origin` serves the gap search: each Envoy's numbers in order,
/// with the time each request started, read from the index alone.
/// `audit_key` (on `key_id`) is dropped from stores that have it: no query
/// could use it (they group and filter on `COALESCE(key_id, ..)`), and with
/// keys spread over its pages each commit rewrote about one of them per
/// record, as many pages as the rows themselves (`docs/audit.md`,
/// "Collector cost").
const INDEXES: &str = "
CREATE UNIQUE INDEX IF NOT EXISTS audit_request ON audit(timestamp_ms, request_id);
CREATE INDEX IF NOT EXISTS audit_time ON audit(timestamp_ms);
DROP INDEX IF EXISTS audit_key;
CREATE INDEX IF NOT EXISTS audit_origin ON audit(origin_envoy, origin_seq, timestamp_ms)
    WHERE origin_envoy IS NOT NULL;";

/// `CREATE TABLE` for `audit` (or a `table` that will become it), whose
/// row key is `seq_column`.
fn audit_table(table: &str, seq_column: &str) -> String {
    format!("CREATE TABLE IF NOT EXISTS {table} (seq {seq_column}, {COLUMNS});")
}

/// Stores with at least this many rows say on stderr that their key is
/// being migrated (see [`migrating_key`]): it takes seconds per million.
const MIGRATION_NOTICE_ROWS: i64 = 100_000;

/// Runs `migrate`, which moves a store of `rows` rows from the key on
/// `request_id` alone to `audit_request`, saying so on stderr when the
/// store is large enough to make the open slow.
fn migrating_key(rows: i64, migrate: impl FnOnce() -> Result<()>) -> Result<()> {
    let loud = rows >= MIGRATION_NOTICE_ROWS;
    if loud {
        eprintln!("migrating the audit store's request-id key: {rows} rows…");
    }
    let started = std::time::Instant::now();
    migrate().context("migrating the audit store's request-id key")?;
    if loud {
        eprintln!(
            "migrated the audit store's request-id key: {rows} rows in {:.1} s",
            started.elapsed().as_secs_f64()
        );
    }
    Ok(())
}

/// The retention horizon (one row).
pub(super) const HORIZON: &str = "SELECT horizon_ms AS n FROM audit_retention WHERE id = 1";

/// The first record of a request. Almost every record is one, so storing
/// it costs a single statement; a conflict falls back to [`PROVISIONAL`]
/// and [`COMPLETE`].
const INSERT: &str = "INSERT INTO audit (request_id, timestamp_ms, complete, key_id, \"user\", team, project, app, agent,
        route, model_requested, model_served, decision, reason, status,
        input_tokens, output_tokens, cache_write_tokens, cache_read_tokens, cost_usd, record,
        origin_envoy, origin_seq)
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19, $20, $21,
        $22, $23)
     ON CONFLICT (timestamp_ms, request_id) DO NOTHING";

/// The provisional record a complete one may replace: `$1` the request's
/// id, `$2` its start time, as in [`INSERT`].
const PROVISIONAL: &str =
    "SELECT record FROM audit WHERE timestamp_ms = $2 AND request_id = $1 AND complete = 0";

/// A complete record over a provisional one, with [`INSERT`]'s parameters.
const COMPLETE: &str = "UPDATE audit SET
        complete = $3, key_id = $4, \"user\" = $5, team = $6, project = $7,
        app = $8, agent = $9, route = $10, model_requested = $11, model_served = $12,
        decision = $13, reason = $14, status = $15, input_tokens = $16, output_tokens = $17,
        cache_write_tokens = $18, cache_read_tokens = $19, cost_usd = $20, record = $21,
        origin_envoy = $22, origin_seq = $23
     WHERE timestamp_ms = $2 AND request_id = $1 AND complete = 0";

/// The column values of one record, borrowed from it, in [`INSERT`]'s
/// parameter order. `complete` and `status` are `INTEGER` (32 bits in
/// PostgreSQL), the other numbers `BIGINT`.
struct RecordRow<'a> {
    request_id: &'a str,
    timestamp_ms: i64,
    complete: i32,
    key_id: Option<&'a str>,
    user: Option<&'a str>,
    team: Option<&'a str>,
    project: Option<&'a str>,
    app: Option<&'a str>,
    agent: Option<&'a str>,
    route: &'a str,
    model_requested: Option<&'a str>,
    model_served: Option<&'a str>,
    decision: &'static str,
    reason: &'static str,
    status: i32,
    input_tokens: Option<i64>,
    output_tokens: Option<i64>,
    cache_write_tokens: Option<i64>,
    cache_read_tokens: Option<i64>,
    cost_usd: Option<f64>,
    record: &'a str,
    origin_envoy: Option<&'a str>,
    origin_seq: Option<i64>,
}

/// The stored spelling of a decision (the record's JSON spelling).
pub(crate) fn decision_str(d: Outcome) -> &'static str {
    match d {
        Outcome::Allowed => "allowed",
        Outcome::Denied => "denied",
    }
}

impl<'a> RecordRow<'a> {
    fn new(r: &'a AuditRecord, json: &'a str) -> RecordRow<'a> {
        let big = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        RecordRow {
            request_id: &r.request_id,
            timestamp_ms: big(r.timestamp_ms),
            complete: i32::from(r.complete),
            key_id: r.key_id.as_deref(),
            user: r.user.as_deref(),
            team: r.team.as_deref(),
            project: r.project.as_deref(),
            app: r.app.as_deref(),
            agent: r.agent.as_deref(),
            route: &r.route,
            model_requested: r.model_requested.as_deref(),
            model_served: r.model_served.as_deref(),
            decision: decision_str(r.decision),
            reason: r.reason.as_str(),
            status: i32::from(r.status),
            input_tokens: r.tokens.input.map(big),
            output_tokens: r.tokens.output.map(big),
            cache_write_tokens: r.tokens.cache_write.map(big),
            cache_read_tokens: r.tokens.cache_read.map(big),
            cost_usd: r.cost_usd,
            record: json,
            origin_envoy: r.origin.as_ref().map(|o| o.envoy.as_str()),
            origin_seq: r.origin.as_ref().map(|o| big(o.seq)),
        }
    }
}

/// [`RecordRow`]'s fields as one driver's parameter list, in [`INSERT`]'s
/// order: `record_params!(row, &dyn rusqlite::ToSql)`.
macro_rules! record_params {
    ($row:expr, $param:ty) => {
        record_params!(@ $row, $param, request_id, timestamp_ms, complete, key_id, user, team,
            project, app, agent, route, model_requested, model_served, decision, reason, status,
            input_tokens, output_tokens, cache_write_tokens, cache_read_tokens, cost_usd, record,
            origin_envoy, origin_seq)
    };
    (@ $row:expr, $param:ty, $($field:ident),*) => {
        [$(&$row.$field as $param),*]
    };
}
pub(crate) use record_params;

/// The three statements of an insert transaction, on one backend.
trait InsertTx {
    /// [`INSERT`]: `true` when the row is new.
    fn insert(&mut self, row: &RecordRow<'_>) -> Result<bool>;
    /// [`PROVISIONAL`]: the stored record JSON, if provisional.
    fn provisional(&mut self, row: &RecordRow<'_>) -> Result<Option<String>>;
    /// [`COMPLETE`]: `true` when it replaced the provisional row.
    fn complete(&mut self, row: &RecordRow<'_>) -> Result<bool>;
}

/// The insert rules of [`AuditBackend::insert_batch`], written once for
/// both backends, for a transaction that read the retention `horizon` under
/// the retention lock. One JSON buffer serves the whole batch.
fn insert_each(
    tx: &mut impl InsertTx,
    records: &[AuditRecord],
    horizon: i64,
) -> Result<Vec<Stored>> {
    let mut json = Vec::with_capacity(1024);
    let mut out = Vec::with_capacity(records.len());
    for r in records {
        if i64::try_from(r.timestamp_ms).unwrap_or(i64::MAX) < horizon {
            out.push(Stored::Expired);
            continue;
        }
        json.clear();
        serde_json::to_writer(&mut json, r)?;
        let row = RecordRow::new(r, std::str::from_utf8(&json)?);
        out.push(if tx.insert(&row)? {
            Stored::New
        } else if !r.complete {
            // A provisional record never replaces anything.
            Stored::Kept
        } else {
            match tx.provisional(&row)? {
                Some(old) if tx.complete(&row)? => Stored::Replaced(Box::new(
                    serde_json::from_str(&old)
                        .with_context(|| format!("stored record is not valid: {old}"))?,
                )),
                _ => Stored::Kept,
            }
        });
    }
    Ok(out)
}

/// A connection URL with its password replaced, for messages.
pub(crate) fn redact_url(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => match rest.rsplit_once('@') {
            Some((creds, host)) => {
                let user = creds.split(':').next().unwrap_or_default();
                format!("{scheme}://{user}:***@{host}")
            }
            None => url.to_string(),
        },
        None => url.to_string(),
    }
}
