//! Costs to the micro-dollar for each class, the tier and region
//! multipliers and the long-context switch. Each expected figure is worked
//! out in the comment above it (and in `docs/metering.md`).
#![allow(clippy::unwrap_used)]

use super::*;
use crate::policy::raw::RawPrice;

/// A price from its policy JSON, through the policy's own parser.
fn price(json: &str) -> Price {
    serde_json::from_str::<RawPrice>(json).unwrap().build()
}

fn assert_usd(got: f64, want: f64) {
    assert!(
        (got - want).abs() < 1e-9,
        "got {got:.9}, want {want:.9} (difference {:e})",
        got - want
    );
}

#[test]
fn cost_sums_every_class_at_its_own_price() {
    let sonnet = Price::from_rates(Rates {
        input: 3.0,
        output: 15.0,
        cache_write: 3.75,
        cache_write_1h: 6.0,
        cache_read: 0.3,
    });
    let u = Usage {
        input: 1_000,
        output: 2_000,
        cache_write: 10_000,
        cache_read: 100_000,
        ..Default::default()
    };
    // 0.003 + 0.030 + 0.0375 + 0.030
    assert!((sonnet.cost(&u) - 0.1005).abs() < 1e-12);
}

#[test]
fn unspecified_classes_follow_the_published_ratios_to_input() {
    let p = price(r#"{"input": 4, "output": 20}"#);
    assert_eq!(
        (
            p.cache_write,
            p.cache_write_1h,
            p.cache_read,
            p.web_search_per_thousand
        ),
        (5.0, 8.0, 0.4, 10.0)
    );
    // Long-context cache classes keep the base ratio to input (0.05 here).
    let p = price(
        r#"{"input": 2, "output": 10, "cache_read": 0.1,
            "long_context": {"above_input_tokens": 272000, "input": 4, "output": 15}}"#,
    );
    let lc = p.long_context.unwrap();
    assert_eq!(
        (
            lc.above_input_tokens,
            lc.rates.cache_write,
            lc.rates.cache_write_1h,
            lc.rates.cache_read
        ),
        (272_000, 5.0, 8.0, 0.2)
    );
}

/// Claude Opus 5.5 as the shipped table prices it ($4 in, $20 out, $5 and $8
/// per million 5-minute and 1-hour cache writes, $0.20 cache reads, $10 per
/// 1,000 searches, batch 0.5, US-only inference 1.1).
fn opus_5_5() -> Price {
    price(
        r#"{"input": 4, "output": 20, "cache_write": 5, "cache_write_1h": 8, "cache_read": 0.2,
            "web_search_per_thousand": 10, "tiers": {"batch": 0.5, "priority": 2},
            "regions": {"us": 1.1}}"#,
    )
}

#[test]
fn each_class_costs_its_own_price_to_the_micro_dollar() {
    let p = opus_5_5();
    let one = |u: Usage| p.cost(&u);
    // 1,234 input tokens at $4/M = $0.004936
    assert_usd(
        one(Usage {
            input: 1_234,
            ..Default::default()
        }),
        0.004_936,
    );
    // 567 output tokens at $20/M = $0.01134
    assert_usd(
        one(Usage {
            output: 567,
            ..Default::default()
        }),
        0.011_34,
    );
    // 10,000 5-minute cache writes at $5/M = $0.05
    assert_usd(
        one(Usage {
            cache_write: 10_000,
            ..Default::default()
        }),
        0.05,
    );
    // 12,345 1-hour cache writes at $8/M = $0.09876
    assert_usd(
        one(Usage {
            cache_write_1h: 12_345,
            ..Default::default()
        }),
        0.098_76,
    );
    // 100,000 cache reads at $0.20/M = $0.02
    assert_usd(
        one(Usage {
            cache_read: 100_000,
            ..Default::default()
        }),
        0.02,
    );
    // 3 web searches at $10 per 1,000 = $0.03
    assert_usd(
        one(Usage {
            web_search_requests: 3,
            ..Default::default()
        }),
        0.03,
    );
    // Reasoning tokens are part of output: never priced a second time.
    assert_usd(
        one(Usage {
            output: 567,
            reasoning: 400,
            ..Default::default()
        }),
        0.011_34,
    );
}

