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
            Stored::Kept | Stored::Expired => return,
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

pub fn escape(v: &str) -> String {
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
    family_of(out, "counter", name, help, samples)
}

/// [`family`] of any metric type.
fn family_of<L: Display, V: Display>(
    out: &mut String,
    kind: &str,
    name: &str,
    help: &str,
    samples: impl IntoIterator<Item = (L, V)>,
) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
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
    match stats.usage.lock().as_deref() {
        Ok(Some(usage)) => usage.render(&mut out),
        // Not seeded yet (the store did not answer): families without samples.
        _ => Usage::default().render(&mut out),
    }
    if let Ok(missing) = stats.missing.lock() {
        render_missing(&mut out, missing.as_deref().unwrap_or_default());
    }
    stats.alerts.render(&mut out, crate::clock::now_ms());
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

/// The missing-records gauge: a series per Envoy with records missing (the
/// [`MAX_SERIES`] with most; the others summed as `other`). A gauge, not a
/// counter: a record that arrives late fills its gap and the value drops.
fn render_missing(out: &mut String, missing: &[(String, u64)]) {
    let with_gaps: Vec<&(String, u64)> = missing.iter().filter(|(_, n)| *n > 0).collect();
    let mut samples: Vec<(String, u64)> = with_gaps
        .iter()
        .take(MAX_SERIES)
        .map(|(envoy, n)| (format!("envoy=\"{}\"", escape(envoy)), *n))
        .collect();
    let others: u64 = with_gaps.iter().skip(MAX_SERIES).map(|(_, n)| n).sum();
    if others > 0 {
        samples.push(("envoy=\"other\"".to_string(), others));
    }
    family_of(
        out,
        "gauge",
        "tollgate_audit_missing_records",
        "Audit records never stored, by Envoy: holes in its sequence numbers over the last 7 days, once the next record is 30 minutes old (tollgate audit gaps lists them).",
        samples,
    );
}

