//! `tollgate quota`: the shared-limit service between every Envoy replica's
//! filter and Redis, so N replicas meter one set of buckets, quotas and
//! budgets instead of N. The contract is `tollgate.quota.v1`
//! (`proto/tollgate/quota/v1/quota.proto`); the design is `docs/scale-out.md`.
//!
//! Layout:
//! - `service.rs`: [`QuotaService`] (Admit, Settle, Sync, Revoke as plain
//!   async methods: validation, one script call or pipeline, replies), its
//!   tonic binding and [`serve`].
//! - `scripts.rs` and `lua/`: the Lua scripts holding all bucket arithmetic,
//!   with Redis `TIME` as the one clock, and the Redis key layout.
//! - [`testing`]: a throwaway `redis-server` per test, a manual clock,
//!   read-only views of stored buckets.
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! use tollgate_quota::{serve, QuotaService, Settings};
//!
//! let redis = redis::Client::open("redis://127.0.0.1:6379/")?;
//! let service = QuotaService::new(redis, Settings::default())?;
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:50061").await?;
//! serve(listener, service, async {
//!     let _ = tokio::signal::ctrl_c().await;
//! })
//! .await?;
//! # Ok(())
//! # }
//! ```

pub mod local_redis;
mod scripts;
mod service;
pub mod testing;

pub use service::{serve, Error, QuotaService, Settings};
pub use tollgate_proto;

/// The generated tonic server and client of `tollgate.quota.v1.Quota`
/// (messages from [`tollgate_proto::quota::v1`]).
pub mod grpc {
    #![allow(
        clippy::all,
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        clippy::indexing_slicing
    )]
    include!(concat!(env!("OUT_DIR"), "/tollgate.quota.v1.rs"));
}
