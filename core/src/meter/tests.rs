//! Bucket behaviour on the in-memory store with Envoy's shared-data
//! semantics, with and without injected CAS conflicts.
#![allow(clippy::unwrap_used)]

use super::store::{self, Contention, Step, CREATE_CAS, MAX_ATTEMPTS};
use super::*;
use crate::testing::MemStore;

fn bucket(metric: Metric, limit: f64) -> Bucket {
    Bucket::new("key:k".to_string(), metric, limit)
}

/// A bucket's stored value, from its slot of its scope's record.
fn value(s: &MemStore, b: &Bucket) -> f64 {
    store::read(s, b.store_key()).unwrap().slot(b.metric).value
}

/// A record whose requests-per-minute slot holds `value`.
fn record(value: f64) -> record::Record {
    let mut r = record::Record::default();
    r.slot_mut(Metric::Requests)
        .unwrap()
        .set_cell(cell::Cell { value, stamp: 0 });
    r
}

fn clock(now: u64) -> Clock {
    Clock {
        now,
        utc_offset_min: 0,
    }
}

fn one_request() -> Demand {
    Demand {
        requests: 1.0,
        ..Default::default()
    }
}

#[test]
fn admits_up_to_the_limit_then_names_the_bucket() {
    let s = MemStore::new();
    let b = [bucket(Metric::Requests, 2.0)];
    assert!(admit(&*s, &b, &one_request(), clock(0)).is_ok());
    assert!(admit(&*s, &b, &one_request(), clock(0)).is_ok());
    match admit(&*s, &b, &one_request(), clock(0)) {
        Err(Denial::Limited {
            bucket, wait_ms, ..
        }) => {
            assert_eq!(bucket.label(), "key:k:requests_per_minute");
            assert_eq!(wait_ms, 30_000); // 2/min: one request every 30 s
        }
        other => panic!("expected a denial, got {other:?}"),
    }
    // 30 s later exactly one more fits.
    assert!(admit(&*s, &b, &one_request(), clock(30_000)).is_ok());
    assert!(admit(&*s, &b, &one_request(), clock(30_000)).is_err());
}

#[test]
fn most_restrictive_bucket_decides_and_nothing_is_reserved_on_denial() {
    let s = MemStore::new();
    let key = bucket(Metric::OutputTokens, 1000.0);
    let pool = Bucket::new("pool:team:payments".into(), Metric::OutputTokens, 100.0);
    let demand = Demand {
        requests: 1.0,
        output_tokens: 500.0,
        ..Default::default()
    };
    // 500 > pool capacity 100: capped to 100, fits the full pool once.
    let a = admit(&*s, &[key.clone(), pool.clone()], &demand, clock(0)).unwrap();
    assert_eq!(a.reservations[1].amount, 100.0);
    match admit(&*s, &[key.clone(), pool.clone()], &demand, clock(0)) {
        Err(Denial::Limited { bucket, .. }) => assert_eq!(bucket.scope, "pool:team:payments"),
        other => panic!("expected the pool to refuse, got {other:?}"),
    }
    // The key bucket kept only the first reservation.
    assert_eq!(value(&s, &key), 500.0);
}

#[test]
fn settlement_credits_unused_and_debits_overrun_into_debt() {
    let s = MemStore::new();
    let b = [bucket(Metric::OutputTokens, 600.0)];
    let reserved = Demand {
        output_tokens: 500.0,
        ..Default::default()
    };
    let a = admit(&*s, &b, &reserved, clock(0)).unwrap();
    settle(
        &*s,
        &a.reservations,
        &Demand {
            output_tokens: 100.0,
            ..Default::default()
        },
        clock(0),
    )
    .unwrap();
    assert_eq!(value(&s, &b[0]), 500.0);
    let a = admit(&*s, &b, &reserved, clock(0)).unwrap();
    settle(
        &*s,
        &a.reservations,
        &Demand {
            output_tokens: 900.0,
            ..Default::default()
        },
        clock(0),
    )
    .unwrap();
    assert_eq!(value(&s, &b[0]), -400.0);
    // In debt: the next request waits until 401 tokens refilled at 10/s.
    match admit(
        &*s,
        &b,
        &Demand {
            output_tokens: 1.0,
            ..Default::default()
        },
        clock(0),
    ) {
        Err(Denial::Limited { wait_ms, .. }) => assert_eq!(wait_ms, 40_100),
        other => panic!("expected debt to deny, got {other:?}"),
    }
}

#[test]
fn cas_conflicts_are_retried_and_no_debit_is_lost() {
    let s = MemStore::new();
    let b = [bucket(Metric::Requests, 100.0)];
    admit(&*s, &b, &one_request(), clock(0)).unwrap();
    s.inject_conflicts(3);
    admit(&*s, &b, &one_request(), clock(0)).unwrap();
    assert_eq!(s.mismatches.get(), 3);
    assert_eq!(value(&s, &b[0]), 98.0);
}

