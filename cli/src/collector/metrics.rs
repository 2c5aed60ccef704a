//! The collector's Prometheus metrics, from counters in memory: seeded once
//! at start from one aggregate query over the store, then advanced as the
//! writer stores records. A scrape never touches the database.
//!
//! Counters only go up (Prometheus reads a decrease as a restart):
//! - a new request adds its record: one request, its tokens, its cost, and
//!   a denial if it was denied;
//! - a complete record replacing a provisional one adds what grew (tokens,
//!   cost, a denial the provisional record did not have), under the complete
//!   record's labels, and no request: the request was counted once already;
//! - a label value keeps its series once it has one; after [`MAX_SERIES`]
//!   values of a label, new ones are counted as `other`.

use super::store::{decision_str, SeriesTotals, Stored};
use super::Stats;
use std::collections::HashMap;
use std::fmt::{Display, Write};
use std::sync::atomic::Ordering;
use tollgate_core::audit::{AuditRecord, Outcome, Reason};

/// Values per label with a series of their own; later ones become `other`,
/// so a policy with 100k keys cannot explode a Prometheus server.
pub const MAX_SERIES: usize = 200;

const LABELS: [&str; 4] = ["team", "app", "agent", "model"];
const CLASSES: [&str; 4] = ["input", "output", "cache_write", "cache_read"];
const OTHER: &str = "other";

/// The values of one label that have a series, by id.
#[derive(Debug, Default)]
struct Label {
    ids: HashMap<String, u16>,
    names: Vec<String>,
}

/// A label value's id; [`Label::OTHER`] for `other`.
type Id = u16;

impl Label {
    const OTHER: Id = Id::MAX;

    fn id(&mut self, value: &str) -> Id {
        if value == OTHER {
            return Label::OTHER;
        }
        if let Some(id) = self.ids.get(value) {
            return *id;
        }
        match Id::try_from(self.names.len()) {
            Ok(id) if self.names.len() < MAX_SERIES => {
                self.names.push(value.to_string());
                self.ids.insert(value.to_string(), id);
                id
            }
            _ => Label::OTHER,
        }
    }

