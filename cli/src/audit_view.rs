//! Audit records as `tollgate audit tail` shows them: a fixed-width table
//! or one JSON object a line, newest last, optionally following the store.

use crate::collector::sheet::{self, Align, Column};
use crate::collector::store::AuditStore;
use anyhow::Result;
use std::collections::HashSet;
use std::io::Write;
use std::time::Duration;
use tollgate_core::audit::{AuditRecord, Outcome};
use tollgate_core::time::format_rfc3339;

pub use crate::output::Format;

/// How often `--follow` looks for new records.
const FOLLOW_EVERY: Duration = Duration::from_millis(500);

/// Writes the newest `lines` records, oldest first; with `follow`, keeps
/// writing new ones as they are stored and only returns on an error (a
/// closed stdout ends it).
pub fn tail(
    store: &AuditStore,
    lines: usize,
    follow: bool,
    format: Format,
    out: &mut impl Write,
) -> Result<()> {
    // Read before the newest rows: a record stored in between then shows up
    // in both reads, once (skipped below), instead of in neither.
    let mut last = store.last_seq()?;
    let mut records = store.tail(lines)?;
    records.reverse();
    match format {
        Format::Table => writeln!(out, "{}", sheet::table(&COLUMNS, true, &records))?,
        Format::Json => {
            for r in &records {
                write_record(out, r, format)?;
            }
        }
    }
    out.flush()?;
    if !follow {
        return Ok(());
    }
    let mut shown: HashSet<String> = records.into_iter().map(|r| r.request_id).collect();
    loop {
        std::thread::sleep(FOLLOW_EVERY);
        let (new, next) = store.since(last)?;
        for r in new.iter().filter(|r| !shown.contains(&r.request_id)) {
            write_record(out, r, format)?;
        }
        out.flush()?;
        // Only the first read can overlap the initial tail.
        shown.clear();
        last = next;
    }
}

pub fn write_record(out: &mut impl Write, r: &AuditRecord, format: Format) -> Result<()> {
    match format {
        Format::Json => writeln!(out, "{}", serde_json::to_string(r)?)?,
        Format::Table => writeln!(out, "{}", row(r))?,
    }
    Ok(())
}

fn text(v: &Option<String>) -> String {
    v.clone().unwrap_or_else(|| "-".to_string())
}

fn num(v: Option<u64>) -> String {
    v.map_or_else(|| "-".to_string(), |v| v.to_string())
}

const fn left(
    header: &'static str,
    width: u16,
    value: fn(&AuditRecord) -> String,
) -> Column<AuditRecord> {
    Column {
        table: Some(header),
        csv: None,
        width,
        gap: 1,
        align: Align::Left,
        value,
    }
}

const fn right(
    header: &'static str,
    width: u16,
    value: fn(&AuditRecord) -> String,
) -> Column<AuditRecord> {
    Column {
        align: Align::Right,
        ..left(header, width, value)
    }
}

/// The table's columns: text left-aligned, the numbers at the end (status
/// onwards) right-aligned.
const COLUMNS: [Column<AuditRecord>; 11] = [
    Column {
        gap: 0,
        ..left("time", 20, |r| format_rfc3339(r.timestamp_ms))
    },
    left("key", 16, |r| text(&r.key_id)),
    left("user", 20, |r| text(&r.user)),
    left("team", 10, |r| text(&r.team)),
    left("route", 22, |r| r.route.clone()),
    left("model", 26, |r| {
        text(&r.model_served.clone().or(r.model_requested.clone()))
    }),
    // A record still provisional when Envoy logged it belongs to a request
    // the client or upstream abandoned before the response ended.
    left("decision", 24, |r| match (r.decision, r.complete) {
        (Outcome::Denied, _) => format!("denied {}", r.reason.as_str()),
        (Outcome::Allowed, true) => "allowed".to_string(),
        (Outcome::Allowed, false) => "aborted".to_string(),
    }),
    right("status", 6, |r| {
        if r.status == 0 {
            "-".to_string()
        } else {
            r.status.to_string()
        }
    }),
    // Before the provider reports usage, the estimate is all there is.
    right("input", 7, |r| {
        num(r
            .tokens
            .input
            .or(Some(r.tokens.input_estimated).filter(|v| *v > 0)))
    }),
    right("output", 7, |r| num(r.tokens.output)),
    right("cost", 9, |r| {
        r.cost_usd
            .map_or_else(|| "-".to_string(), |c| format!("${c:.5}"))
    }),
];

