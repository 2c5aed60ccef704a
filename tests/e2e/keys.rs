//! A key's lifecycle on a live gateway: `tollgate key rotate` on the policy
//! file a running gateway watches; both secrets work at once, the old one
//! is refused from its deadline and the new one goes on; audit records of
//! both carry the key's one id; `key list` and `key show` never print a
//! secret. And what the key commands say to bad input.

use std::process::{Command, Output};
use std::time::{Duration, Instant};
use tollgate_core::time::{format_rfc3339, parse_rfc3339};
use tollgate_e2e::{policy, sha, tollgate_bin, tollgate_ok, Gateway};

const OLD: &str = "tg-e2e-keys-rotating-old";
const OTHER: &str = "tg-e2e-keys-other";
const HAIKU: &str =
    r#"{"model":"claude-haiku-4-5","max_tokens":50,"messages":[{"role":"user","content":"hi"}]}"#;

/// How long after the deadline the old secret may still be seen working
/// while polling: the filter decides by Envoy's clock, this machine's
/// clock, so the only slack is the poll interval and scheduling.
const FLIP_TOLERANCE: Duration = Duration::from_millis(1000);
/// Allowed disagreement between the test's clock readings around a request
/// and the filter's reading of the same clock (milliseconds, rounding).
const CLOCK_SLACK_MS: u64 = 100;

