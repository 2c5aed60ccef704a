//! Requests that end early, against the real Envoy: a client that leaves an
//! Anthropic stream, an OpenAI stream cut by an upstream reset, a stream
//! cut by Envoy's idle timeout. Each is charged what it consumed, and the
//! audit record Envoy's access loggers shipped says exactly what was
//! charged.
//!
//! How the charge is read: the next request (`GET /v1/models`, which takes
//! one request and no tokens) carries the key's bucket states as rate-limit
//! headers. The daily token quota and the daily USD budget do not refill
//! within the day, so `limit - remaining` is exactly what the early-ended
//! request was charged (tokens exactly, USD to the micro-dollar the header
//! prints). Per-minute buckets refill continuously; the Anthropic test also
//! checks the output-tokens-per-minute header within the refill since the
//! request was sent.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use serde_json::Value;
use std::io::{Read, Write};
use std::time::{Duration, Instant};
use tollgate_e2e::{policy, Gateway, Options};

const KEY: &str = "tg-aborts-key";
const DAY_TOKENS: u64 = 1_000_000;
const DAY_USD: f64 = 100.0;
/// Output tokens per minute: small, so that its refill (0.01 token per ms)
/// stays well below the charge it is checked against.
const OUTPUT_PER_MINUTE: u64 = 600;

fn start(idle_timeout_s: Option<u64>) -> Gateway {
    let p = policy(
        &format!(
            r#"{{"models": ["claude-*", "gpt-*"], "limits": {{"requests_per_minute": 1000,
                "output_tokens_per_minute": {OUTPUT_PER_MINUTE},
                "tokens_per_day": {DAY_TOKENS}, "budget_usd_per_day": {DAY_USD}}}}}"#
        ),
        &[("k", KEY, "")],
    );
    let p = format!(
        r#"{}, "prices": {{"claude-*": {{"input": 3, "output": 15}}, "gpt-4o*": {{"input": 2.5, "output": 10}}}}}}"#,
        p.trim_end().trim_end_matches('}')
    );
    Gateway::start_with(
        &p,
        Options {
            stream_idle_timeout_s: idle_timeout_s,
            ..Options::default()
        },
    )
}

fn post(path: &str, headers: &str, body: &str) -> Vec<u8> {
    format!(
        "POST {path} HTTP/1.1\r\nhost: gw\r\ncontent-type: application/json\r\ncontent-length: {}\r\n{headers}\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Sends `request` on a fresh connection and reads the response until
/// `leave` says the client has seen enough (then closes the socket, as a
/// client that goes away does) or until the gateway closes it.
fn stream(gw: &Gateway, request: &[u8], leave: impl Fn(&str) -> bool) -> String {
    let mut s = std::net::TcpStream::connect(gw.base.trim_start_matches("http://")).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(request).unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => seen.extend_from_slice(&buf[..n]),
        }
        if leave(&String::from_utf8_lossy(&seen)) {
            break;
        }
    }
    drop(s);
    String::from_utf8_lossy(&seen).into_owned()
}

/// What a record says was charged: every token class and the cost.
fn audited(rec: &Value) -> (u64, f64) {
    let t = &rec["tokens"];
    let tokens = [
        "input",
        "output",
        "cache_write",
        "cache_write_1h",
        "cache_read",
    ]
    .iter()
    .map(|c| t[c].as_u64().unwrap_or_else(|| panic!("tokens.{c}: {rec}")))
    .sum();
    (tokens, rec["cost_usd"].as_f64().unwrap())
}

/// Anthropic's `/v1/models`: the `anthropic-version` header names the family.
const ANTHROPIC: &[(&str, &str)] = &[("x-api-key", KEY), ("anthropic-version", "2023-06-01")];

