//! Serde structs that mirror the policy JSON exactly. Unknown fields are
//! rejected; `compile` turns these into the runtime `Policy`.

use serde::Deserialize;
use std::collections::BTreeMap;

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawPolicy {
    pub version: u32,
    #[serde(default)]
    pub defaults: RawDefaults,
    #[serde(default)]
    pub groups: BTreeMap<String, RawGroup>,
    #[serde(default)]
    pub pools: BTreeMap<String, RawLimits>,
    #[serde(default)]
    pub keys: Vec<RawKey>,
    #[serde(default)]
    pub prices: BTreeMap<String, RawPrice>,
    #[serde(default)]
    pub settings: RawSettings,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawDefaults {
    pub models: Option<Vec<String>>,
    #[serde(default)]
    pub limits: RawLimits,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawGroup {
    pub models: Option<Vec<String>>,
    #[serde(default)]
    pub limits: RawLimits,
}

#[derive(Debug, Deserialize, Default, Clone)]
#[serde(deny_unknown_fields)]
pub struct RawLimits {
    pub requests_per_minute: Option<f64>,
    pub input_tokens_per_minute: Option<f64>,
    pub output_tokens_per_minute: Option<f64>,
    pub tokens_per_day: Option<f64>,
    pub budget_usd_per_day: Option<f64>,
    pub budget_usd_per_month: Option<f64>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawKey {
    pub id: String,
    pub key_sha256: String,
    pub user: Option<String>,
    pub team: Option<String>,
    pub project: Option<String>,
    pub app: Option<String>,
    pub agent: Option<String>,
    pub environment: Option<String>,
    pub cost_center: Option<String>,
    #[serde(default)]
    pub groups: Vec<String>,
    #[serde(default)]
    pub limits: RawLimits,
    pub expires_at: Option<String>,
    #[serde(default)]
    pub revoked: bool,
}

#[derive(Debug, Deserialize, Default, Clone)]
#[serde(deny_unknown_fields)]
pub struct RawPrice {
    pub input: f64,
    pub output: f64,
    pub cache_write: Option<f64>,
    pub cache_read: Option<f64>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawSettings {
    /// `"deny"` (default) or `"pass"` for paths outside the provider APIs.
    pub unknown_routes: Option<String>,
    /// Whether cache reads count toward input tokens per minute (default false,
    /// as Anthropic's own limiter does on current models).
    pub cache_reads_count_toward_input_limit: Option<bool>,
    /// Time zone of daily and monthly windows: `UTC` or a fixed offset such
    /// as `+02:00`.
    pub time_zone: Option<String>,
    /// Price used for a model absent from `prices`; without it such models
    /// are denied when a money budget applies.
    pub default_price: Option<RawPrice>,
    /// Whether request headers are held until the body decision. Needs
    /// Envoy's `allow_on_headers_stop_iteration`; Istio's `WasmPlugin` cannot
    /// set it, so policies rendered for Istio set this to false.
    pub hold_request_headers: Option<bool>,
}
