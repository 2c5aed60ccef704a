//! Limits of a key or a pool: one optional [`Limit`] per row of the metric
//! table ([`crate::meter::METRICS`]). A limit is written as its amount
//! (`"requests_per_minute": 60`) or, to set how it behaves, as an object with
//! the amount under `limit`:
//!
//! ```json
//! "budget_usd_per_month": { "limit": 200, "strict": true, "on_store_failure": "closed" }
//! ```

use super::leaf::{self, Count, Priority, Usd};
use crate::meter::{Measure, Metric};
use serde::de::{Deserializer, MapAccess, Visitor};
use serde::Deserialize;

/// What a shared limit does when Redis or the quota service cannot be
/// reached and this replica's lease has run out (`docs/scale-out.md`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreFailure {
    /// Meter locally at the limit divided by the replicas last seen, and
    /// push that consumption as debt once the store is back.
    Local,
    /// Refuse with a provider-shaped 503 (`quota_store_unavailable`).
    Closed,
    /// Admit without counting (audited `uncounted`).
    Open,
}

impl StoreFailure {
    pub fn parse(s: &str) -> Result<StoreFailure, String> {
        match s {
            "local" => Ok(StoreFailure::Local),
            "closed" => Ok(StoreFailure::Closed),
            "open" => Ok(StoreFailure::Open),
            _ => Err("must be \"local\", \"closed\" or \"open\"".to_string()),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            StoreFailure::Local => "local",
            StoreFailure::Closed => "closed",
            StoreFailure::Open => "open",
        }
    }
}

/// Headroom of a limit kept for higher priorities: requests below `for_`
/// may not take the last `fraction` of the limit.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Reserve {
    pub fraction: f64,
    pub for_priority: Priority,
}

/// What a limit does with a request it would refuse (`on_exhausted`): the
/// rungs of the ladder between admitting and a 429 (`docs/metering.md`,
/// "A ladder instead of a wall").
#[derive(Debug, Clone, Default, PartialEq)]
pub enum OnExhausted {
    /// Refuse (429), the default.
    #[default]
    Block,
    /// Serve the request with this (cheaper) model instead, admitted past
    /// this limit and still charged to it.
    DowngradeTo(String),
    /// Admit it from an overflow bucket of this fraction of the limit,
    /// with the same window and refill.
    Throttle(f64),
}

impl OnExhausted {
    /// `"block"`, `{"downgrade_to": MODEL}` or `{"throttle": FRACTION}`, the
    /// one rule the typed parse and the schema walker share.
    pub fn parse(v: &serde_json::Value) -> Result<OnExhausted, String> {
        const WHAT: &str =
            "must be \"block\", {\"downgrade_to\": MODEL} or {\"throttle\": FRACTION}";
        if v.as_str() == Some("block") {
            return Ok(OnExhausted::Block);
        }
        let Some(obj) = v.as_object().filter(|o| o.len() == 1) else {
            return Err(WHAT.to_string());
        };
        if let Some(m) = obj.get("downgrade_to") {
            let model = m.as_str().unwrap_or_default();
            if model.trim().is_empty()
                || model.contains(['*', '?'])
                || model.contains(char::is_whitespace)
            {
                return Err(
                    "downgrade_to: must be one model name (no globs, no spaces)".to_string()
                );
            }
            return Ok(OnExhausted::DowngradeTo(model.to_string()));
        }
        if let Some(f) = obj.get("throttle") {
            let f = f.as_f64().ok_or_else(|| {
                "throttle: must be a fraction between 0 and 1 (exclusive), e.g. 0.2".to_string()
            })?;
            return leaf::fraction(f)
                .map(OnExhausted::Throttle)
                .map_err(|e| format!("throttle: {e}"));
        }
        Err(WHAT.to_string())
    }

    pub fn is_block(&self) -> bool {
        *self == OnExhausted::Block
    }
}

/// One limit: its amount (a whole count, or USD for budgets) and how it
/// behaves: across replicas, when it runs out, and for whom.
#[derive(Debug, Clone, PartialEq)]
pub struct Limit {
    pub amount: f64,
    /// Always admitted through the shared store, one round trip per request
    /// (never from a local lease). Only meaningful with a shared store.
    pub strict: bool,
    /// `None`: the default for the limit's kind (see [`Limit::store_failure`]).
    pub on_store_failure: Option<StoreFailure>,
    /// Hold a request that would fit within this many ms, instead of 429.
    pub max_wait_ms: Option<u64>,
    /// Headroom kept for higher priorities.
    pub reserve: Option<Reserve>,
    /// Decide and audit "would deny", admit anyway (and still debit).
    pub shadow: bool,
    pub on_exhausted: OnExhausted,
}

impl Limit {
    pub fn new(amount: f64) -> Limit {
        Limit {
            amount,
            strict: false,
            on_store_failure: None,
            max_wait_ms: None,
            reserve: None,
            shadow: false,
            on_exhausted: OnExhausted::Block,
        }
    }

