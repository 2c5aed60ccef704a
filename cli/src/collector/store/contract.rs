//! The store contract: every test here runs on SQLite (a file in a temp
//! dir) and on a real PostgreSQL server at `TOLLGATE_PG_URL` (default
//! [`DEFAULT_PG_URL`]; `make postgres` starts one), each PostgreSQL test in
//! a schema of its own so parallel runs never see each other's rows. With
//! `TOLLGATE_PG_URL` set, an unreachable server fails the PostgreSQL tests.

use super::*;
use crate::collector::burndown::{self, BurnPoint};
use crate::collector::drilldown;
use crate::collector::filter::Filter;
use crate::collector::gaps::{Gap, Tracker};
use crate::collector::report::{GroupBy, Report};
use crate::collector::retention::{Retained, DAY_MS};
use crate::collector::series::{Bucket, Point};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use tollgate_core::audit::{Origin, Outcome, Reason, Tokens};

const DEFAULT_PG_URL: &str = "postgres://tollgate:tollgate@127.0.0.1:5432/tollgate_test";

/// A store for one test, removed afterwards (fields drop in order: the
/// connection before its schema).
struct Fixture {
    store: AuditStore,
    _cleanup: Cleanup,
}

pub(crate) enum Cleanup {
    Dir(#[allow(dead_code)] tempfile::TempDir),
    Schema { url: String, schema: String },
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if let Cleanup::Schema { url, schema } = self {
            if let Ok(mut c) = postgres::Client::connect(url, postgres::NoTls) {
                let _ = c.batch_execute(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"));
            }
        }
    }
}

fn sqlite() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    Fixture {
        store: AuditStore::open(dir.path().join("audit.db")).unwrap(),
        _cleanup: Cleanup::Dir(dir),
    }
}

/// A store in a fresh schema of the test server; `None` (said on stderr)
/// only when `TOLLGATE_PG_URL` is unset and nothing answers at the default.
fn postgres() -> Option<Fixture> {
    let (target, cleanup) = postgres_schema()?;
    Some(Fixture {
        store: AuditStore::open(&target).unwrap(),
        _cleanup: cleanup,
    })
}

