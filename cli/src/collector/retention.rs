//! Retention: raw records older than N days are rolled up into daily sums,
//! then deleted, so the store stops growing while `tollgate usage`,
//! `/api/usage` and the metrics still cover the whole history.
//!
//! The line between raw records and rollups is the *horizon*, a UTC day
//! boundary kept in the store (`audit_retention`). Each step runs in one
//! transaction holding the retention lock ([`AuditBackend::retention_tx`]):
//! it rolls up the oldest day with records above the horizon, records each
//! Envoy's highest audit sequence number in that day (so gaps are not
//! reported where retention deleted), and moves the horizon past the day.
//! Inserts read the horizon under the same lock and refuse records below it
//! (a replayed file would otherwise add an expired day's records a second
//! time), and reports read raw records above the horizon and rollups below
//! it, so a report never counts a request twice or misses one while the
//! rolled-up records wait for deletion. Deletion then runs in batches of
//! [`DELETE_BATCH`] rows, a transaction each, so the collector's writer is
//! never held up for long.

use super::store::{AuditBackend, Param, Sql};
use anyhow::Result;
use std::sync::atomic::{AtomicBool, Ordering};

pub const DAY_MS: i64 = 86_400_000;

/// Raw rows deleted per transaction.
pub const DELETE_BATCH: i64 = 1_000;

/// What a retention pass did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Retained {
    /// Days rolled up in this pass.
    pub days: u64,
    /// Raw records deleted.
    pub deleted: u64,
    /// The horizon after the pass (Unix ms, a UTC day's start).
    pub horizon_ms: i64,
}

/// The start of the UTC day holding `ms`.
pub fn day_start(ms: i64) -> i64 {
    ms.div_euclid(DAY_MS) * DAY_MS
}

/// Sums of one day's records by everything a report or a metric groups by.
const ROLL_UP: &str =
    "INSERT INTO audit_daily (timestamp_ms, key_id, \"user\", team, project, app, agent,
        model_requested, model_served, decision, reason, requests, input_tokens, output_tokens,
        cache_write_tokens, cache_read_tokens, cost_usd)
     SELECT CAST($1 AS BIGINT), key_id, \"user\", team, project, app, agent,
        model_requested, model_served, decision, reason, CAST(COUNT(*) AS BIGINT),
        CAST(COALESCE(SUM(input_tokens), 0) AS BIGINT),
        CAST(COALESCE(SUM(output_tokens), 0) AS BIGINT),
        CAST(COALESCE(SUM(cache_write_tokens), 0) AS BIGINT),
        CAST(COALESCE(SUM(cache_read_tokens), 0) AS BIGINT),
        COALESCE(SUM(cost_usd), 0)
     FROM audit WHERE timestamp_ms >= $2 AND timestamp_ms < $3
     GROUP BY key_id, \"user\", team, project, app, agent, model_requested, model_served,
        decision, reason";

/// Each Envoy's highest sequence number among one day's records, kept if
/// higher than the one already known.
const EXPIRE_SEQ: &str = "INSERT INTO audit_expired_seq (envoy, seq)
     SELECT origin_envoy, MAX(origin_seq) FROM audit
     WHERE timestamp_ms >= $1 AND timestamp_ms < $2 AND origin_envoy IS NOT NULL
     GROUP BY origin_envoy
     ON CONFLICT (envoy) DO UPDATE SET seq = CASE
        WHEN excluded.seq > audit_expired_seq.seq THEN excluded.seq ELSE audit_expired_seq.seq END";

const SET_HORIZON: &str = "UPDATE audit_retention SET horizon_ms = $1 WHERE id = 1";

/// Rolls up and deletes what is older than `days` whole UTC days before
/// `now_ms`: the body of [`AuditBackend::retain`]. Between two steps (a day
/// rolled up, a batch deleted) it stops early once `stop` is set, so a
/// collector shutting down does not wait for a long first pass; the next
/// pass goes on from there.
pub(super) fn run<B: AuditBackend + ?Sized>(
    store: &B,
    days: u32,
    now_ms: u64,
    stop: &AtomicBool,
) -> Result<Retained> {
    let now = i64::try_from(now_ms).unwrap_or(i64::MAX);
    let cutoff = day_start(now.saturating_sub(i64::from(days).saturating_mul(DAY_MS)));
    let mut out = Retained::default();
    loop {
        if stop.load(Ordering::Relaxed) {
            return Ok(out);
        }
        let mut rolled = false;
        store.retention_tx(&mut |tx| {
            rolled = step(tx, cutoff, &mut out.horizon_ms)?;
            Ok(())
        })?;
        if !rolled {
            break;
        }
        out.days += 1;
    }
    loop {
        if stop.load(Ordering::Relaxed) {
            return Ok(out);
        }
        let n = store.execute(
            "DELETE FROM audit WHERE seq IN
                (SELECT seq FROM audit WHERE timestamp_ms < $1 LIMIT $2)",
            &[Param::Int(out.horizon_ms), Param::Int(DELETE_BATCH)],
        )?;
        out.deleted += n;
        if n < DELETE_BATCH as u64 {
            break;
        }
    }
    Ok(out)
}

/// One transaction: rolls up the oldest day with records between the
/// horizon and `cutoff` and moves the horizon past it (`true`), or moves
/// the horizon to `cutoff` when no record is left below it (`false`).
/// `horizon` receives the horizon as the step leaves it.
fn step(tx: &mut dyn Sql, cutoff: i64, horizon: &mut i64) -> Result<bool> {
    let mut current = 0;
    tx.query(super::store::HORIZON, &[], &mut |row| {
        current = row.int("n")?;
        Ok(())
    })?;
    *horizon = current;
    if current >= cutoff {
        return Ok(false);
    }
    let mut first = None;
    tx.query(
        "SELECT MIN(timestamp_ms) AS first FROM audit WHERE timestamp_ms >= $1 AND timestamp_ms < $2",
        &[Param::Int(current), Param::Int(cutoff)],
        &mut |row| {
            first = row.nullable_int("first")?;
            Ok(())
        },
    )?;
    let Some(first) = first else {
        tx.execute(SET_HORIZON, &[Param::Int(cutoff)])?;
        *horizon = cutoff;
        return Ok(false);
    };
    let day = day_start(first);
    let end = day + DAY_MS;
    tx.execute(
        ROLL_UP,
        &[Param::Int(day), Param::Int(day), Param::Int(end)],
    )?;
    tx.execute(EXPIRE_SEQ, &[Param::Int(day), Param::Int(end)])?;
    tx.execute(SET_HORIZON, &[Param::Int(end)])?;
    *horizon = end;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn days_start_at_utc_midnight() {
        assert_eq!(day_start(0), 0);
        assert_eq!(day_start(DAY_MS - 1), 0);
        assert_eq!(day_start(3 * DAY_MS + 5), 3 * DAY_MS);
    }
}
