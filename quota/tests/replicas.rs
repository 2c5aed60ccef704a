//! N Envoy replicas on one Redis against exact buckets, simulated
//! deterministically. Each Envoy runs the filter's own logic
//! (`tollgate_core`: a `RequestFlow` per request, one sync `Leader`, its
//! own shared data); all of them use the real scripts (a `QuotaService` on
//! a `redis-server`, called in process). One clock drives everything: the
//! filters, the leaders' ticks and the scripts' `ManualClock`. Each request
//! is also replayed through `core::meter` buckets: one Envoy alone (the
//! same arrivals), and the replicas' own history (what they admitted, when
//! they admitted it). docs/scale-out.md ("What the tests prove") lists the
//! guarantees checked.
//!
//! The seeds are fixed. `TOLLGATE_REPLICAS_SEED=<n>` (for every workload)
//! or `=random` (a new one for each) changes them. A failure prints the
//! command that replays it, and `--nocapture` prints each run's figures.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::rc::Rc;

use common::{Setup, T0};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use tollgate_core::flow::{FilterOptions, RequestFlow};
use tollgate_core::host::{Decision, Queue, QuotaMethod};
use tollgate_core::meter::{
    self, record, store, Bucket, Clock, Demand, Measure, Metric, Reservation, SharedOptions, Source,
};
use tollgate_core::policy::Policy;
use tollgate_core::route::Route;
use tollgate_core::sync::Leader;
use tollgate_core::testing::{FakeHost, FakeRoot, MemStore};
use tollgate_quota::testing::inspect;
use tollgate_quota::tollgate_proto::prost::Message;
use tollgate_quota::tollgate_proto::quota::v1 as pb;

const KEY: &str = "tg-replicas-key";
/// The sync period T.
const PERIOD: u64 = 100;
/// Loopback round trip to the quota service.
const RTT: u64 = 1;
/// How long a call whose answer is lost takes to fail: the filter's
/// `admit_timeout_ms`, which is also what a Sync waits (it waits
/// `max(3T, admit_timeout_ms)`).
const TIMEOUT: u64 = 1_000;
/// Input tokens every simulated response reports.
const INPUT_USED: u64 = 5;
/// Slack for the floating-point refill of the buckets (17 digits).
const EPS: f64 = 1e-6;
const WINDOW: u64 = 60_000;

fn opts() -> SharedOptions {
    SharedOptions {
        sync_period_ms: PERIOD,
        ..SharedOptions::default()
    }
}

/// The limits of the one key all traffic uses.
#[derive(Debug, Clone, Copy, Default)]
struct Limits {
    rpm: Option<u64>,
    otpm: Option<u64>,
    tpd: Option<u64>,
}

/// One simulated run.
#[derive(Debug, Clone)]
struct Workload {
    name: &'static str,
    seed: u64,
    replicas: usize,
    /// Arrivals happen during this much simulated time.
    minutes: u64,
    limits: Limits,
    /// Share of the arrivals each replica receives.
    weights: Vec<f64>,
    /// Arrivals per second, times 0.2, 0.6, 1, 1.5 or 3 in each 10-s
    /// phase (every five phases in a new order: 1.26 times on average).
    rate: f64,
    /// `max_tokens` of a request, uniform in this range.
    max_tokens: (u64, u64),
    /// Probabilities that a request uses less than, exactly, its
    /// reservation; the rest use up to 50% more (settlement debt).
    below: f64,
    equal: f64,
    /// Fractions of Sync and Settle calls whose answer is lost (the service
    /// applied the call) and that are delivered twice.
    drop: f64,
    dup: f64,
}

