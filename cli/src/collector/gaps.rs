//! Audit gaps: each Envoy numbers its requests' records 1, 2, 3, … (the
//! record's `origin`), so a number the store lacks is a request whose every
//! record was lost on the way (a gRPC stream reset, a collector that was
//! down and a file that was never imported). Gaps are computed from the
//! store alone, so a record that arrives later (an import, `POST
//! /api/ingest`) fills its gap, and computing twice gives the same answer.
//!
//! A request's record reaches the collector when the request ends, so a
//! long stream looks missing until then: a gap counts once the record
//! *after* it is older than a settling delay (`settled_ms`). Numbers at or
//! below an Envoy's highest expired number (deleted by retention) are not
//! gaps.
//!
//! [`find`] searches the whole window in one query (`tollgate audit gaps`).
//! The collector's gauge is kept by a [`Tracker`] instead, which reads only
//! what is new each minute: the rows stored since (by row key), and the
//! numbers of the gaps it already knows, one indexed lookup each.

use super::sheet::{self, Align, Column};
use super::store::{AuditBackend, Param};
use anyhow::Result;
use serde::Serialize;
use std::collections::HashMap;
use tollgate_core::time::format_rfc3339;

/// Missing sequence numbers `from_seq..=to_seq` of one Envoy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Gap {
    pub envoy: String,
    pub from_seq: u64,
    pub to_seq: u64,
    /// Start of the request numbered just before the gap, when stored.
    pub after_ms: Option<u64>,
    /// Start of the request numbered just after the gap.
    pub before_ms: u64,
}

impl Gap {
    pub fn missing(&self) -> u64 {
        self.to_seq.saturating_sub(self.from_seq) + 1
    }
}

/// Each Envoy's rows from its first number since `$1` onwards, with the
/// number and start of the row before each one; only the first row and the
/// rows that follow a hole, whose next record started by `$2`. The window
/// starts at a number, not a time, so a request numbered after one inside
/// the window but started just before it still closes its gap.
const HOLES: &str = "WITH window_start AS (
        SELECT origin_envoy AS envoy, MIN(origin_seq) AS seq FROM audit
        WHERE timestamp_ms >= $1 AND origin_envoy IS NOT NULL GROUP BY origin_envoy),
     numbered AS (
        SELECT a.origin_envoy AS envoy, a.origin_seq AS seq, a.timestamp_ms AS ts,
            LAG(a.origin_seq) OVER (PARTITION BY a.origin_envoy ORDER BY a.origin_seq) AS prev_seq,
            LAG(a.timestamp_ms) OVER (PARTITION BY a.origin_envoy ORDER BY a.origin_seq) AS prev_ts
        FROM audit a JOIN window_start w ON a.origin_envoy = w.envoy AND a.origin_seq >= w.seq)
     SELECT envoy, seq, ts, prev_seq, prev_ts FROM numbered
     WHERE (prev_seq IS NULL OR seq > prev_seq + 1) AND ts <= $2
     ORDER BY envoy, seq";

