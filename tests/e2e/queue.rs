//! Fair share under a ceiling, end to end against the real Envoy: a limit's
//! `max_wait_ms` holds requests in the filter until their bucket refills
//! (one a second for 60 a minute) instead of answering 429, and refuses
//! with the exact `retry-after` only past the wait; a pool's `reserve`
//! keeps its last share for interactive keys while batch keys are refused
//! with a message that says so. (The provider's own 529, passed through and
//! refunded, is `provider.rs`'s.)
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use serde_json::Value;
use std::time::{Duration, Instant};
use tollgate_e2e::{policy, Gateway, Options, Response};

const PATIENT: &str = "tg-queue-patient";
const BATCH: &str = "tg-queue-nightly-batch";
const CHAT: &str = "tg-queue-chat";
const HAIKU: &str =
    r#"{"model":"claude-haiku-4-5","max_tokens":10,"messages":[{"role":"user","content":"hi"}]}"#;
const SONNET: &str =
    r#"{"model":"claude-sonnet-4-5","max_tokens":10,"messages":[{"role":"user","content":"hi"}]}"#;

/// How far apart two held requests of a 60-a-minute bucket are admitted:
/// one second of refill, give or take the filter's 50 ms retry timer and a
/// loaded machine.
const SPACING: std::ops::RangeInclusive<f64> = 0.7..=1.6;

/// The value of a Tollgate stat in Envoy's admin `/stats`.
fn stat(gw: &Gateway, name: &str) -> Option<u64> {
    let full = format!("wasmcustom.{name}: ");
    gw.stats(name)
        .lines()
        .find_map(|l| l.strip_prefix(&full)?.trim().parse().ok())
}

fn send(gw: &Gateway, key: &str, id: &str, body: &str) -> Response {
    gw.post_with(
        "/v1/messages",
        &[("x-api-key", key), ("x-request-id", id)],
        body,
    )
}

/// Sends until the response says the caller's requests bucket has nothing
/// left: what remains (less than one request) refills at the bucket's rate.
fn drain(gw: &Gateway, key: &str, limit: u64, body: &str) {
    for i in 0..limit + 5 {
        let r = send(gw, key, &format!("drain-{i}"), body);
        assert_eq!(r.status(), 200, "draining request {i}");
        if r.headers()["anthropic-ratelimit-requests-remaining"] == "0" {
            return;
        }
    }
    panic!("the {limit}-a-minute bucket never emptied");
}

#[test]
fn requests_beyond_the_bucket_wait_a_second_each_and_past_max_wait_get_the_exact_retry_after() {
    let gw = Gateway::start_with(
        &policy(
            r#"{"models": ["claude-*"],
                "limits": {"requests_per_minute": {"limit": 60, "max_wait_ms": 2000}}}"#,
            &[("patient", PATIENT, "")],
        ),
        // One worker: held requests queue per worker, in arrival order; with
        // several, each worker's queue takes the refilled tokens in turn.
        Options {
            concurrency: 1,
            ..Options::default()
        },
    );
    drain(&gw, PATIENT, 60, HAIKU);
    assert_eq!(
        stat(&gw, "tollgate.held_admitted"),
        None,
        "nothing held yet"
    );

    // Three more, one after the other: each is held until a token refills,
    // then admitted and served, about a second after the one before.
    let mut served = Vec::new();
    for i in 1..=3 {
        let sent = Instant::now();
        let r = send(&gw, PATIENT, &format!("held-{i}"), HAIKU);
        assert_eq!(r.status(), 200, "held request {i} is served, not refused");
        let waited = sent.elapsed().as_secs_f64();
        assert!(
            waited >= 0.3 || i == 1,
            "request {i} waited for the refill, {waited:.3}s"
        );
        served.push(Instant::now());
    }
    for pair in served.windows(2) {
        let apart = (pair[1] - pair[0]).as_secs_f64();
        assert!(
            SPACING.contains(&apart),
            "held requests admitted {apart:.3}s apart, want {SPACING:?}"
        );
    }
    assert_eq!(stat(&gw, "tollgate.held_admitted"), Some(3));
    assert_eq!(stat(&gw, "tollgate.held"), Some(0));
    let rec = gw.audit_record("held-2");
    assert_eq!(
        (rec["decision"].as_str(), rec["status"].as_u64()),
        (Some("allowed"), Some(200)),
        "{rec}"
    );

    // Three at once on an empty bucket: the first is admitted after a
    // second, the second after two (queued behind it, inside its 2 s), the
    // third would need three: at its 2 s it gets 429 with the wait it would
    // still have, one second.
    let started = Instant::now();
    let (out, held_peak) = std::thread::scope(|s| {
        let threads: Vec<_> = (1..=3)
            .map(|i| {
                let gw = &gw;
                let t = s.spawn(move || {
                    let r = send(gw, PATIENT, &format!("burst-{i}"), HAIKU);
                    let at = started.elapsed().as_secs_f64();
                    let status = r.status().as_u16();
                    let retry = r
                        .headers()
                        .get("retry-after")
                        .map(|v| v.to_str().unwrap().to_string());
                    let body: Value = r.json().unwrap();
                    (status, at, retry, body)
                });
                // Arrival order is the queue's order.
                std::thread::sleep(Duration::from_millis(100));
                t
            })
            .collect();
        // All three are held at once (the gauge), before the first is in.
        let mut peak = 0;
        let deadline = Instant::now() + Duration::from_millis(800);
        while Instant::now() < deadline && peak < 3 {
            peak = peak.max(stat(&gw, "tollgate.held").unwrap_or(0));
            std::thread::sleep(Duration::from_millis(20));
        }
        let out: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
        (out, peak)
    });
    assert_eq!(held_peak, 3, "the tollgate.held gauge counted the three");
    let (first, second, third) = (&out[0], &out[1], &out[2]);
    assert_eq!((first.0, second.0), (200, 200), "{out:?}");
    let apart = second.1 - first.1;
    assert!(SPACING.contains(&apart), "admitted {apart:.3}s apart");
    assert_eq!(third.0, 429, "{out:?}");
    assert_eq!(third.2.as_deref(), Some("1"), "the exact wait left: 1 s");
    assert_eq!(
        third.3["error"]["message"],
        "requests_per_minute limit of 60 reached for key:patient; retry in 1s"
    );
    // Refused at the end of its wait (it arrived 0.2 s after the first),
    // not at once.
    assert!(
        (1.8..=3.0).contains(&third.1),
        "refused {:.3}s after the burst began",
        third.1
    );
    let rec = gw.audit_record("burst-3");
    assert_eq!(
        (
            rec["decision"].as_str(),
            rec["status"].as_u64(),
            rec["bucket"].as_str()
        ),
        (
            Some("denied"),
            Some(429),
            Some("key:patient:requests_per_minute")
        ),
        "{rec}"
    );
    assert_eq!(stat(&gw, "tollgate.held_admitted"), Some(5));
    assert_eq!(stat(&gw, "tollgate.held"), Some(0));
    // The refused one never reached the provider.
    let upstream: Vec<Value> = gw
        .mock_requests()
        .into_iter()
        .filter_map(|r| r["headers"]["x-request-id"].as_str().map(Value::from))
        .filter(|id| id.as_str().is_some_and(|id| id.starts_with("burst-")))
        .collect();
    assert_eq!(upstream, ["burst-1", "burst-2"]);
}

