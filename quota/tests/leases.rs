//! Sync: leases, the lease rule, expiry and reclaim, idempotent retries,
//! revocation epochs, and the invariant unleased balance + leases <= capacity
//! under concurrent replicas.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;

use common::*;
use rand::{Rng, SeedableRng};
use tollgate_core::time::parse_rfc3339;
use tollgate_quota::testing::inspect;
use tollgate_quota::tollgate_proto::quota::v1::admit_response::Outcome;
use tollgate_quota::tollgate_proto::quota::v1::{
    Bucket, BucketSync, Grant, RevokeRequest, SyncRequest,
};
use tollgate_quota::{QuotaService, Settings};

async fn grant(q: &QuotaService, replica: &str, b: BucketSync) -> Grant {
    let r = q.sync(sync_req(replica, vec![b])).await.unwrap();
    assert_eq!(r.grants.len(), 1);
    r.grants[0]
}

fn left(g: &Grant) -> f64 {
    g.view.as_ref().unwrap().remaining
}

#[tokio::test]
async fn sync_grants_a_lease_and_takes_back_what_was_not_consumed() {
    let s = Setup::manual();
    let tpm = per_minute("key:nora:tokens_per_minute", 1000);
    let r = s
        .quota
        .sync(sync_req("envoy-a", vec![bsync(&tpm, 1, 0, 100)]))
        .await
        .unwrap();
    assert_eq!((r.replicas, r.now_ms, r.revocation_epoch), (1, T0, 0));
    assert!(r.revoked_keys.is_empty());
    let g = &r.grants[0];
    assert_eq!((g.lease, g.expires_at_ms, g.window), (100, T0 + 300, 0));
    assert_eq!(left(g), 900.0);
    let stored = inspect(&s.client(), &tpm.id).await.unwrap();
    assert_eq!(
        (stored.value, stored.leased, stored.record_leases),
        (900.0, 100, 100)
    );

    // 60 of the lease spent: 40 come back, a new lease of 100 goes out.
    let g = grant(&s.quota, "envoy-a", bsync(&tpm, 2, 60, 100)).await;
    assert_eq!(g.lease, 100);
    assert_eq!(left(&g), 840.0);
    let stored = inspect(&s.client(), &tpm.id).await.unwrap();
    assert_eq!(
        (stored.value, stored.leased, stored.record_leases),
        (840.0, 100, 100)
    );

    // Exact admission sees only the unleased balance.
    let r = s
        .quota
        .admit(admit_req("r1", vec![charge(&tpm, 840)]))
        .await
        .unwrap();
    assert_eq!(outcome(&r), Outcome::Admitted);
    let r = s
        .quota
        .admit(admit_req("r2", vec![charge(&tpm, 1)]))
        .await
        .unwrap();
    assert_eq!(outcome(&r), Outcome::Limited);
    assert_eq!(r.wait_ms, 60);

    // The whole lease spent, none asked: the bucket holds no lease.
    let g = grant(&s.quota, "envoy-a", bsync(&tpm, 3, 100, 0)).await;
    assert_eq!((g.lease, left(&g)), (0, 0.0));
    let stored = inspect(&s.client(), &tpm.id).await.unwrap();
    assert_eq!((stored.leased, stored.record_leases), (0, 0));
}

#[tokio::test]
async fn no_lease_when_the_balance_is_below_one_want_per_active_replica() {
    let s = Setup::manual();
    let rpm = per_minute("pool:team:requests_per_minute", 100);
    assert_eq!(grant(&s.quota, "a", bsync(&rpm, 1, 0, 30)).await.lease, 30);
    // Two active replicas: 70 >= 2 x 30.
    assert_eq!(grant(&s.quota, "b", bsync(&rpm, 1, 0, 30)).await.lease, 30);
    // Three: 40 < 3 x 30, so c gets nothing and goes through Admit.
    let r = s
        .quota
        .sync(sync_req("c", vec![bsync(&rpm, 1, 0, 30)]))
        .await
        .unwrap();
    assert_eq!(r.replicas, 3);
    assert_eq!((r.grants[0].lease, left(&r.grants[0])), (0, 40.0));
    let a = s
        .quota
        .admit(admit_req("exact", vec![charge(&rpm, 40)]))
        .await
        .unwrap();
    assert_eq!(outcome(&a), Outcome::Admitted);

    // 10 s later a, b and c are no longer active; their leases have been
    // reclaimed (expired at +300 ms, reclaimed at +600 ms).
    s.clock.advance(10_001);
    let r = s
        .quota
        .sync(sync_req("d", vec![bsync(&rpm, 1, 0, 30)]))
        .await
        .unwrap();
    assert_eq!(r.replicas, 1);
    assert_eq!(r.grants[0].lease, 30);
    let stored = inspect(&s.client(), &rpm.id).await.unwrap();
    assert_eq!((stored.leased, stored.record_leases), (30, 30));
}

