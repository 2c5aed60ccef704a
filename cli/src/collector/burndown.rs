//! Budget burn-down: for every daily or monthly limit of the policy's keys
//! and pools (`budget_usd_per_day`, `budget_usd_per_month`,
//! `tokens_per_day`), what its entity used of it in the current window,
//! hour by hour (day windows) or day by day (month windows), against the
//! limit and its alert thresholds.
//!
//! The figures come from the audit store, not from the gateway's buckets:
//! they are what was charged, as recorded (a denial charges nothing). The
//! window is the policy's calendar window (its `settings.time_zone`)
//! holding the end of the view, so a view ending yesterday shows
//! yesterday's burn-down. The view's other filters narrow what is summed
//! (a model filter shows that model's share of each budget) and which
//! entities are listed (a team filter lists that team's pool and keys, a
//! key filter that key and the pools it draws from).
//! Per-minute limits refill continuously and have no burn-down.

use super::filter::Filter;
use super::report::GroupBy;
use super::series::{buckets, grouped, Bucket, Point};
use super::store::AuditBackend;
use anyhow::Result;
use serde::{Deserialize, Serialize};
use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, HashMap};
use tollgate_core::meter::cell::Refill;
use tollgate_core::meter::{Measure, Metric};
use tollgate_core::policy::{Limits, Policy};
use tollgate_core::time::{day_window, month_window, Window};

/// Thresholds when the policy declares none: half, most, all.
pub const DEFAULT_ALERTS: [f64; 3] = [0.5, 0.8, 1.0];

/// The most limits one answer lists, most used first.
pub const MAX_LIMITS: usize = 24;

/// One limit's burn-down.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Burn {
    /// `key:alice`, `team:payments`: the buckets' scope.
    pub entity: String,
    /// The policy field: `budget_usd_per_day`.
    pub limit: &'static str,
    /// `usd` or `tokens`.
    pub unit: &'static str,
    pub amount: f64,
    pub window_start_ms: u64,
    pub window_end_ms: u64,
    pub used: f64,
    /// `used / amount`.
    pub ratio: f64,
    /// Fractions of `amount` marked on the chart: the entity's `alerts`
    /// when the policy declares them, else [`DEFAULT_ALERTS`].
    pub alerts: Vec<f64>,
    /// Cumulative use at the end of each bucket of the window so far.
    pub points: Vec<BurnPoint>,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct BurnPoint {
    pub end_ms: u64,
    pub used: f64,
}

/// The `alerts` fractions a policy declares, by entity (`key:alice`,
/// `team:payments`), read beside the limits (`"alerts": [0.5, 0.8, 1.0]` in
/// a key, in its `limits`, in a pool or in `defaults`), without requiring
/// the compiled policy to know the field.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Alerts {
    by_entity: HashMap<String, Vec<f64>>,
    default: Option<Vec<f64>>,
}

#[derive(Deserialize, Default)]
struct WithAlerts {
    #[serde(default)]
    alerts: Option<Vec<f64>>,
    #[serde(default)]
    limits: Option<Box<WithAlerts>>,
}

impl WithAlerts {
    fn alerts(self) -> Option<Vec<f64>> {
        self.alerts.or(self.limits.and_then(|l| l.alerts))
    }
}

#[derive(Deserialize)]
struct KeyAlerts {
    id: String,
    #[serde(flatten)]
    alerts: WithAlerts,
}

#[derive(Deserialize)]
struct AlertsDoc {
    #[serde(default)]
    defaults: Option<WithAlerts>,
    #[serde(default)]
    keys: Vec<KeyAlerts>,
    #[serde(default)]
    pools: HashMap<String, WithAlerts>,
}

impl Alerts {
    /// The thresholds of a policy document; none (the defaults) when it
    /// declares none or they cannot be read.
    pub fn of_policy(json: &[u8]) -> Alerts {
        let Ok(doc) = serde_json::from_slice::<AlertsDoc>(json) else {
            return Alerts::default();
        };
        let mut by_entity = HashMap::new();
        for k in doc.keys {
            if let Some(a) = k.alerts.alerts() {
                by_entity.insert(format!("key:{}", k.id), a);
            }
        }
        for (name, p) in doc.pools {
            if let Some(a) = p.alerts() {
                by_entity.insert(name, a);
            }
        }
        Alerts {
            by_entity,
            default: doc.defaults.and_then(WithAlerts::alerts),
        }
    }

