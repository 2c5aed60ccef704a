//! Admit and Settle against a real redis-server.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use common::*;
use tollgate_quota::tollgate_proto::quota::v1::admit_response::Outcome;

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
}