#[tokio::test]
async fn consumption_beyond_the_lease_is_debt_and_negative_consumption_a_refund() {
    let s = Setup::manual();
    let tpm = per_minute("key:omar:tokens_per_minute", 600);
    assert_eq!(
        grant(&s.quota, "a", bsync(&tpm, 1, 0, 100)).await.lease,
        100
    );
    // 250 spent on a lease of 100 (settlements came in higher).
    let g = grant(&s.quota, "a", bsync(&tpm, 2, 250, 100)).await;
    assert_eq!((g.lease, left(&g)), (100, 250.0));
    // A refund of 50, the lease given back.
    let g = grant(&s.quota, "a", bsync(&tpm, 3, -50, 0)).await;
    assert_eq!((g.lease, left(&g)), (0, 400.0));

    let small = per_minute("key:omar:small", 100);
    assert_eq!(
        grant(&s.quota, "a", bsync(&small, 1, 0, 50)).await.lease,
        50
    );
    let g = grant(&s.quota, "a", bsync(&small, 2, 400, 50)).await;
    assert_eq!((g.lease, left(&g)), (0, -300.0));
    let r = s
        .quota
        .admit(admit_req("r", vec![charge(&small, 1)]))
        .await
        .unwrap();
    assert_eq!(outcome(&r), Outcome::Limited);
    // 301 missing at 100/min.
    assert_eq!(r.wait_ms, 180_600);
}

#[tokio::test]
async fn a_request_larger_than_the_unleased_capacity_passes_a_full_unleased_bucket() {
    let s = Setup::manual();
    let tpm = per_minute("key:pia:tokens_per_minute", 100);
    assert_eq!(grant(&s.quota, "a", bsync(&tpm, 1, 0, 40)).await.lease, 40);
    // 80 never fits in the 60 the lease leaves: it passes the full 60 and
    // leaves debt, as a request larger than the bucket does locally.
    let r = s
        .quota
        .admit(admit_req("big", vec![charge(&tpm, 80)]))
        .await
        .unwrap();
    assert_eq!(outcome(&r), Outcome::Admitted);
    assert_eq!(remaining(&r), vec![-20.0]);
    // In debt, the replica's lease comes back and no new one goes out.
    let g = grant(&s.quota, "a", bsync(&tpm, 2, 0, 40)).await;
    assert_eq!((g.lease, left(&g)), (0, 20.0));
}

