//! Scenario tests: the whole request lifecycle against the fake host, with
//! the policy inline next to the request and the expected decision.
#![allow(clippy::unwrap_used, clippy::panic)]

use super::*;
use crate::testing::{FakeHost, MemStore};

const ALICE: &str = "tg-alice-key";
const BOB: &str = "tg-bob-key";

fn policy(extra_keys: &str) -> Rc<Policy> {
    policy_with_settings("{}", extra_keys)
}

fn policy_with_settings(settings: &str, extra_keys: &str) -> Rc<Policy> {
    let json = format!(
        r#"{{
        "version": 1,
        "settings": {settings},
        "defaults": {{ "models": ["claude-haiku-*"], "limits": {{ "requests_per_minute": 2 }} }},
        "groups": {{ "engineering": {{ "models": ["claude-sonnet-*", "gpt-4o*"] }} }},
        "pools": {{ "team:payments": {{ "output_tokens_per_minute": 1000 }} }},
        "keys": [
          {{ "id": "alice-laptop", "key_sha256": "{}", "user": "alice@example.com",
             "team": "payments", "groups": ["engineering"] }},
          {{ "id": "bob", "key_sha256": "{}", "revoked": true }}
          {extra_keys}
        ],
        "prices": {{ "claude-sonnet-*": {{ "input": 3, "output": 15 }} }}
      }}"#,
        crate::vkey::sha256_hex(ALICE),
        crate::vkey::sha256_hex(BOB)
    );
    Rc::new(
        crate::policy::compile(json.as_bytes(), "test.json", 0)
            .unwrap()
            .0,
    )
}

fn request(path: &str, key: &str, body: &str) -> FakeHost {
    FakeHost::new()
        .with_request_header(":path", path)
        .with_request_header(":method", "POST")
        .with_request_header("x-request-id", "req-1")
        .with_request_header("x-api-key", key)
        .with_request_header("accept-encoding", "gzip")
        .with_body(body)
}

fn reply(d: Decision) -> LocalReply {
    match d {
        Decision::Reply(r) => r,
        other => panic!("expected a local reply, got {other:?}"),
    }
}

fn send(flow: &mut RequestFlow, host: &mut FakeHost) -> Decision {
    match flow.on_request_headers(host, false) {
        Decision::Pause => {
            let n = host.body_len();
            flow.on_request_body(host, n, true)
        }
        other => other,
    }
}

fn json(body: &str) -> serde_json::Value {
    serde_json::from_str(body).unwrap()
}

const SONNET: &str =
    r#"{"model":"claude-sonnet-4-5","max_tokens":100,"messages":[{"role":"user","content":"hi"}]}"#;

#[test]
fn forwards_allowed_request_without_virtual_key_or_accept_encoding() {
    let p = policy("");
    let mut host = request("/v1/messages", ALICE, SONNET);
    let mut flow = RequestFlow::new(p);
    assert_eq!(send(&mut flow, &mut host), Decision::Continue);
    assert_eq!(host.request_header("x-api-key"), None);
    assert_eq!(host.request_header("authorization"), None);
    assert_eq!(host.request_header("accept-encoding"), None);
    let rec = host.last_audit().unwrap();
    assert!(
        !rec.complete,
        "a provisional record is published at request time"
    );
    assert_eq!(rec.key_id.as_deref(), Some("alice-laptop"));
    assert_eq!(rec.user.as_deref(), Some("alice@example.com"));
    assert_eq!(rec.model_requested.as_deref(), Some("claude-sonnet-4-5"));
}

#[test]
fn unknown_key_gets_anthropic_401_before_upstream() {
    let mut host = request("/v1/messages", "tg-nope", SONNET);
    let mut flow = RequestFlow::new(policy(""));
    let r = reply(flow.on_request_headers(&mut host, false));
    assert_eq!(r.status, 401);
    let b = json(&r.body);
    assert_eq!(b["error"]["type"], "authentication_error");
    assert_eq!(b["error"]["message"], "invalid x-api-key");
    assert_eq!(b["request_id"], "req-1");
    let rec = host.last_audit().unwrap();
    assert_eq!(
        (rec.reason, rec.status, rec.complete),
        (Reason::UnknownKey, 401, true)
    );
}

#[test]
fn missing_key_on_openai_route_gets_openai_shaped_401() {
    let mut host = FakeHost::new()
        .with_request_header(":path", "/v1/chat/completions")
        .with_body("{}");
    let r = reply(RequestFlow::new(policy("")).on_request_headers(&mut host, false));
    assert_eq!(r.status, 401);
    let b = json(&r.body);
    assert_eq!(b["error"]["code"], "invalid_api_key");
    assert!(b["error"]["message"]
        .as_str()
        .unwrap()
        .starts_with("missing API key"));
}

#[test]
fn revoked_key_says_revoked() {
    let mut host = request("/v1/messages", BOB, SONNET);
    let r = reply(RequestFlow::new(policy("")).on_request_headers(&mut host, false));
    assert_eq!(r.status, 401);
    assert_eq!(
        json(&r.body)["error"]["message"],
        "this API key has been revoked"
    );
}

#[test]
fn expired_key_says_when() {
    let extra = format!(
        r#",{{"id":"old","key_sha256":"{}","expires_at":"2020-01-01T00:00:00Z"}}"#,
        crate::vkey::sha256_hex("tg-old")
    );
    let mut host = request("/v1/messages", "tg-old", SONNET);
    let r = reply(RequestFlow::new(policy(&extra)).on_request_headers(&mut host, false));
    assert_eq!(
        json(&r.body)["error"]["message"],
        "this API key expired at 2020-01-01T00:00:00Z"
    );
    assert_eq!(host.last_audit().unwrap().reason, Reason::ExpiredKey);
}

/// `carol` rotated from `tg-carol-old` to `tg-carol-new`; the old secret
/// works until 2026-12-06T12:00:00Z (1_796_558_400_000 ms).
fn rotated_policy(revoked: bool) -> Rc<Policy> {
    policy(&format!(
        r#",{{"id":"carol","key_sha256":"{}","team":"payments","groups":["engineering"],"revoked":{revoked},
             "previous":[{{"key_sha256":"{}","not_after":"2026-12-06T12:00:00Z"}}]}}"#,
        crate::vkey::sha256_hex("tg-carol-new"),
        crate::vkey::sha256_hex("tg-carol-old")
    ))
}

const CAROL_OLD_UNTIL: u64 = 1_796_558_400_000;

#[test]
fn both_secrets_of_a_rotating_key_work_under_its_one_id_until_not_after() {
    let p = rotated_policy(false);
    for key in ["tg-carol-new", "tg-carol-old"] {
        let mut host = request("/v1/messages", key, SONNET).at(CAROL_OLD_UNTIL - 1);
        let mut flow = RequestFlow::new(p.clone());
        assert_eq!(send(&mut flow, &mut host), Decision::Continue, "{key}");
        let rec = host.last_audit().unwrap();
        assert_eq!(rec.key_id.as_deref(), Some("carol"), "{key}");
        assert_eq!(rec.team.as_deref(), Some("payments"), "{key}");
    }
}

#[test]
fn a_previous_secret_is_refused_from_its_not_after_saying_it_was_rotated() {
    let p = rotated_policy(false);
    let mut host = request("/v1/messages", "tg-carol-old", SONNET).at(CAROL_OLD_UNTIL);
    let r = reply(RequestFlow::new(p.clone()).on_request_headers(&mut host, false));
    assert_eq!(r.status, 401);
    let b = json(&r.body);
    assert_eq!(b["error"]["type"], "authentication_error");
    assert_eq!(
        b["error"]["message"],
        "this API key was rotated and its previous secret expired at 2026-12-06T12:00:00Z"
    );
    let rec = host.last_audit().unwrap();
    assert_eq!(
        (rec.reason, rec.status, rec.key_id.as_deref()),
        (Reason::RotatedKey, 401, Some("carol")),
        "the refusal is audited under the key's one id"
    );
    // The current secret goes on working.
    let mut host = request("/v1/messages", "tg-carol-new", SONNET).at(CAROL_OLD_UNTIL + 1);
    assert_eq!(
        send(&mut RequestFlow::new(p), &mut host),
        Decision::Continue
    );
}

