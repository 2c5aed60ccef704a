//! The Lua scripts and the Redis keys they touch.
//!
//! Each script is one text: a clock prelude (Redis `TIME` in production, an
//! argument in tests), the shared helpers of `lua/common.lua`, and its body.
//! The texts are fixed at build time, so their SHA-1s are too: a quota
//! replica's only script state is that it may have to `SCRIPT LOAD` them
//! again after Redis lost its script cache.

/// A script's text and SHA-1 (what EVALSHA names it by).
pub(crate) struct Lua {
    pub code: String,
    pub sha: String,
}

const CLOCK_REDIS: &str = include_str!("lua/clock_redis.lua");
const CLOCK_MANUAL: &str = include_str!("lua/clock_manual.lua");
const COMMON: &str = include_str!("lua/common.lua");

/// Where the scripts read the time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ClockSource {
    /// Redis `TIME`: the one clock of every quota replica (production).
    Redis,
    /// `ARGV[1]`, set by a test's [`crate::testing::ManualClock`].
    Manual,
}

fn compose(clock: ClockSource, body: &str) -> Lua {
    let prelude = match clock {
        ClockSource::Redis => CLOCK_REDIS,
        ClockSource::Manual => CLOCK_MANUAL,
    };
    let code = format!("{prelude}\n{COMMON}\n{body}");
    let sha = redis::Script::new(&code).get_hash().to_string();
    Lua { code, sha }
}

pub(crate) struct Scripts {
    pub admit: Lua,
    pub settle: Lua,
    pub sync_replica: Lua,
    pub sync_bucket: Lua,
    pub revoke: Lua,
    pub reseed: Lua,
}

impl Scripts {
    pub fn new(clock: ClockSource) -> Scripts {
        Scripts {
            admit: compose(clock, include_str!("lua/admit.lua")),
            settle: compose(clock, include_str!("lua/settle.lua")),
            sync_replica: compose(clock, include_str!("lua/sync_replica.lua")),
            sync_bucket: compose(clock, include_str!("lua/sync_bucket.lua")),
            revoke: compose(clock, include_str!("lua/revoke.lua")),
            reseed: compose(clock, include_str!("lua/reseed.lua")),
        }
    }

    pub fn all(&self) -> [&Lua; 6] {
        [
            &self.admit,
            &self.settle,
            &self.sync_replica,
            &self.sync_bucket,
            &self.revoke,
            &self.reseed,
        ]
    }
}

/// Test-only scripts (see [`crate::testing`]): the window computation and a
/// read-only view of a bucket. Built on the manual clock, which they ignore.
pub(crate) fn window_script() -> Lua {
    compose(ClockSource::Manual, include_str!("lua/window.lua"))
}

pub(crate) fn inspect_script() -> Lua {
    compose(ClockSource::Manual, include_str!("lua/inspect.lua"))
}

/// Redis keys. Every key carries the `{tg}` hash tag, so multi-key scripts
/// find all their keys in one slot on Redis Cluster too.
pub(crate) mod keys {
    pub const REPLICAS: &str = "tg:{tg}:replicas";
    pub const REVOKED: &str = "tg:{tg}:revoked";
    pub const EPOCH: &str = "tg:{tg}:epoch";

    /// A bucket's state hash.
    pub fn bucket(id: &str) -> String {
        format!("tg:{{tg}}:b:{id}")
    }

    /// A bucket's lease records, one field per replica.
    pub fn leases(id: &str) -> String {
        format!("tg:{{tg}}:r:{id}")
    }

    /// The first answer to an Admit, for its retries.
    pub fn admitted(request_id: &str) -> String {
        format!("tg:{{tg}}:a:{request_id}")
    }

    /// Marks a settled request.
    pub fn settled(request_id: &str) -> String {
        format!("tg:{{tg}}:s:{request_id}")
    }
}