#[tokio::test]
async fn a_refusal_caused_only_by_leases_waits_for_them_to_come_back() {
    let s = Setup::manual();
    // The day's quota is not spent, but what is left is leased out: the
    // lease comes back at the replica's next sync, within 3T = 300 ms, not
    // at midnight.
    let tpd = day("key:tia:tokens_per_day", 100, 0);
    let first = grant(&s.quota, "a", bsync(&tpd, 1, 0, 60)).await;
    assert_eq!(first.lease, 60);
    let take = |id: &str, b: &Bucket, n: i64| admit_req(id, vec![charge(b, n)]);
    let r = s.quota.admit(take("r1", &tpd, 40)).await.unwrap();
    assert_eq!(outcome(&r), Outcome::Admitted);
    let r = s.quota.admit(take("r2", &tpd, 1)).await.unwrap();
    assert_eq!((outcome(&r), r.wait_ms), (Outcome::Limited, 300));
    // Spent for real: the window's end.
    let g = grant(
        &s.quota,
        "a",
        BucketSync {
            window: first.window,
            ..bsync(&tpd, 2, 60, 0)
        },
    )
    .await;
    assert_eq!((g.lease, left(&g)), (0, 0.0));
    let r = s.quota.admit(take("r3", &tpd, 1)).await.unwrap();
    assert_eq!((outcome(&r), r.wait_ms), (Outcome::Limited, 12 * 3_600_000));

    // A per-minute bucket wholly leased out: 1 token would take 600 ms to
    // refill, the lease is back sooner.
    let rpm = per_minute("key:tia:requests_per_minute", 100);
    assert_eq!(
        grant(&s.quota, "a", bsync(&rpm, 1, 0, 100)).await.lease,
        100
    );
    let r = s.quota.admit(take("r4", &rpm, 1)).await.unwrap();
    assert_eq!((outcome(&r), r.wait_ms), (Outcome::Limited, 300));
}

#[tokio::test]
async fn a_retried_sync_is_applied_once_and_gets_the_same_grant() {
    let s = Setup::manual();
    let tpm = per_minute("key:quinn:tokens_per_minute", 1000);
    grant(&s.quota, "a", bsync(&tpm, 1, 0, 100)).await;
    let first = grant(&s.quota, "a", bsync(&tpm, 2, 40, 100)).await;
    assert_eq!((first.lease, left(&first)), (100, 860.0));
    let again = grant(&s.quota, "a", bsync(&tpm, 2, 40, 100)).await;
    assert_eq!(again, first);
    let stored = inspect(&s.client(), &tpm.id).await.unwrap();
    assert_eq!((stored.value, stored.leased), (860.0, 100));

    // Later, and a late duplicate of an older seq: still not applied.
    s.clock.advance(50);
    assert_eq!(grant(&s.quota, "a", bsync(&tpm, 2, 40, 100)).await, first);
    assert_eq!(grant(&s.quota, "a", bsync(&tpm, 1, 0, 100)).await, first);
    let stored = inspect(&s.client(), &tpm.id).await.unwrap();
    assert_eq!(stored.leased, 100);
    // Only 50 ms of refill was added (the unleased capacity is 900).
    assert!(stored.value > 860.0 && stored.value <= 860.0 + 50.0 / 60.0 + 1e-9);
}

#[tokio::test]
async fn an_unsynced_lease_is_reclaimed_after_expiry_and_margin() {
    let s = Setup::manual();
    let rpm = per_minute("key:rosa:requests_per_minute", 100);
    let g = grant(&s.quota, "a", bsync(&rpm, 1, 0, 100)).await;
    assert_eq!((g.lease, g.expires_at_ms, left(&g)), (100, T0 + 300, 0.0));
    let take = |id: &str| admit_req(id, vec![charge(&rpm, 1)]);
    assert_eq!(
        outcome(&s.quota.admit(take("r1")).await.unwrap()),
        Outcome::Limited
    );
    // Expired at +300 but not yet reclaimed: a replica whose sync was slow
    // may still be spending it.
    s.clock.set(T0 + 599);
    assert_eq!(
        outcome(&s.quota.admit(take("r2")).await.unwrap()),
        Outcome::Limited
    );
    s.clock.set(T0 + 600);
    let r = s.quota.admit(take("r3")).await.unwrap();
    assert_eq!(outcome(&r), Outcome::Admitted);
    assert_eq!(remaining(&r), vec![99.0]);
    let stored = inspect(&s.client(), &rpm.id).await.unwrap();
    assert_eq!((stored.leased, stored.record_leases), (0, 0));
    // The replica reports late: what it spent is now debt on the balance.
    let g = grant(&s.quota, "a", bsync(&rpm, 2, 30, 0)).await;
    assert_eq!((g.lease, left(&g)), (0, 69.0));
}