/// The gaps of every Envoy with records since `since_ms` whose next record
/// started by `settled_ms`: the body of [`AuditBackend::gaps`].
pub(super) fn find<B: AuditBackend + ?Sized>(
    store: &B,
    since_ms: u64,
    settled_ms: u64,
) -> Result<Vec<Gap>> {
    let int = |v: u64| Param::Int(i64::try_from(v).unwrap_or(i64::MAX));
    let mut holes = Vec::new();
    store.query(HOLES, &[int(since_ms), int(settled_ms)], &mut |row| {
        holes.push((
            row.text("envoy")?,
            row.int("seq")?,
            row.int("ts")?,
            row.nullable_int("prev_seq")?,
            row.nullable_int("prev_ts")?,
        ));
        Ok(())
    })?;
    let mut expired: HashMap<String, i64> = HashMap::new();
    let mut gaps = Vec::new();
    for (envoy, seq, ts, prev_seq, prev_ts) in holes {
        let floor = match expired.get(&envoy) {
            Some(f) => *f,
            None => {
                let f = expired_seq(store, &envoy)?;
                expired.insert(envoy.clone(), f);
                f
            }
        };
        // The first row since `since_ms`: the row before it is older.
        let (prev_seq, prev_ts) = match prev_seq {
            Some(p) => (p, prev_ts),
            None => match stored_before(store, &envoy, seq)? {
                Some((p, t)) => (p, Some(t)),
                None => (0, None),
            },
        };
        let from = prev_seq.max(floor) + 1;
        if seq > from {
            gaps.push(Gap {
                envoy,
                from_seq: u64::try_from(from).unwrap_or(0),
                to_seq: u64::try_from(seq - 1).unwrap_or(0),
                after_ms: prev_ts
                    .filter(|_| prev_seq >= floor)
                    .and_then(|t| u64::try_from(t).ok()),
                before_ms: u64::try_from(ts).unwrap_or(0),
            });
        }
    }
    Ok(gaps)
}

/// The highest number of `envoy` retention deleted (0 if none).
fn expired_seq<B: AuditBackend + ?Sized>(store: &B, envoy: &str) -> Result<i64> {
    let mut seq = 0;
    store.query(
        "SELECT seq FROM audit_expired_seq WHERE envoy = $1",
        &[Param::Text(envoy)],
        &mut |row| {
            seq = row.int("seq")?;
            Ok(())
        },
    )?;
    Ok(seq)
}

/// The stored number of `envoy` just below `seq`, with its start.
fn stored_before<B: AuditBackend + ?Sized>(
    store: &B,
    envoy: &str,
    seq: i64,
) -> Result<Option<(i64, i64)>> {
    let mut out = None;
    store.query(
        "SELECT origin_seq, timestamp_ms FROM audit
         WHERE origin_envoy = $1 AND origin_seq < $2 ORDER BY origin_seq DESC LIMIT 1",
        &[Param::Text(envoy), Param::Int(seq)],
        &mut |row| {
            out = Some((row.int("origin_seq")?, row.int("timestamp_ms")?));
            Ok(())
        },
    )?;
    Ok(out)
}

/// The gaps of the store, followed incrementally: each [`Tracker::refresh`]
/// reads the rows stored since the last one (by row key, so rows stored by
/// another collector on the same database count too), the numbers of each
/// Envoy above the highest one it examined, and each known gap's numbers
/// (a late record fills it). Its gaps are those [`find`] lists, at a cost
/// per refresh that follows the traffic instead of the store's size.
#[derive(Debug, Default)]
pub struct Tracker {
    /// Row keys up to this one were read (two refreshes back: PostgreSQL
    /// may commit a row after one with a higher key, so the last stretch is
    /// read again).
    cursor: i64,
    previous: i64,
    envoys: HashMap<String, Followed>,
}

#[derive(Debug, Default)]
struct Followed {
    /// The highest number examined, and when its request started.
    examined: i64,
    examined_ms: Option<u64>,
    /// Known gaps at or below `examined`.
    gaps: Vec<Gap>,
}

