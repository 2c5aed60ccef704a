//! Usage parsers and the estimator against every recorded exchange.

use super::*;
use serde_json::Value;

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures");

fn manifest() -> Vec<Value> {
    serde_json::from_slice(&std::fs::read(format!("{FIXTURES}/exchanges.json")).unwrap()).unwrap()
}

fn file(rel: &str) -> Vec<u8> {
    std::fs::read(format!("{FIXTURES}/{rel}")).unwrap()
}

fn expected(ex: &Value) -> Option<Usage> {
    let u = ex.get("usage").filter(|u| !u.is_null())?;
    Some(Usage {
        input: u["input"].as_u64().unwrap(),
        output: u["output"].as_u64().unwrap(),
        cache_write: u["cache_write"].as_u64().unwrap(),
        cache_read: u["cache_read"].as_u64().unwrap(),
    })
}

fn route(ex: &Value) -> Route {
    Route::classify(ex["route"].as_str().unwrap().as_bytes())
}

fn stream(route: Route, chunks: &[&[u8]]) -> (Option<Usage>, Option<String>) {
    let mut s = StreamUsage::new(route);
    for c in chunks {
        s.feed(c);
    }
    (s.usage(), s.model().map(str::to_string))
}

#[test]
fn every_sse_fixture_gives_the_same_usage_at_every_split_point() {
    let mut checked = 0;
    for ex in manifest().iter().filter(|e| e["stream"] == true) {
        let name = ex["name"].as_str().unwrap();
        let body = file(ex["response"].as_str().unwrap());
        let r = route(ex);
        let whole = stream(r, &[&body]);
        assert_eq!(whole.0, expected(ex), "{name}: one-shot usage");
        if whole.0.is_some() {
            assert_eq!(
                whole.1.as_deref(),
                ex["model"].as_str(),
                "{name}: model served"
            );
        }
        for cut in 0..=body.len() {
            assert_eq!(
                stream(r, &[&body[..cut], &body[cut..]]),
                whole,
                "{name}: split at byte {cut}"
            );
        }
        let bytes: Vec<&[u8]> = body.chunks(1).collect();
        assert_eq!(stream(r, &bytes), whole, "{name}: byte by byte");
        checked += 1;
    }
    assert!(checked >= 7, "only {checked} SSE fixtures");
}

#[test]
fn every_json_fixture_gives_its_recorded_usage() {
    for ex in manifest()
        .iter()
        .filter(|e| e["stream"] == false && e["route"] != "/v1/messages/count_tokens")
    {
        let body = file(ex["response"].as_str().unwrap());
        let got = parse_json_usage(route(ex), &body).map(|(u, _)| u);
        assert_eq!(got, expected(ex), "{}", ex["name"]);
    }
}

#[test]
fn mid_stream_error_keeps_what_was_seen_and_is_flagged() {
    let body = file("anthropic/messages-stream-error.response.sse");
    let mut s = StreamUsage::new(Route::AnthropicMessages);
    s.feed(&body);
    assert!(s.errored);
    assert_eq!(s.usage().map(|u| (u.input, u.output)), Some((15, 1)));
}

#[test]
fn a_trailing_event_after_usage_does_not_change_it() {
    let mut s = StreamUsage::new(Route::AnthropicMessages);
    s.feed(b"event: message_delta\ndata: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":9}}\n\n");
    s.feed(b"event: message_stop\ndata: {\"type\":\"message_stop\"}\n\nevent: ping\ndata: {\"type\": \"ping\"}\n\n");
    assert_eq!(s.usage().map(|u| u.output), Some(9));
}

#[test]
fn openai_cached_tokens_are_split_out_of_prompt_tokens() {
    let body = br#"{"model":"gpt-4o","usage":{"prompt_tokens":1000,"completion_tokens":5,"prompt_tokens_details":{"cached_tokens":800}}}"#;
    let (u, _) = parse_json_usage(Route::OpenAiChat, body).unwrap();
    assert_eq!(
        u,
        Usage {
            input: 200,
            output: 5,
            cache_write: 0,
            cache_read: 800
        }
    );
}

