//! Phase two of loading: check the raw policy and build the runtime form.

use super::error::{PolicyError, PolicyReport};
use super::pattern::ModelPattern;
use super::raw::{RawLimits, RawPolicy, RawPrice};
use super::{Identity, Key, Limits, ModelSet, Policy, Pool, Price, Settings, UnknownRoutes};
use crate::time;
use hashbrown::HashMap;

struct Checker<'a> {
    file: &'a str,
    errors: Vec<PolicyError>,
    warnings: Vec<PolicyError>,
}

impl Checker<'_> {
    fn error(&mut self, path: impl Into<String>, value: Option<String>, reason: impl Into<String>) {
        self.errors.push(PolicyError {
            file: self.file.to_string(),
            path: path.into(),
            value,
            reason: reason.into(),
        });
    }

    fn warn(&mut self, path: impl Into<String>, value: Option<String>, reason: impl Into<String>) {
        self.warnings.push(PolicyError {
            file: self.file.to_string(),
            path: path.into(),
            value,
            reason: reason.into(),
        });
    }

    fn patterns(&mut self, path: &str, list: &[String]) -> Vec<ModelPattern> {
        let mut out = Vec::with_capacity(list.len());
        for (i, text) in list.iter().enumerate() {
            match ModelPattern::parse(text) {
                Ok(p) => out.push(p),
                Err(reason) => self.error(format!("{path}[{i}]"), Some(quote(text)), reason),
            }
        }
        out
    }

    fn limits(&mut self, path: &str, raw: &RawLimits) -> Limits {
        let mut count = |name: &str, v: Option<f64>| -> Option<u64> {
            let v = v?;
            if !(v.is_finite() && v > 0.0 && v.fract() == 0.0 && v <= 1e15) {
                self.error(
                    format!("{path}.{name}"),
                    Some(num(v)),
                    "must be a positive whole number",
                );
                return None;
            }
            Some(v as u64)
        };
        let requests_per_minute = count("requests_per_minute", raw.requests_per_minute);
        let input_tokens_per_minute = count("input_tokens_per_minute", raw.input_tokens_per_minute);
        let output_tokens_per_minute =
            count("output_tokens_per_minute", raw.output_tokens_per_minute);
        let tokens_per_day = count("tokens_per_day", raw.tokens_per_day);
        let mut money = |name: &str, v: Option<f64>| -> Option<f64> {
            let v = v?;
            if !(v.is_finite() && v > 0.0) {
                self.error(
                    format!("{path}.{name}"),
                    Some(num(v)),
                    "must be a positive amount of USD",
                );
                return None;
            }
            Some(v)
        };
        Limits {
            requests_per_minute,
            input_tokens_per_minute,
            output_tokens_per_minute,
            tokens_per_day,
            budget_usd_per_day: money("budget_usd_per_day", raw.budget_usd_per_day),
            budget_usd_per_month: money("budget_usd_per_month", raw.budget_usd_per_month),
        }
    }

    fn price(&mut self, path: &str, raw: &RawPrice) -> Price {
        let mut amount = |name: &str, v: f64| -> f64 {
            if !(v.is_finite() && v >= 0.0) {
                self.error(
                    format!("{path}.{name}"),
                    Some(num(v)),
                    "must be a non-negative USD amount per million tokens",
                );
                return 0.0;
            }
            v
        };
        Price {
            input: amount("input", raw.input),
            output: amount("output", raw.output),
            cache_write: amount("cache_write", raw.cache_write.unwrap_or(raw.input * 1.25)),
            cache_read: amount("cache_read", raw.cache_read.unwrap_or(raw.input * 0.1)),
        }
    }
}

fn quote(s: &str) -> String {
    serde_json::Value::String(s.to_string()).to_string()
}