    fn name(&self, id: Id) -> &str {
        self.names
            .get(usize::from(id))
            .map_or(OTHER, String::as_str)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct SeriesKey {
    labels: [Id; 4],
    denied: bool,
}

#[derive(Debug, Default, Clone, Copy)]
struct Sums {
    requests: u64,
    tokens: [u64; 4],
    cost_usd: f64,
}

/// What one stored version of a record counts for.
struct Counted<'a> {
    labels: [&'a str; 4],
    denied: bool,
    reason: Reason,
    tokens: [u64; 4],
    cost_usd: f64,
}

impl<'a> Counted<'a> {
    fn of(r: &'a AuditRecord) -> Counted<'a> {
        let text = |v: &'a Option<String>| v.as_deref().unwrap_or_default();
        let t = &r.tokens;
        Counted {
            labels: [
                text(&r.team),
                text(&r.app),
                text(&r.agent),
                text(if r.model_served.is_some() {
                    &r.model_served
                } else {
                    &r.model_requested
                }),
            ],
            denied: r.decision == Outcome::Denied,
            reason: r.reason,
            tokens: [t.input, t.output, t.cache_write, t.cache_read].map(Option::unwrap_or_default),
            cost_usd: r.cost_usd.unwrap_or_default(),
        }
    }
}

/// The usage counters behind `tollgate_requests_total`, `_tokens_total`,
/// `_cost_usd_total` and `_denials_total`.
#[derive(Debug, Default)]
pub struct Usage {
    labels: [Label; 4],
    series: HashMap<SeriesKey, Sums>,
    denials: [u64; Reason::COUNT],
}

fn reason_index(reason: Reason) -> usize {
    Reason::ALL
        .iter()
        .position(|r| *r == reason)
        .unwrap_or_default()
}

impl Usage {
    /// Counters holding what the store already has (rows busiest first, so
    /// the busiest label values get their own series).
    pub fn seeded(rows: &[SeriesTotals]) -> Usage {
        let mut usage = Usage::default();
        for row in rows {
            let labels = [&row.team, &row.app, &row.agent, &row.model];
            let denied = row.decision == decision_str(Outcome::Denied);
            let sums = usage.sums(labels.map(String::as_str), denied);
            sums.requests += row.requests;
            for (sum, n) in sums.tokens.iter_mut().zip(row.tokens) {
                *sum += n;
            }
            sums.cost_usd += row.cost_usd;
            if denied {
                match Reason::ALL.iter().find(|r| r.as_str() == row.reason) {
                    Some(reason) => usage.add_denials(*reason, row.requests),
                    None => tracing::warn!("stored reason {:?} is not known", row.reason),
                }
            }
        }
        usage
    }

    fn sums(&mut self, labels: [&str; 4], denied: bool) -> &mut Sums {
        let mut ids = [0; 4];
        for ((id, label), value) in ids.iter_mut().zip(&mut self.labels).zip(labels) {
            *id = label.id(value);
        }
        self.series
            .entry(SeriesKey {
                labels: ids,
                denied,
            })
            .or_default()
    }

    fn add_denials(&mut self, reason: Reason, n: u64) {
        if let Some(d) = self.denials.get_mut(reason_index(reason)) {
            *d += n;
        }
    }

    /// Counts what storing `record` did (see the module docs).
    pub fn count(&mut self, record: &AuditRecord, stored: &Stored) {
        let new = Counted::of(record);
        let old = match stored {
            Stored::New => None,
            Stored::Replaced(old) => Some(Counted::of(old)),
            Stored::Kept => return,
        };
        let sums = self.sums(new.labels, new.denied);
        if old.is_none() {
            sums.requests += 1;
        }
        let (old_tokens, old_cost) = old
            .as_ref()
            .map_or(([0; 4], 0.0), |o| (o.tokens, o.cost_usd));
        for ((sum, n), before) in sums.tokens.iter_mut().zip(new.tokens).zip(old_tokens) {
            *sum += n.saturating_sub(before);
        }
        let grown = new.cost_usd - old_cost;
        if grown > 0.0 {
            sums.cost_usd += grown;
        }
        if new.denied && !old.is_some_and(|o| o.denied) {
            self.add_denials(new.reason, 1);
        }
    }

    /// The label text of a series, `team="…",app="…",agent="…",model="…",decision="…"`.
    fn label_text(&self, key: &SeriesKey) -> String {
        let mut out = String::new();
        for ((name, label), id) in LABELS.iter().zip(&self.labels).zip(key.labels) {
            let _ = write!(out, "{name}=\"{}\",", escape(label.name(id)));
        }
        let decision = if key.denied {
            Outcome::Denied
        } else {
            Outcome::Allowed
        };
        let _ = write!(out, "decision=\"{}\"", decision_str(decision));
        out
    }
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Writes one counter family: its help and type, then one sample per label
/// set (`labels` without braces; empty for none).
fn family<L: Display, V: Display>(
    out: &mut String,
    name: &str,
    help: &str,
    samples: impl IntoIterator<Item = (L, V)>,
) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
    for (labels, value) in samples {
        let labels = labels.to_string();
        if labels.is_empty() {
            let _ = writeln!(out, "{name} {value}");
        } else {
            let _ = writeln!(out, "{name}{{{labels}}} {value}");
        }
    }
}

/// The Prometheus text exposition of the collector's counters.
pub fn render(stats: &Stats) -> String {
    let mut out = String::new();
    let usage = stats.usage.lock();
    let empty = Usage::default();
    let usage = match usage.as_ref().ok().and_then(|u| u.as_ref()) {
        Some(u) => u,
        // Not seeded yet (the store did not answer): families without samples.
        None => &empty,
    };
    let mut series: Vec<(String, &Sums)> = usage
        .series
        .iter()
        .map(|(k, v)| (usage.label_text(k), v))
        .collect();
    series.sort_by(|a, b| a.0.cmp(&b.0));
    family(
        &mut out,
        "tollgate_requests_total",
        "Requests seen by the gateway, by identity, model and decision.",
        series.iter().map(|(l, s)| (l, s.requests)),
    );
    family(
        &mut out,
        "tollgate_tokens_total",
        "Tokens reported by the provider, by class.",
        series.iter().flat_map(|(l, s)| {
            CLASSES
                .iter()
                .zip(s.tokens)
                .map(move |(class, n)| (format!("{l},class=\"{class}\""), n))
        }),
    );
    family(
        &mut out,
        "tollgate_cost_usd_total",
        "Cost in USD priced from the policy.",
        series.iter().map(|(l, s)| (l, s.cost_usd)),
    );
    let mut denials: Vec<(&str, u64)> = Reason::ALL
        .iter()
        .zip(usage.denials)
        .filter(|(_, n)| *n > 0)
        .map(|(r, n)| (r.as_str(), n))
        .collect();
    denials.sort();
    family(
        &mut out,
        "tollgate_denials_total",
        "Denied requests by reason.",
        denials
            .into_iter()
            .map(|(reason, n)| (format!("reason=\"{reason}\""), n)),
    );
    for (name, help, counter) in [
        (
            "tollgate_collector_entries_received_total",
            "Access-log entries received from Envoy.",
            &stats.received,
        ),
        (
            "tollgate_collector_records_stored_total",
            "Audit records written to the store.",
            &stats.stored,
        ),
        (
            "tollgate_collector_records_dropped_total",
            "Records dropped because the write queue was full.",
            &stats.dropped,
        ),
        (
            "tollgate_collector_records_invalid_total",
            "Entries whose audit record could not be parsed.",
            &stats.invalid,
        ),
        (
            "tollgate_collector_entries_without_record_total",
            "Entries without a Tollgate record.",
            &stats.without_record,
        ),
    ] {
        family(
            &mut out,
            name,
            help,
            [("", counter.load(Ordering::Relaxed))],
        );
    }
    out
}