#[tokio::test]
async fn calendar_leases_and_consumption_belong_to_their_window() {
    let s = Setup::manual();
    let tpd = day("key:sam:tokens_per_day", 1000, 0);
    let w0 = parse_rfc3339("2026-03-10T00:00:00Z").unwrap() as i64;
    let w1 = w0 + 86_400_000;
    let g = grant(&s.quota, "a", bsync(&tpd, 1, 0, 100)).await;
    assert_eq!((g.lease, g.window, left(&g)), (100, w0, 900.0));
    let g = grant(
        &s.quota,
        "a",
        BucketSync {
            window: w0,
            ..bsync(&tpd, 2, 60, 100)
        },
    )
    .await;
    assert_eq!((g.lease, left(&g)), (100, 840.0));

    // Past midnight: the report for the ended day is dropped, the old
    // lease is void, a new one is granted in the new window.
    s.clock.set(w1 + 1);
    let g = grant(
        &s.quota,
        "a",
        BucketSync {
            window: w0,
            ..bsync(&tpd, 3, 30, 100)
        },
    )
    .await;
    assert_eq!((g.lease, g.window, left(&g)), (100, w1, 900.0));
    assert_eq!(g.view.as_ref().unwrap().reset_at_ms, w1 + 86_400_000);
    let stored = inspect(&s.client(), &tpd.id).await.unwrap();
    assert_eq!(
        (
            stored.value,
            stored.leased,
            stored.record_leases,
            stored.window
        ),
        (0.0, 100, 100, w1)
    );
}

#[tokio::test]
async fn revocations_reach_every_replica_by_epoch() {
    let s = Setup::manual();
    let revoke = |k: u8| RevokeRequest {
        key_sha256: vec![k; 32],
    };
    assert_eq!(s.quota.revoke(revoke(1)).await.unwrap().epoch, 1);
    assert_eq!(s.quota.revoke(revoke(2)).await.unwrap().epoch, 2);
    let since = |epoch: u64| SyncRequest {
        revocation_epoch: epoch,
        ..sync_req("a", vec![])
    };
    let r = s.quota.sync(since(0)).await.unwrap();
    assert_eq!(r.revoked_keys, vec![vec![1u8; 32], vec![2u8; 32]]);
    assert_eq!(r.revocation_epoch, 2);
    let r = s.quota.sync(since(1)).await.unwrap();
    assert_eq!(
        (r.revoked_keys, r.revocation_epoch),
        (vec![vec![2u8; 32]], 2)
    );
    let r = s.quota.sync(since(2)).await.unwrap();
    assert_eq!((r.revoked_keys.len(), r.revocation_epoch), (0, 2));

    // A bounded list: the epoch returned is where the list stops.
    let paged = QuotaService::with_manual_clock(
        s.client(),
        Settings {
            max_revocations: 1,
            ..Settings::default()
        },
        s.clock.clone(),
    )
    .unwrap();
    let r = paged.sync(since(0)).await.unwrap();
    assert_eq!(
        (r.revoked_keys, r.revocation_epoch),
        (vec![vec![1u8; 32]], 1)
    );
    let r = paged.sync(since(1)).await.unwrap();
    assert_eq!(
        (r.revoked_keys, r.revocation_epoch),
        (vec![vec![2u8; 32]], 2)
    );

    // Redis lost its data (restart without persistence): a replica ahead
    // of Redis's epoch gets the whole new log.
    let mut conn = s.client().get_multiplexed_async_connection().await.unwrap();
    let _: () = redis::cmd("FLUSHALL").query_async(&mut conn).await.unwrap();
    assert_eq!(s.quota.revoke(revoke(3)).await.unwrap().epoch, 1);
    let r = s.quota.sync(since(2)).await.unwrap();
    assert_eq!(
        (r.revoked_keys, r.revocation_epoch),
        (vec![vec![3u8; 32]], 1)
    );
}