#[test]
fn exhausted_cas_retries_deny_with_contention_and_release_earlier_reservations() {
    let s = MemStore::new();
    // Two scopes, two records: the key's, then a pool's.
    let b = [
        bucket(Metric::Requests, 100.0),
        Bucket::new("pool:team:p".into(), Metric::InputTokens, 1000.0),
    ];
    let d = Demand {
        requests: 1.0,
        input_tokens: 10.0,
        ..Default::default()
    };
    admit(&*s, &b, &d, clock(0)).unwrap();
    // First bucket's write succeeds, then every attempt on the second loses.
    let s2 = s.clone();
    let r = {
        // Conflicts start after the first bucket's successful write.
        let first = store::update(&*s2, b[0].store_key(), |r| Step::Write(r.unwrap(), ()));
        assert!(first.is_ok());
        s.inject_conflicts(MAX_ATTEMPTS * 2);
        admit(&*s, &b, &d, clock(0))
    };
    assert_eq!(r, Err(Denial::Contention));
}

#[test]
fn creation_race_is_closed_by_the_impossible_cas() {
    let s = MemStore::new();
    // Another worker creates the key between our read (missing) and our write.
    let mut first = true;
    let r: Result<(), Contention> = store::update(&*s, "k", |cell| {
        if first {
            first = false;
            assert!(cell.is_none());
            s.set("k", &record(5.0).encode(), 0).unwrap();
            return Step::Write(record(9.0), ());
        }
        // Second attempt sees the other worker's value instead of clobbering it.
        assert_eq!(cell.unwrap().slot(Metric::Requests).value, 5.0);
        Step::Write(record(4.0), ())
    });
    assert!(r.is_ok());
    assert_eq!(
        store::read(&*s, "k").unwrap().slot(Metric::Requests).value,
        4.0
    );
    assert_eq!(CREATE_CAS, u32::MAX);
}

#[test]
fn daily_quota_admits_while_anything_is_left_and_resets_at_midnight() {
    let s = MemStore::new();
    let b = [bucket(Metric::TokensPerDay, 1000.0)];
    let d = Demand {
        all_tokens: 800.0,
        ..Default::default()
    };
    let a = admit(&*s, &b, &d, clock(1000)).unwrap();
    settle(
        &*s,
        &a.reservations,
        &Demand {
            all_tokens: 1200.0,
            ..Default::default()
        },
        clock(2000),
    )
    .unwrap();
    match admit(&*s, &b, &d, clock(3000)) {
        Err(Denial::Limited {
            bucket, wait_ms, ..
        }) => {
            assert!(bucket.metric.is_quota());
            assert_eq!(wait_ms, 86_400_000 - 3000);
        }
        other => panic!("expected the quota to be spent, got {other:?}"),
    }
    assert!(admit(&*s, &b, &d, clock(86_400_000)).is_ok());
}

#[test]
fn lowering_a_limit_clamps_the_stored_balance() {
    let s = MemStore::new();
    let high = [bucket(Metric::Requests, 100.0)];
    admit(&*s, &high, &one_request(), clock(0)).unwrap(); // 99 left
    let low = [bucket(Metric::Requests, 2.0)];
    let a = admit(&*s, &low, &one_request(), clock(0)).unwrap();
    assert_eq!(a.states[0].view.remaining, 1.0);
}

#[test]
fn balances_left_by_version_1_carry_over_the_upgrade() {
    let s = MemStore::new();
    // Version 1 kept one 17-byte cell per bucket: half a request left.
    let v1 = cell::Cell {
        value: 0.5,
        stamp: 0,
    };
    s.set("tollgate/1/key:k/requests_per_minute", &v1.encode(), 0)
        .unwrap();
    let b = [bucket(Metric::Requests, 2.0)];
    match admit(&*s, &b, &one_request(), clock(0)) {
        Err(Denial::Limited { wait_ms, .. }) => assert_eq!(wait_ms, 15_000),
        other => panic!("the old balance applies, got {other:?}"),
    }
    assert!(admit(&*s, &b, &one_request(), clock(15_000)).is_ok());
    assert_eq!(value(&s, &b[0]), 0.0);
    assert!(store::read(&*s, "tollgate/2/key:k").is_some());
}

#[test]
fn a_reserve_keeps_the_last_fraction_of_a_bucket_for_higher_priorities() {
    use crate::policy::leaf::Priority;
    let s = MemStore::new();
    let mut limit = crate::policy::Limit::new(10.0);
    limit.reserve = Some(crate::policy::Reserve {
        fraction: 0.2,
        for_priority: Priority(Priority::INTERACTIVE),
    });
    let mut batch = Bucket::with_limit("pool:team:t".into(), Metric::Requests, limit);
    batch.priority = Priority(Priority::BATCH);
    let mut interactive = batch.clone();
    interactive.priority = Priority(Priority::INTERACTIVE);
    for _ in 0..8 {
        admit(&*s, std::slice::from_ref(&batch), &one_request(), clock(0)).unwrap();
    }
    match admit(&*s, std::slice::from_ref(&batch), &one_request(), clock(0)) {
        // 2 left, both reserved: one more unit above the reserve comes in
        // 6 s at 10 a minute.
        Err(Denial::Limited {
            bucket, wait_ms, ..
        }) => {
            assert_eq!(wait_ms, 6_000);
            assert!(bucket.held_back().is_some());
        }
        other => panic!("batch traffic stops at the reserve, got {other:?}"),
    }
    for _ in 0..2 {
        admit(
            &*s,
            std::slice::from_ref(&interactive),
            &one_request(),
            clock(0),
        )
        .unwrap();
    }
    assert!(
        admit(
            &*s,
            std::slice::from_ref(&interactive),
            &one_request(),
            clock(0)
        )
        .is_err(),
        "and interactive traffic stops at the limit"
    );
}
