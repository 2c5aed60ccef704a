//! Serde structs that mirror the policy JSON exactly, with typed leaves
//! ([`super::leaf`]): unknown fields and bad values fail inside
//! deserialisation, so a policy that parses is valid in every value and
//! `compile` only checks what spans several values (unique ids, groups that
//! exist) before building the runtime `Policy`.

use super::leaf::{
    ClaimPattern, HeaderName, MaxTracked, Multiplier, PerMillion, PerThousand, PoolName, Priority,
    ProviderPoolName, Sha256, SpiffePattern, Text, Threshold, Time, TimeZone, Version,
};
use super::pattern::ModelPattern;
use super::{Limits, UnknownRoutes};
use serde::de::{value::MapAccessDeserializer, Deserializer, MapAccess, Visitor};
use serde::Deserialize;
use std::collections::BTreeMap;

/// A policy object. Serde's derived structs also accept a JSON array of
/// their fields in order (`[1]` would read as `{"version": 1}`), which the
/// policy's schema does not: this wrapper reads only an object, so the
/// typed parse accepts exactly what the schema walker accepts (the policy
/// fuzzer holds the two to one verdict).
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct Obj<T>(pub T);

impl<T> std::ops::Deref for Obj<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Obj<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct ObjVisitor<T>(std::marker::PhantomData<T>);
        impl<'de, T: Deserialize<'de>> Visitor<'de> for ObjVisitor<T> {
            type Value = T;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an object")
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<T, A::Error> {
                T::deserialize(MapAccessDeserializer::new(map))
            }
        }
        d.deserialize_map(ObjVisitor(std::marker::PhantomData))
            .map(Obj)
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPolicy {
    pub version: Version,
    #[serde(default)]
    pub defaults: Obj<RawDefaults>,
    #[serde(default)]
    pub groups: BTreeMap<Text, Obj<RawGroup>>,
    #[serde(default)]
    pub pools: BTreeMap<PoolName, Limits>,
    #[serde(default)]
    pub provider_pools: BTreeMap<ProviderPoolName, Obj<RawProviderPool>>,
    #[serde(default)]
    pub session_pools: BTreeMap<Text, Obj<RawSessionPool>>,
    #[serde(default)]
    pub keys: Vec<Obj<RawKey>>,
    #[serde(default)]
    pub identities: Vec<Obj<RawIdentity>>,
    #[serde(default)]
    pub prices: BTreeMap<ModelPattern, Obj<RawPrice>>,
    #[serde(default)]
    pub settings: Obj<RawSettings>,
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
    pub priority: Option<Priority>,
    #[serde(default)]
    pub limits: Limits,
}

/// A provider's own limit on a group of its models: every request for one
/// of `models` draws from it, whatever its key (`tollgate limits pull`
/// writes these from the provider's Rate Limits API).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawProviderPool {
    pub models: Vec<ModelPattern>,
    pub limits: Limits,
}

/// A pool template keyed by a request header: every distinct value (per
/// key) gets its own buckets from `limits`, at most `max_tracked` at once.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSessionPool {
    pub header: HeaderName,
    pub limits: Limits,
    pub max_tracked: Option<MaxTracked>,
}

/// A caller's struct: its own fields, then the ones every caller has, in
/// that order (the order unknown-field errors list them in). A macro, not
/// a flattened struct: serde's `flatten` does not combine with
/// `deny_unknown_fields`, which gives the precise unknown-field errors.
macro_rules! caller {
    ($(#[$meta:meta])* $name:ident { $($(#[$fmeta:meta])* $field:ident: $ty:ty,)* }) => {
        $(#[$meta])*
        #[derive(Debug, Deserialize)]
        #[serde(deny_unknown_fields)]
        pub struct $name {
            $($(#[$fmeta])* pub $field: $ty,)*
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
            pub priority: Option<Priority>,
        }
    };
}

caller!(RawKey {
    id: Text,
    /// The current secret's hash.
    key_sha256: Sha256,
    /// Earlier secrets still honoured through a rotation's grace period.
    #[serde(default)]
    previous: Vec<Obj<RawPreviousSecret>>,
});

caller!(
    /// A caller the mesh identifies instead of a virtual key (`identities[]`):
    /// the mTLS peer's SPIFFE ID, or claims of a JWT Envoy's `jwt_authn`
    /// verified. Exactly one of `spiffe` and `jwt` (checked across fields in
    /// `compile`); every other field is a key's.
    RawIdentity {
        id: Text,
        spiffe: Option<SpiffePattern>,
        /// Claim name to the pattern its value (or one element of a list
        /// claim) must match; every named claim must match.
        jwt: Option<BTreeMap<Text, ClaimPattern>>,
    }
);

/// What keys and identities share: who the caller is and what it may use.
/// Compiling builds both kinds of caller from this one view.
pub struct Caller<'a> {
    pub id: &'a Text,
    pub user: &'a Option<Text>,
    pub team: &'a Option<Text>,
    pub project: &'a Option<Text>,
    pub app: &'a Option<Text>,
    pub agent: &'a Option<Text>,
    pub environment: &'a Option<Text>,
    pub cost_center: &'a Option<Text>,
    pub groups: &'a [Text],
    pub limits: &'a Limits,
    pub expires_at: Option<&'a Time>,
    pub revoked: bool,
    pub priority: Option<Priority>,
}

macro_rules! caller_view {
    ($t:ty) => {
        impl $t {
            pub fn caller(&self) -> Caller<'_> {
                Caller {
                    id: &self.id,
                    user: &self.user,
                    team: &self.team,
                    project: &self.project,
                    app: &self.app,
                    agent: &self.agent,
                    environment: &self.environment,
                    cost_center: &self.cost_center,
                    groups: &self.groups,
                    limits: &self.limits,
                    expires_at: self.expires_at.as_ref(),
                    revoked: self.revoked,
                    priority: self.priority,
                }
            }
        }
    };
}
caller_view!(RawKey);
caller_view!(RawIdentity);

/// An earlier secret of a key (`keys[].previous[]`), left working by a
/// rotation until `not_after` so that its holders can switch to the new one.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPreviousSecret {
    pub key_sha256: Sha256,
    pub not_after: Time,
}

/// A price entry (policy `prices.<pattern>`, `settings.default_price`, and
/// each `price` of the shipped table). Defaults are filled by
/// [`RawPrice::build`].
#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct RawPrice {
    pub input: PerMillion,
    pub output: PerMillion,
    pub cache_write: Option<PerMillion>,
    pub cache_write_1h: Option<PerMillion>,
    pub cache_read: Option<PerMillion>,
    pub web_search_per_thousand: Option<PerThousand>,
    pub long_context: Option<Obj<RawLongContext>>,
    #[serde(default)]
    pub tiers: BTreeMap<Text, Multiplier>,
    #[serde(default)]
    pub regions: BTreeMap<Text, Multiplier>,
}

/// Whole-request prices above a prompt size.
#[derive(Debug, Deserialize, Clone, Copy)]
#[serde(deny_unknown_fields)]
pub struct RawLongContext {
    pub above_input_tokens: Threshold,
    pub input: PerMillion,
    pub output: PerMillion,
    pub cache_write: Option<PerMillion>,
    pub cache_write_1h: Option<PerMillion>,
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
    pub default_price: Option<Obj<RawPrice>>,
    /// Whether request headers are held until the body decision. Needs
    /// Envoy's `allow_on_headers_stop_iteration`; Istio's `WasmPlugin` cannot
    /// set it, so policies rendered for Istio set this to false.
    pub hold_request_headers: Option<bool>,
}