/// A fresh schema of the test server and the URL that opens it.
pub(crate) fn postgres_schema() -> Option<(String, Cleanup)> {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let (url, required) = match std::env::var("TOLLGATE_PG_URL") {
        Ok(url) => (url, true),
        Err(_) => (DEFAULT_PG_URL.to_string(), false),
    };
    let mut admin = match postgres::Client::connect(&url, postgres::NoTls) {
        Ok(c) => c,
        Err(e) if required => panic!("TOLLGATE_PG_URL={url} is set but unreachable: {e}"),
        Err(e) => {
            eprintln!(
                "PostgreSQL contract test skipped: nothing at {url} ({e}); run `make postgres` or set TOLLGATE_PG_URL"
            );
            return None;
        }
    };
    let schema = format!(
        "tollgate_test_{}_{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    );
    admin
        .batch_execute(&format!("CREATE SCHEMA {schema}"))
        .unwrap();
    let sep = if url.contains('?') { '&' } else { '?' };
    let target = format!("{url}{sep}options=-c%20search_path%3D{schema}");
    Some((target, Cleanup::Schema { url, schema }))
}

/// Runs each contract test on both backends.
macro_rules! contract {
    ($($name:ident),* $(,)?) => {
        mod on_sqlite {
            $(#[test]
            fn $name() {
                let f = super::sqlite();
                super::$name(&*f.store);
            })*
        }
        mod on_postgres {
            $(#[test]
            fn $name() {
                if let Some(f) = super::postgres() {
                    super::$name(&*f.store);
                }
            })*
        }
    };
}

contract!(
    inserts_are_idempotent_by_request_id_and_complete_wins,
    a_batch_may_hold_both_records_of_a_request,
    a_request_is_keyed_by_its_start_time_and_id,
    tail_is_newest_first_and_keeps_the_whole_record,
    get_finds_one_request_and_since_reads_only_newer_rows,
    columns_hold_what_usage_reports_aggregate,
    groups_sums_and_counts_denials_by_reason,
    series_totals_sum_every_row_by_metric_labels_busiest_first,
    import_is_idempotent_and_counts_what_it_skipped,
    stores_the_origin_and_a_complete_record_keeps_it,
    gaps_are_the_numbers_each_envoy_lacks_and_late_records_fill_them,
    gaps_wait_for_the_next_record_to_settle_and_start_at_the_window,
    retention_rolls_up_whole_days_then_deletes_and_reports_do_not_change,
    records_older_than_the_horizon_are_not_stored_again,
    gaps_ignore_numbers_retention_deleted,
    the_gauges_tracker_follows_what_the_full_search_finds,
    retention_asked_to_stop_leaves_the_store_as_it_was,
    series_sum_each_hour_or_day_of_a_view_and_keep_idle_buckets,
    usage_in_a_view_is_filtered_by_each_dimension_and_the_range,
    series_count_rolled_up_days_at_their_first_hour,
    recent_lists_the_newest_records_of_a_view_and_its_denials,
    a_keys_drilldown_has_its_totals_models_series_and_denials,
    burndown_sums_each_daily_and_monthly_limit_in_its_window,
    alerts_are_recorded_once_per_entity_limit_threshold_and_window,
    an_alert_is_claimed_by_one_sender_then_retried_or_delivered,
    window_usage_sums_every_token_class_by_identity_across_the_horizon,
);

fn record(id: &str, complete: bool) -> AuditRecord {
    AuditRecord {
        request_id: id.into(),
        complete,
        route: "anthropic.messages".into(),
        status: if complete { 200 } else { 0 },
        ..Default::default()
    }
}

fn inserts_are_idempotent_by_request_id_and_complete_wins(store: &dyn AuditBackend) {
    let provisional = record("r1", false);
    assert_eq!(
        store
            .insert_batch(std::slice::from_ref(&provisional))
            .unwrap(),
        [Stored::New]
    );
    assert_eq!(
        store.insert_batch(&[record("r1", false)]).unwrap(),
        [Stored::Kept],
        "same provisional twice: no change"
    );
    assert_eq!(
        store.insert_batch(&[record("r1", true)]).unwrap(),
        [Stored::Replaced(Box::new(provisional))],
        "complete replaces provisional"
    );
    assert_eq!(
        store.insert_batch(&[record("r1", false)]).unwrap(),
        [Stored::Kept],
        "provisional never replaces complete"
    );
    assert_eq!(
        store.insert_batch(&[record("r1", true)]).unwrap(),
        [Stored::Kept]
    );
    assert_eq!(store.count().unwrap(), 1);
    assert_eq!(store.get("r1").unwrap().unwrap().status, 200);
}

fn a_batch_may_hold_both_records_of_a_request(store: &dyn AuditBackend) {
    let stored = store
        .insert_batch(&[record("a", false), record("b", true), record("a", true)])
        .unwrap();
    assert_eq!(
        stored,
        [
            Stored::New,
            Stored::New,
            Stored::Replaced(Box::new(record("a", false)))
        ]
    );
    assert_eq!(store.get("a").unwrap(), Some(record("a", true)));
    assert_eq!(store.count().unwrap(), 2);
}

/// A request is its start time and its id: all its records carry the time
/// the filter set when it started, so the same id at another time is
/// another request, completed on its own; `get` answers the newest.
fn a_request_is_keyed_by_its_start_time_and_id(store: &dyn AuditBackend) {
    let at = |complete: bool, t: u64| {
        let mut r = record("same", complete);
        r.timestamp_ms = t;
        r
    };
    assert_eq!(
        store.insert_batch(&[at(true, 1), at(false, 2)]).unwrap(),
        [Stored::New, Stored::New]
    );
    assert_eq!(
        store.insert_batch(&[at(true, 2), at(false, 1)]).unwrap(),
        [Stored::Replaced(Box::new(at(false, 2))), Stored::Kept]
    );
    assert_eq!(store.count().unwrap(), 2);
    assert_eq!(store.get("same").unwrap(), Some(at(true, 2)));
}

fn tail_is_newest_first_and_keeps_the_whole_record(store: &dyn AuditBackend) {
    let mut a = record("a", true);
    a.timestamp_ms = 1;
    a.decision = Outcome::Denied;
    a.reason = Reason::RateLimited;
    a.detail = Some("limit, \"quoted\"\nand a line break".into());
    let mut b = record("b", true);
    b.timestamp_ms = 2;
    store.insert_batch(&[a.clone(), b]).unwrap();
    let t = store.tail(10).unwrap();
    assert_eq!(
        t.iter().map(|r| r.request_id.as_str()).collect::<Vec<_>>(),
        ["b", "a"]
    );
    assert_eq!(t[1], a);
    assert_eq!(store.tail(1).unwrap().len(), 1);
}

fn get_finds_one_request_and_since_reads_only_newer_rows(store: &dyn AuditBackend) {
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

/// The typed values of the columns reports and metrics aggregate.
#[derive(Debug, PartialEq)]
struct Aggregated {
    key_id: Option<String>,
    user: Option<String>,
    team: Option<String>,
    model_served: Option<String>,
    decision: String,
    reason: String,
    status: i64,
    input_tokens: Option<i64>,
    output_tokens: Option<i64>,
    cache_write_tokens: Option<i64>,
    cache_read_tokens: Option<i64>,
    cost_usd: Option<f64>,
    complete: i64,
}

fn columns_hold_what_usage_reports_aggregate(store: &dyn AuditBackend) {
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
    let mut rows = Vec::new();
    store
        .query(
            "SELECT key_id, \"user\" AS user_name, team, model_served, decision, reason, status,
                    input_tokens, output_tokens, cache_write_tokens, cache_read_tokens,
                    cost_usd, complete
             FROM audit WHERE timestamp_ms >= $1",
            &[Param::Int(0)],
            &mut |row| {
                rows.push(Aggregated {
                    key_id: row.nullable_text("key_id")?,
                    user: row.nullable_text("user_name")?,
                    team: row.nullable_text("team")?,
                    model_served: row.nullable_text("model_served")?,
                    decision: row.text("decision")?,
                    reason: row.text("reason")?,
                    status: row.int("status")?,
                    input_tokens: row.nullable_int("input_tokens")?,
                    output_tokens: row.nullable_int("output_tokens")?,
                    cache_write_tokens: row.nullable_int("cache_write_tokens")?,
                    cache_read_tokens: row.nullable_int("cache_read_tokens")?,
                    cost_usd: row.nullable_real("cost_usd")?,
                    complete: row.int("complete")?,
                });
                Ok(())
            },
        )
        .unwrap();
    assert_eq!(
        rows,
        [Aggregated {
            key_id: Some("alice-laptop".into()),
            user: Some("alice".into()),
            team: Some("payments".into()),
            model_served: Some("claude-sonnet-4-5".into()),
            decision: "allowed".into(),
            reason: "ok".into(),
            status: 200,
            input_tokens: Some(25),
            output_tokens: Some(120),
            cache_write_tokens: None,
            cache_read_tokens: Some(1000),
            cost_usd: Some(0.5),
            complete: 1,
        }]
    );
    let err = store
        .query("SELECT key_id FROM audit", &[], &mut |row| {
            row.int("no_such_column").map(drop)
        })
        .unwrap_err();
    assert!(format!("{err:#}").contains("no_such_column"), "{err:#}");
}

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

fn groups_sums_and_counts_denials_by_reason(s: &dyn AuditBackend) {
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
    let csv = s.report(GroupBy::Model, 2 * day).unwrap().to_csv().unwrap();
    assert!(csv.starts_with("name,requests,allowed,denied,"));
    assert!(
        csv.contains("\nm1,3,2,1,110,220,0,9,2.500000,rate_limited=1\n"),
        "{csv}"
    );
    let empty = s.report(GroupBy::Team, 100 * day).unwrap();
    assert_eq!((empty.rows.len(), empty.totals.requests), (0, 0));
}

fn series_totals_sum_every_row_by_metric_labels_busiest_first(s: &dyn AuditBackend) {
    let mut served = rec("1", "payments", "m1", None, 10, 20, 0.5, 1);
    served.model_requested = Some("m1-alias".into());
    let mut provisional = rec("2", "payments", "m1", None, 0, 0, 0.0, 2);
    provisional.complete = false;
    provisional.model_served = None;
    provisional.model_requested = Some("m1".into());
    provisional.tokens = Tokens::default();
    provisional.cost_usd = None;
    s.insert_batch(&[
        served,
        provisional,
        rec("3", "search", "m2", Some(Reason::RateLimited), 0, 0, 0.0, 3),
        rec("4", "search", "m2", Some(Reason::RateLimited), 0, 0, 0.0, 4),
        rec("5", "search", "m2", Some(Reason::RateLimited), 0, 0, 0.0, 5),
    ])
    .unwrap();
    let totals = s.series_totals().unwrap();
    assert_eq!(
        totals,
        [
            SeriesTotals {
                team: "search".into(),
                model: "m2".into(),
                decision: "denied".into(),
                reason: "rate_limited".into(),
                requests: 3,
                tokens: [0, 0, 0, 9],
                ..Default::default()
            },
            SeriesTotals {
                team: "payments".into(),
                model: "m1".into(),
                decision: "allowed".into(),
                reason: "ok".into(),
                requests: 2,
                tokens: [10, 20, 0, 3],
                cost_usd: 0.5,
                ..Default::default()
            },
        ]
    );
}

fn import_is_idempotent_and_counts_what_it_skipped(s: &dyn AuditBackend) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("audit.jsonl");
    let line = |r: &AuditRecord| serde_json::to_string(r).unwrap();
    std::fs::write(
        &file,
        format!(
            "{}\n-\n\n{}\n{{not a record\n{}\n",
            line(&record("x", false)),
            line(&record("y", true)),
            line(&record("x", true)),
        ),
    )
    .unwrap();
    assert_eq!(
        s.import_jsonl(&file).unwrap(),
        ImportStats {
            lines: 4,
            stored: 3,
            expired: 0,
            invalid: 1
        }
    );
    assert_eq!(
        s.import_jsonl(&file).unwrap(),
        ImportStats {
            lines: 4,
            stored: 0,
            expired: 0,
            invalid: 1
        }
    );
    assert_eq!(s.count().unwrap(), 2);
    assert_eq!(s.get("x").unwrap(), Some(record("x", true)));
    let err = s
        .import_jsonl(&dir.path().join("missing.jsonl"))
        .unwrap_err();
    assert!(
        format!("{err:#}").starts_with(&format!(
            "opening {}",
            dir.path().join("missing.jsonl").display()
        )),
        "{err:#}"
    );
}

/// A complete record of `envoy`'s request number `seq`, started at `t`.
fn numbered(id: &str, envoy: &str, seq: u64, t: u64) -> AuditRecord {
    let mut r = record(id, true);
    r.timestamp_ms = t;
    r.origin = Some(Origin {
        envoy: envoy.into(),
        seq,
    });
    r
}

fn stores_the_origin_and_a_complete_record_keeps_it(s: &dyn AuditBackend) {
    let mut provisional = numbered("r", "e1", 7, 5);
    provisional.complete = false;
    s.insert_batch(&[provisional]).unwrap();
    s.insert_batch(&[numbered("r", "e1", 7, 5)]).unwrap();
    let mut origins = Vec::new();
    s.query(
        "SELECT origin_envoy, origin_seq FROM audit",
        &[],
        &mut |row| {
            origins.push((row.text("origin_envoy")?, row.int("origin_seq")?));
            Ok(())
        },
    )
    .unwrap();
    assert_eq!(origins, [("e1".to_string(), 7)]);
    assert_eq!(
        s.get("r").unwrap().unwrap().origin,
        Some(Origin {
            envoy: "e1".into(),
            seq: 7
        })
    );
}

fn gap(envoy: &str, from_seq: u64, to_seq: u64, after_ms: Option<u64>, before_ms: u64) -> Gap {
    Gap {
        envoy: envoy.into(),
        from_seq,
        to_seq,
        after_ms,
        before_ms,
    }
}

fn gaps_are_the_numbers_each_envoy_lacks_and_late_records_fill_them(s: &dyn AuditBackend) {
    s.insert_batch(&[
        numbered("a1", "a", 1, 100),
        numbered("a2", "a", 2, 200),
        numbered("a5", "a", 5, 500),
        numbered("a6", "a", 6, 600),
        numbered("a9", "a", 9, 900),
        // Envoy b lost its first two records.
        numbered("b3", "b", 3, 300),
        // Records without an origin (older filters) are not part of it.
        record("old", true),
    ])
    .unwrap();
    let all = s.gaps(0, u64::MAX).unwrap();
    assert_eq!(
        all,
        [
            gap("a", 3, 4, Some(200), 500),
            gap("a", 7, 8, Some(600), 900),
            gap("b", 1, 2, None, 300),
        ]
    );
    assert_eq!(s.gaps(0, u64::MAX).unwrap(), all, "computing again: same");
    // A record that arrives later (an import) fills its gap: a provisional
    // one as well, since a request's records share its number.
    let mut late = numbered("a4", "a", 4, 400);
    late.complete = false;
    s.insert_batch(&[late, numbered("a8", "a", 8, 800)])
        .unwrap();
    assert_eq!(
        s.gaps(0, u64::MAX).unwrap(),
        [
            gap("a", 3, 3, Some(200), 400),
            gap("a", 7, 7, Some(600), 800),
            gap("b", 1, 2, None, 300),
        ]
    );
}

fn gaps_wait_for_the_next_record_to_settle_and_start_at_the_window(s: &dyn AuditBackend) {
    s.insert_batch(&[
        numbered("1", "a", 1, 1_000),
        numbered("3", "a", 3, 3_000),
        numbered("6", "a", 6, 6_000),
        // Numbered after 6 but started before it (its body took longer).
        numbered("7", "a", 7, 5_500),
        numbered("9", "a", 9, 9_000),
    ])
    .unwrap();
    // The record after 4-5 started at 6 000: not settled at 5 999.
    assert_eq!(
        s.gaps(0, 5_999).unwrap(),
        [gap("a", 2, 2, Some(1_000), 3_000)]
    );
    // Since 5 500: the window starts at number 6 (the first number since),
    // and the hole before it is measured from the stored number below it.
    assert_eq!(
        s.gaps(5_500, u64::MAX).unwrap(),
        [
            gap("a", 4, 5, Some(3_000), 6_000),
            gap("a", 8, 8, Some(5_500), 9_000)
        ]
    );
    assert_eq!(s.gaps(10_000, u64::MAX).unwrap(), []);
}

/// Records spread over three UTC days, with denials, a provisional record
/// and costs that sum exactly in any order.
fn three_days(day0: u64) -> Vec<AuditRecord> {
    let mut out = Vec::new();
    for d in 0..3u64 {
        for (i, team) in ["payments", "search", "payments"].iter().enumerate() {
            let t = day0 + d * DAY_MS as u64 + 3_600_000 * (i as u64 + 1);
            let mut r = rec(
                &format!("d{d}-{i}"),
                team,
                if i == 1 { "m2" } else { "m1" },
                None,
                10 * (d + 1),
                20,
                0.25 * (i as f64 + 1.0),
                t,
            );
            r.origin = Some(Origin {
                envoy: "e".into(),
                seq: d * 3 + i as u64 + 1,
            });
            out.push(r);
        }
        let mut denied = rec(
            &format!("d{d}-denied"),
            "search",
            "m1",
            Some(Reason::RateLimited),
            0,
            0,
            0.0,
            day0 + d * DAY_MS as u64 + 7_200_000,
        );
        denied.user = Some("bob".into());
        out.push(denied);
    }
    let mut provisional = rec("in-flight", "payments", "m1", None, 0, 0, 0.0, day0 + 5);
    provisional.complete = false;
    provisional.model_served = None;
    provisional.model_requested = Some("m1".into());
    provisional.tokens = Tokens::default();
    provisional.cost_usd = None;
    out.push(provisional);
    out
}

fn retention_rolls_up_whole_days_then_deletes_and_reports_do_not_change(s: &dyn AuditBackend) {
    let day0 = 20_000 * DAY_MS as u64;
    s.insert_batch(&three_days(day0)).unwrap();
    let bys = [
        GroupBy::Key,
        GroupBy::User,
        GroupBy::Team,
        GroupBy::Project,
        GroupBy::App,
        GroupBy::Agent,
        GroupBy::Model,
        GroupBy::Day,
    ];
    let before: Vec<Report> = bys.iter().map(|by| s.report(*by, day0).unwrap()).collect();
    let totals_before = s.series_totals().unwrap();
    // Now is day 2 at noon: keeping 1 day keeps day 1 noon onwards, so
    // whole days before day 1 (day 0) expire.
    let now = day0 + 2 * DAY_MS as u64 + DAY_MS as u64 / 2;
    assert_eq!(
        s.retain(1, now, &AtomicBool::new(false)).unwrap(),
        Retained {
            days: 1,
            deleted: 5,
            horizon_ms: (day0 + DAY_MS as u64) as i64
        }
    );
    assert_eq!(s.count().unwrap(), 8, "days 1 and 2 stay raw");
    for (by, want) in bys.iter().zip(&before) {
        assert_eq!(&s.report(*by, day0).unwrap(), want, "by {}", by.as_str());
    }
    assert_eq!(s.series_totals().unwrap(), totals_before);
    // Only the raw days when the window starts after the horizon.
    let recent = s.report(GroupBy::Team, day0 + DAY_MS as u64).unwrap();
    assert_eq!(recent.totals.requests, 8);
    // A window starting inside a rolled-up day counts the whole day.
    assert_eq!(
        s.report(GroupBy::Team, day0 + 1).unwrap().totals,
        before[2].totals
    );
    // Running again the same day changes nothing; a day later, day 1 goes.
    assert_eq!(
        s.retain(1, now, &AtomicBool::new(false)).unwrap(),
        Retained {
            days: 0,
            deleted: 0,
            horizon_ms: (day0 + DAY_MS as u64) as i64
        }
    );
    let r = s
        .retain(1, now + DAY_MS as u64, &AtomicBool::new(false))
        .unwrap();
    assert_eq!((r.days, r.deleted), (1, 4));
    for (by, want) in bys.iter().zip(&before) {
        assert_eq!(&s.report(*by, day0).unwrap(), want, "by {}", by.as_str());
    }
    assert_eq!(s.series_totals().unwrap(), totals_before);
    // Far in the future, with nothing left to roll: the horizon still moves.
    let r = s
        .retain(1, now + 30 * DAY_MS as u64, &AtomicBool::new(false))
        .unwrap();
    assert_eq!((r.days, r.deleted, s.count().unwrap()), (1, 4, 0));
    assert_eq!(r.horizon_ms, (day0 + 31 * DAY_MS as u64) as i64);
    assert_eq!(s.report(GroupBy::Team, day0).unwrap(), before[2]);
}

fn records_older_than_the_horizon_are_not_stored_again(s: &dyn AuditBackend) {
    let day0 = 20_000 * DAY_MS as u64;
    let records = three_days(day0);
    s.insert_batch(&records).unwrap();
    let before = s.report(GroupBy::Team, day0).unwrap();
    s.retain(1, day0 + 2 * DAY_MS as u64, &AtomicBool::new(false))
        .unwrap();
    // Replaying the whole file (a start-up import) stores nothing twice.
    let stored = s.insert_batch(&records).unwrap();
    assert_eq!(
        stored.iter().filter(|s| **s == Stored::Expired).count(),
        5,
        "day 0's records"
    );
    assert!(stored.iter().all(|s| !s.changed()));
    assert_eq!(s.report(GroupBy::Team, day0).unwrap(), before);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("audit.jsonl");
    let lines: Vec<String> = records
        .iter()
        .map(|r| serde_json::to_string(r).unwrap())
        .collect();
    std::fs::write(&file, lines.join("\n")).unwrap();
    let imported = s.import_jsonl(&file).unwrap();
    assert_eq!(
        (imported.stored, imported.expired, imported.duplicates()),
        (0, 5, 8)
    );
}

fn gaps_ignore_numbers_retention_deleted(s: &dyn AuditBackend) {
    let day0 = 20_000 * DAY_MS as u64;
    let mut records = three_days(day0);
    // Lose number 5 (day 1) and number 2 (day 0).
    records.retain(|r| !matches!(r.origin.as_ref().map(|o| o.seq), Some(2) | Some(5)));
    s.insert_batch(&records).unwrap();
    let h = 3_600_000;
    assert_eq!(
        s.gaps(0, u64::MAX).unwrap(),
        [
            gap("e", 2, 2, Some(day0 + h), day0 + 3 * h),
            gap(
                "e",
                5,
                5,
                Some(day0 + DAY_MS as u64 + h),
                day0 + DAY_MS as u64 + 3 * h
            ),
        ]
    );
    s.retain(1, day0 + 2 * DAY_MS as u64, &AtomicBool::new(false))
        .unwrap();
    assert_eq!(
        s.gaps(0, u64::MAX).unwrap(),
        [gap(
            "e",
            5,
            5,
            Some(day0 + DAY_MS as u64 + h),
            day0 + DAY_MS as u64 + 3 * h
        )],
        "day 0's numbers are gone, not missing"
    );
}

/// A row as a store written before the audit sequence held it.
fn old_row(r: &AuditRecord) -> String {
    format!(
        "INSERT INTO audit (request_id, timestamp_ms, complete, route, decision, reason, status, record)
         VALUES ('{}', {}, {}, '{}', '{}', '{}', {}, '{}');",
        r.request_id,
        r.timestamp_ms,
        i32::from(r.complete),
        r.route,
        decision_str(r.decision),
        r.reason.as_str(),
        r.status,
        serde_json::to_string(r).unwrap().replace('\'', "''")
    )
}

/// What a query selecting one number `n` answers.
fn number(store: &AuditStore, sql: &str, params: &[Param<'_>]) -> Option<i64> {
    let mut n = None;
    store
        .query(sql, params, &mut |row| {
            n = row.nullable_int("n")?;
            Ok(())
        })
        .unwrap();
    n
}

/// A store written before the audit sequence, keyed by `request_id` alone,
/// opens: it gains its columns, loses the `audit_key` index no query used,
/// moves to the `(timestamp_ms, request_id)` key with its rows and their
/// `seq` (a gap where a row was deleted stays a gap), then dedups and
/// completes as before. A second open changes nothing. `index_count`
/// counts the indexes of a name; `schema_stamp` is a number any change of
/// the schema changes.
fn a_store_from_before_the_sequence_is_migrated(
    open: impl Fn() -> AuditStore,
    create: &dyn Fn(&str),
    index_count: &str,
    schema_stamp: &str,
) {
    let at = |id: &str, complete: bool, t: u64| {
        let mut r = record(id, complete);
        r.timestamp_ms = t;
        r
    };
    let (old, provisional, gone, done) = (
        at("old", true, 1),
        at("prov", false, 2),
        at("gone", true, 3),
        at("done", true, 4),
    );
    create(&format!(
        "CREATE TABLE audit (seq INTEGER PRIMARY KEY, request_id TEXT NOT NULL UNIQUE,
            timestamp_ms BIGINT NOT NULL, complete INTEGER NOT NULL, key_id TEXT, \"user\" TEXT,
            team TEXT, project TEXT, app TEXT, agent TEXT, route TEXT NOT NULL,
            model_requested TEXT, model_served TEXT, decision TEXT NOT NULL, reason TEXT NOT NULL,
            status INTEGER NOT NULL, input_tokens BIGINT, output_tokens BIGINT,
            cache_write_tokens BIGINT, cache_read_tokens BIGINT, cost_usd DOUBLE PRECISION,
            record TEXT NOT NULL);
         {}{}{}{}
         DELETE FROM audit WHERE request_id = 'gone';
         CREATE INDEX audit_key ON audit(key_id);",
        old_row(&old),
        old_row(&provisional),
        old_row(&gone),
        old_row(&done)
    ));
    let store = open();
    let indexes = |name: &str| number(&store, index_count, &[Param::Text(name)]);
    assert_eq!(indexes("audit_key"), Some(0));
    assert_eq!(indexes("audit_request"), Some(1));
    assert_eq!(
        store.since(0).unwrap(),
        (vec![old.clone(), provisional.clone(), done.clone()], 4)
    );
    assert_eq!(
        store.since(2).unwrap(),
        (vec![done.clone()], 4),
        "seqs kept"
    );
    assert_eq!(store.get("old").unwrap().unwrap().origin, None);

    let mut completed = at("prov", true, 2);
    completed.tokens.output = Some(7);
    assert_eq!(
        store
            .insert_batch(&[
                old.clone(),
                provisional.clone(),
                completed.clone(),
                done.clone(),
                numbered("new", "e", 2, 10),
            ])
            .unwrap(),
        [
            Stored::Kept,
            Stored::Kept,
            Stored::Replaced(Box::new(provisional)),
            Stored::Kept,
            Stored::New
        ]
    );
    assert_eq!(store.get("prov").unwrap(), Some(completed.clone()));
    // After the old rows (PostgreSQL's sequence also counts the conflicts).
    assert_eq!(
        store.since(4).unwrap(),
        (vec![numbered("new", "e", 2, 10)], store.last_seq().unwrap())
    );
    assert_eq!(store.count().unwrap(), 4);
    assert_eq!(store.gaps(0, u64::MAX).unwrap(), [gap("e", 1, 1, None, 10)]);
    assert_eq!(store.report(GroupBy::Team, 0).unwrap().totals.requests, 4);

    let stamp = number(&store, schema_stamp, &[]);
    drop(store);
    let again = open();
    assert_eq!(
        number(&again, schema_stamp, &[]),
        stamp,
        "a second open migrates nothing"
    );
    assert_eq!(again.count().unwrap(), 4);
    assert_eq!(again.get("prov").unwrap(), Some(completed));
}

#[test]
fn a_sqlite_store_from_before_the_sequence_is_migrated() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("old.db");
    a_store_from_before_the_sequence_is_migrated(
        || AuditStore::open(&db).unwrap(),
        &|sql| {
            rusqlite::Connection::open(&db)
                .unwrap()
                .execute_batch(sql)
                .unwrap()
        },
        "SELECT count(*) AS n FROM sqlite_master WHERE type = 'index' AND name = $1",
        "SELECT schema_version AS n FROM pragma_schema_version",
    );
}

