//! Calendar windows: the Lua civil-date arithmetic against the Rust one in
//! core/src/time.rs, and quotas resetting at the local boundary.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use common::*;
use rand::{Rng, SeedableRng};
use tollgate_core::time::{day_window, month_window, parse_rfc3339};
use tollgate_quota::testing::lua_windows;
use tollgate_quota::tollgate_proto::quota::v1::admit_response::Outcome;
use tollgate_quota::tollgate_proto::quota::v1::Refill;

fn ms(rfc3339: &str) -> i64 {
    parse_rfc3339(rfc3339).unwrap() as i64
}

#[tokio::test]
async fn lua_windows_match_core_time_for_many_times_and_offsets() {
    let s = Setup::manual();
    let mut times: Vec<i64> = Vec::new();
    // Every month boundary from 1999 to 2101 (2000 is a leap year, 2100 is
    // not), its last and first milliseconds, and the days around it.
    for year in 1999..=2101 {
        for month in 1..=12 {
            let start = ms(&format!("{year:04}-{month:02}-01T00:00:00Z"));
            for delta in [-86_400_000, -3_600_001, -1, 0, 1, 3_600_000, 86_400_000] {
                times.push(start + delta);
            }
        }
    }
    for leap in [
        "2000-02-29",
        "2024-02-29",
        "2028-02-29",
        "2100-02-28",
        "2100-03-01",
    ] {
        let day = ms(leap);
        times.extend([day - 1, day, day + 43_200_000, day + 86_399_999]);
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(20_260_310);
    for _ in 0..4000 {
        times.push(rng.random_range(2 * 86_400_000..ms("2200-01-01")));
    }
    let offsets = [
        -720, -600, -330, -60, -1, 0, 1, 60, 120, 330, 345, 600, 780, 840,
    ];

    let mut queries = Vec::new();
    for (i, t) in times.iter().enumerate() {
        // Each time in both kinds, with two offsets: a fixed rotation over
        // the list and a random one.
        for off in [offsets[i % offsets.len()], rng.random_range(-840..=840)] {
            queries.push((Refill::Day, *t, off));
            queries.push((Refill::Month, *t, off));
        }
    }
    let client = s.client();
    let mut checked = 0;
    for chunk in queries.chunks(2000) {
        let got = lua_windows(&client, chunk).await.unwrap();
        assert_eq!(got.len(), chunk.len());
        for ((refill, t, off), (start, end)) in chunk.iter().zip(got) {
            let w = match refill {
                Refill::Day => day_window(*t as u64, *off),
                _ => month_window(*t as u64, *off),
            };
            assert_eq!(
                (start, end),
                (w.start as i64, w.end as i64),
                "{refill:?} window of {t} at offset {off}"
            );
            checked += 1;
        }
    }
    assert!(checked > 20_000, "{checked} windows checked");
}

#[tokio::test]
async fn a_day_quota_resets_at_local_midnight() {
    let s = Setup::manual();
    // UTC+02:00: 12:00Z is 14:00 local; the day ends at 22:00Z.
    let tpd = day("key:mia:tokens_per_day", 1000, 120);
    let take = |id: &str, n: i64| admit_req(id, vec![charge(&tpd, n)]);
    s.quota.admit(take("a", 1000)).await.unwrap();
    let r = s.quota.admit(take("b", 1)).await.unwrap();
    assert_eq!(outcome(&r), Outcome::Limited);
    assert_eq!(r.wait_ms, 10 * 3_600_000);
    assert_eq!(r.views[0].reset_at_ms, ms("2026-03-10T22:00:00Z"));

    s.clock.set(ms("2026-03-10T22:00:00Z") - 1);
    let r = s.quota.admit(take("c", 1)).await.unwrap();
    assert_eq!(outcome(&r), Outcome::Limited);
    assert_eq!(r.wait_ms, 1);

    s.clock.set(ms("2026-03-10T22:00:00Z"));
    let r = s.quota.admit(take("d", 300)).await.unwrap();
    assert_eq!(outcome(&r), Outcome::Admitted);
    assert_eq!(remaining(&r), vec![700.0]);
    assert_eq!(r.views[0].reset_at_ms, ms("2026-03-11T22:00:00Z"));
}

#[tokio::test]
async fn a_month_budget_resets_at_the_end_of_a_leap_february() {
    let s = Setup::manual();
    // 23:00 on 29 February 2028 at UTC+02:00; March starts at 22:00Z.
    s.clock.set(ms("2028-02-29T21:00:00Z"));
    let budget = month("pool:org:budget_usd_per_month", 5_000_000, 120);
    let take = |id: &str, n: i64| admit_req(id, vec![charge(&budget, n)]);
    s.quota.admit(take("a", 5_000_000)).await.unwrap();
    let r = s.quota.admit(take("b", 1)).await.unwrap();
    assert_eq!(outcome(&r), Outcome::Limited);
    assert_eq!(r.wait_ms, 3_600_000);
    s.clock.set(ms("2028-02-29T22:00:00Z"));
    let r = s.quota.admit(take("c", 1_000_000)).await.unwrap();
    assert_eq!(outcome(&r), Outcome::Admitted);
    assert_eq!(remaining(&r), vec![4_000_000.0]);
    // March has 31 days.
    assert_eq!(r.views[0].reset_at_ms, ms("2028-03-31T22:00:00Z"));
}
