//! Usage over time: a view's requests, denials, tokens and spend summed per
//! UTC hour or day, every bucket of the range present (an idle hour is a
//! zero, so a chart's bars are evenly spaced). The dashboard's spend chart
//! and its burn-down lines read these sums.

use super::filter::Filter;
use super::report::{scans, Scan};
use super::store::AuditBackend;
use anyhow::{bail, Result};
use serde::Serialize;
use std::collections::BTreeMap;

/// The most buckets one series holds: 83 days by the hour.
pub const MAX_POINTS: u64 = 2_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Bucket {
    Hour,
    Day,
}

impl Bucket {
    pub fn parse(s: &str) -> Option<Bucket> {
        match s {
            "hour" => Some(Bucket::Hour),
            "day" => Some(Bucket::Day),
            _ => None,
        }
    }

    pub fn ms(self) -> u64 {
        match self {
            Bucket::Hour => 3_600_000,
            Bucket::Day => 86_400_000,
        }
    }

    /// The start of the bucket holding `t`.
    pub fn start(self, t: u64) -> u64 {
        t / self.ms() * self.ms()
    }
}

/// What a bucket (or a whole series) sums. `tokens` counts every class
/// (input, output, cache writes and reads), as daily token quotas do.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Point {
    pub start_ms: u64,
    pub requests: u64,
    pub denied: u64,
    pub tokens: u64,
    pub cost_usd: f64,
}

impl Point {
    fn add(&mut self, other: &Point) {
        self.requests += other.requests;
        self.denied += other.denied;
        self.tokens += other.tokens;
        self.cost_usd += other.cost_usd;
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Series {
    pub bucket: Bucket,
    pub since_ms: u64,
    pub until_ms: u64,
    pub points: Vec<Point>,
    /// The sums of every point (`start_ms`: the first bucket's).
    pub totals: Point,
}

/// A view's sums grouped by `group` (an SQL expression) and by bucket,
/// over raw records and rollups alike.
pub(super) fn grouped<B: AuditBackend + ?Sized>(
    store: &B,
    view: &Filter,
    group: &str,
    bucket: Bucket,
) -> Result<BTreeMap<(String, u64), Point>> {
    let ms = bucket.ms();
    let mut out: BTreeMap<(String, u64), Point> = BTreeMap::new();
    for Scan {
        table,
        requests: n,
        filter,
        params,
    } in scans(store.day_expr(), store.horizon()?, view)
    {
        // Integer division on both backends (timestamps are never negative).
        store.query(
            &format!(
                "SELECT {group} AS name, timestamp_ms / {ms} * {ms} AS bucket,
                    CAST(SUM({n}) AS BIGINT) AS requests,
                    CAST(SUM(CASE WHEN decision = 'denied' THEN {n} ELSE 0 END) AS BIGINT) AS denied,
                    CAST(COALESCE(SUM(COALESCE(input_tokens, 0) + COALESCE(output_tokens, 0)
                        + COALESCE(cache_write_tokens, 0) + COALESCE(cache_read_tokens, 0)), 0)
                        AS BIGINT) AS tokens,
                    COALESCE(SUM(cost_usd), 0) AS cost_usd
                 FROM {table} WHERE {filter} GROUP BY 1, 2"
            ),
            &params,
            &mut |r| {
                let start_ms = u64::try_from(r.int("bucket")?).unwrap_or(0);
                let p = out.entry((r.text("name")?, start_ms)).or_default();
                p.start_ms = start_ms;
                p.add(&Point {
                    start_ms,
                    requests: r.count("requests")?,
                    denied: r.count("denied")?,
                    tokens: r.count("tokens")?,
                    cost_usd: r.real("cost_usd")?,
                });
                Ok(())
            },
        )?;
    }
    Ok(out)
}

/// The bucket starts from the one holding `since_ms` to the one holding
/// the last instant before `end_ms`.
pub fn buckets(bucket: Bucket, since_ms: u64, end_ms: u64) -> Result<Vec<u64>> {
    let first = bucket.start(since_ms);
    let last = bucket.start(end_ms.max(since_ms + 1) - 1);
    let n = (last - first) / bucket.ms() + 1;
    if n > MAX_POINTS {
        bail!(
            "{n} {} buckets: at most {MAX_POINTS}; shorten the range or bucket by day",
            match bucket {
                Bucket::Hour => "hourly",
                Bucket::Day => "daily",
            }
        );
    }
    Ok((0..n).map(|i| first + i * bucket.ms()).collect())
}

/// The body of [`AuditBackend::series`].
pub(super) fn build<B: AuditBackend + ?Sized>(
    store: &B,
    view: &Filter,
    bucket: Bucket,
    now_ms: u64,
) -> Result<Series> {
    let end = view.end(now_ms);
    let starts = buckets(bucket, view.since_ms, end)?;
    let sums = grouped(store, view, "CAST('' AS TEXT)", bucket)?;
    let mut totals = Point {
        start_ms: starts.first().copied().unwrap_or_default(),
        ..Point::default()
    };
    let points: Vec<Point> = starts
        .iter()
        .map(|&start_ms| {
            let p = sums
                .get(&(String::new(), start_ms))
                .copied()
                .unwrap_or_default();
            totals.add(&p);
            Point { start_ms, ..p }
        })
        .collect();
    Ok(Series {
        bucket,
        since_ms: view.since_ms,
        until_ms: end,
        points,
        totals,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_cover_the_range_from_the_bucket_holding_its_start() {
        let h = 3_600_000;
        assert_eq!(
            buckets(Bucket::Hour, h + 5, 3 * h).unwrap(),
            [h, 2 * h],
            "the end is exclusive"
        );
        assert_eq!(buckets(Bucket::Hour, h + 5, 3 * h + 1).unwrap().len(), 3);
        assert_eq!(buckets(Bucket::Day, 5, 5).unwrap(), [0]);
        assert_eq!(
            buckets(Bucket::Hour, 0, 90 * 24 * h)
                .unwrap_err()
                .to_string(),
            "2160 hourly buckets: at most 2000; shorten the range or bucket by day"
        );
    }
}