#[test]
fn a_postgres_store_from_before_the_sequence_is_migrated() {
    let Some((target, _cleanup)) = postgres_schema() else {
        return;
    };
    a_store_from_before_the_sequence_is_migrated(
        || AuditStore::open(&target).unwrap(),
        &|sql| {
            postgres::Client::connect(&target, postgres::NoTls)
                .unwrap()
                .batch_execute(&sql.replace("INTEGER PRIMARY KEY", "BIGSERIAL PRIMARY KEY"))
                .unwrap()
        },
        "SELECT count(*) AS n FROM pg_indexes WHERE schemaname = current_schema() AND indexname = $1",
        // Every relation of the schema by its identity: a table or index
        // made again has a new one.
        "SELECT CAST(SUM(CAST(CAST(oid AS TEXT) AS BIGINT) * (1 + relnatts)) AS BIGINT) AS n
         FROM pg_class WHERE relnamespace = CAST(current_schema() AS regnamespace)",
    );
}

fn the_gauges_tracker_follows_what_the_full_search_finds(s: &dyn AuditBackend) {
    let day0 = 20_000 * DAY_MS as u64;
    let h = 3_600_000;
    let mut tracker = Tracker::default();
    let agree = |tracker: &mut Tracker, want: &[Gap]| {
        tracker.refresh(s, 0).unwrap();
        assert_eq!(s.gaps(0, u64::MAX).unwrap(), want, "the full search");
        assert_eq!(tracker.gaps(0, u64::MAX), want, "the tracker");
    };
    agree(&mut tracker, &[]);
    let mut records = three_days(day0);
    records.retain(|r| !matches!(r.origin.as_ref().map(|o| o.seq), Some(2) | Some(5)));
    let (first, later): (Vec<AuditRecord>, Vec<AuditRecord>) = records
        .into_iter()
        .partition(|r| r.timestamp_ms < day0 + DAY_MS as u64);
    s.insert_batch(&first).unwrap();
    agree(
        &mut tracker,
        &[gap("e", 2, 2, Some(day0 + h), day0 + 3 * h)],
    );
    // Day 1 arrives: a new gap after the numbers already examined.
    s.insert_batch(&later).unwrap();
    let day1 = day0 + DAY_MS as u64;
    agree(
        &mut tracker,
        &[
            gap("e", 2, 2, Some(day0 + h), day0 + 3 * h),
            gap("e", 5, 5, Some(day1 + h), day1 + 3 * h),
        ],
    );
    // A second Envoy whose first records were lost, and a late record that
    // fills number 5.
    s.insert_batch(&[
        numbered("x4", "x", 4, day1 + 5 * h),
        numbered("e5", "e", 5, day1 + 2 * h),
    ])
    .unwrap();
    agree(
        &mut tracker,
        &[
            gap("e", 2, 2, Some(day0 + h), day0 + 3 * h),
            gap("x", 1, 3, None, day1 + 5 * h),
        ],
    );
    // Retention deletes day 0 with its gap.
    s.retain(1, day0 + 2 * DAY_MS as u64, &AtomicBool::new(false))
        .unwrap();
    agree(&mut tracker, &[gap("x", 1, 3, None, day1 + 5 * h)]);
    // Gaps older than the window are forgotten; settling hides recent ones.
    assert_eq!(tracker.gaps(day1 + 6 * h, u64::MAX), []);
    assert_eq!(tracker.gaps(0, day1 + 5 * h - 1), []);
    tracker.refresh(s, day1 + 6 * h).unwrap();
    assert_eq!(tracker.gaps(0, u64::MAX), []);
}

