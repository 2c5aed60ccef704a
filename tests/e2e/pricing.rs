//! Pricing through the real Envoy: every class the providers bill, the tier
//! and region the response reports, long-context rates, and the shipped
//! price table, asserted to the micro-dollar in the audit record; and
//! `tollgate prices`.

use std::process::Command;
use tollgate_e2e::{sha, tollgate_bin, Gateway};

const KEY: &str = "tg-finops";

/// One key with a daily budget, allowed every current model. Opus 5.5 is
/// priced by the policy (priority 2x, US-only inference 1.1x); Haiku 5.5
/// and GPT-6.1 Sol by the shipped table.
fn policy() -> String {
    format!(
        r#"{{"version": 1,
            "defaults": {{"models": ["claude-*", "gpt-6*"]}},
            "keys": [{{"id": "finops", "key_sha256": "{}", "limits": {{"budget_usd_per_day": 50}}}}],
            "prices": {{
              "claude-opus-5-5": {{"input": 5, "output": 25, "cache_write": 6.25, "cache_write_1h": 10,
                                   "cache_read": 0.5, "web_search_per_thousand": 10,
                                   "tiers": {{"priority": 2, "batch": 0.5}}, "regions": {{"us": 1.1}}}}
            }}}}"#,
        sha(KEY)
    )
}

fn assert_usd(rec: &serde_json::Value, want: f64) {
    let got = rec["cost_usd"].as_f64().unwrap();
    assert!((got - want).abs() < 1e-9, "cost {got} want {want}: {rec}");
}

#[test]
fn a_priority_response_with_1h_cache_writes_and_web_searches_is_priced_by_every_class() {
    let gw = Gateway::start(&policy());
    let r = gw.post_with(
        "/v1/messages",
        &[
            ("x-api-key", KEY),
            ("x-request-id", "e2e-price-web"),
            ("x-mock-exchange", "messages-stream-web-search-1h-priority"),
        ],
        r#"{"model":"claude-opus-5-5","max_tokens":4096,"stream":true,"service_tier":"auto","inference_geo":"us",
            "tools":[{"type":"web_search_20250305","name":"web_search","max_uses":5}],
            "messages":[{"role":"user","content":"What changed in LLM prices this week?"}]}"#,
    );
    assert_eq!(r.status(), 200);
    assert!(r.text().unwrap().contains("event: message_stop"));
    let rec = gw.audit_record("e2e-price-web");
    let t = &rec["tokens"];
    assert_eq!(
        [
            &t["input"],
            &t["output"],
            &t["cache_write"],
            &t["cache_write_1h"],
            &t["cache_read"],
            &t["reasoning"],
            &t["web_search_requests"]
        ],
        [15_071, 1_104, 1_020, 4_147, 2_069, 640, 3]
            .map(serde_json::Value::from)
            .each_ref(),
        "{rec}"
    );
    // What the response said, not what the request asked ("auto").
    assert_eq!(rec["service_tier"], "priority");
    assert_eq!(rec["inference_geo"], "us");
    assert!((rec["price_multiplier"].as_f64().unwrap() - 2.2).abs() < 1e-12);
    assert_eq!(rec["long_context"], false);
    // 15,071 x $5 + 1,104 x $25 + 1,020 x $6.25 + 4,147 x $10 + 2,069 x $0.50
    // = $0.1518345 of tokens, x 2 (priority) x 1.1 (us) = $0.3340359,
    // + 3 searches at $10 per 1,000 = $0.3640359.
    assert_usd(&rec, 0.364_035_9);
}

#[test]
fn a_prompt_over_the_long_context_threshold_is_priced_at_long_context_rates() {
    let gw = Gateway::start(&policy());
    // The recorded 126K-token request itself: the reservation is sized by
    // the estimator, settlement by the provider's count.
    let body = include_str!("../fixtures/anthropic/messages-long-context.request.json");
    let r = gw.post_with(
        "/v1/messages",
        &[
            ("x-api-key", KEY),
            ("x-request-id", "e2e-price-long"),
            ("x-mock-exchange", "messages-long-context"),
        ],
        body,
    );
    assert_eq!(r.status(), 200);
    let rec = gw.audit_record("e2e-price-long");
    assert!(
        rec["tokens"]["input_estimated"].as_u64().unwrap() > 100_000,
        "{rec}"
    );
    assert_eq!(
        (
            &rec["tokens"]["input"],
            &rec["tokens"]["cache_read"],
            &rec["tokens"]["output"]
        ),
        (&3_669.into(), &122_759.into(), &1_850.into())
    );
    assert_eq!(rec["long_context"], true);
    // The shipped Haiku 5.5 price: above 100,000 prompt tokens the whole
    // request at $0.50 input, $0.05 cache reads, $2.50 output:
    // 3,669 x $0.50 + 122,759 x $0.05 + 1,850 x $2.50 = $0.01259745
    // (at the short-context rates it would be $0.00251949).
    assert_usd(&rec, 0.012_597_45);
}

