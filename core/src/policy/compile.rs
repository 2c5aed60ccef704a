//! Loading a policy: parse into the typed serde structs (which validates
//! every value), check what spans several values, and build the runtime
//! [`Policy`]. A document the typed parse refuses goes through the schema
//! walker instead, which reports every error with its path.

use super::error::{PolicyError, PolicyReport};
use super::pattern::ModelPattern;
use super::raw::{Caller, Obj, RawKey, RawLongContext, RawPolicy, RawPrice};
use super::schema::{self, join, show, Problem};
use super::{
    Identity, Key, Limits, MeshIdentity, MeshMatch, ModelSet, OnExhausted, Policy, Pool, Price,
    ProviderPool, Secret, SessionPool, Settings, DEFAULT_MAX_TRACKED, POOL_KINDS,
};
use crate::price::{LongContext, Rates, DEFAULT_WEB_SEARCH_PER_THOUSAND};
use hashbrown::HashMap;
use serde_json::Value;
use std::sync::Arc;

/// Parses and validates policy JSON. `file` names the source in errors;
/// `now_ms` decides which `expires_at` values deserve a warning.
pub fn compile(
    json: &[u8],
    file: &str,
    now_ms: u64,
) -> Result<(Policy, PolicyReport), Vec<PolicyError>> {
    // Fast path: deserialising into typed leaves is the validation of every
    // value, in one pass with no JSON DOM (a 100,000-key policy is a 17 MB
    // document, and building its DOM is most of the cost of loading it).
    // Anything it refuses takes the DOM path below for every error and path.
    if let Ok(Obj(raw)) = serde_json::from_slice::<Obj<RawPolicy>>(json) {
        if references_resolve(&raw) {
            return build_with_report(raw, file, now_ms);
        }
    }
    compile_checked(json, file, now_ms)
}

/// The DOM path alone: parse, check the whole document against the schema
/// and its cross-references, collecting every error. [`compile`] takes it
/// for any document its streaming fast path would not accept; tests and the
/// fuzzer hold the two paths to the same verdict.
pub fn compile_checked(
    json: &[u8],
    file: &str,
    now_ms: u64,
) -> Result<(Policy, PolicyReport), Vec<PolicyError>> {
    let at = |p: Problem| p.in_file(file);
    let value: Value = serde_json::from_slice(json).map_err(|e| {
        vec![at(Problem {
            path: String::new(),
            value: None,
            reason: format!("invalid JSON: {e}"),
        })]
    })?;
    let mut problems = Vec::new();
    schema::check(&value, &schema::POLICY, "", &mut problems);
    cross_references(&value, &mut problems);
    if !problems.is_empty() {
        return Err(problems.into_iter().map(at).collect());
    }
    // The schema and the typed leaves check the same rules (the fuzzer
    // holds them to one verdict); should they ever disagree, say so.
    let Obj(raw): Obj<RawPolicy> = serde_json::from_value(value).map_err(|e| {
        vec![at(Problem {
            path: String::new(),
            value: None,
            reason: e.to_string(),
        })]
    })?;
    build_with_report(raw, file, now_ms)
}

/// Builds a policy that passed every per-value check, then checks what only
/// the built policy can say (which keys a budget applies to).
fn build_with_report(
    raw: RawPolicy,
    file: &str,
    now_ms: u64,
) -> Result<(Policy, PolicyReport), Vec<PolicyError>> {
    let policy = build(&raw);
    let mut problems = provider_pool_problems(&raw);
    problems.extend(unpriced_allowlists(&raw, &policy));
    problems.extend(ladder_problems(&raw, &policy));
    if !problems.is_empty() {
        return Err(problems.into_iter().map(|p| p.in_file(file)).collect());
    }
    let warnings = expiry_warnings(&raw, now_ms)
        .into_iter()
        .map(|p| p.in_file(file))
        .collect();
    Ok((policy, PolicyReport { warnings }))
}

