//! Buckets shared by every Envoy replica through the quota service (Redis),
//! as `docs/scale-out.md` describes. The truth lives in Redis; this Envoy
//! spends units already taken from Redis for it (a *lease*, one per bucket,
//! kept in the bucket's slot of its scope record), so a busy key makes no
//! network call per request. What a lease cannot cover goes through a
//! synchronous `Admit` (the request pauses for one round trip), which is
//! exact. The sync leader ([`crate::sync`]) renews leases every period.
//!
//! Each reservation remembers where it was taken from ([`Source`]), so that
//! settlement gives back or takes more from the same place: a lease, the
//! local fallback bucket, or Redis itself (a `Settle` the leader sends).

use super::cell::{Cell, Refill};
use super::record::{Record, Slot, FLAG_LEASED, FLAG_REVOKED};
use super::store::{self, Read, Step};
use super::{
    groups, reserve_amount, Admission, Bucket, BucketState, Clock, Demand, Denial, Reservation,
};
use crate::host::{Queue, SharedPlane, SharedStore};
use crate::policy::StoreFailure;
use tollgate_proto::prost::Message;
use tollgate_proto::quota::v1 as pb;

/// Deployment settings of a shared store (from the filter's VM configuration).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SharedOptions {
    /// How often the leader syncs leases (T). A lease lasts 3T.
    pub sync_period_ms: u64,
    /// How long a synchronous admission may wait for the quota service.
    pub admit_timeout_ms: u64,
}

impl Default for SharedOptions {
    fn default() -> Self {
        SharedOptions {
            sync_period_ms: 100,
            admit_timeout_ms: 1_000,
        }
    }
}

/// Where and when the shared meter works: the store and queues, the clock,
/// the deployment's settings.
#[derive(Clone, Copy)]
pub struct Ctx<'a> {
    pub plane: &'a dyn SharedPlane,
    pub clock: Clock,
    pub opts: SharedOptions,
}

/// Where a reservation was taken from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// This Envoy's own bucket (no shared store).
    Local,
    /// This Envoy's lease of a shared bucket.
    Lease,
    /// Redis, through a synchronous `Admit`.
    Remote,
    /// The local fallback bucket at limit / replicas (store unreachable).
    Fallback,
    /// Not counted (store unreachable, `on_store_failure: open`).
    Uncounted,
}

/// A request's amount in a bucket's base units: whole requests and tokens,
/// micro-dollars for USD.
pub fn base_units(bucket: &Bucket, amount: f64) -> i64 {
    let scaled = if bucket.metric.is_usd() {
        amount * 1_000_000.0
    } else {
        amount
    };
    scaled.round() as i64
}

fn from_base_units(bucket: &Bucket, units: f64) -> f64 {
    if bucket.metric.is_usd() {
        units / 1_000_000.0
    } else {
        units
    }
}

/// The bucket as the quota service needs it (limits travel with every call).
pub fn wire_bucket(bucket: &Bucket, clock: Clock) -> pb::Bucket {
    pb::Bucket {
        id: bucket.label(),
        refill: match bucket.refill() {
            Refill::PerMinute => pb::Refill::PerMinute,
            Refill::Day => pb::Refill::Day,
            Refill::Month => pb::Refill::Month,
        }
        .into(),
        limit: base_units(bucket, bucket.limit),
        utc_offset_min: clock.utc_offset_min,
    }
}

/// The calendar window a bucket's lease must belong to (0 for per-minute).
fn window(bucket: &Bucket, clock: Clock) -> u64 {
    match bucket.refill() {
        Refill::PerMinute => 0,
        Refill::Day => crate::time::day_window(clock.now, clock.utc_offset_min).start,
        Refill::Month => crate::time::month_window(clock.now, clock.utc_offset_min).start,
    }
}

/// Whether this replica's lease covers `amount` now. Unlike a calendar
/// quota alone (which admits while anything is left), a lease must cover
/// the whole amount: "anything left" is Redis's to decide, exactly, through
/// `Admit`; a lease admitting past itself would over-admit once per replica.
fn lease_covers(bucket: &Bucket, slot: &Slot, amount: f64, clock: Clock) -> bool {
    !bucket.strict
        && slot.expires > clock.now
        && slot.stamp == window(bucket, clock)
        && slot.value >= amount
}