#[test]
fn a_revoked_key_is_refused_as_revoked_whichever_secret_is_presented() {
    let p = rotated_policy(true);
    for (key, at) in [
        ("tg-carol-new", CAROL_OLD_UNTIL - 1),
        ("tg-carol-old", CAROL_OLD_UNTIL - 1),
        ("tg-carol-old", CAROL_OLD_UNTIL + 1),
    ] {
        let mut host = request("/v1/messages", key, SONNET).at(at);
        let r = reply(RequestFlow::new(p.clone()).on_request_headers(&mut host, false));
        assert_eq!(
            json(&r.body)["error"]["message"],
            "this API key has been revoked",
            "{key} at {at}"
        );
    }
}

#[test]
fn denies_model_outside_group_allowlist() {
    let body = r#"{"model":"claude-opus-4-1","max_tokens":10,"messages":[]}"#;
    let mut host = request("/v1/messages", ALICE, body);
    let r = reply(send(&mut RequestFlow::new(policy("")), &mut host));
    assert_eq!(r.status, 403);
    let b = json(&r.body);
    assert_eq!(b["error"]["type"], "permission_error");
    assert_eq!(
        b["error"]["message"],
        "model claude-opus-4-1 is not allowed for this key (allowed: claude-sonnet-*, gpt-4o*)"
    );
    // A known caller still sees their own bucket state, untouched.
    assert_eq!(
        r.header("anthropic-ratelimit-requests-remaining"),
        Some("2")
    );
}

#[test]
fn malformed_json_is_a_400_not_a_crash() {
    let mut host = request("/v1/messages", ALICE, "{\"model\": ");
    let r = reply(send(&mut RequestFlow::new(policy("")), &mut host));
    assert_eq!(r.status, 400);
    let msg = json(&r.body)["error"]["message"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(msg.starts_with("request body is not valid JSON"), "{msg}");
}

#[test]
fn missing_model_is_a_400_naming_the_field() {
    let mut host = request("/v1/messages", ALICE, r#"{"max_tokens":5}"#);
    let r = reply(send(&mut RequestFlow::new(policy("")), &mut host));
    assert_eq!(json(&r.body)["error"]["message"], "model: field required");
}

#[test]
fn third_request_in_a_minute_gets_429_with_retry_after_and_headers() {
    let p = policy("");
    let store = MemStore::new();
    for _ in 0..2 {
        let mut host = request("/v1/messages", ALICE, SONNET).with_store(store.clone());
        assert_eq!(
            send(&mut RequestFlow::new(p.clone()), &mut host),
            Decision::Continue
        );
    }
    let mut host = request("/v1/messages", ALICE, SONNET).with_store(store.clone());
    let r = reply(send(&mut RequestFlow::new(p), &mut host));
    assert_eq!(r.status, 429);
    assert_eq!(r.header("retry-after"), Some("30"));
    assert_eq!(r.header("x-should-retry"), None);
    assert_eq!(r.header("anthropic-ratelimit-requests-limit"), Some("2"));
    assert_eq!(
        r.header("anthropic-ratelimit-requests-remaining"),
        Some("0")
    );
    let b = json(&r.body);
    assert_eq!(b["error"]["type"], "rate_limit_error");
    assert_eq!(
        b["error"]["message"],
        "requests_per_minute limit of 2 reached for key:alice-laptop; retry in 30s"
    );
    let rec = host.last_audit().unwrap();
    assert_eq!(
        rec.bucket.as_deref(),
        Some("key:alice-laptop:requests_per_minute")
    );
    assert_eq!(rec.reason, Reason::RateLimited);
}

#[test]
fn charges_json_usage_at_end_and_credits_the_unused_reservation() {
    let p = policy("");
    let mut host = request("/v1/messages", ALICE, SONNET);
    let mut flow = RequestFlow::new(p);
    send(&mut flow, &mut host);
    host.response_headers = vec![
        (":status".into(), b"200".to_vec()),
        ("content-type".into(), b"application/json".to_vec()),
    ];
    flow.on_response_headers(&mut host, false);
    assert_eq!(
        host.response_header("anthropic-ratelimit-requests-remaining")
            .as_deref(),
        Some("1")
    );
    host.response_chunk = br#"{"id":"msg_1","model":"claude-sonnet-4-5-20250929","usage":{"input_tokens":12,"output_tokens":40}}"#.to_vec();
    let n = host.response_chunk.len();
    flow.on_response_body(&mut host, n, true);
    let rec = host.last_audit().unwrap();
    assert!(rec.complete);
    assert_eq!((rec.tokens.input, rec.tokens.output), (Some(12), Some(40)));
    assert_eq!(
        rec.model_served.as_deref(),
        Some("claude-sonnet-4-5-20250929")
    );
    // 12 * $3/M + 40 * $15/M
    assert!((rec.cost_usd.unwrap() - 0.000636).abs() < 1e-12);
    // Pool output bucket: 100 reserved, 40 used -> 960 left.
    let cell = crate::meter::store::read(&*host.store, "tollgate/2/pool:team:payments")
        .unwrap()
        .slot(crate::meter::Metric::from_field("output_tokens_per_minute").unwrap());
    assert_eq!(cell.value, 960.0);
}

#[test]
fn upstream_error_without_usage_refunds_the_reservation() {
    let mut host = request("/v1/messages", ALICE, SONNET);
    let mut flow = RequestFlow::new(policy(""));
    send(&mut flow, &mut host);
    host.response_headers = vec![
        (":status".into(), b"529".to_vec()),
        ("content-type".into(), b"application/json".to_vec()),
    ];
    flow.on_response_headers(&mut host, false);
    host.response_chunk =
        br#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#.to_vec();
    let n = host.response_chunk.len();
    flow.on_response_body(&mut host, n, true);
    let cell = crate::meter::store::read(&*host.store, "tollgate/2/pool:team:payments")
        .unwrap()
        .slot(crate::meter::Metric::from_field("output_tokens_per_minute").unwrap());
    assert_eq!(cell.value, 1000.0);
    let rec = host.last_audit().unwrap();
    assert_eq!(rec.status, 529);
    // Nothing was charged: the provisional figures published at admission
    // are gone from the final record.
    assert_eq!(
        (
            rec.tokens.input,
            rec.tokens.output,
            rec.tokens.input_source,
            rec.cost_usd
        ),
        (None, None, None, None)
    );
}

/// The pool's output bucket (1,000 a minute) as it stands.
fn pool_output(host: &FakeHost) -> f64 {
    crate::meter::store::read(&*host.store, "tollgate/2/pool:team:payments")
        .unwrap()
        .slot(crate::meter::Metric::from_field("output_tokens_per_minute").unwrap())
        .value
}

/// Before this change an abort charged the whole reservation and audited
/// null tokens; now it is charged what it consumed (the input estimate, no
/// output: nothing was relayed) and the record Envoy logs says so.
#[test]
fn client_abort_before_any_output_charges_the_input_estimate_and_no_output() {
    let mut host = request("/v1/messages", ALICE, SONNET);
    let mut flow = RequestFlow::new(policy(""));
    send(&mut flow, &mut host);
    // What Envoy's access loggers read: they run before `on_log`.
    let logged = host.last_audit().unwrap();
    let published = host.audit.len();
    flow.on_end(&mut host);
    assert_eq!(
        host.audit.len(),
        published,
        "nothing is published at on_log"
    );
    assert!(!logged.complete);
    let t = &logged.tokens;
    // "hi": 1 token, plus 4 per request and 3 per message.
    assert_eq!(
        (t.input_estimated, t.input, t.output),
        (8, Some(8), Some(0))
    );
    assert_eq!(
        (t.input_source, t.output_source),
        (Some(TokenSource::Reservation), Some(TokenSource::Estimate))
    );
    // 8 input tokens at $3/M.
    assert!((logged.cost_usd.unwrap() - 0.000024).abs() < 1e-12);
    assert_eq!(pool_output(&host), 1000.0, "no output charged");
}

#[test]
fn a_compressed_answer_that_ends_early_is_charged_the_output_reserved() {
    let mut host = request("/v1/messages", ALICE, SONNET);
    let mut flow = RequestFlow::new(policy(""));
    send(&mut flow, &mut host);
    host.response_headers = vec![
        (":status".into(), b"200".to_vec()),
        ("content-type".into(), b"text/event-stream".to_vec()),
        ("content-encoding".into(), b"gzip".to_vec()),
    ];
    flow.on_response_headers(&mut host, false);
    host.response_chunk = vec![0x1f, 0x8b, 0x08, 0x00];
    flow.on_response_body(&mut host, 4, false);
    let logged = host.last_audit().unwrap();
    flow.on_end(&mut host);
    let t = &logged.tokens;
    assert_eq!((t.input, t.output), (Some(8), Some(100)));
    assert_eq!(
        (t.input_source, t.output_source),
        (
            Some(TokenSource::Reservation),
            Some(TokenSource::Reservation)
        )
    );
    assert_eq!(pool_output(&host), 900.0, "the 100 reserved are kept");
}

/// A key with a daily token quota and a daily budget: neither refills
/// within the day, so what is left tells exactly what was charged.
fn quota_policy() -> Rc<Policy> {
    let json = format!(
        r#"{{"version": 1,
            "defaults": {{"models": ["claude-*", "gpt-4o*"],
                          "limits": {{"tokens_per_day": 100000, "budget_usd_per_day": 10}}}},
            "keys": [{{"id": "alice-laptop", "key_sha256": "{}"}}],
            "prices": {{"claude-sonnet-*": {{"input": 3, "output": 15}},
                        "gpt-4o*": {{"input": 2.5, "output": 10}}}}}}"#,
        crate::vkey::sha256_hex(ALICE)
    );
    Rc::new(
        crate::policy::compile(json.as_bytes(), "q.json", 0)
            .unwrap()
            .0,
    )
}

