//! The ladder (shadow, downgrade, throttle) and session pools, request by
//! request against the fake host, with the policy inline.
#![allow(clippy::unwrap_used, clippy::panic)]

use super::*;
use crate::testing::{FakeHost, MemStore};

const KEY: &str = "tg-ladder-key";

fn policy(key_limits: &str, session_pools: &str) -> Rc<Policy> {
    let json = format!(
        r#"{{
        "version": 1,
        "defaults": {{ "models": ["claude-opus-4-1", "claude-haiku-4-5"] }},
        "session_pools": {session_pools},
        "keys": [ {{ "id": "k", "key_sha256": "{}", "limits": {key_limits} }} ],
        "prices": {{ "claude-opus-4-1": {{ "input": 15, "output": 75 }},
                     "claude-haiku-4-5": {{ "input": 1, "output": 5 }} }}
      }}"#,
        crate::vkey::sha256_hex(KEY)
    );
    Rc::new(
        crate::policy::compile(json.as_bytes(), "t.json", 0)
            .unwrap()
            .0,
    )
}

fn body(model: &str) -> String {
    format!(
        r#"{{"model":"{model}","max_tokens":100,"messages":[{{"role":"user","content":"hi"}}]}}"#
    )
}

/// One request through headers and body, on a shared store at `now`.
fn send(
    p: &Rc<Policy>,
    store: &Rc<MemStore>,
    now: u64,
    model: &str,
    session: Option<&str>,
) -> (RequestFlow, FakeHost, Decision) {
    let mut host = FakeHost::new()
        .with_store(store.clone())
        .at(now)
        .with_request_header(":path", "/v1/messages")
        .with_request_header(":method", "POST")
        .with_request_header("x-request-id", "r")
        .with_request_header("x-api-key", KEY)
        .with_body(&body(model));
    if let Some(s) = session {
        host = host.with_request_header("x-session", s);
    }
    let mut flow = RequestFlow::new(p.clone());
    let d = match flow.on_request_headers(&mut host, false) {
        Decision::Pause => {
            let n = host.body_len();
            flow.on_request_body(&mut host, n, true)
        }
        other => other,
    };
    (flow, host, d)
}

