//! Failover across several Anthropic keys, end to end: `tollgate run` with
//! two `--anthropic-key-env` puts each key on its own Envoy cluster with its
//! own injected credential, and the provider's 429 (or 529) on the first is
//! retried on the second; the client sees one answer, charged and audited
//! once. The mock provider knows both keys and rate-limits the one named in
//! `x-mock-exchange-for-key`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use serde_json::Value;
use std::os::unix::fs::PermissionsExt;
use tollgate_e2e::{policy, Gateway, Options};

const ALICE: &str = "tg-failover-alice";
const FIRST: &str = "sk-ant-mock-first-workspace";
const SECOND: &str = "sk-ant-mock-second-workspace";
const SONNET: &str =
    r#"{"model":"claude-sonnet-4-5","max_tokens":20,"messages":[{"role":"user","content":"hi"}]}"#;

fn two_keys() -> Gateway {
    Gateway::start_with(
        &policy(
            r#"{"models": ["claude-*"], "limits": {"requests_per_minute": 3}}"#,
            &[("alice", ALICE, "")],
        ),
        Options {
            extra_args: [
                "--anthropic-key-env",
                "TG_TEST_FIRST_KEY",
                "--anthropic-key-env",
                "TG_TEST_SECOND_KEY",
            ]
            .map(String::from)
            .to_vec(),
            env: vec![
                ("TG_TEST_FIRST_KEY".into(), FIRST.into()),
                ("TG_TEST_SECOND_KEY".into(), SECOND.into()),
            ],
            ..Options::default()
        },
    )
}

/// The real keys the mock received for the requests with this id, in order.
fn keys_seen(gw: &Gateway, id: &str) -> Vec<String> {
    gw.mock_requests()
        .iter()
        .filter(|r| r["headers"]["x-request-id"] == id)
        .map(|r| r["headers"]["x-api-key"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn the_first_keys_429_is_retried_on_the_second_and_charged_once() {
    let gw = two_keys();
    let send = |id: &str, control: Option<&str>| {
        let mut h = vec![("x-api-key", ALICE), ("x-request-id", id)];
        if let Some(c) = control {
            h.push(("x-mock-exchange-for-key", c));
        }
        gw.post_with("/v1/messages", &h, SONNET)
    };

    // Traffic goes out with the first key while it is not refused.
    let r = send("f-1", None);
    assert_eq!(r.status(), 200);
    assert_eq!(keys_seen(&gw, "f-1"), [FIRST]);

    // The first key's organization is at its limit: the same request goes
    // out again with the second key, and the client only sees its answer.
    let r = send("f-2", Some(&format!("{FIRST}=error-rate-limited")));
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()["anthropic-ratelimit-requests-remaining"],
        "1",
        "one request counted for f-2, as for f-1"
    );
    let body: Value = r.json().unwrap();
    assert_eq!(body["type"], "message", "{body}");
    assert_eq!(keys_seen(&gw, "f-2"), [FIRST, SECOND]);
    let records: Vec<Value> = {
        gw.audit_record("f-2");
        gw.audit_records()
            .into_iter()
            .filter(|r| r["request_id"] == "f-2" && r["complete"] == true)
            .collect()
    };
    assert_eq!(records.len(), 1, "{records:?}");
    let rec = &records[0];
    assert_eq!(
        (
            rec["decision"].as_str(),
            rec["reason"].as_str(),
            rec["status"].as_u64()
        ),
        (Some("allowed"), Some("ok"), Some(200)),
        "{rec}"
    );
    assert!(rec["tokens"]["output"].as_u64().unwrap() > 0, "{rec}");
    assert!(gw
        .stats("cluster.anthropic_keys.upstream_rq_retry")
        .contains("cluster.anthropic_keys.upstream_rq_retry: 1\n"));

    // Both keys refused: the last answer (the second key's 529) reaches the
    // client unchanged and the request is refunded.
    let r = send(
        "f-3",
        Some(&format!(
            "{FIRST}=error-rate-limited, {SECOND}=error-overloaded"
        )),
    );
    assert_eq!(r.status(), 529);
    assert_eq!(r.headers()["retry-after"], "7");
    assert_eq!(keys_seen(&gw, "f-3"), [FIRST, SECOND]);
    let rec = gw.audit_record("f-3");
    assert_eq!(rec["reason"], "upstream_overloaded", "{rec}");
    let r = send("f-4", None);
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()["anthropic-ratelimit-requests-remaining"],
        "0",
        "f-3 was refunded: f-4 is the third request charged"
    );
    assert!(
        gw.mock_violations().is_empty(),
        "{:?}",
        gw.mock_violations()
    );

    // Each key lives only in its own 0600 SDS secret, never in the
    // bootstrap or a log.
    let state = gw.dir.path().join("state");
    for (file, key) in [("anthropic.yaml", FIRST), ("anthropic-1.yaml", SECOND)] {
        let path = state.join("secrets").join(file);
        assert!(std::fs::read_to_string(&path).unwrap().contains(key));
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "{file}");
    }
    for text in [
        std::fs::read_to_string(state.join("envoy.yaml")).unwrap(),
        gw.log("envoy"),
        gw.log("tollgate.out"),
        gw.log("tollgate.err"),
    ] {
        assert!(!text.contains(FIRST) && !text.contains(SECOND));
    }
}