fn retention_asked_to_stop_leaves_the_store_as_it_was(s: &dyn AuditBackend) {
    let day0 = 20_000 * DAY_MS as u64;
    s.insert_batch(&three_days(day0)).unwrap();
    let before = s.report(GroupBy::Team, day0).unwrap();
    assert_eq!(
        s.retain(1, day0 + 10 * DAY_MS as u64, &AtomicBool::new(true))
            .unwrap(),
        Retained::default()
    );
    assert_eq!((s.horizon().unwrap(), s.count().unwrap()), (0, 13));
    assert_eq!(s.report(GroupBy::Team, day0).unwrap(), before);
}

const H: u64 = 3_600_000;
const DAY0: u64 = 20_000 * DAY_MS as u64; // 2024-10-04
const DAY1: u64 = DAY0 + DAY_MS as u64;

/// Two teams' keys over two days: payments calls m1 and m2 on day 0 (one
/// call denied) and m1 on day 1; search calls m1 on day 1. Tokens per
/// record: input + output + 3 cache reads.
fn two_days() -> Vec<AuditRecord> {
    vec![
        rec("a", "payments", "m1", None, 10, 20, 0.5, DAY0 + H + 5),
        rec("b", "payments", "m2", None, 1, 2, 0.25, DAY0 + H + 10),
        rec(
            "c",
            "payments",
            "m1",
            Some(Reason::BudgetExhausted),
            0,
            0,
            0.0,
            DAY0 + 3 * H,
        ),
        rec("d", "search", "m1", None, 100, 200, 2.0, DAY1 + 2 * H),
        rec("e", "payments", "m1", None, 5, 5, 0.5, DAY1 + H),
    ]
}

