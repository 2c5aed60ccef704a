//! Admit and Settle against a real redis-server.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::time::Duration;

use common::*;
use tollgate_quota::testing::{inspect, RedisServer};
use tollgate_quota::tollgate_proto::quota::v1::admit_response::Outcome;
use tollgate_quota::tollgate_proto::quota::v1::{Bucket, RevokeRequest};
use tollgate_quota::{QuotaService, Settings};

#[tokio::test]
async fn admits_then_limits_a_per_minute_bucket() {
    let s = Setup::manual();
    let rpm = per_minute("key:alice:requests_per_minute", 3);
    for i in 0..3 {
        let r = s
            .quota
            .admit(admit_req(&format!("r{i}"), vec![charge(&rpm, 1)]))
            .await
            .unwrap();
        assert_eq!(outcome(&r), Outcome::Admitted, "request {i}");
        assert_eq!(remaining(&r), vec![(2 - i) as f64]);
        assert_eq!(r.now_ms, T0);
    }
    let r = s
        .quota
        .admit(admit_req("r3", vec![charge(&rpm, 1)]))
        .await
        .unwrap();
    assert_eq!(outcome(&r), Outcome::Limited);
    assert_eq!(r.refused, 0);
    // 3 per minute = one per 20 s.
    assert_eq!(r.wait_ms, 20_000);
    assert_eq!(r.views[0].reset_at_ms, T0 + 60_000);
}

#[tokio::test]
async fn admission_is_all_or_nothing_across_three_buckets() {
    let s = Setup::manual();
    let rpm = per_minute("key:bob:requests_per_minute", 10);
    let itpm = per_minute("pool:team:payments:input_tokens_per_minute", 1000);
    let tpd = day("key:bob:tokens_per_day", 5000, 0);
    // Leave 100 input tokens in the pool.
    let r = s
        .quota
        .admit(admit_req("fill", vec![charge(&itpm, 900)]))
        .await
        .unwrap();
    assert_eq!(outcome(&r), Outcome::Admitted);

    let ask = vec![charge(&rpm, 1), charge(&itpm, 500), charge(&tpd, 300)];
    let r = s.quota.admit(admit_req("big", ask)).await.unwrap();
    assert_eq!(outcome(&r), Outcome::Limited);
    assert_eq!(r.refused, 1, "the pool's input bucket refuses");
    // 400 missing at 1000/min = 24 s.
    assert_eq!(r.wait_ms, 24_000);
    assert_eq!(remaining(&r), vec![10.0, 100.0, 5000.0]);
    // Nothing was taken from the buckets that would have fit.
    let client = s.client();
    assert_eq!(inspect(&client, &rpm.id).await.unwrap().value, 10.0);
    assert_eq!(inspect(&client, &itpm.id).await.unwrap().value, 100.0);
    assert_eq!(inspect(&client, &tpd.id).await.unwrap().value, 0.0);

    // A request that fits all three takes from all three.
    let ask = vec![charge(&rpm, 1), charge(&itpm, 100), charge(&tpd, 300)];
    let r = s.quota.admit(admit_req("fits", ask)).await.unwrap();
    assert_eq!(outcome(&r), Outcome::Admitted);
    assert_eq!(remaining(&r), vec![9.0, 0.0, 4700.0]);
}

#[tokio::test]
async fn the_bucket_that_frees_up_last_is_named() {
    let s = Setup::manual();
    let rpm = per_minute("key:carol:requests_per_minute", 1);
    let tpd = day("key:carol:tokens_per_day", 100, 0);
    let r = s
        .quota
        .admit(admit_req("a", vec![charge(&rpm, 1), charge(&tpd, 100)]))
        .await
        .unwrap();
    assert_eq!(outcome(&r), Outcome::Admitted);
    let r = s
        .quota
        .admit(admit_req("b", vec![charge(&rpm, 1), charge(&tpd, 1)]))
        .await
        .unwrap();
    assert_eq!(outcome(&r), Outcome::Limited);
    // Both refuse; the day resets at midnight UTC, 12 h away, long after
    // the minute bucket's 60 s.
    assert_eq!(r.refused, 1);
    assert_eq!(r.wait_ms, 12 * 3_600_000);
}