/// Every allowlist entry of a key a USD budget applies to, for which no
/// price exists anywhere: no policy price, no shipped price and no
/// `default_price` could apply to any model it allows. Each such request
/// would be refused as unpriced (it must never cost $0), so the policy is
/// wrong, and is refused here with the entry's path rather than on every
/// request. An entry only partly priced (`claude-*` while only some Claude
/// models have prices) passes: the flow refuses its unpriced models.
fn unpriced_allowlists(raw: &RawPolicy, policy: &Policy) -> Vec<Problem> {
    if policy.settings.default_price.is_some() {
        return Vec::new();
    }
    // Allowlists belong to groups (or the defaults), not keys: check each
    // list once, whatever the number of budgeted keys that use it (a policy
    // of 100,000 keys costs one set lookup per key and group here).
    let mut lists: Vec<(String, &'static str, &[super::ModelPattern])> = Vec::new();
    let mut seen = hashbrown::HashSet::new();
    let mut defaults_seen = false;
    for (k, key) in raw_callers(raw).zip(policy.callers()) {
        if !crate::meter::budget_applies(policy, key) {
            continue;
        }
        let mut from_groups = false;
        for g in k.groups {
            let Some(models) = raw.groups.get(g).and_then(|g| g.models.as_deref()) else {
                continue;
            };
            from_groups = true;
            if seen.insert(g.0.as_str()) {
                lists.push((join("groups", &g.0), "keys in this group", models));
            }
        }
        if !from_groups && !defaults_seen {
            defaults_seen = true;
            let models = raw.defaults.models.as_deref().unwrap_or_default();
            lists.push((
                "defaults".to_string(),
                "keys using the default models",
                models,
            ));
        }
    }
    let mut out = Vec::new();
    for (path, whose, models) in lists {
        for (j, pattern) in models.iter().enumerate() {
            if !policy.prices_any(pattern) {
                out.push(Problem {
                    path: format!("{path}.models[{j}]"),
                    value: None,
                    reason: format!(
                        "model \"{}\" has no price and a USD budget applies to {whose} (add it under \"prices\" or settings.default_price)",
                        pattern.as_str()
                    ),
                });
            }
        }
    }
    out
}

/// Every limit of the document with its JSON path and the keys it applies
/// to (`None`: any key, decided per request: provider and session pools).
fn limits_with_paths<'r>(
    raw: &'r RawPolicy,
    policy: &'r Policy,
) -> Vec<(String, &'r Limits, Option<Vec<&'r Key>>)> {
    let keys = policy.keys();
    let in_group = |g: &str| -> Vec<&Key> {
        keys.iter()
            .filter(|k| k.identity.groups.iter().any(|x| x == g))
            .map(|k| &**k)
            .collect()
    };
    let mut out = vec![(
        "defaults.limits".to_string(),
        &raw.defaults.limits,
        Some(keys.iter().map(|k| &**k).collect()),
    )];
    for (name, g) in &raw.groups {
        out.push((
            join(&join("groups", &name.0), "limits"),
            &g.limits,
            Some(in_group(&name.0)),
        ));
    }
    for (i, (name, limits)) in raw.pools.iter().enumerate() {
        let members = keys
            .iter()
            .filter(|k| k.pools.contains(&i))
            .map(|k| &**k)
            .collect();
        out.push((join("pools", &name.0), limits, Some(members)));
    }
    for (name, pool) in &raw.provider_pools {
        out.push((
            join(&join("provider_pools", &name.0), "limits"),
            &pool.limits,
            None,
        ));
    }
    for (name, pool) in &raw.session_pools {
        out.push((
            join(&join("session_pools", &name.0), "limits"),
            &pool.limits,
            None,
        ));
    }
    for (i, (k, key)) in raw.keys.iter().zip(keys).enumerate() {
        out.push((format!("keys[{i}].limits"), &k.limits, Some(vec![&**key])));
    }
    out
}