    fn of(&self, entity: &str) -> Vec<f64> {
        let mut a = self
            .by_entity
            .get(entity)
            .or(self.default.as_ref())
            .cloned()
            .unwrap_or_else(|| DEFAULT_ALERTS.to_vec());
        a.sort_by(f64::total_cmp);
        a
    }
}

/// One entity with limits: its scope, the dimension its records carry it
/// in, and the identity a key has (to list it under an identity filter).
struct Entity<'p> {
    name: String,
    dimension: GroupBy,
    value: String,
    identity: Vec<(GroupBy, &'p str)>,
    limits: &'p Limits,
}

fn entities(policy: &Policy) -> Vec<Entity<'_>> {
    let mut out = Vec::new();
    for key in policy.keys().iter().filter(|k| !k.revoked) {
        let i = &key.identity;
        let identity = [
            (GroupBy::Team, &i.team),
            (GroupBy::Project, &i.project),
            (GroupBy::User, &i.user),
            (GroupBy::App, &i.app),
            (GroupBy::Agent, &i.agent),
        ]
        .into_iter()
        .filter_map(|(d, v)| v.as_deref().map(|v| (d, v)))
        .collect();
        out.push(Entity {
            name: format!("key:{}", key.id),
            dimension: GroupBy::Key,
            value: key.id.clone(),
            identity,
            limits: &key.limits,
        });
    }
    for pool in &policy.pools {
        let Some((kind, value)) = pool.name.split_once(':') else {
            continue;
        };
        let Some(dimension) = GroupBy::parse(kind) else {
            continue;
        };
        out.push(Entity {
            name: pool.name.clone(),
            dimension,
            value: value.to_string(),
            identity: vec![(dimension, value)],
            limits: &pool.limits,
        });
    }
    out
}

/// Whether the view may hold records of the entity: no filter of the view
/// contradicts the entity's own value or a key's identity.
fn listed(view: &Filter, e: &Entity<'_>) -> bool {
    view.equals.iter().all(|(d, v)| {
        if *d == e.dimension {
            return *v == e.value;
        }
        match e.identity.iter().find(|(id, _)| id == d) {
            Some((_, mine)) => *mine == v.as_str(),
            // A key without a team may still be filtered by team: its
            // records carry none, so it is not listed.
            None => e.dimension != GroupBy::Key || *d == GroupBy::Model,
        }
    })
}

fn window(refill: Refill, at_ms: u64, offset_min: i32) -> Option<(Window, Bucket)> {
    match refill {
        Refill::Day => Some((day_window(at_ms, offset_min), Bucket::Hour)),
        Refill::Month => Some((month_window(at_ms, offset_min), Bucket::Day)),
        Refill::PerMinute => None,
    }
}

fn amount_of(p: &Point, measure: Measure) -> f64 {
    match measure {
        Measure::Usd => p.cost_usd,
        _ => p.tokens as f64,
    }
}

