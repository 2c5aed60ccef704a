//! Metering: every bucket a request touches, admission (check then reserve)
//! and settlement (credit or debit the difference to actual usage).
//!
//! A request touches the buckets of its key and of every pool its identity
//! belongs to (`team:payments`, `project:chatbot`, ...), for each limit set:
//! requests, input and output tokens per minute (continuous refill, debt
//! allowed), tokens per day, USD per day and per month (calendar windows).
//! It must fit all of them; when several refuse, the one that frees up last
//! decides and is named in the error.

pub mod cell;
pub mod metric;
pub mod store;

pub use metric::{Measure, Metric, METRICS};

use crate::policy::{Key, Limits, Policy};
use crate::time::Millis;
use cell::{Refill, View};
use store::{Contention, Step};

use crate::host::SharedStore;

/// A bucket: a limit of one key or pool.
#[derive(Debug, Clone, PartialEq)]
pub struct Bucket {
    /// `key:alice-laptop` or `pool:team:payments`.
    pub scope: String,
    pub metric: Metric,
    pub limit: f64,
    /// Its shared-data key, formatted once per request (see [`Bucket::store_key`]).
    store_key: String,
}

impl Bucket {
    pub fn new(scope: String, metric: Metric, limit: f64) -> Bucket {
        let store_key = format!("tollgate/1/{scope}/{}", metric.name());
        Bucket {
            scope,
            metric,
            limit,
            store_key,
        }
    }

    /// Fixed shared-data key: scope and metric, no time. Keys cannot be
    /// deleted in the ABI, so a name with a date in it would leak one key per
    /// bucket per day.
    pub fn store_key(&self) -> &str {
        &self.store_key
    }

    /// `key:alice-laptop:requests_per_minute`, as named in errors and audit.
    pub fn label(&self) -> String {
        format!("{}:{}", self.scope, self.metric.name())
    }
}

/// Every bucket a key's requests touch.
pub fn buckets_for(policy: &Policy, key: &Key) -> Vec<Bucket> {
    let mut out = Vec::new();
    let mut add = |scope: String, limits: &Limits| {
        for (metric, limit) in limits.iter() {
            out.push(Bucket::new(scope.clone(), metric, limit));
        }
    };
    add(format!("key:{}", key.id), &key.limits);
    for pool in key.pools.iter().filter_map(|i| policy.pool(*i)) {
        add(format!("pool:{}", pool.name), &pool.limits);
    }
    out
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
    /// One request and no tokens: a request that is not an LLM call, a
    /// token count, or an upstream error that consumed nothing.
    pub fn one_request() -> Demand {
        Demand {
            requests: 1.0,
            ..Demand::default()
        }
    }

    fn amount(&self, metric: Metric) -> f64 {
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
fn reserve_amount(bucket: &Bucket, demand: &Demand) -> f64 {
    let amount = demand.amount(bucket.metric).max(0.0);
    if bucket.metric.refill() == Refill::PerMinute {
        amount.min(bucket.limit)
    } else {
        amount
    }
}

/// Checks every bucket, then reserves in each, with one read and one
/// write per bucket: the reservation is written with the CAS token of the
/// read that checked it, and only a bucket another worker wrote in between
/// is read again. A request that fits all of them at the check but loses a
/// race at reservation gives back what it took and is denied by the bucket
/// that refused.
pub fn admit(
    store: &dyn SharedStore,
    buckets: &[Bucket],
    demand: &Demand,
    clock: Clock,
) -> Result<Admission, Denial> {
    let reads: Vec<store::Read> = buckets
        .iter()
        .map(|b| store::read_with_cas(store, b.store_key()))
        .collect();
    let mut states = Vec::with_capacity(buckets.len());
    let mut worst: Option<(usize, u64)> = None;
    for (i, (b, read)) in buckets.iter().zip(&reads).enumerate() {
        let refill = b.metric.refill();
        let current = refill.current(read.cell, b.limit, clock.now, clock.utc_offset_min);
        let amount = reserve_amount(b, demand);
        if amount > 0.0 && !refill.fits(current, b.limit, amount) {
            let wait = refill.wait_ms(current, b.limit, amount, clock.now, clock.utc_offset_min);
            if worst.is_none_or(|(_, w)| wait > w) {
                worst = Some((i, wait));
            }
        }
        states.push(BucketState {
            bucket: b.clone(),
            view: refill.view(current, b.limit, clock.now, clock.utc_offset_min),
        });
    }
    if let Some((i, wait_ms)) = worst {
        let bucket = buckets.get(i).cloned().ok_or(Denial::Contention)?;
        return Err(Denial::Limited {
            bucket,
            wait_ms,
            states,
        });
    }

    let mut reservations: Vec<Reservation> = Vec::with_capacity(buckets.len());
    let mut states = Vec::with_capacity(buckets.len());
    for (b, read) in buckets.iter().zip(reads) {
        let amount = reserve_amount(b, demand);
        let refill = b.metric.refill();
        let result = store::update_from(store, b.store_key(), Some(read), |cell| {
            let current = refill.current(cell, b.limit, clock.now, clock.utc_offset_min);
            if amount > 0.0 && !refill.fits(current, b.limit, amount) {
                let wait =
                    refill.wait_ms(current, b.limit, amount, clock.now, clock.utc_offset_min);
                return Step::Keep(Err((wait, current)));
            }
            let next = refill.charge(current, amount);
            Step::Write(next, Ok(next))
        });
        match result {
            Ok(Ok(next)) => {
                states.push(BucketState {
                    bucket: b.clone(),
                    view: refill.view(next, b.limit, clock.now, clock.utc_offset_min),
                });
                reservations.push(Reservation {
                    bucket: b.clone(),
                    amount,
                });
            }
            Ok(Err((wait_ms, current))) => {
                let _ = release(store, &reservations, clock);
                states.push(BucketState {
                    bucket: b.clone(),
                    view: refill.view(current, b.limit, clock.now, clock.utc_offset_min),
                });
                return Err(Denial::Limited {
                    bucket: b.clone(),
                    wait_ms,
                    states,
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
        states,
    })
}

/// Every bucket's state now, without reserving anything (for the headers of
/// a request refused before admission).
pub fn states(store: &dyn SharedStore, buckets: &[Bucket], clock: Clock) -> Vec<BucketState> {
    buckets
        .iter()
        .map(|b| BucketState {
            bucket: b.clone(),
            view: b.metric.refill().view(
                current(store, b, clock),
                b.limit,
                clock.now,
                clock.utc_offset_min,
            ),
        })
        .collect()
}

/// A bucket's stored cell brought up to `clock.now` (refilled, or a fresh window).
fn current(store: &dyn SharedStore, b: &Bucket, clock: Clock) -> cell::Cell {
    b.metric.refill().current(
        store::read(store, b.store_key()),
        b.limit,
        clock.now,
        clock.utc_offset_min,
    )
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

fn adjust<'a>(
    store: &dyn SharedStore,
    deltas: impl Iterator<Item = (&'a Bucket, f64)>,
    clock: Clock,
) -> Result<(), Contention> {
    let mut result = Ok(());
    for (b, delta) in deltas {
        if delta == 0.0 {
            continue;
        }
        let refill = b.metric.refill();
        let r = store::update(store, b.store_key(), |cell| {
            let current = refill.current(cell, b.limit, clock.now, clock.utc_offset_min);
            Step::Write(refill.charge(current, delta), ())
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