/// The provider answers 200 with `usage` (and no model: the price is the
/// model sent upstream).
fn complete(flow: &mut RequestFlow, host: &mut FakeHost, input: u64, output: u64) {
    host.response_headers = vec![
        (":status".into(), b"200".to_vec()),
        ("content-type".into(), b"application/json".to_vec()),
    ];
    flow.on_response_headers(host, false);
    host.response_chunk =
        format!(r#"{{"usage":{{"input_tokens":{input},"output_tokens":{output}}}}}"#).into_bytes();
    let n = host.response_chunk.len();
    flow.on_response_body(host, n, true);
}

fn slot(store: &MemStore, key: &str, field: &str) -> f64 {
    crate::meter::store::read(store, key)
        .unwrap()
        .slot(crate::meter::Metric::from_field(field).unwrap())
        .value
}

const NOW: u64 = 1_795_000_000_000;

#[test]
fn a_shadow_limit_admits_audits_would_deny_and_still_debits() {
    let p = policy(
        r#"{"requests_per_minute": {"limit": 1, "shadow": true}}"#,
        "{}",
    );
    let store = MemStore::new();
    let (_, host, d) = send(&p, &store, NOW, "claude-haiku-4-5", None);
    assert_eq!(d, Decision::Continue);
    assert!(host.last_audit().unwrap().would_deny.is_empty());
    let (_, host, d) = send(&p, &store, NOW, "claude-haiku-4-5", None);
    assert_eq!(d, Decision::Continue, "the client sees no difference");
    let rec = host.last_audit().unwrap();
    assert_eq!(rec.would_deny, ["key:k:requests_per_minute"]);
    assert_eq!((rec.decision, rec.reason), (Outcome::Allowed, Reason::Ok));
    assert_eq!(
        host.stats.get("tollgate.ladder.shadow_would_deny"),
        Some(&1)
    );
    // Debited: 1 - 2 = one request of debt, the limit's true use.
    assert_eq!(
        slot(&store, "tollgate/2/key:k", "requests_per_minute"),
        -1.0
    );
}

#[test]
fn a_downgrade_rewrites_the_body_and_charges_the_cheaper_model() {
    let p = policy(
        r#"{"budget_usd_per_day": {"limit": 0.005, "on_exhausted": {"downgrade_to": "claude-haiku-4-5"}}}"#,
        "{}",
    );
    let store = MemStore::new();
    // Opus: 10 x $15/M + 100 x $75/M = $0.00765, over the $0.005 budget.
    let (mut flow, mut host, d) = send(&p, &store, NOW, "claude-opus-4-1", None);
    assert_eq!(d, Decision::Continue);
    complete(&mut flow, &mut host, 10, 100);
    assert!((host.last_audit().unwrap().cost_usd.unwrap() - 0.00765).abs() < 1e-12);

    let (mut flow, mut host, d) = send(&p, &store, NOW, "claude-opus-4-1", None);
    assert_eq!(d, Decision::Continue);
    let sent: serde_json::Value = serde_json::from_slice(&host.request_body).unwrap();
    assert_eq!(sent["model"], "claude-haiku-4-5");
    assert_eq!(sent["max_tokens"], 100);
    assert_eq!(
        host.request_header("content-length"),
        Some(host.request_body.len().to_string())
    );
    complete(&mut flow, &mut host, 10, 100);
    assert_eq!(
        host.response_header("x-tollgate-downgraded-from")
            .as_deref(),
        Some("claude-opus-4-1")
    );
    let rec = host.last_audit().unwrap();
    assert_eq!(rec.model_requested.as_deref(), Some("claude-opus-4-1"));
    let d = rec.downgrade.unwrap();
    assert_eq!(
        (d.from.as_str(), d.to.as_str(), d.bucket.as_str()),
        (
            "claude-opus-4-1",
            "claude-haiku-4-5",
            "key:k:budget_usd_per_day"
        )
    );
    // Haiku: 10 x $1/M + 100 x $5/M = $0.00051, charged past the budget.
    assert!((rec.cost_usd.unwrap() - 0.00051).abs() < 1e-12);
    assert!((slot(&store, "tollgate/2/key:k", "budget_usd_per_day") - 0.00816).abs() < 1e-12);
    assert_eq!(host.stats.get("tollgate.ladder.downgraded"), Some(&1));
}

#[test]
fn a_throttled_limit_admits_the_fraction_of_its_rate_from_an_overflow_bucket() {
    let p = policy(
        r#"{"requests_per_minute": {"limit": 4, "on_exhausted": {"throttle": 0.5}}}"#,
        "{}",
    );
    let store = MemStore::new();
    let outcome = |now: u64| {
        let (_, host, d) = send(&p, &store, now, "claude-haiku-4-5", None);
        let rec = host.last_audit().unwrap();
        match d {
            Decision::Continue => rec.throttled.unwrap_or_else(|| "limit".into()),
            Decision::Reply(r) => format!("{} {}", r.status, rec.bucket.unwrap()),
            other => panic!("{other:?}"),
        }
    };
    let burst: Vec<String> = (0..7).map(|_| outcome(NOW)).collect();
    // 4 from the limit, 2 (0.5 x 4) from its overflow, then 429.
    assert_eq!(
        burst,
        [
            "limit",
            "limit",
            "limit",
            "limit",
            "key:k:requests_per_minute",
            "key:k:requests_per_minute",
            "429 key:k/throttle:requests_per_minute"
        ]
    );
    // 30 s later the limit has refilled 2 (4/min) and the overflow 1 (2/min).
    let later: Vec<String> = (0..4).map(|_| outcome(NOW + 30_000)).collect();
    assert_eq!(
        later,
        [
            "limit",
            "limit",
            "key:k:requests_per_minute",
            "429 key:k/throttle:requests_per_minute"
        ]
    );
}

const SESSIONS: &str =
    r#"{"cc": {"header": "x-session", "limits": {"requests_per_minute": 1}, "max_tracked": 2}}"#;

#[test]
fn each_session_value_gets_its_own_buckets_and_no_header_means_no_session_limit() {
    let p = policy("{}", SESSIONS);
    let store = MemStore::new();
    let (_, host, d) = send(&p, &store, NOW, "claude-haiku-4-5", Some("s1"));
    assert_eq!(d, Decision::Continue);
    let rec = host.last_audit().unwrap();
    assert_eq!(
        rec.sessions,
        [crate::audit::SessionRef {
            pool: "cc".into(),
            value: "s1".into()
        }]
    );
    let (_, host, d) = send(&p, &store, NOW, "claude-haiku-4-5", Some("s1"));
    let r = match d {
        Decision::Reply(r) => r,
        other => panic!("{other:?}"),
    };
    assert_eq!(r.status, 429);
    assert_eq!(
        host.last_audit().unwrap().bucket.as_deref(),
        Some("session:cc:s1:requests_per_minute")
    );
    let (_, _, d) = send(&p, &store, NOW, "claude-haiku-4-5", Some("s2"));
    assert_eq!(d, Decision::Continue, "another session, another bucket");
    for _ in 0..3 {
        let (_, host, d) = send(&p, &store, NOW, "claude-haiku-4-5", None);
        assert_eq!(d, Decision::Continue);
        assert!(host.last_audit().unwrap().sessions.is_empty());
    }
}

#[test]
fn a_full_session_pool_refuses_new_sessions_until_one_is_idle_then_evicts_it() {
    let p = policy("{}", SESSIONS);
    let store = MemStore::new();
    for s in ["s1", "s2"] {
        assert_eq!(
            send(&p, &store, NOW, "claude-haiku-4-5", Some(s)).2,
            Decision::Continue
        );
    }
    // Both tracked sessions used their minute: neither may be forgotten.
    let (_, host, d) = send(&p, &store, NOW + 1_000, "claude-haiku-4-5", Some("s3"));
    let r = match d {
        Decision::Reply(r) => r,
        other => panic!("{other:?}"),
    };
    assert_eq!((r.status, r.header("retry-after")), (429, Some("60")));
    let b: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!(
        b["error"]["message"],
        "session pool cc is tracking its maximum of 2 active sessions; retry in 60s"
    );
    assert_eq!(host.last_audit().unwrap().reason, Reason::SessionPoolFull);
    // A minute on, both buckets are full again (idle): s3 takes one slot,
    // with fresh buckets, and its own limit applies from there.
    assert_eq!(
        send(&p, &store, NOW + 60_000, "claude-haiku-4-5", Some("s3")).2,
        Decision::Continue
    );
    assert!(matches!(
        send(&p, &store, NOW + 60_000, "claude-haiku-4-5", Some("s3")).2,
        Decision::Reply(_)
    ));
}

#[test]
fn a_downgrade_to_a_model_the_key_may_not_call_is_refused_at_request_time() {
    // A session pool's limit applies to any key: checked per request.
    let p = policy(
        "{}",
        r#"{"cc": {"header": "x-session", "limits": {"requests_per_minute": {"limit": 1, "on_exhausted": {"downgrade_to": "claude-sonnet-4-5"}}}}}"#,
    );
    let store = MemStore::new();
    assert_eq!(
        send(&p, &store, NOW, "claude-opus-4-1", Some("s1")).2,
        Decision::Continue
    );
    let (_, host, d) = send(&p, &store, NOW, "claude-opus-4-1", Some("s1"));
    let r = match d {
        Decision::Reply(r) => r,
        other => panic!("{other:?}"),
    };
    assert_eq!(r.status, 403);
    let b: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!(
        b["error"]["message"],
        "session:cc:s1:requests_per_minute is exhausted and downgrades to model claude-sonnet-4-5, which is not allowed for this key (allowed: claude-opus-4-1, claude-haiku-4-5)"
    );
    assert_eq!(host.last_audit().unwrap().reason, Reason::ModelNotAllowed);
}

#[test]
fn a_long_session_value_is_audited_by_its_hash() {
    let long = "x".repeat(200);
    assert_eq!(
        crate::meter::session::display(long.as_bytes()).len(),
        "sha256:".len() + 16
    );
    assert_eq!(crate::meter::session::display(b"abc"), "abc");
    assert!(crate::meter::session::display(b"a b").starts_with("sha256:"));
}