/// What the daily quota and budget were charged: (tokens, USD). A quota's
/// cell holds what the day consumed.
fn charged(host: &FakeHost) -> (f64, f64) {
    let record = crate::meter::store::read(&*host.store, "tollgate/2/key:alice-laptop").unwrap();
    let used = |field| {
        record
            .slot(crate::meter::Metric::from_field(field).unwrap())
            .value
    };
    (used("tokens_per_day"), used("budget_usd_per_day"))
}

/// Asserts the buckets were charged exactly what the record says.
fn assert_charged_as_audited(host: &FakeHost, rec: &AuditRecord) {
    let t = &rec.tokens;
    let tokens =
        t.input.unwrap() + t.output.unwrap() + t.cache_write.unwrap() + t.cache_read.unwrap();
    let (got_tokens, got_usd) = charged(host);
    assert_eq!(
        got_tokens, tokens as f64,
        "tokens charged vs audited: {rec:?}"
    );
    assert!(
        (got_usd - rec.cost_usd.unwrap()).abs() < 1e-12,
        "USD charged {got_usd} vs audited: {rec:?}"
    );
}

const STREAM_OK: &[(&str, &[u8])] = &[
    (":status", b"200"),
    ("content-type", b"text/event-stream; charset=utf-8"),
];

/// Sends a streamed request for `body` and its 200 response headers.
fn start_stream(flow: &mut RequestFlow, path: &str, body: &str) -> FakeHost {
    let mut host = request(path, ALICE, body);
    send(flow, &mut host);
    host.response_headers = STREAM_OK
        .iter()
        .map(|(n, v)| (n.to_string(), v.to_vec()))
        .collect();
    flow.on_response_headers(&mut host, false);
    host
}

/// Passes one stream chunk at `at_ms` after the start.
fn chunk(flow: &mut RequestFlow, host: &mut FakeHost, at_ms: u64, data: &str) {
    host.now_ms = 1_795_000_000_000 + at_ms;
    host.response_chunk = data.as_bytes().to_vec();
    flow.on_response_body(host, data.len(), false);
}

fn text_delta(text: &str) -> String {
    format!(
        "event: content_block_delta\ndata: {{\"type\":\"content_block_delta\",\"index\":0,\"delta\":{{\"type\":\"text_delta\",\"text\":\"{text}\"}}}}\n\n"
    )
}

const MESSAGE_START: &str = "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"model\":\"claude-sonnet-4-5\",\"usage\":{\"input_tokens\":7,\"output_tokens\":1}}}\n\n";

/// A `claude-sonnet-4-5` stream of `max_tokens` with an empty prompt (input
/// estimate 4), under [`quota_policy`], after its `message_start`
/// (`input_tokens: 7`) at time 0.
fn sonnet_stream(max_tokens: u64) -> (RequestFlow, FakeHost) {
    let body = format!(
        r#"{{"model":"claude-sonnet-4-5","max_tokens":{max_tokens},"stream":true,"messages":[]}}"#
    );
    let mut flow = RequestFlow::new(quota_policy());
    let mut host = start_stream(&mut flow, "/v1/messages", &body);
    chunk(&mut flow, &mut host, 0, MESSAGE_START);
    (flow, host)
}

/// Every provisional record published with a charge, parsed, in order
/// (the one published at the request headers only names the caller).
fn provisional(host: &FakeHost) -> Vec<AuditRecord> {
    host.audit
        .iter()
        .map(|r| AuditRecord::from_json(r).unwrap())
        .filter(|r| !r.complete && r.tokens.input_source.is_some())
        .collect()
}

/// A client that leaves mid-stream: the record is republished every 32
/// tokens or 200 ms of stream, and the buckets are settled with the last
/// one, which is what Envoy's access loggers read.
#[test]
fn a_stream_the_client_leaves_is_charged_exactly_what_its_last_record_says() {
    let (mut flow, mut host) = sonnet_stream(100);
    // 45 one-token words, one every 10 ms.
    for i in 1..=45 {
        chunk(&mut flow, &mut host, 10 * i, &text_delta("word "));
    }
    let logged = host.last_audit().unwrap();
    let published = host.audit.len();
    flow.on_end(&mut host);
    assert_eq!(host.audit.len(), published);
    // Published at admission (input estimate 4, no output), when
    // message_start brought the provider's input count, then after 20
    // words (200 ms) and 40 (200 ms again): the last 5 were never published.
    let outputs: Vec<_> = provisional(&host)
        .iter()
        .map(|r| (r.tokens.input, r.tokens.output, r.tokens.input_source))
        .collect();
    assert_eq!(
        outputs,
        [
            (Some(4), Some(0), Some(TokenSource::Reservation)),
            (Some(7), Some(0), Some(TokenSource::Provider)),
            (Some(7), Some(20), Some(TokenSource::Provider)),
            (Some(7), Some(40), Some(TokenSource::Provider)),
        ]
    );
    assert_eq!(logged.tokens.output_source, Some(TokenSource::Estimate));
    assert!(!logged.complete);
    // 7 × $3/M + 40 × $15/M.
    assert!((logged.cost_usd.unwrap() - 0.000621).abs() < 1e-12);
    assert_charged_as_audited(&host, &logged);
    assert_eq!(charged(&host).0, 47.0);
}

