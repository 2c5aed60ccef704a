//! The effective price table as `tollgate prices` shows it: the rows a
//! model's price is looked up in, in lookup order (the policy's `prices`,
//! then the shipped table, then `settings.default_price`), each saying
//! where it comes from. A shipped row that a policy pattern entirely covers
//! is marked as overridden: no model reaches it.

use serde_json::{json, Map, Value};
use tollgate_core::policy::Policy;
use tollgate_core::price::{table, Price, Rates};

pub use crate::output::Format;

/// Where a row's price comes from.
#[derive(Debug, Clone, PartialEq)]
pub enum Origin {
    Policy,
    Shipped {
        source: String,
        as_of: String,
        note: Option<String>,
        /// The policy pattern that prices every model this row would.
        overridden_by: Option<String>,
    },
    DefaultPrice,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    /// A model pattern, or `*` for the default price.
    pub model: String,
    pub price: Price,
    pub origin: Origin,
}

/// The rows in lookup order; without a policy, the shipped table alone.
pub fn rows(policy: Option<&Policy>) -> Vec<Row> {
    let own = policy.map(Policy::prices).unwrap_or_default();
    let mut out: Vec<Row> = own
        .iter()
        .map(|(pattern, price)| Row {
            model: pattern.as_str().to_string(),
            price: price.clone(),
            origin: Origin::Policy,
        })
        .collect();
    out.extend(table::shipped().iter().map(|e| {
        Row {
            model: e.pattern.as_str().to_string(),
            price: e.price.clone(),
            origin: Origin::Shipped {
                source: e.source.clone(),
                as_of: e.as_of.clone(),
                note: e.note.clone(),
                overridden_by: own
                    .iter()
                    .find(|(p, _)| p.covers(&e.pattern))
                    .map(|(p, _)| p.as_str().to_string()),
            },
        }
    }));
    if let Some(default) = policy.and_then(|p| p.settings.default_price.as_ref()) {
        out.push(Row {
            model: "*".to_string(),
            price: default.clone(),
            origin: Origin::DefaultPrice,
        });
    }
    out
}