fn tollgate(args: &[&str]) -> Output {
    Command::new(tollgate_bin()).args(args).output().unwrap()
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

fn send(gw: &Gateway, key: &str, request_id: &str) -> (u16, serde_json::Value) {
    let r = gw.post_with(
        "/v1/messages",
        &[("x-api-key", key), ("x-request-id", request_id)],
        HAIKU,
    );
    let status = r.status().as_u16();
    (status, r.json().unwrap_or_default())
}

#[test]
fn rotation_keeps_both_secrets_until_the_deadline_then_only_the_new_one_under_one_key_id() {
    let defaults = r#"{"models": ["claude-haiku-*"], "limits": {"requests_per_minute": 100000}}"#;
    let gw = Gateway::start(&policy(
        defaults,
        &[("rot", OLD, r#""team": "payments""#), ("other", OTHER, "")],
    ));
    let file = gw.policy.to_str().unwrap().to_string();
    assert_eq!(send(&gw, OLD, "before-rotation").0, 200);

    let asked_at = now_ms();
    let out = tollgate_ok([
        "key", "rotate", "--id", "rot", "--policy", &file, "--grace", "3s",
    ]);
    let new = out
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with("tg-"))
        .unwrap_or_else(|| panic!("no new secret printed: {out}"))
        .to_string();
    let until = out
        .split("the previous secret works until ")
        .nth(1)
        .and_then(|rest| rest.split(';').next())
        .unwrap_or_else(|| panic!("no deadline printed: {out}"))
        .to_string();
    let deadline = parse_rfc3339(&until).unwrap();
    // Three seconds from the command, rounded up to the second.
    assert!(
        deadline >= asked_at + 3000 && deadline <= now_ms() + 4000,
        "deadline {until} for a rotation at {}",
        format_rfc3339(asked_at)
    );
    assert!(
        out.contains(&format!("rotated key \"rot\" in {file}")),
        "{out}"
    );
    let text = std::fs::read_to_string(&gw.policy).unwrap();
    assert!(!text.contains(&new) && text.contains(&sha(&new)) && text.contains(&sha(OLD)));

    // The listing shows the rotation and never a secret nor a hash.
    let list = tollgate_ok(["key", "list", "--policy", &file]);
    let row = list.lines().find(|l| l.starts_with("rot ")).unwrap();
    assert!(
        row.contains(&format!("rotating until {until}")) && row.trim_end().ends_with(" 2"),
        "{list}"
    );
    let json = tollgate_ok(["key", "list", "--policy", &file, "--format", "json"]);
    let listed: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(listed[0]["status"], "rotating");
    assert_eq!(listed[0]["rotating_until"], until.as_str());
    assert_eq!(listed[1]["status"], "active");
    let show = tollgate_ok(["key", "show", "--id", "rot", "--policy", &file]);
    assert!(
        show.contains(&format!(
            "previous  sha256 {}  works until {until}",
            sha(OLD)
        )),
        "{show}"
    );
    for secret in [OLD, new.as_str(), OTHER] {
        for printed in [&list, &json, &show] {
            assert!(!printed.contains(secret), "{secret} printed:\n{printed}");
        }
        assert!(!list.contains(&sha(secret)) && !json.contains(&sha(secret)));
    }

    // The gateway picks the edit up: the new secret opens the key.
    let reload = Instant::now();
    while send(&gw, &new, "new-probe").0 != 200 {
        assert!(
            reload.elapsed() < Duration::from_secs(10),
            "the rotated policy was not applied after 10s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // Both secrets at once, well before the deadline.
    assert!(
        now_ms() + 300 < deadline,
        "the reload took until {} of a grace period ending {until}: nothing left to test",
        format_rfc3339(now_ms())
    );
    assert_eq!(send(&gw, OLD, "both-old").0, 200);
    assert_eq!(send(&gw, &new, "both-new").0, 200);

    // Poll the old secret across the deadline.
    let mut n = 0;
    let refused = loop {
        n += 1;
        let id = format!("poll-old-{n}");
        let sent = now_ms();
        let (status, body) = send(&gw, OLD, &id);
        let received = now_ms();
        match status {
            200 => assert!(
                sent < deadline + CLOCK_SLACK_MS,
                "the old secret worked for a request sent at {} after its deadline {until}",
                format_rfc3339(sent)
            ),
            401 => {
                assert!(
                    received + CLOCK_SLACK_MS >= deadline,
                    "the old secret was refused at {} before its deadline {until}",
                    format_rfc3339(received)
                );
                assert_eq!(
                    body["error"]["message"],
                    format!("this API key was rotated and its previous secret expired at {until}")
                );
                assert_eq!(body["error"]["type"], "authentication_error");
                break id;
            }
            other => panic!("old secret answered {other}: {body}"),
        }
        assert!(
            Instant::now() < reload + Duration::from_secs(10)
                && now_ms() < deadline + FLIP_TOLERANCE.as_millis() as u64,
            "the old secret still works {} after its deadline {until}",
            format_rfc3339(now_ms())
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(send(&gw, &new, "after-new").0, 200);
    assert_eq!(send(&gw, OTHER, "after-other").0, 200);

    // One key id in audit, whichever secret was presented.
    for id in ["both-old", "both-new", "after-new"] {
        let r = gw.audit_record(id);
        assert_eq!(
            (
                r["key_id"].as_str(),
                r["team"].as_str(),
                r["status"].as_u64()
            ),
            (Some("rot"), Some("payments"), Some(200)),
            "{id}: {r}"
        );
    }
    let r = gw.any_audit_record(&refused);
    assert_eq!(
        (
            r["key_id"].as_str(),
            r["reason"].as_str(),
            r["status"].as_u64()
        ),
        (Some("rot"), Some("rotated_key"), Some(401)),
        "{r}"
    );
    assert!(
        gw.mock_violations().is_empty(),
        "{:?}",
        gw.mock_violations()
    );

    // After the grace period the key is plainly active again.
    let list = tollgate_ok(["key", "list", "--policy", &file]);
    let row = list.lines().find(|l| l.starts_with("rot ")).unwrap();
    assert!(row.contains(" active "), "{list}");
}

#[test]
fn key_commands_name_what_is_wrong_and_leave_the_file_alone() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("p.json");
    let text = format!(
        "{{\"version\": 1, \"keys\": [{{\"id\": \"a\", \"key_sha256\": \"{}\"}}, {{\"id\": \"gone\", \"key_sha256\": \"{}\", \"revoked\": true}}]}}\n",
        sha("tg-a"),
        sha("tg-gone")
    );
    std::fs::write(&path, &text).unwrap();
    let file = path.to_str().unwrap();
    let failure = |args: &[&str]| {
        let out = tollgate(args);
        assert!(!out.status.success(), "{args:?} succeeded");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let e = failure(&[
        "key", "rotate", "--id", "a", "--policy", file, "--grace", "24x",
    ]);
    assert!(
        e.contains("invalid duration \"24x\": use a number followed by s, m, h or d"),
        "{e}"
    );
    let e = failure(&[
        "key", "rotate", "--id", "gone", "--policy", file, "--grace", "1h",
    ]);
    assert!(
        e.contains("key \"gone\" is revoked: a new secret would be refused too"),
        "{e}"
    );
    let e = failure(&["key", "show", "--id", "nope", "--policy", file]);
    assert!(e.contains("no key with id \"nope\" (ids: a, gone)"), "{e}");
    assert_eq!(std::fs::read_to_string(&path).unwrap(), text);
    let list = tollgate_ok(["key", "list", "--policy", file]);
    assert_eq!(
        list,
        "id    user  team  groups  status   secrets\n\
         a     -     -     -       active         1\n\
         gone  -     -     -       revoked        1\n"
    );
}

/// Keys travel as a table from `tollgate run`'s key service, not in
/// Envoy's filter configuration: a key added, revoked or removed reaches
/// Envoy without the ECDS file changing (so no VM compiles the policy
/// again), and applies within a second of the save.
#[test]
fn a_key_change_travels_alone_and_applies_within_a_second() {
    const NEW: &str = "tg-e2e-keys-table-new";
    let defaults = r#"{"models": ["claude-*"]}"#;
    let gw = Gateway::start(&policy(defaults, &[("other", OTHER, "")]));
    let ecds = std::fs::read_to_string(gw.state_file("ecds/tollgate.yaml")).unwrap();
    assert!(
        !ecds.contains(&sha(OTHER)),
        "the filter configuration carries no key"
    );
    assert_eq!(gw.post("/v1/messages", Some(OTHER), HAIKU).status(), 200);
    assert_eq!(gw.post("/v1/messages", Some(NEW), HAIKU).status(), 401);

    // Each edit: how long until a request sees it (polled, no sleep
    // between requests beyond their own round trip).
    let applied = |expect: u16, key: &str| {
        let saved = Instant::now();
        loop {
            if gw.post("/v1/messages", Some(key), HAIKU).status() == expect {
                return saved.elapsed();
            }
            assert!(
                saved.elapsed() < Duration::from_secs(10),
                "{key}: never {expect}"
            );
        }
    };
    gw.write_policy(&policy(defaults, &[("other", OTHER, ""), ("new", NEW, "")]));
    let added = applied(200, NEW);
    gw.write_policy(&policy(
        defaults,
        &[("other", OTHER, ""), ("new", NEW, r#""revoked": true"#)],
    ));
    let revoked = applied(401, NEW);
    let r = gw.post("/v1/messages", Some(NEW), HAIKU);
    let body: serde_json::Value = r.json().unwrap();
    assert_eq!(body["error"]["message"], "this API key has been revoked");
    gw.write_policy(&policy(defaults, &[("new", NEW, "")]));
    let removed = applied(401, OTHER);
    eprintln!("added after {added:?}, revoked after {revoked:?}, removed after {removed:?}");
    // The target is 1 s on a quiet machine; 3 s leaves room for a loaded
    // one (the file is looked at every 100 ms, Envoy's VMs look at the
    // table every 50 ms).
    for (what, took) in [("added", added), ("revoked", revoked), ("removed", removed)] {
        assert!(took < Duration::from_secs(3), "{what} after {took:?}");
    }
    assert_eq!(
        std::fs::read_to_string(gw.state_file("ecds/tollgate.yaml")).unwrap(),
        ecds,
        "key edits never touch the filter configuration"
    );
    let out = gw.log("tollgate.out");
    assert!(out.contains("1 key records changed"), "{out}");
    // Records written into Envoy: the first table (1), the new key (1), its
    // revocation (1), the last edit (2: one removed, one changed).
    gw.wait_for_stat("tollgate.keys.records", |n| n == 5);
    // No call failed: the counter is never defined, or zero.
    let failed = gw.stats("tollgate.keys.fetch_failed");
    assert!(failed.lines().all(|l| l.ends_with(": 0")), "{failed}");
    assert!(
        gw.log("envoy").contains("key table: "),
        "Envoy logs what it loaded"
    );
}