fn point(start_ms: u64, requests: u64, denied: u64, tokens: u64, cost_usd: f64) -> Point {
    Point {
        start_ms,
        requests,
        denied,
        tokens,
        cost_usd,
    }
}

fn view(since_ms: u64, until_ms: u64, equals: &[(GroupBy, &str)]) -> Filter {
    Filter {
        since_ms,
        until_ms: Some(until_ms),
        equals: equals.iter().map(|(d, v)| (*d, v.to_string())).collect(),
    }
}

fn series_sum_each_hour_or_day_of_a_view_and_keep_idle_buckets(s: &dyn AuditBackend) {
    s.insert_batch(&two_days()).unwrap();
    let hourly = s
        .series(&view(DAY0, DAY0 + 4 * H, &[]), Bucket::Hour, 0)
        .unwrap();
    assert_eq!(
        hourly.points,
        [
            point(DAY0, 0, 0, 0, 0.0),
            point(DAY0 + H, 2, 0, 33 + 6, 0.75),
            point(DAY0 + 2 * H, 0, 0, 0, 0.0),
            point(DAY0 + 3 * H, 1, 1, 3, 0.0),
        ]
    );
    assert_eq!(hourly.totals, point(DAY0, 3, 1, 42, 0.75));
    let daily = s
        .series(&Filter::since(DAY0), Bucket::Day, DAY1 + 5 * H)
        .unwrap();
    assert_eq!(
        (daily.since_ms, daily.until_ms),
        (DAY0, DAY1 + 5 * H),
        "up to now"
    );
    assert_eq!(
        daily.points,
        [
            point(DAY0, 3, 1, 42, 0.75),
            point(DAY1, 2, 0, 303 + 13, 2.5)
        ]
    );
    assert_eq!(daily.totals, point(DAY0, 5, 1, 358, 3.25));
    let m1 = s
        .series(
            &view(DAY0, DAY1 + DAY_MS as u64, &[(GroupBy::Model, "m1")]),
            Bucket::Day,
            0,
        )
        .unwrap();
    assert_eq!(
        m1.points,
        [point(DAY0, 2, 1, 36, 0.5), point(DAY1, 2, 0, 316, 2.5)]
    );
    let search_m1 = view(
        DAY0,
        DAY1 + DAY_MS as u64,
        &[(GroupBy::Model, "m1"), (GroupBy::Team, "search")],
    );
    assert_eq!(
        s.series(&search_m1, Bucket::Day, 0).unwrap().totals,
        point(DAY0, 1, 0, 303, 2.0)
    );
}

