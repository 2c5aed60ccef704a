//! The first vertical slice against the real Envoy: authentication, key
//! stripping and injection, the RPM bucket, SSE pass-through, audit records.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::{Duration, Instant};
use tollgate_e2e::{policy, read_chunks, Gateway, Options};

const ALICE: &str = "tg-e2e-alice-3f9a1c";
const AGENT: &str = "tg-e2e-agent-77b2e0";

fn gateway_policy() -> String {
    policy(
        r#"{"models": ["claude-*", "gpt-4o*"], "limits": {"requests_per_minute": 1000}}"#,
        &[
            (
                "alice-laptop",
                ALICE,
                r#""user": "alice@example.com", "team": "payments", "project": "chatbot", "app": "ide", "agent": "claude-code", "environment": "dev", "cost_center": "CC-1042""#,
            ),
            (
                "ci-agent",
                AGENT,
                r#""agent": "triage-bot", "limits": {"requests_per_minute": 3}"#,
            ),
        ],
    )
}

const MESSAGE: &str = r#"{"model":"claude-sonnet-4-5","max_tokens":200,"messages":[{"role":"user","content":"Hello there"}]}"#;

#[test]
fn allowed_request_reaches_provider_with_real_key_and_without_virtual_key() {
    let gw = Gateway::start(&gateway_policy());
    let resp = gw.post_with(
        "/v1/messages",
        &[
            ("x-api-key", ALICE),
            ("accept-encoding", "gzip"),
            ("x-request-id", "e2e-allowed-1"),
        ],
        MESSAGE,
    );
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["anthropic-ratelimit-requests-limit"], "1000");
    let body: serde_json::Value = resp.json().unwrap();
    assert_eq!(body["model"], "claude-sonnet-4-5");
    assert!(body["usage"]["output_tokens"].as_u64().unwrap() > 0);

    let received = gw.mock_requests();
    assert_eq!(
        received.len(),
        1,
        "exactly one request upstream: {received:?}"
    );
    let headers = &received[0]["headers"];
    assert_eq!(
        headers["x-api-key"], "sk-ant-mock-real-key",
        "Envoy injects the real key"
    );
    assert!(headers.get("authorization").is_none());
    assert!(
        headers.get("accept-encoding").is_none(),
        "accept-encoding is dropped so usage stays readable"
    );
    let all = serde_json::to_string(&received).unwrap();
    assert!(
        !all.contains(ALICE),
        "the virtual key must never reach the provider"
    );
    assert!(gw.mock_violations().is_empty());

    let rec = gw.audit_record("e2e-allowed-1");
    assert_eq!(rec["key_id"], "alice-laptop");
    assert_eq!(rec["user"], "alice@example.com");
    assert_eq!(rec["team"], "payments");
    assert_eq!(rec["project"], "chatbot");
    assert_eq!(rec["app"], "ide");
    assert_eq!(rec["agent"], "claude-code");
    assert_eq!(rec["cost_center"], "CC-1042");
    assert_eq!(rec["decision"], "allowed");
    assert_eq!(rec["status"], 200);
    assert_eq!(rec["tokens"]["output"], body["usage"]["output_tokens"]);
    assert!(!serde_json::to_string(&rec).unwrap().contains(ALICE));
}

#[test]
fn openai_route_takes_bearer_key_and_injects_openai_credential() {
    let gw = Gateway::start(&gateway_policy());
    let resp = gw.post_with(
        "/v1/chat/completions",
        &[
            ("authorization", &format!("Bearer {ALICE}")),
            ("x-request-id", "e2e-openai-1"),
        ],
        r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}"#,
    );
    assert_eq!(resp.status(), 200);
    assert!(resp
        .headers()
        .contains_key("x-ratelimit-remaining-requests"));
    let received = gw.mock_requests();
    assert_eq!(
        received[0]["headers"]["authorization"],
        "Bearer sk-openai-mock-real-key"
    );
    assert!(received[0]["headers"].get("x-api-key").is_none());
    assert_eq!(
        gw.audit_record("e2e-openai-1")["route"],
        "openai.chat_completions"
    );
}

