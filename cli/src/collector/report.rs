//! Usage reports over the audit store: requests, tokens by class, cost and
//! denials by reason, grouped by one identity attribute, model or day. The
//! JSON form is stable (see docs/audit.md) and shared by `tollgate usage`,
//! the collector's `/api/usage` and its dashboard.

use super::store::AuditStore;
use anyhow::{bail, Result};
use serde::Serialize;
use std::collections::BTreeMap;

/// What rows are grouped by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
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
    fn sql(self, store: &AuditStore) -> &'static str {
        match self {
            GroupBy::Key => "COALESCE(key_id, '(no key)')",
            GroupBy::User => "COALESCE(\"user\", '(none)')",
            GroupBy::Team => "COALESCE(team, '(none)')",
            GroupBy::Project => "COALESCE(project, '(none)')",
            GroupBy::App => "COALESCE(app, '(none)')",
            GroupBy::Agent => "COALESCE(agent, '(none)')",
            GroupBy::Model => "COALESCE(model_served, model_requested, '(none)')",
            GroupBy::Day => store.day_expr(),
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
    let unit = |c: char| match c {
        'd' => Some(86_400_000u64),
        'h' => Some(3_600_000),
        'm' => Some(60_000),
        's' => Some(1_000),
        _ => None,
    };
    if let Some(last) = s.chars().last() {
        if let (Some(mult), Ok(n)) = (unit(last), s[..s.len() - last.len_utf8()].parse::<u64>()) {
            return Ok(now_ms.saturating_sub(n.saturating_mul(mult)));
        }
    }
    match tollgate_core::time::parse_rfc3339(s) {
        Ok(ms) => Ok(ms),
        Err(_) => bail!("--since {s:?}: use a duration such as 7d, 24h, 30m or an RFC 3339 time"),
    }
}

impl AuditStore {
    /// Aggregates complete and provisional records since `since_ms`.
    pub fn report(&self, by: GroupBy, since_ms: u64) -> Result<Report> {
        // Portable SQL for SQLite and PostgreSQL: CASE sums, and BIGINT casts
        // because PostgreSQL sums BIGINT columns into NUMERIC.
        let sql = format!(
            "SELECT {g} AS name, COUNT(*),
                    SUM(CASE WHEN decision = 'allowed' THEN 1 ELSE 0 END),
                    SUM(CASE WHEN decision = 'denied' THEN 1 ELSE 0 END),
                    CAST(COALESCE(SUM(input_tokens), 0) AS BIGINT), CAST(COALESCE(SUM(output_tokens), 0) AS BIGINT),
                    CAST(COALESCE(SUM(cache_write_tokens), 0) AS BIGINT), CAST(COALESCE(SUM(cache_read_tokens), 0) AS BIGINT),
                    COALESCE(SUM(cost_usd), 0)
             FROM audit WHERE timestamp_ms >= $1 GROUP BY 1",
            g = by.sql(self)
        );
        let mut rows: BTreeMap<String, Row> = self
            .rows(&sql, since_ms as i64)?
            .into_iter()
            .map(|r| {
                let n = |i: usize| r.get(i).map(|c| c.int()).unwrap_or(0) as u64;
                let row = Row {
                    name: r.first().map(|c| c.text()).unwrap_or_default(),
                    requests: n(1),
                    allowed: n(2),
                    denied: n(3),
                    input_tokens: n(4),
                    output_tokens: n(5),
                    cache_write_tokens: n(6),
                    cache_read_tokens: n(7),
                    cost_usd: r.get(8).map(|c| c.real()).unwrap_or(0.0),
                    denials: BTreeMap::new(),
                };
                (row.name.clone(), row)
            })
            .collect();
        let sql = format!(
            "SELECT {g} AS name, reason, COUNT(*) FROM audit
             WHERE timestamp_ms >= $1 AND decision = 'denied' GROUP BY 1, 2",
            g = by.sql(self)
        );
        for r in self.rows(&sql, since_ms as i64)? {
            let (name, reason, n) = (r[0].text(), r[1].text(), r[2].int());
            if let Some(row) = rows.get_mut(&name) {
                row.denials.insert(reason, n as u64);
            }
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
            since_ms,
            rows,
            totals,
        })
    }
}

