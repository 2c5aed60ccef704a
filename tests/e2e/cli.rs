//! The `tollgate` commands security teams run: policy check on every
//! rejected case, key minting into a policy.

use std::process::Command;

fn tollgate() -> Command {
    let bin = std::env::var_os("TOLLGATE_BIN")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug/tollgate")
        });
    Command::new(bin)
}

#[test]
fn policy_check_prints_path_and_value_of_every_error_and_exits_1() {
    let cases: Vec<serde_json::Value> =
        serde_json::from_str(include_str!("../../policies/tests/rejected.json")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    for case in &cases {
        let path = dir.path().join("policy.json");
        let text = case
            .get("policy_text")
            .and_then(|t| t.as_str())
            .map(str::to_string)
            .unwrap_or_else(|| case["policy"].to_string());
        std::fs::write(&path, text).unwrap();
        let out = tollgate()
            .current_dir(dir.path())
            .args(["policy", "check", "policy.json"])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "case {}", case["name"]);
        let stdout = String::from_utf8_lossy(&out.stdout);
        for e in case["errors"].as_array().unwrap() {
            assert!(
                stdout.lines().any(|l| l == e.as_str().unwrap()),
                "case {}: missing line {e}\n{stdout}",
                case["name"]
            );
        }
    }
}

#[test]
fn policy_check_summarises_a_valid_policy() {
    let example = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies/example.json");
    let out = tollgate()
        .arg("policy")
        .arg("check")
        .arg(&example)
        .output()
        .unwrap();
    assert!(out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("OK: 4 keys (1 revoked), 2 groups, 2 pools, "),
        "{stdout}"
    );
}

#[test]
fn key_new_into_adds_a_valid_entry_holding_only_the_hash() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("p.json");
    std::fs::write(
        &path,
        "{\n  \"version\": 1,\n  \"groups\": {\"eng\": {}},\n  \"keys\": []\n}\n",
    )
    .unwrap();
    let out = tollgate()
        .args([
            "key", "new", "--id", "ci-bot", "--team", "payments", "--group", "eng", "--into",
        ])
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let key = stdout
        .split_whitespace()
        .find(|w| w.starts_with("tg-"))
        .unwrap()
        .to_string();
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(!text.contains(&key), "the policy never holds the key");
    assert!(text.contains(&tollgate_e2e::sha(&key)));
    assert!(
        text.starts_with("{\n  \"version\": 1,\n  \"groups\": {\"eng\": {}},\n  \"keys\": [\n"),
        "formatting kept:\n{text}"
    );
    // A second key with the same id is refused and the file is untouched.
    let out = tollgate()
        .args(["key", "new", "--id", "ci-bot", "--into"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("duplicate key id (also keys[0].id)"));
    assert_eq!(std::fs::read_to_string(&path).unwrap(), text);
}