impl Usage {
    /// The usage families, series sorted by their labels.
    fn render(&self, out: &mut String) {
        let mut series: Vec<(String, &Sums)> = self
            .series
            .iter()
            .map(|(k, v)| (self.label_text(k), v))
            .collect();
        series.sort_by(|a, b| a.0.cmp(&b.0));
        family(
            out,
            "tollgate_requests_total",
            "Requests seen by the gateway, by identity, model and decision.",
            series.iter().map(|(l, s)| (l, s.requests)),
        );
        family(
            out,
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
            out,
            "tollgate_cost_usd_total",
            "Cost in USD priced from the policy.",
            series.iter().map(|(l, s)| (l, s.cost_usd)),
        );
        let mut denials: Vec<(&str, u64)> = Reason::ALL
            .iter()
            .zip(self.denials)
            .filter(|(_, n)| *n > 0)
            .map(|(r, n)| (r.as_str(), n))
            .collect();
        denials.sort();
        family(
            out,
            "tollgate_denials_total",
            "Denied requests by reason.",
            denials
                .into_iter()
                .map(|(reason, n)| (format!("reason=\"{reason}\""), n)),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tollgate_core::audit::Tokens;

    fn record(id: &str, team: &str, complete: bool) -> AuditRecord {
        AuditRecord {
            request_id: id.into(),
            complete,
            team: Some(team.into()),
            app: Some("bot".into()),
            route: "anthropic.messages".into(),
            model_requested: Some("claude-sonnet-4-5".into()),
            ..Default::default()
        }
    }

    fn completed(mut r: AuditRecord) -> AuditRecord {
        r.complete = true;
        r.model_served = Some("claude-sonnet-4-5-20250929".into());
        r.tokens = Tokens {
            input: Some(10),
            output: Some(20),
            cache_write: Some(0),
            cache_read: Some(5),
            ..Default::default()
        };
        r.cost_usd = Some(0.25);
        r
    }

    fn render_usage(usage: Usage) -> String {
        let stats = Stats::default();
        *stats.usage.lock().unwrap() = Some(usage);
        render(&stats)
    }

    #[test]
    fn an_unseeded_collector_still_publishes_every_family() {
        let text = render(&Stats::default());
        for family in [
            "tollgate_requests_total",
            "tollgate_tokens_total",
            "tollgate_cost_usd_total",
            "tollgate_denials_total",
        ] {
            assert!(
                text.contains(&format!("# TYPE {family} counter\n")),
                "{text}"
            );
        }
        assert!(text.ends_with(
            "# HELP tollgate_collector_entries_without_record_total Entries without a Tollgate record.\n\
             # TYPE tollgate_collector_entries_without_record_total counter\n\
             tollgate_collector_entries_without_record_total 0\n"
        ));
    }

    #[test]
    fn missing_records_are_a_gauge_per_envoy_with_a_gap() {
        let stats = Stats::default();
        let text = render(&stats);
        assert!(
            text.contains("# TYPE tollgate_audit_missing_records gauge\n"),
            "{text}"
        );
        assert!(!text.contains("tollgate_audit_missing_records{"));
        let mut missing: Vec<(String, u64)> = (0..MAX_SERIES + 2)
            .map(|i| (format!("e{i:03}"), 1))
            .collect();
        missing.insert(0, ("big".to_string(), 7));
        missing.push(("healthy".to_string(), 0));
        *stats.missing.lock().unwrap() = Some(missing);
        let text = render(&stats);
        let samples = samples(&text, "tollgate_audit_missing_records");
        assert_eq!(samples.len(), MAX_SERIES + 1);
        assert_eq!(samples[0], "{envoy=\"big\"} 7");
        assert_eq!(samples[MAX_SERIES], "{envoy=\"other\"} 3");
        assert!(!text.contains("healthy"));
    }

    #[test]
    fn label_values_are_escaped() {
        let mut usage = Usage::default();
        usage.count(&record("q", "a \"b\"\\c\nd", true), &Stored::New);
        assert!(render_usage(usage)
            .contains(r#"tollgate_requests_total{team="a \"b\"\\c\nd",app="bot""#));
    }

    /// The samples of one family, `labels value` per line.
    fn samples(text: &str, family: &str) -> Vec<String> {
        text.lines()
            .filter_map(|l| l.strip_prefix(family))
            .filter(|l| l.starts_with('{') || l.starts_with(' '))
            .map(str::to_string)
            .collect()
    }

    /// Every sample value by its full name, for comparing two scrapes.
    fn values(text: &str) -> HashMap<String, f64> {
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| l.rsplit_once(' '))
            .map(|(k, v)| (k.to_string(), v.parse().unwrap()))
            .collect()
    }

    #[test]
    fn a_completed_request_counts_once_and_adds_only_what_grew() {
        let mut usage = Usage::default();
        let provisional = record("r1", "payments", false);
        usage.count(&provisional, &Stored::New);
        let complete = completed(provisional.clone());
        usage.count(&complete, &Stored::Replaced(Box::new(provisional)));
        // Replaying either version changes nothing.
        usage.count(&complete, &Stored::Kept);
        let text = render_usage(usage);
        // The provisional record had no model served: its request stays
        // where it was counted; the tokens and cost go with the complete one.
        assert_eq!(
            samples(&text, "tollgate_requests_total"),
            [
                r#"{team="payments",app="bot",agent="",model="claude-sonnet-4-5",decision="allowed"} 1"#,
                r#"{team="payments",app="bot",agent="",model="claude-sonnet-4-5-20250929",decision="allowed"} 0"#,
            ]
        );
        assert_eq!(
            samples(&text, "tollgate_tokens_total")
                .iter()
                .filter(|s| s.contains("20250929"))
                .map(|s| s.rsplit_once(' ').unwrap().1)
                .collect::<Vec<_>>(),
            ["10", "20", "0", "5"]
        );
        assert_eq!(
            samples(&text, "tollgate_cost_usd_total"),
            [
                r#"{team="payments",app="bot",agent="",model="claude-sonnet-4-5",decision="allowed"} 0"#,
                r#"{team="payments",app="bot",agent="",model="claude-sonnet-4-5-20250929",decision="allowed"} 0.25"#,
            ]
        );
    }

    #[test]
    fn a_denial_counts_once_whichever_version_carried_it() {
        let mut usage = Usage::default();
        let mut denied = record("d1", "search", true);
        denied.decision = Outcome::Denied;
        denied.reason = Reason::RateLimited;
        usage.count(&denied, &Stored::New);
        // Envoy refused the body of an in-flight request (413): the
        // provisional record is a denial, and so is its completion.
        let mut refused = record("d2", "search", false);
        refused.decision = Outcome::Denied;
        refused.reason = Reason::BodyTooLarge;
        usage.count(&refused, &Stored::New);
        let mut done = refused.clone();
        done.complete = true;
        usage.count(&done, &Stored::Replaced(Box::new(refused)));
        // Allowed when provisional, denied when complete.
        let allowed = record("d3", "search", false);
        let mut over_budget = allowed.clone();
        over_budget.complete = true;
        over_budget.decision = Outcome::Denied;
        over_budget.reason = Reason::BudgetExhausted;
        usage.count(&allowed, &Stored::New);
        usage.count(&over_budget, &Stored::Replaced(Box::new(allowed)));
        let text = render_usage(usage);
        assert_eq!(
            samples(&text, "tollgate_denials_total"),
            [
                r#"{reason="body_too_large"} 1"#,
                r#"{reason="budget_exhausted"} 1"#,
                r#"{reason="rate_limited"} 1"#,
            ]
        );
        assert_eq!(
            samples(&text, "tollgate_requests_total"),
            [
                r#"{team="search",app="bot",agent="",model="claude-sonnet-4-5",decision="allowed"} 1"#,
                r#"{team="search",app="bot",agent="",model="claude-sonnet-4-5",decision="denied"} 2"#,
            ]
        );
    }

    #[test]
    fn label_values_past_the_cap_count_as_other_from_then_on() {
        let mut usage = Usage::default();
        for i in 0..MAX_SERIES + 5 {
            let r = completed(record(&format!("r{i}"), &format!("team-{i}"), true));
            usage.count(&r, &Stored::New);
        }
        // A team that had a series keeps it.
        usage.count(&completed(record("again", "team-0", true)), &Stored::New);
        let text = render_usage(usage);
        let requests = samples(&text, "tollgate_requests_total");
        assert_eq!(requests.len(), MAX_SERIES + 1);
        let model = "claude-sonnet-4-5-20250929";
        assert!(requests.contains(&format!(
            r#"{{team="team-0",app="bot",agent="",model="{model}",decision="allowed"}} 2"#
        )));
        assert!(requests.contains(&format!(
            r#"{{team="other",app="bot",agent="",model="{model}",decision="allowed"}} 5"#
        )));
        assert!(!text.contains(&format!("team-{MAX_SERIES}\"")));
    }

    #[test]
    fn seeding_gives_the_busiest_values_their_own_series() {
        let row = |team: &str, requests: u64| SeriesTotals {
            team: team.into(),
            decision: "denied".into(),
            reason: "rate_limited".into(),
            requests,
            tokens: [1, 2, 3, 4],
            cost_usd: 0.5,
            ..Default::default()
        };
        let mut rows: Vec<SeriesTotals> = (0..MAX_SERIES)
            .map(|i| row(&format!("busy-{i}"), 10))
            .collect();
        rows.push(row("quiet", 1));
        let text = render_usage(Usage::seeded(&rows));
        assert!(text.contains(
            r#"tollgate_requests_total{team="other",app="",agent="",model="",decision="denied"} 1"#
        ));
        assert!(text.contains(
            r#"tollgate_tokens_total{team="busy-0",app="",agent="",model="",decision="denied",class="cache_read"} 4"#
        ));
        assert!(text.contains(&format!(
            r#"tollgate_denials_total{{reason="rate_limited"}} {}"#,
            MAX_SERIES * 10 + 1
        )));
    }

    #[test]
    fn no_published_sample_ever_goes_down_or_away() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(17);
        let mut usage = Usage::default();
        // Stored versions by request id, as the store keeps them.
        let mut stored: HashMap<String, AuditRecord> = HashMap::new();
        let mut before = HashMap::new();
        for step in 0..800 {
            let id = format!("r{}", rng.random_range(0..400));
            let mut r = record(
                &id,
                &format!("team-{}", rng.random_range(0..MAX_SERIES + 40)),
                rng.random_bool(0.5),
            );
            // Complete records carry usage; a provisional one may carry some
            // too, even more than its completion reports.
            if r.complete || rng.random_bool(0.3) {
                let complete = r.complete;
                r = completed(r);
                r.complete = complete;
                r.tokens.output = Some(rng.random_range(0..50));
                r.cost_usd = Some(rng.random_range(0.0..1.0));
            }
            if rng.random_bool(0.2) {
                r.decision = Outcome::Denied;
                r.reason = Reason::ALL[rng.random_range(1..Reason::COUNT)];
            }
            // The store's rules: new, complete over provisional, or kept.
            let outcome = match stored.get(&id) {
                None => Stored::New,
                Some(old) if !old.complete && r.complete => Stored::Replaced(Box::new(old.clone())),
                Some(_) => Stored::Kept,
            };
            if outcome.changed() {
                stored.insert(id, r.clone());
            }
            usage.count(&r, &outcome);
            let mut text = String::new();
            usage.render(&mut text);
            let after = values(&text);
            for (name, v) in &before {
                let now = after.get(name).copied();
                assert!(
                    now.is_some_and(|a| a >= *v),
                    "step {step}: {name} went from {v} to {now:?}"
                );
            }
            before = after;
        }
        let requests: f64 = before
            .iter()
            .filter(|(k, _)| k.starts_with("tollgate_requests_total"))
            .map(|(_, v)| v)
            .sum();
        assert_eq!(
            requests as usize,
            stored.len(),
            "one request per request id"
        );
    }
}
