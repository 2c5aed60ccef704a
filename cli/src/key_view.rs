//! Keys as `tollgate key list` and `tollgate key show` print them, read from
//! the compiled policy: limits and models resolved exactly as the gateway
//! resolves them. Neither prints a secret (the policy holds none); `show`
//! prints the SHA-256 of each of a key's secrets, `list` only their count.

use crate::collector::sheet::{self, Align, Column};
use anyhow::{bail, Result};
use serde_json::{json, Map, Value};
use tollgate_core::meter::Metric;
use tollgate_core::policy::{Identity, Key, KeyStatus, Limit, Limits, Policy};
use tollgate_core::time::format_rfc3339;

/// A key as it stands at one instant.
#[derive(Debug)]
pub struct Listed<'p> {
    pub key: &'p Key,
    pub status: KeyStatus,
}

/// Every key of the policy, in file order, as it stands at `now_ms`.
pub fn list(policy: &Policy, now_ms: u64) -> Vec<Listed<'_>> {
    policy
        .keys()
        .iter()
        .map(|key| Listed {
            key,
            status: key.status(now_ms),
        })
        .collect()
}

/// `active`, `revoked`, `expired`, `rotating`: the status as JSON names it.
fn status_name(s: KeyStatus) -> &'static str {
    match s {
        KeyStatus::Active => "active",
        KeyStatus::Revoked => "revoked",
        KeyStatus::Expired { .. } => "expired",
        KeyStatus::Rotating { .. } => "rotating",
    }
}

/// The status as people read it: `rotating until 2026-12-06T12:00:00Z`.
pub fn status_text(s: KeyStatus) -> String {
    match s {
        KeyStatus::Rotating { until_ms } => format!("rotating until {}", format_rfc3339(until_ms)),
        KeyStatus::Expired { at_ms } => format!("expired at {}", format_rfc3339(at_ms)),
        other => status_name(other).to_string(),
    }
}

fn or_dash(v: &Option<String>) -> String {
    v.clone().unwrap_or_else(|| "-".to_string())
}

/// The columns of `key list` (a function: its rows borrow the policy).
fn list_columns<'p>() -> [Column<Listed<'p>>; 6] {
    [
        Column {
            table: Some("id"),
            csv: None,
            width: 0,
            gap: 0,
            align: Align::Left,
            value: |l| l.key.id.clone(),
        },
        Column {
            table: Some("user"),
            csv: None,
            width: 0,
            gap: 2,
            align: Align::Left,
            value: |l| or_dash(&l.key.identity.user),
        },
        Column {
            table: Some("team"),
            csv: None,
            width: 0,
            gap: 2,
            align: Align::Left,
            value: |l| or_dash(&l.key.identity.team),
        },
        Column {
            table: Some("groups"),
            csv: None,
            width: 0,
            gap: 2,
            align: Align::Left,
            value: |l| match l.key.identity.groups.as_slice() {
                [] => "-".to_string(),
                groups => groups.join(","),
            },
        },
        Column {
            table: Some("status"),
            csv: None,
            width: 0,
            gap: 2,
            align: Align::Left,
            value: |l| status_text(l.status),
        },
        Column {
            table: Some("secrets"),
            csv: None,
            width: 0,
            gap: 2,
            align: Align::Right,
            value: |l| l.key.secrets().to_string(),
        },
    ]
}

/// `tollgate key list`: one line per key under a header.
pub fn list_table(rows: &[Listed]) -> String {
    sheet::table(&list_columns(), true, rows)
}

/// `tollgate key list --format json`: one object per key.
pub fn list_json(rows: &[Listed]) -> Value {
    rows.iter()
        .map(|l| {
            let mut o = Map::new();
            o.insert("id".into(), json!(l.key.id));
            insert_some(&mut o, "user", &l.key.identity.user);
            insert_some(&mut o, "team", &l.key.identity.team);
            o.insert("groups".into(), json!(l.key.identity.groups));
            insert_status(&mut o, l.status);
            insert_some(
                &mut o,
                "expires_at",
                &l.key.expires_at_ms.map(format_rfc3339),
            );
            o.insert("secrets".into(), json!(l.key.secrets()));
            Value::Object(o)
        })
        .collect()
}

fn insert_some(o: &mut Map<String, Value>, name: &str, v: &Option<String>) {
    if let Some(v) = v {
        o.insert(name.into(), json!(v));
    }
}

