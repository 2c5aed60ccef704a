//! The sync leader: with a shared store, one worker per Envoy pushes what
//! this Envoy consumed from its leases, pulls new leases, sends the
//! settlements of synchronously admitted requests, and applies revocations,
//! every sync period (the filter's `on_tick`).
//!
//! - Leadership: `on_tick` fires on every worker, unsynchronised. Each tick
//!   a worker takes or renews a lease on the key [`LEADER_KEY`] (its id and
//!   an expiry of 3 periods) with CAS; only the holder syncs. A leader that
//!   dies is replaced 3 periods later.
//! - What to sync: the shared-data API cannot list keys, so workers hand
//!   the leader the buckets they touched through the [`Queue::Sync`] shared
//!   queue (at most once per scope per period, see `meter::shared`); the
//!   leader drains it each tick.
//! - Exactly once: a bucket's consumption is moved to `inflight` with a
//!   sequence number before it is sent, and only an answer to that sequence
//!   clears it. A failed or lost sync is resent with the same sequence and
//!   the same amount (the service applies a sequence once and answers a
//!   repeat with its first answer), by this leader or the next one, since
//!   both live in the bucket's slot in shared data. A bucket's new sequence
//!   waits for the answer to its previous one; the other buckets keep
//!   syncing meanwhile. A lost answer is only known at the call's timeout
//!   (1 s by default), and Redis reclaims a lease 3 periods after it
//!   expires: a bucket held back that long would have what it spent from
//!   its lease handed out again before its report arrives.

use crate::host::{Queue, QuotaMethod, RootHost, SharedStore, Stat};
use crate::meter::record::{self, Record, FLAG_REVOKED};
use crate::meter::store::{self, Step};
use crate::meter::{Metric, SharedOptions};
use crate::policy::Policy;
use hashbrown::HashMap;
use tollgate_proto::prost::Message;
use tollgate_proto::quota::v1 as pb;

pub mod key_service;
pub mod keys;

/// Shared-data key of the leadership lease: holder id, then expiry (ms).
pub const LEADER_KEY: &str = "tollgate/2/leader";
/// This Envoy's replica id, chosen by the first worker that needs it.
pub const REPLICA_KEY: &str = "tollgate/2/replica";
/// The next sync sequence number (u64), increasing across leaders.
const SEQ_KEY: &str = "tollgate/2/seq";
/// The newest revocation epoch applied, and the replica count last seen.
const EPOCH_KEY: &str = "tollgate/2/revocation-epoch";
pub const REPLICAS_KEY: &str = "tollgate/2/replicas";

/// Settlements sent per tick at most (the rest wait for the next tick).
const SETTLES_PER_TICK: usize = 512;
/// Buckets per Sync call at most.
const BUCKETS_PER_SYNC: usize = 1_000;

/// A bucket the leader syncs: its metric, how the service sees it, and
/// whether it takes leases (a strict bucket only pushes consumption).
#[derive(Debug, Clone)]
struct Tracked {
    metric: Metric,
    bucket: pb::Bucket,
    lease: bool,
}

/// A bucket in a sync under way.
#[derive(Debug, Clone)]
struct Sent {
    store_key: String,
    metric: Metric,
    bucket: pb::Bucket,
    lease: bool,
    seq: u64,
}

#[derive(Debug)]
enum Pending {
    Sync(Vec<Sent>),
    Settle(Vec<u8>),
    /// A repeat of an Admit whose client left (its request bytes).
    Cancel(Vec<u8>),
}

/// One worker's side of the leadership; only the elected one acts.
#[derive(Debug)]
pub struct Leader {
    id: String,
    opts: SharedOptions,
    pending: Vec<(u32, Pending)>,
    /// Scopes this leader syncs each period while they hold a lease or
    /// consumption (by record key: their buckets as the service sees them).
    active: HashMap<String, Vec<Tracked>>,
    /// When this worker last ran a period (the timer may fire more often,
    /// for held requests).
    last_tick: u64,
}

fn read_u64(store: &dyn SharedStore, key: &str) -> Option<(u64, u32)> {
    let (bytes, cas) = store.get(key)?;
    let word: [u8; 8] = bytes.get(..8)?.try_into().ok()?;
    Some((u64::from_le_bytes(word), cas))
}

/// Adds one to the u64 counter under `key` (created at 1) with a CAS
/// write, retried like every shared-data update; the new value, or `None`
/// when every attempt failed.
pub(crate) fn increment(store: &dyn SharedStore, key: &str) -> Option<u64> {
    for _ in 0..store::MAX_ATTEMPTS {
        let (last, cas) = read_u64(store, key).unwrap_or((0, store::CREATE_CAS));
        let next = last.saturating_add(1);
        if store.set(key, &next.to_le_bytes(), cas).is_ok() {
            return Some(next);
        }
    }
    None
}