#[cfg(test)]
fn header() -> String {
    sheet::table(&COLUMNS, true, [])
}

/// One table row, for records that arrive after the table was printed.
fn row(r: &AuditRecord) -> String {
    sheet::table(&COLUMNS, false, [r])
}

#[cfg(test)]
mod tests {
    use super::*;
    use tollgate_core::audit::{Reason, Tokens};

    #[test]
    fn audit_tail_rows_show_identity_decision_tokens_and_cost() {
        let served = AuditRecord {
            request_id: "r1".into(),
            timestamp_ms: 1_700_000_000_000,
            complete: true,
            key_id: Some("alice-laptop".into()),
            user: Some("alice".into()),
            team: Some("payments".into()),
            route: "anthropic.messages".into(),
            model_requested: Some("claude-sonnet-4-5".into()),
            model_served: Some("claude-sonnet-4-5-20250929".into()),
            status: 200,
            tokens: Tokens {
                input_estimated: 30,
                input: Some(25),
                output: Some(120),
                ..Default::default()
            },
            cost_usd: Some(0.0021),
            ..Default::default()
        };
        assert_eq!(
            row(&served),
            "2023-11-14T22:13:20Z alice-laptop     alice                payments   anthropic.messages     claude-sonnet-4-5-20250929 allowed                     200      25     120  $0.00210"
        );
        let denied = AuditRecord {
            decision: Outcome::Denied,
            reason: Reason::RateLimited,
            status: 429,
            model_served: None,
            tokens: Tokens::default(),
            cost_usd: None,
            ..served.clone()
        };
        assert_eq!(
            row(&denied),
            "2023-11-14T22:13:20Z alice-laptop     alice                payments   anthropic.messages     claude-sonnet-4-5          denied rate_limited         429       -       -         -"
        );
        let aborted = AuditRecord {
            complete: false,
            status: 0,
            key_id: None,
            model_served: None,
            tokens: Tokens {
                input_estimated: 30,
                ..Default::default()
            },
            cost_usd: None,
            ..served.clone()
        };
        assert_eq!(
            row(&aborted),
            "2023-11-14T22:13:20Z -                alice                payments   anthropic.messages     claude-sonnet-4-5          aborted                       -      30       -         -"
        );
        assert_eq!(
            header(),
            "time                 key              user                 team       route                  model                      decision                 status   input  output      cost"
        );
    }

    #[test]
    fn tail_writes_header_then_oldest_first_and_stops_on_a_closed_writer() {
        let dir = tempfile::tempdir().unwrap();
        let store = AuditStore::open(dir.path().join("a.db")).unwrap();
        let records: Vec<AuditRecord> = (0..3)
            .map(|i| AuditRecord {
                request_id: format!("r{i}"),
                timestamp_ms: 1_700_000_000_000 + i,
                route: "anthropic.messages".into(),
                ..Default::default()
            })
            .collect();
        store.insert_batch(&records).unwrap();
        let mut out = Vec::new();
        tail(&store, 2, false, Format::Json, &mut out).unwrap();
        let ids: Vec<String> = String::from_utf8(out)
            .unwrap()
            .lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["request_id"].to_string()
            })
            .collect();
        assert_eq!(ids, ["\"r1\"", "\"r2\""]);
        let mut out = Vec::new();
        tail(&store, 1, false, Format::Table, &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert_eq!(text.lines().next(), Some(header().as_str()));
        assert_eq!(text.lines().count(), 2);

        // A reader that went away ends even --follow, with the write error.
        struct Closed;
        impl Write for Closed {
            fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
                Err(std::io::ErrorKind::BrokenPipe.into())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let err = tail(&store, 2, true, Format::Table, &mut Closed).unwrap_err();
        assert_eq!(
            err.downcast_ref::<std::io::Error>().map(|e| e.kind()),
            Some(std::io::ErrorKind::BrokenPipe)
        );
    }
}