fn usage_in_a_view_is_filtered_by_each_dimension_and_the_range(s: &dyn AuditBackend) {
    s.insert_batch(&two_days()).unwrap();
    let names = |r: &Report| {
        r.rows
            .iter()
            .map(|r| (r.name.clone(), r.requests, r.cost_usd))
            .collect::<Vec<_>>()
    };
    let day0_only = view(DAY0, DAY1, &[]);
    assert_eq!(
        names(&s.usage(GroupBy::Model, &day0_only).unwrap()),
        [("m1".to_string(), 2, 0.5), ("m2".to_string(), 1, 0.25)]
    );
    let by_key = view(
        DAY0,
        DAY1 + DAY_MS as u64,
        &[(GroupBy::Key, "key-payments")],
    );
    assert_eq!(
        names(&s.usage(GroupBy::Day, &by_key).unwrap()),
        [
            ("2024-10-04".to_string(), 3, 0.75),
            ("2024-10-05".to_string(), 1, 0.5)
        ]
    );
    let m1 = s
        .usage(
            GroupBy::Team,
            &view(DAY0, DAY1 + DAY_MS as u64, &[(GroupBy::Model, "m1")]),
        )
        .unwrap();
    assert_eq!(
        names(&m1),
        [
            ("search".to_string(), 1, 2.0),
            ("payments".to_string(), 3, 1.0)
        ]
    );
    assert_eq!(m1.totals.denials.get("budget_exhausted"), Some(&1));
    // A record without a user is `(none)` in reports, and filtered so.
    let none = view(DAY0, DAY1 + DAY_MS as u64, &[(GroupBy::User, "(none)")]);
    assert_eq!(s.usage(GroupBy::Team, &none).unwrap().totals.requests, 5);
    let nobody = view(DAY0, DAY1 + DAY_MS as u64, &[(GroupBy::User, "carol")]);
    assert_eq!(s.usage(GroupBy::Team, &nobody).unwrap().rows, []);
}

fn series_count_rolled_up_days_at_their_first_hour(s: &dyn AuditBackend) {
    s.insert_batch(&two_days()).unwrap();
    let all = view(DAY0, DAY1 + DAY_MS as u64, &[(GroupBy::Team, "payments")]);
    let before = s.series(&all, Bucket::Day, 0).unwrap();
    s.retain(1, DAY1 + DAY_MS as u64 + 12 * H, &AtomicBool::new(false))
        .unwrap();
    assert_eq!(s.count().unwrap(), 2, "day 0 rolled up");
    assert_eq!(s.series(&all, Bucket::Day, 0).unwrap(), before);
    let hourly = s.series(&all, Bucket::Hour, 0).unwrap();
    assert_eq!(hourly.points[0], point(DAY0, 3, 1, 42, 0.75));
    assert_eq!(hourly.points[25], point(DAY1 + H, 1, 0, 13, 0.5));
    assert_eq!(hourly.totals, before.totals);
    assert_eq!(
        s.usage(GroupBy::Model, &all).unwrap().totals.cost_usd,
        1.25,
        "filters apply to the rollups too"
    );
}

