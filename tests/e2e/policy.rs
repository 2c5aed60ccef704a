//! Policy on a live gateway: hot reload under a steady request stream,
//! revocation, invalid edits, allowlists, expiry, bucket state across reloads.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tollgate_e2e::{policy, Gateway};

const ALICE: &str = "tg-e2e-policy-alice";
const BOB: &str = "tg-e2e-policy-bob";
const OLD: &str = "tg-e2e-policy-expired";
const HAIKU: &str =
    r#"{"model":"claude-haiku-4-5","max_tokens":50,"messages":[{"role":"user","content":"hi"}]}"#;

fn base(bob_revoked: bool, rpm: u32) -> String {
    policy(
        &format!(r#"{{"models": ["claude-haiku-*"], "limits": {{"requests_per_minute": {rpm}}}}}"#),
        &[
            ("alice", ALICE, r#""team": "payments""#),
            ("bob", BOB, &format!(r#""revoked": {bob_revoked}"#)),
            ("old", OLD, r#""expires_at": "2021-01-01T00:00:00Z""#),
        ],
    )
}

#[test]
fn revocation_applies_within_seconds_without_failing_other_keys() {
    let gw = Arc::new(Gateway::start(&base(false, 100_000)));
    assert_eq!(gw.post("/v1/messages", Some(BOB), HAIKU).status(), 200);

    // A steady stream of Alice's requests across the reload.
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let stream = {
        let (gw, stop, ok, failed) = (gw.clone(), stop.clone(), ok.clone(), failed.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let status = gw.post("/v1/messages", Some(ALICE), HAIKU).status();
                if status == 200 {
                    ok.fetch_add(1, Ordering::Relaxed)
                } else {
                    failed.fetch_add(1, Ordering::Relaxed)
                };
            }
        })
    };
    std::thread::sleep(Duration::from_millis(500));
    let edited = Instant::now();
    gw.write_policy(&base(true, 100_000));
    let revoked_after = loop {
        let r = gw.post("/v1/messages", Some(BOB), HAIKU);
        if r.status() == 401 {
            let body: serde_json::Value = r.json().unwrap();
            assert_eq!(body["error"]["message"], "this API key has been revoked");
            break edited.elapsed();
        }
        assert!(
            edited.elapsed() < Duration::from_secs(10),
            "revocation not applied after 10s"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    stream.join().unwrap();
    eprintln!(
        "revocation applied after {revoked_after:?}; alice: {} ok, {} failed",
        ok.load(Ordering::Relaxed),
        failed.load(Ordering::Relaxed)
    );
    assert!(
        revoked_after < Duration::from_secs(2),
        "revocation took {revoked_after:?}"
    );
    assert!(ok.load(Ordering::Relaxed) > 10);
    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "no request of another key may fail during the reload"
    );
    assert!(
        gw.log("tollgate.out").contains("policy reloaded:"),
        "the operator sees the reload"
    );
}

#[test]
fn invalid_edit_is_rejected_and_the_previous_policy_stays_live() {
    let gw = Gateway::start(&base(true, 100_000));
    gw.write_policy(r#"{"version": 1, "keys": [{"id": "x", "key_sha256": "nothex"}]}"#);
    std::thread::sleep(Duration::from_millis(1500));
    let err = gw.log("tollgate.err");
    assert!(
        err.contains("policy edit rejected; the previous policy stays live"),
        "{err}"
    );
    assert!(err.contains("keys[0].key_sha256: must be 64 hex characters (the SHA-256 of the virtual key), found 6 (value: \"nothex\")"), "{err}");
    assert_eq!(
        gw.post("/v1/messages", Some(ALICE), HAIKU).status(),
        200,
        "old policy still admits alice"
    );
    assert_eq!(
        gw.post("/v1/messages", Some(BOB), HAIKU).status(),
        401,
        "old policy still revokes bob"
    );
}

#[test]
fn filter_rejects_an_invalid_policy_that_bypasses_tollgate_run() {
    // An operator (or another tool) writes a broken policy straight into the
    // ECDS file: on_configure refuses it and Envoy keeps the last good one.
    let gw = Gateway::start(&base(true, 100_000));
    let ecds = gw.dir.path().join("state/ecds/tollgate.yaml");
    let good = std::fs::read_to_string(&ecds).unwrap();
    // The last `value:` is the policy (the first is the VM options).
    let start = good.rfind("value: \"{").unwrap();
    let end = start + good[start..].find('\n').unwrap();
    let broken = format!(
        "{}value: \"{{\\\"version\\\": 7}}\"{}",
        &good[..start],
        &good[end..]
    );
    let tmp = gw.dir.path().join("state/ecds/.broken");
    std::fs::write(&tmp, broken).unwrap();
    std::fs::rename(&tmp, &ecds).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !gw
        .log("envoy")
        .contains("unsupported policy version (expected 1)")
    {
        assert!(
            Instant::now() < deadline,
            "filter did not report the rejected policy:\n{}",
            gw.log("envoy")
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(gw.post("/v1/messages", Some(ALICE), HAIKU).status(), 200);
    assert_eq!(gw.post("/v1/messages", Some(BOB), HAIKU).status(), 401);
}

#[test]
fn model_outside_allowlist_gets_403_and_never_reaches_the_provider() {
    let gw = Gateway::start(&base(false, 100_000));
    let r = gw.post(
        "/v1/messages",
        Some(ALICE),
        r#"{"model":"claude-opus-4-1","max_tokens":5,"messages":[]}"#,
    );
    assert_eq!(r.status(), 403);
    let body: serde_json::Value = r.json().unwrap();
    assert_eq!(body["error"]["type"], "permission_error");
    assert_eq!(
        body["error"]["message"],
        "model claude-opus-4-1 is not allowed for this key (allowed: claude-haiku-*)"
    );
    assert!(gw.mock_requests().is_empty());
}

#[test]
fn expired_key_gets_401_saying_when() {
    let gw = Gateway::start(&base(false, 100_000));
    let r = gw.post("/v1/messages", Some(OLD), HAIKU);
    assert_eq!(r.status(), 401);
    let body: serde_json::Value = r.json().unwrap();
    assert_eq!(
        body["error"]["message"],
        "this API key expired at 2021-01-01T00:00:00Z"
    );
    assert!(gw.mock_requests().is_empty());
}

#[test]
fn bucket_balances_survive_a_reload_and_a_lowered_limit_clamps_them() {
    let gw = Gateway::start(&base(false, 10));
    for _ in 0..9 {
        assert_eq!(gw.post("/v1/messages", Some(ALICE), HAIKU).status(), 200);
    }
    // Reload with an unrelated change: the balance (1 left) is kept; a reset
    // would show 9 remaining.
    gw.write_policy(&base(true, 10));
    wait_for(&gw, BOB, 401);
    let r = gw.post("/v1/messages", Some(ALICE), HAIKU);
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()["anthropic-ratelimit-requests-remaining"],
        "0",
        "balance survived the reload"
    );
    // Lower the limit to 3: the empty balance stays empty (clamped, never
    // refilled to the new capacity by the reload).
    gw.write_policy(&base(false, 3));
    wait_for(&gw, BOB, 200);
    let r = gw.post("/v1/messages", Some(ALICE), HAIKU);
    assert_eq!(r.status(), 429, "a reload must not refill the bucket");
    assert_eq!(r.headers()["anthropic-ratelimit-requests-limit"], "3");
}

#[test]
fn removing_a_key_stops_its_traffic() {
    let gw = Gateway::start(&base(false, 100_000));
    assert_eq!(gw.post("/v1/messages", Some(BOB), HAIKU).status(), 200);
    gw.write_policy(&policy(
        r#"{"models": ["claude-haiku-*"]}"#,
        &[("alice", ALICE, "")],
    ));
    wait_for(&gw, BOB, 401);
    assert_eq!(gw.post("/v1/messages", Some(ALICE), HAIKU).status(), 200);
}

fn wait_for(gw: &Gateway, key: &str, status: u16) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while gw.post("/v1/messages", Some(key), HAIKU).status() != status {
        assert!(Instant::now() < deadline, "reload not applied after 10s");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn without_header_hold_a_denial_still_answers_and_nothing_completes_upstream() {
    // Istio's WasmPlugin mode: headers go upstream before the body decision.
    let p = base(false, 100_000).replacen(
        "\"version\": 1,",
        "\"version\": 1, \"settings\": {\"hold_request_headers\": false},",
        1,
    );
    let gw = Gateway::start(&p);
    let r = gw.post(
        "/v1/messages",
        Some(ALICE),
        r#"{"model":"claude-opus-4-1","max_tokens":5,"messages":[]}"#,
    );
    assert_eq!(r.status(), 403);
    let body: serde_json::Value = r.json().unwrap();
    assert_eq!(body["error"]["type"], "permission_error");
    assert!(
        gw.mock_requests().is_empty(),
        "the upstream request was reset before its body completed"
    );
    assert_eq!(
        gw.post("/v1/messages", Some(ALICE), HAIKU).status(),
        200,
        "allowed requests flow"
    );
}

#[test]
fn policy_reloaded_every_second_under_load_fails_no_request() {
    let gw = Arc::new(Gateway::start(&base(false, 100_000)));
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let workers: Vec<_> = (0..4)
        .map(|_| {
            let (gw, stop, ok, failed) = (gw.clone(), stop.clone(), ok.clone(), failed.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let r = gw.post("/v1/messages", Some(ALICE), HAIKU);
                    let good = r.status() == 200 && r.text().is_ok_and(|t| t.contains("\"usage\""));
                    if good {
                        ok.fetch_add(1, Ordering::Relaxed)
                    } else {
                        failed.fetch_add(1, Ordering::Relaxed)
                    };
                }
            })
        })
        .collect();
    // Six reloads, one a second, alternating two valid policies.
    for i in 0..6 {
        std::thread::sleep(Duration::from_millis(1000));
        gw.write_policy(&base(i % 2 == 0, 100_000));
    }
    std::thread::sleep(Duration::from_millis(800));
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.join().unwrap();
    }
    let reloads = gw.log("tollgate.out").matches("policy reloaded:").count();
    eprintln!(
        "{} ok, {} failed across {reloads} reloads",
        ok.load(Ordering::Relaxed),
        failed.load(Ordering::Relaxed)
    );
    assert!(
        reloads >= 5,
        "the policy was reloaded under load ({reloads} times)"
    );
    assert!(ok.load(Ordering::Relaxed) > 50);
    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "no request fails during reloads"
    );
}

/// A policy that fails its checks starts nothing, whether it is not JSON
/// or fails a check that spans values (the checks run while Envoy starts:
/// that Envoy is stopped again, and no ready file is written).
#[test]
fn a_policy_that_fails_its_checks_starts_nothing() {
    let (code, err) = Gateway::start_refused(r#"{"version": 1, "keys": ["#);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("invalid JSON"), "{err}");
    assert!(err.contains("error(s); nothing started"), "{err}");

    let bad_group = policy(
        r#"{"models": ["claude-*"]}"#,
        &[("alice", "tg-alice", r#""groups": ["nope"]"#)],
    );
    let (code, err) = Gateway::start_refused(&bad_group);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains(
            r#"keys[0].groups[0]: unknown group (no groups are defined under "groups") (value: "nope")"#
        ),
        "{err}"
    );
    assert!(err.contains("has 1 error(s); nothing started"), "{err}");
}