#[tokio::test]
async fn refill_is_continuous_capped_and_keeps_fractions() {
    let s = Setup::manual();
    let rpm = per_minute("key:dave:requests_per_minute", 60);
    let take = |id: &str, n: i64| admit_req(id, vec![charge(&rpm, n)]);
    assert_eq!(
        outcome(&s.quota.admit(take("all", 60)).await.unwrap()),
        Outcome::Admitted
    );
    s.clock.advance(1_500);
    let r = s.quota.admit(take("look", 0)).await.unwrap();
    assert_eq!(remaining(&r), vec![1.5]);
    // Full again 58.5 s from now.
    assert_eq!(r.views[0].reset_at_ms, s.clock.now_ms() + 58_500);
    let r = s.quota.admit(take("one", 1)).await.unwrap();
    assert_eq!(remaining(&r), vec![0.5]);
    let r = s.quota.admit(take("two", 1)).await.unwrap();
    assert_eq!(outcome(&r), Outcome::Limited);
    assert_eq!(r.wait_ms, 500);
    // An hour later the bucket holds its capacity, not 3,600.
    s.clock.advance(3_600_000);
    let r = s.quota.admit(take("later", 0)).await.unwrap();
    assert_eq!(remaining(&r), vec![60.0]);

    // 7 per minute for 1 ms is 7/60000 of a token: stored with all 17
    // digits (Lua's tostring would keep 14 and drift).
    let odd = per_minute("key:dave:odd", 7);
    s.quota
        .admit(admit_req("odd-all", vec![charge(&odd, 7)]))
        .await
        .unwrap();
    s.clock.advance(1);
    let r = s
        .quota
        .admit(admit_req("odd-look", vec![charge(&odd, 0)]))
        .await
        .unwrap();
    assert_eq!(remaining(&r), vec![7.0 / 60_000.0]);
    assert_eq!(
        inspect(&s.client(), &odd.id).await.unwrap().value,
        7.0 / 60_000.0
    );
}

#[tokio::test]
async fn refills_on_the_redis_clock() {
    // Production scripts: Redis TIME, no test clock.
    let redis = RedisServer::start().unwrap();
    let quota = QuotaService::new(redis.client().unwrap(), Settings::default()).unwrap();
    // 6000 per minute = 100 per second.
    let rpm = per_minute("key:erin:tokens_per_minute", 6000);
    let r = quota
        .admit(admit_req("all", vec![charge(&rpm, 6000)]))
        .await
        .unwrap();
    assert_eq!(outcome(&r), Outcome::Admitted);
    let before = r.now_ms;
    let r = quota
        .admit(admit_req("next", vec![charge(&rpm, 1000)]))
        .await
        .unwrap();
    assert_eq!(outcome(&r), Outcome::Limited);
    // 1000 tokens take 10 s, less what refilled between the two calls.
    let elapsed = r.now_ms - before;
    assert_eq!(r.wait_ms, 10_000 - elapsed, "after {elapsed} ms");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let r = quota
        .admit(admit_req("look", vec![charge(&rpm, 0)]))
        .await
        .unwrap();
    let elapsed = (r.now_ms - before) as f64;
    // Redis TIME is the clock: 0.1 token per ms of it refilled.
    let got = r.views[0].remaining;
    assert!(elapsed >= 200.0, "Redis TIME advanced {elapsed} ms");
    assert!(
        (got - elapsed / 10.0).abs() < 1e-6,
        "{got} tokens after {elapsed} ms"
    );
}

#[tokio::test]
async fn settlement_debt_delays_the_next_request() {
    // docs/metering.md's worked example, on Redis.
    let s = Setup::manual();
    let otpm = per_minute("key:frank:output_tokens_per_minute", 600);
    let r = s
        .quota
        .admit(admit_req("req-1", vec![charge(&otpm, 500)]))
        .await
        .unwrap();
    assert_eq!(remaining(&r), vec![100.0]);
    s.clock.advance(4_000);
    // The response used 900 output tokens: 400 more than reserved.
    let done = s
        .quota
        .settle(settle_req("req-1", vec![charge(&otpm, 400)]))
        .await
        .unwrap();
    assert!(done.applied);
    let r = s
        .quota
        .admit(admit_req("req-2", vec![charge(&otpm, 100)]))
        .await
        .unwrap();
    assert_eq!(outcome(&r), Outcome::Limited);
    assert_eq!(remaining(&r), vec![-260.0]);
    assert_eq!(r.wait_ms, 36_000);
    s.clock.advance(36_000);
    let r = s
        .quota
        .admit(admit_req("req-3", vec![charge(&otpm, 100)]))
        .await
        .unwrap();
    assert_eq!(outcome(&r), Outcome::Admitted);
    assert_eq!(remaining(&r), vec![0.0]);
}

#[tokio::test]
async fn a_credit_never_lifts_a_bucket_above_capacity_nor_a_quota_below_zero() {
    let s = Setup::manual();
    let rpm = per_minute("key:gina:input_tokens_per_minute", 1000);
    let tpd = day("key:gina:tokens_per_day", 1000, 0);
    s.quota
        .admit(admit_req("r", vec![charge(&rpm, 100), charge(&tpd, 100)]))
        .await
        .unwrap();
    let done = s
        .quota
        .settle(settle_req(
            "r",
            vec![charge(&rpm, -5000), charge(&tpd, -5000)],
        ))
        .await
        .unwrap();
    assert!(done.applied);
    let client = s.client();
    assert_eq!(inspect(&client, &rpm.id).await.unwrap().value, 1000.0);
    assert_eq!(inspect(&client, &tpd.id).await.unwrap().value, 0.0);
}