/// The replica count the leader last learned (at least 1), for the
/// `on_store_failure: local` fallback (limit / replicas).
pub fn replicas(store: &dyn SharedStore) -> u32 {
    read_u64(store, REPLICAS_KEY).map_or(1, |(n, _)| n.clamp(1, u32::MAX as u64) as u32)
}

/// This Envoy's replica id: the first caller's proposal wins (created with
/// the impossible CAS so that two workers agree on one).
pub fn replica_id(store: &dyn SharedStore, proposal: &str) -> String {
    if let Some((bytes, _)) = store.get(REPLICA_KEY) {
        if !bytes.is_empty() {
            return String::from_utf8_lossy(&bytes).into_owned();
        }
    }
    let _ = store.set(REPLICA_KEY, proposal.as_bytes(), store::CREATE_CAS);
    store
        .get(REPLICA_KEY)
        .map(|(b, _)| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_else(|| proposal.to_string())
}

impl Leader {
    /// `id` names this worker's VM (unique per VM and start).
    pub fn new(id: String, opts: SharedOptions) -> Leader {
        Leader {
            id,
            opts,
            pending: Vec::new(),
            active: HashMap::new(),
            last_tick: 0,
        }
    }

    fn period(&self) -> u64 {
        self.opts.sync_period_ms.max(1)
    }

    /// Takes or renews the leadership; whether this worker leads now.
    fn elect(&self, host: &impl RootHost, now: u64) -> bool {
        let (current, cas) = match host.get(LEADER_KEY) {
            Some((bytes, cas)) => (Some(bytes), cas),
            None => (None, store::CREATE_CAS),
        };
        let held_by_other = current.as_ref().is_some_and(|b| {
            let (id, expiry) = b.split_at(b.len().saturating_sub(8));
            let expires = expiry
                .try_into()
                .map(u64::from_le_bytes)
                .unwrap_or_default();
            id != self.id.as_bytes() && expires > now
        });
        if held_by_other {
            return false;
        }
        let mut value = self.id.as_bytes().to_vec();
        value.extend_from_slice(&(now + 3 * self.period()).to_le_bytes());
        host.set(LEADER_KEY, &value, cas).is_ok()
    }

    /// One sync period: if this worker leads, send queued settlements and
    /// sync the buckets the workers touched.
    pub fn tick(&mut self, host: &mut impl RootHost) {
        let now = host.now_ms();
        if now < self.last_tick + self.period() {
            return;
        }
        self.last_tick = now;
        if !self.elect(host, now) {
            return;
        }
        self.send_settlements(host);
        self.send_cancellations(host);
        self.sync(host, now);
    }

    fn send_settlements(&mut self, host: &mut impl RootHost) {
        for _ in 0..SETTLES_PER_TICK {
            let Some(message) = host.dequeue(Queue::Settle) else {
                break;
            };
            let timeout = self.opts.admit_timeout_ms;
            match host.call_quota(QuotaMethod::Settle, &message, timeout) {
                Ok(token) => self.pending.push((token, Pending::Settle(message))),
                Err(_) => {
                    // Not even started: keep it for the next tick.
                    requeue_settle(host, &message);
                    break;
                }
            }
        }
    }

    fn send_cancellations(&mut self, host: &mut impl RootHost) {
        for _ in 0..SETTLES_PER_TICK {
            let Some(message) = host.dequeue(Queue::Cancel) else {
                break;
            };
            let timeout = self.opts.admit_timeout_ms;
            match host.call_quota(QuotaMethod::Admit, &message, timeout) {
                Ok(token) => self.pending.push((token, Pending::Cancel(message))),
                Err(_) => {
                    enqueue(host, Queue::Cancel, &message);
                    break;
                }
            }
        }
    }

    /// Drains the sync queue, moves each bucket's consumption in flight and
    /// sends one Sync.
    fn sync(&mut self, host: &mut impl RootHost, now: u64) {
        let mut named: HashMap<String, (pb::Bucket, bool)> = HashMap::new();
        while let Some(message) = host.dequeue(Queue::Sync) {
            if let Ok(entry) = pb::SyncRequest::decode(message.as_slice()) {
                for sync in entry.buckets {
                    if let Some(b) = sync.bucket {
                        named.insert(b.id.clone(), (b, sync.want != 0));
                    }
                }
            }
        }
        // Buckets by scope record, so each record is read and written once.
        // Scopes synced before stay active while they hold a lease: their
        // later consumption is pushed even if no request hands them over
        // again (a burst that ends inside one period).
        for (id, (bucket, lease)) in &named {
            let Some((scope, field)) = id.rsplit_once(':') else {
                continue;
            };
            let Some(metric) = Metric::from_field(field) else {
                continue;
            };
            let tracked = Tracked {
                metric,
                bucket: bucket.clone(),
                lease: *lease,
            };
            let buckets = self.active.entry(record::store_key(scope)).or_default();
            match buckets.iter_mut().find(|t| t.metric == metric) {
                Some(entry) => *entry = tracked,
                None => buckets.push(tracked),
            }
        }
        if self.active.is_empty() {
            return;
        }
        // Buckets whose sync has not answered yet wait for it (or for its
        // failure, which hands them back): their sequence is on its way.
        let waiting: Vec<(&str, Metric, u64)> = self
            .pending
            .iter()
            .filter_map(|(_, p)| match p {
                Pending::Sync(sent) => Some(sent),
                _ => None,
            })
            .flatten()
            .map(|s| (s.store_key.as_str(), s.metric, s.seq))
            .collect();
        let seq = next_seq(host);
        let replicas = f64::from(replicas(host));
        let period = self.period();
        let mut idle = Vec::new();
        let mut syncs = Vec::new();
        let mut sent = Vec::new();
        for (store_key, buckets) in &self.active {
            let result = store::update(host, store_key, |record| {
                let mut record = record.unwrap_or_default();
                let mut out = Vec::new();
                let mut live = false;
                for Tracked {
                    metric,
                    bucket,
                    lease,
                } in buckets
                {
                    let Some(slot) = record.slot_mut(*metric) else {
                        continue;
                    };
                    let asked = named.contains_key(&bucket.id);
                    // Only a lease with something left, or one this Envoy
                    // would still ask for, is worth renewing: a zero grant
                    // still carries an expiry, and renewing it kept every
                    // key ever used syncing, forever (20,000 keys used once
                    // each cost 7.7 Redis calls per later request in
                    // bench-scale).
                    let wanted =
                        *lease && lease_units(slot.rate, slot.last, bucket, replicas) > 0.0;
                    let holds = slot.expires > now && (slot.value > 0.0 || wanted);
                    let expiring = holds && slot.expires <= now + 2 * period;
                    if slot.seq == 0 {
                        if !asked && slot.consumed == 0.0 && !expiring {
                            live |= holds;
                            continue;
                        }
                        let units = whole_units(to_units(bucket, slot.consumed));
                        slot.inflight = from_units(bucket, units);
                        slot.consumed -= slot.inflight;
                        if whole_units(to_units(bucket, slot.consumed)) == 0.0
                            && to_units(bucket, slot.consumed).abs() < ROUNDING
                        {
                            // What is left is the float error of summing
                            // amounts, not consumption.
                            slot.consumed = 0.0;
                        }
                        // Demand per period: what leases served (before
                        // refunds) and what Redis admitted for this Envoy.
                        let demand = slot.inflight.max(0.0) + slot.asked;
                        slot.rate = 0.5 * slot.rate + 0.5 * demand;
                        if demand <= 0.0 {
                            // An idle period: the largest recent request is
                            // less recent, so an idle key's lease shrinks to
                            // nothing and its scope leaves the active set.
                            slot.last *= 0.5;
                        }
                        slot.asked = 0.0;
                        slot.seq = seq;
                    }
                    // In flight: the scope stays active until it is answered.
                    live = true;
                    if waiting.contains(&(store_key.as_str(), *metric, slot.seq)) {
                        continue;
                    }
                    let want = if *lease {
                        lease_units(slot.rate, slot.last, bucket, replicas)
                    } else {
                        0.0
                    };
                    out.push((
                        pb::BucketSync {
                            bucket: Some(bucket.clone()),
                            seq: slot.seq,
                            consumed: to_units(bucket, slot.inflight).round() as i64,
                            want: want as i64,
                            window: window_of(bucket, slot.stamp, now),
                        },
                        Sent {
                            store_key: store_key.clone(),
                            metric: *metric,
                            bucket: bucket.clone(),
                            lease: *lease,
                            seq: slot.seq,
                        },
                    ));
                }
                if out.is_empty() {
                    return Step::Keep((out, live));
                }
                Step::Write(record, (out, live))
            });
            // A record that stays contended is tried again next period.
            if let Ok((out, live)) = result {
                if !live {
                    idle.push(store_key.clone());
                }
                for (s, t) in out {
                    syncs.push(s);
                    sent.push(t);
                }
            }
        }
        for key in idle {
            self.active.remove(&key);
        }
        if syncs.is_empty() {
            return;
        }
        for (chunk, sent) in syncs
            .chunks(BUCKETS_PER_SYNC)
            .zip(sent.chunks(BUCKETS_PER_SYNC))
        {
            let request = pb::SyncRequest {
                replica: replica_id(host, &self.id),
                buckets: chunk.to_vec(),
                revocation_epoch: read_u64(host, EPOCH_KEY).map_or(0, |(e, _)| e),
            };
            let timeout = (3 * self.period()).max(self.opts.admit_timeout_ms);
            match host.call_quota(QuotaMethod::Sync, &request.encode_to_vec(), timeout) {
                Ok(token) => self.pending.push((token, Pending::Sync(sent.to_vec()))),
                Err(_) => {
                    host.stat(Stat::SyncFailed, 1);
                    requeue(host, sent);
                }
            }
        }
    }

    /// The answer to a call this leader started (`None`: it failed).
    pub fn on_response(
        &mut self,
        host: &mut impl RootHost,
        policy: &Policy,
        token: u32,
        response: Option<&[u8]>,
    ) {
        let Some(at) = self.pending.iter().position(|(t, _)| *t == token) else {
            return;
        };
        let (_, pending) = self.pending.swap_remove(at);
        match pending {
            Pending::Settle(message) => {
                if response.is_none() {
                    requeue_settle(host, &message);
                }
            }
            Pending::Cancel(message) => match response {
                None => enqueue(host, Queue::Cancel, &message),
                Some(answer) => give_back(host, &message, answer),
            },
            Pending::Sync(sent) => match response.and_then(|r| pb::SyncResponse::decode(r).ok()) {
                Some(answer) => {
                    host.stat(Stat::SyncOk, 1);
                    self.apply(host, policy, &sent, &answer);
                }
                None => {
                    host.stat(Stat::SyncFailed, 1);
                    requeue(host, &sent);
                }
            },
        }
    }

    fn apply(
        &self,
        host: &mut impl RootHost,
        policy: &Policy,
        sent: &[Sent],
        answer: &pb::SyncResponse,
    ) {
        let now = host.now_ms();
        let mut again: Vec<Sent> = Vec::new();
        for (s, grant) in sent.iter().zip(&answer.grants) {
            let lasts = grant.expires_at_ms.saturating_sub(answer.now_ms).max(0) as u64;
            let _ = store::update(host, &s.store_key, |record| {
                let mut record = record.unwrap_or_default();
                let mut busy = false;
                if let Some(slot) = record.slot_mut(s.metric) {
                    if slot.seq == s.seq {
                        // The grant replaces the lease; what was spent since
                        // the snapshot comes out of it (and is reported next).
                        slot.value = from_units(&s.bucket, grant.lease as f64) - slot.consumed;
                        slot.inflight = 0.0;
                        slot.seq = 0;
                        slot.expires = now + lasts;
                        slot.stamp = grant.window.max(0) as u64;
                        slot.shared = grant
                            .view
                            .as_ref()
                            .map_or(0.0, |v| from_units(&s.bucket, v.remaining));
                    }
                    busy = slot.consumed != 0.0;
                }
                Step::Write(record, busy)
            })
            .map(|busy| {
                if busy {
                    again.push(s.clone());
                }
            });
        }
        requeue(host, &again);
        if answer.replicas > 0 {
            let _ = host.set(REPLICAS_KEY, &u64::from(answer.replicas).to_le_bytes(), 0);
        }
        for hash in &answer.revoked_keys {
            let Ok(hash) = <[u8; 32]>::try_from(hash.as_slice()) else {
                continue;
            };
            // A key of the key table is read (and compiled) to learn its id.
            let key = policy.resolve(host, &hash).ok().flatten();
            if let Some(key) = key.and_then(|s| policy.key(s.key)) {
                let key_record = record::store_key(&format!("key:{}", key.id));
                let _ = store::update(host, &key_record, |r| {
                    let mut r: Record = r.unwrap_or_default();
                    r.flags |= FLAG_REVOKED;
                    Step::Write(r, ())
                });
            }
        }
        if answer.revocation_epoch > 0 {
            let _ = host.set(EPOCH_KEY, &answer.revocation_epoch.to_le_bytes(), 0);
        }
    }
}

/// If the repeated Admit says the request had been admitted, queue a Settle
/// that gives every charge back.
fn give_back(host: &impl RootHost, admit: &[u8], answer: &[u8]) {
    let (Ok(request), Ok(answer)) = (
        pb::AdmitRequest::decode(admit),
        pb::AdmitResponse::decode(answer),
    ) else {
        return;
    };
    if answer.outcome != pb::admit_response::Outcome::Admitted as i32 {
        return;
    }
    let settle = pb::SettleRequest {
        request_id: request.request_id,
        deltas: request
            .charges
            .into_iter()
            .filter(|c| c.amount != 0)
            .map(|c| pb::Charge {
                amount: -c.amount,
                ..c
            })
            .collect(),
    };
    enqueue(host, Queue::Settle, &settle.encode_to_vec());
}

/// The lease to ask for: what this Envoy spends in about 1.5 sync periods
/// plus the round trip (1.65 × the consumption per period), and at least
/// its largest recent request, but never more than a tenth of the limit
/// shared among the replicas. Leases idle on other replicas are what can
/// refuse a request early; at a tenth, all of them together hold at most
/// 10% of the limit, and a limit too small for a lease to cover one
/// request is decided by Redis, exactly, on every request.
///
/// In base units (micro-dollars for budgets), rounded up to a whole unit.
fn lease_units(rate: f64, last: f64, bucket: &pb::Bucket, replicas: f64) -> f64 {
    let cap = bucket.limit as f64 / (10.0 * replicas.max(1.0));
    let want = to_units(bucket, (1.65 * rate).max(last)).min(cap);
    // Less than one unit of demand is none: no lease to keep renewing.
    if want < 1.0 {
        0.0
    } else {
        want.ceil()
    }
}

/// Below this, a base-unit amount is float error (sums of micro-dollar
/// amounts), not consumption.
const ROUNDING: f64 = 1e-6;

/// Whole base units of an amount: a sum of whole micro-dollars computed in
/// floats (430.99999999999994) is the whole number it is meant to be; a
/// real fraction waits in `consumed` for the next sync.
fn whole_units(units: f64) -> f64 {
    let nearest = units.round();
    if (units - nearest).abs() < ROUNDING {
        nearest
    } else {
        units.trunc()
    }
}

fn next_seq(host: &impl RootHost) -> u64 {
    // Contended for every attempt: a time-based sequence still increases.
    increment(host, SEQ_KEY).unwrap_or_else(|| host.now_ms())
}

/// Hands buckets back to the sync queue (a failed sync, or consumption
/// that arrived while the sync was under way).
fn requeue(host: &impl RootHost, sent: &[Sent]) {
    if sent.is_empty() {
        return;
    }
    let entry = pb::SyncRequest {
        buckets: sent
            .iter()
            .map(|s| pb::BucketSync {
                bucket: Some(s.bucket.clone()),
                want: i64::from(s.lease),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    };
    enqueue(host, Queue::Sync, &entry.encode_to_vec());
}

fn requeue_settle(host: &impl RootHost, message: &[u8]) {
    enqueue(host, Queue::Settle, message);
}

fn enqueue(host: &impl RootHost, queue: Queue, message: &[u8]) {
    host.enqueue(queue, message);
}

/// Money budgets travel in micro-dollars; the bucket id ends in its metric.
fn is_usd(bucket: &pb::Bucket) -> bool {
    bucket
        .id
        .rsplit_once(':')
        .and_then(|(_, field)| Metric::from_field(field))
        .is_some_and(Metric::is_usd)
}

fn to_units(bucket: &pb::Bucket, amount: f64) -> f64 {
    if is_usd(bucket) {
        amount * 1_000_000.0
    } else {
        amount
    }
}

fn from_units(bucket: &pb::Bucket, units: f64) -> f64 {
    if is_usd(bucket) {
        units / 1_000_000.0
    } else {
        units
    }
}

/// The window a calendar slot's consumption belongs to: its lease's window
/// (consumption before a window rolls over was spent from that window's
/// lease), else the current one; 0 for per-minute buckets.
fn window_of(bucket: &pb::Bucket, lease_window: u64, now: u64) -> i64 {
    let current = match pb::Refill::try_from(bucket.refill) {
        Ok(pb::Refill::Day) => crate::time::day_window(now, bucket.utc_offset_min).start,
        Ok(pb::Refill::Month) => crate::time::month_window(now, bucket.utc_offset_min).start,
        _ => return 0,
    };
    if lease_window != 0 {
        lease_window as i64
    } else {
        current as i64
    }
}

#[cfg(test)]
mod tests;