#[test]
fn unknown_key_gets_401_and_never_reaches_the_provider() {
    let gw = Gateway::start(&gateway_policy());
    let resp = gw.post_with(
        "/v1/messages",
        &[
            ("x-api-key", "tg-e2e-unknown"),
            ("x-request-id", "e2e-unknown-1"),
        ],
        MESSAGE,
    );
    assert_eq!(resp.status(), 401);
    let body: serde_json::Value = resp.json().unwrap();
    assert_eq!(body["type"], "error");
    assert_eq!(body["error"]["type"], "authentication_error");
    assert_eq!(body["error"]["message"], "invalid x-api-key");
    assert_eq!(body["request_id"], "e2e-unknown-1");

    let missing = gw.post_with(
        "/v1/chat/completions",
        &[("x-request-id", "e2e-missing-1")],
        "{}",
    );
    assert_eq!(missing.status(), 401);
    let body: serde_json::Value = missing.json().unwrap();
    assert_eq!(body["error"]["code"], "invalid_api_key");

    assert!(
        gw.mock_requests().is_empty(),
        "nothing reaches the provider"
    );
    let rec = gw.audit_record("e2e-unknown-1");
    assert_eq!(rec["decision"], "denied");
    assert_eq!(rec["reason"], "unknown_key");
    assert_eq!(rec["status"], 401);
    assert_eq!(gw.audit_record("e2e-missing-1")["reason"], "missing_key");
}

#[test]
fn rpm_limit_returns_429_with_retry_after_and_is_audited() {
    let gw = Gateway::start(&gateway_policy());
    for i in 0..3 {
        let r = gw.post_with(
            "/v1/messages",
            &[
                ("x-api-key", AGENT),
                ("x-request-id", &format!("e2e-rpm-{i}")),
            ],
            MESSAGE,
        );
        assert_eq!(r.status(), 200, "request {i} is within the limit");
        assert_eq!(
            r.headers()["anthropic-ratelimit-requests-remaining"],
            (2 - i).to_string().as_str()
        );
    }
    let r = gw.post_with(
        "/v1/messages",
        &[("x-api-key", AGENT), ("x-request-id", "e2e-rpm-3")],
        MESSAGE,
    );
    assert_eq!(r.status(), 429);
    let retry: u64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        (1..=20).contains(&retry),
        "3/min refills one request every 20 s, got {retry}"
    );
    let body: serde_json::Value = r.json().unwrap();
    assert_eq!(body["error"]["type"], "rate_limit_error");
    let msg = body["error"]["message"].as_str().unwrap();
    assert!(
        msg.starts_with("requests_per_minute limit of 3 reached for key:ci-agent; retry in "),
        "{msg}"
    );
    assert_eq!(
        gw.mock_requests().len(),
        3,
        "the denied request never reached the provider"
    );

    let rec = gw.audit_record("e2e-rpm-3");
    assert_eq!(rec["reason"], "rate_limited");
    assert_eq!(rec["bucket"], "key:ci-agent:requests_per_minute");
    assert_eq!(rec["agent"], "triage-bot");
    for i in 0..3 {
        assert_eq!(
            gw.audit_record(&format!("e2e-rpm-{i}"))["decision"],
            "allowed"
        );
    }
}

#[test]
fn sse_reaches_the_client_event_by_event() {
    let gw = Gateway::start_with(
        &gateway_policy(),
        Options {
            mock_event_delay_ms: 60,
            ..Options::default()
        },
    );
    let started = Instant::now();
    let resp = gw.post_with(
        "/v1/messages",
        &[("x-api-key", ALICE), ("x-request-id", "e2e-stream-1")],
        r#"{"model":"claude-sonnet-4-5","max_tokens":300,"stream":true,"messages":[{"role":"user","content":"Tell me a story"}]}"#,
    );
    assert_eq!(resp.status(), 200);
    assert!(resp.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let chunks = read_chunks(resp, started);
    let first = chunks.first().unwrap().0;
    let last = chunks.last().unwrap().0;
    let text: String = chunks
        .iter()
        .map(|(_, c)| String::from_utf8_lossy(c).into_owned())
        .collect();
    assert!(
        text.contains("event: message_stop"),
        "the whole stream arrives"
    );
    assert!(
        chunks.len() >= 10,
        "delivered in many chunks, got {}",
        chunks.len()
    );
    assert!(
        last - first > Duration::from_millis(500) && first < last / 3,
        "first event at {first:?} must arrive well before the last at {last:?}"
    );
    let rec = gw.audit_record("e2e-stream-1");
    assert_eq!(rec["stream"], true);
    assert_eq!(rec["key_id"], "alice-laptop");
    assert!(
        rec["tokens"]["output"].as_u64().unwrap() > 0,
        "streamed usage is charged: {rec}"
    );
}

#[test]
fn unknown_route_gets_a_provider_shaped_404_by_default() {
    let gw = Gateway::start(&gateway_policy());
    let r = gw
        .client()
        .get(gw.url("/v1/files"))
        .header("x-api-key", ALICE)
        .send()
        .unwrap();
    assert_eq!(r.status(), 404);
    let body: serde_json::Value = r.json().unwrap();
    assert_eq!(body["error"]["type"], "not_found_error");
    assert_eq!(
        body["error"]["message"],
        "/v1/files is not an LLM API route served by this gateway"
    );
    assert!(gw.mock_requests().is_empty());
}