#[tokio::test]
async fn sync_requests_are_checked() {
    let s = Setup::manual();
    let tpm = per_minute("t", 10);
    let cases = [
        (sync_req("", vec![]), "replica is empty"),
        (
            sync_req("a", vec![bsync(&tpm, 1, 0, -1)]),
            "buckets[0]: want -1 must be between 0 and 2^53",
        ),
        (
            sync_req("a", vec![bsync(&tpm, 1, 0, 1), bsync(&tpm, 1, 0, 1)]),
            "buckets[1].bucket 't' appears twice in one call",
        ),
        (
            sync_req("a", vec![bsync(&tpm, 1 << 60, 0, 1)]),
            "buckets[0]: seq 1152921504606846976 is beyond 2^53",
        ),
        (
            sync_req(
                "a",
                vec![bsync(
                    &Bucket {
                        refill: 9,
                        ..tpm.clone()
                    },
                    1,
                    0,
                    1,
                )],
            ),
            "buckets[0].bucket 't': refill must be PER_MINUTE, DAY or MONTH, got 9",
        ),
    ];
    for (request, message) in cases {
        let err = s.quota.sync(request).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert_eq!(err.message(), message);
    }
}

/// One simulated Envoy: spends its lease locally, syncs, admits exactly
/// when it has no lease, and sometimes retries a sync whose answer it lost.
struct Replica {
    name: String,
    quota: QuotaService,
    bucket: Bucket,
    rng: rand::rngs::StdRng,
    seq: u64,
    lease_left: i64,
    expires_at: i64,
    spent: i64,
}

impl Replica {
    /// Replica `i` of a test, on one of the test's service instances.
    fn new(i: u64, services: &[QuotaService; 2], bucket: &Bucket, seed: u64) -> Replica {
        Replica {
            name: format!("envoy-{i}"),
            quota: services[i as usize % 2].clone(),
            bucket: bucket.clone(),
            rng: rand::rngs::StdRng::seed_from_u64(seed + i),
            seq: 0,
            lease_left: 0,
            expires_at: 0,
            spent: 0,
        }
    }

    /// Spends `n` from the local lease when it holds that much.
    fn spend(&mut self, n: i64) {
        if n <= self.lease_left {
            self.lease_left -= n;
            self.spent += n;
        }
    }

    /// Exact admission of `n`; whether it was admitted.
    async fn admit(&self, id: &str, n: i64) -> bool {
        let a = self
            .quota
            .admit(admit_req(id, vec![charge(&self.bucket, n)]))
            .await
            .unwrap();
        outcome(&a) == Outcome::Admitted
    }

    fn sync_request(&self, want: i64) -> SyncRequest {
        sync_req(
            &self.name,
            vec![bsync(&self.bucket, self.seq, self.spent, want)],
        )
    }

    /// Syncs; half the time the answer is "lost" and the same request is
    /// sent again, which must give the same grant.
    async fn sync(&mut self, want: i64) -> i64 {
        self.seq += 1;
        let request = self.sync_request(want);
        let mut answer = self.quota.sync(request.clone()).await.unwrap();
        if self.rng.random_bool(0.5) {
            let again = self.quota.sync(request).await.unwrap();
            assert_eq!(
                again.grants, answer.grants,
                "{} seq {}",
                self.name, self.seq
            );
            answer = again;
        }
        let reported = self.spent;
        let g = &answer.grants[0];
        self.lease_left = g.lease;
        self.expires_at = g.expires_at_ms;
        self.spent = 0;
        reported
    }
}

