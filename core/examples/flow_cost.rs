//! Cost of one request through the core, phase by phase, with the
//! benchmark's S1 (16 KB request, recorded 1 KB response), S2 (300-event
//! stream) and S5 (900 KB request) shapes and a 10,002-key policy, and the
//! request inspector (token estimate) alone on S1's body. `make bench` runs it beside the
//! Envoy figures: it says which phase of the filter's own work dominates
//! (wasm in V8 runs the same code somewhat slower than native).
//!
//! Natively: `cargo run --release -p tollgate-core --example flow_cost [iterations] [s1|s2|s5|estimate]`;
//! in V8, as Envoy runs the filter: `make bench` builds it for wasm32-wasip1
//! and runs it under Node.js (`scripts/run-wasi.mjs`).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::rc::Rc;
use std::time::Instant;
use tollgate_core::flow::RequestFlow;
use tollgate_core::host::Host;
use tollgate_core::policy;
use tollgate_core::testing::{FakeHost, MemStore};

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures");

fn bench_policy() -> Vec<u8> {
    let mut keys = Vec::new();
    for i in 0..10_000 {
        keys.push(format!(
            r#"{{"id":"key-{i}","key_sha256":"{}","team":"team-{}"}}"#,
            tollgate_core::vkey::sha256_hex(&format!("tg-bench-{i}")),
            i % 50
        ));
    }
    keys.push(format!(
        r#"{{"id":"bench","key_sha256":"{}","team":"bench","limits":{{"requests_per_minute":100000000,"input_tokens_per_minute":1000000000000,"output_tokens_per_minute":1000000000000}}}}"#,
        tollgate_core::vkey::sha256_hex("tg-bench")
    ));
    format!(
        r#"{{"version":1,"defaults":{{"models":["claude-*","gpt-*"]}},"keys":[{}],"prices":{{"claude-*":{{"input":3,"output":15}}}}}}"#,
        keys.join(",")
    )
    .into_bytes()
}

#[derive(Default)]
struct Phases {
    names: Vec<&'static str>,
    ns: Vec<u128>,
    /// Host calls made in each phase (what the fake host counted).
    calls: Vec<u64>,
}

impl Phases {
    fn add(&mut self, i: usize, name: &'static str, t: Instant, host: &FakeHost) -> Instant {
        let elapsed = t.elapsed().as_nanos();
        if self.names.len() <= i {
            self.names.push(name);
            self.ns.push(0);
            self.calls.push(0);
        }
        self.ns[i] += elapsed;
        self.calls[i] += u64::from(host.calls.take().values().sum::<u32>());
        Instant::now()
    }
}

fn run(label: &str, iterations: u32, body: &str, response: &[u8], stream: bool) {
    let (policy, _) = policy::compile(&bench_policy(), "bench", 0).unwrap();
    let policy = Rc::new(policy);
    let store = MemStore::new();
    let chunks: Vec<&[u8]> = if stream {
        response.split_inclusive(|b| *b == b'\n').collect()
    } else {
        vec![response]
    };
    let mut p = Phases::default();
    for n in 0..iterations {
        let mut host = FakeHost::new()
            .with_store(store.clone())
            .with_request_header(":path", "/v1/messages")
            .with_request_header(":method", "POST")
            .with_request_header("content-type", "application/json")
            .with_request_header("x-api-key", "tg-bench")
            .with_request_header("x-request-id", &format!("req-{n}"))
            .with_body(body)
            .with_response_header(":status", "200")
            .with_response_header(
                "content-type",
                if stream {
                    "text/event-stream"
                } else {
                    "application/json"
                },
            )
            .at(1_795_000_000_000 + u64::from(n));
        let t = Instant::now();
        let mut flow = RequestFlow::new(policy.clone());
        flow.on_request_headers(&mut host, false);
        let t = p.add(0, "request headers", t, &host);
        let size = host.body_len();
        flow.on_request_body(&mut host, size, true);
        let t = p.add(1, "request body", t, &host);
        flow.on_response_headers(&mut host, false);
        let mut t = p.add(2, "response headers", t, &host);
        for (i, c) in chunks.iter().enumerate() {
            host.response_chunk = c.to_vec();
            flow.on_response_body(&mut host, c.len(), i + 1 == chunks.len());
        }
        t = p.add(3, "response body", t, &host);
        flow.on_end(&mut host);
        p.add(4, "end", t, &host);
        assert!(host.now_ms() > 0 && flow.tokens().output.is_some());
    }
    let total: u128 = p.ns.iter().sum();
    let calls: u64 = p.calls.iter().sum();
    println!(
        "{label}: {:.1} us per request, {:.1} host calls",
        total as f64 / 1e3 / f64::from(iterations),
        calls as f64 / f64::from(iterations)
    );
    for ((name, ns), calls) in p.names.iter().zip(&p.ns).zip(&p.calls) {
        println!(
            "  {name:<18} {:8.2} us {:6.1} host calls",
            *ns as f64 / 1e3 / f64::from(iterations),
            *calls as f64 / f64::from(iterations)
        );
    }
}

