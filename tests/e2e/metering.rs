//! Metering through the real Envoy: the official SDKs, count_tokens, OpenAI
//! stream usage, budgets, and exact accounting under concurrency.

use std::process::Command;
use tollgate_e2e::{policy, sha, Gateway, Options};

fn sdk_policy() -> String {
    let prices = r#""prices": {"claude-sonnet-4-*": {"input": 3, "output": 15}, "claude-haiku-4-*": {"input": 1, "output": 5}, "gpt-4o*": {"input": 2.5, "output": 10}}"#;
    let p = policy(
        r#"{"models": ["claude-sonnet-*", "claude-haiku-*", "gpt-4o*"], "limits": {"requests_per_minute": 100, "output_tokens_per_minute": 100000}}"#,
        &[
            ("sdk-main", "tg-sdk-main", ""),
            (
                "sdk-limited",
                "tg-sdk-limited",
                r#""limits": {"requests_per_minute": 2}"#,
            ),
            (
                "sdk-budget",
                "tg-sdk-budget",
                r#""limits": {"budget_usd_per_day": 0.0005}"#,
            ),
        ],
    );
    format!("{}, {prices}}}", p.trim_end().trim_end_matches('}'))
}

fn python() -> std::path::PathBuf {
    std::env::var_os("TOLLGATE_PYTHON")
        .map(Into::into)
        .unwrap_or_else(|| {
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/python")
        })
}

#[test]
fn official_sdks_see_their_own_errors_usage_and_headers() {
    let gw = Gateway::start(&sdk_policy());
    let out = Command::new(python())
        .arg(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("sdk/sdk_check.py"))
        .env("GATEWAY", &gw.base)
        .output()
        .expect("running the SDK checks (make sdk installs the SDKs)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "SDK checks failed");
    for name in [
        "anthropic.messages",
        "anthropic.stream",
        "anthropic.AuthenticationError",
        "anthropic.PermissionDeniedError",
        "anthropic.RateLimitError",
        "anthropic.budget",
        "openai.chat",
        "openai.stream",
        "openai.responses",
        "openai.AuthenticationError",
        "openai.PermissionDeniedError",
        "openai.RateLimitError",
    ] {
        assert!(
            stdout
                .lines()
                .any(|l| l.starts_with(&format!("ok {name}:"))),
            "missing check {name}"
        );
    }
    assert!(
        stdout.contains("ok anthropic.budget: budget_usd_per_day limit of USD 0.0005"),
        "{stdout}"
    );
    // The budget key's second request was denied and audited as such.
    let denied: Vec<_> = gw
        .audit_records()
        .into_iter()
        .filter(|r| r["key_id"] == "sdk-budget" && r["decision"] == "denied")
        .collect();
    assert_eq!(denied.len(), 1);
    assert_eq!(denied[0]["reason"], "budget_exhausted");
}

#[test]
fn openai_stream_usage_is_requested_upstream_and_charged() {
    let gw = Gateway::start(&sdk_policy());
    let r = gw.post_with(
        "/v1/chat/completions",
        &[
            ("authorization", "Bearer tg-sdk-main"),
            ("x-request-id", "e2e-oai-stream"),
        ],
        r#"{"model":"gpt-4o-mini","stream":true,"messages":[{"role":"user","content":"story"}]}"#,
    );
    assert_eq!(r.status(), 200);
    let text = r.text().unwrap();
    assert!(text.contains("data: [DONE]"));
    assert!(
        !text.contains("\"prompt_tokens\""),
        "the usage chunk the client did not ask for is stripped"
    );
    let seen = gw.mock_requests();
    assert_eq!(
        seen[0]["exchange"], "chat-stream-usage",
        "the gateway asked the provider for usage"
    );
    let rec = gw.audit_record("e2e-oai-stream");
    assert_eq!(
        (
            rec["tokens"]["input"].as_u64(),
            rec["tokens"]["output"].as_u64()
        ),
        (Some(19), Some(42))
    );
    // 19 * $2.5/M + 42 * $10/M
    assert!(
        (rec["cost_usd"].as_f64().unwrap() - 0.0004675).abs() < 1e-12,
        "{rec}"
    );
}

#[test]
fn count_tokens_is_authenticated_and_allowlisted_but_takes_nothing_from_any_bucket() {
    let gw = Gateway::start(&sdk_policy());
    let body = r#"{"model":"claude-sonnet-4-5","messages":[{"role":"user","content":"how long is this?"}]}"#;
    let r = gw.post("/v1/messages/count_tokens", None, body);
    assert_eq!(r.status(), 401);
    let r = gw.post_with(
        "/v1/messages/count_tokens",
        &[("x-api-key", "tg-sdk-main"), ("x-request-id", "e2e-count")],
        body,
    );
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()["anthropic-ratelimit-requests-remaining"],
        "100",
        "not counted against requests per minute (docs/metering.md)"
    );
    assert_eq!(
        r.headers()["anthropic-ratelimit-output-tokens-remaining"],
        "100000",
        "no output reserved"
    );
    let v: serde_json::Value = r.json().unwrap();
    assert_eq!(v["input_tokens"], 61);
    let rec = gw.audit_record("e2e-count");
    assert_eq!(rec["route"], "anthropic.count_tokens");
    assert_eq!(rec["tokens"]["output_reserved"], 0);
    assert!(rec["cost_usd"].is_null());
    let r = gw.post(
        "/v1/messages/count_tokens",
        Some("tg-sdk-main"),
        r#"{"model":"claude-opus-4-1","messages":[]}"#,
    );
    assert_eq!(r.status(), 403, "allowlisted like any call");
}