#[test]
fn an_openai_stream_is_priced_by_the_tier_it_reports_with_its_web_searches() {
    let gw = Gateway::start(&policy());
    let r = gw.post_with(
        "/v1/responses",
        &[
            ("authorization", &format!("Bearer {KEY}")),
            ("x-request-id", "e2e-price-openai"),
            ("x-mock-exchange", "responses-stream-web-search"),
        ],
        r#"{"model":"gpt-6.1-sol","stream":true,"service_tier":"fast","tools":[{"type":"web_search"}],"input":"What changed?"}"#,
    );
    assert_eq!(r.status(), 200);
    assert!(r.text().unwrap().contains("response.completed"));
    let rec = gw.audit_record("e2e-price-openai");
    let t = &rec["tokens"];
    assert_eq!(
        [
            &t["input"],
            &t["cache_write"],
            &t["cache_read"],
            &t["output"],
            &t["reasoning"],
            &t["web_search_requests"]
        ],
        [8_680, 512, 1_024, 820, 512, 2]
            .map(serde_json::Value::from)
            .each_ref(),
        "{rec}"
    );
    assert_eq!(rec["service_tier"], "priority");
    // Shipped GPT-6.1 Sol: 8,680 x $2 + 512 x $2.50 + 1,024 x $0.10
    // + 820 x $10 = $0.0269424, x 2 (priority) = $0.0538848, + 2 searches
    // (the failed third is not billed) = $0.0738848.
    assert_usd(&rec, 0.073_884_8);
}

#[test]
fn prices_prints_the_shipped_table_and_merges_a_policy() {
    let run = |args: &[&str]| {
        let out = Command::new(tollgate_bin()).args(args).output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let table = run(&["prices"]);
    assert!(table.starts_with("MODEL "), "{table}");
    let opus = table
        .lines()
        .find(|l| l.starts_with("claude-opus-5-5 "))
        .unwrap();
    assert!(opus.contains("shipped 2026-12-05"), "{opus}");
    let json: serde_json::Value =
        serde_json::from_str(&run(&["prices", "--format", "json"])).unwrap();
    let sol = json
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["model"] == "gpt-6.1-sol")
        .unwrap();
    assert_eq!(
        (sol["input"].as_f64(), sol["from"].as_str()),
        (Some(2.0), Some("shipped"))
    );
    assert!(sol["source"]
        .as_str()
        .unwrap()
        .starts_with("https://developers.openai.com/"));
    assert_eq!(sol["long_context"]["above_input_tokens"], 272_000);

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("policy.json");
    std::fs::write(&file, policy()).unwrap();
    let merged = run(&["prices", "--policy", file.to_str().unwrap()]);
    let lines: Vec<&str> = merged.lines().collect();
    assert!(
        lines[1].starts_with("claude-opus-5-5 ") && lines[1].ends_with("policy"),
        "{merged}"
    );
    assert!(
        lines.iter().any(|l| l.starts_with("claude-opus-5-5 ")
            && l.ends_with("shipped, overridden by policy claude-opus-5-5")),
        "{merged}"
    );
    // A broken policy is reported, not silently ignored.
    std::fs::write(
        &file,
        r#"{"version": 1, "prices": {"m": {"input": -1, "output": 1}}}"#,
    )
    .unwrap();
    let out = Command::new(tollgate_bin())
        .args(["prices", "--policy", file.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains(
        "prices.m.input: must be a non-negative USD amount per million tokens (value: -1)"
    ));
    // A reader that stops early ends the command quietly.
    let piped = Command::new("sh")
        .arg("-c")
        .arg(format!("'{}' prices | head -1", tollgate_bin().display()))
        .output()
        .unwrap();
    assert!(piped.status.success());
    assert!(String::from_utf8_lossy(&piped.stderr).is_empty());
}