/// A slot's state for the rate-limit headers: what Redis had unleased at
/// the last sync plus what is left of this replica's lease.
fn lease_view(bucket: &Bucket, slot: &Slot, clock: Clock) -> super::cell::View {
    let remaining = slot.shared + slot.value.max(0.0);
    let refill = bucket.refill();
    let cell = match refill {
        Refill::PerMinute => Cell {
            value: remaining,
            stamp: clock.now,
        },
        _ => Cell {
            value: bucket.limit - remaining,
            stamp: window(bucket, clock),
        },
    };
    refill.view(cell, bucket.limit, clock.now, clock.utc_offset_min)
}

/// Records the consumption of `amount` (a reservation or a settlement
/// delta) in a slot, to be pushed at the next sync.
fn consume(slot: &mut Slot, amount: f64) {
    slot.consumed += amount;
    if amount > slot.last {
        slot.last = amount;
    }
}

/// Marks a scope for the sync leader at most once per sync period; returns
/// whether the caller must enqueue it (after its write succeeds).
fn mark_for_sync(record: &mut Record, clock: Clock, opts: SharedOptions) -> bool {
    record.flags |= FLAG_LEASED;
    if clock.now >= record.queued_at.saturating_add(opts.sync_period_ms) {
        record.queued_at = clock.now;
        return true;
    }
    false
}

