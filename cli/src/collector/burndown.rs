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
use serde::Serialize;
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

/// The fractions marked on an entity's charts: its `alerts` as the
/// compiled policy resolved them (the key's own, else its first group's
/// with some, else the defaults'; a pool's own), or 50/80/100% where the
/// policy declares none. `[]` (alerts off) marks nothing.
fn thresholds(limits: &Limits) -> Vec<f64> {
    if limits.has_alerts() {
        limits.alerts().to_vec()
    } else {
        DEFAULT_ALERTS.to_vec()
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
            alerts: thresholds(e.limits),
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
    fn alerts_are_marked_as_the_policy_resolves_them_else_at_50_80_100_percent() {
        let (policy, _) = tollgate_core::policy::compile(
            br#"{"version": 1, "defaults": {"limits": {"alerts": [0.9]}},
                 "groups": {"ops": {"limits": {"alerts": [0.25, 1.0]}}},
                 "keys": [{"id": "a", "groups": ["ops"],
                           "key_sha256": "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"},
                          {"id": "b", "limits": {"alerts": [], "budget_usd_per_day": 1},
                           "key_sha256": "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb"},
                          {"id": "c",
                           "key_sha256": "cccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccc"}],
                 "pools": {"team:payments": {"budget_usd_per_day": 5, "alerts": [0.7]},
                           "team:search": {"budget_usd_per_day": 5}}}"#,
            "p.json",
            0,
        )
        .unwrap();
        let by_entity: HashMap<String, Vec<f64>> = entities(&policy)
            .into_iter()
            .map(|e| (e.name, thresholds(e.limits)))
            .collect();
        assert_eq!(by_entity["key:a"], [0.25, 1.0], "its group's");
        assert!(by_entity["key:b"].is_empty(), "turned off");
        assert_eq!(by_entity["key:c"], [0.9], "the defaults'");
        assert_eq!(by_entity["team:payments"], [0.7]);
        assert_eq!(by_entity["team:search"], DEFAULT_ALERTS, "none declared");
    }
}
