//! Shared by the quota tests: a Redis per test, request builders.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use tollgate_quota::testing::{ManualClock, RedisServer};
use tollgate_quota::tollgate_proto::quota::v1::{
    admit_response::Outcome, AdmitRequest, AdmitResponse, Bucket, BucketSync, Charge, Refill,
    SettleRequest, SyncRequest,
};
use tollgate_quota::{QuotaService, Settings};

/// 2026-03-10T12:00:00Z: a Tuesday in the middle of a month.
pub const T0: i64 = 1_773_144_000_000;

pub struct Setup {
    pub redis: RedisServer,
    pub clock: ManualClock,
    pub quota: QuotaService,
}

impl Setup {
    /// A Redis, and a service on it whose scripts read `clock`.
    pub fn manual() -> Setup {
        Setup::manual_with(Settings::default())
    }

    pub fn manual_with(settings: Settings) -> Setup {
        let redis = RedisServer::start().unwrap();
        let clock = ManualClock::new(T0);
        let quota =
            QuotaService::with_manual_clock(redis.client().unwrap(), settings, clock.clone())
                .unwrap();
        Setup {
            redis,
            clock,
            quota,
        }
    }

    /// Another service instance on the same Redis and clock (a second quota
    /// replica).
    pub fn another(&self) -> QuotaService {
        QuotaService::with_manual_clock(
            self.redis.client().unwrap(),
            Settings::default(),
            self.clock.clone(),
        )
        .unwrap()
    }

    pub fn client(&self) -> redis::Client {
        self.redis.client().unwrap()
    }
}

pub fn per_minute(id: &str, limit: i64) -> Bucket {
    Bucket {
        id: id.into(),
        refill: Refill::PerMinute.into(),
        limit,
        utc_offset_min: 0,
    }
}

pub fn day(id: &str, limit: i64, utc_offset_min: i32) -> Bucket {
    Bucket {
        id: id.into(),
        refill: Refill::Day.into(),
        limit,
        utc_offset_min,
    }
}

pub fn month(id: &str, limit: i64, utc_offset_min: i32) -> Bucket {
    Bucket {
        id: id.into(),
        refill: Refill::Month.into(),
        limit,
        utc_offset_min,
    }
}

pub fn charge(bucket: &Bucket, amount: i64) -> Charge {
    Charge {
        bucket: Some(bucket.clone()),
        amount,
    }
}

pub fn admit_req(id: &str, charges: Vec<Charge>) -> AdmitRequest {
    AdmitRequest {
        request_id: id.into(),
        charges,
        key_sha256: vec![7; 32],
    }
}

pub fn settle_req(id: &str, deltas: Vec<Charge>) -> SettleRequest {
    SettleRequest {
        request_id: id.into(),
        deltas,
    }
}

pub fn bsync(bucket: &Bucket, seq: u64, consumed: i64, want: i64) -> BucketSync {
    BucketSync {
        bucket: Some(bucket.clone()),
        seq,
        consumed,
        want,
        window: 0,
    }
}

pub fn sync_req(replica: &str, buckets: Vec<BucketSync>) -> SyncRequest {
    SyncRequest {
        replica: replica.into(),
        buckets,
        revocation_epoch: 0,
    }
}

pub fn outcome(r: &AdmitResponse) -> Outcome {
    Outcome::try_from(r.outcome).unwrap()
}

pub fn remaining(r: &AdmitResponse) -> Vec<f64> {
    r.views.iter().map(|v| v.remaining).collect()
}