#[test]
fn a_fast_stream_is_republished_every_32_tokens() {
    let (mut flow, mut host) = sonnet_stream(500);
    // 100 words in 50 ms: the clock never reaches 200 ms.
    for i in 1..=100 {
        chunk(&mut flow, &mut host, i / 2, &text_delta("word "));
    }
    let outputs: Vec<_> = provisional(&host)
        .iter()
        .filter_map(|r| r.tokens.output)
        .collect();
    assert_eq!(outputs, [0, 0, 32, 64, 96]);
    let logged = host.last_audit().unwrap();
    flow.on_end(&mut host);
    assert_charged_as_audited(&host, &logged);
    assert_eq!(charged(&host).0, 7.0 + 96.0, "under-charged by 4 < 32");
}

#[test]
fn the_providers_output_count_is_published_at_once_and_charged_if_the_client_leaves() {
    let (mut flow, mut host) = sonnet_stream(100);
    chunk(&mut flow, &mut host, 1, &text_delta("three words here"));
    chunk(
        &mut flow,
        &mut host,
        2,
        "event: message_delta\ndata: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":55}}\n\n",
    );
    // The client leaves before message_stop.
    let logged = host.last_audit().unwrap();
    flow.on_end(&mut host);
    let t = &logged.tokens;
    assert_eq!((t.input, t.output), (Some(7), Some(55)));
    assert_eq!(
        (t.input_source, t.output_source),
        (Some(TokenSource::Provider), Some(TokenSource::Provider))
    );
    assert_charged_as_audited(&host, &logged);
    assert_eq!(charged(&host).0, 7.0 + 55.0);
}

#[test]
fn an_openai_stream_cut_before_its_usage_chunk_is_charged_the_input_estimate_and_the_text_relayed()
{
    let body = r#"{"model":"gpt-4o","max_tokens":200,"stream":true,"stream_options":{"include_usage":true},"messages":[{"role":"user","content":"Tell me a story"}]}"#;
    let mut flow = RequestFlow::new(quota_policy());
    let mut host = start_stream(&mut flow, "/v1/chat/completions", body);
    let content = |text: &str| {
        format!("data: {{\"model\":\"gpt-4o-2024-08-06\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"{text}\"}}}}],\"usage\":null}}\n\n")
    };
    chunk(&mut flow, &mut host, 0, &content("Once upon"));
    // 250 ms later: due by time.
    chunk(
        &mut flow,
        &mut host,
        250,
        &content(" a time, in a data centre"),
    );
    let logged = host.last_audit().unwrap();
    flow.on_end(&mut host);
    let t = &logged.tokens;
    // "Tell me a story": 4 tokens, 3 for the message, 3 to prime the reply.
    assert_eq!(
        (t.input, t.input_source),
        (Some(10), Some(TokenSource::Reservation))
    );
    // "Once upon a time, in a data centre": 8 words and a comma.
    assert_eq!(
        (t.output, t.output_source),
        (Some(9), Some(TokenSource::Estimate))
    );
    assert_eq!(logged.model_served.as_deref(), Some("gpt-4o-2024-08-06"));
    // 10 × $2.50/M + 9 × $10/M.
    assert!((logged.cost_usd.unwrap() - 0.000115).abs() < 1e-12);
    assert_charged_as_audited(&host, &logged);
}

#[test]
fn charges_stream_usage_at_end() {
    let body = r#"{"model":"claude-sonnet-4-5","max_tokens":100,"stream":true,"messages":[]}"#;
    let mut host = request("/v1/messages", ALICE, body);
    let mut flow = RequestFlow::new(policy(""));
    send(&mut flow, &mut host);
    host.response_headers = vec![
        (":status".into(), b"200".to_vec()),
        (
            "content-type".into(),
            b"text/event-stream; charset=utf-8".to_vec(),
        ),
    ];
    flow.on_response_headers(&mut host, false);
    let stream = "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"model\":\"claude-sonnet-4-5\",\"usage\":{\"input_tokens\":7,\"output_tokens\":1}}}\n\nevent: message_delta\ndata: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":55}}\n\n";
    for (i, part) in [&stream[..30], &stream[30..120], &stream[120..]]
        .iter()
        .enumerate()
    {
        host.response_chunk = part.as_bytes().to_vec();
        flow.on_response_body(&mut host, part.len(), i == 2);
    }
    let rec = host.last_audit().unwrap();
    assert!(rec.stream && rec.complete);
    assert_eq!((rec.tokens.input, rec.tokens.output), (Some(7), Some(55)));
}

#[test]
fn unknown_route_is_denied_with_404_by_default() {
    let mut host = request("/v1/models", ALICE, "");
    let r = reply(RequestFlow::new(policy("")).on_request_headers(&mut host, true));
    assert_eq!(r.status, 404);
    assert_eq!(json(&r.body)["error"]["type"], "not_found_error");
}

#[test]
fn without_header_hold_the_headers_continue_and_the_body_decides() {
    let mut host = request("/v1/messages", ALICE, SONNET);
    let mut flow = RequestFlow::with_options(
        policy(""),
        FilterOptions {
            hold_request_headers: false,
            shared: None,
        },
    );
    assert_eq!(
        flow.on_request_headers(&mut host, false),
        Decision::Continue
    );
    assert_eq!(flow.on_request_body(&mut host, 10, false), Decision::Pause);
    let n = host.body_len();
    assert_eq!(flow.on_request_body(&mut host, n, true), Decision::Continue);
}

#[test]
fn openai_stream_without_include_usage_is_asked_for_usage_and_the_extra_chunk_stripped() {
    let body =
        r#"{"model":"gpt-4o-mini","stream":true,"messages":[{"role":"user","content":"hi"}]}"#;
    let mut host = request("/v1/chat/completions", ALICE, body)
        .with_request_header("content-length", &body.len().to_string());
    let mut flow = RequestFlow::new(policy(""));
    assert_eq!(send(&mut flow, &mut host), Decision::Continue);
    let sent: serde_json::Value = serde_json::from_slice(&host.request_body).unwrap();
    assert_eq!(sent["stream_options"]["include_usage"], true);
    assert_eq!(
        host.request_header("content-length"),
        Some(host.request_body.len().to_string())
    );

    host.response_headers = vec![
        (":status".into(), b"200".to_vec()),
        ("content-type".into(), b"text/event-stream".to_vec()),
    ];
    flow.on_response_headers(&mut host, false);
    let chunks = [
        "data: {\"model\":\"gpt-4o-mini\",\"choices\":[{\"delta\":{\"content\":\"hi\"}}],\"usage\":null}\n\ndata: {\"model\":\"gpt-4o-mini\",\"choi",
        "ces\":[],\"usage\":{\"prompt_tokens\":9,\"completion_tokens\":2}}\n\ndata: [DONE]\n\n",
    ];
    let mut forwarded = String::new();
    for (i, c) in chunks.iter().enumerate() {
        host.response_chunk = c.as_bytes().to_vec();
        flow.on_response_body(&mut host, c.len(), i == 1);
        forwarded.push_str(&String::from_utf8_lossy(&host.response_chunk));
    }
    assert!(
        !forwarded.contains("prompt_tokens"),
        "the client did not ask for the usage chunk: {forwarded}"
    );
    assert!(forwarded.contains("\"content\":\"hi\"") && forwarded.ends_with("data: [DONE]\n\n"));
    let rec = host.last_audit().unwrap();
    assert_eq!(
        (rec.tokens.input, rec.tokens.output),
        (Some(9), Some(2)),
        "usage charged even though the client never asked"
    );
}

