//! A ladder instead of a wall, and per-session budgets, on the real
//! gateway: a shadow limit admits and audits `would_deny`; a downgrade
//! reaches the provider as the cheaper model, says so in a response header
//! and in the audit record; two sessions of one key get separate buckets.

use serde_json::Value;
use tollgate_e2e::{sha, Gateway};

const KEY: &str = "tg-e2e-ladder";
const OPUS: &str =
    r#"{"model":"claude-opus-4-1","max_tokens":50,"messages":[{"role":"user","content":"hi"}]}"#;

fn policy(limits: &str, session_pools: &str) -> String {
    format!(
        r#"{{"version": 1,
            "defaults": {{"models": ["claude-opus-4-1", "claude-haiku-4-5"]}},
            "session_pools": {session_pools},
            "keys": [{{"id": "ladder", "key_sha256": "{}", "limits": {limits}}}]}}"#,
        sha(KEY)
    )
}

fn send(
    gw: &Gateway,
    request_id: &str,
    extra: &[(&str, &str)],
) -> (u16, reqwest::header::HeaderMap, Value) {
    let mut headers = vec![("x-api-key", KEY), ("x-request-id", request_id)];
    headers.extend_from_slice(extra);
    let r = gw.post_with("/v1/messages", &headers, OPUS);
    let status = r.status().as_u16();
    let h = r.headers().clone();
    (status, h, r.json().unwrap_or_default())
}

#[test]
fn a_shadow_limit_admits_and_audits_would_deny() {
    let gw = Gateway::start(&policy(
        r#"{"requests_per_minute": {"limit": 1, "shadow": true}}"#,
        "{}",
    ));
    assert_eq!(send(&gw, "shadow-1", &[]).0, 200);
    let (status, _, body) = send(&gw, "shadow-2", &[]);
    assert_eq!(status, 200, "the client sees no difference: {body}");
    let first = gw.audit_record("shadow-1");
    assert_eq!(first.get("would_deny"), None, "within the limit: {first}");
    let rec = gw.audit_record("shadow-2");
    assert_eq!(rec["decision"], "allowed");
    assert_eq!(rec["reason"], "ok");
    assert_eq!(
        rec["would_deny"],
        serde_json::json!(["key:ladder:requests_per_minute"])
    );
    assert_eq!(
        gw.wait_for_stat("tollgate.ladder.shadow_would_deny", |v| v >= 1),
        1
    );
}

#[test]
fn a_downgrade_reaches_the_provider_as_the_cheaper_model_with_header_and_audit() {
    let gw = Gateway::start(&policy(
        r#"{"requests_per_minute": {"limit": 1, "on_exhausted": {"downgrade_to": "claude-haiku-4-5"}}}"#,
        "{}",
    ));
    let (status, headers, _) = send(&gw, "down-1", &[]);
    assert_eq!(status, 200);
    assert_eq!(headers.get("x-tollgate-downgraded-from"), None);
    let (status, headers, body) = send(&gw, "down-2", &[]);
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        headers
            .get("x-tollgate-downgraded-from")
            .and_then(|v| v.to_str().ok()),
        Some("claude-opus-4-1")
    );
    let models: Vec<Value> = gw
        .mock_requests()
        .iter()
        .map(|r| r["model"].clone())
        .collect();
    assert_eq!(
        models,
        ["claude-opus-4-1", "claude-haiku-4-5"],
        "what the provider received"
    );
    assert_eq!(gw.mock_violations(), Vec::<Value>::new());
    let rec = gw.audit_record("down-2");
    assert_eq!(rec["decision"], "allowed");
    assert_eq!(rec["model_requested"], "claude-opus-4-1");
    assert!(
        rec["model_served"]
            .as_str()
            .unwrap_or_default()
            .starts_with("claude-haiku-4-5"),
        "{rec}"
    );
    assert_eq!(
        rec["downgrade"],
        serde_json::json!({"from": "claude-opus-4-1", "to": "claude-haiku-4-5",
                           "bucket": "key:ladder:requests_per_minute"})
    );
}

#[test]
fn two_sessions_of_one_key_get_separate_session_buckets() {
    let gw = Gateway::start(&policy(
        "{}",
        r#"{"claude-code": {"header": "x-claude-code-session-id", "limits": {"requests_per_minute": 1}}}"#,
    ));
    let session = |id| [("x-claude-code-session-id", id)];
    assert_eq!(send(&gw, "s-a-1", &session("session-a")).0, 200);
    let (status, headers, body) = send(&gw, "s-a-2", &session("session-a"));
    assert_eq!(status, 429, "{body}");
    assert!(headers.get("retry-after").is_some());
    assert_eq!(
        body["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .split(';')
            .next(),
        Some("requests_per_minute limit of 1 reached for session:claude-code:session-a")
    );
    assert_eq!(
        send(&gw, "s-b-1", &session("session-b")).0,
        200,
        "another session, its own bucket"
    );
    assert_eq!(
        send(&gw, "no-session", &[]).0,
        200,
        "no header: not limited by the pool"
    );
    let a = gw.audit_record("s-a-1");
    assert_eq!(
        a["sessions"],
        serde_json::json!([{"pool": "claude-code", "value": "session-a"}])
    );
    let denied = gw.audit_record("s-a-2");
    assert_eq!(denied["reason"], "rate_limited");
    assert_eq!(
        denied["bucket"],
        "session:claude-code:session-a:requests_per_minute"
    );
    assert_eq!(
        gw.audit_record("s-b-1")["sessions"][0]["value"],
        "session-b"
    );
    assert_eq!(gw.audit_record("no-session").get("sessions"), None);
}