/// The ladder's checks that span values: a shadow limit never refuses, so
/// an `on_exhausted` beside it could never apply; a `downgrade_to` model
/// must be one every key the limit applies to may call (keys whose limit
/// comes from defaults or a group are checked against their own list).
/// Provider and session pools apply to any key: checked per request.
fn ladder_problems(raw: &RawPolicy, policy: &Policy) -> Vec<Problem> {
    let mut out = Vec::new();
    for (path, limits, keys) in limits_with_paths(raw, policy) {
        for (metric, limit) in limits.iter() {
            let at = join(&join(&path, metric.name()), "on_exhausted");
            if limit.shadow && !limit.on_exhausted.is_block() {
                out.push(Problem {
                    path: at.clone(),
                    value: None,
                    reason: "a shadow limit never refuses, so on_exhausted cannot apply: remove one of the two".to_string(),
                });
            }
            let OnExhausted::DowngradeTo(model) = &limit.on_exhausted else {
                continue;
            };
            // A key's limit is its own, else a group's, else the default:
            // a key is checked where its resolved limit was written. A
            // pool's limit applies to every member.
            let pool = path.starts_with("pools");
            let refusing = keys.iter().flatten().find(|k| {
                (pool || k.limits.limit(metric).as_ref() == Some(&limit)) && !k.models.allows(model)
            });
            if let Some(key) = refusing {
                out.push(Problem {
                    path: join(&at, "downgrade_to"),
                    value: Some(show(&Value::String(model.clone()))),
                    reason: format!(
                        "key {} may not call this model (allowed: {})",
                        key.id,
                        key.models.describe()
                    ),
                });
            }
        }
    }
    out
}

/// A provider pool meters what the provider meters: requests and tokens
/// per minute. Quotas and budgets belong to keys and pools: a budget on a
/// model group would count only its priced models and, with no key to name,
/// escape the unpriced-model check, and a calendar window would have no
/// owner to rebuild it from the audit records after a shared store lost
/// its data. An empty model list would apply to nothing: a mistake, not a
/// limit.
fn provider_pool_problems(raw: &RawPolicy) -> Vec<Problem> {
    let mut out = Vec::new();
    for (name, pool) in &raw.provider_pools {
        let at = join("provider_pools", &name.0);
        if pool.models.is_empty() {
            out.push(Problem {
                path: join(&at, "models"),
                value: Some("[]".to_string()),
                reason: "a provider pool needs at least one model".to_string(),
            });
        }
        if pool.limits.has_alerts() {
            out.push(Problem {
                path: join(&join(&at, "limits"), "alerts"),
                value: None,
                reason: "alerts apply to daily and monthly quotas and budgets, which provider pools do not have; put them on keys, groups or pools".to_string(),
            });
        }
        for (metric, limit) in pool.limits.iter().filter(|(m, _)| m.is_quota()) {
            out.push(Problem {
                path: join(&join(&at, "limits"), metric.name()),
                value: Some(limit.amount.to_string()),
                reason: "provider pools take per-minute limits (requests_per_minute, input_tokens_per_minute, output_tokens_per_minute); put quotas and budgets on keys, groups or pools".to_string(),
            });
        }
    }
    out
}