fn num(v: f64) -> String {
    serde_json::Number::from_f64(v)
        .map(|n| n.to_string())
        .unwrap_or_else(|| v.to_string())
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
    Limits {
        requests_per_minute: pick(
            own.requests_per_minute,
            groups.iter().map(|g| g.requests_per_minute),
            defaults.requests_per_minute,
        ),
        input_tokens_per_minute: pick(
            own.input_tokens_per_minute,
            groups.iter().map(|g| g.input_tokens_per_minute),
            defaults.input_tokens_per_minute,
        ),
        output_tokens_per_minute: pick(
            own.output_tokens_per_minute,
            groups.iter().map(|g| g.output_tokens_per_minute),
            defaults.output_tokens_per_minute,
        ),
        tokens_per_day: pick(
            own.tokens_per_day,
            groups.iter().map(|g| g.tokens_per_day),
            defaults.tokens_per_day,
        ),
        budget_usd_per_day: pick(
            own.budget_usd_per_day,
            groups.iter().map(|g| g.budget_usd_per_day),
            defaults.budget_usd_per_day,
        ),
        budget_usd_per_month: pick(
            own.budget_usd_per_month,
            groups.iter().map(|g| g.budget_usd_per_month),
            defaults.budget_usd_per_month,
        ),
    }
}

const POOL_KINDS: [&str; 5] = ["team", "project", "user", "app", "agent"];