#[test]
fn openai_stream_that_asked_for_usage_is_left_alone() {
    let body = r#"{"model":"gpt-4o-mini","stream":true,"stream_options":{"include_usage":true},"messages":[]}"#;
    let mut host = request("/v1/chat/completions", ALICE, body);
    send(&mut RequestFlow::new(policy("")), &mut host);
    assert_eq!(host.request_body, body.as_bytes());
}

#[test]
fn unpriced_model_is_denied_when_a_budget_applies() {
    let extra = format!(
        r#",{{"id":"capped","key_sha256":"{}","groups":["engineering"],"limits":{{"budget_usd_per_day":5}}}}"#,
        crate::vkey::sha256_hex("tg-capped")
    );
    // The group allows `gpt-4o*`; the shipped table prices gpt-4o and
    // gpt-4o-mini (so the policy loads) but not every model of the glob.
    let body = r#"{"model":"gpt-4o-audio-preview","max_tokens":10,"messages":[]}"#;
    let mut host = request("/v1/chat/completions", "tg-capped", body);
    let r = reply(send(&mut RequestFlow::new(policy(&extra)), &mut host));
    assert_eq!(r.status, 403);
    assert_eq!(
        json(&r.body)["error"]["message"],
        "model gpt-4o-audio-preview has no price in the policy and a USD budget applies to this key; add it under \"prices\" or set settings.default_price"
    );
    // Without a budget the same model is fine (it costs nothing toward budgets).
    let mut host = request("/v1/chat/completions", ALICE, body);
    assert_eq!(
        send(&mut RequestFlow::new(policy("")), &mut host),
        Decision::Continue
    );
}

#[test]
fn compressed_response_charges_the_reservation_and_says_why() {
    let mut host = request("/v1/messages", ALICE, SONNET);
    let mut flow = RequestFlow::new(policy(""));
    send(&mut flow, &mut host);
    host.response_headers = vec![
        (":status".into(), b"200".to_vec()),
        ("content-type".into(), b"application/json".to_vec()),
        ("content-encoding".into(), b"gzip".to_vec()),
    ];
    flow.on_response_headers(&mut host, false);
    host.response_chunk = vec![0x1f, 0x8b, 0x08, 0x00];
    flow.on_response_body(&mut host, 4, true);
    let rec = host.last_audit().unwrap();
    assert_eq!(
        rec.detail.as_deref(),
        Some("response was compressed; charged the reservation")
    );
    // The record says what was charged (it said nothing before): the
    // reservation, 8 input and 100 output tokens at $3/M and $15/M.
    let t = &rec.tokens;
    assert_eq!((t.input, t.output), (Some(8), Some(100)));
    assert_eq!(
        (t.input_source, t.output_source),
        (
            Some(TokenSource::Reservation),
            Some(TokenSource::Reservation)
        )
    );
    assert!((rec.cost_usd.unwrap() - 0.001524).abs() < 1e-12);
    // The pool's output bucket keeps the whole reservation (100 of 1000).
    let cell = crate::meter::store::read(&*host.store, "tollgate/2/pool:team:payments")
        .unwrap()
        .slot(crate::meter::Metric::from_field("output_tokens_per_minute").unwrap());
    assert_eq!(cell.value, 900.0);
}

/// A key allowed `claude-*` with a daily budget, and the price of the two
/// models the pricing fixtures name.
fn priced_policy() -> Rc<Policy> {
    let json = format!(
        r#"{{"version": 1,
            "keys": [{{"id": "finops", "key_sha256": "{}", "groups": ["eng"],
                       "limits": {{"budget_usd_per_day": 50}}}}],
            "groups": {{"eng": {{"models": ["claude-*"]}}}},
            "prices": {{
              "claude-opus-5-5": {{"input": 5, "output": 25, "cache_write": 6.25, "cache_write_1h": 10,
                                   "cache_read": 0.5, "web_search_per_thousand": 10,
                                   "tiers": {{"priority": 2, "batch": 0.5}}, "regions": {{"us": 1.1}}}},
              "claude-haiku-5-5": {{"input": 0.1, "output": 0.5, "cache_read": 0.01,
                                    "long_context": {{"above_input_tokens": 100000, "input": 0.5, "output": 2.5}}}}
            }}}}"#,
        crate::vkey::sha256_hex("tg-finops")
    );
    Rc::new(
        crate::policy::compile(json.as_bytes(), "test.json", 0)
            .unwrap()
            .0,
    )
}

/// Sends a request and replays a recorded response in one chunk.
fn replay(body: &str, content_type: &str, response: &[u8]) -> FakeHost {
    let mut host = request("/v1/messages", "tg-finops", body);
    let mut flow = RequestFlow::new(priced_policy());
    assert_eq!(send(&mut flow, &mut host), Decision::Continue);
    host.response_headers = vec![
        (":status".into(), b"200".to_vec()),
        ("content-type".into(), content_type.as_bytes().to_vec()),
    ];
    flow.on_response_headers(&mut host, false);
    host.response_chunk = response.to_vec();
    flow.on_response_body(&mut host, response.len(), true);
    host
}

#[test]
fn prices_1h_cache_writes_searches_and_the_served_tier_and_region() {
    let host = replay(
        r#"{"model":"claude-opus-5-5","max_tokens":4096,"stream":true,"service_tier":"auto","messages":[]}"#,
        "text/event-stream; charset=utf-8",
        include_bytes!(
            "../../../tests/fixtures/anthropic/messages-stream-web-search-1h-priority.response.sse"
        ),
    );
    let rec = host.last_audit().unwrap();
    let t = &rec.tokens;
    assert_eq!(
        (
            t.input,
            t.output,
            t.cache_write,
            t.cache_write_1h,
            t.cache_read
        ),
        (
            Some(15_071),
            Some(1_104),
            Some(1_020),
            Some(4_147),
            Some(2_069)
        )
    );
    assert_eq!((t.reasoning, t.web_search_requests), (Some(640), Some(3)));
    // The response's tier and region, not the request's "auto".
    assert_eq!(rec.service_tier.as_deref(), Some("priority"));
    assert_eq!(rec.inference_geo.as_deref(), Some("us"));
    // Tokens: 15,071 x $5 + 1,104 x $25 + 1,020 x $6.25 + 4,147 x $10
    //       + 2,069 x $0.50 = $0.0753550 + $0.0276 + $0.006375 + $0.04147
    //       + $0.0010345 = $0.1518345; x 2 (priority) x 1.1 (us)
    //       = $0.3340359; + 3 searches x $0.01 = $0.3640359.
    assert!(
        (rec.cost_usd.unwrap() - 0.364_035_9).abs() < 1e-9,
        "{:?}",
        rec.cost_usd
    );
    assert!((rec.price_multiplier.unwrap() - 2.2).abs() < 1e-12);
    assert_eq!(rec.long_context, Some(false));
}

#[test]
fn a_prompt_over_the_long_context_threshold_is_priced_at_long_context_rates() {
    let host = replay(
        r#"{"model":"claude-haiku-5-5","max_tokens":2048,"messages":[]}"#,
        "application/json",
        include_bytes!("../../../tests/fixtures/anthropic/messages-long-context.response.json"),
    );
    let rec = host.last_audit().unwrap();
    assert_eq!(
        (rec.tokens.input, rec.tokens.cache_read, rec.tokens.output),
        (Some(3_669), Some(122_759), Some(1_850))
    );
    // 126,428 prompt tokens > 100,000: the whole request at $0.50 input,
    // $0.05 cache reads (the base 0.1 ratio), $2.50 output:
    // 3,669 x $0.50 + 122,759 x $0.05 + 1,850 x $2.50
    // = $0.0018345 + $0.00613795 + $0.004625 = $0.01259745.
    assert!(
        (rec.cost_usd.unwrap() - 0.012_597_45).abs() < 1e-9,
        "{:?}",
        rec.cost_usd
    );
    assert_eq!(rec.long_context, Some(true));
    assert_eq!(rec.service_tier.as_deref(), Some("standard"));
}