/// Checks that need more than one value: unique ids (keys and identities
/// share one id space: audit records and buckets name both alike) and key
/// hashes (of current and previous secrets alike), groups that exist, and
/// how each identity is recognised. Run on the raw document so they are
/// reported together with shape errors.
fn cross_references(doc: &Value, out: &mut Vec<Problem>) {
    let groups = doc.get("groups").and_then(Value::as_object);
    let entries = |name: &str| {
        doc.get(name)
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .enumerate()
    };
    // Id to the path of its first holder.
    let mut ids: HashMap<&str, String> = HashMap::new();
    // Hash (lower case) to the path of its first holder.
    let mut hashes: HashMap<String, String> = HashMap::new();
    for (i, k) in entries("keys") {
        if let Some(id) = k.get("id").and_then(Value::as_str) {
            let path = format!("keys[{i}].id");
            match ids.entry(id) {
                hashbrown::hash_map::Entry::Occupied(first) => out.push(Problem {
                    path,
                    value: Some(show(&Value::String(id.into()))),
                    reason: format!("duplicate key id (also {})", first.get()),
                }),
                hashbrown::hash_map::Entry::Vacant(slot) => {
                    slot.insert(path);
                }
            }
        }
        // Every secret, current and previous, opens exactly one key: a hash
        // seen twice is one virtual key with two meanings.
        let previous = k
            .get("previous")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .enumerate()
            .map(|(j, p)| (format!("keys[{i}].previous[{j}].key_sha256"), p));
        for (path, holder) in std::iter::once((format!("keys[{i}].key_sha256"), k)).chain(previous)
        {
            let Some(h) = holder
                .get("key_sha256")
                .and_then(Value::as_str)
                .filter(|h| h.len() == 64)
            else {
                continue;
            };
            match hashes.entry(h.to_ascii_lowercase()) {
                hashbrown::hash_map::Entry::Occupied(first) => out.push(Problem {
                    reason: format!(
                        "duplicate key hash (also {}): two entries for one virtual key",
                        first.get()
                    ),
                    path,
                    value: Some(show(&Value::String(h.into()))),
                }),
                hashbrown::hash_map::Entry::Vacant(slot) => {
                    slot.insert(path);
                }
            }
        }
        known_groups(k, groups, &format!("keys[{i}]"), out);
    }
    // Matcher (as JSON text) to the path of the first identity using it.
    let mut matchers: HashMap<String, String> = HashMap::new();
    for (i, entry) in entries("identities") {
        let at = format!("identities[{i}]");
        if let Some(id) = entry.get("id").and_then(Value::as_str) {
            let path = format!("{at}.id");
            match ids.entry(id) {
                hashbrown::hash_map::Entry::Occupied(first) => out.push(Problem {
                    path,
                    value: Some(show(&Value::String(id.into()))),
                    reason: format!(
                        "duplicate id (also {}): keys and identities share one id space",
                        first.get()
                    ),
                }),
                hashbrown::hash_map::Entry::Vacant(slot) => {
                    slot.insert(path);
                }
            }
        }
        known_groups(entry, groups, &at, out);
        if !entry.is_object() {
            continue;
        }
        let (spiffe, jwt) = (entry.get("spiffe"), entry.get("jwt"));
        match (spiffe, jwt) {
            (None, None) => out.push(Problem {
                path: at.clone(),
                value: None,
                reason: "name how this identity is recognised: \"spiffe\" (the mTLS peer's SPIFFE ID) or \"jwt\" (claims of a verified JWT)".to_string(),
            }),
            (Some(_), Some(_)) => out.push(Problem {
                path: at.clone(),
                value: None,
                reason: "an identity is recognised by \"spiffe\" or by \"jwt\", not both (declare two identities)".to_string(),
            }),
            _ => {}
        }
        if jwt.and_then(Value::as_object).is_some_and(|m| m.is_empty()) {
            out.push(Problem {
                path: format!("{at}.jwt"),
                value: Some("{}".to_string()),
                reason: "name at least one claim, e.g. {\"iss\": \"https://idp.example.com\", \"sub\": \"*\"}".to_string(),
            });
        }
        for (field, m) in [("spiffe", spiffe), ("jwt", jwt)] {
            let Some(m) = m.filter(|m| m.is_string() || m.is_object()) else {
                continue;
            };
            let path = format!("{at}.{field}");
            // Claims in any order are one matcher (as the typed parse
            // reads them: a sorted map).
            let canonical = match m.as_object() {
                Some(o) => format!(
                    "{:?}",
                    o.iter().collect::<std::collections::BTreeMap<_, _>>()
                ),
                None => m.to_string(),
            };
            match matchers.entry(format!("{field}:{canonical}")) {
                hashbrown::hash_map::Entry::Occupied(first) => out.push(Problem {
                    reason: format!(
                        "never matches: {} is the same and is tried first",
                        first.get()
                    ),
                    value: Some(show(m)),
                    path,
                }),
                hashbrown::hash_map::Entry::Vacant(slot) => {
                    slot.insert(path);
                }
            }
        }
    }
}

/// Every group a key or identity (`entry` at `at`) names must be defined.
fn known_groups(
    entry: &Value,
    groups: Option<&serde_json::Map<String, Value>>,
    at: &str,
    out: &mut Vec<Problem>,
) {
    for (j, g) in entry
        .get("groups")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .enumerate()
    {
        let Some(name) = g.as_str() else { continue };
        if !groups.is_some_and(|gs| gs.contains_key(name)) {
            let defined: Vec<&str> = groups
                .map(|gs| gs.keys().map(String::as_str).collect())
                .unwrap_or_default();
            out.push(Problem {
                path: format!("{at}.groups[{j}]"),
                value: Some(show(g)),
                reason: if defined.is_empty() {
                    "unknown group (no groups are defined under \"groups\")".to_string()
                } else {
                    format!("unknown group (defined: {})", defined.join(", "))
                },
            });
        }
    }
}