impl Workload {
    fn policy(&self) -> Rc<Policy> {
        let mut limits = Vec::new();
        if let Some(n) = self.limits.rpm {
            limits.push(format!(r#""requests_per_minute":{n}"#));
        }
        if let Some(n) = self.limits.otpm {
            limits.push(format!(r#""output_tokens_per_minute":{n}"#));
        }
        if let Some(n) = self.limits.tpd {
            limits.push(format!(r#""tokens_per_day":{n}"#));
        }
        let json = format!(
            r#"{{"version":1,"defaults":{{"models":["claude-*"],"limits":{{{}}}}},
                "keys":[{{"id":"k","key_sha256":"{}"}}]}}"#,
            limits.join(","),
            tollgate_core::vkey::sha256_hex(KEY)
        );
        Rc::new(
            tollgate_core::policy::compile(json.as_bytes(), "p.json", 0)
                .unwrap()
                .0,
        )
    }
}

/// The seed of a run: the workload's own, or `TOLLGATE_REPLICAS_SEED` (a
/// number for every workload, or `random` for a new one each).
fn seed_of(w: &Workload) -> (u64, String) {
    match std::env::var("TOLLGATE_REPLICAS_SEED").ok().as_deref() {
        None | Some("") => (w.seed, String::new()),
        Some("random") => {
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64;
            let s = t ^ w.seed.wrapping_mul(0x9e37_79b9_7f4a_7c15);
            (s, format!("TOLLGATE_REPLICAS_SEED={s} "))
        }
        Some(v) => {
            let s = v
                .parse()
                .expect("TOLLGATE_REPLICAS_SEED: a number or 'random'");
            (s, format!("TOLLGATE_REPLICAS_SEED={s} "))
        }
    }
}

/// What the replicas did with a request.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Fate {
    /// Paused for an Admit whose answer has not arrived.
    Waiting,
    /// Served from its Envoy's leases.
    Lease,
    /// Admitted by Redis.
    Remote,
    Refused,
}

struct Req {
    replica: usize,
    arrival: u64,
    end: u64,
    max_tokens: u64,
    output: u64,
    /// Per bucket: the amount reserved and the amount used.
    need: Vec<f64>,
    used: Vec<f64>,
    flow: Option<(RequestFlow, FakeHost)>,
    calls_done: usize,
    fate: Fate,
    oracle: Option<meter::Admission>,
    /// Per bucket: what the replicas admitted beyond what an exact bucket
    /// let through of their history (all 0 when conformant), the
    /// over-credit outstanding then, and for a request served from a lease
    /// beyond the exact bucket, how far Redis's balance was in debt (or a
    /// quota past its limit).
    excess: Vec<f64>,
    over_credit: Vec<f64>,
    debt: Vec<f64>,
    /// A refusal by Redis that the exact bucket of the replicas' history
    /// would have admitted.
    early: Option<Early>,
}

/// An early refusal: what the exact bucket of the replicas' history had
/// beyond the request in the bucket Redis refused it in, and what kept it
/// out of Redis's unleased balance then.
#[derive(Debug, Clone, Copy)]
struct Early {
    bucket: usize,
    spare: f64,
    /// Redis's outstanding leases.
    leased: f64,
    /// Consumption and refunds the replicas had not reported yet.
    unreported: f64,
    /// The longest any replica had gone without a report.
    pending_ms: u64,
}

/// This test's model of one replica's lease of one bucket, in Redis's
/// terms. The replica owes Redis what its lease served and Redis has not
/// applied yet (`unreported`); Redis holds `granted` for it. When the first
/// exceeds the second, Redis's balance counts units that were already
/// spent: over-credit, which lets the fleet admit beyond one exact bucket
/// until the replica's next report turns it into debt.
#[derive(Debug, Clone, Copy, Default)]
struct Lease {
    unreported: f64,
    granted: f64,
    reclaim_at: u64,
    /// The lease granted at the last report (`granted` until reclaimed).
    grant: f64,
    /// Since the replica's last report: when Redis applied it, what was left
    /// of the lease then, the settlements of requests the lease served, and
    /// the over-credit created.
    since: u64,
    remainder: f64,
    debt: f64,
    refunds: f64,
    created: f64,
    /// Refunds this replica still owed Redis while one exact bucket was
    /// full: that bucket could not take them back, Redis takes them when
    /// they are reported (the most owed at such a time).
    discarded: f64,
}

impl Lease {
    fn over_credit(&self) -> f64 {
        (self.unreported - self.granted).max(0.0)
    }
}

/// Over-credit that appeared, and when it was gone (`u64::MAX` until
/// then): repaid by the report that carried it, or for a refund the exact
/// bucket discarded (`discarded`), once that bucket is full again (Redis,
/// at most as full, then holds nothing it does not have).
#[derive(Debug, Clone, Copy)]
struct Creation {
    bucket: usize,
    replica: usize,
    at: u64,
    amount: f64,
    closed: u64,
    discarded: bool,
}

/// A report Redis applied for one replica and bucket (the first call with
/// a new seq), with what the lease allowed the replica since its previous
/// report.
#[derive(Debug, Clone)]
struct Report {
    bucket: usize,
    replica: usize,
    /// Over-credit created since the replica's previous report.
    created: f64,
    /// What was left of the lease at the previous report beyond the lease
    /// granted then (all of it if Redis reclaimed that grant before this
    /// report): the replica spends its old lease until the answer arrives,
    /// and that comes out of the new grant.
    in_flight: f64,
    /// Settlement debt and refunds of requests the lease served.
    debt: f64,
    refunds: f64,
}

enum Ev {
    Arrive(usize),
    AdmitAnswer(usize, Vec<u8>),
    End(usize),
    OracleEnd(usize),
    Tick(usize),
    RootAnswer(usize, u32, Option<Vec<u8>>),
}

struct Envoy {
    store: Rc<MemStore>,
    root: FakeRoot,
    leader: Leader,
    calls_done: usize,
    ticking: bool,
}

#[derive(Debug, Default)]
struct Counts {
    syncs: u64,
    settles: u64,
    admits: u64,
    dropped: u64,
    duplicated: u64,
}

struct Sim {
    w: Workload,
    seed: u64,
    rerun: String,
    rng: StdRng,
    s: Setup,
    conn: redis::aio::MultiplexedConnection,
    policy: Rc<Policy>,
    buckets: Vec<Bucket>,
    input_estimate: u64,
    envoys: Vec<Envoy>,
    reqs: Vec<Req>,
    heap: BinaryHeap<Reverse<(u64, u64)>>,
    events: Vec<Option<Ev>>,
    now: u64,
    /// One exact bucket replaying the arrivals, as one Envoy alone meters.
    oracle: Rc<MemStore>,
    /// One exact bucket charged with what the replicas admitted, when they
    /// admitted it: their own history.
    shadow: Rc<MemStore>,
    /// The same without what was over-admitted: what an exact bucket let
    /// through of their history.
    conform: Rc<MemStore>,
    faults_until: u64,
    counts: Counts,
    /// Per replica, per bucket.
    leases: Vec<Vec<Lease>>,
    creations: Vec<Creation>,
    reports: Vec<Report>,
    /// Per bucket: what Redis applied (admissions, settlements, reported
    /// consumption), each once.
    ledger: Vec<f64>,
}

fn body(max_tokens: u64) -> String {
    format!(
        r#"{{"model":"claude-haiku-4-5","max_tokens":{max_tokens},"messages":[{{"role":"user","content":"hi"}}]}}"#
    )
}

fn per_minute(b: &Bucket) -> bool {
    !b.metric.is_quota()
}

/// A bucket's amount in a demand.
fn amount(d: &Demand, m: Metric) -> f64 {
    match m.measure() {
        Measure::Requests => d.requests,
        Measure::InputTokens => d.input_tokens,
        Measure::OutputTokens => d.output_tokens,
        Measure::AllTokens => d.all_tokens,
        Measure::Usd => d.usd,
    }
}

impl Sim {
    async fn new(w: Workload) -> Sim {
        let (seed, rerun) = seed_of(&w);
        println!(
            "{}: seed {seed}; rerun: {rerun}cargo test -p tollgate-quota --test replicas {}",
            w.name, w.name
        );
        let policy = w.policy();
        let buckets = meter::buckets_for(&policy, &policy.key(0).unwrap(), None);
        let input_estimate =
            tollgate_core::usage::inspect_request(Route::AnthropicMessages, body(100).as_bytes())
                .unwrap()
                .input_estimate;
        let envoys = (0..w.replicas)
            .map(|i| {
                let store = MemStore::new();
                Envoy {
                    root: FakeRoot::new(store.clone(), T0 as u64),
                    store,
                    leader: Leader::new(format!("envoy-{i}"), opts()),
                    calls_done: 0,
                    ticking: true,
                }
            })
            .collect();
        let s = Setup::manual();
        let conn = s.client().get_multiplexed_async_connection().await.unwrap();
        let lease = Lease {
            since: T0 as u64,
            ..Lease::default()
        };
        Sim {
            rng: StdRng::seed_from_u64(seed),
            seed,
            rerun,
            s,
            conn,
            ledger: vec![0.0; buckets.len()],
            leases: vec![vec![lease; buckets.len()]; w.replicas],
            policy,
            buckets,
            input_estimate,
            envoys,
            reqs: Vec::new(),
            heap: BinaryHeap::new(),
            events: Vec::new(),
            now: T0 as u64,
            oracle: MemStore::new(),
            shadow: MemStore::new(),
            conform: MemStore::new(),
            faults_until: u64::MAX,
            counts: Counts::default(),
            creations: Vec::new(),
            reports: Vec::new(),
            w,
        }
    }

    fn tag(&self) -> String {
        format!(
            "{} (seed {}; rerun: {}cargo test -p tollgate-quota --test replicas {}), t = {} ms",
            self.w.name,
            self.seed,
            self.rerun,
            self.w.name,
            self.now - T0 as u64
        )
    }

    fn at(&mut self, time: u64, ev: Ev) {
        self.heap.push(Reverse((time, self.events.len() as u64)));
        self.events.push(Some(ev));
    }

    fn clock(&self) -> Clock {
        Clock {
            now: self.now,
            utc_offset_min: 0,
        }
    }

    /// A demand made of per-bucket amounts.
    fn demand(&self, amounts: &[f64]) -> Demand {
        let mut d = Demand::default();
        for (b, a) in self.buckets.iter().zip(amounts) {
            match b.metric.measure() {
                Measure::Requests => d.requests = *a,
                Measure::InputTokens => d.input_tokens = *a,
                Measure::OutputTokens => d.output_tokens = *a,
                Measure::AllTokens => d.all_tokens = *a,
                Measure::Usd => d.usd = *a,
            }
        }
        d
    }

    fn bucket_index(&self, id: &str) -> usize {
        self.buckets.iter().position(|b| b.label() == id).unwrap()
    }

    /// The arrivals: Poisson within 10-s phases of varying intensity,
    /// spread over the replicas by weight.
    fn generate(&mut self) {
        let end = T0 as u64 + self.w.minutes * 60_000;
        let total: f64 = self.w.weights.iter().sum();
        let mut t = T0 as f64;
        let mut phase_end = T0 as u64;
        let mut rate = self.w.rate;
        let mut phases: Vec<f64> = Vec::new();
        loop {
            if t as u64 >= phase_end {
                phase_end += 10_000;
                if phases.is_empty() {
                    phases = vec![0.2, 0.6, 1.0, 1.5, 3.0];
                    phases.shuffle(&mut self.rng);
                }
                rate = self.w.rate * phases.pop().unwrap();
            }
            t += -(1.0 - self.rng.random::<f64>()).ln() / rate * 1000.0;
            let arrival = t as u64;
            if arrival >= end {
                break;
            }
            let mut pick = self.rng.random::<f64>() * total;
            let replica = self
                .w
                .weights
                .iter()
                .position(|w| {
                    pick -= w;
                    pick < 0.0
                })
                .unwrap_or(0);
            let (lo, hi) = self.w.max_tokens;
            let max_tokens = self.rng.random_range(lo..=hi);
            let u = self.rng.random::<f64>();
            let output = if u < self.w.below {
                (max_tokens as f64 * self.rng.random_range(0.0..1.0)) as u64
            } else if u < self.w.below + self.w.equal {
                max_tokens
            } else {
                (max_tokens as f64 * self.rng.random_range(1.0..1.5)).ceil() as u64
            };
            let duration = self.rng.random_range(300..6_000);
            let reserve = Demand {
                requests: 1.0,
                input_tokens: self.input_estimate as f64,
                output_tokens: max_tokens as f64,
                all_tokens: (self.input_estimate + max_tokens) as f64,
                usd: 0.0,
            };
            let actual = Demand {
                requests: 1.0,
                input_tokens: INPUT_USED as f64,
                output_tokens: output as f64,
                all_tokens: (INPUT_USED + output) as f64,
                usd: 0.0,
            };
            let need = self
                .buckets
                .iter()
                .map(|b| {
                    // Per-minute reservations are capped at the capacity,
                    // as the meter caps them.
                    let a = amount(&reserve, b.metric);
                    if per_minute(b) {
                        a.min(b.limit)
                    } else {
                        a
                    }
                })
                .collect();
            let used = self
                .buckets
                .iter()
                .map(|b| amount(&actual, b.metric))
                .collect();
            let i = self.reqs.len();
            self.reqs.push(Req {
                replica,
                arrival,
                end: arrival + duration,
                max_tokens,
                output,
                need,
                used,
                flow: None,
                calls_done: 0,
                fate: Fate::Waiting,
                oracle: None,
                excess: Vec::new(),
                over_credit: Vec::new(),
                debt: Vec::new(),
                early: None,
            });
            self.at(arrival, Ev::Arrive(i));
        }
    }

    /// Whether this call's answer is lost, or the call delivered twice.
    fn fault(&mut self) -> (bool, bool) {
        if self.now >= self.faults_until {
            return (false, false);
        }
        let u = self.rng.random::<f64>();
        (
            u < self.w.drop,
            u >= self.w.drop && u < self.w.drop + self.w.dup,
        )
    }

    /// One call to the service at `now`, with the bookkeeping of what Redis
    /// applied.
    async fn serve(&mut self, method: QuotaMethod, message: &[u8], replica: usize) -> Vec<u8> {
        self.s.clock.set(self.now as i64);
        match method {
            QuotaMethod::Admit => {
                self.counts.admits += 1;
                let req = pb::AdmitRequest::decode(message).unwrap();
                let answer = self.s.quota.admit(req.clone()).await.unwrap();
                // The simulation sends each Admit once.
                if answer.outcome == pb::admit_response::Outcome::Admitted as i32 {
                    for c in &req.charges {
                        let k = self.bucket_index(&c.bucket.as_ref().unwrap().id);
                        self.ledger[k] += c.amount as f64;
                    }
                }
                answer.encode_to_vec()
            }
            QuotaMethod::Settle => {
                self.counts.settles += 1;
                let req = pb::SettleRequest::decode(message).unwrap();
                let answer = self.s.quota.settle(req.clone()).await.unwrap();
                if answer.applied {
                    for c in &req.deltas {
                        let k = self.bucket_index(&c.bucket.as_ref().unwrap().id);
                        self.ledger[k] += c.amount as f64;
                    }
                }
                answer.encode_to_vec()
            }
            QuotaMethod::Sync => {
                self.counts.syncs += 1;
                let req = pb::SyncRequest::decode(message).unwrap();
                // The replica's lease records as Redis has them before this
                // sync (one round trip).
                let mut pipe = redis::pipe();
                for b in &req.buckets {
                    let id = &b.bucket.as_ref().unwrap().id;
                    pipe.cmd("HGET")
                        .arg(format!("tg:{{tg}}:r:{id}"))
                        .arg(&req.replica);
                }
                let records: Vec<Option<String>> = pipe.query_async(&mut self.conn).await.unwrap();
                let mut fresh = Vec::new();
                for (j, (b, record)) in req.buckets.iter().zip(records).enumerate() {
                    if let Some(k) = self.report(replica, b, record.as_deref()) {
                        fresh.push((j, k));
                    }
                }
                let answer = self.s.quota.sync(req).await.unwrap();
                for (j, k) in fresh {
                    let g = &answer.grants[j];
                    let lease = &mut self.leases[replica][k];
                    lease.granted = g.lease as f64;
                    lease.grant = lease.granted;
                    // Redis reclaims an unsynced lease 3T after it expires.
                    lease.reclaim_at = g.expires_at_ms as u64 + 3 * PERIOD;
                }
                answer.encode_to_vec()
            }
        }
    }

    /// A bucket's report about to reach Redis. When it is new (a seq above
    /// the replica's last), Redis applies it: the consumption must be
    /// exactly what the replica's lease served since its previous report,
    /// and the lease Redis takes back the one this model says it holds.
    fn report(
        &mut self,
        replica: usize,
        b: &pb::BucketSync,
        record: Option<&str>,
    ) -> Option<usize> {
        let k = self.bucket_index(&b.bucket.as_ref().unwrap().id);
        // `seq lease expires_at reclaim_at ...` (quota/src/lua/common.lua).
        let fields: Vec<f64> = record
            .iter()
            .flat_map(|r| r.split(' ').map(|f| f.parse::<f64>().unwrap()))
            .collect();
        if fields.first().is_some_and(|seq| b.seq as f64 <= *seq) {
            return None;
        }
        let held = match fields.as_slice() {
            [_, g, _, reclaim, ..] if (self.now as f64) < *reclaim => *g,
            _ => 0.0,
        };
        let lease = self.leases[replica][k];
        let label = self.buckets[k].label();
        assert_eq!(
            held,
            lease.granted,
            "{}: envoy-{replica}'s lease of {label} in Redis",
            self.tag()
        );
        assert_eq!(
            b.consumed as f64,
            lease.unreported,
            "{}: envoy-{replica}'s report of {label}",
            self.tag()
        );
        self.ledger[k] += b.consumed as f64;
        for c in &mut self.creations {
            if c.bucket == k && c.replica == replica && c.closed == u64::MAX && !c.discarded {
                c.closed = self.now;
            }
        }
        if lease.discarded > 0.0 {
            self.creations.push(Creation {
                bucket: k,
                replica,
                at: self.now,
                amount: lease.discarded,
                closed: u64::MAX,
                discarded: true,
            });
        }
        self.reports.push(Report {
            bucket: k,
            replica,
            created: lease.created,
            in_flight: if lease.granted > 0.0 {
                (lease.remainder - lease.grant).max(0.0)
            } else {
                lease.remainder
            },
            debt: lease.debt,
            refunds: lease.refunds,
        });
        let slot = store::read(&*self.envoys[replica].store, &record::store_key("key:k"))
            .unwrap()
            .slot(self.buckets[k].metric);
        self.leases[replica][k] = Lease {
            unreported: 0.0,
            since: self.now,
            remainder: slot.value.max(0.0),
            debt: 0.0,
            refunds: 0.0,
            created: 0.0,
            discarded: 0.0,
            ..lease
        };
        Some(k)
    }

    /// Consumption (or a refund) from a replica's lease.
    fn spend(&mut self, replica: usize, k: usize, amount: f64) {
        let lease = &mut self.leases[replica][k];
        let before = lease.over_credit();
        lease.unreported += amount;
        let after = lease.over_credit();
        self.created(replica, k, self.now, after - before);
    }

    fn created(&mut self, replica: usize, bucket: usize, at: u64, amount: f64) {
        if amount > 0.0 {
            self.leases[replica][bucket].created += amount;
            self.creations.push(Creation {
                bucket,
                replica,
                at,
                amount,
                closed: u64::MAX,
                discarded: false,
            });
        }
    }

    /// Leases whose reclaim time has come go back to Redis's balance (the
    /// scripts do it at their first call after it; this is the earliest).
    fn reclaim(&mut self) {
        for r in 0..self.w.replicas {
            for k in 0..self.buckets.len() {
                let lease = &mut self.leases[r][k];
                if lease.granted > 0.0 && self.now >= lease.reclaim_at {
                    let before = lease.over_credit();
                    lease.granted = 0.0;
                    let (after, at) = (lease.over_credit(), lease.reclaim_at);
                    self.created(r, k, at, after - before);
                }
            }
        }
    }

    /// The over-credit outstanding in a bucket.
    fn over_credit(&self, k: usize) -> f64 {
        let discarded: f64 = self
            .creations
            .iter()
            .filter(|c| c.bucket == k && c.discarded && c.closed == u64::MAX)
            .map(|c| c.amount)
            .sum();
        discarded + self.leases.iter().map(|l| l[k].over_credit()).sum::<f64>()
    }

    /// While the exact bucket is full, the refunds replicas still owe
    /// Redis are more than it can take back: noted per lease. Once it is
    /// full with none owed, Redis (at most as full) holds nothing it does
    /// not have.
    fn full(&mut self) {
        let states = meter::states(&*self.shadow, &self.buckets, self.clock());
        for (k, (b, s)) in self.buckets.iter().zip(&states).enumerate() {
            if !per_minute(b) || s.view.remaining < b.limit {
                continue;
            }
            let mut owed = 0.0;
            for leases in &mut self.leases {
                let lease = &mut leases[k];
                let refund = (-lease.unreported).max(0.0);
                lease.discarded = lease.discarded.max(refund);
                owed += refund;
            }
            if owed == 0.0 {
                for c in &mut self.creations {
                    if c.bucket == k && c.discarded && c.closed == u64::MAX {
                        c.closed = self.now;
                    }
                }
            }
        }
    }

    /// A Sync or Settle under the workload's faults: the answer (None: lost
    /// although the service applied the call) and how long it takes.
    async fn forward(
        &mut self,
        method: QuotaMethod,
        message: &[u8],
        replica: usize,
    ) -> (Option<Vec<u8>>, u64) {
        let answer = self.serve(method, message, replica).await;
        let (drop, dup) = self.fault();
        if dup {
            self.counts.duplicated += 1;
            let again = self.serve(method, message, replica).await;
            match method {
                QuotaMethod::Settle => {
                    let r = pb::SettleResponse::decode(again.as_slice()).unwrap();
                    assert!(!r.applied, "{}: a repeated Settle applied", self.tag());
                }
                _ => assert_eq!(
                    again,
                    answer,
                    "{}: a repeated {method:?} answered differently",
                    self.tag()
                ),
            }
            return (Some(again), RTT);
        }
        if drop {
            self.counts.dropped += 1;
            // A reset connection fails at once, a lost answer at the timeout.
            let after = if self.rng.random_bool(0.5) {
                RTT
            } else {
                TIMEOUT
            };
            return (None, after);
        }
        (Some(answer), RTT)
    }

    async fn run(&mut self) {
        self.generate();
        let last_end = self.reqs.iter().map(|r| r.end).max().unwrap_or(T0 as u64);
        // Faults stop 2 s after the last request ends so that the run comes
        // to rest: every retry goes through, every lease is synced.
        self.faults_until = last_end + 2_000;
        for i in 0..self.w.replicas {
            // Unsynchronised leaders, as on separate Envoys.
            let offset = (i as u64 * PERIOD) / self.w.replicas as u64;
            self.at(T0 as u64 + offset, Ev::Tick(i));
        }
        while let Some(Reverse((time, id))) = self.heap.pop() {
            self.now = time;
            self.reclaim();
            self.full();
            match self.events[id as usize].take().unwrap() {
                Ev::Arrive(i) => self.arrive(i).await,
                Ev::AdmitAnswer(i, answer) => self.admit_answer(i, answer),
                Ev::End(i) => self.end(i).await,
                Ev::OracleEnd(i) => self.oracle_end(i),
                Ev::Tick(r) => self.tick(r).await,
                Ev::RootAnswer(r, token, answer) => {
                    let e = &mut self.envoys[r];
                    e.root.now_ms = self.now;
                    e.leader
                        .on_response(&mut e.root, &self.policy, token, answer.as_deref());
                }
            }
        }
        self.finish().await;
    }

    fn host(&self, i: usize) -> FakeHost {
        let r = &self.reqs[i];
        FakeHost::new()
            .with_store(self.envoys[r.replica].store.clone())
            .at(self.now)
            .with_request_header(":path", "/v1/messages")
            .with_request_header("x-request-id", &format!("r-{i}"))
            .with_request_header("x-api-key", KEY)
            .with_body(&body(r.max_tokens))
    }

    async fn arrive(&mut self, i: usize) {
        let reserve = self.demand(&self.reqs[i].need);
        match meter::admit(&*self.oracle, &self.buckets, &reserve, self.clock()) {
            Ok(admission) => {
                self.reqs[i].oracle = Some(admission);
                let end = self.reqs[i].end;
                self.at(end, Ev::OracleEnd(i));
            }
            Err(meter::Denial::Limited { .. }) => {}
            Err(e) => panic!("{}: oracle {e:?}", self.tag()),
        }

        let mut flow = RequestFlow::with_options(
            self.policy.clone(),
            FilterOptions {
                hold_request_headers: true,
                shared: Some(opts()),
            },
        );
        let mut host = self.host(i);
        assert_eq!(flow.on_request_headers(&mut host, false), Decision::Pause);
        let n = host.body_len();
        let replica = self.reqs[i].replica;
        match flow.on_request_body(&mut host, n, true) {
            Decision::Continue => {
                assert!(host.quota_calls.is_empty());
                self.reqs[i].fate = Fate::Lease;
                for k in 0..self.buckets.len() {
                    self.spend(replica, k, self.reqs[i].need[k]);
                }
                self.shadow_admit(i);
                if self.reqs[i].excess.iter().any(|e| *e > 0.0) {
                    self.reqs[i].debt = self.redis_debt().await;
                }
                let end = self.reqs[i].end;
                self.at(end, Ev::End(i));
            }
            Decision::Pause => {
                assert_eq!(host.quota_calls.len(), 1);
                let (method, message) = host.quota_calls[0].clone();
                assert_eq!(method, QuotaMethod::Admit);
                let answer = self.serve(method, &message, replica).await;
                // Redis decided now: compare with the exact bucket now.
                let decoded = pb::AdmitResponse::decode(answer.as_slice()).unwrap();
                if decoded.outcome == pb::admit_response::Outcome::Admitted as i32 {
                    self.shadow_admit(i);
                } else {
                    self.shadow_refusal(i, decoded.refused as usize);
                }
                self.reqs[i].calls_done = 1;
                self.at(self.now + RTT, Ev::AdmitAnswer(i, answer));
            }
            Decision::Reply(r) => panic!("{}: request {i} refused at once: {}", self.tag(), r.body),
        }
        self.reqs[i].flow = Some((flow, host));
    }

    fn admit_answer(&mut self, i: usize, answer: Vec<u8>) {
        let (mut flow, mut host) = self.reqs[i].flow.take().unwrap();
        host.now_ms = self.now;
        match flow.on_quota_response(&mut host, Some(&answer)) {
            Some(Decision::Continue) => {
                self.reqs[i].fate = Fate::Remote;
                let end = self.reqs[i].end;
                self.at(end, Ev::End(i));
                self.reqs[i].flow = Some((flow, host));
            }
            Some(Decision::Reply(r)) => {
                assert_eq!(r.status, 429, "{}: {}", self.tag(), r.body);
                self.reqs[i].fate = Fate::Refused;
            }
            other => panic!("{}: request {i}: {other:?}", self.tag()),
        }
    }

    async fn end(&mut self, i: usize) {
        let (mut flow, mut host) = self.reqs[i].flow.take().unwrap();
        host.now_ms = self.now;
        host.response_headers = vec![
            (":status".into(), b"200".to_vec()),
            ("content-type".into(), b"application/json".to_vec()),
        ];
        flow.on_response_headers(&mut host, false);
        host.response_chunk = format!(
            r#"{{"model":"claude-haiku-4-5","usage":{{"input_tokens":{INPUT_USED},"output_tokens":{}}}}}"#,
            self.reqs[i].output
        )
        .into_bytes();
        let n = host.response_chunk.len();
        flow.on_response_body(&mut host, n, true);
        assert_eq!(
            host.last_audit().unwrap().tokens.output,
            Some(self.reqs[i].output)
        );
        let replica = self.reqs[i].replica;
        let calls: Vec<_> = host.quota_calls[self.reqs[i].calls_done..].to_vec();
        for (method, message) in calls {
            // Sent at the end of the response; nothing waits for the answer.
            assert_eq!(method, QuotaMethod::Settle);
            self.forward(method, &message, replica).await;
        }
        if self.reqs[i].fate == Fate::Lease {
            // Settled on the lease: reported with the replica's next sync.
            for k in 0..self.buckets.len() {
                let delta = self.reqs[i].used[k] - self.reqs[i].need[k];
                let lease = &mut self.leases[replica][k];
                lease.debt += delta.max(0.0);
                lease.refunds += (-delta).max(0.0);
                self.spend(replica, k, delta);
            }
        }
        self.shadow_settle(i);
    }

    fn oracle_end(&mut self, i: usize) {
        let admission = self.reqs[i].oracle.clone().unwrap();
        let actual = self.demand(&self.reqs[i].used);
        meter::settle(
            &*self.oracle,
            &admission.reservations,
            &actual,
            self.clock(),
        )
        .unwrap();
    }

    async fn tick(&mut self, r: usize) {
        if self.now >= self.faults_until && self.quiet() {
            // Every Envoy stops: what they spent is reported, nothing is owed.
            for e in &mut self.envoys {
                e.ticking = false;
            }
        }
        let e = &mut self.envoys[r];
        if !e.ticking {
            return;
        }
        e.root.now_ms = self.now;
        e.leader.tick(&mut e.root);
        let calls: Vec<_> = e.root.calls[e.calls_done..].to_vec();
        e.calls_done = e.root.calls.len();
        for (token, method, message) in calls {
            let (answer, after) = match method {
                // A cancelled request's repeat (none in these workloads).
                QuotaMethod::Admit => (Some(self.serve(method, &message, r).await), RTT),
                _ => self.forward(method, &message, r).await,
            };
            self.at(self.now + after, Ev::RootAnswer(r, token, answer));
        }
        self.at(self.now + PERIOD, Ev::Tick(r));
    }

    /// The replicas admitted request `i`: what an exact bucket could not
    /// cover of it is over-admission, and is not charged to `conform`.
    fn shadow_admit(&mut self, i: usize) {
        let states = meter::states(&*self.conform, &self.buckets, self.clock());
        let need = self.reqs[i].need.clone();
        let excess: Vec<f64> = self
            .buckets
            .iter()
            .zip(&states)
            .zip(&need)
            .map(|((b, s), n)| {
                let left = s.view.remaining;
                if per_minute(b) {
                    // The part the balance did not cover.
                    n - left.clamp(0.0, *n)
                } else if left > 0.0 {
                    // A quota admits while anything is left.
                    0.0
                } else {
                    *n
                }
            })
            .collect();
        let covered: Vec<f64> = need.iter().zip(&excess).map(|(n, e)| n - e).collect();
        self.charge(&self.shadow, &need);
        self.charge(&self.conform, &covered);
        self.reqs[i].excess = excess;
        self.reqs[i].over_credit = (0..self.buckets.len())
            .map(|k| self.over_credit(k))
            .collect();
    }

    /// Per bucket, how far Redis's unleased balance is in debt now (the
    /// scripts' refill, `quota/src/lua/common.lua`), or how far a quota's
    /// use and leases are past its limit.
    async fn redis_debt(&mut self) -> Vec<f64> {
        let mut out = Vec::new();
        for b in &self.buckets {
            let (v, t, u, l): (Option<f64>, Option<f64>, Option<f64>, Option<f64>) =
                redis::cmd("HMGET")
                    .arg(format!("tg:{{tg}}:b:{}", b.label()))
                    .arg(&["v", "t", "u", "l"])
                    .query_async(&mut self.conn)
                    .await
                    .unwrap();
            let l = l.unwrap_or(0.0);
            out.push(if per_minute(b) {
                let elapsed = (self.now as f64 - t.unwrap_or(0.0)).max(0.0);
                let v = (v.unwrap_or(b.limit) + elapsed * b.limit / 60_000.0).min(b.limit - l);
                (-v).max(0.0)
            } else {
                (u.unwrap_or(0.0) + l - b.limit).max(0.0)
            });
        }
        out
    }

    /// Charges per-bucket amounts to an exact bucket, fitting or not.
    fn charge(&self, store: &MemStore, amounts: &[f64]) {
        let nothing: Vec<Reservation> = self
            .buckets
            .iter()
            .map(|b| Reservation {
                bucket: b.clone(),
                amount: 0.0,
                source: Source::Local,
            })
            .collect();
        meter::settle(store, &nothing, &self.demand(amounts), self.clock()).unwrap();
    }

    /// Settles a request in both exact buckets; in `conform` its
    /// over-admitted part never happened (it comes to `used - excess`, and
    /// never below nothing).
    fn shadow_settle(&mut self, i: usize) {
        let r = &self.reqs[i];
        let settle = |store: &MemStore, reserved: &[f64], used: &[f64]| {
            let reservations: Vec<Reservation> = self
                .buckets
                .iter()
                .zip(reserved)
                .map(|(b, n)| Reservation {
                    bucket: b.clone(),
                    amount: *n,
                    source: Source::Local,
                })
                .collect();
            meter::settle(store, &reservations, &self.demand(used), self.clock()).unwrap();
        };
        settle(&self.shadow, &r.need, &r.used);
        let covered: Vec<f64> = r.need.iter().zip(&r.excess).map(|(n, e)| n - e).collect();
        let used: Vec<f64> = r
            .used
            .iter()
            .zip(&r.excess)
            .map(|(u, e)| (u - e).max(0.0))
            .collect();
        settle(&self.conform, &covered, &used);
    }

    /// A refusal by Redis that the exact bucket of the replicas' history
    /// would have admitted: an early refusal.
    fn shadow_refusal(&mut self, i: usize, k: usize) {
        let states = meter::states(&*self.shadow, &self.buckets, self.clock());
        let need = &self.reqs[i].need;
        for ((b, s), n) in self.buckets.iter().zip(&states).zip(need) {
            let left = s.view.remaining;
            let fits = if per_minute(b) {
                left >= *n
            } else {
                left > 0.0
            };
            if !fits {
                return;
            }
        }
        let spare = if per_minute(&self.buckets[k]) {
            states[k].view.remaining - need[k]
        } else {
            states[k].view.remaining
        };
        let leases = self.leases.iter().map(|l| l[k]);
        self.reqs[i].early = Some(Early {
            bucket: k,
            spare,
            leased: leases.clone().map(|l| l.granted).sum(),
            unreported: leases.clone().map(|l| l.unreported.abs()).sum(),
            pending_ms: leases.map(|l| self.now - l.since).max().unwrap_or(0),
        });
    }

    /// Every replica's leader has nothing left to push: no consumption, no
    /// sync or settlement in flight or queued.
    fn quiet(&self) -> bool {
        let key = record::store_key("key:k");
        self.heap
            .iter()
            .all(|Reverse((_, id))| matches!(self.events[*id as usize], Some(Ev::Tick(_)) | None))
            && self.envoys.iter().all(|e| {
                e.store.queued(Queue::Settle) == 0
                    && e.store.queued(Queue::Cancel) == 0
                    && store::read(&*e.store, &key).is_none_or(|rec| {
                        self.buckets.iter().all(|b| {
                            let s = rec.slot(b.metric);
                            s.consumed == 0.0 && s.inflight == 0.0 && s.seq == 0
                        })
                    })
            })
    }

    /// The Envoys have stopped with everything reported: once their last
    /// leases are reclaimed, Redis holds no lease, and what it applied is
    /// exactly what the requests used.
    async fn finish(&mut self) {
        assert!(
            self.envoys.iter().all(|e| !e.ticking),
            "{}: the run never came to rest",
            self.tag()
        );
        // Past every lease's expiry and reclaim margin (6T); a call that
        // loads each bucket (a Settle of nothing) reclaims them.
        self.now += 10 * PERIOD;
        self.s.clock.set(self.now as i64);
        let touch = pb::SettleRequest {
            request_id: "touch".into(),
            deltas: self
                .buckets
                .iter()
                .map(|b| pb::Charge {
                    bucket: Some(meter::shared::wire_bucket(b, self.clock())),
                    amount: 0,
                })
                .collect(),
        };
        self.s.quota.settle(touch).await.unwrap();
        for (k, b) in self.buckets.iter().enumerate() {
            let used: f64 = self
                .reqs
                .iter()
                .filter(|r| matches!(r.fate, Fate::Lease | Fate::Remote))
                .map(|r| r.used[k])
                .sum();
            assert_eq!(
                self.ledger[k],
                used,
                "{}: {} applied in Redis vs used by the requests",
                self.tag(),
                b.label()
            );
            let stored = inspect(&self.s.client(), &b.label()).await.unwrap();
            assert_eq!(
                (stored.leased, stored.record_leases),
                (0, 0),
                "{}: {} still leased",
                self.tag(),
                b.label()
            );
            if !per_minute(b) {
                // A quota's use does not refill: Redis has it exactly.
                assert_eq!(
                    stored.value,
                    used,
                    "{}: {} used in Redis vs by the requests",
                    self.tag(),
                    b.label()
                );
            }
        }
    }
}

/// Per bucket: what the replicas and one Envoy alone admitted
/// (reservations), what the replicas over-admitted, and per 60-s window
/// the most over-admitted (with what allowed it there) and the most the
/// replicas admitted beyond or short of one Envoy alone (with the
/// settlement debt of that window).
#[derive(Debug, Default, Clone)]
struct Figures {
    label: String,
    admitted: f64,
    alone: f64,
    excess: f64,
    window_excess: f64,
    window_allowed: f64,
    window_over_alone: f64,
    window_debt: f64,
    window_under_alone: f64,
}

impl Sim {
    /// Over-credit that was open at some point of `[start, end)`.
    fn open_over_credit(&self, k: usize, start: u64, end: u64) -> f64 {
        self.creations
            .iter()
            .filter(|c| c.bucket == k && c.at < end && c.closed >= start)
            .map(|c| c.amount)
            .sum()
    }

    fn windows(&self) -> impl Iterator<Item = (u64, u64)> {
        let last = self
            .reqs
            .iter()
            .map(|r| r.arrival)
            .max()
            .unwrap_or(T0 as u64);
        (T0 as u64..=last).step_by(1_000).map(|s| (s, s + WINDOW))
    }

    /// Over-admission allowed in a window: the over-credit open in it, and
    /// Redis's debt when leases were spent beyond the exact bucket.
    fn allowed(&self, k: usize, start: u64, end: u64) -> f64 {
        let debt: f64 = self
            .reqs
            .iter()
            .filter(|r| r.arrival >= start && r.arrival < end)
            .filter_map(|r| r.debt.get(k))
            .sum();
        self.open_over_credit(k, start, end) + debt
    }

    fn figures(&self) -> Vec<Figures> {
        let admitted = |r: &Req| matches!(r.fate, Fate::Lease | Fate::Remote);
        let mut out = Vec::new();
        for (k, b) in self.buckets.iter().enumerate() {
            let sum = |pick: &dyn Fn(&Req) -> Option<f64>| -> f64 {
                self.reqs.iter().filter_map(pick).sum()
            };
            let mut f = Figures {
                label: b.label(),
                admitted: sum(&|r| admitted(r).then_some(r.need[k])),
                alone: sum(&|r| r.oracle.as_ref().map(|_| r.need[k])),
                excess: sum(&|r| r.excess.get(k).copied()),
                ..Figures::default()
            };
            for (start, end) in self.windows() {
                let inside = |r: &Req| r.arrival >= start && r.arrival < end;
                let excess = sum(&|r| inside(r).then(|| r.excess.get(k).copied()).flatten());
                if excess > f.window_excess {
                    f.window_excess = excess;
                    f.window_allowed = self.allowed(k, start, end);
                }
                let replicas = sum(&|r| (inside(r) && admitted(r)).then_some(r.need[k]));
                let alone = sum(&|r| (inside(r) && r.oracle.is_some()).then_some(r.need[k]));
                if replicas - alone > f.window_over_alone {
                    f.window_over_alone = replicas - alone;
                    f.window_debt = sum(&|r| {
                        (r.end >= start && r.end < end && admitted(r))
                            .then(|| (r.used[k] - r.need[k]).max(0.0))
                    });
                }
                f.window_under_alone = f.window_under_alone.max(alone - replicas);
            }
            out.push(f);
        }
        out
    }
}

/// Runs a workload and checks the guarantees of docs/scale-out.md ("What
/// the tests prove").
async fn check(w: Workload) {
    let started = std::time::Instant::now();
    let mut sim = Sim::new(w).await;
    sim.run().await;
    let tag = sim.tag();
    let count = |f: &dyn Fn(&Req) -> bool| sim.reqs.iter().filter(|r| f(r)).count();
    // The workload exercised what it is about: leases, refusals, faults.
    // Leases, where the limits allow one: a lease is at most a tenth of a
    // limit shared among the replicas, and one smaller than a request's
    // need serves nothing (such limits are Redis's, request by request).
    let share = |limit: Option<u64>, need: u64| {
        limit.is_none_or(|l| l as f64 / (10.0 * sim.w.replicas as f64) >= need as f64)
    };
    let leases_possible = share(sim.w.limits.rpm, 1)
        && share(sim.w.limits.otpm, sim.w.max_tokens.0)
        && share(sim.w.limits.tpd, sim.w.max_tokens.0);
    assert!(
        !leases_possible || count(&|r| r.fate == Fate::Lease) > 0,
        "{tag}: no request served from a lease"
    );
    assert!(
        count(&|r| r.fate == Fate::Refused) > 0,
        "{tag}: no request refused"
    );
    assert!(
        sim.counts.dropped > 0 && sim.counts.duplicated > 0,
        "{tag}: no answer lost, or no call repeated"
    );
    let early: Vec<Early> = sim.reqs.iter().filter_map(|r| r.early).collect();
    let spare = early.iter().map(|e| e.spare).fold(0.0, f64::max);
    println!(
        "{}: {} requests on {} replicas in {:.1} s: {} served from leases, {} admitted by \
         Redis, {} refused ({} early, at most {spare:.1} to spare); one Envoy alone admitted \
         {} ({} of them refused here, {} it refused admitted here); {:?}",
        sim.w.name,
        sim.reqs.len(),
        sim.w.replicas,
        started.elapsed().as_secs_f64(),
        count(&|r| r.fate == Fate::Lease),
        count(&|r| r.fate == Fate::Remote),
        count(&|r| r.fate == Fate::Refused),
        early.len(),
        count(&|r| r.oracle.is_some()),
        count(&|r| r.fate == Fate::Refused && r.oracle.is_some()),
        count(&|r| r.fate != Fate::Refused && r.oracle.is_none()),
        sim.counts,
    );
    for f in sim.figures() {
        println!(
            "  {} {}: admitted {} (alone {}); over-admitted {:.1} (most in 60 s {:.1}, allowed \
             there {:.1}); per 60 s vs alone +{} (settlement debt there {}) / -{}",
            sim.w.name,
            f.label,
            f.admitted,
            f.alone,
            f.excess,
            f.window_excess,
            f.window_allowed,
            f.window_over_alone,
            f.window_debt,
            f.window_under_alone
        );
    }

    // A replica spends only its lease: what Redis held for it, what was
    // left of its previous lease while a report's answer was on its way,
    // and refunds; the rest is settlement debt.
    for r in &sim.reports {
        assert!(
            r.created <= r.in_flight + r.debt + r.refunds + EPS,
            "{tag}: envoy-{}'s report of {} carried more over-credit than its lease \
             allows: {r:?}",
            r.replica,
            sim.buckets[r.bucket].label()
        );
    }
    for (k, b) in sim.buckets.iter().enumerate() {
        let label = b.label();
        // Each request admitted beyond the exact bucket: Redis admits only
        // against over-credit, and a replica spends its lease beyond it
        // only while Redis's balance is in debt (a quota past its limit) or
        // over-credited; a per-minute bucket by no more than those, a
        // quota (which admits while anything is left) by the request.
        for (i, r) in sim.reqs.iter().enumerate() {
            let excess = r.excess.get(k).copied().unwrap_or(0.0);
            if excess <= 0.0 {
                continue;
            }
            let over = r.over_credit[k];
            let debt = r.debt.get(k).copied().unwrap_or(0.0);
            let cause = over + debt;
            let bound = if per_minute(b) || cause <= 0.0 {
                cause
            } else {
                excess
            };
            assert!(
                excess <= bound + EPS,
                "{tag}: request {i} ({:?}) over-admitted {excess} in {label} \
                 with {over} of over-credit and {debt} of debt in Redis",
                r.fate
            );
        }
        if per_minute(b) {
            // In any 60-s window: over-admission is at most the over-credit
            // open in it, plus Redis's debt when leases were spent in it.
            for (start, end) in sim.windows() {
                let excess: f64 = sim
                    .reqs
                    .iter()
                    .filter(|r| r.arrival >= start && r.arrival < end)
                    .filter_map(|r| r.excess.get(k))
                    .sum();
                let allowed = sim.allowed(k, start, end);
                assert!(
                    excess <= allowed + EPS,
                    "{tag}: {label} over-admitted {excess} in [{}, {}) s with {allowed} allowed",
                    (start - T0 as u64) / 1000,
                    (end - T0 as u64) / 1000
                );
            }
        } else {
            // A quota's whole use (Redis has it exactly) passes its limit
            // by at most one request, the settlement debt, and what was
            // over-admitted against over-credit.
            let admitted = |r: &&Req| matches!(r.fate, Fate::Lease | Fate::Remote);
            let used: f64 = sim.reqs.iter().filter(admitted).map(|r| r.used[k]).sum();
            let debt: f64 = sim
                .reqs
                .iter()
                .filter(admitted)
                .map(|r| (r.used[k] - r.need[k]).max(0.0))
                .sum();
            if Some(b.limit as u64) != DAY {
                assert!(used >= b.limit, "{tag}: {label} never ran out");
            }
            let max_need = sim.reqs.iter().map(|r| r.need[k]).fold(0.0, f64::max);
            let over: f64 = sim
                .creations
                .iter()
                .filter(|c| c.bucket == k)
                .map(|c| c.amount)
                .sum();
            assert!(
                used <= b.limit + max_need + debt + over + EPS,
                "{tag}: {label} used {used} of {} (one request {max_need}, debt {debt}, \
                 over-credit {over})",
                b.limit
            );
        }
    }
    // Versus one Envoy alone: when a request limit (the first bucket) is
    // the only one that refuses, an exact bucket that admits whenever it
    // can has admitted the most requests by any instant; the replicas, an
    // exact bucket's worth of history plus what they over-admitted, never
    // lead it by more.
    let only_requests =
        sim.w.limits.otpm.is_none() && sim.w.limits.tpd.is_none_or(|d| Some(d) == DAY);
    if only_requests {
        let (mut replicas, mut alone, mut over) = (0, 0, 0);
        for (i, r) in sim.reqs.iter().enumerate() {
            replicas += usize::from(matches!(r.fate, Fate::Lease | Fate::Remote));
            alone += usize::from(r.oracle.is_some());
            over += usize::from(r.excess.first().is_some_and(|e| *e > 0.0));
            assert!(
                replicas <= alone + over,
                "{tag}: by request {i} the replicas admitted {replicas}, one Envoy alone {alone}"
            );
        }
    }
    // An early refusal: what the exact bucket had to spare was held in
    // leases, in consumption or refunds not reported yet, or is refill
    // Redis did not add while the leases kept its balance at capacity (at
    // most the longest wait for a report, plus a period).
    for e in &early {
        let b = &sim.buckets[e.bucket];
        let refill = if per_minute(b) {
            b.limit * (e.pending_ms + PERIOD) as f64 / 60_000.0
        } else {
            0.0
        };
        assert!(
            e.spare <= e.leased + e.unreported + refill + EPS,
            "{tag}: early refusal in {} beyond leases: {e:?}",
            b.label()
        );
    }
}

/// Defaults the workloads below change: 4 replicas sharing traffic evenly
/// for 2 minutes, half the requests using less than they reserve, a
/// quarter exactly, a quarter more; 10% of Sync and Settle answers lost,
/// 10% of those calls delivered twice.
fn workload(name: &'static str, seed: u64, limits: Limits, rate: f64) -> Workload {
    Workload {
        name,
        seed,
        replicas: 4,
        minutes: 2,
        limits,
        weights: vec![1.0; 4],
        rate,
        max_tokens: (50, 1000),
        below: 0.5,
        equal: 0.25,
        drop: 0.1,
        dup: 0.1,
    }
}

/// A non-binding daily quota on every token: Redis then holds the exact
/// total of what was used.
const DAY: Option<u64> = Some(1_000_000_000);

#[tokio::test]
async fn a_small_request_limit_shared_evenly_by_four_replicas() {
    check(Workload {
        minutes: 4,
        ..workload(
            "a_small_request_limit_shared_evenly_by_four_replicas",
            11,
            Limits {
                rpm: Some(12),
                ..Limits::default()
            },
            0.5,
        )
    })
    .await;
}

#[tokio::test]
async fn a_small_request_limit_with_one_busy_replica_of_three() {
    check(Workload {
        replicas: 3,
        minutes: 3,
        weights: vec![6.0, 1.0, 1.0],
        ..workload(
            "a_small_request_limit_with_one_busy_replica_of_three",
            12,
            Limits {
                rpm: Some(40),
                tpd: DAY,
                ..Limits::default()
            },
            1.2,
        )
    })
    .await;
}

#[tokio::test]
async fn a_large_request_limit_shared_evenly_by_five_replicas() {
    check(Workload {
        replicas: 5,
        weights: vec![1.0; 5],
        ..workload(
            "a_large_request_limit_shared_evenly_by_five_replicas",
            13,
            Limits {
                rpm: Some(3_000),
                tpd: DAY,
                ..Limits::default()
            },
            70.0,
        )
    })
    .await;
}

#[tokio::test]
async fn a_large_request_limit_with_skewed_traffic_over_six_replicas() {
    check(Workload {
        replicas: 6,
        weights: vec![8.0, 4.0, 2.0, 1.0, 1.0, 1.0],
        ..workload(
            "a_large_request_limit_with_skewed_traffic_over_six_replicas",
            14,
            Limits {
                rpm: Some(1_200),
                tpd: DAY,
                ..Limits::default()
            },
            36.0,
        )
    })
    .await;
}

#[tokio::test]
async fn a_small_output_token_limit_with_debt_on_two_replicas() {
    check(Workload {
        replicas: 2,
        minutes: 4,
        weights: vec![1.0; 2],
        max_tokens: (20, 400),
        below: 0.3,
        equal: 0.2,
        ..workload(
            "a_small_output_token_limit_with_debt_on_two_replicas",
            15,
            Limits {
                rpm: Some(60),
                otpm: Some(3_000),
                tpd: DAY,
            },
            0.6,
        )
    })
    .await;
}

#[tokio::test]
async fn a_large_output_token_limit_with_debt_and_skewed_traffic() {
    check(Workload {
        minutes: 3,
        weights: vec![3.0, 1.0, 1.0, 1.0],
        below: 0.2,
        equal: 0.2,
        ..workload(
            "a_large_output_token_limit_with_debt_and_skewed_traffic",
            16,
            Limits {
                rpm: Some(1_200),
                otpm: Some(60_000),
                tpd: DAY,
            },
            12.0,
        )
    })
    .await;
}

#[tokio::test]
async fn a_daily_quota_that_runs_out_on_three_replicas() {
    check(Workload {
        replicas: 3,
        minutes: 3,
        weights: vec![1.0; 3],
        max_tokens: (100, 800),
        ..workload(
            "a_daily_quota_that_runs_out_on_three_replicas",
            17,
            Limits {
                rpm: Some(600),
                tpd: Some(150_000),
                ..Limits::default()
            },
            6.0,
        )
    })
    .await;
}

#[tokio::test]
async fn a_lossy_network_drops_and_repeats_syncs_and_settles() {
    check(Workload {
        drop: 0.3,
        dup: 0.2,
        ..workload(
            "a_lossy_network_drops_and_repeats_syncs_and_settles",
            18,
            Limits {
                rpm: Some(1_200),
                otpm: Some(120_000),
                tpd: DAY,
            },
            25.0,
        )
    })
    .await;
}