#[test]
fn estimator_error_against_every_fixture_is_reported_and_bounded() {
    let mut errors = Vec::new();
    for ex in manifest() {
        let actual = match expected(&ex) {
            Some(u) => u.input + u.cache_write + u.cache_read,
            None if ex["route"] == "/v1/messages/count_tokens" => {
                serde_json::from_slice::<Value>(&file(ex["response"].as_str().unwrap())).unwrap()
                    ["input_tokens"]
                    .as_u64()
                    .unwrap()
            }
            None => continue,
        };
        let info = inspect_request(route(&ex), &file(ex["request"].as_str().unwrap())).unwrap();
        let err = (info.input_estimate as f64 - actual as f64) / actual as f64;
        eprintln!(
            "{:<28} actual {actual:>6} estimate {:>6} error {:+6.1}%",
            ex["name"].as_str().unwrap(),
            info.input_estimate,
            err * 100.0
        );
        errors.push(err);
    }
    let mean = errors.iter().map(|e| e.abs()).sum::<f64>() / errors.len() as f64;
    let over = errors.iter().cloned().fold(f64::MIN, f64::max);
    let under = errors.iter().cloned().fold(f64::MAX, f64::min);
    eprintln!("estimate error over {} fixtures: mean |error| {:.1}%, worst over {:+.1}%, worst under {:+.1}%", errors.len(), mean * 100.0, over * 100.0, under * 100.0);
    assert!(errors.len() >= 10);
    assert!(mean < 0.35, "mean error {mean}");
    assert!(over < 0.6 && under > -0.5, "worst {under} .. {over}");
}

#[test]
fn request_fields_are_read_and_bad_ones_named() {
    let r = inspect_request(Route::AnthropicMessages, br#"{"model":"m","max_tokens":10,"stream":true,"metadata":{"user_id":"u"},"messages":[{"role":"user","content":"hello there"}]}"#).unwrap();
    assert_eq!(
        (r.model.as_deref(), r.max_tokens, r.stream),
        (Some("m"), Some(10), true)
    );
    let r = inspect_request(Route::OpenAiChat, br#"{"model":"g","max_tokens":5,"max_completion_tokens":7,"stream_options":{"include_usage":false}}"#).unwrap();
    assert_eq!((r.max_tokens, r.include_usage), (Some(7), Some(false)));
    let r = inspect_request(
        Route::OpenAiResponses,
        br#"{"model":"g","max_output_tokens":1000000000000}"#,
    )
    .unwrap();
    assert_eq!(
        r.max_tokens,
        Some(1_000_000_000_000),
        "huge values are read; the meter caps them"
    );
    let err = |b: &[u8]| inspect_request(Route::AnthropicMessages, b).unwrap_err().0;
    assert_eq!(err(br#"{"model":5}"#), "model: must be a non-empty string");
    assert_eq!(
        err(br#"{"model":"m","max_tokens":-1}"#),
        "max_tokens: must be a non-negative integer"
    );
    assert_eq!(
        err(br#"{"model":"m","max_tokens":"10"}"#),
        "max_tokens: must be a non-negative integer"
    );
    assert_eq!(
        err(br#"{"model":"m","stream":"yes"}"#),
        "stream: must be true or false"
    );
    assert_eq!(err(br#"[1,2]"#), "request body must be a JSON object");
    assert!(err(br#"{"model":"m","messages":[}"#).starts_with("request body is not valid JSON: "));
    assert!(err(br#"{"model":"m"} trailing"#)
        .starts_with("request body is not valid JSON: trailing characters"));
}

#[test]
fn images_and_documents_use_the_per_item_rule_not_their_base64_length() {
    let big = "A".repeat(400_000);
    let body = format!(
        r#"{{"model":"m","messages":[{{"role":"user","content":[{{"type":"image","source":{{"type":"base64","media_type":"image/png","data":"{big}"}}}},{{"type":"text","text":"what is this?"}}]}}]}}"#
    );
    let r = inspect_request(Route::AnthropicMessages, body.as_bytes()).unwrap();
    // One image, 4 tokens of message framing, and 17 characters of text
    // ("user" + "what is this?") = 5 tokens.
    assert_eq!(r.input_estimate, 1_600 + 4 + 5);
    let doc = format!(
        r#"{{"model":"m","messages":[{{"role":"user","content":[{{"type":"document","source":{{"type":"base64","media_type":"application/pdf","data":"{big}"}}}}]}}]}}"#
    );
    // 400,000 base64 chars = 300,000 bytes = 5 chunks of 60 KB.
    assert_eq!(
        inspect_request(Route::AnthropicMessages, doc.as_bytes())
            .unwrap()
            .input_estimate,
        5 * 2_500 + 4 + 2
    );
}