/// The request inspector alone (parse + input-token estimate): the best of
/// 10 batches, so that other work on the machine does not count.
fn estimate(label: &str, body: &str, iterations: u32) {
    let batch = (iterations / 10).max(1);
    let mut best = f64::MAX;
    let mut tokens = 0;
    for _ in 0..10 {
        let t = Instant::now();
        for _ in 0..batch {
            let info = tollgate_core::usage::inspect_request(
                tollgate_core::route::Route::AnthropicMessages,
                body.as_bytes(),
            )
            .unwrap();
            tokens = info.input_estimate;
        }
        best = best.min(t.elapsed().as_nanos() as f64 / f64::from(batch));
    }
    println!(
        "estimate of {label}'s {} byte body ({tokens} tokens): {:.1} us, {:.2} ns per byte",
        body.len(),
        best / 1e3,
        best / body.len() as f64
    );
}

fn main() {
    let iterations = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(2_000);
    let only = std::env::args().nth(2).unwrap_or_default();
    let filler =
        "Summarise the attached incident report and list the three most likely root causes. "
            .repeat(200);
    let s1 = format!(
        r#"{{"model":"claude-sonnet-4-5","max_tokens":1024,"messages":[{{"role":"user","content":"{}"}}]}}"#,
        &filler[..16_000]
    );
    let s2 = r#"{"model":"claude-sonnet-4-5","max_tokens":1024,"stream":true,"messages":[{"role":"user","content":"Explain rate limiting."}]}"#;
    let read = |f: &str| std::fs::read(format!("{FIXTURES}/{f}")).unwrap();
    if only.is_empty() || only == "s5" {
        let s5 = format!(
            r#"{{"model":"claude-sonnet-4-5","max_tokens":256,"messages":[{{"role":"user","content":"{}"}}]}}"#,
            format!("{} ", "x".repeat(80)).repeat(11_000)
        );
        run(
            "S5 900 KB request",
            iterations / 20,
            &s5,
            &read("anthropic/messages-basic.response.json"),
            false,
        );
    }
    if only.is_empty() || only == "estimate" {
        // The request inspector alone (parse + input-token estimate) on S1's
        // and S5's bodies.
        estimate("S1", &s1, iterations);
        let s5 = format!(
            r#"{{"model":"claude-sonnet-4-5","max_tokens":256,"messages":[{{"role":"user","content":"{}"}}]}}"#,
            format!("{} ", "x".repeat(80)).repeat(11_000)
        );
        estimate("S5", &s5, (iterations / 20).max(1));
    }
    if only.is_empty() || only == "s1" {
        run(
            "S1 16 KB request / 1 KB response",
            iterations,
            &s1,
            &read("anthropic/messages-basic.response.json"),
            false,
        );
    }
    if only.is_empty() || only == "s2" {
        run(
            "S2 stream of 300 events",
            iterations,
            s2,
            &read("anthropic/messages-stream-long.response.sse"),
            true,
        );
    }
}