/// A contractor: no groups, so the defaults' `claude-haiku-*` only.
const CAROL: &str = "tg-carol-contractor";

fn contractor() -> String {
    format!(
        r#", {{ "id": "carol", "key_sha256": "{}" }}"#,
        crate::vkey::sha256_hex(CAROL)
    )
}

fn get(path: &str, headers: &[(&str, &str)]) -> FakeHost {
    headers.iter().fold(
        FakeHost::new()
            .with_request_header(":path", path)
            .with_request_header(":method", "GET")
            .with_request_header("x-request-id", "req-m"),
        |h, (n, v)| h.with_request_header(n, v),
    )
}

const ANTHROPIC_MODELS: &[u8] =
    include_bytes!("../../../tests/fixtures/anthropic/models-list.response.json");
const OPENAI_MODELS: &[u8] =
    include_bytes!("../../../tests/fixtures/openai/models-list.response.json");

/// Drives a `GET /v1/models` answer through the flow: headers, then the
/// body in two chunks (Envoy hands the whole buffer over at the end).
fn answer_list(flow: &mut RequestFlow, host: &mut FakeHost, list: &[u8]) -> (Decision, Decision) {
    host.response_headers = vec![
        (":status".into(), b"200".to_vec()),
        ("content-type".into(), b"application/json".to_vec()),
        ("content-length".into(), list.len().to_string().into_bytes()),
    ];
    let headers = flow.on_response_headers(host, false);
    host.response_chunk = list.get(..100).unwrap().to_vec();
    assert_eq!(
        flow.on_response_body(host, 100, false),
        Decision::Pause,
        "the list is buffered to its end"
    );
    host.response_chunk = list.to_vec();
    let end = flow.on_response_body(host, list.len(), true);
    (headers, end)
}

fn listed_ids(host: &FakeHost) -> Vec<String> {
    super::models::ids(&host.response_chunk)
}

#[test]
fn models_list_is_cut_to_the_allowlist_with_its_new_length() {
    let mut host = get(
        "/v1/models?limit=20",
        &[("x-api-key", CAROL), ("anthropic-version", "2023-06-01")],
    );
    let mut flow = RequestFlow::new(policy(&contractor()));
    assert_eq!(flow.on_request_headers(&mut host, true), Decision::Continue);
    let (headers, end) = answer_list(&mut flow, &mut host, ANTHROPIC_MODELS);
    assert_eq!(headers, Decision::Pause, "headers held for content-length");
    assert_eq!(end, Decision::Continue);
    assert_eq!(listed_ids(&host), ["claude-haiku-4-5-20251001"]);
    let body = json(&String::from_utf8_lossy(&host.response_chunk));
    assert_eq!(body["first_id"], "claude-haiku-4-5-20251001");
    assert_eq!(body["last_id"], "claude-haiku-4-5-20251001");
    assert_eq!(
        host.response_header("content-length"),
        Some(host.response_chunk.len().to_string())
    );
    assert_eq!(
        host.response_header("anthropic-ratelimit-requests-remaining")
            .as_deref(),
        Some("1"),
        "one request of the key's two per minute"
    );
    let rec = host.last_audit().unwrap();
    assert_eq!(rec.route, "anthropic.models");
    assert_eq!((rec.status, rec.complete), (200, true));
    assert_eq!(
        rec.detail.as_deref(),
        Some("listed 1 of the provider's 6 models")
    );
    assert_eq!(rec.tokens, Tokens::default(), "no tokens");
}

#[test]
fn without_anthropic_version_the_list_is_openais() {
    let mut host = get(
        "/v1/models",
        &[("authorization", &format!("Bearer {ALICE}"))],
    );
    let mut flow = RequestFlow::with_options(
        policy(""),
        FilterOptions {
            hold_request_headers: false,
            shared: None,
        },
    );
    assert_eq!(flow.on_request_headers(&mut host, true), Decision::Continue);
    assert_eq!(host.request_header("authorization"), None);
    let (headers, end) = answer_list(&mut flow, &mut host, OPENAI_MODELS);
    assert_eq!(headers, Decision::Continue, "without the hold, headers go");
    assert_eq!(
        host.response_header("content-length"),
        None,
        "stale length dropped"
    );
    assert_eq!(end, Decision::Continue);
    // Alice's groups allow claude-sonnet-* and gpt-4o*.
    assert_eq!(
        listed_ids(&host),
        [
            "gpt-4o",
            "gpt-4o-2024-08-06",
            "gpt-4o-mini",
            "gpt-4o-mini-2024-07-18"
        ]
    );
    assert_eq!(
        json(&String::from_utf8_lossy(&host.response_chunk))["object"],
        "list"
    );
    assert_eq!(host.last_audit().unwrap().route, "openai.models");
}

#[test]
fn a_model_outside_the_allowlist_is_not_found() {
    let mut host = get(
        "/v1/models/claude-opus-4-1",
        &[("x-api-key", CAROL), ("anthropic-version", "2023-06-01")],
    );
    let r = reply(RequestFlow::new(policy(&contractor())).on_request_headers(&mut host, true));
    assert_eq!(r.status, 404);
    let b = json(&r.body);
    assert_eq!(b["error"]["type"], "not_found_error");
    assert_eq!(
        b["error"]["message"],
        "model: claude-opus-4-1 not found for this key"
    );
    let rec = host.last_audit().unwrap();
    assert_eq!(rec.reason, Reason::ModelNotAllowed);
    assert_eq!(rec.model_requested.as_deref(), Some("claude-opus-4-1"));
    // An allowed one is forwarded, its answer untouched.
    let mut host = get(
        "/v1/models/claude-haiku-4-5",
        &[("x-api-key", CAROL), ("anthropic-version", "2023-06-01")],
    );
    let mut flow = RequestFlow::new(policy(&contractor()));
    assert_eq!(flow.on_request_headers(&mut host, true), Decision::Continue);
    host.response_headers = vec![(":status".into(), b"200".to_vec())];
    assert_eq!(
        flow.on_response_headers(&mut host, false),
        Decision::Continue
    );
}

#[test]
fn an_unreadable_models_list_becomes_an_empty_one() {
    let mut host = get(
        "/v1/models",
        &[("x-api-key", CAROL), ("anthropic-version", "2023-06-01")],
    );
    let mut flow = RequestFlow::new(policy(&contractor()));
    flow.on_request_headers(&mut host, true);
    answer_list(&mut flow, &mut host, &[b'x'; 200]);
    assert_eq!(
        host.response_chunk,
        br#"{"data":[],"has_more":false,"first_id":null,"last_id":null}"#
    );
    assert_eq!(
        host.last_audit().unwrap().detail.as_deref(),
        Some("models list unreadable; answered an empty list")
    );
}