impl Tracker {
    /// Reads what changed in the store, and forgets gaps whose next record
    /// started before `forget_before_ms`.
    pub fn refresh<B: AuditBackend + ?Sized>(
        &mut self,
        store: &B,
        forget_before_ms: u64,
    ) -> Result<()> {
        let mut last = self.cursor;
        let mut active = Vec::new();
        store.query(
            "SELECT origin_envoy AS envoy, MAX(seq) AS last FROM audit
             WHERE seq > $1 AND origin_envoy IS NOT NULL GROUP BY origin_envoy",
            &[Param::Int(self.previous)],
            &mut |row| {
                active.push(row.text("envoy")?);
                last = last.max(row.int("last")?);
                Ok(())
            },
        )?;
        self.previous = self.cursor;
        self.cursor = last;
        for envoy in active {
            let followed = self.envoys.entry(envoy.clone()).or_default();
            let floor = expired_seq(store, &envoy)?;
            let (mut prev, mut prev_ts) = if followed.examined >= floor {
                (followed.examined, followed.examined_ms)
            } else {
                (floor, None)
            };
            store.query(
                "SELECT origin_seq, timestamp_ms FROM audit
                 WHERE origin_envoy = $1 AND origin_seq > $2 ORDER BY origin_seq",
                &[Param::Text(&envoy), Param::Int(prev)],
                &mut |row| {
                    let (seq, ts) = (row.int("origin_seq")?, row.int("timestamp_ms")?);
                    if seq > prev + 1 {
                        followed.gaps.push(Gap {
                            envoy: envoy.clone(),
                            from_seq: u64::try_from(prev + 1).unwrap_or(0),
                            to_seq: u64::try_from(seq - 1).unwrap_or(0),
                            after_ms: prev_ts,
                            before_ms: u64::try_from(ts).unwrap_or(0),
                        });
                    }
                    (prev, prev_ts) = (seq, u64::try_from(ts).ok());
                    Ok(())
                },
            )?;
            (followed.examined, followed.examined_ms) = (prev, prev_ts);
        }
        for (envoy, followed) in &mut self.envoys {
            let floor = u64::try_from(expired_seq(store, envoy)?).unwrap_or(0);
            let mut open = Vec::new();
            for gap in std::mem::take(&mut followed.gaps) {
                if gap.before_ms < forget_before_ms || gap.to_seq <= floor {
                    continue;
                }
                let mut gap = gap;
                gap.from_seq = gap.from_seq.max(floor + 1);
                open.extend(still_missing(store, gap)?);
            }
            followed.gaps = open;
        }
        Ok(())
    }

    /// Every known gap whose next record started between `since_ms` and
    /// `settled_ms`.
    pub fn gaps(&self, since_ms: u64, settled_ms: u64) -> Vec<Gap> {
        let mut out: Vec<Gap> = self
            .envoys
            .values()
            .flat_map(|f| &f.gaps)
            .filter(|g| g.before_ms >= since_ms && g.before_ms <= settled_ms)
            .cloned()
            .collect();
        out.sort_by(|a, b| (&a.envoy, a.from_seq).cmp(&(&b.envoy, b.from_seq)));
        out
    }
}

/// What is left of a gap once the records stored since are taken out.
fn still_missing<B: AuditBackend + ?Sized>(store: &B, gap: Gap) -> Result<Vec<Gap>> {
    let mut found = Vec::new();
    store.query(
        "SELECT origin_seq, timestamp_ms FROM audit
         WHERE origin_envoy = $1 AND origin_seq >= $2 AND origin_seq <= $3 ORDER BY origin_seq",
        &[
            Param::Text(&gap.envoy),
            Param::Int(i64::try_from(gap.from_seq).unwrap_or(i64::MAX)),
            Param::Int(i64::try_from(gap.to_seq).unwrap_or(i64::MAX)),
        ],
        &mut |row| {
            found.push((
                u64::try_from(row.int("origin_seq")?).unwrap_or(0),
                u64::try_from(row.int("timestamp_ms")?).unwrap_or(0),
            ));
            Ok(())
        },
    )?;
    let mut out = Vec::new();
    let (mut from, mut after) = (gap.from_seq, gap.after_ms);
    for (seq, ts) in found {
        if seq > from {
            out.push(Gap {
                from_seq: from,
                to_seq: seq - 1,
                after_ms: after,
                before_ms: ts,
                ..gap.clone()
            });
        }
        (from, after) = (seq + 1, Some(ts));
    }
    if from <= gap.to_seq {
        out.push(Gap {
            from_seq: from,
            after_ms: after,
            ..gap
        });
    }
    Ok(out)
}