#[test]
fn served_tier_and_region_multiply_token_costs_but_not_searches() {
    let p = opus_5_5();
    let u = |tier: Option<&str>, geo: Option<&str>| Usage {
        input: 1_000,
        output: 500,
        cache_write_1h: 2_000,
        web_search_requests: 3,
        service_tier: tier.map(str::to_string),
        inference_geo: geo.map(str::to_string),
        ..Default::default()
    };
    // Tokens: 1,000 x $4 + 500 x $20 + 2,000 x $8 = $0.03; searches $0.03.
    let q = p.quote(&u(None, None));
    assert_usd(q.usd, 0.06);
    assert_eq!((q.multiplier, q.long_context), (1.0, false));
    // Tiers the price does not list (and "standard") are at list price.
    assert_usd(p.cost(&u(Some("standard"), Some("global"))), 0.06);
    // Priority: $0.03 x 2 + $0.03 = $0.09.
    assert_usd(p.cost(&u(Some("priority"), None)), 0.09);
    // Batch: $0.03 x 0.5 + $0.03 = $0.045.
    assert_usd(p.cost(&u(Some("batch"), None)), 0.045);
    // US-only inference: $0.03 x 1.1 + $0.03 = $0.063.
    assert_usd(p.cost(&u(None, Some("us"))), 0.063);
    // Both multiply: $0.03 x 2 x 1.1 + $0.03 = $0.096.
    let q = p.quote(&u(Some("priority"), Some("us")));
    assert_usd(q.usd, 0.096);
    assert!((q.multiplier - 2.2).abs() < 1e-12);
}

#[test]
fn long_context_rates_apply_to_the_whole_request_above_the_threshold() {
    // Sonnet 4.5 with the 1M-context beta: $3 / $15 up to 200K prompt
    // tokens, $6 / $22.50 for the whole request above; cache classes keep
    // their ratio to input ($7.50, $12, $0.60).
    let p = price(
        r#"{"input": 3, "output": 15, "cache_write": 3.75, "cache_write_1h": 6, "cache_read": 0.3,
            "long_context": {"above_input_tokens": 200000, "input": 6, "output": 22.5}}"#,
    );
    // Exactly 200,000 prompt tokens (10,000 + 40,000 + 150,000) is not above:
    // 10,000 x $3 + 40,000 x $3.75 + 150,000 x $0.30 + 2,000 x $15
    // = $0.03 + $0.15 + $0.045 + $0.03 = $0.255.
    let at = Usage {
        input: 10_000,
        cache_write: 40_000,
        cache_read: 150_000,
        output: 2_000,
        ..Default::default()
    };
    let q = p.quote(&at);
    assert_usd(q.usd, 0.255);
    assert!(!q.long_context);
    // One more input token crosses it, and every class switches:
    // 10,001 x $6 + 40,000 x $7.50 + 150,000 x $0.60 + 2,000 x $22.50
    // = $0.060006 + $0.30 + $0.09 + $0.045 = $0.495006.
    let over = Usage {
        input: 10_001,
        ..at.clone()
    };
    let q = p.quote(&over);
    assert_usd(q.usd, 0.495_006);
    assert!(q.long_context);
    // Cache writes and reads count toward the threshold: 1-hour writes too.
    let cached = Usage {
        input: 1,
        cache_write_1h: 200_000,
        ..Default::default()
    };
    // 1 x $6 + 200,000 x $12 = $0.000006 + $2.40.
    assert_usd(p.cost(&cached), 2.400_006);
}

#[test]
fn the_shipped_table_is_valid_sourced_and_prices_the_fixtures_models() {
    let entries = table::parse(table::SHIPPED_JSON).unwrap();
    assert_eq!(
        entries.len(),
        table::shipped().len(),
        "the embedded table parses"
    );
    assert!(entries.len() >= 40, "{} patterns", entries.len());
    for e in &entries {
        let name = e.pattern.as_str();
        assert!(
            e.source.starts_with("https://"),
            "{name}: source {}",
            e.source
        );
        assert_eq!(e.as_of.len(), 10, "{name}: as_of is a date: {}", e.as_of);
        // Exact ids and their dated snapshots only: a later model must not
        // inherit an older model's price through a broad glob.
        assert!(e.pattern.is_exact() || name.ends_with("-20*"), "{name}");
        assert!(
            e.price.input > 0.0 && e.price.output > e.price.input,
            "{name}"
        );
    }
    for model in [
        "claude-opus-5-5",
        "claude-sonnet-5-5",
        "claude-haiku-5-5",
        "claude-sonnet-4-5-20250929",
        "gpt-6.1-sol",
        "gpt-4o-mini-2024-07-18",
    ] {
        assert!(table::lookup(model).is_some(), "{model} is priced");
    }
    // Two entries for one pattern would make the table ambiguous.
    let twice = r#"{"version":1,"prices":[
        {"models":["m"],"source":"https://a","as_of":"2026-12-05","price":{"input":1,"output":2}},
        {"models":["m"],"source":"https://b","as_of":"2026-12-05","price":{"input":1,"output":2}}]}"#;
    assert_eq!(
        table::parse(twice).unwrap_err(),
        "model \"m\" is listed twice"
    );
}
