//! The price table Tollgate ships (`policies/prices.json`), embedded at
//! build time: the prices of current Anthropic and OpenAI models, each with
//! the documentation it was read from and when. A model's price is the
//! policy's `prices` entry if one matches, else this table's, else
//! `settings.default_price` ([`crate::policy::Policy::price`]).
//!
//! File format (`version` 1):
//!
//! ```json
//! { "version": 1,
//!   "prices": [
//!     { "models": ["claude-opus-5-5", "claude-opus-5-5-20*"],
//!       "source": "https://…", "as_of": "2026-12-05", "note": "optional",
//!       "price": { "input": 4, "output": 20, … } } ] }
//! ```
//!
//! `price` is exactly a policy price entry (same parser, same defaults);
//! `source`, `as_of` and `note` belong to the table, not to the policy.
//! Patterns are exact model ids plus `-20*` for their dated snapshots, so
//! that a model released after the table is never priced as its elder.

use crate::policy::leaf::{Text, Time, Version};
use crate::policy::raw::{Obj, RawPrice};
use crate::policy::ModelPattern;
use serde::Deserialize;
use std::sync::OnceLock;

/// The shipped table's text.
pub const SHIPPED_JSON: &str = include_str!("../../../policies/prices.json");

/// One model pattern of the table.
#[derive(Debug, Clone)]
pub struct Entry {
    pub pattern: ModelPattern,
    pub price: super::Price,
    /// Where the numbers were read.
    pub source: String,
    /// When they were read (a date).
    pub as_of: String,
    pub note: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTable {
    #[allow(dead_code)]
    version: Version,
    prices: Vec<Obj<RawEntry>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEntry {
    models: Vec<ModelPattern>,
    source: Text,
    as_of: Time,
    note: Option<Text>,
    price: Obj<RawPrice>,
}

/// Parses a table in the shipped format, most specific pattern first (the
/// order lookups take, as for the policy's own prices).
pub fn parse(json: &str) -> Result<Vec<Entry>, String> {
    let Obj(raw): Obj<RawTable> =
        serde_json::from_slice(json.as_bytes()).map_err(|e| e.to_string())?;
    let mut entries = Vec::new();
    for Obj(e) in raw.prices {
        let price = e.price.build();
        for pattern in e.models {
            if entries.iter().any(|x: &Entry| x.pattern == pattern) {
                return Err(format!("model {:?} is listed twice", pattern.as_str()));
            }
            entries.push(Entry {
                pattern,
                price: price.clone(),
                source: e.source.0.clone(),
                as_of: e.as_of.text.clone(),
                note: e.note.as_ref().map(|n| n.0.clone()),
            });
        }
    }
    entries.sort_by(|a, b| a.pattern.lookup_order(&b.pattern));
    Ok(entries)
}

/// The shipped table, parsed once per process (per VM in the filter). Its
/// validity is a unit test; a table that failed to parse would price
/// nothing, leaving unpriced models to the policy's own checks.
pub fn shipped() -> &'static [Entry] {
    static TABLE: OnceLock<Vec<Entry>> = OnceLock::new();
    TABLE.get_or_init(|| {
        parse(SHIPPED_JSON).unwrap_or_else(|e| {
            log::error!("tollgate: the shipped price table is invalid: {e}");
            Vec::new()
        })
    })
}

/// The shipped entry whose pattern matches a model first.
pub fn lookup(model: &str) -> Option<&'static Entry> {
    shipped().iter().find(|e| e.pattern.matches(model))
}