#[tokio::test]
async fn settle_is_applied_once_per_request() {
    let s = Setup::manual();
    let tpm = per_minute("key:hank:output_tokens_per_minute", 1000);
    s.quota
        .admit(admit_req("r", vec![charge(&tpm, 100)]))
        .await
        .unwrap();
    let first = s
        .quota
        .settle(settle_req("r", vec![charge(&tpm, 50)]))
        .await
        .unwrap();
    let again = s
        .quota
        .settle(settle_req("r", vec![charge(&tpm, 50)]))
        .await
        .unwrap();
    assert!(first.applied);
    assert!(!again.applied, "a retried settle is a duplicate");
    assert_eq!(inspect(&s.client(), &tpm.id).await.unwrap().value, 850.0);
}

#[tokio::test]
async fn a_retried_admit_gets_the_first_answer_and_is_charged_once() {
    let s = Setup::manual();
    let rpm = per_minute("key:ivy:requests_per_minute", 10);
    let first = s
        .quota
        .admit(admit_req("r1", vec![charge(&rpm, 1)]))
        .await
        .unwrap();
    s.clock.advance(1_000);
    let again = s
        .quota
        .admit(admit_req("r1", vec![charge(&rpm, 1)]))
        .await
        .unwrap();
    assert_eq!(again, first);
    assert_eq!(again.now_ms, T0, "the first answer, not a new one");
    let next = s
        .quota
        .admit(admit_req("r2", vec![charge(&rpm, 1)]))
        .await
        .unwrap();
    // 9 after r1, +1/6 refilled in 1 s, -1 for r2: r1 was charged once.
    assert!((next.views[0].remaining - (8.0 + 1.0 / 6.0)).abs() < 1e-12);

    // A refusal is an answer too: its retry is refused the same way even
    // after the bucket refilled.
    let full = per_minute("key:ivy:tokens", 100);
    s.quota
        .admit(admit_req("t1", vec![charge(&full, 100)]))
        .await
        .unwrap();
    let refused = s
        .quota
        .admit(admit_req("t2", vec![charge(&full, 50)]))
        .await
        .unwrap();
    assert_eq!(outcome(&refused), Outcome::Limited);
    s.clock.advance(60_000);
    let retried = s
        .quota
        .admit(admit_req("t2", vec![charge(&full, 50)]))
        .await
        .unwrap();
    assert_eq!(retried, refused);
}

#[tokio::test]
async fn usd_budgets_stay_exact_in_micro_dollars() {
    let s = Setup::manual();
    // $123,456,789.012345 a month: 15 significant digits of micro-USD,
    // one more than Lua's tostring keeps.
    let budget = month("pool:org:budget_usd_per_month", 123_456_789_012_345, 0);
    let r = s
        .quota
        .admit(admit_req("r0", vec![charge(&budget, 1)]))
        .await
        .unwrap();
    assert_eq!(remaining(&r), vec![123_456_789_012_344.0]);
    // Odd amounts in and out; the sum must be exact to the micro-dollar.
    let mut used: i64 = 1;
    for (i, (reserve, actual)) in [(1_234_567, 1_000_001), (999_999, 2_345_678), (7, 3)]
        .into_iter()
        .enumerate()
    {
        let id = format!("r{}", i + 1);
        s.quota
            .admit(admit_req(&id, vec![charge(&budget, reserve)]))
            .await
            .unwrap();
        s.quota
            .settle(settle_req(&id, vec![charge(&budget, actual - reserve)]))
            .await
            .unwrap();
        used += actual;
    }
    let r = s
        .quota
        .admit(admit_req("look", vec![charge(&budget, 0)]))
        .await
        .unwrap();
    assert_eq!(remaining(&r), vec![(123_456_789_012_345 - used) as f64]);
    let stored = inspect(&s.client(), &budget.id).await.unwrap();
    assert_eq!(stored.value, used as f64);
    assert_eq!(used, 3_345_683);
}

