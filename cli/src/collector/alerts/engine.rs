//! Utilisation of every quota and budget, per entity and calendar window,
//! and the alert thresholds it crosses. Pure: the store and the clock are
//! the caller's (`super`), so crossing, deduplication and window rollover
//! are tested with time passed in.
//!
//! An entity is what a bucket is named after: `key:<id>` for a key's own
//! limits, `pool:<kind>:<value>` for a pool (`pool:team:payments`). Windows
//! are the meter's: the calendar day or month in the policy's time zone
//! (`tollgate_core::time::day_window` / `month_window`), so an alert's
//! window is the one the limit itself refills on.

use super::super::store::IdentityUsage;
use std::collections::{HashMap, HashSet};
use tollgate_core::meter::cell::Refill;
use tollgate_core::meter::{Measure, Metric};
use tollgate_core::policy::{Limits, Policy, POOL_KINDS};
use tollgate_core::time;

/// Calendar period of a quota or budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Period {
    Day,
    Month,
}

impl Period {
    /// The period a limit refills on; `None` for per-minute limits, which
    /// refill continuously and have no window to alert once in.
    pub fn of(metric: Metric) -> Option<Period> {
        match metric.refill() {
            Refill::Day => Some(Period::Day),
            Refill::Month => Some(Period::Month),
            Refill::PerMinute => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Period::Day => "day",
            Period::Month => "month",
        }
    }

    /// The window of this period containing `at`.
    pub fn window(self, at: u64, offset_min: i32) -> time::Window {
        match self {
            Period::Day => time::day_window(at, offset_min),
            Period::Month => time::month_window(at, offset_min),
        }
    }
}

/// One calendar window of one period.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct WindowId {
    pub period: Period,
    pub start: u64,
}

/// What an entity used in a window.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Used {
    /// Every token of every class (what `tokens_per_day` counts).
    pub tokens: f64,
    pub usd: f64,
}

impl Used {
    fn of(metric: Metric, used: &Used) -> Option<f64> {
        match metric.measure() {
            Measure::AllTokens => Some(used.tokens),
            Measure::Usd => Some(used.usd),
            _ => None,
        }
    }
}

/// What the alerts watch, from the policy: each entity with a quota or a
/// budget, and the zone of its windows.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Targets {
    pub offset_min: i32,
    entities: HashMap<String, Limits>,
}

impl Targets {
    pub fn of(policy: &Policy) -> Targets {
        let quota = |l: &Limits| l.iter().any(|(m, _)| Period::of(m).is_some());
        let mut entities = HashMap::new();
        for key in policy.keys().iter().filter(|k| quota(&k.limits)) {
            entities.insert(format!("key:{}", key.id), key.limits.clone());
        }
        for pool in policy.pools.iter().filter(|p| quota(&p.limits)) {
            entities.insert(format!("pool:{}", pool.name), pool.limits.clone());
        }
        Targets {
            offset_min: policy.settings.utc_offset_minutes,
            entities,
        }
    }

    /// The entities an identity's usage counts toward, among the watched.
    fn entities_of<'a>(&'a self, who: &IdentityUsage) -> impl Iterator<Item = &'a str> + 'a {
        let mut names = Vec::with_capacity(6);
        if let Some(id) = &who.key_id {
            names.push(format!("key:{id}"));
        }
        for (kind, value) in
            POOL_KINDS
                .iter()
                .zip([&who.team, &who.project, &who.user, &who.app, &who.agent])
        {
            if let Some(v) = value {
                names.push(format!("pool:{kind}:{v}"));
            }
        }
        names.into_iter().filter_map(|n| {
            self.entities
                .get_key_value(n.as_str())
                .map(|(k, _)| k.as_str())
        })
    }
}

/// A threshold crossed: the alert to send once.
#[derive(Debug, Clone, PartialEq)]
pub struct Crossing {
    pub entity: String,
    pub metric: Metric,
    pub threshold: f64,
    pub used: f64,
    pub limit: f64,
    pub window: WindowId,
    pub window_end: u64,
}

impl Crossing {
    /// The threshold in millionths, the dedup key's exact form.
    pub fn threshold_ppm(&self) -> u32 {
        ppm(self.threshold)
    }
}

fn ppm(threshold: f64) -> u32 {
    (threshold * 1e6).round() as u32
}

/// A gauge sample: an entity's use of one limit in its current window.
#[derive(Debug, Clone, PartialEq)]
pub struct Gauge {
    pub entity: String,
    pub limit: &'static str,
    pub used: f64,
    pub limit_value: f64,
}

/// Usage by window and entity, and the crossings already recorded.
#[derive(Debug, Default)]
pub struct Engine {
    pub targets: Targets,
    windows: HashMap<WindowId, (u64, HashMap<String, Used>)>,
    /// (entity, limit, threshold ppm, window start) already recorded in the
    /// store: the store dedups too, this spares it the repeated insert.
    known: HashSet<(String, Metric, u32, u64)>,
}

impl Engine {
    pub fn new(targets: Targets) -> Engine {
        Engine {
            targets,
            ..Engine::default()
        }
    }

    /// The engine for a new policy: usage is counted again from the store
    /// (entities and windows may have changed), what was recorded stays
    /// known.
    pub fn replaced(self, targets: Targets) -> Engine {
        Engine {
            targets,
            windows: HashMap::new(),
            known: self.known,
        }
    }