fn ids(records: &[AuditRecord]) -> Vec<&str> {
    records.iter().map(|r| r.request_id.as_str()).collect()
}

fn recent_lists_the_newest_records_of_a_view_and_its_denials(s: &dyn AuditBackend) {
    s.insert_batch(&two_days()).unwrap();
    let all = Filter::since(DAY0);
    assert_eq!(ids(&s.recent(&all, false, 3).unwrap()), ["d", "e", "c"]);
    assert_eq!(ids(&s.recent(&all, true, 10).unwrap()), ["c"]);
    let m1_day0 = view(DAY0, DAY1, &[(GroupBy::Model, "m1")]);
    assert_eq!(ids(&s.recent(&m1_day0, false, 10).unwrap()), ["c", "a"]);
    assert_eq!(
        s.recent(&Filter::since(DAY1 + 3 * H), false, 10).unwrap(),
        []
    );
}

fn a_keys_drilldown_has_its_totals_models_series_and_denials(s: &dyn AuditBackend) {
    let mut records = two_days();
    records[4].user = Some("alice".into());
    s.insert_batch(&records).unwrap();
    // The view's own key filter is replaced by the key asked for.
    let v = view(DAY0, DAY1 + DAY_MS as u64, &[(GroupBy::Key, "key-search")]);
    let k = drilldown::build(s, "key-payments", &v, Bucket::Day, 0).unwrap();
    assert_eq!(
        (k.key.as_str(), k.user.as_deref(), k.team.as_deref()),
        ("key-payments", Some("alice"), Some("payments"))
    );
    assert_eq!(
        (k.totals.requests, k.totals.denied, k.totals.cost_usd),
        (4, 1, 1.25)
    );
    assert_eq!(
        k.models
            .iter()
            .map(|m| (m.name.as_str(), m.requests, m.cost_usd))
            .collect::<Vec<_>>(),
        [("m1", 3, 1.0), ("m2", 1, 0.25)]
    );
    assert_eq!(
        k.series.points,
        [point(DAY0, 3, 1, 42, 0.75), point(DAY1, 1, 0, 13, 0.5)]
    );
    assert_eq!(ids(&k.recent), ["e", "c", "b", "a"]);
    assert_eq!(ids(&k.denials), ["c"]);
    assert_eq!(k.denials[0].reason, Reason::BudgetExhausted);
}

/// Two keys and a team pool with daily and monthly limits (and a
/// per-minute one, which has no burn-down).
const BURN_POLICY: &str = r#"{"version": 1, "defaults": {"models": ["m*"]},
  "keys": [
    {"id": "key-payments", "team": "payments",
     "key_sha256": "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
     "limits": {"budget_usd_per_day": 2, "tokens_per_day": 100, "requests_per_minute": 5}},
    {"id": "key-search", "team": "search",
     "key_sha256": "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb",
     "limits": {"budget_usd_per_month": 10}}],
  "pools": {"team:payments": {"budget_usd_per_day": 1}},
  "prices": {"m*": {"input": 1, "output": 1}}}"#;

fn burndown_sums_each_daily_and_monthly_limit_in_its_window(s: &dyn AuditBackend) {
    s.insert_batch(&two_days()).unwrap();
    let (policy, _) = tollgate_core::policy::compile(BURN_POLICY.as_bytes(), "p.json", 0).unwrap();
    let now = DAY1 + 4 * H;
    let all = burndown::build(s, &policy, &Filter::since(DAY0), now).unwrap();
    let summary: Vec<(&str, &str, f64, f64)> = all
        .iter()
        .map(|b| (b.entity.as_str(), b.limit, b.used, b.ratio))
        .collect();
    assert_eq!(
        summary,
        [
            ("team:payments", "budget_usd_per_day", 0.5, 0.5),
            ("key:key-payments", "budget_usd_per_day", 0.5, 0.25),
            ("key:key-search", "budget_usd_per_month", 2.0, 0.2),
            ("key:key-payments", "tokens_per_day", 13.0, 0.13),
        ],
        "most used first; today's use only, day 0 is yesterday"
    );
    let day = &all[1];
    assert_eq!(
        (day.unit, day.amount, day.window_start_ms, day.window_end_ms),
        ("usd", 2.0, DAY1, DAY1 + DAY_MS as u64)
    );
    assert_eq!(day.alerts, [0.5, 0.8, 1.0]);
    let cumulative = |b: &burndown::Burn| {
        b.points
            .iter()
            .map(|p| (p.end_ms, p.used))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        cumulative(day),
        [
            (DAY1 + H, 0.0),
            (DAY1 + 2 * H, 0.5),
            (DAY1 + 3 * H, 0.5),
            (DAY1 + 4 * H, 0.5)
        ]
    );
    // October 2024 from the 1st (day 19 997) to today, day by day.
    let month = &all[2];
    assert_eq!(month.window_start_ms, 19_997 * DAY_MS as u64);
    assert_eq!(
        month.points.last(),
        Some(&BurnPoint {
            end_ms: DAY1 + DAY_MS as u64,
            used: 2.0
        })
    );
    assert_eq!(month.points.len(), 5);
    assert_eq!(month.unit, "usd");
    assert_eq!(all[3].unit, "tokens");
    // A team filter lists that team's pool and keys only; a model filter
    // sums that model's share.
    let search = burndown::build(
        s,
        &policy,
        &Filter::since(DAY0).and(GroupBy::Team, "search"),
        now,
    )
    .unwrap();
    assert_eq!(
        search.iter().map(|b| b.entity.as_str()).collect::<Vec<_>>(),
        ["key:key-search"]
    );
    let listed = |filter: Filter| {
        burndown::build(s, &policy, &filter, now)
            .unwrap()
            .iter()
            .map(|b| format!("{} {}", b.entity, b.limit))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        listed(Filter::since(DAY0).and(GroupBy::Key, "key-search")),
        ["key:key-search budget_usd_per_month"],
        "a key filter lists the key and the pools it draws from"
    );
    assert_eq!(
        listed(Filter::since(DAY0).and(GroupBy::Key, "key-payments")),
        [
            "team:payments budget_usd_per_day",
            "key:key-payments budget_usd_per_day",
            "key:key-payments tokens_per_day"
        ]
    );
    let m2 = burndown::build(
        s,
        &policy,
        &Filter::since(DAY0).and(GroupBy::Model, "m2"),
        now,
    )
    .unwrap();
    assert_eq!(m2.len(), 4);
    assert!(
        m2.iter().all(|b| b.used == 0.0),
        "m2 was called on day 0 only"
    );
    // A view ending on day 0 shows day 0's window.
    let yesterday = burndown::build(s, &policy, &view(DAY0, DAY1, &[]), now).unwrap();
    assert_eq!(
        yesterday
            .iter()
            .map(|b| (b.entity.as_str(), b.limit, b.used))
            .collect::<Vec<_>>(),
        [
            ("team:payments", "budget_usd_per_day", 0.75),
            ("key:key-payments", "tokens_per_day", 42.0),
            ("key:key-payments", "budget_usd_per_day", 0.75),
            ("key:key-search", "budget_usd_per_month", 0.0),
        ]
    );
    assert_eq!(yesterday[0].points.len(), 24);
}