#[tokio::test]
async fn a_calendar_quota_admits_while_something_is_left() {
    let s = Setup::manual();
    let tpd = day("key:jack:tokens_per_day", 1000, 0);
    let take = |id: &str, n: i64| admit_req(id, vec![charge(&tpd, n)]);
    assert_eq!(
        outcome(&s.quota.admit(take("a", 900)).await.unwrap()),
        Outcome::Admitted
    );
    // 100 left: a 500-token estimate still passes, the window overshoots.
    let r = s.quota.admit(take("b", 500)).await.unwrap();
    assert_eq!(outcome(&r), Outcome::Admitted);
    assert_eq!(remaining(&r), vec![-400.0]);
    let r = s.quota.admit(take("c", 1)).await.unwrap();
    assert_eq!(outcome(&r), Outcome::Limited);
    assert_eq!(r.wait_ms, 12 * 3_600_000, "until midnight UTC");
    assert_eq!(r.views[0].reset_at_ms, T0 + 12 * 3_600_000);
    // b used 99 of its 500: the credit leaves 1 token, enough to admit.
    s.quota
        .settle(settle_req("b", vec![charge(&tpd, -401)]))
        .await
        .unwrap();
    assert_eq!(
        outcome(&s.quota.admit(take("d", 1)).await.unwrap()),
        Outcome::Admitted
    );
}

#[tokio::test]
async fn a_revoked_key_is_refused_and_charged_nothing() {
    let s = Setup::manual();
    let rpm = per_minute("key:kim:requests_per_minute", 10);
    let first = s
        .quota
        .revoke(RevokeRequest {
            key_sha256: vec![7; 32],
        })
        .await
        .unwrap();
    assert_eq!(first.epoch, 1);
    let r = s
        .quota
        .admit(admit_req("r", vec![charge(&rpm, 1)]))
        .await
        .unwrap();
    assert_eq!(outcome(&r), Outcome::Revoked);
    assert!(r.views.is_empty());
    let mut other = admit_req("o", vec![charge(&rpm, 1)]);
    other.key_sha256 = vec![8; 32];
    let r = s.quota.admit(other).await.unwrap();
    assert_eq!(outcome(&r), Outcome::Admitted);
    assert_eq!(remaining(&r), vec![9.0], "the revoked request took nothing");
    // Revoking again keeps the first epoch.
    let again = s
        .quota
        .revoke(RevokeRequest {
            key_sha256: vec![7; 32],
        })
        .await
        .unwrap();
    assert_eq!(again.epoch, 1);
}

#[tokio::test]
async fn invalid_requests_are_refused_with_the_field_named() {
    let s = Setup::manual();
    let rpm = per_minute("key:lee:requests_per_minute", 10);
    let cases: Vec<(tollgate_quota::tollgate_proto::quota::v1::AdmitRequest, &str)> = vec![
        (
            admit_req("r", vec![charge(&rpm, 11)]),
            "charges[0]: amount 11 exceeds the capacity 10 of per-minute bucket 'key:lee:requests_per_minute' (cap reservations at the capacity)",
        ),
        (
            admit_req("r", vec![charge(&rpm, -1)]),
            "charges[0]: amount -1 must be between 0 and 2^53",
        ),
        (
            admit_req("r", vec![charge(&rpm, 1), charge(&rpm, 1)]),
            "charges[1].bucket 'key:lee:requests_per_minute' appears twice in one call",
        ),
        (
            admit_req("", vec![charge(&rpm, 1)]),
            "request_id is empty",
        ),
        (
            admit_req(
                "r",
                vec![charge(
                    &Bucket {
                        refill: 0,
                        ..rpm.clone()
                    },
                    1,
                )],
            ),
            "charges[0].bucket 'key:lee:requests_per_minute': refill must be PER_MINUTE, DAY or MONTH, got 0",
        ),
        (
            admit_req("r", vec![charge(&Bucket { limit: 0, ..rpm.clone() }, 0)]),
            "charges[0].bucket 'key:lee:requests_per_minute': limit 0 must be between 1 and 2^53",
        ),
        (
            admit_req("r", vec![charge(&day("d", 5, 1500), 1)]),
            "charges[0].bucket 'd': utc_offset_min 1500 is more than a day from UTC",
        ),
        (
            admit_req(
                "r",
                vec![tollgate_quota::tollgate_proto::quota::v1::Charge {
                    bucket: None,
                    amount: 1,
                }],
            ),
            "charges[0].bucket is missing",
        ),
        (
            tollgate_quota::tollgate_proto::quota::v1::AdmitRequest {
                key_sha256: vec![1; 5],
                ..admit_req("r", vec![])
            },
            "key_sha256 must be the 32-byte SHA-256 of the virtual key, got 5 bytes",
        ),
    ];
    for (request, message) in cases {
        let err = s.quota.admit(request).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert_eq!(err.message(), message);
    }
    let err = s
        .quota
        .settle(settle_req(
            "r",
            vec![charge(
                &Bucket {
                    id: String::new(),
                    ..rpm
                },
                1,
            )],
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert_eq!(err.message(), "deltas[0].bucket.id is empty");
    let err = s
        .quota
        .revoke(RevokeRequest { key_sha256: vec![] })
        .await
        .unwrap_err();
    assert_eq!(
        err.message(),
        "key_sha256 must be the 32-byte SHA-256 of the virtual key, got 0 bytes"
    );
}