/// The typed twin of [`cross_references`] for the fast path: whether ids
/// (of keys and identities) and the hashes of all secrets are unique, every
/// group named exists, and every identity has exactly one distinct
/// matcher. When not, the DOM path says which.
fn references_resolve(raw: &RawPolicy) -> bool {
    let mut ids = hashbrown::HashSet::with_capacity(raw.keys.len() + raw.identities.len());
    let mut hashes = hashbrown::HashSet::with_capacity(raw.keys.len());
    let keys_resolve = raw.keys.iter().all(|k| {
        ids.insert(k.id.0.as_str())
            && hashes.insert(k.key_sha256.0)
            && k.previous.iter().all(|p| hashes.insert(p.key_sha256.0))
            && k.groups.iter().all(|g| raw.groups.contains_key(g))
    });
    let mut spiffes = hashbrown::HashSet::new();
    let mut jwts = Vec::new();
    keys_resolve
        && raw.identities.iter().all(|e| {
            let matcher = match (&e.spiffe, &e.jwt) {
                (Some(s), None) => spiffes.insert(s.0.as_str()),
                (None, Some(claims)) if !claims.is_empty() => {
                    let fresh = !jwts.contains(&claims);
                    jwts.push(claims);
                    fresh
                }
                _ => false,
            };
            matcher
                && ids.insert(e.id.0.as_str())
                && e.groups.iter().all(|g| raw.groups.contains_key(g))
        })
}

fn expiry_warnings(raw: &RawPolicy, now_ms: u64) -> Vec<Problem> {
    let keys = raw
        .keys
        .iter()
        .enumerate()
        .map(|(i, k)| (format!("keys[{i}]"), "key", k.expires_at.as_ref()));
    let identities = raw.identities.iter().enumerate().map(|(i, e)| {
        (
            format!("identities[{i}]"),
            "identity",
            e.expires_at.as_ref(),
        )
    });
    keys.chain(identities)
        .filter_map(|(at_path, what, at)| {
            let at = at?;
            (at.ms <= now_ms).then(|| Problem {
                path: format!("{at_path}.expires_at"),
                value: Some(show(&Value::String(at.text.clone()))),
                reason: format!("already expired: this {what} is refused"),
            })
        })
        .collect()
}

impl RawPrice {
    /// The runtime price. Classes not given follow Anthropic's published
    /// ratios to input (5-minute cache writes 1.25x, 1-hour 2x, reads 0.1x)
    /// and both providers' $10 per 1,000 web searches.
    pub fn build(&self) -> Price {
        let input = self.input.0;
        let rates = Rates {
            input,
            output: self.output.0,
            cache_write: self.cache_write.map_or(input * 1.25, |p| p.0),
            cache_write_1h: self.cache_write_1h.map_or(input * 2.0, |p| p.0),
            cache_read: self.cache_read.map_or(input * 0.1, |p| p.0),
        };
        let multipliers = |m: &std::collections::BTreeMap<
            super::leaf::Text,
            super::leaf::Multiplier,
        >| { m.iter().map(|(k, v)| (k.0.clone(), v.0)).collect() };
        Price {
            web_search_per_thousand: self
                .web_search_per_thousand
                .map_or(DEFAULT_WEB_SEARCH_PER_THOUSAND, |p| p.0),
            long_context: self.long_context.map(|l| l.build(&rates)),
            tiers: multipliers(&self.tiers),
            regions: multipliers(&self.regions),
            ..Price::from_rates(rates)
        }
    }
}

impl RawLongContext {
    /// Cache classes not given keep the base price's ratio to input: both
    /// Anthropic (cache multipliers stack on the long-context input price)
    /// and OpenAI (input and cache rates double together) price them so.
    fn build(&self, base: &Rates) -> LongContext {
        let input = self.input.0;
        let scaled = |base_class: f64, standard: f64| {
            if base.input > 0.0 {
                base_class * input / base.input
            } else {
                input * standard
            }
        };
        LongContext {
            above_input_tokens: self.above_input_tokens.0,
            rates: Rates {
                input,
                output: self.output.0,
                cache_write: self
                    .cache_write
                    .map_or_else(|| scaled(base.cache_write, 1.25), |p| p.0),
                cache_write_1h: self
                    .cache_write_1h
                    .map_or_else(|| scaled(base.cache_write_1h, 2.0), |p| p.0),
                cache_read: self
                    .cache_read
                    .map_or_else(|| scaled(base.cache_read, 0.1), |p| p.0),
            },
        }
    }
}