#[test]
fn count_tokens_takes_nothing_from_the_request_bucket() {
    // The key may send 2 requests a minute; counting tokens does not use them.
    let p = policy("");
    let store = MemStore::new();
    let count = r#"{"model":"claude-sonnet-4-5","messages":[{"role":"user","content":"hi"}]}"#;
    for _ in 0..5 {
        let mut host = request("/v1/messages/count_tokens", ALICE, count).with_store(store.clone());
        let mut flow = RequestFlow::new(p.clone());
        assert_eq!(send(&mut flow, &mut host), Decision::Continue);
        host.response_headers = vec![(":status".into(), b"200".to_vec())];
        flow.on_response_headers(&mut host, false);
        host.response_chunk = br#"{"input_tokens":9}"#.to_vec();
        flow.on_response_body(&mut host, 18, true);
        let rec = host.last_audit().unwrap();
        assert_eq!(rec.route, "anthropic.count_tokens");
        assert_eq!(rec.tokens, Tokens::default());
    }
    for _ in 0..2 {
        let mut host = request("/v1/messages", ALICE, SONNET).with_store(store.clone());
        assert_eq!(
            send(&mut RequestFlow::new(p.clone()), &mut host),
            Decision::Continue
        );
    }
    // Still authenticated and allowlist-checked.
    let mut host = request(
        "/v1/messages/count_tokens",
        ALICE,
        r#"{"model":"claude-opus-4-1","messages":[]}"#,
    );
    assert_eq!(reply(send(&mut RequestFlow::new(p), &mut host)).status, 403);
}

#[test]
fn near_misses_are_metered_as_their_route_or_refused_even_with_unknown_routes_pass() {
    let p = policy_with_settings(r#"{"unknown_routes": "pass"}"#, "");
    let mut host = request("/v1/./messages/", ALICE, SONNET);
    let mut flow = RequestFlow::new(p.clone());
    assert_eq!(send(&mut flow, &mut host), Decision::Continue);
    let rec = host.last_audit().unwrap();
    assert_eq!(rec.route, "anthropic.messages");
    assert_eq!(rec.tokens.output_reserved, 100, "tokens reserved");

    let mut host = request("/V1/messages", ALICE, SONNET);
    let r = reply(send(&mut RequestFlow::new(p.clone()), &mut host));
    assert_eq!(r.status, 404);
    assert_eq!(
        json(&r.body)["error"]["message"],
        "/V1/messages is not an LLM API route served by this gateway (paths are case-sensitive: /v1/messages)"
    );
    assert_eq!(host.last_audit().unwrap().reason, Reason::UnknownRoute);

    let mut host = request("/v1%2Fmessages", ALICE, SONNET);
    let r = reply(send(&mut RequestFlow::new(p.clone()), &mut host));
    assert_eq!(r.status, 400);
    assert_eq!(
        json(&r.body)["error"]["message"],
        "/v1%2Fmessages: encoded slashes (%2F, %5C) are not allowed in request paths"
    );

    // Other paths still pass.
    let mut host = request("/v1/files", ALICE, "{}");
    assert_eq!(
        send(&mut RequestFlow::new(p), &mut host),
        Decision::Continue
    );
    assert_eq!(host.last_audit().unwrap().route, "other");
}

/// Two keys with room to spare, under the provider's own limit on Sonnet
/// 4.5 (2 requests per minute for the organization).
fn provider_pool_policy() -> Rc<Policy> {
    let json = format!(
        r#"{{
        "version": 1,
        "defaults": {{ "models": ["claude-*"], "limits": {{ "requests_per_minute": 100 }} }},
        "provider_pools": {{
          "provider:anthropic:claude-sonnet-4": {{
            "models": ["claude-sonnet-4-5", "claude-sonnet-4-5-20250929"],
            "limits": {{ "requests_per_minute": 2, "output_tokens_per_minute": 1000 }} }}
        }},
        "keys": [
          {{ "id": "alice-laptop", "key_sha256": "{}" }},
          {{ "id": "carol", "key_sha256": "{}" }}
        ]
      }}"#,
        crate::vkey::sha256_hex(ALICE),
        crate::vkey::sha256_hex("tg-carol-key")
    );
    Rc::new(
        crate::policy::compile(json.as_bytes(), "test.json", 0)
            .unwrap()
            .0,
    )
}

#[test]
fn provider_pool_refuses_every_key_for_its_models_and_names_itself() {
    let p = provider_pool_policy();
    let store = MemStore::new();
    for key in [ALICE, "tg-carol-key"] {
        let mut host = request("/v1/messages", key, SONNET).with_store(store.clone());
        assert_eq!(
            send(&mut RequestFlow::new(p.clone()), &mut host),
            Decision::Continue
        );
    }
    // A model outside the group is not the group's to refuse.
    let haiku = r#"{"model":"claude-haiku-4-5","max_tokens":10,"messages":[]}"#;
    let mut host = request("/v1/messages", ALICE, haiku).with_store(store.clone());
    assert_eq!(
        send(&mut RequestFlow::new(p.clone()), &mut host),
        Decision::Continue
    );
    let mut host = request("/v1/messages", ALICE, SONNET).with_store(store.clone());
    let r = reply(send(&mut RequestFlow::new(p), &mut host));
    assert_eq!(r.status, 429);
    assert_eq!(r.header("retry-after"), Some("30"));
    assert_eq!(
        json(&r.body)["error"]["message"],
        "requests_per_minute limit of 2 reached for provider:anthropic:claude-sonnet-4; retry in 30s"
    );
    let rec = host.last_audit().unwrap();
    assert_eq!(
        rec.bucket.as_deref(),
        Some("provider:anthropic:claude-sonnet-4:requests_per_minute")
    );
    assert_eq!(rec.reason, Reason::RateLimited);
    // The pool's record is its own, beside the keys'.
    let cell = crate::meter::store::read(&*store, "tollgate/2/provider:anthropic:claude-sonnet-4")
        .unwrap()
        .slot(crate::meter::Metric::Requests);
    assert_eq!(cell.value, 0.0);
}

/// The key's requests-per-minute balance as its record holds it.
fn requests_left(host: &FakeHost, key: &str) -> f64 {
    crate::meter::store::read(&*host.store, &format!("tollgate/2/key:{key}"))
        .unwrap()
        .slot(crate::meter::Metric::Requests)
        .value
}