async fn check_invariant(client: &redis::Client, bucket: &Bucket) {
    let stored = inspect(client, &bucket.id).await.unwrap();
    assert!(
        stored.value + stored.leased as f64 <= bucket.limit as f64 + 1e-6,
        "unleased {} + leased {} > capacity {}",
        stored.value,
        stored.leased,
        bucket.limit
    );
    assert_eq!(
        stored.leased, stored.record_leases,
        "leased total vs records"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replicas_together_never_take_more_than_the_bucket() {
    // The clock stands still: no refill, so everything spent or admitted
    // must add up to the capacity exactly, and never exceed it.
    let s = Setup::manual();
    let bucket = per_minute("pool:org:tokens_per_minute", 500);
    let services = [s.quota.clone(), s.another()];
    let admitted = Arc::new(AtomicI64::new(0));
    let reported = Arc::new(AtomicI64::new(0));
    let mut tasks = Vec::new();
    for i in 0..4u64 {
        let mut r = Replica::new(i, &services, &bucket, 7_000);
        let (admitted, reported, client) = (admitted.clone(), reported.clone(), s.client());
        tasks.push(tokio::spawn(async move {
            for step in 0..150 {
                match r.rng.random_range(0..10) {
                    0..=4 => {
                        let n = r.rng.random_range(1..=10);
                        r.spend(n);
                    }
                    5..=7 => {
                        let want = r.rng.random_range(0..=40);
                        let n = r.sync(want).await;
                        reported.fetch_add(n, Ordering::SeqCst);
                    }
                    _ => {
                        let n = r.rng.random_range(1..=20);
                        if r.admit(&format!("{}-{step}", r.name), n).await {
                            admitted.fetch_add(n, Ordering::SeqCst);
                        }
                    }
                }
                check_invariant(&client, &r.bucket).await;
            }
            // Stop: report what was spent and give the lease back.
            let n = r.sync(0).await;
            reported.fetch_add(n, Ordering::SeqCst);
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let stored = inspect(&s.client(), &bucket.id).await.unwrap();
    let taken = admitted.load(Ordering::SeqCst) + reported.load(Ordering::SeqCst);
    assert_eq!((stored.leased, stored.record_leases), (0, 0));
    assert_eq!(stored.value + taken as f64, 500.0);
    assert!(
        taken > 250,
        "the replicas took {taken} of 500: the test exercised little"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_lease_invariant_holds_with_time_debt_refunds_and_expiry() {
    let s = Setup::manual();
    let bucket = per_minute("pool:org:output_tokens_per_minute", 300);
    let services = [s.quota.clone(), s.another()];
    let stop = Arc::new(AtomicBool::new(false));
    // Time moves in steps of up to 40 ms while the replicas work; calls
    // built before a step may reach Redis after a later one (a clock
    // behind the stamp, as after a failover).
    let ticker = {
        let (clock, stop) = (s.clock.clone(), stop.clone());
        tokio::spawn(async move {
            let mut rng = rand::rngs::StdRng::seed_from_u64(99);
            while !stop.load(Ordering::SeqCst) {
                clock.advance(rng.random_range(0..40));
                tokio::time::sleep(std::time::Duration::from_millis(1)).await;
            }
        })
    };
    let mut tasks = Vec::new();
    for i in 0..4u64 {
        let mut r = Replica::new(i, &services, &bucket, 8_000);
        let (client, clock) = (s.client(), s.clock.clone());
        tasks.push(tokio::spawn(async move {
            for step in 0..150 {
                if clock.now_ms() >= r.expires_at {
                    // An expired lease is not spent (the filter's rule).
                    r.lease_left = 0;
                }
                match r.rng.random_range(0..12) {
                    0..=3 => {
                        let n = r.rng.random_range(1..=15);
                        r.spend(n);
                    }
                    // Settlements land in `spent` too: debt beyond the
                    // lease, or refunds.
                    4 => r.spent += r.rng.random_range(-20..=60),
                    5..=7 => {
                        let want = r.rng.random_range(0..=30);
                        r.sync(want).await;
                    }
                    // Silence: the lease expires and is reclaimed.
                    8 => tokio::time::sleep(std::time::Duration::from_millis(20)).await,
                    _ => {
                        let n = r.rng.random_range(1..=30);
                        let id = format!("{}-{step}", r.name);
                        if r.admit(&id, n).await && r.rng.random_bool(0.5) {
                            let delta = r.rng.random_range(-n..=n);
                            let done = r
                                .quota
                                .settle(settle_req(&id, vec![charge(&r.bucket, delta)]))
                                .await
                                .unwrap();
                            assert!(done.applied);
                        }
                    }
                }
                check_invariant(&client, &r.bucket).await;
            }
            r.sync(0).await;
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    stop.store(true, Ordering::SeqCst);
    ticker.await.unwrap();
    let stored = inspect(&s.client(), &bucket.id).await.unwrap();
    assert_eq!((stored.leased, stored.record_leases), (0, 0));
    check_invariant(&s.client(), &bucket).await;
}