/// Parses and validates policy JSON. `file` names the source in errors;
/// `now_ms` decides which `expires_at` values deserve a warning.
pub fn compile(
    json: &[u8],
    file: &str,
    now_ms: u64,
) -> Result<(Policy, PolicyReport), Vec<PolicyError>> {
    let mut c = Checker {
        file,
        errors: Vec::new(),
        warnings: Vec::new(),
    };
    let raw: RawPolicy = match serde_json::from_slice(json) {
        Ok(raw) => raw,
        Err(e) => {
            c.error("", None, e.to_string());
            return Err(c.errors);
        }
    };
    if raw.version != 1 {
        c.error(
            "version",
            Some(raw.version.to_string()),
            "unsupported policy version (expected 1)",
        );
    }

    let default_models = raw
        .defaults
        .models
        .as_deref()
        .map(|m| c.patterns("defaults.models", m));
    let default_limits = c.limits("defaults.limits", &raw.defaults.limits);

    let mut groups: HashMap<&str, (Option<Vec<ModelPattern>>, Limits)> = HashMap::new();
    for (name, g) in &raw.groups {
        let path = format!("groups.{name}");
        let models = g
            .models
            .as_deref()
            .map(|m| c.patterns(&format!("{path}.models"), m));
        let limits = c.limits(&format!("{path}.limits"), &g.limits);
        groups.insert(name.as_str(), (models, limits));
    }

    let mut pools = Vec::with_capacity(raw.pools.len());
    let mut pool_index: HashMap<&str, usize> = HashMap::new();
    for (name, limits) in &raw.pools {
        let path = format!("pools.{name}");
        match name.split_once(':') {
            Some((kind, value)) if POOL_KINDS.contains(&kind) && !value.is_empty() => {}
            _ => c.error(
                &path,
                Some(quote(name)),
                format!(
                    "pool names are <kind>:<value> with kind one of {}",
                    POOL_KINDS.join(", ")
                ),
            ),
        }
        pool_index.insert(name.as_str(), pools.len());
        pools.push(Pool {
            name: name.clone(),
            limits: c.limits(&path, limits),
        });
    }

    let mut prices = Vec::with_capacity(raw.prices.len());
    for (pattern, p) in &raw.prices {
        let path = format!("prices.{pattern}");
        let price = c.price(&path, p);
        match ModelPattern::parse(pattern) {
            Ok(mp) => prices.push((mp, price)),
            Err(reason) => c.error(&path, Some(quote(pattern)), reason),
        }
    }
    // Exact names win over globs; among globs the longer (more specific) first.
    prices.sort_by_key(|(p, _)| (!p.is_exact(), std::cmp::Reverse(p.as_str().len())));

    let unknown_routes = match raw.settings.unknown_routes.as_deref() {
        None | Some("deny") => UnknownRoutes::Deny,
        Some("pass") => UnknownRoutes::Pass,
        Some(other) => {
            c.error(
                "settings.unknown_routes",
                Some(quote(other)),
                "must be \"deny\" or \"pass\"",
            );
            UnknownRoutes::Deny
        }
    };
    let time_zone = raw
        .settings
        .time_zone
        .clone()
        .unwrap_or_else(|| "UTC".to_string());
    let utc_offset_minutes = match time::parse_offset_minutes(&time_zone) {
        Ok(m) => m,
        Err(reason) => {
            c.error("settings.time_zone", Some(quote(&time_zone)), reason);
            0
        }
    };
    let default_price = raw
        .settings
        .default_price
        .as_ref()
        .map(|p| c.price("settings.default_price", p));

    let mut keys = Vec::with_capacity(raw.keys.len());
    let mut index: HashMap<[u8; 32], usize> = HashMap::with_capacity(raw.keys.len());
    let mut ids: HashMap<&str, usize> = HashMap::with_capacity(raw.keys.len());
    for (i, k) in raw.keys.iter().enumerate() {
        let path = format!("keys[{i}]");
        if k.id.is_empty() {
            c.error(
                format!("{path}.id"),
                Some(quote(&k.id)),
                "key id cannot be empty",
            );
        } else if let Some(first) = ids.insert(k.id.as_str(), i) {
            c.error(
                format!("{path}.id"),
                Some(quote(&k.id)),
                format!("duplicate key id (also keys[{first}].id)"),
            );
        }
        let mut hash = [0u8; 32];
        let hex_ok =
            k.key_sha256.len() == 64 && hex::decode_to_slice(&k.key_sha256, &mut hash).is_ok();
        if !hex_ok {
            c.error(
                format!("{path}.key_sha256"),
                Some(quote(&k.key_sha256)),
                "must be 64 hex characters (the SHA-256 of the virtual key)",
            );
        } else if let Some(first) = index.get(&hash) {
            c.error(
                format!("{path}.key_sha256"),
                Some(quote(&k.key_sha256)),
                format!("duplicate key hash (also keys[{first}].key_sha256)"),
            );
        }

        let mut key_groups: Vec<&(Option<Vec<ModelPattern>>, Limits)> = Vec::new();
        for (j, g) in k.groups.iter().enumerate() {
            match groups.get(g.as_str()) {
                Some(group) => key_groups.push(group),
                None => c.error(
                    format!("{path}.groups[{j}]"),
                    Some(quote(g)),
                    "unknown group (not defined under \"groups\")",
                ),
            }
        }
        let own = c.limits(&format!("{path}.limits"), &k.limits);
        let group_limits: Vec<&Limits> = key_groups.iter().map(|(_, l)| l).collect();
        let limits = resolve(&own, &group_limits, &default_limits);

        let group_models: Vec<ModelPattern> = key_groups
            .iter()
            .filter_map(|(m, _)| m.as_ref())
            .flatten()
            .cloned()
            .collect();
        let has_group_models = key_groups.iter().any(|(m, _)| m.is_some());
        let models = if has_group_models {
            ModelSet::new(group_models)
        } else {
            ModelSet::new(default_models.clone().unwrap_or_default())
        };

        let expires_at_ms = match &k.expires_at {
            None => None,
            Some(text) => match time::parse_rfc3339(text) {
                Ok(ms) => {
                    if ms <= now_ms {
                        c.warn(
                            format!("{path}.expires_at"),
                            Some(quote(text)),
                            "already expired: this key is refused",
                        );
                    }
                    Some(ms)
                }
                Err(reason) => {
                    c.error(format!("{path}.expires_at"), Some(quote(text)), reason);
                    None
                }
            },
        };

        let identity = Identity {
            user: k.user.clone(),
            team: k.team.clone(),
            project: k.project.clone(),
            app: k.app.clone(),
            agent: k.agent.clone(),
            environment: k.environment.clone(),
            cost_center: k.cost_center.clone(),
            groups: k.groups.clone(),
        };
        let key_pools = POOL_KINDS
            .iter()
            .zip([&k.team, &k.project, &k.user, &k.app, &k.agent])
            .filter_map(|(kind, value)| {
                let value = value.as_deref()?;
                pool_index.get(format!("{kind}:{value}").as_str()).copied()
            })
            .collect();

        if hex_ok {
            index.entry(hash).or_insert(keys.len());
        }
        keys.push(Key {
            id: k.id.clone(),
            identity,
            limits,
            models,
            pools: key_pools,
            revoked: k.revoked,
            expires_at_ms,
        });
    }

    if !c.errors.is_empty() {
        return Err(c.errors);
    }
    let policy = Policy {
        keys,
        index,
        pools,
        groups: raw.groups.keys().cloned().collect(),
        prices,
        settings: Settings {
            unknown_routes,
            cache_reads_count_toward_input_limit: raw
                .settings
                .cache_reads_count_toward_input_limit
                .unwrap_or(false),
            utc_offset_minutes,
            time_zone,
            default_price,
        },
    };
    Ok((
        policy,
        PolicyReport {
            warnings: c.warnings,
        },
    ))
}
