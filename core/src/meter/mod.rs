//! Metering: every bucket a request touches, admission (check then reserve)
//! and settlement (credit or debit the difference to actual usage).
//!
//! A request touches the buckets of its key and of every pool its identity
//! belongs to (`team:payments`, `project:chatbot`, ...), for each limit set:
//! requests, input and output tokens per minute (continuous refill, debt
//! allowed), tokens per day, USD per day and per month (calendar windows).
//! It must fit all of them; when several refuse, the one that frees up last
//! decides and is named in the error.

// A refusal (`Denial`) carries the refusing bucket and every bucket's
// state for the response headers: a large `Err`, but only on the refusal
// path, where one move of it costs nothing next to the reply it becomes.
#![allow(clippy::result_large_err)]

pub mod cell;
pub mod metric;
pub mod record;
pub mod session;
pub mod shared;
pub mod store;

pub use metric::{Measure, Metric, METRICS};
pub use shared::{SharedOptions, Source};

use crate::host::SharedStore;
use crate::policy::leaf::Priority;
use crate::policy::{Key, Limit, Limits, OnExhausted, Policy, Reserve, StoreFailure};
use crate::time::Millis;
use cell::{Refill, View};
use record::Record;
use store::{Contention, Read, Step};

/// A bucket: a limit of one key or pool.
#[derive(Debug, Clone, PartialEq)]
pub struct Bucket {
    /// `key:alice-laptop` or `pool:team:payments`.
    pub scope: String,
    pub metric: Metric,
    pub limit: f64,
    /// With a shared store: admitted through it on every request.
    pub strict: bool,
    /// With a shared store: what to do when it cannot be reached.
    pub on_store_failure: StoreFailure,
    /// How long a request this bucket refuses may be held instead (ms).
    pub max_wait_ms: Option<u64>,
    /// Headroom kept for higher priorities than the requester's.
    pub reserve: Option<Reserve>,
    /// The priority of the key whose request this is.
    pub priority: Priority,
    /// Decide and audit "would deny", admit anyway.
    pub shadow: bool,
    /// What a request it would refuse gets instead of a 429.
    pub on_exhausted: OnExhausted,
    /// This request is admitted past this bucket (a shadow limit, or a
    /// downgrade): it always fits, and is still charged.
    pub past: bool,
    /// Its scope's shared-data record, formatted once per request.
    store_key: String,
}

impl Bucket {
    pub fn new(scope: String, metric: Metric, limit: f64) -> Bucket {
        Bucket::with_limit(scope, metric, Limit::new(limit))
    }

    pub fn with_limit(scope: String, metric: Metric, limit: Limit) -> Bucket {
        let store_key = record::store_key(&scope);
        Bucket {
            on_store_failure: limit.store_failure(metric),
            strict: limit.strict,
            limit: limit.amount,
            max_wait_ms: limit.max_wait_ms,
            reserve: limit.reserve,
            priority: Priority::default(),
            shadow: limit.shadow,
            on_exhausted: limit.on_exhausted,
            past: false,
            scope,
            metric,
            store_key,
        }
    }

    /// The same bucket kept in another shared-data record (a session
    /// pool's slot: its scope names the session, its record the slot).
    pub fn stored_at(mut self, store_key: String) -> Bucket {
        self.store_key = store_key;
        self
    }

    /// The overflow bucket of a limit that says `{"throttle": f}`: `f` x
    /// the limit, with the same window and refill, in a record of its own
    /// (`<scope>/throttle`). It admits only what the limit refuses.
    pub fn overflow(&self) -> Option<Bucket> {
        let OnExhausted::Throttle(f) = self.on_exhausted else {
            return None;
        };
        let limit = Limit {
            amount: self.limit * f,
            strict: self.strict,
            on_store_failure: Some(self.on_store_failure),
            ..Limit::new(0.0)
        };
        let mut b = Bucket::with_limit(format!("{}/throttle", self.scope), self.metric, limit);
        b.priority = self.priority;
        b.store_key = format!("{}/throttle", self.store_key);
        Some(b)
    }

    /// The part of the limit this request may use: all of it, or, below the
    /// reserve's priority, the limit less its reserved fraction.
    pub fn usable(&self) -> f64 {
        match self.reserve {
            Some(r) if self.priority < r.for_priority => self.limit * (1.0 - r.fraction),
            _ => self.limit,
        }
    }

    /// The reserve that keeps this request out of part of the limit, if any.
    pub fn held_back(&self) -> Option<Reserve> {
        self.reserve.filter(|r| self.priority < r.for_priority)
    }

