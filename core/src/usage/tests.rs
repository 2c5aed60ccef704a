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
    let name = ex["name"].as_str().unwrap();
    let count = |field: &str| {
        u[field]
            .as_u64()
            .unwrap_or_else(|| panic!("{name}: usage.{field} missing from the manifest"))
    };
    // Every class is written out in the manifest, absent ones as 0 / null.
    let label = |field: &str| match &u[field] {
        Value::Null if u.get(field).is_some() => None,
        Value::String(s) => Some(s.clone()),
        other => panic!("{name}: usage.{field} is {other}, not a string or null"),
    };
    Some(Usage {
        input: count("input"),
        output: count("output"),
        cache_write: count("cache_write"),
        cache_write_1h: count("cache_write_1h"),
        cache_read: count("cache_read"),
        reasoning: count("reasoning"),
        web_search_requests: count("web_search_requests"),
        service_tier: label("service_tier"),
        inference_geo: label("inference_geo"),
    })
}

fn route(ex: &Value) -> Route {
    let method = ex["method"].as_str().unwrap_or("POST");
    let path = ex["route"].as_str().unwrap();
    Route::classify(method.as_bytes(), path.as_bytes(), Provider::Anthropic)
        .unwrap()
        .route
}

fn stream(route: Route, chunks: &[&[u8]]) -> (Option<Usage>, Option<String>) {
    let mut s = StreamUsage::new(route);
    for c in chunks {
        s.feed(c);
    }
    (s.usage().cloned(), s.model().map(str::to_string))
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
        // The model is read even from streams that carry no usage.
        assert_eq!(
            whole.1.as_deref(),
            ex["model"].as_str(),
            "{name}: model served"
        );
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
            cache_read: 800,
            ..Default::default()
        }
    );
}

