//! Loading a policy: parse, check the whole document against the schema and
//! its cross-references (collecting every error), then build the runtime
//! [`Policy`] from the serde structs in `raw`.

use super::error::{PolicyError, PolicyReport};
use super::pattern::ModelPattern;
use super::raw::{RawLimits, RawPolicy, RawPrice};
use super::schema::{self, show, Problem};
use super::{
    Identity, Key, Limits, ModelSet, Policy, Pool, Price, Settings, UnknownRoutes, POOL_KINDS,
};
use crate::time;
use hashbrown::HashMap;
use serde_json::Value;

/// Parses and validates policy JSON. `file` names the source in errors;
/// `now_ms` decides which `expires_at` values deserve a warning.
pub fn compile(
    json: &[u8],
    file: &str,
    now_ms: u64,
) -> Result<(Policy, PolicyReport), Vec<PolicyError>> {
    let at = |p: Problem| p.in_file(file);
    // Fast path: a valid document is checked while it streams and parsed
    // straight into the typed structs. Anything it would refuse takes the
    // DOM path below, which reports every error with its path.
    if schema::conforms(json) {
        if let Ok(raw) = serde_json::from_slice::<RawPolicy>(json) {
            if references_resolve(&raw) {
                let warnings = expiry_warnings(&raw, now_ms).into_iter().map(at).collect();
                return Ok((build(raw), PolicyReport { warnings }));
            }
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
    let raw: RawPolicy = serde_json::from_value(value).map_err(|e| {
        vec![at(Problem {
            path: String::new(),
            value: None,
            reason: e.to_string(),
        })]
    })?;
    let warnings = expiry_warnings(&raw, now_ms).into_iter().map(at).collect();
    Ok((build(raw), PolicyReport { warnings }))
}

/// Checks that need more than one value: unique key ids and hashes, groups
/// that exist. Run on the raw document so they are reported together with
/// shape errors.
fn cross_references(doc: &Value, out: &mut Vec<Problem>) {
    let groups = doc.get("groups").and_then(Value::as_object);
    let Some(keys) = doc.get("keys").and_then(Value::as_array) else {
        return;
    };
    let mut ids: HashMap<&str, usize> = HashMap::new();
    let mut hashes: HashMap<String, usize> = HashMap::new();
    for (i, k) in keys.iter().enumerate() {
        if let Some(id) = k.get("id").and_then(Value::as_str) {
            if let Some(first) = ids.insert(id, i) {
                out.push(Problem {
                    path: format!("keys[{i}].id"),
                    value: Some(show(&Value::String(id.into()))),
                    reason: format!("duplicate key id (also keys[{first}].id)"),
                });
            }
        }
        if let Some(h) = k
            .get("key_sha256")
            .and_then(Value::as_str)
            .filter(|h| h.len() == 64)
        {
            if let Some(first) = hashes.insert(h.to_ascii_lowercase(), i) {
                out.push(Problem {
                    path: format!("keys[{i}].key_sha256"),
                    value: Some(show(&Value::String(h.into()))),
                    reason: format!("duplicate key hash (also keys[{first}].key_sha256): two entries for one virtual key"),
                });
            }
        }
        for (j, g) in k
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
                    path: format!("keys[{i}].groups[{j}]"),
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
}

/// The typed twin of [`cross_references`] for the fast path: whether key
/// ids and hashes are unique and every group a key names exists. When not,
/// the DOM path says which.
fn references_resolve(raw: &RawPolicy) -> bool {
    let mut ids = hashbrown::HashSet::with_capacity(raw.keys.len());
    let mut hashes = hashbrown::HashSet::with_capacity(raw.keys.len());
    raw.keys.iter().all(|k| {
        ids.insert(k.id.as_str())
            && hashes.insert(k.key_sha256.to_ascii_lowercase())
            && k.groups.iter().all(|g| raw.groups.contains_key(g))
    })
}

fn expiry_warnings(raw: &RawPolicy, now_ms: u64) -> Vec<Problem> {
    raw.keys
        .iter()
        .enumerate()
        .filter_map(|(i, k)| {
            let text = k.expires_at.as_deref()?;
            let at = time::parse_rfc3339(text).ok()?;
            (at <= now_ms).then(|| Problem {
                path: format!("keys[{i}].expires_at"),
                value: Some(show(&Value::String(text.into()))),
                reason: "already expired: this key is refused".to_string(),
            })
        })
        .collect()
}

fn limits(raw: &RawLimits) -> Limits {
    let count = |v: Option<f64>| v.map(|v| v as u64);
    Limits {
        requests_per_minute: count(raw.requests_per_minute),
        input_tokens_per_minute: count(raw.input_tokens_per_minute),
        output_tokens_per_minute: count(raw.output_tokens_per_minute),
        tokens_per_day: count(raw.tokens_per_day),
        budget_usd_per_day: raw.budget_usd_per_day,
        budget_usd_per_month: raw.budget_usd_per_month,
    }
}

/// Prices not given for cache classes follow Anthropic's published ratios.
fn price(raw: &RawPrice) -> Price {
    Price {
        input: raw.input,
        output: raw.output,
        cache_write: raw.cache_write.unwrap_or(raw.input * 1.25),
        cache_read: raw.cache_read.unwrap_or(raw.input * 0.1),
    }
}

fn patterns(list: &[String]) -> Vec<ModelPattern> {
    list.iter()
        .filter_map(|p| ModelPattern::parse(p).ok())
        .collect()
}

/// For each limit field: the key's own value, else the most restrictive value
/// among its groups, else the default.
fn resolve(own: &Limits, groups: &[&Limits], defaults: &Limits) -> Limits {
    fn pick<T: Copy + PartialOrd>(
        own: Option<T>,
        groups: impl Iterator<Item = Option<T>>,
        default: Option<T>,
    ) -> Option<T> {
        own.or_else(|| {
            groups.flatten().fold(None, |acc: Option<T>, v| match acc {
                Some(a) if a <= v => Some(a),
                _ => Some(v),
            })
        })
        .or(default)
    }
    macro_rules! field {
        ($f:ident) => {
            pick(own.$f, groups.iter().map(|g| g.$f), defaults.$f)
        };
    }
    Limits {
        requests_per_minute: field!(requests_per_minute),
        input_tokens_per_minute: field!(input_tokens_per_minute),
        output_tokens_per_minute: field!(output_tokens_per_minute),
        tokens_per_day: field!(tokens_per_day),
        budget_usd_per_day: field!(budget_usd_per_day),
        budget_usd_per_month: field!(budget_usd_per_month),
    }
}

/// Builds the runtime policy from a document that passed every check.
fn build(raw: RawPolicy) -> Policy {
    let default_models = raw
        .defaults
        .models
        .as_deref()
        .map(patterns)
        .unwrap_or_default();
    let default_limits = limits(&raw.defaults.limits);
    let groups: HashMap<&str, (Option<Vec<ModelPattern>>, Limits)> = raw
        .groups
        .iter()
        .map(|(name, g)| {
            (
                name.as_str(),
                (g.models.as_deref().map(patterns), limits(&g.limits)),
            )
        })
        .collect();
    let pools: Vec<Pool> = raw
        .pools
        .iter()
        .map(|(name, l)| Pool {
            name: name.clone(),
            limits: limits(l),
        })
        .collect();
    let pool_index: HashMap<&str, usize> = raw
        .pools
        .keys()
        .enumerate()
        .map(|(i, name)| (name.as_str(), i))
        .collect();

    let mut prices: Vec<(ModelPattern, Price)> = raw
        .prices
        .iter()
        .filter_map(|(p, v)| Some((ModelPattern::parse(p).ok()?, price(v))))
        .collect();
    // Exact names win over globs; among globs the longer (more specific) first.
    prices.sort_by_key(|(p, _)| (!p.is_exact(), std::cmp::Reverse(p.as_str().len())));

    let mut keys = Vec::with_capacity(raw.keys.len());
    let mut index = HashMap::with_capacity(raw.keys.len());
    for k in &raw.keys {
        let mut hash = [0u8; 32];
        if hex::decode_to_slice(k.key_sha256.to_ascii_lowercase(), &mut hash).is_ok() {
            index.insert(hash, keys.len());
        }
        let member_of: Vec<&(Option<Vec<ModelPattern>>, Limits)> = k
            .groups
            .iter()
            .filter_map(|g| groups.get(g.as_str()))
            .collect();
        let group_limits: Vec<&Limits> = member_of.iter().map(|(_, l)| l).collect();
        let models = if member_of.iter().any(|(m, _)| m.is_some()) {
            ModelSet::new(
                member_of
                    .iter()
                    .filter_map(|(m, _)| m.as_ref())
                    .flatten()
                    .cloned()
                    .collect(),
            )
        } else {
            ModelSet::new(default_models.clone())
        };
        let key_pools = POOL_KINDS
            .iter()
            .zip([&k.team, &k.project, &k.user, &k.app, &k.agent])
            .filter_map(|(kind, value)| {
                pool_index
                    .get(format!("{kind}:{}", value.as_deref()?).as_str())
                    .copied()
            })
            .collect();
        keys.push(Key {
            id: k.id.clone(),
            identity: Identity {
                user: k.user.clone(),
                team: k.team.clone(),
                project: k.project.clone(),
                app: k.app.clone(),
                agent: k.agent.clone(),
                environment: k.environment.clone(),
                cost_center: k.cost_center.clone(),
                groups: k.groups.clone(),
            },
            limits: resolve(&limits(&k.limits), &group_limits, &default_limits),
            models,
            pools: key_pools,
            revoked: k.revoked,
            expires_at_ms: k
                .expires_at
                .as_deref()
                .and_then(|t| time::parse_rfc3339(t).ok()),
        });
    }

    let time_zone = raw
        .settings
        .time_zone
        .clone()
        .unwrap_or_else(|| "UTC".to_string());
    Policy {
        keys,
        index,
        groups: raw.groups.keys().cloned().collect(),
        pools,
        prices,
        settings: Settings {
            unknown_routes: match raw.settings.unknown_routes.as_deref() {
                Some("pass") => UnknownRoutes::Pass,
                _ => UnknownRoutes::Deny,
            },
            cache_reads_count_toward_input_limit: raw
                .settings
                .cache_reads_count_toward_input_limit
                .unwrap_or(false),
            utc_offset_minutes: time::parse_offset_minutes(&time_zone).unwrap_or(0),
            time_zone,
            default_price: raw.settings.default_price.as_ref().map(price),
            hold_request_headers: raw.settings.hold_request_headers.unwrap_or(true),
        },
    }
}