/// The burn-down of every daily and monthly limit the view lists, most
/// used first, at most [`MAX_LIMITS`].
pub fn build<B: AuditBackend + ?Sized>(
    store: &B,
    policy: &Policy,
    alerts: &Alerts,
    view: &Filter,
    now_ms: u64,
) -> Result<Vec<Burn>> {
    let end = view.end(now_ms);
    let at = end.saturating_sub(1).max(view.since_ms);
    let offset = policy.settings.utc_offset_minutes;
    // One grouped query per window kind and dimension, however many
    // entities share them.
    let mut sums: HashMap<(Bucket, GroupBy), BTreeMap<(String, u64), Point>> = HashMap::new();
    let entities = entities(policy);
    // A key filter lists the pools that key draws from, when the policy
    // knows the key.
    let key_pools: Option<Vec<&str>> = view
        .equals
        .iter()
        .find(|(d, _)| *d == GroupBy::Key)
        .and_then(|(_, id)| policy.keys().iter().find(|k| k.id == *id))
        .map(|k| {
            k.pools
                .iter()
                .filter_map(|i| policy.pool(*i))
                .map(|p| p.name.as_str())
                .collect()
        });
    let draws = |e: &Entity<'_>| {
        e.dimension == GroupBy::Key
            || key_pools
                .as_ref()
                .is_none_or(|pools| pools.contains(&e.name.as_str()))
    };
    // What each limit used, for every listed entity (a policy may hold
    // 100,000 keys); the points are drawn for the most used only.
    let mut used_by: Vec<(&Entity<'_>, Metric, f64, Window, Bucket, f64)> = Vec::new();
    for e in entities.iter().filter(|e| listed(view, e) && draws(e)) {
        for (metric, limit) in e.limits.iter() {
            let Some((win, bucket)) = window(metric.refill(), at, offset) else {
                continue;
            };
            let g = match sums.entry((bucket, e.dimension)) {
                Entry::Occupied(o) => o.into_mut(),
                Entry::Vacant(v) => {
                    let in_window = Filter {
                        since_ms: win.start,
                        until_ms: Some(win.end.min(end)),
                        equals: view
                            .equals
                            .iter()
                            .filter(|(d, _)| *d != e.dimension)
                            .cloned()
                            .collect(),
                    };
                    let sql = e.dimension.sql(store.day_expr());
                    v.insert(grouped(store, &in_window, sql, bucket)?)
                }
            };
            let used = of_entity(g, &e.value)
                .map(|(_, p)| amount_of(p, metric.measure()))
                .sum();
            used_by.push((e, metric, limit.amount, win, bucket, used));
        }
    }
    let ratio = |u: &(&Entity<'_>, Metric, f64, Window, Bucket, f64)| u.5 / u.2;
    used_by.sort_by(|a, b| {
        ratio(b)
            .total_cmp(&ratio(a))
            .then_with(|| a.0.name.cmp(&b.0.name))
            .then_with(|| a.1.name().cmp(b.1.name()))
    });
    used_by.truncate(MAX_LIMITS);
    let mut out = Vec::with_capacity(used_by.len());
    for u in &used_by {
        let (e, metric, amount, win, bucket, used) = *u;
        let by_bucket: HashMap<u64, &Point> = sums
            .get(&(bucket, e.dimension))
            .map(|g| of_entity(g, &e.value).map(|((_, t), p)| (*t, p)).collect())
            .unwrap_or_default();
        let mut so_far = 0.0;
        let points = buckets(bucket, win.start, win.end.min(end))?
            .into_iter()
            .map(|start| {
                if let Some(p) = by_bucket.get(&start) {
                    so_far += amount_of(p, metric.measure());
                }
                BurnPoint {
                    end_ms: (start + bucket.ms()).min(win.end),
                    used: so_far,
                }
            })
            .collect();
        out.push(Burn {
            entity: e.name.clone(),
            limit: metric.name(),
            unit: if metric.is_usd() { "usd" } else { "tokens" },
            amount,
            window_start_ms: win.start,
            window_end_ms: win.end,
            used,
            ratio: ratio(u),
            alerts: alerts.of(&e.name),
            points,
        });
    }
    Ok(out)
}

/// One entity's buckets of a grouped sum.
fn of_entity<'g>(
    g: &'g BTreeMap<(String, u64), Point>,
    value: &str,
) -> impl Iterator<Item = (&'g (String, u64), &'g Point)> {
    g.range((value.to_string(), 0)..=(value.to_string(), u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alerts_are_read_beside_the_limits_of_keys_pools_and_defaults() {
        let a = Alerts::of_policy(
            br#"{"version": 1, "defaults": {"limits": {"alerts": [0.9]}},
                 "keys": [{"id": "a", "alerts": [1.0, 0.25]},
                          {"id": "b", "limits": {"alerts": [0.6], "budget_usd_per_day": 1}},
                          {"id": "c"}],
                 "pools": {"team:payments": {"budget_usd_per_day": 5, "alerts": [0.7]}}}"#,
        );
        assert_eq!(a.of("key:a"), [0.25, 1.0]);
        assert_eq!(a.of("key:b"), [0.6]);
        assert_eq!(a.of("key:c"), [0.9]);
        assert_eq!(a.of("team:payments"), [0.7]);
        let none = Alerts::of_policy(br#"{"version": 1, "keys": []}"#);
        assert_eq!(none.of("key:a"), DEFAULT_ALERTS);
        assert_eq!(Alerts::of_policy(b"not json").of("x"), DEFAULT_ALERTS);
    }
}