/// `"status"`, and the instant that qualifies it (`rotating_until`,
/// `expired_at`) when there is one.
fn insert_status(o: &mut Map<String, Value>, s: KeyStatus) {
    o.insert("status".into(), json!(status_name(s)));
    match s {
        KeyStatus::Rotating { until_ms } => {
            o.insert("rotating_until".into(), json!(format_rfc3339(until_ms)));
        }
        KeyStatus::Expired { at_ms } => {
            o.insert("expired_at".into(), json!(format_rfc3339(at_ms)));
        }
        KeyStatus::Active | KeyStatus::Revoked => {}
    }
}

/// One key with everything the gateway applies to it.
#[derive(Debug)]
pub struct Shown<'p> {
    pub key: &'p Key,
    pub status: KeyStatus,
    /// Each secret's SHA-256 (hex) and, for a previous one, its `not_after`.
    pub secrets: Vec<(String, Option<u64>)>,
    /// Pools the key draws from: name and limits.
    pub pools: Vec<(&'p str, &'p Limits)>,
    pub now_ms: u64,
}

/// The key `id` of `policy` at `now_ms`; an unknown id names the known ones.
pub fn show<'p>(policy: &'p Policy, id: &str, now_ms: u64) -> Result<Shown<'p>> {
    let Some((index, key)) = policy.keys().iter().enumerate().find(|(_, k)| k.id == id) else {
        let ids: Vec<&str> = policy.keys().iter().map(|k| k.id.as_str()).collect();
        bail!("no key with id {id:?} (ids: {})", ids.join(", "));
    };
    Ok(Shown {
        key,
        status: key.status(now_ms),
        secrets: policy
            .secrets_of(index)
            .into_iter()
            .map(|(hash, s)| (hex::encode(hash), s.not_after_ms))
            .collect(),
        pools: key
            .pools
            .iter()
            .filter_map(|i| policy.pool(*i))
            .map(|p| (p.name.as_str(), &p.limits))
            .collect(),
        now_ms,
    })
}

/// `50`, `USD 20`, and the limit's settings when it sets any.
fn limit_text(metric: Metric, limit: &Limit) -> String {
    let amount = if metric.is_usd() {
        format!("USD {}", limit.amount)
    } else {
        format!("{}", limit.amount)
    };
    let mut settings = Vec::new();
    if limit.strict {
        settings.push("strict".to_string());
    }
    if let Some(f) = limit.on_store_failure {
        settings.push(format!("on_store_failure: {}", f.as_str()));
    }
    if settings.is_empty() {
        amount
    } else {
        format!("{amount} ({})", settings.join(", "))
    }
}

/// A limit as the policy writes it: its amount, or an object when it sets
/// how it behaves.
fn limit_json(limit: &Limit) -> Value {
    // Whole amounts as the policy writes them (`2000`, not `2000.0`).
    let amount = if limit.amount.fract() == 0.0 && limit.amount.abs() < 1e15 {
        json!(limit.amount as i64)
    } else {
        json!(limit.amount)
    };
    if !limit.strict && limit.on_store_failure.is_none() {
        return amount;
    }
    let mut o = Map::new();
    o.insert("limit".into(), amount);
    if limit.strict {
        o.insert("strict".into(), json!(true));
    }
    if let Some(f) = limit.on_store_failure {
        o.insert("on_store_failure".into(), json!(f.as_str()));
    }
    Value::Object(o)
}

fn limits_json(limits: &Limits) -> Value {
    Value::Object(
        limits
            .iter()
            .map(|(m, l)| (m.name().to_string(), limit_json(&l)))
            .collect(),
    )
}

