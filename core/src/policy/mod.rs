//! The policy: who may call which models, within which limits.
//!
//! Loading has two phases: `raw` mirrors the JSON with serde, `compile` checks
//! it and builds the runtime [`Policy`] (hash index of keys, compiled model
//! patterns, resolved limits, pool membership). The filter's `on_configure`
//! and the CLI's `policy check` run the same code.

mod compile;
pub mod error;
pub mod leaf;
pub mod limits;
pub mod pattern;
pub mod raw;
pub mod schema;
pub mod table;

pub use crate::price::Price;
pub use compile::{base_of, compile, compile_checked};
pub use error::{PolicyError, PolicyReport};
pub use limits::{Alerts, Limit, Limits, OnExhausted, Reserve, StoreFailure};
pub use pattern::{Glob, ModelPattern};
pub use table::{KeyTable, TableError, TableState};

use crate::host::SharedStore;
use hashbrown::HashMap;
use std::sync::Arc;

/// Identity attributes that name pools: `team: payments` draws from
/// `team:payments`.
pub const POOL_KINDS: [&str; 5] = ["team", "project", "user", "app", "agent"];

/// A compiled, validated policy. Immutable; a reload builds a new one.
#[derive(Debug, Default)]
pub struct Policy {
    /// Every caller: the virtual keys (the first `key_count`), then the
    /// identities in file order. Both are metered, limited and audited
    /// alike; a request's caller is its position here (then in the key
    /// table's compiled keys, when the keys come from one).
    keys: Vec<Arc<Key>>,
    key_count: usize,
    /// How each identity is recognised, in file order (first match wins).
    identities: Vec<MeshIdentity>,
    /// Every secret's hash, current and previous, to the key it opens.
    index: HashMap<[u8; 32], Secret>,
    pub pools: Vec<Pool>,
    /// The provider's own limits by model group, in name order.
    pub provider_pools: Vec<ProviderPool>,
    /// Pool templates keyed by a request header, in name order.
    pub session_pools: Vec<SessionPool>,
    pub groups: Vec<String>,
    prices: Vec<(ModelPattern, Price)>,
    pub settings: Settings,
    /// With a key service: where the keys come from ([`table`]); `keys`
    /// then holds the identities only.
    table: Option<KeyTable>,
}

/// Where the hash of a presented virtual key leads: its key, and for a
/// previous secret (kept by a rotation for a grace period) the instant it
/// stops opening that key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Secret {
    /// Position in [`Policy::keys`].
    pub key: usize,
    /// `None` for the key's current secret.
    pub not_after_ms: Option<u64>,
}

/// Identity attributes of a key, carried into every audit record.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Identity {
    pub user: Option<String>,
    pub team: Option<String>,
    pub project: Option<String>,
    pub app: Option<String>,
    pub agent: Option<String>,
    pub environment: Option<String>,
    pub cost_center: Option<String>,
    pub groups: Vec<String>,
}

/// One virtual key, with everything resolved: its own limits (key, else most
/// restrictive group value, else defaults), its allowlist, its pools.
#[derive(Debug, Clone)]
pub struct Key {
    pub id: String,
    pub identity: Identity,
    pub limits: Limits,
    pub models: ModelSet,
    /// Indexes into [`Policy::pools`] of every pool this key draws from.
    pub pools: Vec<usize>,
    pub revoked: bool,
    pub expires_at_ms: Option<u64>,
    /// `not_after` of each previous secret, in file order: the key's
    /// holders may still present one of those until then.
    pub previous_not_after_ms: Vec<u64>,
    /// Reserved headroom (`reserve`) is kept for requests at or above a
    /// priority.
    pub priority: leaf::Priority,
}

/// A caller recognised by the mesh rather than by a virtual key.
#[derive(Debug, Clone)]
pub struct MeshIdentity {
    /// Position of its caller in the policy (see [`Policy::key`]).
    pub caller: usize,
    pub matcher: MeshMatch,
}

/// How an identity is recognised.
#[derive(Debug, Clone)]
pub enum MeshMatch {
    /// The mTLS peer certificate's URI SAN.
    Spiffe(Glob),
    /// Claims of a verified JWT: every (claim, pattern) must match.
    Jwt(Vec<(String, Glob)>),
}

/// A shared pool (`team:payments`): every key whose attribute matches draws
/// from its buckets too.
#[derive(Debug, Clone)]
pub struct Pool {
    pub name: String,
    pub limits: Limits,
}

/// A provider's own limit on a group of its models
/// (`provider:anthropic:claude-sonnet-4`): every request for one of its
/// models draws from its buckets, whatever the key. The name is the
/// buckets' scope.
#[derive(Debug, Clone)]
pub struct ProviderPool {
    pub name: String,
    pub models: ModelSet,
    pub limits: Limits,
}

