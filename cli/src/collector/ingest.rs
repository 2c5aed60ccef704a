//! `POST /api/ingest`: Envoy's file access log (`audit.jsonl`) shipped over
//! HTTP by a log shipper (Vector, Fluent Bit) from each Envoy pod, for
//! deployments where the collector cannot read the file and the gRPC
//! stream's losses must still be recovered. The body is JSON lines, one
//! record a line as Envoy writes them (or wrapped by the shipper, see
//! [`parse_line`]); storing is idempotent as for `tollgate audit import`,
//! so a shipper that resends after a timeout changes nothing.

use super::store::{parse_line, AuditStore, ImportStats};
use super::{store_counted, Stats};
use serde::Serialize;
use std::sync::atomic::Ordering;

/// Largest body accepted, in bytes: several thousand records, more than a
/// shipper's default batch (Vector 10 MB, Fluent Bit's chunks a few MB).
pub const MAX_BODY: usize = 16 << 20;

/// Records per insert transaction.
const BATCH: usize = 1024;

/// The answer to a successful ingest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Ingested {
    /// Lines holding a record (valid or not).
    pub lines: usize,
    /// New requests, and complete records that replaced provisional ones.
    pub stored: usize,
    /// Records the store already had (or a complete version of).
    pub duplicates: usize,
    /// Records older than the retention horizon, not stored.
    pub expired: usize,
    /// Lines that are not a record.
    pub invalid: usize,
}

/// Why a body was refused.
#[derive(Debug, PartialEq, Eq)]
pub enum Refused {
    /// Not JSON lines of audit records (400).
    Garbage(String),
    /// The store has not been read for the metrics yet, or failed (503).
    Unavailable(String),
}

/// Stores every record of a JSON-lines body. A body whose lines hold no
/// valid record is refused whole, naming the first bad line; otherwise
/// invalid lines are counted and skipped, as a file import does.
pub fn ingest(store: &AuditStore, stats: &Stats, body: &[u8]) -> Result<Ingested, Refused> {
    let text = std::str::from_utf8(body).map_err(|e| {
        Refused::Garbage(format!(
            "the body is not UTF-8 text (byte {}): send Envoy's audit.jsonl lines",
            e.valid_up_to()
        ))
    })?;
    let mut count = ImportStats::default();
    let mut records = Vec::new();
    let mut first_error = None;
    for (n, line) in text.lines().enumerate() {
        let Some(parsed) = parse_line(line) else {
            continue;
        };
        count.lines += 1;
        match parsed {
            Ok(r) => records.push(r),
            Err(e) => {
                count.invalid += 1;
                first_error.get_or_insert_with(|| format!("line {}: {e}", n + 1));
            }
        }
    }
    stats
        .invalid
        .fetch_add(count.invalid as u64, Ordering::Relaxed);
    if records.is_empty() {
        if let Some(e) = first_error {
            return Err(Refused::Garbage(format!(
                "no audit record in the body ({e}): send Envoy's audit.jsonl lines, one JSON record a line"
            )));
        }
    }
    // Counted into the metrics only once they are seeded: a record stored
    // before the seed would be counted by both.
    if stats.usage.lock().map_or(true, |u| u.is_none()) {
        return Err(Refused::Unavailable(
            "the collector has not read its store yet; retry".to_string(),
        ));
    }
    for chunk in records.chunks(BATCH) {
        let stored = store_counted(store, stats, chunk)
            .map_err(|e| Refused::Unavailable(format!("storing failed: {e:#}")))?;
        count.count(&stored);
    }
    Ok(Ingested {
        lines: count.lines,
        stored: count.stored,
        duplicates: count.duplicates(),
        expired: count.expired,
        invalid: count.invalid,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tollgate_core::audit::AuditRecord;

    fn seeded(store: &AuditStore) -> Stats {
        let stats = Stats::default();
        *stats.usage.lock().unwrap() = Some(super::super::metrics::Usage::seeded(
            &store.series_totals().unwrap(),
        ));
        stats
    }

    fn line(id: &str, complete: bool) -> String {
        serde_json::to_string(&AuditRecord {
            request_id: id.into(),
            complete,
            route: "anthropic.messages".into(),
            team: Some("payments".into()),
            ..Default::default()
        })
        .unwrap()
    }

    #[test]
    fn stores_lines_idempotently_and_counts_what_it_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let store = AuditStore::open(dir.path().join("a.db")).unwrap();
        let stats = seeded(&store);
        let body = format!(
            "{}\n-\n\n{}\n{{\"not\": \"a record\"}}\n{}\n",
            line("p", false),
            line("q", true),
            line("p", true)
        );
        assert_eq!(
            ingest(&store, &stats, body.as_bytes()),
            Ok(Ingested {
                lines: 4,
                stored: 3,
                duplicates: 0,
                expired: 0,
                invalid: 1
            })
        );
        assert_eq!(
            ingest(&store, &stats, body.as_bytes()),
            Ok(Ingested {
                lines: 4,
                stored: 0,
                duplicates: 3,
                expired: 0,
                invalid: 1
            }),
            "a resent body changes nothing"
        );
        assert_eq!(store.count().unwrap(), 2);
        assert!(store.get("p").unwrap().unwrap().complete);
        let metrics = super::super::metrics::render(&stats);
        assert!(
            metrics.contains(
                "tollgate_requests_total{team=\"payments\",app=\"\",agent=\"\",model=\"\",decision=\"allowed\"} 2\n"
            ),
            "{metrics}"
        );
        assert!(metrics.contains("tollgate_collector_records_invalid_total 2\n"));
        // An empty body (a shipper's heartbeat) stores nothing.
        assert_eq!(
            ingest(&store, &stats, b""),
            Ok(Ingested {
                lines: 0,
                stored: 0,
                duplicates: 0,
                expired: 0,
                invalid: 0
            })
        );
    }

    #[test]
    fn accepts_lines_a_shipper_wrapped_without_parsing_them() {
        let dir = tempfile::tempdir().unwrap();
        let store = AuditStore::open(dir.path().join("a.db")).unwrap();
        let stats = seeded(&store);
        let fluent_bit = serde_json::json!({"date": 1.5, "log": line("fb", true)});
        let vector = serde_json::json!({"message": line("v", true), "file": "/x/audit.jsonl"});
        let dash = serde_json::json!({"log": "-"});
        let body = format!("{fluent_bit}\n{vector}\n{dash}\n");
        assert_eq!(ingest(&store, &stats, body.as_bytes()).unwrap().stored, 2);
        assert_eq!(store.count().unwrap(), 2);
    }

    #[test]
    fn garbage_is_refused_whole_with_the_first_bad_line() {
        let dir = tempfile::tempdir().unwrap();
        let store = AuditStore::open(dir.path().join("a.db")).unwrap();
        let stats = seeded(&store);
        assert_eq!(
            ingest(&store, &stats, b"-\nhello world\n{\"a\": 1}\n"),
            Err(Refused::Garbage(
                "no audit record in the body (line 2: expected value at line 1 column 1): send Envoy's audit.jsonl lines, one JSON record a line".into()
            ))
        );
        assert_eq!(
            ingest(&store, &stats, &[b'{', 0xff, b'}']),
            Err(Refused::Garbage(
                "the body is not UTF-8 text (byte 1): send Envoy's audit.jsonl lines".into()
            ))
        );
        assert_eq!(store.count().unwrap(), 0);
        let unseeded = Stats::default();
        assert_eq!(
            ingest(&store, &unseeded, line("x", true).as_bytes()),
            Err(Refused::Unavailable(
                "the collector has not read its store yet; retry".into()
            ))
        );
    }
}