/// Builds the runtime policy from a document that passed every check.
/// Every value is already typed and valid: nothing here can be dropped.
fn build(raw: &RawPolicy) -> Policy {
    let default_models = raw.defaults.models.clone().unwrap_or_default();
    let groups = group_index(raw);
    let pools: Vec<Pool> = raw
        .pools
        .iter()
        .map(|(name, limits)| Pool {
            name: name.0.clone(),
            limits: limits.clone(),
        })
        .collect();
    let pool_index = pool_index(raw);

    let provider_pools = raw
        .provider_pools
        .iter()
        .map(|(name, pool)| ProviderPool {
            name: name.0.clone(),
            models: ModelSet::new(pool.models.clone()),
            limits: pool.limits.clone(),
        })
        .collect();
    let session_pools = raw
        .session_pools
        .iter()
        .map(|(name, pool)| SessionPool {
            name: name.0.clone(),
            header: pool.header.0.clone(),
            limits: pool.limits.clone(),
            max_tracked: pool.max_tracked.map_or(DEFAULT_MAX_TRACKED, |m| m.0),
        })
        .collect();

    let mut prices: Vec<(ModelPattern, Price)> = raw
        .prices
        .iter()
        .map(|(p, v)| (p.clone(), v.build()))
        .collect();
    prices.sort_by(|(a, _), (b, _)| a.lookup_order(b));

    let mut keys = Vec::with_capacity(raw.keys.len() + raw.identities.len());
    let mut index = HashMap::with_capacity(raw.keys.len());
    for k in &raw.keys {
        let key = keys.len();
        index.insert(
            k.key_sha256.0,
            Secret {
                key,
                not_after_ms: None,
            },
        );
        for p in &k.previous {
            index.insert(
                p.key_sha256.0,
                Secret {
                    key,
                    not_after_ms: Some(p.not_after.ms),
                },
            );
        }
        keys.push(Arc::new(key_of(
            k,
            raw,
            &groups,
            &pool_index,
            &default_models,
        )));
    }
    let key_count = keys.len();
    let mut identities = Vec::with_capacity(raw.identities.len());
    for e in &raw.identities {
        let matcher = match (&e.spiffe, &e.jwt) {
            (Some(s), _) => MeshMatch::Spiffe(s.0.clone()),
            (None, Some(claims)) => MeshMatch::Jwt(
                claims
                    .iter()
                    .map(|(name, p)| (name.0.clone(), p.0.clone()))
                    .collect(),
            ),
            // Refused by the cross-field checks before anything is built.
            (None, None) => continue,
        };
        identities.push(MeshIdentity {
            caller: keys.len(),
            matcher,
        });
        keys.push(Arc::new(caller(
            e.caller(),
            raw,
            &groups,
            &pool_index,
            &default_models,
        )));
    }

    let settings = &raw.settings;
    Policy {
        keys,
        key_count,
        identities,
        index,
        groups: raw.groups.keys().map(|g| g.0.clone()).collect(),
        pools,
        provider_pools,
        session_pools,
        prices,
        settings: Settings {
            unknown_routes: settings.unknown_routes.unwrap_or_default(),
            cache_reads_count_toward_input_limit: settings
                .cache_reads_count_toward_input_limit
                .unwrap_or(false),
            utc_offset_minutes: settings.time_zone.as_ref().map_or(0, |z| z.offset_min),
            time_zone: settings
                .time_zone
                .as_ref()
                .map_or_else(|| "UTC".to_string(), |z| z.text.clone()),
            default_price: settings.default_price.as_ref().map(|p| p.build()),
            hold_request_headers: settings.hold_request_headers.unwrap_or(true),
        },
        table: None,
    }
}