/// The next request's rate-limit headers: what the daily quota and budget
/// have left, and the output-tokens-per-minute header when there is one.
fn next_request_sees(gw: &Gateway, headers: &[(&str, &str)]) -> (u64, f64, Option<u64>) {
    let mut r = gw.client().get(gw.url("/v1/models"));
    for (name, value) in headers {
        r = r.header(*name, *value);
    }
    let r = r.send().unwrap();
    assert_eq!(r.status(), 200);
    let h = |name: &str| {
        r.headers()
            .get(name)
            .map(|v| v.to_str().unwrap().to_string())
    };
    (
        h("tollgate-ratelimit-tokens-per-day-remaining")
            .unwrap()
            .parse()
            .unwrap(),
        h("tollgate-ratelimit-usd-per-day-remaining")
            .unwrap()
            .parse()
            .unwrap(),
        h("anthropic-ratelimit-output-tokens-remaining").map(|v| v.parse().unwrap()),
    )
}

/// The charge the buckets hold equals the record's figures: tokens exactly,
/// USD to the micro-dollar the header prints.
fn assert_charged_as_audited(rec: &Value, seen: (u64, f64, Option<u64>)) {
    let (tokens, usd) = audited(rec);
    assert_eq!(
        DAY_TOKENS - seen.0,
        tokens,
        "tokens charged to the daily quota vs the audit record {rec}"
    );
    let charged_usd = DAY_USD - seen.1;
    assert!(
        (charged_usd - usd).abs() <= 5e-7 + 1e-9,
        "USD charged to the daily budget {charged_usd:.6} vs audited {usd}: {rec}"
    );
}

fn the_stream_was_cut(rec: &Value) {
    eprintln!("the record Envoy logged: {rec}");
    assert_eq!(rec["complete"], false, "{rec}");
    assert_eq!(rec["key_id"], "k");
    assert_eq!(rec["stream"], true);
    // The response had started: Envoy logs the 200 it sent.
    assert_eq!(rec["status"], 200, "{rec}");
}

/// Delta texts of a recorded stream, in order (Anthropic `text_delta`s or
/// OpenAI chat `content`), to bound what a cut stream could have relayed.
fn delta_texts(fixture: &str) -> Vec<String> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/").to_string() + fixture;
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .filter_map(|v| {
            v["delta"]["text"]
                .as_str()
                .or(v["choices"][0]["delta"]["content"].as_str())
                .map(str::to_string)
        })
        .collect()
}

#[test]
fn a_client_that_leaves_an_anthropic_stream_is_charged_and_audited_the_same() {
    let gw = start(None);
    let body = r#"{"model":"claude-sonnet-4-5","max_tokens":300,"stream":true,"messages":[{"role":"user","content":"Write about rate limiters."}]}"#;
    let sent = Instant::now();
    let seen = stream(
        &gw,
        &post(
            "/v1/messages",
            &format!("x-api-key: {KEY}\r\nx-request-id: ab-leave\r\nx-mock-exchange: messages-stream-long\r\nx-mock-delay-ms: 20\r\n"),
            body,
        ),
        // A few dozen words in, the client goes away.
        |text| text.matches("event: content_block_delta").count() >= 60,
    );
    assert!(seen.starts_with("HTTP/1.1 200"), "{seen}");
    assert!(!seen.contains("message_stop"), "left before the end");
    let rec = gw.any_audit_record("ab-leave");
    the_stream_was_cut(&rec);
    let t = &rec["tokens"];
    // message_start had brought the provider's input count.
    assert_eq!(
        (t["input"].as_u64(), t["input_source"].as_str()),
        (Some(52), Some("provider"))
    );
    // No message_delta: output estimated from the text relayed, some of the
    // 300 words and never more than all of them.
    let output = t["output"].as_u64().unwrap();
    let all: String = delta_texts("anthropic/messages-stream-long.response.sse").concat();
    assert_eq!(t["output_source"], "estimate", "{rec}");
    assert!(
        output > 0 && output < all.split_whitespace().count() as u64,
        "{output} tokens of text relayed: {rec}"
    );
    let (tokens, usd) = audited(&rec);
    assert_eq!(tokens, 52 + output);
    assert!((usd - (52.0 * 3.0 + output as f64 * 15.0) / 1e6).abs() < 1e-12);
    let next = next_request_sees(&gw, ANTHROPIC);
    let elapsed_ms = sent.elapsed().as_millis() as u64;
    assert_charged_as_audited(&rec, next);
    // The per-minute output bucket was charged the same output, give or
    // take its refill since the request was sent (0.01 token per ms).
    let per_minute = next.2.unwrap();
    let refill = elapsed_ms * OUTPUT_PER_MINUTE / 60_000 + 1;
    assert!(
        per_minute >= OUTPUT_PER_MINUTE - output
            && per_minute <= (OUTPUT_PER_MINUTE - output + refill).min(OUTPUT_PER_MINUTE),
        "output tokens left {per_minute}: {OUTPUT_PER_MINUTE} - {output} charged, + at most {refill} refilled"
    );
    // And a request that would need more than is left is refused: the
    // charge is real.
    let over = format!(
        r#"{{"model":"claude-sonnet-4-5","max_tokens":{},"messages":[{{"role":"user","content":"hi"}}]}}"#,
        per_minute + refill + 1
    );
    let r = gw.post("/v1/messages", Some(KEY), &over);
    assert_eq!(r.status(), 429, "{}", r.text().unwrap());
}

