//! The shared meter and its sync leader against a scripted quota service:
//! cold keys go through Admit, leases serve busy keys, a lost sync is
//! resent with its sequence and never counted twice, revocations reach the
//! flow, and an unreachable store follows each limit's on_store_failure.
#![allow(clippy::unwrap_used, clippy::panic, clippy::indexing_slicing)]

use super::*;
use crate::flow::{FilterOptions, RequestFlow};
use crate::host::Decision;
use crate::testing::{FakeHost, FakeRoot, MemStore};
use std::rc::Rc;
use tollgate_proto::quota::v1::admit_response::Outcome;

const KEY: &str = "tg-shared-key";
const NOW: u64 = 1_795_000_000_000;
const BODY: &str =
    r#"{"model":"claude-haiku-4-5","max_tokens":100,"messages":[{"role":"user","content":"hi"}]}"#;

fn opts() -> SharedOptions {
    SharedOptions {
        sync_period_ms: 100,
        admit_timeout_ms: 1000,
    }
}

fn policy(limits: &str) -> Rc<Policy> {
    let json = format!(
        r#"{{"version":1,"defaults":{{"models":["claude-*"],"limits":{limits}}},
            "keys":[{{"id":"k","key_sha256":"{}"}}],
            "prices":{{"claude-*":{{"input":1,"output":5}}}}}}"#,
        crate::vkey::sha256_hex(KEY)
    );
    Rc::new(
        crate::policy::compile(json.as_bytes(), "p.json", 0)
            .unwrap()
            .0,
    )
}

fn flow(policy: &Rc<Policy>) -> RequestFlow {
    RequestFlow::with_options(
        policy.clone(),
        FilterOptions {
            hold_request_headers: true,
            shared: Some(opts()),
        },
    )
}

fn host(store: &Rc<MemStore>, id: &str, now: u64) -> FakeHost {
    FakeHost::new()
        .with_store(store.clone())
        .at(now)
        .with_request_header(":path", "/v1/messages")
        .with_request_header("x-request-id", id)
        .with_request_header("x-api-key", KEY)
        .with_body(BODY)
}

/// Headers and body of one request; the decision on the body.
fn send(flow: &mut RequestFlow, host: &mut FakeHost) -> Decision {
    assert_eq!(flow.on_request_headers(host, false), Decision::Pause);
    let n = host.body_len();
    flow.on_request_body(host, n, true)
}

/// The response: 200 with the given output tokens, then the end.
fn respond(flow: &mut RequestFlow, host: &mut FakeHost, output: u64) {
    host.response_headers = vec![
        (":status".into(), b"200".to_vec()),
        ("content-type".into(), b"application/json".to_vec()),
    ];
    flow.on_response_headers(host, false);
    host.response_chunk = format!(
        r#"{{"model":"claude-haiku-4-5","usage":{{"input_tokens":5,"output_tokens":{output}}}}}"#
    )
    .into_bytes();
    let n = host.response_chunk.len();
    flow.on_response_body(host, n, true);
}

fn admitted(request: &[u8]) -> Vec<u8> {
    let req = pb::AdmitRequest::decode(request).unwrap();
    pb::AdmitResponse {
        outcome: Outcome::Admitted as i32,
        views: req
            .charges
            .iter()
            .map(|c| pb::BucketView {
                remaining: (c.bucket.as_ref().unwrap().limit - c.amount) as f64,
                reset_at_ms: (NOW + 60_000) as i64,
            })
            .collect(),
        now_ms: NOW as i64,
        ..Default::default()
    }
    .encode_to_vec()
}

/// A cold key's request at NOW: it pauses for Admit, which admits it.
fn admitted_by_redis(p: &Rc<Policy>, store: &Rc<MemStore>, id: &str) -> (RequestFlow, FakeHost) {
    let mut f = flow(p);
    let mut h = host(store, id, NOW);
    send(&mut f, &mut h);
    let request = h.quota_calls[0].1.clone();
    f.on_quota_response(&mut h, Some(&admitted(&request)));
    (f, h)
}