#[test]
fn provider_429_and_529_pass_through_and_refund_every_bucket_the_request_included() {
    for (status, kind, reason, stat) in [
        (
            "429",
            "rate_limit_error",
            Reason::UpstreamRateLimited,
            "tollgate.decisions.upstream_rate_limited",
        ),
        (
            "529",
            "overloaded_error",
            Reason::UpstreamOverloaded,
            "tollgate.decisions.upstream_overloaded",
        ),
    ] {
        let mut host = request("/v1/messages", ALICE, SONNET);
        let mut flow = RequestFlow::new(provider_pool_policy());
        assert_eq!(send(&mut flow, &mut host), Decision::Continue);
        assert_eq!(requests_left(&host, "alice-laptop"), 99.0);
        host.response_headers = vec![
            (":status".into(), status.as_bytes().to_vec()),
            ("content-type".into(), b"application/json".to_vec()),
            ("retry-after".into(), b"7".to_vec()),
        ];
        assert_eq!(
            flow.on_response_headers(&mut host, false),
            Decision::Continue
        );
        host.response_chunk =
            format!(r#"{{"type":"error","error":{{"type":"{kind}","message":"x"}}}}"#).into_bytes();
        let n = host.response_chunk.len();
        flow.on_response_body(&mut host, n, true);
        assert_eq!(host.response_header("retry-after").as_deref(), Some("7"));
        assert_eq!(requests_left(&host, "alice-laptop"), 100.0, "{status}");
        let pool = crate::meter::store::read(
            &*host.store,
            "tollgate/2/provider:anthropic:claude-sonnet-4",
        )
        .unwrap();
        assert_eq!(pool.slot(crate::meter::Metric::Requests).value, 2.0);
        assert_eq!(pool.slot(crate::meter::Metric::OutputTokens).value, 1000.0);
        let rec = host.last_audit().unwrap();
        assert_eq!(
            (rec.decision, rec.reason, rec.status, rec.complete),
            (Outcome::Allowed, reason, status.parse().unwrap(), true)
        );
        assert_eq!(host.stats.get(stat), Some(&1), "{:?}", host.stats);
    }
}

#[test]
fn other_upstream_errors_refund_tokens_but_charge_the_request() {
    let mut host = request("/v1/messages", ALICE, SONNET);
    let mut flow = RequestFlow::new(provider_pool_policy());
    send(&mut flow, &mut host);
    host.response_headers = vec![(":status".into(), b"500".to_vec())];
    flow.on_response_headers(&mut host, false);
    host.response_chunk =
        br#"{"type":"error","error":{"type":"api_error","message":"x"}}"#.to_vec();
    let n = host.response_chunk.len();
    flow.on_response_body(&mut host, n, true);
    assert_eq!(requests_left(&host, "alice-laptop"), 99.0);
    assert_eq!(host.last_audit().unwrap().reason, Reason::Ok);
}

#[test]
fn the_providers_headroom_becomes_gauges_and_the_caller_sees_its_own() {
    let mut host = request("/v1/messages", ALICE, SONNET);
    let mut flow = RequestFlow::new(provider_pool_policy());
    send(&mut flow, &mut host);
    host.response_headers = vec![
        (":status".into(), b"200".to_vec()),
        (
            "anthropic-ratelimit-requests-limit".into(),
            b"4000".to_vec(),
        ),
        (
            "anthropic-ratelimit-requests-remaining".into(),
            b"17".to_vec(),
        ),
    ];
    flow.on_response_headers(&mut host, false);
    assert_eq!(
        host.gauges
            .get("tollgate.provider.anthropic:claude-sonnet-4.requests_remaining"),
        Some(&17)
    );
    assert_eq!(
        host.gauges
            .get("tollgate.provider.anthropic:claude-sonnet-4.requests_limit"),
        Some(&4000)
    );
    // The client reads the most restrictive of its own buckets: the
    // provider pool's 2 per minute, 1 left.
    assert_eq!(
        host.response_header("anthropic-ratelimit-requests-limit")
            .as_deref(),
        Some("2")
    );
    assert_eq!(
        host.response_header("anthropic-ratelimit-requests-remaining")
            .as_deref(),
        Some("1")
    );
}

#[test]
fn every_record_of_a_request_carries_one_number_of_this_workers_stream() {
    let p = policy("");
    let store = MemStore::new();
    // Allowed: numbered at the first publication (the admission, in the
    // body's one callback), which the final record repeats.
    let mut host = request("/v1/messages", ALICE, SONNET).with_store(store.clone());
    let mut flow = RequestFlow::new(p.clone());
    assert_eq!(send(&mut flow, &mut host), Decision::Continue);
    host.response_headers = vec![
        (":status".into(), b"200".to_vec()),
        ("content-type".into(), b"application/json".to_vec()),
    ];
    flow.on_response_headers(&mut host, false);
    host.response_chunk = br#"{"usage":{"input_tokens":1,"output_tokens":2}}"#.to_vec();
    let n = host.response_chunk.len();
    flow.on_response_body(&mut host, n, true);
    let records: Vec<AuditRecord> = host
        .audit
        .iter()
        .map(|j| AuditRecord::from_json(j).unwrap())
        .collect();
    assert_eq!(records.len(), 2, "admission, final");
    assert!(records.last().unwrap().complete);
    let envoy = records[0].origin.as_ref().unwrap().envoy.clone();
    assert_eq!(
        envoy,
        format!("{}/1", Origin::propose_envoy("req-1", host.now_ms))
    );
    for r in &records {
        assert_eq!(
            r.origin,
            Some(Origin {
                envoy: envoy.clone(),
                seq: 1
            })
        );
    }
    // Denied at the headers (unknown key) and at the body (rate limited):
    // one number each, the next ones.
    let mut host = request("/v1/messages", "tg-nobody", SONNET).with_store(store.clone());
    reply(send(&mut RequestFlow::new(p.clone()), &mut host));
    assert_eq!(host.last_audit().unwrap().origin.unwrap().seq, 2);
    let mut host = request("/v1/messages", ALICE, SONNET).with_store(store.clone());
    send(&mut RequestFlow::new(p.clone()), &mut host);
    let mut host = request("/v1/messages", ALICE, SONNET).with_store(store.clone());
    assert_eq!(reply(send(&mut RequestFlow::new(p), &mut host)).status, 429);
    let seqs: Vec<u64> = host
        .audit
        .iter()
        .map(|j| AuditRecord::from_json(j).unwrap().origin.unwrap().seq)
        .collect();
    assert_eq!(seqs, [4], "the refusal of the fourth request, alone");
}

#[test]
fn a_request_that_waits_for_the_rest_of_its_body_is_published_once_while_it_waits() {
    let p = policy("");
    let store = MemStore::new();
    let mut host = request("/v1/messages", ALICE, SONNET).with_store(store.clone());
    let mut flow = RequestFlow::new(p);
    assert_eq!(flow.on_request_headers(&mut host, false), Decision::Pause);
    assert!(host.audit.is_empty(), "the body usually follows at once");
    let n = host.body_len();
    // Two partial chunks: the record is published at the first, with the
    // caller's identity, so a client that leaves now is audited.
    for _ in 0..2 {
        assert_eq!(
            flow.on_request_body(&mut host, n / 2, false),
            Decision::Pause
        );
    }
    assert_eq!(host.audit.len(), 1);
    let waiting = host.last_audit().unwrap();
    assert_eq!(
        (
            waiting.key_id.as_deref(),
            waiting.complete,
            waiting.origin.map(|o| o.seq)
        ),
        (Some("alice-laptop"), false, Some(1))
    );
    assert_eq!(flow.on_request_body(&mut host, n, true), Decision::Continue);
    assert_eq!(host.audit.len(), 2, "then the admission");
}

#[test]
fn a_request_shared_data_could_not_number_is_published_without_an_origin() {
    let store = MemStore::new();
    store.inject_conflicts(crate::meter::store::MAX_ATTEMPTS);
    let mut host = request("/v1/messages", "tg-nobody", SONNET).with_store(store.clone());
    reply(send(&mut RequestFlow::new(policy("")), &mut host));
    let rec = host.last_audit().unwrap();
    assert_eq!((rec.reason, rec.origin), (Reason::UnknownKey, None));
    assert_eq!(host.stats.get("tollgate.cas_exhausted"), Some(&1));
}

#[test]
fn requests_envoy_gave_no_id_get_distinct_ones_within_one_clock_tick() {
    let ids: Vec<String> = (0..2)
        .map(|_| {
            let mut host = FakeHost::new()
                .with_request_header(":path", "/v1/messages")
                .with_request_header(":method", "POST");
            host.now_ms = 0x1234;
            let mut flow = RequestFlow::new(policy(""));
            reply(flow.on_request_headers(&mut host, false));
            host.last_audit().unwrap().request_id
        })
        .collect();
    assert!(ids.iter().all(|id| id.starts_with("tg-1234-")), "{ids:?}");
    assert_ne!(ids[0], ids[1]);
}

#[test]
fn a_request_that_ends_after_its_headers_alone_is_counted_as_unpublished() {
    let mut host = request("/v1/messages", ALICE, SONNET);
    let mut flow = RequestFlow::new(policy(""));
    assert_eq!(flow.on_request_headers(&mut host, false), Decision::Pause);
    flow.on_end(&mut host);
    assert!(host.audit.is_empty());
    assert_eq!(host.stats.get("tollgate.ended_unpublished"), Some(&1));
    // A request that published is not counted.
    let mut host = request("/v1/messages", ALICE, SONNET);
    let mut flow = RequestFlow::new(policy(""));
    send(&mut flow, &mut host);
    flow.on_end(&mut host);
    assert_eq!(host.stats.get("tollgate.ended_unpublished"), None);
}