#[test]
fn an_openai_stream_cut_by_an_upstream_reset_is_charged_and_audited_the_same() {
    let gw = start(None);
    // Tollgate asks for the usage chunk on the client's behalf; the reset
    // comes before it.
    let body = r#"{"model":"gpt-4o-mini","stream":true,"max_tokens":200,"messages":[{"role":"user","content":"Tell me a story about a rate limiter."}]}"#;
    let seen = stream(
        &gw,
        &post(
            "/v1/chat/completions",
            &format!("authorization: Bearer {KEY}\r\nx-request-id: ab-reset\r\nx-mock-reset-after: 14\r\nx-mock-delay-ms: 60\r\n"),
            body,
        ),
        |_| false,
    );
    assert!(seen.starts_with("HTTP/1.1 200"), "{seen}");
    assert!(!seen.contains("[DONE]"), "cut before the end: {seen}");
    let rec = gw.any_audit_record("ab-reset");
    the_stream_was_cut(&rec);
    let t = &rec["tokens"];
    // No usage chunk: the input estimate reserved, and output estimated
    // from the content relayed: at most the first 14 chunks' (the mock
    // sends 14 events, the first with the role and empty content, then
    // resets), at most two tokens a word.
    assert_eq!(t["input"], t["input_estimated"], "{rec}");
    assert_eq!(t["input_source"], "reservation");
    assert_eq!(t["output_source"], "estimate");
    let output = t["output"].as_u64().unwrap();
    let sent: String = delta_texts("openai/chat-stream-usage.response.sse")[..14].concat();
    assert!(
        output > 0 && output <= 2 * sent.split_whitespace().count() as u64,
        "{output} tokens of {sent:?}: {rec}"
    );
    assert_charged_as_audited(
        &rec,
        next_request_sees(&gw, &[("authorization", &format!("Bearer {KEY}"))]),
    );
}

#[test]
fn a_stream_cut_by_the_idle_timeout_is_charged_and_audited_the_same() {
    let gw = start(Some(2));
    let body = r#"{"model":"claude-haiku-4-5","max_tokens":300,"stream":true,"messages":[{"role":"user","content":"Tell me a story."}]}"#;
    let seen = stream(
        &gw,
        &post(
            "/v1/messages",
            &format!("x-api-key: {KEY}\r\nx-request-id: ab-idle\r\nx-mock-stall-after: 16\r\nx-mock-stall-ms: 6000\r\nx-mock-delay-ms: 80\r\n"),
            body,
        ),
        |_| false,
    );
    assert!(seen.starts_with("HTTP/1.1 200"), "{seen}");
    assert!(!seen.contains("message_stop"), "cut after what was sent");
    let rec = gw.any_audit_record("ab-idle");
    the_stream_was_cut(&rec);
    let t = &rec["tokens"];
    assert_eq!(
        (t["input"].as_u64(), t["input_source"].as_str()),
        (Some(23), Some("provider"))
    );
    assert_eq!(t["output_source"], "estimate", "{rec}");
    assert!(t["output"].as_u64().unwrap() > 0, "{rec}");
    assert_charged_as_audited(&rec, next_request_sees(&gw, ANTHROPIC));
}