    /// What to do when the shared store is unreachable: per-minute buckets
    /// meter locally by default, quotas and budgets refuse (they are money).
    pub fn store_failure(&self, metric: Metric) -> StoreFailure {
        self.on_store_failure.unwrap_or(if metric.is_quota() {
            StoreFailure::Closed
        } else {
            StoreFailure::Local
        })
    }
}

/// Alert thresholds of a key's or a pool's quotas and budgets
/// (`"alerts": [0.5, 0.8, 1.0]`): fractions of each daily or monthly limit
/// at which the collector sends one event per window. Per-minute limits
/// have none: they refill continuously, so "80% used" has no window to be
/// said once in. A fixed array keeps [`Limits`] `Copy`.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Alerts {
    len: u8,
    at: [f64; leaf::MAX_ALERTS],
}

impl Alerts {
    /// A list that passed [`leaf::alerts`]; thresholds past the maximum
    /// are ignored.
    pub fn new(list: &[f64]) -> Alerts {
        let mut out = Alerts::default();
        for (slot, t) in out.at.iter_mut().zip(list) {
            *slot = *t;
            out.len += 1;
        }
        out
    }

    /// The thresholds, increasing.
    pub fn thresholds(&self) -> &[f64] {
        self.at.get(..usize::from(self.len)).unwrap_or_default()
    }
}

impl<'de> Deserialize<'de> for Alerts {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let list = Vec::<f64>::deserialize(d)?;
        for t in &list {
            leaf::alert_threshold(*t).map_err(D::Error::custom)?;
        }
        leaf::alerts(&list).map_err(|(_, e)| D::Error::custom(e))?;
        Ok(Alerts::new(&list))
    }
}

/// Limits of one key or one pool; a missing limit means unlimited.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Limits {
    limits: [Option<Limit>; Metric::COUNT],
    /// `None`: not set here (a key then takes its groups' or the defaults').
    alerts: Option<Alerts>,
}

impl Limits {
    pub fn get(&self, metric: Metric) -> Option<f64> {
        self.limit(metric).map(|l| l.amount)
    }

    pub fn limit(&self, metric: Metric) -> Option<Limit> {
        self.limits.get(metric as usize).cloned().flatten()
    }

    pub fn set(&mut self, metric: Metric, limit: Limit) {
        if let Some(slot) = self.limits.get_mut(metric as usize) {
            *slot = Some(limit);
        }
    }

    /// The alert thresholds that apply to these limits' quotas and budgets
    /// (none when unset).
    pub fn alerts(&self) -> &[f64] {
        self.alerts.as_ref().map_or(&[], Alerts::thresholds)
    }

    /// Whether `alerts` is set here, even to an empty list.
    pub fn has_alerts(&self) -> bool {
        self.alerts.is_some()
    }

    pub fn set_alerts(&mut self, alerts: Alerts) {
        self.alerts = Some(alerts);
    }

    /// Every limit that is set, in table order.
    pub fn iter(&self) -> impl Iterator<Item = (Metric, Limit)> + '_ {
        Metric::all().filter_map(|m| Some((m, self.limit(m)?)))
    }

    /// For each limit: this one if set, else the most restrictive among
    /// `groups`, else `defaults` (its settings travel with its amount).
    /// Alerts are one list, not a value per limit: this one's if set (an
    /// empty list turns alerts off), else the first of `groups` (the key's
    /// order) that sets one, else the defaults'.
    pub fn resolve(&self, groups: &[&Limits], defaults: &Limits) -> Limits {
        let mut out = Limits {
            alerts: self
                .alerts
                .or_else(|| groups.iter().find_map(|g| g.alerts))
                .or(defaults.alerts),
            ..Limits::default()
        };
        for metric in Metric::all() {
            let group = groups
                .iter()
                .filter_map(|g| g.limit(metric))
                .min_by(|a, b| a.amount.total_cmp(&b.amount));
            if let Some(l) = self.limit(metric).or(group).or(defaults.limit(metric)) {
                out.set(metric, l);
            }
        }
        out
    }
}

/// A `limits` object: its fields are the rows of the metric table.
impl<'de> Deserialize<'de> for Limits {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct LimitsVisitor;
        impl<'de> Visitor<'de> for LimitsVisitor {
            type Value = Limits;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an object of limits")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Limits, A::Error> {
                let mut limits = Limits::default();
                while let Some(name) = map.next_key::<std::borrow::Cow<'de, str>>()? {
                    if name == "alerts" {
                        if limits.alerts.is_some() {
                            return Err(serde::de::Error::duplicate_field("alerts"));
                        }
                        limits.alerts = Some(map.next_value()?);
                        continue;
                    }
                    let Some(metric) = Metric::from_field(&name) else {
                        return Err(serde::de::Error::unknown_field(&name, &[]));
                    };
                    if limits.limit(metric).is_some() {
                        return Err(serde::de::Error::duplicate_field(metric.name()));
                    }
                    let limit = map.next_value_seed(LimitSeed(metric.measure()))?;
                    limits.set(metric, limit);
                }
                Ok(limits)
            }
        }
        d.deserialize_map(LimitsVisitor)
    }
}

/// One limit's value: an amount of the row's measure, or the object form.
struct LimitSeed(Measure);

