//! Usage reports over the audit store: requests, tokens by class, cost and
//! denials by reason, grouped by one identity attribute, model or day. The
//! JSON form is stable (see docs/audit.md) and shared by `tollgate usage`,
//! the collector's `/api/usage` and its dashboard.

use super::filter::Filter;
use super::sheet::{self, Align, Column};
use super::store::{AuditBackend, Param};
use anyhow::{bail, Result};
use serde::Serialize;
use std::collections::BTreeMap;

/// What rows are grouped by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum GroupBy {
    Key,
    User,
    Team,
    Project,
    App,
    Agent,
    Model,
    Day,
}

impl GroupBy {
    /// The SQL value rows are grouped by, for a backend with `day_expr`.
    pub(super) fn sql(self, day_expr: &'static str) -> &'static str {
        match self {
            GroupBy::Key => "COALESCE(key_id, '(no key)')",
            GroupBy::User => "COALESCE(\"user\", '(none)')",
            GroupBy::Team => "COALESCE(team, '(none)')",
            GroupBy::Project => "COALESCE(project, '(none)')",
            GroupBy::App => "COALESCE(app, '(none)')",
            GroupBy::Agent => "COALESCE(agent, '(none)')",
            GroupBy::Model => "COALESCE(model_served, model_requested, '(none)')",
            GroupBy::Day => day_expr,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            GroupBy::Key => "key",
            GroupBy::User => "user",
            GroupBy::Team => "team",
            GroupBy::Project => "project",
            GroupBy::App => "app",
            GroupBy::Agent => "agent",
            GroupBy::Model => "model",
            GroupBy::Day => "day",
        }
    }

    pub fn parse(s: &str) -> Option<GroupBy> {
        <GroupBy as clap::ValueEnum>::from_str(s, true).ok()
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Row {
    pub name: String,
    pub requests: u64,
    pub allowed: u64,
    pub denied: u64,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cache_write_tokens: u64,
    pub cache_read_tokens: u64,
    pub cost_usd: f64,
    /// Denials by reason code (`rate_limited`, `model_not_allowed`, ...).
    pub denials: BTreeMap<String, u64>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    pub by: GroupBy,
    pub since_ms: u64,
    pub rows: Vec<Row>,
    pub totals: Row,
}

/// `7d`, `24h`, `30m`, `90s`, or an RFC 3339 time; returns Unix ms.
pub fn parse_since(s: &str, now_ms: u64) -> Result<u64> {
    if let Ok(ms) = crate::clock::parse_duration_ms(s) {
        return Ok(now_ms.saturating_sub(ms));
    }
    match tollgate_core::time::parse_rfc3339(s) {
        Ok(ms) => Ok(ms),
        Err(_) => bail!("--since {s:?}: use a duration such as 7d, 24h, 30m or an RFC 3339 time"),
    }
}

/// Where a report reads: raw records above the retention horizon, one per
/// request, and the daily rollups below it, one per day and group.
pub(super) struct Scan<'a> {
    pub table: &'static str,
    /// The requests a row stands for.
    pub requests: &'static str,
    /// The conditions selecting the view's rows of `table` ...
    pub filter: String,
    /// ... and their parameters.
    pub params: Vec<Param<'a>>,
}

/// The two scans of a view: raw records from the later of its start and
/// the horizon, and the rolled-up days before the horizon. A rolled-up day
/// is in the view when the view starts on or before its end: a view
/// reaching back past the horizon counts whole days (and an hourly series
/// puts a rolled-up day's sums at its first hour).
pub(super) fn scans<'a>(day_expr: &'static str, horizon: i64, filter: &'a Filter) -> [Scan<'a>; 2] {
    let since = i64::try_from(filter.since_ms).unwrap_or(i64::MAX);
    let scan = |table, requests, first: &str, bounds: [i64; 2]| {
        let mut params = bounds.map(Param::Int).to_vec();
        let rest = filter.conditions(day_expr, &mut params);
        Scan {
            table,
            requests,
            filter: format!("{first}{rest}"),
            params,
        }
    };
    [
        scan(
            "audit",
            "1",
            "timestamp_ms >= $1 AND timestamp_ms >= $2",
            [since, horizon],
        ),
        scan(
            "audit_daily",
            "requests",
            "timestamp_ms >= $1 AND timestamp_ms < $2",
            [super::retention::day_start(since), horizon],
        ),
    ]
}

/// Aggregates complete and provisional records in a view: the body of
/// [`AuditBackend::usage`].
pub(super) fn build<B: AuditBackend + ?Sized>(
    store: &B,
    by: GroupBy,
    view: &Filter,
) -> Result<Report> {
    let group = by.sql(store.day_expr());
    let horizon = store.horizon()?;
    let mut rows: BTreeMap<String, Row> = BTreeMap::new();
    for scan in scans(store.day_expr(), horizon, view) {
        let Scan {
            table,
            requests: n,
            filter,
            params,
        } = scan;
        // Portable SQL for SQLite and PostgreSQL: CASE sums, and BIGINT casts
        // because PostgreSQL sums BIGINT columns into NUMERIC.
        store.query(
            &format!(
                "SELECT {group} AS name, CAST(SUM({n}) AS BIGINT) AS requests,
                    CAST(SUM(CASE WHEN decision = 'allowed' THEN {n} ELSE 0 END) AS BIGINT) AS allowed,
                    CAST(SUM(CASE WHEN decision = 'denied' THEN {n} ELSE 0 END) AS BIGINT) AS denied,
                    CAST(COALESCE(SUM(input_tokens), 0) AS BIGINT) AS input_tokens,
                    CAST(COALESCE(SUM(output_tokens), 0) AS BIGINT) AS output_tokens,
                    CAST(COALESCE(SUM(cache_write_tokens), 0) AS BIGINT) AS cache_write_tokens,
                    CAST(COALESCE(SUM(cache_read_tokens), 0) AS BIGINT) AS cache_read_tokens,
                    COALESCE(SUM(cost_usd), 0) AS cost_usd
                 FROM {table} WHERE {filter} GROUP BY 1"
            ),
            &params,
            &mut |r| {
                let row = rows.entry(r.text("name")?).or_default();
                row.requests += r.count("requests")?;
                row.allowed += r.count("allowed")?;
                row.denied += r.count("denied")?;
                row.input_tokens += r.count("input_tokens")?;
                row.output_tokens += r.count("output_tokens")?;
                row.cache_write_tokens += r.count("cache_write_tokens")?;
                row.cache_read_tokens += r.count("cache_read_tokens")?;
                row.cost_usd += r.real("cost_usd")?;
                Ok(())
            },
        )?;
        store.query(
            &format!(
                "SELECT {group} AS name, reason, CAST(SUM({n}) AS BIGINT) AS denials FROM {table}
                 WHERE {filter} AND decision = 'denied' GROUP BY 1, 2"
            ),
            &params,
            &mut |r| {
                if let Some(row) = rows.get_mut(&r.text("name")?) {
                    *row.denials.entry(r.text("reason")?).or_default() += r.count("denials")?;
                }
                Ok(())
            },
        )?;
    }
    for (name, row) in rows.iter_mut() {
        row.name = name.clone();
    }
    let mut rows: Vec<Row> = rows.into_values().collect();
    if by == GroupBy::Day {
        rows.sort_by(|a, b| a.name.cmp(&b.name));
    } else {
        rows.sort_by(|a, b| {
            b.cost_usd
                .total_cmp(&a.cost_usd)
                .then(b.requests.cmp(&a.requests))
                .then(a.name.cmp(&b.name))
        });
    }
    let mut totals = Row {
        name: "total".into(),
        ..Default::default()
    };
    for r in &rows {
        totals.requests += r.requests;
        totals.allowed += r.allowed;
        totals.denied += r.denied;
        totals.input_tokens += r.input_tokens;
        totals.output_tokens += r.output_tokens;
        totals.cache_write_tokens += r.cache_write_tokens;
        totals.cache_read_tokens += r.cache_read_tokens;
        totals.cost_usd += r.cost_usd;
        for (k, v) in &r.denials {
            *totals.denials.entry(k.clone()).or_default() += v;
        }
    }
    Ok(Report {
        by,
        since_ms: view.since_ms,
        rows,
        totals,
    })
}

/// A number column: right-aligned, `width` wide in tables, `gap` spaces after
/// the previous one.
const fn number(
    table: Option<&'static str>,
    csv: &'static str,
    width: u16,
    value: fn(&Row) -> String,
) -> Column<Row> {
    Column {
        table,
        csv: Some(csv),
        width,
        gap: 1,
        align: Align::Right,
        value,
    }
}

impl Report {
    /// The report's columns, in order; the table names the first one after
    /// the grouping (`team`), CSV calls it `name`.
    fn columns(&self) -> [Column<Row>; 10] {
        [
            Column {
                table: Some(self.by.as_str()),
                csv: Some("name"),
                width: 28,
                gap: 0,
                align: Align::Left,
                value: |r| r.name.clone(),
            },
            number(Some("requests"), "requests", 8, |r| r.requests.to_string()),
            number(None, "allowed", 0, |r| r.allowed.to_string()),
            number(Some("denied"), "denied", 7, |r| r.denied.to_string()),
            number(Some("input"), "input_tokens", 10, |r| {
                r.input_tokens.to_string()
            }),
            number(Some("output"), "output_tokens", 10, |r| {
                r.output_tokens.to_string()
            }),
            number(Some("cache_wr"), "cache_write_tokens", 10, |r| {
                r.cache_write_tokens.to_string()
            }),
            number(Some("cache_rd"), "cache_read_tokens", 10, |r| {
                r.cache_read_tokens.to_string()
            }),
            number(Some("cost_usd"), "cost_usd", 11, |r| {
                format!("{:.6}", r.cost_usd)
            }),
            Column {
                table: Some("denials"),
                csv: Some("denials"),
                width: 0,
                gap: 2,
                align: Align::Left,
                value: |r| {
                    let denials: Vec<String> =
                        r.denials.iter().map(|(k, v)| format!("{k}={v}")).collect();
                    denials.join(" ")
                },
            },
        ]
    }