/// The estimate against every fixture's recorded input (uncached input plus
/// cache writes and reads: the whole prompt). Relative error is meaningless
/// for a 10-token prompt, so a fixture passes within ±35% or within 12 tokens.
#[test]
fn estimator_error_against_every_fixture_is_reported_and_bounded() {
    let mut errors = Vec::new();
    let mut failures = Vec::new();
    for ex in manifest() {
        // Tokens the provider adds that the request never held (web search
        // results, server-side state) cannot be estimated: the manifest
        // names them and they are left out of the comparison.
        let absent = ex["input_not_in_request"].as_u64().unwrap_or(0);
        let actual = match expected(&ex) {
            Some(u) => u.prompt() - absent,
            None if ex["route"] == "/v1/messages/count_tokens" => {
                serde_json::from_slice::<Value>(&file(ex["response"].as_str().unwrap())).unwrap()
                    ["input_tokens"]
                    .as_u64()
                    .unwrap()
            }
            None => continue,
        };
        let name = ex["name"].as_str().unwrap();
        let info = inspect_request(route(&ex), &file(ex["request"].as_str().unwrap())).unwrap();
        let diff = info.input_estimate as f64 - actual as f64;
        let err = diff / actual as f64;
        eprintln!(
            "{name:<28} actual {actual:>6} estimate {:>6} error {:+6.1}%",
            info.input_estimate,
            err * 100.0
        );
        if err.abs() > 0.35 && diff.abs() > 12.0 {
            failures.push(format!("{name}: {:+.1}%", err * 100.0));
        }
        errors.push((err, actual));
    }
    let mean = errors.iter().map(|(e, _)| e.abs()).sum::<f64>() / errors.len() as f64;
    let worst = |pick: &dyn Fn(&(f64, u64)) -> bool| {
        errors
            .iter()
            .filter(|e| pick(e))
            .map(|(e, _)| *e)
            .fold(0.0_f64, |a, e| if e.abs() > a.abs() { e } else { a })
    };
    let big = errors.iter().filter(|(_, a)| *a >= 100).count();
    let mean_big = errors
        .iter()
        .filter(|(_, a)| *a >= 100)
        .map(|(e, _)| e.abs())
        .sum::<f64>()
        / big.max(1) as f64;
    eprintln!(
        "estimate error over {} fixtures: mean |error| {:.1}%, worst {:+.1}%; over the {big} prompts of 100+ tokens: mean |error| {:.1}%, worst {:+.1}%",
        errors.len(),
        mean * 100.0,
        worst(&|_| true) * 100.0,
        mean_big * 100.0,
        worst(&|(_, a)| *a >= 100) * 100.0,
    );
    assert!(
        errors.len() >= 15,
        "only {} fixtures measured",
        errors.len()
    );
    assert!(
        failures.is_empty(),
        "outside ±35% and 12 tokens: {failures:?}"
    );
    assert!(
        mean_big < 0.2,
        "mean error on 100+ token prompts {mean_big}"
    );
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
    let est = |route, body: String| {
        inspect_request(route, body.as_bytes())
            .unwrap()
            .input_estimate
    };
    // 400,000 base64 characters of an unrecognisable image: the size is
    // unknown, so the per-image maximum (1,600), plus framing (4 + 3) and
    // "what is this?" (4 words and a symbol: 4 tokens).
    let big = "A".repeat(400_000);
    let body = format!(
        r#"{{"model":"m","messages":[{{"role":"user","content":[{{"type":"image","source":{{"type":"base64","media_type":"image/png","data":"{big}"}}}},{{"type":"text","text":"what is this?"}}]}}]}}"#
    );
    assert_eq!(est(Route::AnthropicMessages, body), 1_600 + 4 + 3 + 4);
    // The same bytes as a document whose pages cannot be counted: 300,000
    // bytes at 50 KB per page, 2,000 tokens per page.
    let doc = format!(
        r#"{{"model":"m","messages":[{{"role":"user","content":[{{"type":"document","source":{{"type":"base64","media_type":"application/pdf","data":"{big}"}}}}]}}]}}"#
    );
    assert_eq!(est(Route::AnthropicMessages, doc), 6 * 2_000 + 4 + 3);
    // A document only referenced by URL counts one page.
    let url = r#"{"model":"m","messages":[{"role":"user","content":[{"type":"document","source":{"type":"url","url":"https://example.com/a.pdf"}}]}]}"#;
    assert_eq!(
        est(Route::AnthropicMessages, url.to_string()),
        2_000 + 4 + 3
    );
    // A real PNG header: the fixture's 240x160 chart is 52 tokens.
    let image = String::from_utf8(file("anthropic/messages-image.request.json")).unwrap();
    let png = image
        .split("\"data\": \"")
        .nth(1)
        .unwrap()
        .split('"')
        .next()
        .unwrap();
    let one = |route, block: String| {
        est(
            route,
            format!(r#"{{"model":"m","messages":[{{"role":"user","content":[{block}]}}]}}"#),
        )
    };
    assert_eq!(
        one(
            Route::AnthropicMessages,
            format!(
                r#"{{"type":"image","source":{{"type":"base64","media_type":"image/png","data":"{png}"}}}}"#
            )
        ),
        52 + 4 + 3
    );
    // OpenAI: the same image in a data URL is one 512-px tile; low detail 85.
    let chat = |detail: &str| {
        one(
            Route::OpenAiChat,
            format!(
                r#"{{"type":"image_url","image_url":{{"url":"data:image/png;base64,{png}","detail":"{detail}"}}}}"#
            ),
        )
    };
    assert_eq!(chat("high"), 85 + 170 + 3 + 3);
    assert_eq!(chat("low"), 85 + 3 + 3);
    let responses = r#"{"model":"m","input":[{"role":"user","content":[{"type":"input_image","image_url":"https://example.com/x.png"}]}]}"#;
    assert_eq!(
        est(Route::OpenAiResponses, responses.to_string()),
        765 + 3 + 3
    );
}

#[test]
fn a_text_document_counts_as_text_and_tool_inputs_as_json() {
    let est = |body: &str| {
        inspect_request(Route::AnthropicMessages, body.as_bytes())
            .unwrap()
            .input_estimate
    };
    let text = r#"{"model":"m","messages":[{"role":"user","content":[{"type":"document","source":{"type":"text","media_type":"text/plain","data":"hello world"}}]}]}"#;
    assert_eq!(est(text), 2 + 4 + 3);
    // `{"city": "Paris"}` as JSON: braces 1, key 1 + 2, value 1 + 1.
    let tool_use = r#"{"model":"m","messages":[{"role":"assistant","content":[{"type":"tool_use","id":"toolu_01","name":"weather","input":{"city":"Paris"}}]}]}"#;
    assert_eq!(est(tool_use), 1 + (1 + 3 + 2) + 4 + 3);
    // Tools add Anthropic's tool-use system prompt: 346 on auto, 313 on any.
    let tools = |choice: &str| {
        est(&format!(
            r#"{{"model":"m","tools":[{{"name":"t","input_schema":{{}}}}]{choice},"messages":[]}}"#
        ))
    };
    assert_eq!(
        tools("") - tools(r#","tool_choice":{"type":"any"}"#),
        346 - 313
    );
}

#[test]
fn inspecting_never_panics_on_odd_shapes() {
    for body in [
        &b""[..],
        b"   ",
        b"{}",
        b"null",
        b"{\"messages\":{\"role\":\"user\"}}",
        b"{\"messages\":\"hi\",\"input\":[1,true,null,{\"type\":5}]}",
        b"{\"system\":[[[[]]]],\"tools\":\"x\",\"tool_choice\":[1]}",
        b"{\"messages\":[{\"content\":[{\"type\":\"image\",\"source\":{\"data\":\"data:image/png;base64,\"}}]}]}",
        b"{\"messages\":[{\"content\":[{\"type\":\"document\",\"source\":{\"data\":\"JVBERi0=\"}}]}]}",
        b"{\"stream_options\":[true],\"max_tokens\":null,\"model\":null}",
        b"\xff\xfe",
    ] {
        for route in [
            Route::AnthropicMessages,
            Route::AnthropicCountTokens,
            Route::OpenAiChat,
            Route::OpenAiResponses,
            Route::Other,
        ] {
            let _ = inspect_request(route, body);
        }
    }
    let deep = format!(
        "{{\"messages\":{}{}}}",
        "[".repeat(10_000),
        "]".repeat(10_000)
    );
    assert!(inspect_request(Route::AnthropicMessages, deep.as_bytes())
        .unwrap_err()
        .0
        .contains("recursion limit"));
}

#[test]
fn only_events_with_a_usage_object_are_parsed() {
    assert!(has_usage_object(
        br#"{"choices":[],"usage":{"prompt_tokens":3}}"#
    ));
    assert!(has_usage_object(b"{\"usage\" :\n {\"output_tokens\":1}}"));
    // Every chat chunk of an include_usage stream, and the Responses API's
    // response.created, carry a null usage.
    assert!(!has_usage_object(
        br#"{"choices":[{"delta":{"content":"hi"}}],"usage":null}"#
    ));
    // Generated text that mentions "usage" is escaped inside the JSON.
    assert!(!has_usage_object(
        br#"{"delta":{"text":"the \"usage\": {"}}"#
    ));
    assert!(has_usage_object(
        br#"{"usage":null,"response":{"usage":{"input_tokens":1}}}"#
    ));
}

#[test]
fn model_is_taken_from_a_stream_without_usage_and_errors_are_flagged() {
    let mut s = StreamUsage::new(Route::OpenAiChat);
    s.feed(b"data: {\"model\":\"gpt-4o-mini-2024-07-18\",\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\n");
    s.feed(b"data: {\"error\":{\"message\":\"The server had an error\",\"type\":\"server_error\"}}\n\n");
    assert_eq!(s.model(), Some("gpt-4o-mini-2024-07-18"));
    assert_eq!(s.usage(), None);
    assert!(s.errored);
    // A Responses stream that fails still reports the usage it carries.
    let mut s = StreamUsage::new(Route::OpenAiResponses);
    s.feed(b"event: response.failed\ndata: {\"type\":\"response.failed\",\"response\":{\"model\":\"gpt-4o\",\"status\":\"failed\",\"usage\":{\"input_tokens\":30,\"input_tokens_details\":{\"cached_tokens\":10},\"output_tokens\":2}}}\n\n");
    assert_eq!(
        s.usage(),
        Some(&Usage {
            input: 20,
            output: 2,
            cache_write: 0,
            cache_read: 10,
            ..Default::default()
        })
    );
}

#[test]
fn a_model_name_with_a_json_escape_is_still_read() {
    let body = br#"{"model":"claude\u002dsonnet","usage":{"input_tokens":1,"output_tokens":2}}"#;
    let (_, model) = parse_json_usage(Route::AnthropicMessages, body).unwrap();
    assert_eq!(model.as_deref(), Some("claude-sonnet"));
}

#[test]
fn anthropic_cache_writes_split_by_lifetime_and_keep_the_split_when_repeated() {
    let mut s = StreamUsage::new(Route::AnthropicMessages);
    s.feed(br#"event: message_start
data: {"type":"message_start","message":{"model":"claude-opus-5-5","usage":{"input_tokens":10,"cache_creation_input_tokens":300,"cache_creation":{"ephemeral_5m_input_tokens":100,"ephemeral_1h_input_tokens":200},"cache_read_input_tokens":5,"output_tokens":1,"service_tier":"priority","inference_geo":"us"}}}

"#);
    // A later delta repeats only the total and adds the searches.
    s.feed(br#"event: message_delta
data: {"type":"message_delta","usage":{"input_tokens":900,"cache_creation_input_tokens":300,"output_tokens":50,"server_tool_use":{"web_search_requests":2},"output_tokens_details":{"thinking_tokens":20}}}

"#);
    assert_eq!(
        s.usage(),
        Some(&Usage {
            input: 900,
            output: 50,
            cache_write: 100,
            cache_write_1h: 200,
            cache_read: 5,
            reasoning: 20,
            web_search_requests: 2,
            service_tier: Some("priority".into()),
            inference_geo: Some("us".into()),
        })
    );
}

#[test]
fn anthropic_cache_writes_without_a_breakdown_are_5_minute_and_never_exceed_the_total() {
    let u = |body: &[u8]| parse_json_usage(Route::AnthropicMessages, body).unwrap().0;
    let old =
        u(br#"{"usage":{"input_tokens":1,"cache_creation_input_tokens":700,"output_tokens":2}}"#);
    assert_eq!((old.cache_write, old.cache_write_1h), (700, 0));
    // The breakdown alone gives the total.
    let only = u(br#"{"usage":{"input_tokens":1,"cache_creation":{"ephemeral_5m_input_tokens":3,"ephemeral_1h_input_tokens":4},"output_tokens":2}}"#);
    assert_eq!((only.cache_write, only.cache_write_1h), (3, 4));
    // A 1-hour part larger than the total is capped: never charged twice.
    let odd = u(br#"{"usage":{"input_tokens":1,"cache_creation_input_tokens":50,"cache_creation":{"ephemeral_5m_input_tokens":0,"ephemeral_1h_input_tokens":80},"output_tokens":2}}"#);
    assert_eq!((odd.cache_write, odd.cache_write_1h), (0, 50));
}

#[test]
fn openai_cache_writes_and_reads_come_out_of_the_prompt_and_reasoning_stays_in_output() {
    let body = br#"{"model":"gpt-6.1-sol","service_tier":"flex","usage":{"prompt_tokens":1000,"completion_tokens":300,"prompt_tokens_details":{"cached_tokens":600,"cache_write_tokens":256},"completion_tokens_details":{"reasoning_tokens":200}}}"#;
    let (u, _) = parse_json_usage(Route::OpenAiChat, body).unwrap();
    assert_eq!(
        u,
        Usage {
            input: 144,
            output: 300,
            cache_write: 256,
            cache_read: 600,
            reasoning: 200,
            service_tier: Some("flex".into()),
            ..Default::default()
        }
    );
    assert_eq!(u.total(), 1300, "reasoning is not added to the total again");
    // Counts that do not add up never make input negative.
    let odd = br#"{"usage":{"input_tokens":10,"input_tokens_details":{"cached_tokens":8,"cache_write_tokens":8},"output_tokens":1}}"#;
    let (u, _) = parse_json_usage(Route::OpenAiResponses, odd).unwrap();
    assert_eq!((u.input, u.cache_read, u.cache_write), (0, 8, 2));
}

#[test]
fn openai_web_searches_are_the_calls_that_did_not_fail() {
    let body = br#"{"model":"gpt-6.1-sol","output":[{"type":"web_search_call","status":"completed"},{"type":"web_search_call","status":"failed"},{"type":"message","status":"completed"},{"type":"web_search_call","status":"completed"}],"usage":{"input_tokens":10,"output_tokens":1}}"#;
    let (u, _) = parse_json_usage(Route::OpenAiResponses, body).unwrap();
    assert_eq!(u.web_search_requests, 2);
}

/// The text a stream's content deltas carry, read with a full JSON parse of
/// every event (the oracle the in-place reader is held to): Anthropic
/// `text_delta`, `thinking_delta`, `input_json_delta`; OpenAI chat
/// `delta.content` / `refusal` / tool-call arguments; Responses text deltas.
fn delta_text(route: Route, body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body).replace("\r\n", "\n");
    let mut out = String::new();
    for event in text.split("\n\n") {
        let name = event
            .lines()
            .find_map(|l| l.strip_prefix("event:"))
            .map(str::trim)
            .unwrap_or("");
        let data: String = event
            .lines()
            .filter_map(|l| l.strip_prefix("data:"))
            .map(|d| d.strip_prefix(' ').unwrap_or(d))
            .collect::<Vec<_>>()
            .join("\n");
        let Ok(v) = serde_json::from_str::<Value>(&data) else {
            continue;
        };
        let mut push = |s: &Value| {
            if let Some(s) = s.as_str() {
                out.push_str(s);
            }
        };
        match route.provider() {
            Provider::Anthropic if name == "content_block_delta" => {
                for key in ["text", "thinking", "partial_json"] {
                    push(&v["delta"][key]);
                }
            }
            Provider::Anthropic => {}
            Provider::OpenAi if name.is_empty() => {
                for choice in v["choices"].as_array().into_iter().flatten() {
                    push(&choice["delta"]["content"]);
                    push(&choice["delta"]["refusal"]);
                    for call in choice["delta"]["tool_calls"]
                        .as_array()
                        .into_iter()
                        .flatten()
                    {
                        push(&call["function"]["arguments"]);
                    }
                }
            }
            Provider::OpenAi
                if openai::wanted_event(name.as_bytes()) && name.ends_with(".delta") =>
            {
                push(&v["delta"])
            }
            Provider::OpenAi => {}
        }
    }
    out
}

fn tokens_of(text: &str) -> u64 {
    let json = serde_json::to_string(text).unwrap();
    let mut counter = estimate::TextCounter::default();
    counter.push_json(&json.as_bytes()[1..]).unwrap();
    counter.tokens()
}

fn relayed(route: Route, chunks: &[&[u8]]) -> (u64, Reported) {
    let mut s = StreamUsage::new(route);
    for c in chunks {
        s.feed(c);
    }
    (s.relayed_tokens(), s.reported())
}

#[test]
fn every_sse_fixture_counts_its_delta_text_the_same_at_every_split_point() {
    let mut checked = 0;
    for ex in manifest().iter().filter(|e| e["stream"] == true) {
        let name = ex["name"].as_str().unwrap();
        let body = file(ex["response"].as_str().unwrap());
        let r = route(ex);
        let whole = relayed(r, &[&body]);
        let text = delta_text(r, &body);
        assert!(!text.is_empty(), "{name}: no delta text in the fixture");
        assert_eq!(
            whole.0,
            tokens_of(&text),
            "{name}: the deltas' text, joined"
        );
        for cut in 0..=body.len() {
            assert_eq!(
                relayed(r, &[&body[..cut], &body[cut..]]),
                whole,
                "{name}: split at byte {cut}"
            );
        }
        let bytes: Vec<&[u8]> = body.chunks(1).collect();
        assert_eq!(relayed(r, &bytes), whole, "{name}: byte by byte");
        checked += 1;
    }
    assert!(checked >= 7, "only {checked} SSE fixtures");
}

#[test]
fn anthropic_counts_answer_thinking_and_tool_input_deltas_and_nothing_else() {
    let doc = concat!(
        "event: message_start\n",
        "data: {\"type\":\"message_start\",\"message\":{\"model\":\"m\",\"usage\":{\"input_tokens\":9,\"output_tokens\":1}}}\n\n",
        "event: content_block_delta\n",
        "data: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"thinking_delta\",\"thinking\":\"Let me think\"}}\n\n",
        "event: content_block_delta\n",
        "data: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"signature_delta\",\"signature\":\"EqQBCkYIBxgCKkBvY2sgc2lnbmF0dXJl\"}}\n\n",
        "event: content_block_delta\n",
        "data: {\"type\": \"content_block_delta\", \"index\": 1, \"delta\": {\"type\": \"text_delta\", \"text\": \" about \\\"it\\\"\"}}\n\n",
        "event: content_block_delta\n",
        "data: {\"type\":\"content_block_delta\",\"index\":2,\"delta\":{\"type\":\"input_json_delta\",\"partial_json\":\"{\\\"city\\\": \\\"Par\"}}\n\n",
        "event: content_block_delta\n",
        "data: {\"type\":\"content_block_delta\",\"index\":2,\"delta\":{\"type\":\"input_json_delta\",\"partial_json\":\"is\\\"}\"}}\n\n",
        "event: content_block_delta\n",
        "data: {\"type\":\"content_block_delta\",\"index\":1,\"delta\":{\"type\":\"citations_delta\",\"citation\":{\"cited_text\":\"not generated\",\"title\":\"t\"}}}\n\n",
    );
    let joined = "Let me think about \"it\"{\"city\": \"Paris\"}";
    let whole = relayed(Route::AnthropicMessages, &[doc.as_bytes()]);
    assert_eq!(whole.0, tokens_of(joined));
    // "Let me think about" 4, ` "` 1, "it" 1, `"{"` 2, "city" 1, `":` 1,
    // ` "` 1, "Paris" 1, `"}` 1: the tool input's word "Paris" is one
    // word, though it arrived in two deltas.
    assert_eq!(whole.0, 13);
    // message_start reports the input; its output count is a placeholder.
    assert_eq!(
        whole.1,
        Reported {
            input: true,
            output: false
        }
    );
    let mut s = StreamUsage::new(Route::AnthropicMessages);
    s.feed(doc.as_bytes());
    s.feed(b"event: message_delta\ndata: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":21}}\n\n");
    assert_eq!(
        s.reported(),
        Reported {
            input: true,
            output: true
        }
    );
    assert_eq!(s.usage().map(|u| (u.input, u.output)), Some((9, 21)));
}

#[test]
fn openai_counts_content_refusals_and_tool_arguments_of_every_choice() {
    let chat = concat!(
        "data: {\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\",\"refusal\":null}}],\"usage\":null}\n\n",
        "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hello there\"},\"logprobs\":{\"content\":[{\"token\":\"Hello\"}]}},{\"index\":1,\"delta\":{\"refusal\":\"I can't\"}}]}\n\n",
        "data: {\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[{\"index\":0,\"function\":{\"name\":\"get\",\"arguments\":\"{\\\"q\\\":1}\"}}]}}]}\n\n",
        "data: [DONE]\n\n",
    );
    let (tokens, reported) = relayed(Route::OpenAiChat, &[chat.as_bytes()]);
    assert_eq!(tokens, tokens_of("Hello thereI can't{\"q\":1}"));
    assert_eq!(
        reported,
        Reported::default(),
        "no usage chunk: nothing reported"
    );
    let responses = concat!(
        "event: response.created\n",
        "data: {\"type\":\"response.created\",\"response\":{\"model\":\"gpt-4o\",\"usage\":null}}\n\n",
        "event: response.output_text.delta\n",
        "data: {\"type\":\"response.output_text.delta\",\"item_id\":\"msg_1\",\"delta\":\"Hello\"}\n\n",
        "event: response.function_call_arguments.delta\n",
        "data: {\"type\":\"response.function_call_arguments.delta\",\"delta\":\" world\"}\n\n",
        "event: response.audio.delta\n",
        "data: {\"type\":\"response.audio.delta\",\"delta\":\"UklGRiQAAABXQVZFZm10IBAAAAABAAEA\"}\n\n",
        "event: response.completed\n",
        "data: {\"type\":\"response.completed\",\"response\":{\"model\":\"gpt-4o\",\"usage\":{\"input_tokens\":4,\"output_tokens\":2}}}\n\n",
    );
    let (tokens, reported) = relayed(Route::OpenAiResponses, &[responses.as_bytes()]);
    assert_eq!(tokens, 2, "\"Hello\" and \" world\"; audio is not text");
    assert_eq!(
        reported,
        Reported {
            input: true,
            output: true
        }
    );
}

#[test]
fn string_values_are_found_only_as_keys_with_string_values() {
    let mut found = Vec::new();
    for_each_string_value(
        br#"{"type":"text","text" : "a\"text\":\"b","content":null,"x":{"text":"c"},"text":["d"]}"#,
        &[b"text", b"content"],
        |raw| {
            let end = estimate::TextCounter::default().push_json(raw)?;
            found.push(String::from_utf8_lossy(&raw[..end]).into_owned());
            Some(end)
        },
    );
    // `"type":"text"` is a value; the key-like text inside the first value
    // is skipped with it; `null` and `["d"]` are not string values.
    assert_eq!(found, [r#"a\"text\":\"b"#, "c"]);
    // A string that never ends stops the scan.
    let mut calls = 0;
    for_each_string_value(br#"{"text":"open"#, &[b"text"], |_| {
        calls += 1;
        None
    });
    assert_eq!(calls, 1);
}