/// The typed document of a policy [`compile`] accepted, for a key table to
/// compile its keys against ([`super::table`]).
pub fn base_of(json: &[u8]) -> Option<RawPolicy> {
    serde_json::from_slice::<Obj<RawPolicy>>(json)
        .ok()
        .map(|Obj(raw)| raw)
}

/// A key of the key table, compiled as [`build`] compiles the same key
/// inline: against `base`'s groups, defaults and pools.
pub(super) fn table_key(k: &RawKey, base: &RawPolicy) -> Key {
    let default_models = base.defaults.models.clone().unwrap_or_default();
    key_of(
        k,
        base,
        &group_index(base),
        &pool_index(base),
        &default_models,
    )
}

fn key_of(
    k: &RawKey,
    raw: &RawPolicy,
    groups: &GroupIndex<'_>,
    pool_index: &HashMap<&str, usize>,
    default_models: &[ModelPattern],
) -> Key {
    let mut built = caller(k.caller(), raw, groups, pool_index, default_models);
    built.previous_not_after_ms = k.previous.iter().map(|p| p.not_after.ms).collect();
    built
}

fn group_index(raw: &RawPolicy) -> GroupIndex<'_> {
    raw.groups
        .iter()
        .map(|(name, g)| (name.0.as_str(), (g.models.as_deref(), &g.limits)))
        .collect()
}

fn pool_index(raw: &RawPolicy) -> HashMap<&str, usize> {
    raw.pools
        .keys()
        .enumerate()
        .map(|(i, name)| (name.0.as_str(), i))
        .collect()
}

/// Keys then identities, as [`Policy::callers`] holds them.
fn raw_callers(raw: &RawPolicy) -> impl Iterator<Item = Caller<'_>> {
    raw.keys
        .iter()
        .map(|k| k.caller())
        .chain(raw.identities.iter().map(|e| e.caller()))
}

type GroupIndex<'a> = HashMap<&'a str, (Option<&'a [ModelPattern]>, &'a Limits)>;

/// One caller, key or identity, with everything resolved: limits (its own,
/// else the most restrictive group's, else the defaults), allowlist (the
/// union of its groups' lists, else the defaults), pools, priority.
fn caller(
    k: Caller<'_>,
    raw: &RawPolicy,
    groups: &GroupIndex<'_>,
    pool_index: &HashMap<&str, usize>,
    default_models: &[ModelPattern],
) -> Key {
    let member_of: Vec<&(Option<&[ModelPattern]>, &Limits)> = k
        .groups
        .iter()
        .filter_map(|g| groups.get(g.0.as_str()))
        .collect();
    let group_limits: Vec<&Limits> = member_of.iter().map(|(_, l)| *l).collect();
    let models = if member_of.iter().any(|(m, _)| m.is_some()) {
        ModelSet::new(
            member_of
                .iter()
                .filter_map(|(m, _)| *m)
                .flatten()
                .cloned()
                .collect(),
        )
    } else {
        ModelSet::new(default_models.to_vec())
    };
    let text = |t: &Option<super::leaf::Text>| t.as_ref().map(|t| t.0.clone());
    let key_pools = POOL_KINDS
        .iter()
        .zip([k.team, k.project, k.user, k.app, k.agent])
        .filter_map(|(kind, value)| {
            pool_index
                .get(format!("{kind}:{}", value.as_ref()?.0).as_str())
                .copied()
        })
        .collect();
    Key {
        id: k.id.0.clone(),
        identity: Identity {
            user: text(k.user),
            team: text(k.team),
            project: text(k.project),
            app: text(k.app),
            agent: text(k.agent),
            environment: text(k.environment),
            cost_center: text(k.cost_center),
            groups: k.groups.iter().map(|g| g.0.clone()).collect(),
        },
        limits: k.limits.resolve(&group_limits, &raw.defaults.limits),
        models,
        pools: key_pools,
        revoked: k.revoked,
        expires_at_ms: k.expires_at.map(|t| t.ms),
        previous_not_after_ms: Vec::new(),
        // Its own, else the highest of its groups', else normal.
        priority: k
            .priority
            .or_else(|| {
                k.groups
                    .iter()
                    .filter_map(|g| raw.groups.get(g)?.priority)
                    .max()
            })
            .unwrap_or_default(),
    }
}
