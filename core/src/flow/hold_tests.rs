//! Requests held for a limit to refill (`max_wait_ms`) instead of a 429.
#![allow(clippy::unwrap_used, clippy::panic)]

use super::*;
use crate::testing::{FakeHost, MemStore};

const KEY: &str = "tg-patient";
const BODY: &str = r#"{"model":"claude-haiku-4-5","max_tokens":10,"messages":[]}"#;
const T0: u64 = 1_795_000_000_000;

fn policy() -> Rc<Policy> {
    let json = format!(
        r#"{{"version":1,"defaults":{{"models":["claude-*"],
            "limits":{{"requests_per_minute":{{"limit":60,"max_wait_ms":2000}}}}}},
            "keys":[{{"id":"p","key_sha256":"{}"}}]}}"#,
        crate::vkey::sha256_hex(KEY)
    );
    Rc::new(
        crate::policy::compile(json.as_bytes(), "p.json", 0)
            .unwrap()
            .0,
    )
}

fn host(store: &Rc<MemStore>, now: u64) -> FakeHost {
    FakeHost::new()
        .with_store(store.clone())
        .at(now)
        .with_request_header(":path", "/v1/messages")
        .with_request_header("x-api-key", KEY)
        .with_body(BODY)
}

fn send(flow: &mut RequestFlow, h: &mut FakeHost) -> Decision {
    flow.on_request_headers(h, false);
    let n = h.body_len();
    flow.on_request_body(h, n, true)
}

/// Empties the 60-a-minute bucket at T0.
fn drain(store: &Rc<MemStore>, p: &Rc<Policy>) {
    for _ in 0..60 {
        let mut h = host(store, T0);
        assert_eq!(
            send(&mut RequestFlow::new(p.clone()), &mut h),
            Decision::Continue
        );
    }
}

#[test]
fn a_request_that_fits_within_max_wait_is_held_then_admitted_when_the_bucket_refills() {
    let store = MemStore::new();
    let p = policy();
    drain(&store, &p);
    let mut flow = RequestFlow::new(p.clone());
    let mut h = host(&store, T0);
    assert_eq!(
        send(&mut flow, &mut h),
        Decision::Pause,
        "held, not refused"
    );
    assert_eq!(flow.held(), Some((T0 + 1_000, "key:p:requests_per_minute")));
    assert_eq!(h.stats.get("tollgate.held"), Some(&1));
    h.now_ms = T0 + 500;
    assert_eq!(flow.on_wait_tick(&mut h), None, "too early: still held");
    h.now_ms = T0 + 1_000;
    assert_eq!(flow.on_wait_tick(&mut h), Some(Decision::Continue));
    assert_eq!(flow.held(), None);
    assert_eq!(h.stats.get("tollgate.held"), Some(&0));
    assert_eq!(h.stats.get("tollgate.held_admitted"), Some(&1));
    let rec = h.last_audit().unwrap();
    assert_eq!(rec.decision, Outcome::Allowed);
}

#[test]
fn a_request_beyond_max_wait_gets_its_429_with_the_exact_retry_after() {
    let store = MemStore::new();
    let p = policy();
    drain(&store, &p);
    // Two more arrive: the first waits 1 s; the second queues behind it.
    let mut first = RequestFlow::new(p.clone());
    let mut h1 = host(&store, T0);
    assert_eq!(send(&mut first, &mut h1), Decision::Pause);
    let mut second = RequestFlow::new(p.clone());
    let mut h2 = host(&store, T0);
    h2.held_buckets = vec!["key:p:requests_per_minute".into()];
    assert_eq!(
        send(&mut second, &mut h2),
        Decision::Pause,
        "queued behind the held request, in arrival order"
    );
    // The first takes the refilled token at 1 s; at 1.5 s the second would
    // need until 2 s, inside its 2 s wait: still held; at 2 s it is in.
    h1.now_ms = T0 + 1_000;
    assert_eq!(first.on_wait_tick(&mut h1), Some(Decision::Continue));
    h2.now_ms = T0 + 1_000;
    h2.held_buckets.clear();
    assert_eq!(second.on_wait_tick(&mut h2), None);
    h2.now_ms = T0 + 2_000;
    assert_eq!(second.on_wait_tick(&mut h2), Some(Decision::Continue));
    // A third at 2 s would wait until 3 s; then a fourth until 4 s: past
    // its 2 s, refused now with the exact wait.
    let mut third = RequestFlow::new(p.clone());
    let mut h3 = host(&store, T0 + 2_000);
    assert_eq!(send(&mut third, &mut h3), Decision::Pause);
    let mut fourth = RequestFlow::new(p.clone());
    let mut h4 = host(&store, T0 + 2_000);
    h4.held_buckets = vec!["key:p:requests_per_minute".into()];
    assert_eq!(send(&mut fourth, &mut h4), Decision::Pause);
    h3.now_ms = T0 + 3_000;
    assert_eq!(third.on_wait_tick(&mut h3), Some(Decision::Continue));
    h4.now_ms = T0 + 3_000;
    h4.held_buckets.clear();
    h4.now_ms = T0 + 3_000;
    match fourth.on_wait_tick(&mut h4) {
        None => {}
        other => panic!("inside its wait at 3 s: {other:?}"),
    }
    // Past its deadline (2 s after it arrived) with the bucket still empty.
    h4.now_ms = T0 + 4_000;
    let mut other = RequestFlow::new(p.clone());
    let mut h5 = host(&store, T0 + 4_000);
    assert_eq!(
        send(&mut other, &mut h5),
        Decision::Continue,
        "a newcomer when no one waits"
    );
    match fourth.on_wait_tick(&mut h4) {
        Some(Decision::Reply(r)) => {
            assert_eq!(r.status, 429);
            assert_eq!(r.header("retry-after"), Some("1"));
        }
        other => panic!("refused past its wait: {other:?}"),
    }
    assert_eq!(h4.stats.get("tollgate.held"), Some(&0));
}

#[test]
fn a_held_request_whose_client_left_takes_nothing() {
    let store = MemStore::new();
    let p = policy();
    drain(&store, &p);
    let mut flow = RequestFlow::new(p.clone());
    let mut h = host(&store, T0);
    assert_eq!(send(&mut flow, &mut h), Decision::Pause);
    flow.on_end(&mut h);
    assert_eq!(flow.held(), None);
    assert_eq!(h.stats.get("tollgate.held"), Some(&0));
    // The token that refills at 1 s is still there for the next request.
    let mut h = host(&store, T0 + 1_000);
    assert_eq!(send(&mut RequestFlow::new(p), &mut h), Decision::Continue);
}

#[test]
fn with_no_room_to_hold_the_request_is_refused_at_once() {
    let store = MemStore::new();
    let p = policy();
    drain(&store, &p);
    let mut h = host(&store, T0);
    h.hold_room = 0;
    match send(&mut RequestFlow::new(p), &mut h) {
        Decision::Reply(r) => assert_eq!(r.status, 429),
        other => panic!("no room: {other:?}"),
    }
}