    /// Whether `amount` fits now, reserve included: a per-minute bucket
    /// keeps the reserved units in its balance, a calendar window stops
    /// short of them. A per-minute amount is capped (as at reservation) at
    /// what this request may use, so a large request still passes a bucket
    /// full up to that point.
    pub(crate) fn fits(&self, current: cell::Cell, amount: f64) -> bool {
        if self.past {
            return true;
        }
        let reserved = self.limit - self.usable();
        match self.refill() {
            Refill::PerMinute => current.value - reserved >= amount.min(self.usable()),
            _ => self.refill().fits(current, self.usable(), amount),
        }
    }

    /// The shared-data key of the record that holds this bucket with the
    /// other buckets of its scope. Fixed, with no time in it: keys cannot be
    /// deleted in the ABI, so a name with a date in it would leak one key
    /// per scope per day.
    pub fn store_key(&self) -> &str {
        &self.store_key
    }

    /// `key:alice-laptop:requests_per_minute`, as named in errors and audit.
    pub fn label(&self) -> String {
        format!("{}:{}", self.scope, self.metric.name())
    }

    pub(crate) fn refill(&self) -> Refill {
        self.metric.refill()
    }

    /// This bucket brought up to `clock.now` from its slot of a record.
    pub(crate) fn current(&self, record: &Record, clock: Clock) -> cell::Cell {
        self.refill().current(
            record.slot(self.metric).cell(),
            self.limit,
            clock.now,
            clock.utc_offset_min,
        )
    }

    pub(crate) fn view(&self, current: cell::Cell, clock: Clock) -> View {
        self.refill()
            .view(current, self.limit, clock.now, clock.utc_offset_min)
    }

    pub(crate) fn wait_ms(&self, current: cell::Cell, amount: f64, clock: Clock) -> u64 {
        let amount = match self.refill() {
            Refill::PerMinute => amount.min(self.usable()) + (self.limit - self.usable()),
            _ => amount,
        };
        self.refill()
            .wait_ms(current, self.limit, amount, clock.now, clock.utc_offset_min)
    }
}

/// Every bucket a request touches, scope by scope (the key's, then each
/// pool's, then each provider pool whose models name the request's
/// `model`): buckets of one scope are adjacent. A provider pool's scope is
/// its name (`provider:anthropic:claude-sonnet-4`), whatever the key.
pub fn buckets_for(policy: &Policy, key: &Key, model: Option<&str>) -> Vec<Bucket> {
    let mut out = Vec::new();
    let mut add = |scope: String, limits: &Limits| {
        for (metric, limit) in limits.iter() {
            let mut b = Bucket::with_limit(scope.clone(), metric, limit);
            b.priority = key.priority;
            out.push(b);
        }
    };
    add(format!("key:{}", key.id), &key.limits);
    for pool in key.pools.iter().filter_map(|i| policy.pool(*i)) {
        add(format!("pool:{}", pool.name), &pool.limits);
    }
    for pool in model.into_iter().flat_map(|m| policy.provider_pools_for(m)) {
        add(pool.name.clone(), &pool.limits);
    }
    out
}

/// Whether a money budget applies to a key: one of its own limits or of a
/// pool it draws from is in USD. Such a key must never use a model at $0.
pub fn budget_applies(policy: &Policy, key: &Key) -> bool {
    let usd = |limits: &Limits| limits.iter().any(|(metric, _)| metric.is_usd());
    usd(&key.limits)
        || key
            .pools
            .iter()
            .filter_map(|i| policy.pool(*i))
            .any(|pool| usd(&pool.limits))
}

/// What a request asks of (at admission) or used in (at settlement) each
/// kind of bucket.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Demand {
    pub requests: f64,
    pub input_tokens: f64,
    pub output_tokens: f64,
    pub all_tokens: f64,
    pub usd: f64,
}

impl Demand {
    /// One request and no tokens: a request that is not an LLM call, or an
    /// upstream error that consumed nothing.
    pub fn one_request() -> Demand {
        Demand {
            requests: 1.0,
            ..Demand::default()
        }
    }

    /// Nothing from any bucket: a token count (`/v1/messages/count_tokens`),
    /// which the provider serves free under limits of its own.
    pub fn none() -> Demand {
        Demand::default()
    }

    pub(crate) fn amount(&self, metric: Metric) -> f64 {
        match metric.measure() {
            Measure::Requests => self.requests,
            Measure::InputTokens => self.input_tokens,
            Measure::OutputTokens => self.output_tokens,
            Measure::AllTokens => self.all_tokens,
            Measure::Usd => self.usd,
        }
    }
}

/// Where and when: the policy's time zone for calendar windows, and now.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    pub now: Millis,
    pub utc_offset_min: i32,
}

/// What was taken from one bucket at admission, to settle later.
#[derive(Debug, Clone, PartialEq)]
pub struct Reservation {
    pub bucket: Bucket,
    pub amount: f64,
    /// Where it was taken, so settlement adjusts the same place.
    pub source: Source,
}