    /// The rows, then the totals: what both the table and the CSV print.
    fn lines(&self) -> impl Iterator<Item = &Row> {
        self.rows.iter().chain(std::iter::once(&self.totals))
    }

    pub fn to_csv(&self) -> Result<String> {
        sheet::csv(&self.columns(), self.lines())
    }

    pub fn to_table(&self) -> String {
        let mut out = sheet::table(&self.columns(), true, self.lines());
        out.push('\n');
        out
    }
}

#[cfg(test)]
mod tests {
    //! Aggregation runs on every backend: see the store's contract suite.
    use super::*;

    fn row(name: &str, requests: u64, denied: u64, denials: &[(&str, u64)]) -> Row {
        Row {
            name: name.into(),
            requests,
            allowed: requests - denied,
            denied,
            input_tokens: 108,
            output_tokens: 253,
            cache_write_tokens: 0,
            cache_read_tokens: 1207,
            cost_usd: 0.00448,
            denials: denials.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
        }
    }

    #[test]
    fn table_and_csv_print_every_row_then_the_totals() {
        let report = Report {
            by: GroupBy::Team,
            since_ms: 0,
            rows: vec![
                row("payments", 3, 1, &[("model_not_allowed", 1)]),
                row("a \"quoted\", multi\nline team", 2, 0, &[]),
            ],
            totals: row(
                "total",
                5,
                1,
                &[("model_not_allowed", 1), ("rate_limited", 0)],
            ),
        };
        assert_eq!(
            report.to_table(),
            "team                         requests  denied      input     output   cache_wr   cache_rd    cost_usd  denials
payments                            3       1        108        253          0       1207    0.004480  model_not_allowed=1
a \"quoted\", multi                   2       0        108        253          0       1207    0.004480
line team
total                               5       1        108        253          0       1207    0.004480  model_not_allowed=1 rate_limited=0
"
        );
        assert_eq!(
            report.to_csv().unwrap(),
            "name,requests,allowed,denied,input_tokens,output_tokens,cache_write_tokens,cache_read_tokens,cost_usd,denials
payments,3,2,1,108,253,0,1207,0.004480,model_not_allowed=1
\"a \"\"quoted\"\", multi
line team\",2,2,0,108,253,0,1207,0.004480,
total,5,4,1,108,253,0,1207,0.004480,model_not_allowed=1 rate_limited=0
"
        );
    }

    #[test]
    fn since_takes_durations_or_times() {
        assert_eq!(parse_since("7d", 10 * 86_400_000).unwrap(), 3 * 86_400_000);
        assert_eq!(parse_since("90s", 100_000).unwrap(), 10_000);
        assert_eq!(parse_since("1970-01-01T00:00:01Z", 0).unwrap(), 1000);
        assert_eq!(
            parse_since("last week", 0).unwrap_err().to_string(),
            "--since \"last week\": use a duration such as 7d, 24h, 30m or an RFC 3339 time"
        );
    }
}