fn new_alert<'a>(entity: &'a str, threshold_ppm: u32, window: u64, event: &'a str) -> NewAlert<'a> {
    NewAlert {
        entity,
        limit: "tokens_per_day",
        threshold_ppm,
        window_start_ms: window,
        event,
        now_ms: 1_000,
    }
}

fn alerts_are_recorded_once_per_entity_limit_threshold_and_window(s: &dyn AuditBackend) {
    let day = DAY_MS as u64;
    assert!(s
        .record_alert(&new_alert("key:a", 500_000, day, "{\"n\":1}"), false)
        .unwrap());
    // The same event again, from this collector after a restart or from
    // another sharing the store: refused, the first body kept.
    assert!(!s
        .record_alert(&new_alert("key:a", 500_000, day, "{\"n\":2}"), false)
        .unwrap());
    // Another threshold, window or entity is another event.
    assert!(s
        .record_alert(&new_alert("key:a", 800_000, day, "{}"), false)
        .unwrap());
    assert!(s
        .record_alert(&new_alert("key:a", 500_000, 2 * day, "{}"), false)
        .unwrap());
    assert!(s
        .record_alert(&new_alert("pool:team:x", 500_000, day, "{}"), true)
        .unwrap());
    let all = s.alerts().unwrap();
    let keys: Vec<(&str, u32, u64, Option<u64>)> = all
        .iter()
        .map(|a| {
            (
                a.entity.as_str(),
                a.threshold_ppm,
                a.window_start_ms,
                a.delivered_ms,
            )
        })
        .collect();
    assert_eq!(
        keys,
        [
            ("key:a", 500_000, day, None),
            ("key:a", 800_000, day, None),
            ("key:a", 500_000, 2 * day, None),
            ("pool:team:x", 500_000, day, Some(1_000)),
        ]
    );
    assert_eq!(all[0].event, "{\"n\":1}");
    // Recorded as delivered (no webhook): never due.
    assert_eq!(s.due_alerts(u64::MAX, 10).unwrap().len(), 3);
}

fn an_alert_is_claimed_by_one_sender_then_retried_or_delivered(s: &dyn AuditBackend) {
    s.record_alert(&new_alert("key:a", 500_000, 0, "{\"e\":1}"), false)
        .unwrap();
    s.record_alert(&new_alert("key:b", 500_000, 0, "{\"e\":2}"), false)
        .unwrap();
    let due = s.due_alerts(1_000, 1).unwrap();
    assert_eq!(
        due,
        [PendingAlert {
            id: due[0].id,
            event: "{\"e\":1}".into(),
            attempts: 0
        }],
        "oldest first, at most n"
    );
    let id = due[0].id;
    assert!(s.claim_alert(id, 1_000, 11_000).unwrap());
    assert!(!s.claim_alert(id, 1_000, 11_000).unwrap(), "taken already");
    assert_eq!(s.due_alerts(5_000, 10).unwrap().len(), 1, "only key:b");
    // A sender that died mid-attempt: due again at the lease's end.
    assert_eq!(s.due_alerts(11_000, 10).unwrap()[0].id, id);
    s.alert_failed(id, 13_000, "webhook answered 503").unwrap();
    assert_eq!(s.due_alerts(12_000, 10).unwrap().len(), 1);
    assert!(s.claim_alert(id, 13_000, 23_000).unwrap());
    s.alert_delivered(id, 14_000).unwrap();
    assert!(!s.claim_alert(id, 30_000, 40_000).unwrap(), "delivered");
    let a = &s.alerts().unwrap()[0];
    assert_eq!(
        (a.attempts, a.delivered_ms, a.last_error.as_deref()),
        (2, Some(14_000), None)
    );
    let b = &s.alerts().unwrap()[1];
    assert_eq!((b.attempts, b.delivered_ms), (0, None));
}

fn window_usage_sums_every_token_class_by_identity_across_the_horizon(s: &dyn AuditBackend) {
    let day0 = 20_000 * DAY_MS as u64;
    let day = DAY_MS as u64;
    let mut records = three_days(day0);
    let mut hour_cache = rec(
        "1h",
        "payments",
        "m1",
        None,
        1,
        2,
        0.5,
        day0 + 2 * day + 60_000,
    );
    hour_cache.tokens.cache_write_1h = Some(100);
    records.push(hour_cache);
    s.insert_batch(&records).unwrap();
    let sorted = |mut v: Vec<IdentityUsage>| {
        v.sort_by(|a, b| (&a.key_id, &a.user).cmp(&(&b.key_id, &b.user)));
        v
    };
    let before = sorted(s.window_usage(day0, day0 + 3 * day).unwrap());
    let payments = |tokens: u64, usd: f64| IdentityUsage {
        key_id: Some("key-payments".into()),
        team: Some("payments".into()),
        tokens,
        usd,
        ..Default::default()
    };
    // Per day, payments: two records of (10(d+1) + 20 + 3) tokens at $0.25
    // and $0.75; plus the 1-hour cache record (1 + 2 + 3 + 100) on day 2.
    assert_eq!(before[0], payments(2 * (33 + 43 + 53) + 106, 3.0 + 0.5));
    // One day alone.
    let day1 = sorted(s.window_usage(day0 + day, day0 + 2 * day).unwrap());
    assert_eq!(day1[0], payments(2 * 43, 1.0));
    // Day 0 rolled up: the window reads its rollups, and sums the same.
    let now = day0 + 2 * day + day / 2;
    s.retain(1, now, &AtomicBool::new(false)).unwrap();
    let rows = sorted(s.window_usage(day0, day0 + 3 * day).unwrap());
    let mut merged: Vec<IdentityUsage> = Vec::new();
    for r in rows {
        match merged
            .iter_mut()
            .find(|m| (&m.key_id, &m.user) == (&r.key_id, &r.user))
        {
            Some(m) => {
                m.tokens += r.tokens;
                m.usd += r.usd;
            }
            None => merged.push(r),
        }
    }
    assert_eq!(merged, before);
}