impl LimitSeed {
    fn amount<E: serde::de::Error>(&self, n: f64) -> Result<f64, E> {
        match self.0 {
            Measure::Usd => leaf::usd(n),
            _ => leaf::count(n).map(|c| c as f64),
        }
        .map_err(E::custom)
    }
}

impl<'de> serde::de::DeserializeSeed<'de> for LimitSeed {
    type Value = Limit;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Limit, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for LimitSeed {
    type Value = Limit;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a limit: a number, or an object with \"limit\"")
    }
    fn visit_u64<E: serde::de::Error>(self, n: u64) -> Result<Limit, E> {
        self.amount(n as f64).map(Limit::new)
    }
    fn visit_i64<E: serde::de::Error>(self, n: i64) -> Result<Limit, E> {
        self.amount(n as f64).map(Limit::new)
    }
    fn visit_f64<E: serde::de::Error>(self, n: f64) -> Result<Limit, E> {
        self.amount(n).map(Limit::new)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Limit, A::Error> {
        let mut amount = None;
        let mut strict = false;
        let mut on_store_failure = None;
        let mut max_wait_ms = None;
        let mut reserve = None;
        let mut shadow = false;
        let mut on_exhausted = OnExhausted::Block;
        while let Some(name) = map.next_key::<std::borrow::Cow<'de, str>>()? {
            match name.as_ref() {
                "limit" => {
                    amount = Some(match self.0 {
                        Measure::Usd => map.next_value::<Usd>()?.0,
                        _ => map.next_value::<Count>()?.0 as f64,
                    })
                }
                "strict" => strict = map.next_value()?,
                "on_store_failure" => {
                    let s: std::borrow::Cow<'de, str> = map.next_value()?;
                    on_store_failure =
                        Some(StoreFailure::parse(&s).map_err(serde::de::Error::custom)?);
                }
                "max_wait_ms" => {
                    let n: f64 = map.next_value()?;
                    max_wait_ms = Some(leaf::wait_ms(n).map_err(serde::de::Error::custom)?);
                }
                "reserve" => {
                    let super::raw::Obj(r) = map.next_value::<super::raw::Obj<RawReserve>>()?;
                    reserve = Some(r.into());
                }
                "shadow" => shadow = map.next_value()?,
                "on_exhausted" => {
                    let v: serde_json::Value = map.next_value()?;
                    on_exhausted = OnExhausted::parse(&v).map_err(serde::de::Error::custom)?;
                }
                other => {
                    return Err(serde::de::Error::unknown_field(
                        other,
                        &[
                            "limit",
                            "strict",
                            "on_store_failure",
                            "max_wait_ms",
                            "reserve",
                            "shadow",
                            "on_exhausted",
                        ],
                    ))
                }
            }
        }
        let amount = amount.ok_or_else(|| serde::de::Error::missing_field("limit"))?;
        Ok(Limit {
            amount,
            strict,
            on_store_failure,
            max_wait_ms,
            reserve,
            shadow,
            on_exhausted,
        })
    }
}

/// `"reserve": {"fraction": 0.2, "for": "interactive"}` (`for` defaults to
/// interactive).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawReserve {
    fraction: Fraction,
    #[serde(rename = "for", default = "interactive")]
    for_priority: Priority,
}

fn interactive() -> Priority {
    Priority(Priority::INTERACTIVE)
}

struct Fraction(f64);

impl<'de> Deserialize<'de> for Fraction {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let n = f64::deserialize(d)?;
        leaf::fraction(n)
            .map(Fraction)
            .map_err(serde::de::Error::custom)
    }
}

impl From<RawReserve> for Reserve {
    fn from(r: RawReserve) -> Reserve {
        Reserve {
            fraction: r.fraction.0,
            for_priority: r.for_priority,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_limit_is_an_amount_or_an_object_with_its_settings() {
        let l: Limits = serde_json::from_str(
            r#"{"requests_per_minute": 60,
                "budget_usd_per_month": {"limit": 200.5, "strict": true, "on_store_failure": "open"}}"#,
        )
        .unwrap();
        assert_eq!(l.limit(Metric::Requests), Some(Limit::new(60.0)));
        let budget = l.limit(Metric::UsdPerMonth).unwrap();
        assert_eq!(
            (budget.amount, budget.strict, budget.on_store_failure),
            (200.5, true, Some(StoreFailure::Open))
        );
        assert_eq!(
            Limit::new(60.0).store_failure(Metric::Requests),
            StoreFailure::Local
        );
        assert_eq!(
            Limit::new(5.0).store_failure(Metric::UsdPerDay),
            StoreFailure::Closed
        );
        for bad in [
            r#"{"requests_per_minute": {"strict": true}}"#,
            r#"{"requests_per_minute": {"limit": 1.5}}"#,
            r#"{"requests_per_minute": {"limit": 1, "on_store_failure": "maybe"}}"#,
            r#"{"requests_per_minute": {"limit": 1, "burst": 2}}"#,
        ] {
            assert!(serde_json::from_str::<Limits>(bad).is_err(), "{bad}");
        }
    }
}