/// A bucket's state after admission, for rate-limit response headers.
#[derive(Debug, Clone, PartialEq)]
pub struct BucketState {
    pub bucket: Bucket,
    pub view: View,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Admission {
    pub reservations: Vec<Reservation>,
    pub states: Vec<BucketState>,
}

impl Admission {
    /// Records `amount` taken from `bucket` (at `source`) and the bucket's
    /// state afterwards.
    pub(crate) fn take(&mut self, bucket: &Bucket, amount: f64, source: Source, view: View) {
        self.states.push(BucketState {
            bucket: bucket.clone(),
            view,
        });
        self.reservations.push(Reservation {
            bucket: bucket.clone(),
            amount,
            source,
        });
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Denial {
    /// This bucket cannot take the request until `wait_ms` from now.
    Limited {
        bucket: Bucket,
        wait_ms: u64,
        states: Vec<BucketState>,
    },
    /// Shared data kept refusing the update.
    Contention,
}

/// Per-minute buckets reserve at most their capacity: a request bigger than
/// the whole bucket passes when the bucket is full and leaves it in debt,
/// rather than being refused forever.
pub(crate) fn reserve_amount(bucket: &Bucket, demand: &Demand) -> f64 {
    let amount = demand.amount(bucket.metric).max(0.0);
    if bucket.metric.refill() == Refill::PerMinute {
        amount.min(bucket.limit)
    } else {
        amount
    }
}

/// The buckets of one scope record: its shared-data key and the positions
/// of its buckets in the request's list.
pub(crate) struct Group<'b> {
    pub key: &'b str,
    pub scope: &'b str,
    pub members: Vec<usize>,
}

/// Groups a request's buckets by the record that holds them, in order.
pub(crate) fn groups(buckets: &[Bucket]) -> Vec<Group<'_>> {
    let mut out: Vec<Group> = Vec::new();
    for (i, b) in buckets.iter().enumerate() {
        match out.iter_mut().find(|g| g.key == b.store_key()) {
            Some(g) => g.members.push(i),
            None => out.push(Group {
                key: b.store_key(),
                scope: &b.scope,
                members: vec![i],
            }),
        }
    }
    out
}

/// Reads a scope's record; a scope never written by this version starts
/// from what version 1 of the filter left (an upgrade keeps balances).
fn read_scope(store: &dyn SharedStore, group: &Group) -> Read {
    let read = store::read_with_cas(store, group.key);
    if read.record.is_some() {
        return read;
    }
    Read {
        record: record::migrate_v1(store, group.scope),
        ..read
    }
}

/// Checks every bucket, then reserves in each, with one read and one write
/// per scope record: the reservation is written with the CAS token of the
/// read that checked it, and only a record another worker wrote in between
/// is read again. A request that fits all of them at the check but loses a
/// race at reservation gives back what it took and is denied by the bucket
/// that refused.
pub fn admit(
    store: &dyn SharedStore,
    buckets: &[Bucket],
    demand: &Demand,
    clock: Clock,
) -> Result<Admission, Denial> {
    let groups = groups(buckets);
    let reads: Vec<Read> = groups.iter().map(|g| read_scope(store, g)).collect();
    let mut states: Vec<Option<BucketState>> = vec![None; buckets.len()];
    let mut worst: Option<(usize, u64)> = None;
    for (g, read) in groups.iter().zip(&reads) {
        let record = read.record.unwrap_or_default();
        for &i in &g.members {
            let Some(b) = buckets.get(i) else { continue };
            let current = b.current(&record, clock);
            let amount = reserve_amount(b, demand);
            if amount > 0.0 && !b.fits(current, amount) {
                let wait = b.wait_ms(current, amount, clock);
                if worst.is_none_or(|(_, w)| wait > w) {
                    worst = Some((i, wait));
                }
            }
            if let Some(s) = states.get_mut(i) {
                *s = Some(BucketState {
                    bucket: b.clone(),
                    view: b.view(current, clock),
                });
            }
        }
    }
    if let Some((i, wait_ms)) = worst {
        let bucket = buckets.get(i).cloned().ok_or(Denial::Contention)?;
        return Err(Denial::Limited {
            bucket,
            wait_ms,
            states: states.into_iter().flatten().collect(),
        });
    }

    let mut reservations: Vec<Reservation> = Vec::with_capacity(buckets.len());
    for (g, read) in groups.iter().zip(reads) {
        let result = store::update_from(store, g.key, Some(read), |record| {
            let mut record = record.unwrap_or_default();
            let mut views = Vec::with_capacity(g.members.len());
            for &i in &g.members {
                let Some(b) = buckets.get(i) else { continue };
                let current = b.current(&record, clock);
                let amount = reserve_amount(b, demand);
                if amount > 0.0 && !b.fits(current, amount) {
                    return Step::Keep(Err((i, b.wait_ms(current, amount, clock), current)));
                }
                let next = b.refill().charge(current, amount);
                if let Some(slot) = record.slot_mut(b.metric) {
                    slot.set_cell(next);
                }
                views.push((i, amount, b.view(next, clock)));
            }
            Step::Write(record, Ok(views))
        });
        match result {
            Ok(Ok(views)) => {
                for (i, amount, view) in views {
                    let Some(b) = buckets.get(i) else { continue };
                    if let Some(s) = states.get_mut(i) {
                        *s = Some(BucketState {
                            bucket: b.clone(),
                            view,
                        });
                    }
                    reservations.push(Reservation {
                        bucket: b.clone(),
                        amount,
                        source: Source::Local,
                    });
                }
            }
            Ok(Err((i, wait_ms, current))) => {
                let _ = release(store, &reservations, clock);
                let bucket = buckets.get(i).cloned().ok_or(Denial::Contention)?;
                if let Some(s) = states.get_mut(i) {
                    *s = Some(BucketState {
                        view: bucket.view(current, clock),
                        bucket: bucket.clone(),
                    });
                }
                return Err(Denial::Limited {
                    bucket,
                    wait_ms,
                    states: states.into_iter().flatten().collect(),
                });
            }
            Err(Contention) => {
                let _ = release(store, &reservations, clock);
                return Err(Denial::Contention);
            }
        }
    }
    Ok(Admission {
        reservations,
        states: states.into_iter().flatten().collect(),
    })
}

/// Every bucket's state now, without reserving anything (for the headers of
/// a request refused before admission). One read per scope record.
pub fn states(store: &dyn SharedStore, buckets: &[Bucket], clock: Clock) -> Vec<BucketState> {
    let mut out: Vec<Option<BucketState>> = vec![None; buckets.len()];
    for g in groups(buckets) {
        let record = read_scope(store, &g).record.unwrap_or_default();
        for &i in &g.members {
            let Some(b) = buckets.get(i) else { continue };
            if let Some(s) = out.get_mut(i) {
                *s = Some(BucketState {
                    bucket: b.clone(),
                    view: b.view(b.current(&record, clock), clock),
                });
            }
        }
    }
    out.into_iter().flatten().collect()
}

/// Gives every reservation back (a race lost at admission).
fn release(
    store: &dyn SharedStore,
    reservations: &[Reservation],
    clock: Clock,
) -> Result<(), Contention> {
    adjust(
        store,
        reservations.iter().map(|r| (&r.bucket, -r.amount)),
        clock,
    )
}

/// Settles a request: each bucket is debited `actual - reserved` (a credit
/// when the request used less than it reserved). Per-minute buckets may go
/// into debt; calendar quotas never below zero.
pub fn settle(
    store: &dyn SharedStore,
    reservations: &[Reservation],
    actual: &Demand,
    clock: Clock,
) -> Result<(), Contention> {
    adjust(
        store,
        reservations.iter().map(|r| {
            (
                &r.bucket,
                actual.amount(r.bucket.metric).max(0.0) - r.amount,
            )
        }),
        clock,
    )
}

/// Applies signed deltas, one write per scope record touched.
fn adjust<'a>(
    store: &dyn SharedStore,
    deltas: impl Iterator<Item = (&'a Bucket, f64)>,
    clock: Clock,
) -> Result<(), Contention> {
    let deltas: Vec<(&Bucket, f64)> = deltas.filter(|(_, d)| *d != 0.0).collect();
    let mut result = Ok(());
    let mut done: Vec<&str> = Vec::new();
    for (b, _) in &deltas {
        if done.contains(&b.store_key()) {
            continue;
        }
        done.push(b.store_key());
        let r = store::update(store, b.store_key(), |record| {
            let mut record = record.unwrap_or_default();
            for (b2, delta) in deltas
                .iter()
                .filter(|(b2, _)| b2.store_key() == b.store_key())
            {
                let next = b2.refill().charge(b2.current(&record, clock), *delta);
                if let Some(slot) = record.slot_mut(b2.metric) {
                    slot.set_cell(next);
                }
            }
            Step::Write(record, ())
        });
        if r.is_err() {
            result = Err(Contention);
        }
    }
    result
}

/// The most restrictive state per metric: lowest remaining, then lowest limit.
pub fn most_restrictive(states: &[BucketState], metric: Metric) -> Option<&BucketState> {
    states
        .iter()
        .filter(|s| s.bucket.metric == metric)
        .min_by(|a, b| {
            a.view
                .remaining
                .total_cmp(&b.view.remaining)
                .then(a.bucket.limit.total_cmp(&b.bucket.limit))
        })
}

#[cfg(test)]
mod tests;