#[test]
fn output_reservation_and_settlement_show_in_the_headers() {
    let gw = Gateway::start(&sdk_policy());
    let body = r#"{"model":"claude-sonnet-4-5","max_tokens":5000,"messages":[{"role":"user","content":"hi"}]}"#;
    let r = gw.post("/v1/messages", Some("tg-sdk-main"), body);
    // 5,000 reserved at admission: the response headers show it taken.
    let first: f64 = r.headers()["anthropic-ratelimit-output-tokens-remaining"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((95_000.0..95_100.0).contains(&first), "{first}");
    // The reply used 74: the next request sees the unused 4,926 credited back.
    let r = gw.post("/v1/messages", Some("tg-sdk-main"), body);
    let second: f64 = r.headers()["anthropic-ratelimit-output-tokens-remaining"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        (100_000.0 - 74.0 - 5_000.0..=100_000.0 - 74.0 - 5_000.0 + 200.0).contains(&second),
        "{second}"
    );
}

#[test]
fn concurrent_clients_are_charged_exactly_what_the_provider_reported() {
    // 64 clients over 2 Envoy workers. Every request of the shared team pool
    // reports the same usage (messages-basic: 61 in, 74 out), so the pool's
    // daily token window must hold exactly requests x 135.
    let keys: Vec<(String, String)> = (0..8)
        .map(|i| (format!("k{i}"), format!("tg-conc-{i}")))
        .collect();
    let key_json: Vec<String> = keys
        .iter()
        .map(|(id, k)| format!(r#"{{"id":"{id}","key_sha256":"{}","team":"load"}}"#, sha(k)))
        .collect();
    let p = format!(
        r#"{{"version":1,"defaults":{{"models":["claude-*"]}},"pools":{{"team:load":{{"tokens_per_day":1000000000,"requests_per_minute":300}}}},"keys":[{}]}}"#,
        key_json.join(",")
    );
    let gw = std::sync::Arc::new(Gateway::start_with(
        &p,
        Options {
            mock_event_delay_ms: 1,
            concurrency: 2,
            ..Options::default()
        },
    ));
    let per_client = 40;
    let started = std::time::Instant::now();
    let handles: Vec<_> = (0..64)
        .map(|c| {
            let gw = gw.clone();
            let key = keys[c % keys.len()].1.clone();
            std::thread::spawn(move || {
                let mut ok = 0u64;
                for _ in 0..per_client {
                    let r = gw.post("/v1/messages", Some(&key), r#"{"model":"claude-haiku-4-5","max_tokens":100,"messages":[{"role":"user","content":"x"}]}"#);
                    match r.status().as_u16() {
                        200 => ok += 1,
                        429 => {}
                        s => panic!("unexpected status {s}"),
                    }
                }
                ok
            })
        })
        .collect();
    let admitted: u64 = handles.into_iter().map(|h| h.join().unwrap()).sum();
    let elapsed = started.elapsed().as_secs_f64();
    // The pool's RPM bucket (300, refilling 5/s) may admit at most its
    // capacity plus what refilled, plus one in-flight reservation.
    let bound = 300.0 + elapsed * 5.0 + 1.0;
    eprintln!(
        "{admitted} of {} admitted in {elapsed:.1}s (bound {bound:.0})",
        64 * per_client
    );
    assert!(
        admitted >= 300 && (admitted as f64) <= bound,
        "admitted {admitted}, bound {bound}"
    );
    assert_eq!(
        gw.mock_requests().len() as u64,
        admitted,
        "every admitted request reached the provider once"
    );

    // Exactness: the day window holds exactly admitted x (61 + 74) tokens.
    let r = gw.post(
        "/v1/messages/count_tokens",
        Some("tg-conc-0"),
        r#"{"model":"claude-haiku-4-5","messages":[]}"#,
    );
    let remaining: u64 = r.headers()["tollgate-ratelimit-tokens-per-day-remaining"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(
        1_000_000_000 - remaining,
        admitted * 135,
        "debits equal reported usage exactly"
    );
}

#[test]
fn body_over_the_buffer_limit_gets_a_provider_shaped_413_and_an_audit_record() {
    let gw = Gateway::start(&sdk_policy());
    let big = format!(
        r#"{{"model":"claude-haiku-4-5","max_tokens":5,"messages":[{{"role":"user","content":"{}"}}]}}"#,
        "a".repeat(33 << 20)
    );
    let r = gw.post_with(
        "/v1/messages",
        &[("x-api-key", "tg-sdk-main"), ("x-request-id", "e2e-413")],
        &big,
    );
    assert_eq!(r.status(), 413);
    let v: serde_json::Value = r.json().unwrap();
    assert_eq!(v["type"], "error");
    assert_eq!(v["error"]["type"], "request_too_large");
    assert_eq!(
        v["error"]["message"],
        "request body exceeds this gateway's limit of 33554432 bytes"
    );
    assert_eq!(v["request_id"], "e2e-413");
    let r = gw.post_with(
        "/v1/chat/completions",
        &[("authorization", "Bearer tg-sdk-main")],
        &big,
    );
    assert_eq!(r.status(), 413);
    let v: serde_json::Value = r.json().unwrap();
    assert_eq!(v["error"]["code"], "request_too_large");
    assert!(gw.mock_requests().is_empty());
    // No complete record exists; the provisional one carries identity and Envoy's status.
    let rec = gw.any_audit_record("e2e-413");
    assert_eq!(rec["key_id"], "sdk-main");
    assert_eq!(rec["status"], 413);
    assert_eq!(rec["reason"], "body_too_large");
}