/// The message that hands a scope's buckets to the leader: a `SyncRequest`
/// naming them (the leader reads their slots when it syncs).
/// `want` marks whether the bucket takes leases (1) or, being strict, only
/// has consumption to push (0: what the fallback metered while the store
/// was down).
fn sync_entry(buckets: &[&Bucket], clock: Clock) -> Vec<u8> {
    pb::SyncRequest {
        buckets: buckets
            .iter()
            .map(|b| pb::BucketSync {
                bucket: Some(wire_bucket(b, clock)),
                want: i64::from(!b.strict),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    }
    .encode_to_vec()
}

/// What the shared meter decided before any network call.
#[derive(Debug)]
pub enum Plan {
    /// Every bucket's amount came from this replica's leases.
    Admitted(Admission),
    /// The request needs Redis: send this `AdmitRequest`.
    Remote(Vec<u8>),
}

/// Admission with shared buckets: from the leases when they cover every
/// bucket (one read and one write per scope record, as alone), else a
/// synchronous `Admit` for the whole request.
pub fn admit(
    ctx: Ctx,
    buckets: &[Bucket],
    demand: &Demand,
    request_id: &str,
    key_sha256: &[u8],
) -> Result<Plan, Denial> {
    let (store, clock, opts) = (ctx.plane, ctx.clock, ctx.opts);
    let groups = groups(buckets);
    let reads: Vec<Read> = groups
        .iter()
        .map(|g| store::read_with_cas(store, g.key))
        .collect();
    // Reserved headroom: Redis knows no priorities, so a request below a
    // reserve's priority is checked here against the bucket as this Envoy
    // last saw it (Redis's unleased balance at the last sync plus its own
    // lease). A bucket never synced here is left to Redis.
    for (g, read) in groups.iter().zip(&reads) {
        let record = read.record.unwrap_or_default();
        for &i in &g.members {
            let Some(b) = buckets.get(i) else { continue };
            let slot = record.slot(b.metric);
            let amount = reserve_amount(b, demand);
            if amount <= 0.0 || b.held_back().is_none() || slot.expires == 0 {
                continue;
            }
            let seen = lease_view(b, &slot, clock);
            let current = Cell {
                value: match b.refill() {
                    Refill::PerMinute => seen.remaining,
                    _ => b.limit - seen.remaining,
                },
                stamp: clock.now,
            };
            if !b.fits(current, amount) {
                return Err(Denial::Limited {
                    bucket: b.clone(),
                    wait_ms: b.wait_ms(current, amount, clock),
                    states: vec![BucketState {
                        bucket: b.clone(),
                        view: seen,
                    }],
                });
            }
        }
    }
    let covered = groups.iter().zip(&reads).all(|(g, read)| {
        let record = read.record.unwrap_or_default();
        g.members.iter().all(|&i| {
            buckets.get(i).is_none_or(|b| {
                let amount = reserve_amount(b, demand);
                amount <= 0.0 || lease_covers(b, &record.slot(b.metric), amount, clock)
            })
        })
    });
    if !covered {
        return Ok(Plan::Remote(admit_request(
            buckets, demand, clock, request_id, key_sha256,
        )));
    }
    let mut admission = Admission {
        reservations: Vec::with_capacity(buckets.len()),
        states: Vec::with_capacity(buckets.len()),
    };
    for (g, read) in groups.iter().zip(reads) {
        let result = store::update_from(store, g.key, Some(read), |record| {
            let mut record = record.unwrap_or_default();
            let mut taken = Vec::with_capacity(g.members.len());
            for &i in &g.members {
                let Some(b) = buckets.get(i) else { continue };
                let amount = reserve_amount(b, demand);
                let Some(slot) = record.slot_mut(b.metric) else {
                    continue;
                };
                if amount > 0.0 {
                    if !lease_covers(b, slot, amount, clock) {
                        // Another worker spent the lease since the check.
                        return Step::Keep(None);
                    }
                    slot.value -= amount;
                    consume(slot, amount);
                }
                taken.push((i, amount, lease_view(b, slot, clock)));
            }
            let enqueue = mark_for_sync(&mut record, clock, opts);
            Step::Write(record, Some((taken, enqueue)))
        });
        match result {
            Ok(Some((taken, enqueue))) => {
                if enqueue {
                    let members: Vec<&Bucket> =
                        g.members.iter().filter_map(|&i| buckets.get(i)).collect();
                    store.enqueue(Queue::Sync, &sync_entry(&members, clock));
                }
                for (i, amount, view) in taken {
                    if let Some(b) = buckets.get(i) {
                        admission.take(b, amount, Source::Lease, view);
                    }
                }
            }
            Ok(None) | Err(_) => {
                // A lease ran out under us (or the record stayed contended):
                // give back what this request took and ask Redis for all of it.
                let _ = settle(ctx, &admission.reservations, &Demand::default(), "");
                return Ok(Plan::Remote(admit_request(
                    buckets, demand, clock, request_id, key_sha256,
                )));
            }
        }
    }
    Ok(Plan::Admitted(admission))
}

fn admit_request(
    buckets: &[Bucket],
    demand: &Demand,
    clock: Clock,
    request_id: &str,
    key_sha256: &[u8],
) -> Vec<u8> {
    pb::AdmitRequest {
        request_id: request_id.to_string(),
        charges: buckets
            .iter()
            .map(|b| pb::Charge {
                bucket: Some(wire_bucket(b, clock)),
                amount: base_units(b, reserve_amount(b, demand)),
            })
            .collect(),
        key_sha256: key_sha256.to_vec(),
    }
    .encode_to_vec()
}

/// Why a synchronous admission did not admit.
#[derive(Debug, Clone, PartialEq)]
pub enum RemoteRefusal {
    /// Redis refused: the request does not fit `bucket`.
    Limited(Denial),
    /// The key was revoked through the shared store.
    Revoked,
    /// The store could not be reached and this bucket refuses then.
    Unavailable(Bucket),
}

/// The quota service's answer to an `Admit` (`None`: the call failed or
/// timed out). On failure each bucket's `on_store_failure` decides: any
/// `closed` bucket refuses; `local` buckets are metered on the fallback
/// bucket at limit / `replicas`; `open` buckets are not counted.
pub fn on_admit_response(
    ctx: Ctx,
    buckets: &[Bucket],
    demand: &Demand,
    replicas: u32,
    response: Option<&[u8]>,
) -> Result<Admission, RemoteRefusal> {
    let Some(answer) = response.and_then(|r| pb::AdmitResponse::decode(r).ok()) else {
        return fallback(ctx, buckets, demand, replicas);
    };
    let states: Vec<BucketState> = buckets
        .iter()
        .zip(&answer.views)
        .map(|(b, v)| BucketState {
            bucket: b.clone(),
            view: super::cell::View {
                remaining: from_base_units(b, v.remaining),
                reset_at: v.reset_at_ms.max(0) as u64,
            },
        })
        .collect();
    match pb::admit_response::Outcome::try_from(answer.outcome) {
        Ok(pb::admit_response::Outcome::Admitted) => {
            want_leases(ctx, buckets, demand);
            Ok(Admission {
                reservations: buckets
                    .iter()
                    .map(|b| Reservation {
                        bucket: b.clone(),
                        amount: reserve_amount(b, demand),
                        source: Source::Remote,
                    })
                    .collect(),
                states,
            })
        }
        Ok(pb::admit_response::Outcome::Revoked) => Err(RemoteRefusal::Revoked),
        Ok(pb::admit_response::Outcome::Limited) => {
            let bucket = buckets
                .get(answer.refused as usize)
                .or(buckets.first())
                .cloned();
            match bucket {
                Some(bucket) => Err(RemoteRefusal::Limited(Denial::Limited {
                    bucket,
                    wait_ms: answer.wait_ms.max(0) as u64,
                    states,
                })),
                None => Err(RemoteRefusal::Limited(Denial::Contention)),
            }
        }
        // An answer this build cannot read is no answer.
        _ => fallback(ctx, buckets, demand, replicas),
    }
}

/// After a synchronous admission: note the request's size in each slot (a
/// lease should cover at least one such request) and hand the scopes to the
/// leader, so the next requests of a busy key are served from leases. A
/// record that stays contended only delays that.
fn want_leases(ctx: Ctx, buckets: &[Bucket], demand: &Demand) {
    for g in groups(buckets) {
        // Strict buckets never hold leases: every request asks Redis.
        let leased: Vec<&Bucket> = g
            .members
            .iter()
            .filter_map(|&i| buckets.get(i))
            .filter(|b| !b.strict)
            .collect();
        if leased.is_empty() {
            continue;
        }
        let noted = store::update(ctx.plane, g.key, |record| {
            let mut record = record.unwrap_or_default();
            for b in &leased {
                let amount = reserve_amount(b, demand);
                if let Some(slot) = record.slot_mut(b.metric) {
                    slot.last = slot.last.max(amount);
                    slot.asked += amount;
                }
            }
            let enqueue = mark_for_sync(&mut record, ctx.clock, ctx.opts);
            Step::Write(record, enqueue)
        });
        if let Ok(true) = noted {
            ctx.plane
                .enqueue(Queue::Sync, &sync_entry(&leased, ctx.clock));
        }
    }
}

/// Admission while the store cannot be reached.
fn fallback(
    ctx: Ctx,
    buckets: &[Bucket],
    demand: &Demand,
    replicas: u32,
) -> Result<Admission, RemoteRefusal> {
    let (store, clock, opts) = (ctx.plane, ctx.clock, ctx.opts);
    let needs_store = |b: &&Bucket| reserve_amount(b, demand) > 0.0;
    if let Some(closed) = buckets
        .iter()
        .filter(needs_store)
        .find(|b| b.on_store_failure == StoreFailure::Closed)
    {
        return Err(RemoteRefusal::Unavailable(closed.clone()));
    }
    let share = f64::from(replicas.max(1));
    let mut admission = Admission {
        reservations: Vec::with_capacity(buckets.len()),
        states: Vec::with_capacity(buckets.len()),
    };
    for g in groups(buckets) {
        let result = store::update(store, g.key, |record| {
            let mut record = record.unwrap_or_default();
            let mut taken = Vec::new();
            for &i in &g.members {
                let Some(b) = buckets.get(i) else { continue };
                let amount = reserve_amount(b, demand);
                let Some(slot) = record.slot_mut(b.metric) else {
                    continue;
                };
                let source = if b.on_store_failure == StoreFailure::Open {
                    Source::Uncounted
                } else if lease_covers(b, slot, amount, clock) {
                    slot.value -= amount;
                    consume(slot, amount);
                    Source::Lease
                } else {
                    let local = Bucket {
                        limit: b.limit / share,
                        ..b.clone()
                    };
                    let current = fallback_cell(&local, slot, clock);
                    if amount > 0.0 && !local.refill().fits(current, local.limit, amount) {
                        let wait = local.wait_ms(current, amount, clock);
                        return Step::Keep(Err((i, wait, local.view(current, clock))));
                    }
                    let next = local.refill().charge(current, amount);
                    slot.fallback = next.value;
                    slot.fallback_stamp = next.stamp.max(1);
                    consume(slot, amount);
                    Source::Fallback
                };
                let view = lease_view(b, slot, clock);
                taken.push((i, amount, source, view));
            }
            mark_for_sync(&mut record, clock, opts);
            Step::Write(record, Ok(taken))
        });
        match result {
            Ok(Ok(taken)) => {
                for (i, amount, source, view) in taken {
                    if let Some(b) = buckets.get(i) {
                        admission.take(b, amount, source, view);
                    }
                }
            }
            Ok(Err((i, wait_ms, view))) => {
                let _ = settle(ctx, &admission.reservations, &Demand::default(), "");
                let Some(bucket) = buckets.get(i).cloned() else {
                    return Err(RemoteRefusal::Limited(Denial::Contention));
                };
                admission.states.push(BucketState {
                    bucket: bucket.clone(),
                    view,
                });
                return Err(RemoteRefusal::Limited(Denial::Limited {
                    bucket,
                    wait_ms,
                    states: admission.states,
                }));
            }
            Err(_) => {
                let _ = settle(ctx, &admission.reservations, &Demand::default(), "");
                return Err(RemoteRefusal::Limited(Denial::Contention));
            }
        }
    }
    Ok(admission)
}

/// The fallback bucket of a slot, brought up to now (a missing one is full).
fn fallback_cell(local: &Bucket, slot: &Slot, clock: Clock) -> Cell {
    let stored = (slot.fallback_stamp != 0).then_some(Cell {
        value: slot.fallback,
        stamp: slot.fallback_stamp,
    });
    local
        .refill()
        .current(stored, local.limit, clock.now, clock.utc_offset_min)
}

/// Settles a request admitted with shared buckets: each reservation gets
/// `actual - reserved` where it was taken. Lease and fallback deltas are
/// consumption the next sync pushes; remote ones become one `Settle`
/// (idempotent by request id), queued for the leader and returned so the
/// caller can also send it at once (a refund that waits for the leader's
/// next tick would refuse requests early meanwhile). An empty `request_id`
/// settles only local parts (a give-back during admission).
pub fn settle(
    ctx: Ctx,
    reservations: &[Reservation],
    actual: &Demand,
    request_id: &str,
) -> Result<Option<Vec<u8>>, store::Contention> {
    let (store, clock, opts) = (ctx.plane, ctx.clock, ctx.opts);
    let delta = |r: &Reservation| actual.amount(r.bucket.metric).max(0.0) - r.amount;
    let remote: Vec<pb::Charge> = reservations
        .iter()
        .filter(|r| r.source == Source::Remote && delta(r) != 0.0)
        .map(|r| pb::Charge {
            bucket: Some(wire_bucket(&r.bucket, clock)),
            amount: base_units(&r.bucket, delta(r)),
        })
        .collect();
    let mut sent = None;
    if !remote.is_empty() && !request_id.is_empty() {
        let message = pb::SettleRequest {
            request_id: request_id.to_string(),
            deltas: remote,
        }
        .encode_to_vec();
        store.enqueue(Queue::Settle, &message);
        sent = Some(message);
    }
    let mut result = Ok(sent);
    let mut done: Vec<&str> = Vec::new();
    for r in reservations {
        let key = r.bucket.store_key();
        if done.contains(&key) {
            continue;
        }
        done.push(key);
        let mine: Vec<&Reservation> = reservations
            .iter()
            .filter(|o| o.bucket.store_key() == key)
            .filter(|o| matches!(o.source, Source::Lease | Source::Fallback))
            .filter(|o| delta(o) != 0.0)
            .collect();
        if mine.is_empty() {
            continue;
        }
        let written = store::update(store, key, |record| {
            let mut record = record.unwrap_or_default();
            for o in &mine {
                let d = delta(o);
                let Some(slot) = record.slot_mut(o.bucket.metric) else {
                    continue;
                };
                match o.source {
                    Source::Lease => slot.value -= d,
                    _ => {
                        let share = slot_share(&o.bucket, slot, clock);
                        let next = o.bucket.refill().charge(share, d);
                        slot.fallback = next.value;
                        slot.fallback_stamp = next.stamp.max(1);
                    }
                }
                consume(slot, d);
            }
            let enqueue = mark_for_sync(&mut record, clock, opts);
            Step::Write(record, enqueue)
        });
        match written {
            Ok(true) => {
                let members: Vec<&Bucket> = mine.iter().map(|o| &o.bucket).collect();
                store.enqueue(Queue::Sync, &sync_entry(&members, clock));
            }
            Ok(false) => {}
            Err(e) => result = Err(e),
        }
    }
    result
}

/// A slot's fallback bucket as stored (the limit does not matter to a
/// charge, only to a refill, which settlement does not need).
fn slot_share(bucket: &Bucket, slot: &Slot, clock: Clock) -> Cell {
    match bucket.refill() {
        Refill::PerMinute => Cell {
            value: slot.fallback,
            stamp: slot.fallback_stamp.max(1),
        },
        _ => Cell {
            value: slot.fallback,
            stamp: if slot.fallback_stamp == 0 {
                window(bucket, clock)
            } else {
                slot.fallback_stamp
            },
        },
    }
}

/// Whether a key was revoked through the shared store (its record's flag,
/// set by the sync leader). One read; no record means not revoked.
pub fn revoked(store: &dyn SharedStore, key_store_key: &str) -> bool {
    store::read(store, key_store_key).is_some_and(|r| r.flags & FLAG_REVOKED != 0)
}
