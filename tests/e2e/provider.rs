//! The provider's own ceiling, end to end: `tollgate limits pull` against a
//! stand-in of Anthropic's Admin API (the mock provider's Rate Limits
//! endpoints, every page followed), provider pools enforced by the real
//! filter in the real Envoy for every key and refreshed on a schedule, the
//! provider's rate-limit headers as gauges, and the provider's own 529
//! passed through and charged nothing.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use serde_json::{json, Value};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tollgate_e2e::{policy, tollgate_bin, Gateway, Options};

const ADMIN_KEY: &str = "sk-ant-admin-mock-key";
const ALICE: &str = "tg-provider-alice";
const BOB: &str = "tg-provider-bob";
const SONNET: &str =
    r#"{"model":"claude-sonnet-4-5","max_tokens":20,"messages":[{"role":"user","content":"hi"}]}"#;
const SONNET_GROUP: [&str; 4] = [
    "claude-sonnet-4-0",
    "claude-sonnet-4-20250514",
    "claude-sonnet-4-5",
    "claude-sonnet-4-5-20250929",
];

/// `tollgate mock` on a free port, standing in for the Admin API.
struct AdminApi {
    child: Child,
    url: String,
}

impl AdminApi {
    fn start() -> AdminApi {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new(tollgate_bin())
            .args(["mock", "--listen", &format!("127.0.0.1:{port}")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let url = format!("http://127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(20);
        while reqwest::blocking::get(format!("{url}/__mock/health")).is_err() {
            assert!(Instant::now() < deadline, "mock Admin API did not start");
            std::thread::sleep(Duration::from_millis(100));
        }
        AdminApi { child, url }
    }

    /// Anthropic changes the organization's limits.
    fn set_limits(&self, sonnet_rpm: u64) {
        let limits = json!({"data": [
            {"type": "rate_limit", "group_type": "model_group", "models": SONNET_GROUP,
             "limits": [{"type": "requests_per_minute", "value": sonnet_rpm},
                        {"type": "output_tokens_per_minute", "value": 400000}]},
            {"type": "rate_limit", "group_type": "model_group",
             "models": ["claude-haiku-4-5", "claude-haiku-4-5-20251001"],
             "limits": [{"type": "requests_per_minute", "value": 4000}]}
        ]});
        let r = reqwest::blocking::Client::new()
            .post(format!("{}/__mock/admin/rate_limits", self.url))
            .json(&limits)
            .send()
            .unwrap();
        assert_eq!(r.status(), 204);
    }
}

impl Drop for AdminApi {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn pull(api: &AdminApi, key: &str, extra: &[&str]) -> std::process::Output {
    Command::new(tollgate_bin())
        .args(["limits", "pull", "--admin-url", &api.url])
        .args(extra)
        .env("ANTHROPIC_ADMIN_KEY", key)
        .output()
        .unwrap()
}

#[test]
fn limits_pull_follows_every_page_and_merges_the_workspace_overrides() {
    let api = AdminApi::start();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("provider-limits.json");
    let run = pull(
        &api,
        ADMIN_KEY,
        &[
            "--workspace",
            "wrkspc_01MockTeam",
            "--page-size",
            "1",
            "--out",
            out.to_str().unwrap(),
        ],
    );
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(
        stdout.contains("4 provider pool(s): anthropic:claude-haiku-4-5, anthropic:claude-opus-4, anthropic:claude-sonnet-4, anthropic:claude-sonnet-5-5; workspace wrkspc_01MockTeam overrides 1 group(s); not metered by Tollgate: input_tokens_per_minute_cache_aware"),
        "{stdout}"
    );
    let file: Value = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    let pools = file["provider_pools"].as_object().unwrap();
    // Four model groups, one per page: the batch, token-count and
    // web-search groups are not model groups.
    assert_eq!(pools.len(), 4, "{file}");
    let sonnet = &pools["provider:anthropic:claude-sonnet-4"];
    assert_eq!(sonnet["models"], json!(SONNET_GROUP));
    assert_eq!(
        sonnet["limits"],
        // Overridden to 1000; the workspace's 500,000 output tokens are
        // above the organization's 400,000, which still applies; input is
        // not overridden: inherited.
        json!({"requests_per_minute": 1000, "input_tokens_per_minute": 2000000, "output_tokens_per_minute": 400000})
    );
    assert_eq!(
        pools["provider:anthropic:claude-haiku-4-5"]["limits"]["requests_per_minute"],
        4000
    );

    // The same limits again: the file is left alone.
    let again = pull(
        &api,
        ADMIN_KEY,
        &[
            "--workspace",
            "wrkspc_01MockTeam",
            "--out",
            out.to_str().unwrap(),
        ],
    );
    assert!(String::from_utf8_lossy(&again.stdout).starts_with("unchanged "));

    // A key that is not an admin key is refused by the API, and nothing is written.
    let refused = pull(
        &api,
        "sk-ant-mock-real-key",
        &["--out", "/nonexistent/x.json"],
    );
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr)
            .contains("/v1/organizations/rate_limits: 401 authentication_error: invalid x-api-key"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    let unknown = pull(
        &api,
        ADMIN_KEY,
        &["--workspace", "wrkspc_nope", "--out", "/nonexistent/x.json"],
    );
    assert!(String::from_utf8_lossy(&unknown.stderr)
        .contains("404 not_found_error: workspace: wrkspc_nope not found"));

    // The policy that includes the file checks with its provider pools.
    let policy_path = dir.path().join("policy.json");
    std::fs::write(
        &policy_path,
        r#"{"version": 1, "include": ["provider-limits.json"], "defaults": {"models": ["claude-*"]}}"#,
    )
    .unwrap();
    let check = Command::new(tollgate_bin())
        .args(["policy", "check"])
        .arg(&policy_path)
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&check.stdout)
            .contains("0 keys (0 revoked), 0 groups, 4 pools (4 provider), 0 model patterns"),
        "{}",
        String::from_utf8_lossy(&check.stdout)
    );

    // A gateway asked to refresh that cannot pull the first time, with no
    // earlier file to fall back on, starts nothing.
    std::fs::remove_file(&out).unwrap();
    let run = Command::new(tollgate_bin())
        .args([
            "run",
            "--upstream",
            "mock",
            "--provider-limits-refresh",
            "1h",
        ])
        .args(["--admin-url", "http://127.0.0.1:9", "--policy"])
        .arg(&policy_path)
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .env("ANTHROPIC_ADMIN_KEY", ADMIN_KEY)
        .output()
        .unwrap();
    assert!(!run.status.success());
    assert!(
        String::from_utf8_lossy(&run.stderr).contains(&format!(
            "pulling the provider's limits into {} (needed by --provider-limits-refresh)",
            out.display()
        )),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
}

fn pooled_policy() -> String {
    policy(
        r#"{"models": ["claude-*", "gpt-*"], "limits": {"requests_per_minute": 100}}"#,
        &[("alice", ALICE, ""), ("bob", BOB, "")],
    )
    .replacen(
        "{\"version\": 1,",
        "{\"version\": 1, \"include\": [\"provider-limits.json\"],",
        1,
    )
}

/// The gauge's value as Envoy's admin `/stats` reports it.
fn gauge(gw: &Gateway, name: &str) -> Option<u64> {
    let full = format!("wasmcustom.tollgate.provider.{name}: ");
    gw.stats("tollgate.provider")
        .lines()
        .find_map(|l| l.strip_prefix(&full)?.trim().parse().ok())
}

#[test]
fn provider_pools_refuse_every_key_refresh_on_schedule_and_headroom_is_gauged() {
    let api = AdminApi::start();
    api.set_limits(2);
    let gw = Gateway::start_with(
        &pooled_policy(),
        Options {
            extra_args: ["--provider-limits-refresh", "1s", "--admin-url", &api.url]
                .map(String::from)
                .to_vec(),
            env: vec![("ANTHROPIC_ADMIN_KEY".into(), ADMIN_KEY.into())],
            ..Options::default()
        },
    );
    let pulled: Value = serde_json::from_str(
        &std::fs::read_to_string(gw.dir.path().join("provider-limits.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        pulled["provider_pools"]["provider:anthropic:claude-sonnet-4"]["limits"]
            ["requests_per_minute"],
        2
    );

    // Two keys with room of their own share the organization's 2 per minute.
    let send = |key: &str, id: &str, extra: &[(&str, &str)]| {
        let mut h = vec![("x-api-key", key), ("x-request-id", id)];
        h.extend_from_slice(extra);
        gw.post_with("/v1/messages", &h, SONNET)
    };
    let r = send(
        ALICE,
        "p-1",
        &[("x-mock-ratelimit-remaining", "requests=17")],
    );
    assert_eq!(r.status(), 200);
    assert_eq!(
        gauge(&gw, "anthropic:claude-sonnet-4.requests_remaining"),
        Some(17)
    );
    assert_eq!(
        gauge(&gw, "anthropic:claude-sonnet-4.requests_limit"),
        Some(4000)
    );
    // The caller reads its most restrictive bucket: the group's 2, 1 left.
    assert_eq!(r.headers()["anthropic-ratelimit-requests-limit"], "2");
    assert_eq!(r.headers()["anthropic-ratelimit-requests-remaining"], "1");
    let r = send(
        BOB,
        "p-2",
        &[(
            "x-mock-ratelimit-remaining",
            "requests=12, output-tokens=399000",
        )],
    );
    assert_eq!(r.status(), 200);
    assert_eq!(
        gauge(&gw, "anthropic:claude-sonnet-4.requests_remaining"),
        Some(12)
    );
    assert_eq!(
        gauge(&gw, "anthropic:claude-sonnet-4.output_tokens_remaining"),
        Some(399_000)
    );
    let r = send(ALICE, "p-3", &[]);
    assert_eq!(r.status(), 429);
    let body: Value = r.json().unwrap();
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.starts_with(
            "requests_per_minute limit of 2 reached for provider:anthropic:claude-sonnet-4; retry in "
        ),
        "{message}"
    );
    assert_eq!(
        gw.audit_record("p-3")["bucket"],
        "provider:anthropic:claude-sonnet-4:requests_per_minute"
    );
    // Another group is not this group's to refuse.
    let haiku = gw.post_with(
        "/v1/messages",
        &[("x-api-key", BOB)],
        r#"{"model":"claude-haiku-4-5","max_tokens":5,"messages":[]}"#,
    );
    assert_eq!(haiku.status(), 200);

    // The groups as Prometheus sees them: one metric, the group a label
    // (Envoy drops the `wasmcustom` namespace and its `envoy_` prefix from
    // custom stats there).
    let prom = gw
        .client()
        .get(format!("{}/stats/prometheus", gw.admin))
        .send()
        .unwrap()
        .text()
        .unwrap();
    assert!(
        prom.lines().any(|l| l
            == "tollgate_provider_requests_remaining{tollgate_provider_group=\"anthropic:claude-sonnet-4\"} 12"),
        "{}",
        prom.lines().filter(|l| l.contains("provider")).collect::<Vec<_>>().join("\n")
    );
    // A model no provider pool lists: its provider's `other` group.
    let openai = gw.post_with(
        "/v1/chat/completions",
        &[
            ("authorization", &format!("Bearer {ALICE}")),
            ("x-mock-ratelimit-remaining", "requests=41"),
        ],
        r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}"#,
    );
    assert_eq!(openai.status(), 200);
    assert_eq!(gauge(&gw, "openai:other.requests_remaining"), Some(41));

    // Anthropic raises the limit: the next refresh applies it like an edit.
    api.set_limits(600);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let r = send(ALICE, "p-after", &[]);
        if r.status() == 200 {
            // The group's bucket, refilling at its new rate, is still the
            // caller's most restrictive: it names the new limit.
            assert_eq!(r.headers()["anthropic-ratelimit-requests-limit"], "600");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the refreshed limit never applied"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    let out = gw.log("tollgate.out");
    assert!(out.contains("provider limits written to"), "{out}");
    assert!(out.contains("policy reloaded"), "{out}");
    assert!(gw.mock_violations().is_empty());
}

#[test]
fn the_providers_529_passes_through_audited_and_refunds_the_request() {
    let gw = Gateway::start(&policy(
        r#"{"models": ["claude-*"], "limits": {"requests_per_minute": 5}}"#,
        &[("alice", ALICE, "")],
    ));
    let send = |id: &str, extra: &[(&str, &str)]| {
        let mut h = vec![("x-api-key", ALICE), ("x-request-id", id)];
        h.extend_from_slice(extra);
        gw.post_with("/v1/messages", &h, SONNET)
    };
    let r = send("o-1", &[]);
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["anthropic-ratelimit-requests-remaining"], "4");
    let r = send("o-529", &[("x-mock-exchange", "error-overloaded")]);
    assert_eq!(r.status(), 529);
    assert_eq!(r.headers()["retry-after"], "7");
    let body: Value = r.json().unwrap();
    assert_eq!(body["error"]["type"], "overloaded_error");
    // The provider served nothing: the request bucket has what it had.
    let r = send("o-2", &[]);
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["anthropic-ratelimit-requests-remaining"], "3");
    let rec = gw.audit_record("o-529");
    assert_eq!(
        (
            rec["decision"].as_str(),
            rec["reason"].as_str(),
            rec["status"].as_u64()
        ),
        (Some("allowed"), Some("upstream_overloaded"), Some(529)),
        "{rec}"
    );
    assert_eq!(
        gw.wait_for_stat("tollgate.decisions.upstream_overloaded", |v| v >= 1),
        1
    );
}
