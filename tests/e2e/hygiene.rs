//! Key hygiene: after real traffic (allowed, denied, streamed, OpenAI), no
//! virtual key appears in any log, audit row, metric or upstream request,
//! and the provider key lives only in the 0600 SDS secret.

use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use tollgate_e2e::{policy, tollgate_bin, Gateway};

const KEYS: [&str; 3] = [
    "tg-hygiene-alice-5c2e9f",
    "tg-hygiene-bob-0a7d31",
    "tg-hygiene-unknown-88e1",
];

#[test]
fn virtual_keys_never_appear_in_logs_audit_metrics_or_upstream() {
    let p = policy(
        r#"{"models": ["claude-*", "gpt-4o*"], "limits": {"requests_per_minute": 3}}"#,
        &[
            ("alice", KEYS[0], r#""team": "payments""#),
            ("bob", KEYS[1], r#""revoked": true"#),
        ],
    );
    let gw = Gateway::start(&p);
    let msg = r#"{"model":"claude-sonnet-4-5","max_tokens":50,"messages":[{"role":"user","content":"hi"}]}"#;
    for key in KEYS {
        for _ in 0..4 {
            let _ = gw.post("/v1/messages", Some(key), msg).text();
        }
        let _ = gw
            .post_with(
                "/v1/chat/completions",
                &[("authorization", &format!("Bearer {key}"))],
                r#"{"model":"gpt-4o-mini","stream":true,"messages":[]}"#,
            )
            .text();
        let _ = gw.post("/v1/messages", Some(key), "{broken json").text();
    }
    // Wait for the durable file copy (flushed every second) to hold every request.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    while std::fs::read_to_string(&gw.audit_log)
        .unwrap_or_default()
        .lines()
        .count()
        < 18
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the file audit log did not fill"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }

    let mut places: Vec<(String, String)> = vec![
        ("envoy log".into(), gw.log("envoy")),
        ("tollgate stdout".into(), gw.log("tollgate.out")),
        ("tollgate stderr".into(), gw.log("tollgate.err")),
        (
            "file audit log".into(),
            std::fs::read_to_string(&gw.audit_log).unwrap(),
        ),
        ("envoy stats".into(), gw.stats("")),
        (
            "mock provider requests".into(),
            serde_json::to_string(&gw.mock_requests()).unwrap(),
        ),
    ];
    let out = Command::new(tollgate_bin())
        .args(["audit", "tail", "--format", "json", "-n", "1000", "--db"])
        .arg(&gw.audit_db)
        .output()
        .unwrap();
    places.push((
        "audit store".into(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    ));
    let http = gw.collector_http.clone().unwrap();
    places.push((
        "collector metrics".into(),
        gw.client()
            .get(format!("{http}/metrics"))
            .send()
            .unwrap()
            .text()
            .unwrap(),
    ));
    places.push((
        "usage API".into(),
        gw.client()
            .get(format!("{http}/api/usage?by=key&since=1h"))
            .send()
            .unwrap()
            .text()
            .unwrap(),
    ));
    for path in [
        "/",
        "/api/series?since=1h&bucket=hour",
        "/api/burndown?since=1h",
        "/api/key?id=alice&since=1h",
    ] {
        places.push((
            format!("dashboard {path}"),
            gw.client()
                .get(format!("{http}{path}"))
                .send()
                .unwrap()
                .text()
                .unwrap(),
        ));
    }
    let db = std::fs::read(&gw.audit_db).unwrap_or_default();
    places.push((
        "audit database file".into(),
        String::from_utf8_lossy(&db).into_owned(),
    ));

    assert!(
        places[6].1.lines().count() >= 18,
        "traffic was audited: {}",
        places[6].1
    );
    for (place, text) in &places {
        for key in KEYS {
            assert!(
                !text.contains(key),
                "virtual key {}… found in {place}",
                &key[..8]
            );
        }
    }

    // The provider key: only in the SDS secret files, mode 0600.
    let state = gw.dir.path().join("state");
    for provider in ["anthropic", "openai"] {
        let path = state.join(format!("secrets/{provider}.yaml"));
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600,
            "{provider} secret mode"
        );
    }
    let real = "sk-ant-mock-real-key";
    assert!(
        std::fs::read_to_string(state.join("secrets/anthropic.yaml"))
            .unwrap()
            .contains(real)
    );
    for f in ["envoy.yaml", "ecds/tollgate.yaml"] {
        assert!(
            !std::fs::read_to_string(state.join(f))
                .unwrap()
                .contains(real),
            "provider key in {f}"
        );
    }
    for (place, text) in &places[..4] {
        assert!(!text.contains(real), "provider key in {place}");
    }
}