/// A key's identity attributes by their policy field names, in entry order.
fn attributes(id: &Identity) -> [(&'static str, &Option<String>); 7] {
    [
        ("user", &id.user),
        ("team", &id.team),
        ("project", &id.project),
        ("app", &id.app),
        ("agent", &id.agent),
        ("environment", &id.environment),
        ("cost_center", &id.cost_center),
    ]
}

const DETAIL_COLUMNS: [Column<(String, String)>; 2] = [
    Column {
        table: Some("field"),
        csv: None,
        width: 0,
        gap: 0,
        align: Align::Left,
        value: |(name, _)| name.clone(),
    },
    Column {
        table: Some("value"),
        csv: None,
        width: 0,
        gap: 2,
        align: Align::Left,
        value: |(_, value)| value.clone(),
    },
];

/// `tollgate key show`: one line per field; a field of several values
/// (secrets, limits, pools) continues on lines of its own.
pub fn show_text(s: &Shown) -> String {
    let mut rows: Vec<(String, String)> = Vec::new();
    let mut field = |name: &str, values: Vec<String>| {
        for (i, v) in values.into_iter().enumerate() {
            rows.push((
                if i == 0 {
                    name.to_string()
                } else {
                    String::new()
                },
                v,
            ));
        }
    };
    let id = &s.key.identity;
    field("id", vec![s.key.id.clone()]);
    field("status", vec![status_text(s.status)]);
    for (name, v) in attributes(id) {
        field(name, v.iter().cloned().collect());
    }
    if !id.groups.is_empty() {
        field("groups", vec![id.groups.join(", ")]);
    }
    field(
        "expires_at",
        vec![s
            .key
            .expires_at_ms
            .map_or_else(|| "never".to_string(), format_rfc3339)],
    );
    field(
        "secrets",
        s.secrets
            .iter()
            .map(|(hash, not_after)| match not_after {
                None => format!("current   sha256 {hash}"),
                Some(at) if *at > s.now_ms => {
                    format!(
                        "previous  sha256 {hash}  works until {}",
                        format_rfc3339(*at)
                    )
                }
                Some(at) => format!(
                    "previous  sha256 {hash}  refused since {}",
                    format_rfc3339(*at)
                ),
            })
            .collect(),
    );
    field("models", vec![s.key.models.describe()]);
    let name_width = Metric::all().map(|m| m.name().len()).max().unwrap_or(0);
    let limits: Vec<String> = s
        .key
        .limits
        .iter()
        .map(|(m, l)| format!("{:<name_width$}  {}", m.name(), limit_text(m, &l)))
        .collect();
    field(
        "limits",
        if limits.is_empty() {
            vec!["none".to_string()]
        } else {
            limits
        },
    );
    field(
        "pools",
        s.pools
            .iter()
            .map(|(name, limits)| {
                let all: Vec<String> = limits
                    .iter()
                    .map(|(m, l)| format!("{} {}", m.name(), limit_text(m, &l)))
                    .collect();
                format!("{name}: {}", all.join(", "))
            })
            .collect(),
    );
    sheet::table(&DETAIL_COLUMNS, false, &rows)
}

/// `tollgate key show --format json`.
pub fn show_json(s: &Shown) -> Value {
    let id = &s.key.identity;
    let mut o = Map::new();
    o.insert("id".into(), json!(s.key.id));
    insert_status(&mut o, s.status);
    for (name, v) in attributes(id) {
        insert_some(&mut o, name, v);
    }
    o.insert("groups".into(), json!(id.groups));
    o.insert("revoked".into(), json!(s.key.revoked));
    insert_some(
        &mut o,
        "expires_at",
        &s.key.expires_at_ms.map(format_rfc3339),
    );
    let secrets: Vec<Value> = s
        .secrets
        .iter()
        .map(|(hash, not_after)| match not_after {
            None => json!({ "key_sha256": hash, "current": true }),
            Some(at) => json!({
                "key_sha256": hash,
                "current": false,
                "not_after": format_rfc3339(*at),
                "works": *at > s.now_ms,
            }),
        })
        .collect();
    o.insert("secrets".into(), Value::Array(secrets));
    o.insert(
        "models".into(),
        json!(s.key.models.patterns().collect::<Vec<_>>()),
    );
    o.insert("limits".into(), limits_json(&s.key.limits));
    o.insert(
        "pools".into(),
        s.pools
            .iter()
            .map(|(name, limits)| json!({ "name": name, "limits": limits_json(limits) }))
            .collect(),
    );
    Value::Object(o)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tollgate_core::vkey::sha256_hex;

    const NOW: u64 = 1_796_472_000_000; // 2026-12-05T12:00:00Z

    fn policy() -> Policy {
        let json = format!(
            r#"{{"version":1,
              "defaults":{{"models":["claude-haiku-*"],"limits":{{"requests_per_minute":60,"output_tokens_per_minute":20000}}}},
              "groups":{{"eng":{{"models":["claude-sonnet-*","claude-haiku-*"],"limits":{{"requests_per_minute":40}}}}}},
              "pools":{{"team:payments":{{"tokens_per_day":5000000,"budget_usd_per_month":{{"limit":2000,"strict":true}}}}}},
              "keys":[
                {{"id":"alice","key_sha256":"{}","previous":[{{"key_sha256":"{}","not_after":"2026-12-06T12:00:00Z"}},{{"key_sha256":"{}","not_after":"2026-12-01T00:00:00Z"}}],
                  "user":"alice@example.com","team":"payments","groups":["eng"],
                  "limits":{{"budget_usd_per_day":{{"limit":20.5,"on_store_failure":"open"}}}},"expires_at":"2027-06-30T00:00:00Z"}},
                {{"id":"bob","key_sha256":"{}","revoked":true}},
                {{"id":"old","key_sha256":"{}","expires_at":"2020-01-01T00:00:00Z"}}]}}"#,
            sha256_hex("tg-alice-new"),
            sha256_hex("tg-alice-old"),
            sha256_hex("tg-alice-older"),
            sha256_hex("tg-bob"),
            sha256_hex("tg-old"),
        );
        tollgate_core::policy::compile(json.as_bytes(), "p.json", 0)
            .unwrap()
            .0
    }

    #[test]
    fn list_shows_status_and_secret_counts_never_a_secret_or_hash() {
        let p = policy();
        let rows = list(&p, NOW);
        let table = list_table(&rows);
        assert_eq!(
            table,
            "id     user               team      groups  status                               secrets\n\
             alice  alice@example.com  payments  eng     rotating until 2026-12-06T12:00:00Z        3\n\
             bob    -                  -         -       revoked                                    1\n\
             old    -                  -         -       expired at 2020-01-01T00:00:00Z            1"
        );
        let json = list_json(&rows);
        assert_eq!(
            json[0],
            json!({"id":"alice","user":"alice@example.com","team":"payments","groups":["eng"],
                   "status":"rotating","rotating_until":"2026-12-06T12:00:00Z",
                   "expires_at":"2027-06-30T00:00:00Z","secrets":3})
        );
        assert_eq!(
            json[2],
            json!({"id":"old","groups":[],"status":"expired","expired_at":"2020-01-01T00:00:00Z",
                   "expires_at":"2020-01-01T00:00:00Z","secrets":1})
        );
        let all = format!("{table}{json}");
        for k in ["tg-alice-new", "tg-alice-old", "tg-bob"] {
            assert!(!all.contains(k) && !all.contains(&sha256_hex(k)), "{k}");
        }
        // Once the grace period is over the key is plainly active.
        assert_eq!(
            list_json(&list(&p, NOW + 86_400_000))[0]["status"],
            "active"
        );
    }

    #[test]
    fn show_resolves_limits_models_pools_and_lists_secret_hashes() {
        let p = policy();
        let s = show(&p, "alice", NOW).unwrap();
        let text = show_text(&s);
        let want = format!(
            "id          alice\n\
             status      rotating until 2026-12-06T12:00:00Z\n\
             user        alice@example.com\n\
             team        payments\n\
             groups      eng\n\
             expires_at  2027-06-30T00:00:00Z\n\
             secrets     current   sha256 {}\n\
             \x20           previous  sha256 {}  refused since 2026-12-01T00:00:00Z\n\
             \x20           previous  sha256 {}  works until 2026-12-06T12:00:00Z\n\
             models      claude-sonnet-*, claude-haiku-*\n\
             limits      requests_per_minute       40\n\
             \x20           output_tokens_per_minute  20000\n\
             \x20           budget_usd_per_day        USD 20.5 (on_store_failure: open)\n\
             pools       team:payments: tokens_per_day 5000000, budget_usd_per_month USD 2000 (strict)",
            sha256_hex("tg-alice-new"),
            sha256_hex("tg-alice-older"),
            sha256_hex("tg-alice-old"),
        );
        assert_eq!(text, want);
        let j = show_json(&s);
        assert_eq!(j["status"], "rotating");
        assert_eq!(j["models"], json!(["claude-sonnet-*", "claude-haiku-*"]));
        assert_eq!(
            j["limits"],
            json!({"requests_per_minute":40,"output_tokens_per_minute":20000,
                   "budget_usd_per_day":{"limit":20.5,"on_store_failure":"open"}})
        );
        assert_eq!(
            j["pools"],
            json!([{"name":"team:payments","limits":{"tokens_per_day":5000000,
                    "budget_usd_per_month":{"limit":2000,"strict":true}}}])
        );
        assert_eq!(
            j["secrets"][2],
            json!({"key_sha256": sha256_hex("tg-alice-old"), "current": false,
                   "not_after": "2026-12-06T12:00:00Z", "works": true})
        );
        assert_eq!(
            show(&p, "carol", NOW).unwrap_err().to_string(),
            "no key with id \"carol\" (ids: alice, bob, old)"
        );
    }
}
