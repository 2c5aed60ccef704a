//! The store contract: every test here runs on SQLite (a file in a temp
//! dir) and on a real PostgreSQL server at `TOLLGATE_PG_URL` (default
//! [`DEFAULT_PG_URL`]; `make postgres` starts one), each PostgreSQL test in
//! a schema of its own so parallel runs never see each other's rows. With
//! `TOLLGATE_PG_URL` set, an unreachable server fails the PostgreSQL tests.

use super::*;
use crate::collector::report::GroupBy;
use std::sync::atomic::{AtomicUsize, Ordering};
use tollgate_core::audit::{Outcome, Reason, Tokens};

const DEFAULT_PG_URL: &str = "postgres://tollgate:tollgate@127.0.0.1:5432/tollgate_test";

/// A store for one test, removed afterwards (fields drop in order: the
/// connection before its schema).
struct Fixture {
    store: AuditStore,
    _cleanup: Cleanup,
}

enum Cleanup {
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
    Some(Fixture {
        store: AuditStore::open(&target).unwrap(),
        _cleanup: Cleanup::Schema { url, schema },
    })
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
    tail_is_newest_first_and_keeps_the_whole_record,
    get_finds_one_request_and_since_reads_only_newer_rows,
    columns_hold_what_usage_reports_aggregate,
    groups_sums_and_counts_denials_by_reason,
    series_totals_sum_every_row_by_metric_labels_busiest_first,
    import_is_idempotent_and_counts_what_it_skipped,
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
            invalid: 1
        }
    );
    assert_eq!(
        s.import_jsonl(&file).unwrap(),
        ImportStats {
            lines: 4,
            stored: 0,
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