/// A pool template keyed by a request header (`session_pools.<name>`):
/// each distinct value of `header`, per key, draws from its own buckets of
/// `limits`; this Envoy tracks at most `max_tracked` values at once
/// (`crate::meter::session`).
#[derive(Debug, Clone)]
pub struct SessionPool {
    pub name: String,
    /// Lower case, as Envoy hands header names over.
    pub header: String,
    pub limits: Limits,
    pub max_tracked: u32,
}

/// `max_tracked` when a session pool does not say.
pub const DEFAULT_MAX_TRACKED: u32 = 10_000;

impl ProviderPool {
    /// The group as metrics name it: the name without `provider:`
    /// (`anthropic:claude-sonnet-4`).
    pub fn group(&self) -> &str {
        self.name.strip_prefix("provider:").unwrap_or(&self.name)
    }
}

/// The models a key may call.
#[derive(Debug, Clone, Default)]
pub struct ModelSet {
    patterns: Vec<ModelPattern>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum UnknownRoutes {
    #[default]
    Deny,
    Pass,
}

#[derive(Debug, Clone, Default)]
pub struct Settings {
    pub unknown_routes: UnknownRoutes,
    pub cache_reads_count_toward_input_limit: bool,
    /// Minutes east of UTC for daily and monthly windows.
    pub utc_offset_minutes: i32,
    pub time_zone: String,
    pub default_price: Option<Price>,
    pub hold_request_headers: bool,
}

impl Policy {
    /// O(1) lookup by the SHA-256 of a virtual key, current or previous,
    /// among the keys compiled (inline, or loaded from the key table).
    pub fn lookup(&self, key_sha256: &[u8; 32]) -> Option<Arc<Key>> {
        self.lookup_secret(key_sha256).and_then(|s| self.key(s.key))
    }

    /// The secret a hash is, with its key's position in [`Policy::keys`]
    /// (for per-request state that must not borrow the policy), among the
    /// keys compiled.
    pub fn lookup_secret(&self, key_sha256: &[u8; 32]) -> Option<Secret> {
        match self.index.get(key_sha256) {
            Some(s) => Some(*s),
            None => self.table.as_ref()?.cached(key_sha256),
        }
    }

    /// [`Policy::lookup_secret`], and with a key table, the key's record
    /// read from shared data and compiled the first time it is presented.
    pub fn resolve(
        &self,
        store: &impl SharedStore,
        key_sha256: &[u8; 32],
    ) -> Result<Option<Secret>, TableError> {
        if let Some(secret) = self.lookup_secret(key_sha256) {
            return Ok(Some(secret));
        }
        match &self.table {
            Some(table) => table.load(store, key_sha256, self.keys.len()),
            None => Ok(None),
        }
    }

    /// The hashes of every secret of the key at `index`: the current one
    /// first, then the previous ones by `not_after`. A scan of the whole
    /// index, for tools (`tollgate key show`), not for requests.
    pub fn secrets_of(&self, index: usize) -> Vec<([u8; 32], Secret)> {
        let mut out: Vec<([u8; 32], Secret)> = self
            .index
            .iter()
            .filter(|(_, s)| s.key == index)
            .map(|(h, s)| (*h, *s))
            .collect();
        // `None` (the current secret) sorts before every `Some`.
        out.sort_by_key(|(h, s)| (s.not_after_ms, *h));
        out
    }

    pub fn key(&self, index: usize) -> Option<Arc<Key>> {
        match self.keys.get(index) {
            Some(k) => Some(k.clone()),
            None => self.table.as_ref()?.loaded(index - self.keys.len()),
        }
    }

    /// The virtual keys (not the identities) of an inline policy.
    pub fn keys(&self) -> &[Arc<Key>] {
        self.keys.get(..self.key_count).unwrap_or_default()
    }

    /// Every caller of an inline policy, keys then identities.
    pub fn callers(&self) -> &[Arc<Key>] {
        &self.keys
    }

    /// The identities, in the order they are tried.
    pub fn identities(&self) -> &[MeshIdentity] {
        &self.identities
    }

    /// Whether any limit holds requests for a refill (`max_wait_ms`): the
    /// filter then needs its timer.
    pub fn holds_requests(&self) -> bool {
        let waits = |l: &Limits| l.iter().any(|(_, limit)| limit.max_wait_ms.is_some());
        self.callers().iter().any(|k| waits(&k.limits))
            || self.pools.iter().any(|p| waits(&p.limits))
            || self.session_pools.iter().any(|p| waits(&p.limits))
    }

    pub fn pool(&self, index: usize) -> Option<&Pool> {
        self.pools.get(index)
    }

    /// The provider pools whose model list names `model`.
    pub fn provider_pools_for<'p>(
        &'p self,
        model: &'p str,
    ) -> impl Iterator<Item = &'p ProviderPool> + 'p {
        self.provider_pools
            .iter()
            .filter(move |p| p.models.allows(model))
    }

