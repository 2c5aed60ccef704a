//! Serde structs that mirror the policy JSON exactly, with typed leaves
//! ([`super::leaf`]): unknown fields and bad values fail inside
//! deserialisation, so a policy that parses is valid in every value and
//! `compile` only checks what spans several values (unique ids, groups that
//! exist) before building the runtime `Policy`.

use super::leaf::{PerMillion, PoolName, Sha256, Text, Time, TimeZone, Version};
use super::pattern::ModelPattern;
use super::{Limits, UnknownRoutes};
use serde::Deserialize;
use std::collections::BTreeMap;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPolicy {
    pub version: Version,
    #[serde(default)]
    pub defaults: RawDefaults,
    #[serde(default)]
    pub groups: BTreeMap<Text, RawGroup>,
    #[serde(default)]
    pub pools: BTreeMap<PoolName, Limits>,
    #[serde(default)]
    pub keys: Vec<RawKey>,
    #[serde(default)]
    pub prices: BTreeMap<ModelPattern, RawPrice>,
    #[serde(default)]
    pub settings: RawSettings,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawDefaults {
    pub models: Option<Vec<ModelPattern>>,
    #[serde(default)]
    pub limits: Limits,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawGroup {
    pub models: Option<Vec<ModelPattern>>,
    #[serde(default)]
    pub limits: Limits,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawKey {
    pub id: Text,
    pub key_sha256: Sha256,
    pub user: Option<Text>,
    pub team: Option<Text>,
    pub project: Option<Text>,
    pub app: Option<Text>,
    pub agent: Option<Text>,
    pub environment: Option<Text>,
    pub cost_center: Option<Text>,
    #[serde(default)]
    pub groups: Vec<Text>,
    #[serde(default)]
    pub limits: Limits,
    pub expires_at: Option<Time>,
    #[serde(default)]
    pub revoked: bool,
}

#[derive(Debug, Deserialize, Clone, Copy)]
#[serde(deny_unknown_fields)]
pub struct RawPrice {
    pub input: PerMillion,
    pub output: PerMillion,
    pub cache_write: Option<PerMillion>,
    pub cache_read: Option<PerMillion>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawSettings {
    /// `"deny"` (default) or `"pass"` for paths outside the provider APIs.
    pub unknown_routes: Option<UnknownRoutes>,
    /// Whether cache reads count toward input tokens per minute (default false,
    /// as Anthropic's own limiter does on current models).
    pub cache_reads_count_toward_input_limit: Option<bool>,
    /// Time zone of daily and monthly windows: `UTC` or a fixed offset such
    /// as `+02:00`.
    pub time_zone: Option<TimeZone>,
    /// Price used for a model absent from `prices`; without it such models
    /// are denied when a money budget applies.
    pub default_price: Option<RawPrice>,
    /// Whether request headers are held until the body decision. Needs
    /// Envoy's `allow_on_headers_stop_iteration`; Istio's `WasmPlugin` cannot
    /// set it, so policies rendered for Istio set this to false.
    pub hold_request_headers: Option<bool>,
}