impl Report {
    pub fn to_csv(&self) -> String {
        let mut out = String::from("name,requests,allowed,denied,input_tokens,output_tokens,cache_write_tokens,cache_read_tokens,cost_usd,denials\n");
        for r in self.rows.iter().chain(std::iter::once(&self.totals)) {
            let denials: Vec<String> = r.denials.iter().map(|(k, v)| format!("{k}={v}")).collect();
            let name = if r.name.contains([',', '"']) {
                format!("\"{}\"", r.name.replace('"', "\"\""))
            } else {
                r.name.clone()
            };
            out.push_str(&format!(
                "{name},{},{},{},{},{},{},{},{:.6},{}\n",
                r.requests,
                r.allowed,
                r.denied,
                r.input_tokens,
                r.output_tokens,
                r.cache_write_tokens,
                r.cache_read_tokens,
                r.cost_usd,
                denials.join(" ")
            ));
        }
        out
    }

    pub fn to_table(&self) -> String {
        let mut out = format!(
            "{:<28} {:>8} {:>7} {:>10} {:>10} {:>10} {:>10} {:>11}  {}\n",
            format!("{:?}", self.by).to_lowercase(),
            "requests",
            "denied",
            "input",
            "output",
            "cache_wr",
            "cache_rd",
            "cost_usd",
            "denials"
        );
        for r in self.rows.iter().chain(std::iter::once(&self.totals)) {
            let denials: Vec<String> = r.denials.iter().map(|(k, v)| format!("{k}={v}")).collect();
            out.push_str(&format!(
                "{:<28} {:>8} {:>7} {:>10} {:>10} {:>10} {:>10} {:>11.6}  {}\n",
                r.name,
                r.requests,
                r.denied,
                r.input_tokens,
                r.output_tokens,
                r.cache_write_tokens,
                r.cache_read_tokens,
                r.cost_usd,
                denials.join(" ")
            ));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tollgate_core::audit::{AuditRecord, Outcome, Reason, Tokens};

    #[allow(clippy::too_many_arguments)]
    fn rec(
        id: &str,
        team: &str,
        model: &str,
        denied: Option<Reason>,
        input: u64,
        output: u64,
        cost: f64,
        t: u64,
    ) -> AuditRecord {
        AuditRecord {
            request_id: id.into(),
            timestamp_ms: t,
            complete: true,
            team: Some(team.into()),
            key_id: Some(format!("key-{team}")),
            model_served: Some(model.into()),
            route: "anthropic.messages".into(),
            decision: if denied.is_some() {
                Outcome::Denied
            } else {
                Outcome::Allowed
            },
            reason: denied.unwrap_or(Reason::Ok),
            status: if denied.is_some() { 429 } else { 200 },
            tokens: Tokens {
                input: Some(input),
                output: Some(output),
                cache_write: Some(0),
                cache_read: Some(3),
                ..Default::default()
            },
            cost_usd: Some(cost),
            ..Default::default()
        }
    }

    #[test]
    fn groups_sums_and_counts_denials_by_reason() {
        let dir = tempfile::tempdir().unwrap();
        let s = AuditStore::open(dir.path().join("a.db")).unwrap();
        let day = 86_400_000;
        s.insert_batch(&[
            rec("1", "payments", "m1", None, 10, 20, 0.5, 10 * day),
            rec("2", "payments", "m2", None, 1, 2, 0.25, 10 * day + 5),
            rec(
                "3",
                "payments",
                "m1",
                Some(Reason::RateLimited),
                0,
                0,
                0.0,
                11 * day,
            ),
            rec("4", "search", "m1", None, 100, 200, 2.0, 11 * day),
            rec("old", "search", "m1", None, 9, 9, 9.0, day),
        ])
        .unwrap();
        let r = s.report(GroupBy::Team, 2 * day).unwrap();
        assert_eq!(
            r.rows.iter().map(|r| r.name.as_str()).collect::<Vec<_>>(),
            ["search", "payments"],
            "most expensive first"
        );
        let p = &r.rows[1];
        assert_eq!(
            (
                p.requests,
                p.allowed,
                p.denied,
                p.input_tokens,
                p.output_tokens,
                p.cache_read_tokens
            ),
            (3, 2, 1, 11, 22, 9)
        );
        assert_eq!(p.cost_usd, 0.75);
        assert_eq!(p.denials.get("rate_limited"), Some(&1));
        assert_eq!((r.totals.requests, r.totals.cost_usd), (4, 2.75));
        let days = s.report(GroupBy::Day, 0).unwrap();
        assert_eq!(
            days.rows
                .iter()
                .map(|r| r.name.as_str())
                .collect::<Vec<_>>(),
            ["1970-01-02", "1970-01-11", "1970-01-12"]
        );
        let csv = s.report(GroupBy::Model, 2 * day).unwrap().to_csv();
        assert!(csv.starts_with("name,requests,allowed,denied,"));
        assert!(
            csv.contains("\nm1,3,2,1,110,220,0,9,2.500000,rate_limited=1\n"),
            "{csv}"
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
