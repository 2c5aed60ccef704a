//! Failure policy: a trapped VM (test-only filter build) fails only the
//! request in flight; Envoy reloads the VM (FAIL_RELOAD), other requests keep
//! flowing, and bucket balances in shared data are intact.

use std::path::Path;
use tollgate_e2e::{policy, Gateway, Options};

const KEY: &str = "tg-failure-alice";
const MSG: &str =
    r#"{"model":"claude-haiku-4-5","max_tokens":20,"messages":[{"role":"user","content":"hi"}]}"#;

#[test]
fn a_trapped_vm_is_reloaded_and_balances_survive() {
    let trap = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/tollgate-trap.wasm");
    assert!(
        trap.exists(),
        "{} missing: make test builds it (make wasm-trap)",
        trap.display()
    );
    let p = policy(
        r#"{"models": ["claude-*"], "limits": {"requests_per_minute": 6}}"#,
        &[("alice", KEY, "")],
    );
    let gw = Gateway::start_with(
        &p,
        Options {
            concurrency: 1,
            wasm: Some(trap),
            ..Options::default()
        },
    );
    for expected in ["5", "4", "3"] {
        let r = gw.post("/v1/messages", Some(KEY), MSG);
        assert_eq!(r.status(), 200);
        assert_eq!(
            r.headers()["anthropic-ratelimit-requests-remaining"],
            expected
        );
    }

    let trapped = gw.post_with(
        "/v1/messages",
        &[("x-api-key", KEY), ("x-tollgate-test-trap", "1")],
        MSG,
    );
    assert!(
        trapped.status().is_server_error(),
        "the request in flight fails closed, got {}",
        trapped.status()
    );
    assert!(
        gw.mock_requests().len() == 3,
        "the trapped request never reached the provider"
    );

    // The worker's VM is reloaded (after Envoy's reload backoff); the next
    // requests flow and the balance continues from shared data: 6/min
    // refills one request per 10 s, so a reset would show 5, not 2.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let r = loop {
        let r = gw.post("/v1/messages", Some(KEY), MSG);
        if r.status() == 200 {
            break r;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no recovery after the trap: {}",
            r.status()
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    let remaining: u32 = r.headers()["anthropic-ratelimit-requests-remaining"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(remaining, 2, "balances survived the VM reload");
    let log = gw.log("envoy");
    assert!(
        log.contains("panic: panicked at") || log.contains("panic:"),
        "the panic hook logged at critical level:\n{log}"
    );
}
