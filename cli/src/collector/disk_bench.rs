//! Disk the audit trail takes per request: the file access log line, the
//! SQLite row with its indexes, the PostgreSQL row (with `TOLLGATE_PG_URL`
//! or a server at the default test URL), and what retention leaves of a day
//! once it is rolled up. Not a pass/fail test (sizes depend on the records);
//! run it alone:
//!
//! ```text
//! cargo test -p tollgate --release -- --ignored --nocapture audit_disk_per_record
//! ```

use super::retention::DAY_MS;
use super::store::AuditStore;
use std::sync::atomic::AtomicBool;
use tollgate_core::audit::{AuditRecord, Origin, Outcome, Reason};

const N: usize = 100_000;
/// Days the records are spread over, for the retention figures.
const DAYS: usize = 10;

/// The collector's benchmark record, made to look like production traffic:
/// a UUID request id as Envoy generates it, an origin, one request in 20
/// denied, the days spread evenly.
fn realistic(i: usize) -> AuditRecord {
    let mut r = super::cpu_bench::record(i);
    r.request_id = format!(
        "{:08x}-{:04x}-4{:03x}-a{:03x}-{:012x}",
        i.wrapping_mul(2_654_435_761) as u32,
        i % 0xffff,
        i % 0xfff,
        (i / 7) % 0xfff,
        i.wrapping_mul(40_503)
    );
    r.timestamp_ms = 1_790_000_000_000 / DAY_MS as u64 * DAY_MS as u64
        + (i % DAYS) as u64 * DAY_MS as u64
        + (i / DAYS) as u64;
    r.origin = Some(Origin {
        envoy: "3f2a9c0d1e4b5a67".into(),
        seq: i as u64 + 1,
    });
    if i.is_multiple_of(20) {
        r.decision = Outcome::Denied;
        r.reason = Reason::RateLimited;
        r.status = 429;
        r.detail =
            Some("requests_per_minute limit of 60 reached for key:key-1; retry in 12s".into());
        r.bucket = Some("key:key-1:requests_per_minute".into());
        r.tokens.input = None;
        r.tokens.output = None;
        r.tokens.cache_read = None;
        r.tokens.cache_write = None;
        r.cost_usd = None;
    }
    r
}

fn per_record(bytes: u64) -> String {
    format!(
        "{:>7.0} B/record  {:>7.1} MB per million",
        bytes as f64 / N as f64,
        bytes as f64 / N as f64
    )
}

/// A SQLite file's size once its WAL is folded in and free pages dropped.
fn sqlite_size(db: &std::path::Path) -> u64 {
    let conn = rusqlite::Connection::open(db).unwrap();
    conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE); VACUUM;")
        .unwrap();
    std::fs::metadata(db).unwrap().len()
}

/// Bytes per table and index (SQLite's `dbstat`), largest first.
fn objects(db: &std::path::Path) -> Vec<(String, u64)> {
    let conn = rusqlite::Connection::open(db).unwrap();
    let mut stmt = conn
        .prepare("SELECT name, SUM(pgsize) FROM dbstat GROUP BY name ORDER BY 2 DESC")
        .unwrap();
    stmt.query_map([], |r| {
        Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)? as u64))
    })
    .unwrap()
    .map(Result::unwrap)
    .collect()
}

#[test]
#[ignore = "a measurement, not a check: run it alone (see the module docs)"]
fn audit_disk_per_record() {
    let records: Vec<AuditRecord> = (0..N).map(realistic).collect();
    let file: u64 = records.iter().map(|r| r.to_json().len() as u64 + 1).sum();
    println!("{N} records over {DAYS} days");
    println!("file log (audit.jsonl)          {}", per_record(file));

    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("audit.db");
    let store = AuditStore::open(&db).unwrap();
    for batch in records.chunks(512) {
        store.insert_batch(batch).unwrap();
    }
    let sqlite = sqlite_size(&db);
    println!("SQLite                          {}", per_record(sqlite));
    // The tables and indexes that grow with the records.
    for (object, bytes) in objects(&db).into_iter().filter(|(_, b)| *b >= N as u64) {
        println!("  {object:<29} {}", per_record(bytes));
    }
    let started = std::time::Instant::now();
    let gaps = store.gaps(0, u64::MAX).unwrap();
    println!(
        "gap search over the {N} records: {} gaps, {:?}",
        gaps.len(),
        started.elapsed()
    );
    let mut tracker = super::gaps::Tracker::default();
    for (what, more) in [("from scratch", 0), ("after 1,000 more records", 1_000)] {
        let extra: Vec<AuditRecord> = (N..N + more).map(realistic).collect();
        store.insert_batch(&extra).unwrap();
        let started = std::time::Instant::now();
        tracker.refresh(&*store, 0).unwrap();
        println!("gauge refresh {what}: {:?}", started.elapsed());
    }

    // Retention keeping records newer than one day (whole UTC days): the
    // eight days before the last two are rolled up.
    let last_day = records.iter().map(|r| r.timestamp_ms).max().unwrap_or(0);
    let started = std::time::Instant::now();
    let retained = store
        .retain(1, last_day + DAY_MS as u64 / 2, &AtomicBool::new(false))
        .unwrap();
    let took = started.elapsed();
    let mut rollups = 0;
    store
        .query("SELECT COUNT(*) AS n FROM audit_daily", &[], &mut |row| {
            rollups = row.int("n")?;
            Ok(())
        })
        .unwrap();
    drop(store);
    sqlite_size(&db);
    let rolled: u64 = objects(&db)
        .iter()
        .filter(|(o, _)| o.starts_with("audit_daily"))
        .map(|(_, b)| b)
        .sum();
    let days = retained.days.max(1);
    println!(
        "retention (--retain-days 1): {} days rolled up and {} records deleted in {took:?}; {} rollup rows, {:.0} per day, {:.0} bytes per day ({:.0} B per row)",
        retained.days,
        retained.deleted,
        rollups,
        rollups as f64 / days as f64,
        rolled as f64 / days as f64,
        rolled as f64 / rollups.max(1) as f64
    );
    println!(
        "  a day of {} raw records took {:.0} bytes in SQLite",
        N as u64 / DAYS as u64,
        sqlite as f64 / DAYS as f64
    );

    if let Some((target, _cleanup)) = super::store::contract::postgres_schema() {
        let store = AuditStore::open(&target).unwrap();
        for batch in records.chunks(512) {
            store.insert_batch(batch).unwrap();
        }
        let mut client = postgres::Client::connect(&target, postgres::NoTls).unwrap();
        client.batch_execute("VACUUM ANALYZE audit").unwrap();
        let row = client
            .query_one(
                "SELECT pg_total_relation_size('audit') AS total,
                        pg_relation_size('audit') AS heap,
                        pg_indexes_size('audit') AS indexes",
                &[],
            )
            .unwrap();
        let (total, heap, indexes): (i64, i64, i64) =
            (row.get("total"), row.get("heap"), row.get("indexes"));
        println!(
            "PostgreSQL (table + TOAST + indexes) {}",
            per_record(total as u64)
        );
        println!(
            "  table                         {}",
            per_record(heap as u64)
        );
        println!(
            "  indexes                       {}",
            per_record(indexes as u64)
        );
    }
}