    /// The day and month windows containing `at`, with their ends.
    pub fn windows_at(&self, at: u64) -> [(WindowId, u64); 2] {
        [Period::Day, Period::Month].map(|period| {
            let w = period.window(at, self.targets.offset_min);
            (
                WindowId {
                    period,
                    start: w.start,
                },
                w.end,
            )
        })
    }

    pub fn is_counted(&self, id: &WindowId) -> bool {
        self.windows.contains_key(id)
    }

    /// Starts counting a window from what the store holds for it.
    pub fn seed(&mut self, id: WindowId, end: u64, rows: &[IdentityUsage]) {
        let mut used: HashMap<String, Used> = HashMap::new();
        for row in rows {
            for entity in self.targets.entities_of(row) {
                let u = used.entry(entity.to_string()).or_default();
                u.tokens += row.tokens as f64;
                u.usd += row.usd;
            }
        }
        self.windows.insert(id, (end, used));
    }

    /// Adds (or with negative amounts, takes back) what an identity used in
    /// a counted window; the entities it touched.
    pub fn add(&mut self, id: WindowId, who: &IdentityUsage, delta: Used) -> Vec<String> {
        let entities: Vec<String> = self.targets.entities_of(who).map(str::to_string).collect();
        if let Some((_, used)) = self.windows.get_mut(&id) {
            for e in &entities {
                let u = used.entry(e.clone()).or_default();
                u.tokens += delta.tokens;
                u.usd += delta.usd;
            }
        }
        entities
    }

    /// The entities an identity's usage counts toward.
    pub fn entities_of(&self, who: &IdentityUsage) -> Vec<String> {
        self.targets.entities_of(who).map(str::to_string).collect()
    }

    /// Thresholds of `entity` in window `id` crossed and not yet recorded;
    /// each is known from now on (see [`Engine::forget`]).
    pub fn crossings(&mut self, id: WindowId, entity: &str) -> Vec<Crossing> {
        let Some((end, used)) = self.windows.get(&id) else {
            return Vec::new();
        };
        let (Some(limits), Some(used)) = (self.targets.entities.get(entity), used.get(entity))
        else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for (metric, limit) in limits.iter() {
            if Period::of(metric) != Some(id.period) {
                continue;
            }
            let Some(value) = Used::of(metric, used) else {
                continue;
            };
            for &t in limits.alerts() {
                // Sums of prices carry float error: 0.1 + 0.2 of a $0.3
                // budget has crossed 100%.
                if value + 1e-9 * limit.amount < t * limit.amount {
                    break;
                }
                let key = (entity.to_string(), metric, ppm(t), id.start);
                if self.known.insert(key) {
                    out.push(Crossing {
                        entity: entity.to_string(),
                        metric,
                        threshold: t,
                        used: value,
                        limit: limit.amount,
                        window: id,
                        window_end: *end,
                    });
                }
            }
        }
        out
    }

    /// Every crossing not yet recorded, in every counted window (after a
    /// policy change lowered a limit, or on a window's first count).
    pub fn all_crossings(&mut self) -> Vec<Crossing> {
        let mut pairs: Vec<(WindowId, String)> = self
            .windows
            .iter()
            .flat_map(|(id, (_, used))| used.keys().map(|e| (*id, e.clone())))
            .collect();
        pairs.sort();
        pairs
            .into_iter()
            .flat_map(|(id, e)| self.crossings(id, &e))
            .collect()
    }

    /// A crossing that could not be recorded: found again next time.
    pub fn forget(&mut self, c: &Crossing) {
        self.known.remove(&(
            c.entity.clone(),
            c.metric,
            c.threshold_ppm(),
            c.window.start,
        ));
    }

    /// Drops windows that ended more than a day before `now` (a late
    /// record for one counts it again from the store) and what is known of
    /// them.
    pub fn prune(&mut self, now: u64) {
        const GRACE: u64 = super::STALE_AFTER_MS;
        self.windows
            .retain(|_, (end, _)| end.saturating_add(GRACE) > now);
        let oldest = now.saturating_sub(40 * GRACE);
        self.known.retain(|(_, _, _, start)| *start >= oldest);
    }

    /// Each watched entity's use of each quota and budget in the window
    /// containing `now`, by entity and limit; entities without use in the
    /// window have none.
    pub fn gauges(&self, now: u64) -> Vec<Gauge> {
        let mut out = Vec::new();
        for (id, _) in self.windows_at(now) {
            let Some((_, used)) = self.windows.get(&id) else {
                continue;
            };
            for (entity, u) in used {
                let Some(limits) = self.targets.entities.get(entity) else {
                    continue;
                };
                for (metric, limit) in limits.iter() {
                    if Period::of(metric) != Some(id.period) {
                        continue;
                    }
                    if let Some(value) = Used::of(metric, u) {
                        out.push(Gauge {
                            entity: entity.clone(),
                            limit: metric.name(),
                            used: value,
                            limit_value: limit.amount,
                        });
                    }
                }
            }
        }
        out.sort_by(|a, b| (&a.entity, a.limit).cmp(&(&b.entity, b.limit)));
        out
    }
}
