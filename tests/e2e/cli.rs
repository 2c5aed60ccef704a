//! The `tollgate` commands security teams run: policy check on every
//! rejected case, key minting into a policy, reports piped into other tools.

use std::process::Command;
use tollgate_e2e::cli_ok;

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
    let out = cli_ok(
        tollgate()
            .args([
                "key", "new", "--id", "ci-bot", "--team", "payments", "--group", "eng", "--into",
            ])
            .arg(&path),
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

/// Runs `tollgate ARGS | head -1` in bash; returns what head printed,
/// tollgate's exit status (from PIPESTATUS) and what tollgate wrote to stderr.
fn first_line_through_head(args: &[&str]) -> (String, String, String) {
    let bin = std::env::var("TOLLGATE_BIN").unwrap_or_else(|_| {
        concat!(env!("CARGO_MANIFEST_DIR"), "/../target/debug/tollgate").to_string()
    });
    let out = Command::new("bash")
        .arg("-c")
        .arg(r#""$0" "$@" | head -1; echo "tollgate exit ${PIPESTATUS[0]}" >&2"#)
        .arg(bin)
        .args(args)
        .output()
        .unwrap();
    assert!(out.status.success(), "bash itself failed: {out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let (tollgate_stderr, status) = stderr.trim_end().rsplit_once("tollgate exit ").unwrap();
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        status.to_string(),
        tollgate_stderr.to_string(),
    )
}

#[test]
fn reports_piped_into_head_end_quietly_with_status_0() {
    // 20,000 records: each listing is megabytes, far past the 64 KiB a pipe
    // holds, so tollgate is still writing when head exits and closes it.
    let dir = tempfile::tempdir().unwrap();
    let (log, db) = (dir.path().join("audit.jsonl"), dir.path().join("audit.db"));
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis();
    let mut lines = String::new();
    for i in 0..20_000 {
        lines.push_str(&format!(
            concat!(
                r#"{{"schema":1,"request_id":"pipe-{i:05}","timestamp_ms":{ts},"complete":true,"#,
                r#""key_id":"key-{i}","user":"user-{i}","team":"team-{i}","groups":[],"#,
                r#""route":"anthropic.messages","provider":"anthropic","model_requested":"claude-haiku-4-5","#,
                r#""stream":false,"decision":"allowed","reason":"ok","status":200,"#,
                r#""tokens":{{"input_estimated":30,"output_reserved":100,"input":25,"output":80}},"cost_usd":0.0004}}"#,
                "\n"
            ),
            i = i,
            ts = now_ms - 60_000 + i as u128,
        ));
    }
    std::fs::write(&log, lines).unwrap();
    let out = tollgate()
        .args(["audit", "import"])
        .arg(&log)
        .arg("--db")
        .arg(&db)
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("20000 records read, 20000 new or completed"),
        "{out:?}"
    );
    let db = db.to_str().unwrap();

    let (first, status, stderr) =
        first_line_through_head(&["usage", "--format", "csv", "--db", db]);
    assert_eq!(
        (status.as_str(), stderr.as_str()),
        ("0", ""),
        "tollgate usage | head -1"
    );
    assert_eq!(
        first,
        "name,requests,allowed,denied,input_tokens,output_tokens,cache_write_tokens,cache_read_tokens,cost_usd,denials\n"
    );

    let (first, status, stderr) =
        first_line_through_head(&["audit", "tail", "-n", "100000", "--db", db]);
    assert_eq!(
        (status.as_str(), stderr.as_str()),
        ("0", ""),
        "tollgate audit tail | head -1"
    );
    assert!(
        first.starts_with("time ") && first.trim_end().ends_with(" cost"),
        "{first}"
    );
    let (first, status, stderr) = first_line_through_head(&[
        "audit", "tail", "--format", "json", "-n", "100000", "--db", db,
    ]);
    assert_eq!(
        (status.as_str(), stderr.as_str()),
        ("0", ""),
        "tollgate audit tail --format json | head -1"
    );
    let record: serde_json::Value = serde_json::from_str(&first).unwrap();
    assert_eq!(
        record["request_id"], "pipe-00000",
        "oldest of the newest 100000 first"
    );
}
