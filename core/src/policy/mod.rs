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

pub use crate::price::Price;
pub use compile::{compile, compile_checked};
pub use error::{PolicyError, PolicyReport};
pub use limits::{Limit, Limits, StoreFailure};
pub use pattern::ModelPattern;

use hashbrown::HashMap;

/// Identity attributes that name pools: `team: payments` draws from
/// `team:payments`.
pub const POOL_KINDS: [&str; 5] = ["team", "project", "user", "app", "agent"];

/// A compiled, validated policy. Immutable; a reload builds a new one.
#[derive(Debug, Default)]
pub struct Policy {
    keys: Vec<Key>,
    index: HashMap<[u8; 32], usize>,
    pub pools: Vec<Pool>,
    /// The provider's own limits by model group, in name order.
    pub provider_pools: Vec<ProviderPool>,
    pub groups: Vec<String>,
    prices: Vec<(ModelPattern, Price)>,
    pub settings: Settings,
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
    /// O(1) lookup by the SHA-256 of a virtual key.
    pub fn lookup(&self, key_sha256: &[u8; 32]) -> Option<&Key> {
        self.index.get(key_sha256).and_then(|i| self.keys.get(*i))
    }

    /// Position of a key in [`Policy::keys`], for per-request state that
    /// must not borrow the policy.
    pub fn lookup_index(&self, key_sha256: &[u8; 32]) -> Option<usize> {
        self.index.get(key_sha256).copied()
    }

    pub fn key(&self, index: usize) -> Option<&Key> {
        self.keys.get(index)
    }

    pub fn keys(&self) -> &[Key] {
        &self.keys
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
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyRefusal {
    Revoked,
    Expired(u64),
}

#[cfg(test)]
mod tests;