/// Missing records per Envoy, most first: what the gauge reports.
pub fn missing_by_envoy(gaps: &[Gap]) -> Vec<(String, u64)> {
    let mut by: HashMap<&str, u64> = HashMap::new();
    for g in gaps {
        *by.entry(&g.envoy).or_default() += g.missing();
    }
    let mut out: Vec<(String, u64)> = by.into_iter().map(|(e, n)| (e.to_string(), n)).collect();
    out.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    out
}

fn time(ms: Option<u64>) -> String {
    ms.map_or_else(|| "-".to_string(), format_rfc3339)
}

/// The listing's columns, for the table and the CSV.
const COLUMNS: [Column<Gap>; 6] = [
    Column {
        table: Some("envoy"),
        csv: Some("envoy"),
        width: 16,
        gap: 0,
        align: Align::Left,
        value: |g| g.envoy.clone(),
    },
    Column {
        table: Some("from_seq"),
        csv: Some("from_seq"),
        width: 10,
        gap: 2,
        align: Align::Right,
        value: |g| g.from_seq.to_string(),
    },
    Column {
        table: Some("to_seq"),
        csv: Some("to_seq"),
        width: 10,
        gap: 1,
        align: Align::Right,
        value: |g| g.to_seq.to_string(),
    },
    Column {
        table: Some("missing"),
        csv: Some("missing"),
        width: 8,
        gap: 1,
        align: Align::Right,
        value: |g| g.missing().to_string(),
    },
    Column {
        table: Some("after"),
        csv: Some("after"),
        width: 24,
        gap: 2,
        align: Align::Left,
        value: |g| time(g.after_ms),
    },
    Column {
        table: Some("before"),
        csv: Some("before"),
        width: 24,
        gap: 1,
        align: Align::Left,
        value: |g| time(Some(g.before_ms)),
    },
];

/// A table of the gaps and a total line.
pub fn to_table(gaps: &[Gap]) -> String {
    let missing: u64 = gaps.iter().map(Gap::missing).sum();
    let mut out = if gaps.is_empty() {
        String::new()
    } else {
        let mut t = sheet::table(&COLUMNS, true, gaps);
        t.push('\n');
        t
    };
    out.push_str(&format!(
        "{missing} missing record{} in {} gap{}\n",
        if missing == 1 { "" } else { "s" },
        gaps.len(),
        if gaps.len() == 1 { "" } else { "s" },
    ));
    out
}

pub fn to_csv(gaps: &[Gap]) -> Result<String> {
    sheet::csv(&COLUMNS, gaps)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gap(envoy: &str, from: u64, to: u64) -> Gap {
        Gap {
            envoy: envoy.into(),
            from_seq: from,
            to_seq: to,
            after_ms: Some(1_795_000_000_000),
            before_ms: 1_795_000_060_000,
        }
    }

    #[test]
    fn table_csv_and_totals_name_each_gap() {
        let mut first = gap("3f2a9c0d1e4b5a67", 4, 4);
        first.after_ms = None;
        let gaps = [first, gap("3f2a9c0d1e4b5a67", 10, 12), gap("b", 2, 2)];
        assert_eq!(
            to_table(&gaps),
            "envoy               from_seq     to_seq  missing  after                    before
3f2a9c0d1e4b5a67           4          4        1  -                        2026-11-18T11:07:40Z
3f2a9c0d1e4b5a67          10         12        3  2026-11-18T11:06:40Z     2026-11-18T11:07:40Z
b                          2          2        1  2026-11-18T11:06:40Z     2026-11-18T11:07:40Z
5 missing records in 3 gaps
"
        );
        assert_eq!(to_table(&[]), "0 missing records in 0 gaps\n");
        assert_eq!(
            to_csv(&gaps[1..2]).unwrap(),
            "envoy,from_seq,to_seq,missing,after,before
3f2a9c0d1e4b5a67,10,12,3,2026-11-18T11:06:40Z,2026-11-18T11:07:40Z
"
        );
        assert_eq!(
            missing_by_envoy(&gaps),
            [("3f2a9c0d1e4b5a67".to_string(), 4), ("b".to_string(), 1)]
        );
    }
}