/// A USD amount as written in a price list: no trailing zeros.
fn num(n: f64) -> String {
    let s = format!("{n:.6}");
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

fn long_context(p: &Price) -> String {
    p.long_context.map_or_else(
        || "-".to_string(),
        |l| {
            format!(
                ">{}: {} / {}",
                l.above_input_tokens,
                num(l.rates.input),
                num(l.rates.output)
            )
        },
    )
}

fn multipliers(p: &Price) -> String {
    let all: Vec<String> = p
        .tiers
        .iter()
        .map(|(t, m)| format!("tier {t} x{}", num(*m)))
        .chain(
            p.regions
                .iter()
                .map(|(g, m)| format!("geo {g} x{}", num(*m))),
        )
        .collect();
    if all.is_empty() {
        "-".to_string()
    } else {
        all.join(", ")
    }
}

fn from(o: &Origin) -> String {
    match o {
        Origin::Policy => "policy".to_string(),
        Origin::Shipped {
            overridden_by: Some(p),
            ..
        } => format!("shipped, overridden by policy {p}"),
        Origin::Shipped { as_of, .. } => format!("shipped {as_of}"),
        Origin::DefaultPrice => "settings.default_price".to_string(),
    }
}

/// A fixed-width table; prices are USD per million tokens, searches USD per
/// 1,000. The sources are in `--format json`.
pub fn to_table(rows: &[Row]) -> String {
    let header = [
        "MODEL",
        "INPUT",
        "OUTPUT",
        "CACHE 5M",
        "CACHE 1H",
        "CACHE READ",
        "SEARCH/1K",
        "LONG CONTEXT",
        "MULTIPLIERS",
        "FROM",
    ];
    let cells: Vec<[String; 10]> = rows
        .iter()
        .map(|r| {
            let p = &r.price;
            [
                r.model.clone(),
                num(p.input),
                num(p.output),
                num(p.cache_write),
                num(p.cache_write_1h),
                num(p.cache_read),
                num(p.web_search_per_thousand),
                long_context(p),
                multipliers(p),
                from(&r.origin),
            ]
        })
        .collect();
    let mut widths = header.map(str::len);
    for row in &cells {
        for (w, c) in widths.iter_mut().zip(row) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cols: Vec<&str>| {
        let padded: Vec<String> = cols
            .iter()
            .zip(widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        padded.join("  ").trim_end().to_string() + "\n"
    };
    let mut out = line(header.to_vec());
    for row in &cells {
        out.push_str(&line(row.iter().map(String::as_str).collect()));
    }
    out
}

fn rates_json(r: &Rates) -> Map<String, Value> {
    let mut m = Map::new();
    m.insert("input".into(), json!(r.input));
    m.insert("output".into(), json!(r.output));
    m.insert("cache_write".into(), json!(r.cache_write));
    m.insert("cache_write_1h".into(), json!(r.cache_write_1h));
    m.insert("cache_read".into(), json!(r.cache_read));
    m
}

/// Every row with every effective value (defaults filled in) and its origin.
pub fn to_json(rows: &[Row]) -> Value {
    let pairs =
        |v: &[(String, f64)]| Value::Object(v.iter().map(|(k, m)| (k.clone(), json!(m))).collect());
    Value::Array(
        rows.iter()
            .map(|r| {
                let p = &r.price;
                let mut o = Map::new();
                o.insert("model".into(), json!(r.model));
                o.extend(rates_json(&p.rates()));
                o.insert(
                    "web_search_per_thousand".into(),
                    json!(p.web_search_per_thousand),
                );
                o.insert(
                    "long_context".into(),
                    p.long_context.map_or(Value::Null, |l| {
                        let mut m = Map::new();
                        m.insert("above_input_tokens".into(), json!(l.above_input_tokens));
                        m.extend(rates_json(&l.rates));
                        Value::Object(m)
                    }),
                );
                o.insert("tiers".into(), pairs(&p.tiers));
                o.insert("regions".into(), pairs(&p.regions));
                match &r.origin {
                    Origin::Policy => {
                        o.insert("from".into(), json!("policy"));
                    }
                    Origin::DefaultPrice => {
                        o.insert("from".into(), json!("settings.default_price"));
                    }
                    Origin::Shipped {
                        source,
                        as_of,
                        note,
                        overridden_by,
                    } => {
                        o.insert("from".into(), json!("shipped"));
                        o.insert("source".into(), json!(source));
                        o.insert("as_of".into(), json!(as_of));
                        o.insert("note".into(), json!(note));
                        o.insert("overridden_by".into(), json!(overridden_by));
                    }
                }
                Value::Object(o)
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(json: &str) -> Policy {
        tollgate_core::policy::compile(json.as_bytes(), "p.json", 0)
            .unwrap()
            .0
    }

    #[test]
    fn rows_follow_lookup_order_and_say_where_each_price_comes_from() {
        let p = policy(
            r#"{"version":1,"prices":{"claude-opus-*":{"input":1,"output":2},"claude-opus-5-5":{"input":3,"output":4}},
                "settings":{"default_price":{"input":7,"output":8}}}"#,
        );
        let rows = rows(Some(&p));
        let first: Vec<(&str, String)> = rows
            .iter()
            .take(2)
            .map(|r| (r.model.as_str(), from(&r.origin)))
            .collect();
        assert_eq!(
            first,
            [
                ("claude-opus-5-5", "policy".to_string()),
                ("claude-opus-*", "policy".to_string())
            ]
        );
        let shipped_opus = rows
            .iter()
            .find(|r| r.model == "claude-opus-5" && r.origin != Origin::Policy)
            .unwrap();
        assert_eq!(
            from(&shipped_opus.origin),
            "shipped, overridden by policy claude-opus-*"
        );
        let sonnet = rows
            .iter()
            .find(|r| r.model == "claude-sonnet-5-5")
            .unwrap();
        assert_eq!(from(&sonnet.origin), "shipped 2026-12-05");
        let last = rows.last().unwrap();
        assert_eq!(
            (last.model.as_str(), from(&last.origin)),
            ("*", "settings.default_price".to_string())
        );
        // Without a policy: the shipped table alone.
        assert_eq!(super::rows(None).len(), table::shipped().len());
    }

    #[test]
    fn table_and_json_show_every_effective_value() {
        let p = policy(
            r#"{"version":1,"prices":{"m-1":{"input":3,"output":15,
                "long_context":{"above_input_tokens":200000,"input":6,"output":22.5},
                "tiers":{"batch":0.5},"regions":{"us":1.1}}}}"#,
        );
        let rows: Vec<Row> = rows(Some(&p)).into_iter().take(1).collect();
        let text = to_table(&rows);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines,
            [
                "MODEL  INPUT  OUTPUT  CACHE 5M  CACHE 1H  CACHE READ  SEARCH/1K  LONG CONTEXT       MULTIPLIERS                   FROM",
                "m-1    3      15      3.75      6         0.3         10         >200000: 6 / 22.5  tier batch x0.5, geo us x1.1  policy",
            ]
        );
        let v = to_json(&rows);
        assert_eq!(v[0]["cache_write_1h"], 6.0);
        assert_eq!(
            v[0]["long_context"]["cache_write"], 7.5,
            "scaled with input"
        );
        assert_eq!(v[0]["tiers"]["batch"], 0.5);
        assert_eq!(v[0]["from"], "policy");
        let shipped = to_json(&super::rows(None));
        assert!(shipped[0]["source"]
            .as_str()
            .unwrap()
            .starts_with("https://"));
        assert_eq!(shipped[0]["as_of"], "2026-12-05");
    }
}