    /// The price of a model: the first matching pattern in the policy's
    /// `prices` (exact names before globs), else in the shipped table
    /// ([`crate::price::table`]), else the policy's `default_price`.
    pub fn price(&self, model: &str) -> Option<&Price> {
        self.prices
            .iter()
            .find(|(p, _)| p.matches(model))
            .map(|(_, price)| price)
            .or_else(|| crate::price::table::lookup(model).map(|e| &e.price))
            .or(self.settings.default_price.as_ref())
    }

    /// Whether some price could apply to some model a pattern allows.
    pub fn prices_any(&self, pattern: &ModelPattern) -> bool {
        self.settings.default_price.is_some()
            || self.prices.iter().any(|(p, _)| p.overlaps(pattern))
            || crate::price::table::shipped()
                .iter()
                .any(|e| e.pattern.overlaps(pattern))
    }

    /// The policy's own prices, in the order lookups try them.
    pub fn prices(&self) -> &[(ModelPattern, Price)] {
        &self.prices
    }

    /// Every distinct model pattern named anywhere (allowlists and prices).
    pub fn model_patterns(&self) -> Vec<String> {
        let mut all: Vec<String> = self
            .keys
            .iter()
            .flat_map(|k| k.models.patterns.iter().map(|p| p.as_str().to_string()))
            .chain(self.prices.iter().map(|(p, _)| p.as_str().to_string()))
            .collect();
        all.sort();
        all.dedup();
        all
    }
}

impl ModelSet {
    pub fn new(patterns: Vec<ModelPattern>) -> ModelSet {
        ModelSet { patterns }
    }

    pub fn allows(&self, model: &str) -> bool {
        self.patterns.iter().any(|p| p.matches(model))
    }

    /// The patterns as written in the policy.
    pub fn patterns(&self) -> impl Iterator<Item = &str> {
        self.patterns.iter().map(ModelPattern::as_str)
    }

    /// `claude-haiku-*, claude-sonnet-*` for error messages.
    pub fn describe(&self) -> String {
        if self.patterns.is_empty() {
            return "no models".to_string();
        }
        self.patterns
            .iter()
            .map(ModelPattern::as_str)
            .collect::<Vec<_>>()
            .join(", ")
    }
}

impl Key {
    /// Whether the key may be used at `now_ms`; the reason is the client-facing
    /// message when not.
    pub fn check_valid(&self, now_ms: u64) -> Result<(), KeyRefusal> {
        if self.revoked {
            return Err(KeyRefusal::Revoked);
        }
        match self.expires_at_ms {
            Some(at) if now_ms >= at => Err(KeyRefusal::Expired(at)),
            _ => Ok(()),
        }
    }

    /// Where the key stands at `now_ms`, as `tollgate key list` shows it.
    pub fn status(&self, now_ms: u64) -> KeyStatus {
        match self.check_valid(now_ms) {
            Err(KeyRefusal::Revoked) => KeyStatus::Revoked,
            Err(KeyRefusal::Expired(at_ms) | KeyRefusal::SecretRotated(at_ms)) => {
                KeyStatus::Expired { at_ms }
            }
            Ok(()) => match self.rotating_until(now_ms) {
                Some(until_ms) => KeyStatus::Rotating { until_ms },
                None => KeyStatus::Active,
            },
        }
    }

    /// The last instant a previous secret still works, if one does at
    /// `now_ms`: the end of the rotation in progress.
    pub fn rotating_until(&self, now_ms: u64) -> Option<u64> {
        self.previous_not_after_ms
            .iter()
            .copied()
            .filter(|at| *at > now_ms)
            .max()
    }

    /// How many secrets the policy holds for this key (current and previous).
    pub fn secrets(&self) -> usize {
        1 + self.previous_not_after_ms.len()
    }
}

impl Secret {
    /// Whether this secret still opens its key at `now_ms` (the key's own
    /// state is [`Key::check_valid`]'s): a previous secret is refused from
    /// its `not_after`, as `expires_at` refuses a key from that instant.
    pub fn check_valid(&self, now_ms: u64) -> Result<(), KeyRefusal> {
        match self.not_after_ms {
            Some(at) if now_ms >= at => Err(KeyRefusal::SecretRotated(at)),
            _ => Ok(()),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyRefusal {
    Revoked,
    Expired(u64),
    /// A previous secret presented at or after its `not_after`.
    SecretRotated(u64),
}

/// A key's state as a whole (whichever secret is presented).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyStatus {
    Active,
    Revoked,
    Expired {
        at_ms: u64,
    },
    /// Usable, and a previous secret also works until `until_ms`.
    Rotating {
        until_ms: u64,
    },
}

#[cfg(test)]
mod tests;
