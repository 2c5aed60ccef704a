//! The host-call budget: what one allowed, non-streamed request costs in
//! proxy-wasm host calls, phase by phase. Each host call crosses from V8
//! into Envoy (~1–2 µs in the benchmark's profile), so this count is the
//! floor of the filter's cost that no wasm-side optimisation removes.
#![allow(clippy::unwrap_used, clippy::panic)]

use super::*;
use crate::testing::FakeHost;

/// The most host calls an allowed non-streamed request may make, all
/// phases together, for a key with its own buckets (`make bench`'s S1
/// prints the same breakdown from `flow_cost`). Raise it only with a
/// reason in the commit.
pub const HOST_CALL_BUDGET: u32 = 12;

/// Each pool the key draws from adds its record's read and CAS write at
/// admission and again at settlement.
pub const CALLS_PER_POOL: u32 = 4;

const KEY: &str = "tg-budget-key";

/// A key as the README's example declares them: per-minute buckets on the
/// key, prices for the model, and with `team` a team pool with a daily
/// budget.
fn policy(team: bool) -> Rc<Policy> {
    let team = if team { r#", "team": "payments""# } else { "" };
    let json = format!(
        r#"{{
        "version": 1,
        "defaults": {{ "models": ["claude-*"],
          "limits": {{ "requests_per_minute": 60, "input_tokens_per_minute": 100000,
                       "output_tokens_per_minute": 20000 }} }},
        "pools": {{ "team:payments": {{ "budget_usd_per_day": 50 }} }},
        "keys": [ {{ "id": "alice", "key_sha256": "{}"{team} }} ],
        "prices": {{ "claude-sonnet-*": {{ "input": 3, "output": 15 }} }}
      }}"#,
        crate::vkey::sha256_hex(KEY)
    );
    Rc::new(
        crate::policy::compile(json.as_bytes(), "test.json", 0)
            .unwrap()
            .0,
    )
}

/// Host calls made by `f`, by method.
fn calls_of(host: &mut FakeHost, f: impl FnOnce(&mut FakeHost)) -> Vec<(&'static str, u32)> {
    host.calls.borrow_mut().clear();
    f(host);
    host.calls.borrow().iter().map(|(k, v)| (*k, *v)).collect()
}

fn total(calls: &[(&'static str, u32)]) -> u32 {
    calls.iter().map(|(_, n)| n).sum()
}

/// Drives allowed requests through every phase and returns the host calls
/// of each phase of the second one: the steady state, where the key's and
/// pool's records exist (the first request of a key also looks for records
/// of the previous layout to migrate, once).
pub fn allowed_request_calls(team: bool) -> Vec<(&'static str, Vec<(&'static str, u32)>)> {
    let store = crate::testing::MemStore::new();
    let policy = policy(team);
    one_request(&policy, &store, "req-1");
    one_request(&policy, &store, "req-2")
}

fn one_request(
    policy: &Rc<Policy>,
    store: &Rc<crate::testing::MemStore>,
    id: &str,
) -> Vec<(&'static str, Vec<(&'static str, u32)>)> {
    let body = r#"{"model":"claude-sonnet-4-5","max_tokens":100,"messages":[{"role":"user","content":"hello there"}]}"#;
    let response = br#"{"id":"msg_1","type":"message","model":"claude-sonnet-4-5","usage":{"input_tokens":12,"output_tokens":30}}"#;
    let mut flow = RequestFlow::new(policy.clone());
    let mut host = FakeHost::new()
        .with_store(store.clone())
        .with_request_header(":path", "/v1/messages")
        .with_request_header(":method", "POST")
        .with_request_header("content-type", "application/json")
        .with_request_header("x-request-id", id)
        .with_request_header("x-api-key", KEY)
        .with_body(body)
        .with_response_header(":status", "200")
        .with_response_header("content-type", "application/json");
    let mut phases = Vec::new();
    let mut decision = Decision::Continue;
    phases.push((
        "request headers",
        calls_of(&mut host, |h| decision = flow.on_request_headers(h, false)),
    ));
    assert_eq!(decision, Decision::Pause);
    let n = host.body_len();
    phases.push((
        "request body",
        calls_of(&mut host, |h| decision = flow.on_request_body(h, n, true)),
    ));
    assert_eq!(decision, Decision::Continue);
    phases.push((
        "response headers",
        calls_of(&mut host, |h| {
            flow.on_response_headers(h, false);
        }),
    ));
    host.response_chunk = response.to_vec();
    phases.push((
        "response body",
        calls_of(&mut host, |h| {
            flow.on_response_body(h, response.len(), true);
        }),
    ));
    phases.push(("log", calls_of(&mut host, |h| flow.on_end(h))));
    let rec = host.last_audit().unwrap();
    assert_eq!((rec.decision, rec.complete), (Outcome::Allowed, true));
    phases
}

fn check_budget(team: bool, budget: u32) {
    let phases = allowed_request_calls(team);
    let all: u32 = phases.iter().map(|(_, c)| total(c)).sum();
    let breakdown: Vec<String> = phases
        .iter()
        .map(|(phase, c)| format!("{phase}: {} {c:?}", total(c)))
        .collect();
    assert!(
        all <= budget,
        "{all} host calls, budget {budget}:\n{}",
        breakdown.join("\n")
    );
    println!("{all} host calls\n{}", breakdown.join("\n"));
}

#[test]
fn an_allowed_non_streamed_request_stays_within_the_host_call_budget() {
    check_budget(false, HOST_CALL_BUDGET);
}

#[test]
fn a_team_pool_adds_only_its_own_records_calls() {
    check_budget(true, HOST_CALL_BUDGET + CALLS_PER_POOL);
}