/// A quota service that grants every bucket `lease` units for 300 ms.
fn grant_all(request: &[u8], lease: i64, now: u64) -> (pb::SyncRequest, Vec<u8>) {
    let req = pb::SyncRequest::decode(request).unwrap();
    let answer = pb::SyncResponse {
        grants: req
            .buckets
            .iter()
            .map(|b| pb::Grant {
                lease,
                expires_at_ms: (now + 300) as i64,
                view: Some(pb::BucketView {
                    remaining: 1000.0,
                    reset_at_ms: 0,
                }),
                window: b.window,
            })
            .collect(),
        replicas: 4,
        now_ms: now as i64,
        ..Default::default()
    };
    (req, answer.encode_to_vec())
}

fn slot(store: &MemStore, metric: Metric) -> crate::meter::record::Slot {
    store::read(store, "tollgate/2/key:k").unwrap().slot(metric)
}

#[test]
fn a_cold_key_pauses_for_admit_then_settles_in_redis_at_once_and_through_the_leader() {
    let store = MemStore::new();
    let p = policy(r#"{"requests_per_minute": 60, "output_tokens_per_minute": 10000}"#);
    let mut f = flow(&p);
    let mut h = host(&store, "cold-1", NOW);
    assert_eq!(send(&mut f, &mut h), Decision::Pause, "waits for Redis");
    let (method, request) = h.quota_calls[0].clone();
    assert_eq!(method, QuotaMethod::Admit);
    let req = pb::AdmitRequest::decode(request.as_slice()).unwrap();
    assert_eq!(req.request_id, "cold-1");
    assert_eq!(req.key_sha256, crate::vkey::sha256(KEY.as_bytes()).to_vec());
    let charges: Vec<(String, i64)> = req
        .charges
        .iter()
        .map(|c| (c.bucket.as_ref().unwrap().id.clone(), c.amount))
        .collect();
    assert_eq!(
        charges,
        [
            ("key:k:requests_per_minute".to_string(), 1),
            ("key:k:output_tokens_per_minute".to_string(), 100)
        ]
    );
    assert_eq!(
        f.on_quota_response(&mut h, Some(&admitted(&request))),
        Some(Decision::Continue)
    );
    // The key is busy now: the leader is asked for leases.
    assert_eq!(store.queued(Queue::Sync), 1);
    respond(&mut f, &mut h, 40);
    // 100 output tokens reserved, 40 used: 60 back, sent now and queued.
    let (method, settle) = h.quota_calls[1].clone();
    assert_eq!(method, QuotaMethod::Settle);
    let settle = pb::SettleRequest::decode(settle.as_slice()).unwrap();
    assert_eq!(settle.request_id, "cold-1");
    assert_eq!(settle.deltas.len(), 1);
    assert_eq!(settle.deltas[0].amount, -60);
    assert_eq!(store.queued(Queue::Settle), 1);
    assert_eq!(h.last_audit().unwrap().tokens.output, Some(40));
}

#[test]
fn leases_serve_a_busy_key_without_a_round_trip_and_a_lost_sync_is_resent_not_recounted() {
    let store = MemStore::new();
    let p = policy(r#"{"requests_per_minute": 6000}"#);
    let mut root = FakeRoot::new(store.clone(), NOW);
    let mut leader = Leader::new("vm-1".into(), opts());
    // One request through Admit marks the key for a lease.
    let (mut f, mut h) = admitted_by_redis(&p, &store, "r-0");
    respond(&mut f, &mut h, 10);

    leader.tick(&mut root);
    let (token, method, sync) = root.calls.last().cloned().unwrap();
    assert_eq!(method, QuotaMethod::Sync);
    let (req, answer) = grant_all(&sync, 50, NOW);
    // The first request's audit numbering settled this Envoy's replica id
    // before the leader's first tick: the quota service and the audit
    // records name the Envoy alike (the records add their worker's number).
    assert_eq!(
        Some(format!("{}/1", req.replica)),
        h.last_audit().unwrap().origin.map(|o| o.envoy)
    );
    assert_ne!(req.replica, "vm-1");
    assert_eq!(req.buckets.len(), 1);
    let first_seq = req.buckets[0].seq;
    assert_eq!(req.buckets[0].consumed, 0, "nothing spent from a lease yet");
    leader.on_response(&mut root, &p, token, Some(&answer));
    assert_eq!(slot(&store, Metric::Requests).value, 50.0);

    // Ten requests from the lease: no call to the quota service.
    for i in 1..=10 {
        let mut f = flow(&p);
        let mut h = host(&store, &format!("r-{i}"), NOW + 10);
        assert_eq!(
            send(&mut f, &mut h),
            Decision::Continue,
            "served from the lease"
        );
        assert!(h.quota_calls.is_empty());
        respond(&mut f, &mut h, 10);
    }
    assert_eq!(slot(&store, Metric::Requests).value, 40.0);
    assert_eq!(slot(&store, Metric::Requests).consumed, 10.0);

    // The next sync is lost: its ten requests stay in flight, under its seq.
    root.now_ms = NOW + 100;
    leader.tick(&mut root);
    let (lost, _, sync) = root.calls.last().cloned().unwrap();
    let req = pb::SyncRequest::decode(sync.as_slice()).unwrap();
    assert_eq!(req.buckets[0].consumed, 10);
    let lost_seq = req.buckets[0].seq;
    assert!(lost_seq > first_seq);
    leader.on_response(&mut root, &p, lost, None);
    assert_eq!(slot(&store, Metric::Requests).inflight, 10.0);

    // Two more requests meanwhile, then the retry: same seq, same ten.
    for i in 11..=12 {
        let mut f = flow(&p);
        let mut h = host(&store, &format!("r-{i}"), NOW + 150);
        send(&mut f, &mut h);
        respond(&mut f, &mut h, 10);
    }
    root.now_ms = NOW + 200;
    leader.tick(&mut root);
    let (retry, _, sync) = root.calls.last().cloned().unwrap();
    let (req, answer) = grant_all(&sync, 50, NOW + 200);
    assert_eq!(
        (req.buckets[0].seq, req.buckets[0].consumed),
        (lost_seq, 10)
    );
    leader.on_response(&mut root, &p, retry, Some(&answer));
    let s = slot(&store, Metric::Requests);
    // The new lease of 50, less the two spent since the snapshot, which the
    // next sync reports.
    assert_eq!(
        (s.value, s.consumed, s.inflight, s.seq),
        (48.0, 2.0, 0.0, 0)
    );
}

#[test]
fn a_key_revoked_in_redis_is_refused_at_its_headers() {
    let store = MemStore::new();
    let p = policy(r#"{"requests_per_minute": 60}"#);
    let mut root = FakeRoot::new(store.clone(), NOW);
    let mut leader = Leader::new("vm-1".into(), opts());
    let _cold = admitted_by_redis(&p, &store, "r-0");
    leader.tick(&mut root);
    let (token, _, sync) = root.calls.last().cloned().unwrap();
    let (_, answer) = grant_all(&sync, 5, NOW);
    let mut answer = pb::SyncResponse::decode(answer.as_slice()).unwrap();
    answer.revoked_keys = vec![crate::vkey::sha256(KEY.as_bytes()).to_vec()];
    answer.revocation_epoch = 7;
    leader.on_response(&mut root, &p, token, Some(&answer.encode_to_vec()));

    let mut f = flow(&p);
    let mut h = host(&store, "r-1", NOW + 50);
    match f.on_request_headers(&mut h, false) {
        Decision::Reply(r) => {
            assert_eq!(r.status, 401);
            assert!(
                r.body.contains("this API key has been revoked"),
                "{}",
                r.body
            );
        }
        other => panic!("expected 401, got {other:?}"),
    }
    // The next sync asks only for revocations after epoch 7.
    crate::meter::shared::admit(
        crate::meter::shared::Ctx {
            plane: &root,
            clock: crate::meter::Clock {
                now: NOW + 200,
                utc_offset_min: 0,
            },
            opts: opts(),
        },
        &crate::meter::buckets_for(&p, &p.key(0).unwrap(), None),
        &crate::meter::Demand::one_request(),
        "x",
        &[],
    )
    .unwrap();
    root.now_ms = NOW + 200;
    leader.tick(&mut root);
    let (_, _, sync) = root.calls.last().cloned().unwrap();
    assert_eq!(
        pb::SyncRequest::decode(sync.as_slice())
            .unwrap()
            .revocation_epoch,
        7
    );
}

#[test]
fn an_unreachable_store_follows_each_limits_on_store_failure() {
    let store = MemStore::new();
    // A per-minute limit (default: local) and a budget (default: closed).
    let p = policy(r#"{"requests_per_minute": 60, "budget_usd_per_day": 10}"#);
    let mut f = flow(&p);
    let mut h = host(&store, "down-1", NOW);
    h.quota_unreachable = true;
    match send(&mut f, &mut h) {
        Decision::Reply(r) => {
            assert_eq!(r.status, 503);
            assert_eq!(r.header("x-should-retry"), Some("true"));
            assert!(
                r.body
                    .contains("key:k:budget_usd_per_day refuses until it is back"),
                "{}",
                r.body
            );
        }
        other => panic!("expected 503, got {other:?}"),
    }
    assert_eq!(
        h.last_audit().unwrap().reason,
        crate::audit::Reason::QuotaStoreUnavailable
    );

    // Budget set to open: counted nowhere; the minute limit meters on the
    // fallback at limit / replicas (4 replicas last seen: 15 per minute).
    let p = policy(
        r#"{"requests_per_minute": 60, "budget_usd_per_day": {"limit": 10, "on_store_failure": "open"}}"#,
    );
    store.set(REPLICAS_KEY, &4u64.to_le_bytes(), 0).unwrap();
    let mut served = 0;
    for i in 0..20 {
        let mut f = flow(&p);
        let mut h = host(&store, &format!("down-{i}"), NOW);
        h.quota_unreachable = true;
        match send(&mut f, &mut h) {
            Decision::Continue => {
                served += 1;
                assert_eq!(
                    h.last_audit().unwrap().reason,
                    crate::audit::Reason::Uncounted
                );
            }
            Decision::Reply(r) => {
                assert_eq!(r.status, 429, "{}", r.body);
                assert!(
                    r.body.contains("requests_per_minute limit of 60"),
                    "{}",
                    r.body
                );
            }
            Decision::Pause => panic!("nothing to wait for"),
        }
    }
    assert_eq!(served, 15, "60 per minute over 4 replicas");
    // What the fallback admitted is pushed as consumption once the store is back.
    assert_eq!(slot(&store, Metric::Requests).consumed, 15.0);
}

#[test]
fn a_client_gone_while_redis_decides_gets_everything_back_if_it_was_admitted() {
    let store = MemStore::new();
    let p = policy(r#"{"output_tokens_per_minute": 10000}"#);
    let mut f = flow(&p);
    let mut h = host(&store, "gone-1", NOW);
    assert_eq!(send(&mut f, &mut h), Decision::Pause);
    let admit = h.quota_calls[0].1.clone();
    f.on_end(&mut h);
    assert_eq!(store.queued(Queue::Cancel), 1);

    let mut root = FakeRoot::new(store.clone(), NOW);
    let mut leader = Leader::new("vm-1".into(), opts());
    leader.tick(&mut root);
    let (token, method, repeat) = root.calls[0].clone();
    assert_eq!(
        (method, repeat.clone()),
        (QuotaMethod::Admit, admit.clone())
    );
    leader.on_response(&mut root, &p, token, Some(&admitted(&admit)));
    let settle =
        pb::SettleRequest::decode(store.dequeue(Queue::Settle).unwrap().as_slice()).unwrap();
    assert_eq!(settle.request_id, "gone-1");
    assert_eq!(settle.deltas[0].amount, -100);
}

#[test]
fn a_failed_admit_is_repeated_once_then_the_limits_failure_mode_decides() {
    let store = MemStore::new();
    let p = policy(r#"{"requests_per_minute": 60}"#);
    let mut f = flow(&p);
    let mut h = host(&store, "retry-1", NOW);
    assert_eq!(send(&mut f, &mut h), Decision::Pause);
    let first = h.quota_calls[0].1.clone();
    assert_eq!(
        f.on_quota_response(&mut h, None),
        Some(Decision::Pause),
        "still waiting: the call is repeated"
    );
    assert_eq!(h.quota_calls.len(), 2);
    assert_eq!(
        h.quota_calls[1],
        (QuotaMethod::Admit, first),
        "the same Admit"
    );
    // The repeat fails too: per-minute limits meter locally.
    assert_eq!(f.on_quota_response(&mut h, None), Some(Decision::Continue));
    assert_eq!(h.quota_calls.len(), 2, "repeated once only");
}

#[test]
fn leases_follow_the_demand_redis_served_in_base_units_and_strict_buckets_take_none() {
    let store = MemStore::new();
    let p = policy(
        r#"{"output_tokens_per_minute": 100000, "budget_usd_per_day": 10,
            "requests_per_minute": {"limit": 600, "strict": true}}"#,
    );
    for i in 0..3 {
        let mut f = flow(&p);
        let mut h = host(&store, &format!("d-{i}"), NOW);
        send(&mut f, &mut h);
        let request = h.quota_calls[0].1.clone();
        f.on_quota_response(&mut h, Some(&admitted(&request)));
        respond(&mut f, &mut h, 100);
    }
    let mut root = FakeRoot::new(store.clone(), NOW);
    let mut leader = Leader::new("vm-1".into(), opts());
    leader.tick(&mut root);
    let (_, _, sync) = root.calls.last().cloned().unwrap();
    let req = pb::SyncRequest::decode(sync.as_slice()).unwrap();
    let want = |id: &str| {
        req.buckets
            .iter()
            .find(|b| b.bucket.as_ref().unwrap().id == id)
            .map(|b| b.want)
    };
    // Three requests of 100 output tokens each, served by Redis: a lease
    // of 1.65 x the demand per period (a moving average: 150), not the 100
    // a single request needs.
    assert_eq!(want("key:k:output_tokens_per_minute"), Some(248));
    // USD in micro-dollars: each request reserves $0.00051 (10 input
    // tokens at $1/M estimated + 100 output at $5/M), never a whole dollar.
    let usd = want("key:k:budget_usd_per_day").unwrap();
    assert!((800..=1_300).contains(&usd), "{usd}");
    // Strict: no lease, and nothing to push.
    assert_eq!(want("key:k:requests_per_minute"), None);
}

#[test]
fn float_sums_of_micro_dollars_travel_as_the_whole_units_they_are() {
    assert_eq!(whole_units(430.999_999_999_999_94), 431.0);
    assert_eq!(whole_units(430.4), 430.0);
    assert_eq!(whole_units(-2.000_000_000_1), -2.0);
}

/// The Sync calls the leader started, decoded.
fn syncs(root: &FakeRoot) -> Vec<(u32, pb::SyncRequest)> {
    root.calls
        .iter()
        .filter(|(_, method, _)| *method == QuotaMethod::Sync)
        .map(|(token, _, m)| (*token, pb::SyncRequest::decode(m.as_slice()).unwrap()))
        .collect()
}

#[test]
fn a_lost_sync_answer_does_not_hold_back_the_other_buckets_reports() {
    // Found by quota/tests/replicas.rs (a_large_request_limit_shared_evenly_
    // by_five_replicas, seed 13): a Sync whose answer is lost waits for its
    // timeout (admit_timeout_ms, 1 s). Redis reclaims a lease 3T after it
    // expires (600 ms after the grant). A bucket spent meanwhile and not in
    // the lost Sync must still be reported before that, or Redis hands the
    // units it spent out a second time.
    let store = MemStore::new();
    let p = policy(r#"{"requests_per_minute": 6000, "tokens_per_day": 1000000}"#);
    let mut root = FakeRoot::new(store.clone(), NOW);
    let mut leader = Leader::new("vm-1".into(), opts());
    let answer = |leader: &mut Leader, root: &mut FakeRoot, at: u64| {
        root.now_ms = at;
        let (token, sync) = syncs(root).pop().unwrap();
        let (_, answer) = grant_all(&sync.encode_to_vec(), 500, at);
        leader.on_response(root, &p, token, Some(&answer));
    };
    let lease_served = |id: &str, at: u64| {
        let mut f = flow(&p);
        let mut h = host(&store, id, at);
        assert_eq!(send(&mut f, &mut h), Decision::Continue, "{id} from leases");
        (f, h)
    };
    // A cold request through Admit asks for leases of both buckets.
    let _cold = admitted_by_redis(&p, &store, "r-0");
    leader.tick(&mut root);
    answer(&mut leader, &mut root, NOW + 1);

    let (mut f1, mut h1) = lease_served("r-1", NOW + 10);
    root.now_ms = NOW + 100;
    leader.tick(&mut root);
    // Both leases renewed until NOW + 401.
    answer(&mut leader, &mut root, NOW + 101);

    // r-1 used fewer tokens than it reserved: only the quota has something
    // to report, and this Sync's answer is lost.
    h1.now_ms = NOW + 150;
    respond(&mut f1, &mut h1, 10);
    root.now_ms = NOW + 200;
    leader.tick(&mut root);
    let (_, lost) = syncs(&root).pop().unwrap();
    let ids: Vec<&str> = lost
        .buckets
        .iter()
        .map(|b| b.bucket.as_ref().unwrap().id.as_str())
        .collect();
    assert_eq!(ids, ["key:k:tokens_per_day"]);

    // r-2 spends the requests lease, which Redis reclaims at NOW + 701.
    let _r2 = lease_served("r-2", NOW + 250);
    let sent = syncs(&root).len();
    for at in [NOW + 300, NOW + 400, NOW + 500, NOW + 600, NOW + 700] {
        root.now_ms = at;
        leader.tick(&mut root);
    }
    let reported = syncs(&root)[sent..].iter().any(|(_, s)| {
        s.buckets.iter().any(|b| {
            b.bucket.as_ref().unwrap().id == "key:k:requests_per_minute" && b.consumed == 1
        })
    });
    assert!(
        reported,
        "the requests bucket's consumption waited behind the lost Sync"
    );
}

/// A stream admitted by Redis and cut mid-way: the Settle sent to the quota
/// service carries exactly the figures of the last record Envoy logged.
#[test]
fn a_stream_cut_mid_way_settles_in_redis_with_what_its_record_says() {
    let store = MemStore::new();
    let p = policy(
        r#"{"requests_per_minute": 60, "output_tokens_per_minute": 10000, "tokens_per_day": 100000, "budget_usd_per_day": 10}"#,
    );
    let mut f = flow(&p);
    let mut h = host(&store, "cut-1", NOW).with_body(
        r#"{"model":"claude-haiku-4-5","max_tokens":100,"stream":true,"messages":[{"role":"user","content":"hi"}]}"#,
    );
    assert_eq!(send(&mut f, &mut h), Decision::Pause);
    let (_, request) = h.quota_calls[0].clone();
    assert_eq!(
        f.on_quota_response(&mut h, Some(&admitted(&request))),
        Some(Decision::Continue)
    );
    h.response_headers = vec![
        (":status".into(), b"200".to_vec()),
        ("content-type".into(), b"text/event-stream".to_vec()),
    ];
    f.on_response_headers(&mut h, false);
    let chunks = [
        (0, "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"model\":\"claude-haiku-4-5\",\"usage\":{\"input_tokens\":5,\"output_tokens\":1}}}\n\n"),
        (10, "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"three \"}}\n\n"),
        (250, "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"more words\"}}\n\n"),
    ];
    for (at, data) in chunks {
        h.now_ms = NOW + at;
        h.response_chunk = data.as_bytes().to_vec();
        f.on_response_body(&mut h, data.len(), false);
    }
    let logged = h.last_audit().unwrap();
    f.on_end(&mut h);
    assert_eq!(
        (logged.complete, logged.tokens.input, logged.tokens.output),
        (false, Some(5), Some(3))
    );
    // 5 × $1/M + 3 × $5/M.
    assert!((logged.cost_usd.unwrap() - 0.00002).abs() < 1e-12);
    let (method, settle) = h.quota_calls.last().unwrap().clone();
    assert_eq!(method, QuotaMethod::Settle);
    let settle = pb::SettleRequest::decode(settle.as_slice()).unwrap();
    let deltas: Vec<(String, i64)> = settle
        .deltas
        .iter()
        .map(|c| (c.bucket.as_ref().unwrap().id.clone(), c.amount))
        .collect();
    // Reserved: 8 input ("hi" and framing), 100 output, $0.000508.
    assert_eq!(
        deltas,
        [
            ("key:k:output_tokens_per_minute".to_string(), 3 - 100),
            ("key:k:tokens_per_day".to_string(), (5 + 3) - (8 + 100)),
            ("key:k:budget_usd_per_day".to_string(), 20 - 508),
        ]
    );
}

#[test]
fn a_shadow_limit_redis_refuses_is_audited_and_left_out_of_the_next_admission() {
    let p = policy(
        r#"{"requests_per_minute": {"limit": 1, "shadow": true}, "tokens_per_day": 100000}"#,
    );
    let store = MemStore::new();
    let mut f = flow(&p);
    let mut h = host(&store, "r-shadow", NOW);
    assert_eq!(send(&mut f, &mut h), Decision::Pause);
    let first = pb::AdmitRequest::decode(h.quota_calls[0].1.as_slice()).unwrap();
    assert_eq!(first.charges.len(), 2);
    let refused = pb::AdmitResponse {
        outcome: Outcome::Limited as i32,
        refused: 0,
        wait_ms: 60_000,
        now_ms: NOW as i64,
        ..Default::default()
    }
    .encode_to_vec();
    // Redis refuses the shadow limit: the request is asked for again
    // without it (the quota service checks every bucket it is sent).
    assert_eq!(
        f.on_quota_response(&mut h, Some(&refused)),
        Some(Decision::Pause)
    );
    let second = pb::AdmitRequest::decode(h.quota_calls[1].1.as_slice()).unwrap();
    let ids: Vec<String> = second
        .charges
        .iter()
        .map(|c| c.bucket.as_ref().unwrap().id.clone())
        .collect();
    assert_eq!(ids, ["key:k:tokens_per_day"]);
    let request = h.quota_calls[1].1.clone();
    assert_eq!(
        f.on_quota_response(&mut h, Some(&admitted(&request))),
        Some(Decision::Continue)
    );
    let rec = h.last_audit().unwrap();
    assert_eq!(rec.would_deny, ["key:k:requests_per_minute"]);
    assert_eq!(rec.reason, crate::audit::Reason::Ok);
}

#[test]
fn a_key_used_once_stops_syncing_once_its_lease_is_gone() {
    // Found by make bench-scale: 20,000 keys used once each went on
    // syncing, forever (a zero grant still carries an expiry, which looked
    // like a lease to renew): 7.7 Redis calls per later request.
    let store = MemStore::new();
    let p = policy(r#"{"output_tokens_per_minute": 100000}"#);
    let (mut f, mut h) = admitted_by_redis(&p, &store, "once");
    respond(&mut f, &mut h, 100);
    let mut root = FakeRoot::new(store.clone(), NOW);
    let mut leader = Leader::new("vm-1".into(), opts());
    let mut at = NOW;
    // Each Sync answered as Redis would: the lease asked for (while the
    // demand decays to nothing), and an expiry even when that is none.
    let answer_last = |leader: &mut Leader, root: &mut FakeRoot, at: u64, seen: usize| {
        let all = syncs(root);
        if all.len() > seen {
            let (token, sync) = all.last().cloned().unwrap();
            let lease = sync.buckets.first().map_or(0, |b| b.want);
            let (_, answer) = grant_all(&sync.encode_to_vec(), lease, at);
            leader.on_response(root, &p, token, Some(&answer));
        }
    };
    // `ticks` sync periods of 100 ms, each Sync answered.
    let run = |leader: &mut Leader, root: &mut FakeRoot, at: &mut u64, ticks: usize| {
        for _ in 0..ticks {
            *at += 100;
            root.now_ms = *at;
            let seen = syncs(root).len();
            leader.tick(root);
            answer_last(leader, root, *at, seen);
        }
    };
    run(&mut leader, &mut root, &mut at, 30);
    let total = syncs(&root).len();
    assert!(total >= 1, "the request was reported");
    // Three seconds after the request: idle, nothing more to tell Redis.
    run(&mut leader, &mut root, &mut at, 20);
    assert_eq!(syncs(&root).len(), total, "an idle key keeps syncing");
}