#[test]
fn below_the_pools_reserve_batch_keys_are_refused_and_interactive_keys_admitted() {
    // Anthropic's ceiling for the group, 10 a minute, the last 20% (2)
    // kept for interactive traffic.
    let policy = policy(
        r#"{"models": ["claude-*"]}"#,
        &[
            ("nightly", BATCH, r#""priority": "batch""#),
            ("chat", CHAT, r#""priority": "interactive""#),
        ],
    )
    .replacen(
        "{\"version\": 1,",
        r#"{"version": 1, "provider_pools": {"provider:anthropic:claude-sonnet-4": {
            "models": ["claude-sonnet-4-5"],
            "limits": {"requests_per_minute":
                {"limit": 10, "reserve": {"fraction": 0.2, "for": "interactive"}}}}},"#,
        1,
    );
    let gw = Gateway::start(&policy);

    // Batch traffic takes the pool down to its reserve...
    for i in 1..=8 {
        assert_eq!(send(&gw, BATCH, &format!("b-{i}"), SONNET).status(), 200);
    }
    // ...and no further: the refusal says the rest is kept, and the wait
    // is until the pool is above its reserve again (one request refills in
    // 6 s at 10 a minute).
    let r = send(&gw, BATCH, "b-9", SONNET);
    assert_eq!(r.status(), 429);
    assert_eq!(r.headers()["retry-after"], "6");
    let body: Value = r.json().unwrap();
    assert_eq!(
        body["error"]["message"],
        "requests_per_minute limit of 10 reached for provider:anthropic:claude-sonnet-4 (the last 20% is kept for interactive requests); retry in 6s"
    );
    let rec = gw.audit_record("b-9");
    assert_eq!(
        rec["bucket"], "provider:anthropic:claude-sonnet-4:requests_per_minute",
        "{rec}"
    );

    // Interactive traffic uses the reserve, and then the pool is empty for
    // it too (a plain refusal: nothing is kept from it).
    for i in 1..=2 {
        assert_eq!(send(&gw, CHAT, &format!("c-{i}"), SONNET).status(), 200);
    }
    let r = send(&gw, CHAT, "c-3", SONNET);
    assert_eq!(r.status(), 429);
    let body: Value = r.json().unwrap();
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.starts_with(
            "requests_per_minute limit of 10 reached for provider:anthropic:claude-sonnet-4; retry in "
        ),
        "{message}"
    );
    assert!(gw.mock_violations().is_empty());
}
