//! Audit and usage end to end: a record for every kind of request, usage
//! totals equal to what the provider reported, metrics, and no loss across a
//! collector restart.

use std::io::{Read, Write};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tollgate_e2e::{cli_ok, policy, tollgate_bin, Gateway, Options};

const KEY: &str = "tg-audit-alice";
const OTHER: &str = "tg-audit-bob";

fn audit_policy() -> String {
    let p = policy(
        r#"{"models": ["claude-*", "gpt-4o*"], "limits": {"requests_per_minute": 1000}}"#,
        &[
            (
                "alice",
                KEY,
                r#""user": "alice@example.com", "team": "payments", "app": "ide", "agent": "claude-code""#,
            ),
            (
                "bob",
                OTHER,
                r#""user": "bob@example.com", "team": "search", "app": "bot", "limits": {"requests_per_minute": 1}"#,
            ),
            ("gone", "tg-audit-revoked", r#""revoked": true"#),
        ],
    );
    format!(
        "{}, \"prices\": {{\"claude-sonnet-4-*\": {{\"input\": 3, \"output\": 15}}, \"gpt-4o*\": {{\"input\": 2.5, \"output\": 10}}}}}}",
        p.trim_end().trim_end_matches('}')
    )
}

const MSG: &str =
    r#"{"model":"claude-sonnet-4-5","max_tokens":300,"messages":[{"role":"user","content":"hi"}]}"#;

#[test]
fn every_kind_of_request_gets_one_record_and_usage_totals_match_the_provider() {
    let gw = Gateway::start(&audit_policy());
    let send = |id: &str, key: &str, body: &str, extra: &[(&str, &str)]| {
        let mut h = vec![("x-api-key", key), ("x-request-id", id)];
        h.extend_from_slice(extra);
        let r = gw.post_with("/v1/messages", &h, body);
        let status = r.status().as_u16();
        // Read to the end: dropping a stream early is a client abort.
        let _ = r.text();
        status
    };
    assert_eq!(send("a-json", KEY, MSG, &[]), 200); // 61 in, 74 out
    assert_eq!(
        send(
            "a-stream",
            KEY,
            r#"{"model":"claude-sonnet-4-5","max_tokens":300,"stream":true,"messages":[]}"#,
            &[]
        ),
        200
    ); // 23 / 118
    assert_eq!(
        send(
            "a-cache",
            KEY,
            r#"{"model":"claude-sonnet-4-5","max_tokens":300,"stream":true,"messages":[]}"#,
            &[("x-mock-exchange", "messages-stream-cache-read")]
        ),
        200
    ); // 24 / 61 / cr 1207
    assert_eq!(
        send(
            "a-529",
            KEY,
            MSG,
            &[("x-mock-exchange", "error-overloaded")]
        ),
        529
    );
    assert_eq!(send("d-unknown", "tg-audit-nobody", MSG, &[]), 401);
    assert_eq!(send("d-revoked", "tg-audit-revoked", MSG, &[]), 401);
    assert_eq!(
        send(
            "d-model",
            KEY,
            r#"{"model":"o3-pro","max_tokens":5,"messages":[]}"#,
            &[]
        ),
        403
    );
    assert_eq!(send("d-json", KEY, "{not json", &[]), 400);
    assert_eq!(send("b-ok", OTHER, MSG, &[]), 200);
    assert_eq!(send("d-rpm", OTHER, MSG, &[]), 429);

    // A client that goes away mid-stream.
    let addr = gw.base.trim_start_matches("http://").to_string();
    let mut s = std::net::TcpStream::connect(&addr).unwrap();
    let body = r#"{"model":"claude-sonnet-4-5","max_tokens":300,"stream":true,"messages":[]}"#;
    write!(s, "POST /v1/messages HTTP/1.1\r\nhost: x\r\nx-api-key: {KEY}\r\nx-request-id: a-abort\r\nx-mock-delay-ms: 200\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}", body.len()).unwrap();
    let mut first = [0u8; 512];
    let _ = s.read(&mut first).unwrap();
    drop(s);

    let expect = [
        ("a-json", "allowed", "ok", 200),
        ("a-stream", "allowed", "ok", 200),
        ("a-cache", "allowed", "ok", 200),
        ("a-529", "allowed", "upstream_overloaded", 529),
        ("d-unknown", "denied", "unknown_key", 401),
        ("d-revoked", "denied", "revoked_key", 401),
        ("d-model", "denied", "model_not_allowed", 403),
        ("d-json", "denied", "invalid_request", 400),
        ("b-ok", "allowed", "ok", 200),
        ("d-rpm", "denied", "rate_limited", 429),
    ];
    for (id, decision, reason, status) in expect {
        let r = gw.audit_record(id);
        assert_eq!(
            (
                r["decision"].as_str(),
                r["reason"].as_str(),
                r["status"].as_u64()
            ),
            (Some(decision), Some(reason), Some(status)),
            "{id}: {r}"
        );
    }
    let cache = gw.audit_record("a-cache");
    assert_eq!(cache["tokens"]["cache_read"], 1207);
    assert_eq!(
        gw.audit_record("a-529")["tokens"]["output"],
        serde_json::Value::Null,
        "upstream error without usage"
    );
    // The aborted stream keeps its provisional record: identity, no
    // completion, and what it was charged (the usage totals below include
    // it; before, the record said nothing of its charge).
    let aborted = gw.any_audit_record("a-abort");
    assert_eq!(
        (
            aborted["complete"].as_bool(),
            aborted["stream"].as_bool(),
            aborted["key_id"].as_str()
        ),
        (Some(false), Some(true), Some("alice"))
    );
    let abort = |class: &str| aborted["tokens"][class].as_u64().unwrap();
    let abort_cost = aborted["cost_usd"].as_f64().unwrap();
    assert!(abort("input") > 0, "{aborted}");

    // Usage report totals equal what the mock provider reported, exactly.
    let out = cli_ok(
        Command::new(tollgate_bin())
            .args([
                "usage", "--by", "team", "--since", "1h", "--format", "json", "--db",
            ])
            .arg(&gw.audit_db),
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let payments = report["rows"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == "payments")
        .unwrap();
    assert_eq!(
        payments["input_tokens"],
        61 + 23 + 24 + abort("input"),
        "{payments}"
    );
    assert_eq!(payments["output_tokens"], 74 + 118 + 61 + abort("output"));
    assert_eq!(payments["cache_read_tokens"], 1207);
    assert_eq!(payments["denials"]["model_not_allowed"], 1);
    let search = report["rows"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == "search")
        .unwrap();
    assert_eq!(
        (
            search["requests"].as_u64(),
            search["denied"].as_u64(),
            search["output_tokens"].as_u64()
        ),
        (Some(2), Some(1), Some(74))
    );
    let cost = payments["cost_usd"].as_f64().unwrap();
    let want =
        (61.0 + 23.0 + 24.0) * 3e-6 + (74.0 + 118.0 + 61.0) * 15e-6 + 1207.0 * 0.3e-6 + abort_cost;
    assert!((cost - want).abs() < 1e-9, "cost {cost} want {want}");

    // Prometheus metrics and the usage API from the collector.
    let http = gw.collector_http.clone().unwrap();
    let metrics = gw
        .client()
        .get(format!("{http}/metrics"))
        .send()
        .unwrap()
        .text()
        .unwrap();
    assert!(metrics.contains(r#"tollgate_requests_total{team="search",app="bot",agent="",model="claude-sonnet-4-5",decision="denied"} 1"#), "{metrics}");
    assert!(metrics.contains(r#"tollgate_denials_total{reason="rate_limited"} 1"#));
    assert!(metrics.contains("tollgate_collector_records_dropped_total 0"));
    let api: serde_json::Value = gw
        .client()
        .get(format!("{http}/api/usage?by=team&since=1h"))
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(
        api["totals"]["output_tokens"],
        report["totals"]["output_tokens"]
    );
    let bad = gw
        .client()
        .get(format!("{http}/api/usage?by=planet"))
        .send()
        .unwrap();
    assert_eq!(bad.status(), 400);
}

fn collector(grpc: &str, http: &str, db: &std::path::Path) -> Child {
    Command::new(tollgate_bin())
        .args(["collector", "--listen", grpc, "--http", http, "--db"])
        .arg(db)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

fn free_port() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().to_string()
}

#[test]
fn collector_restart_under_load_then_import_leaves_one_row_per_request() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("audit.db");
    let (grpc, http) = (free_port(), free_port());
    let mut c = collector(&grpc, &http, &db);
    std::thread::sleep(Duration::from_millis(500));
    let gw = Gateway::start_with(
        &audit_policy(),
        Options {
            external_collector: Some(grpc.clone()),
            ..Options::default()
        },
    );

    let mut sent = 0;
    let started = Instant::now();
    let mut restarted = false;
    while started.elapsed() < Duration::from_secs(6) {
        let status = gw
            .post_with(
                "/v1/messages",
                &[
                    ("x-api-key", KEY),
                    ("x-request-id", &format!("steady-{sent}")),
                ],
                MSG,
            )
            .status();
        assert_eq!(
            status, 200,
            "requests keep flowing while the collector is away"
        );
        sent += 1;
        if !restarted && started.elapsed() > Duration::from_secs(2) {
            c.kill().unwrap();
            c.wait().unwrap();
            std::thread::sleep(Duration::from_millis(1500));
            c = collector(&grpc, &http, &db);
            restarted = true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(1500));
    c.kill().unwrap();
    c.wait().unwrap();

    let out = Command::new(tollgate_bin())
        .args(["audit", "import"])
        .arg(&gw.audit_log)
        .arg("--db")
        .arg(&db)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{said}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("sent {sent}; {said}");
    let out = Command::new(tollgate_bin())
        .args(["audit", "tail", "--format", "json", "-n", "100000", "--db"])
        .arg(&db)
        .output()
        .unwrap();
    let ids: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|r| r["complete"] == true)
        .map(|r| r["request_id"].as_str().unwrap().to_string())
        .collect();
    let mut unique = ids.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), ids.len(), "one row per request");
    assert_eq!(
        ids.len(),
        sent,
        "every request sent has exactly one complete record"
    );
    // Importing again changes nothing.
    let out = Command::new(tollgate_bin())
        .args(["audit", "import"])
        .arg(&gw.audit_log)
        .arg("--db")
        .arg(&db)
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(", 0 new or completed,"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

/// Renders the collector's dashboard in headless Chromium after real traffic
/// and checks the real figures are on the page; the screenshot is kept in
/// target/test-artifacts/dashboard.png.
#[test]
fn dashboard_shows_the_real_figures_in_a_browser() {
    let chromium = std::env::var("TOLLGATE_CHROMIUM").unwrap_or_else(|_| "chromium".to_string());
    let gw = Gateway::start(&audit_policy());
    for i in 0..3 {
        let r = gw.post_with(
            "/v1/messages",
            &[("x-api-key", KEY), ("x-request-id", &format!("dash-{i}"))],
            MSG,
        );
        assert_eq!(r.status(), 200);
    }
    let r = gw.post_with(
        "/v1/messages",
        &[("x-api-key", OTHER), ("x-request-id", "dash-b1")],
        MSG,
    );
    assert_eq!(r.status(), 200);
    let r = gw.post_with(
        "/v1/messages",
        &[("x-api-key", OTHER), ("x-request-id", "dash-b2")],
        MSG,
    );
    assert_eq!(r.status(), 429);
    gw.audit_record("dash-b2");
    gw.audit_record("dash-2");
    let url = format!("{}/?since=1h", gw.collector_http.clone().unwrap());
    let profile = tempfile::tempdir().unwrap();
    let flags = |extra: &[&str]| {
        let mut c = Command::new(&chromium);
        c.args(tollgate_e2e::cdp::HEADLESS)
            .args(["--virtual-time-budget=5000", "--window-size=1280,1100"])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .args(extra)
            .arg(&url);
        c
    };
    let dom = flags(&["--dump-dom"])
        .output()
        .expect("running chromium (make chromium installs it)");
    let dom = String::from_utf8_lossy(&dom.stdout).into_owned();
    assert!(
        dom.contains(r#"data-loaded="true""#),
        "dashboard did not load its data:\n{dom}"
    );
    // 3 x messages-basic for payments (61/74 tokens, $0.001293 each) and one for search.
    assert!(dom.contains(r#"<b id="k-requests">5</b>"#), "{dom}");
    assert!(dom.contains(r#"<b id="k-denied">1</b>"#));
    assert!(
        dom.contains(r#"<b id="k-tokens">540</b>"#),
        "4 x (61 + 74) tokens"
    );
    assert!(dom.contains(r#"<b id="k-cost">$0.0052</b>"#));
    assert!(
        dom.contains(
            r#"<tr data-name="payments"><td class="name" title="payments">payments</td><td>3</td><td>$0.0039</td>"#
        ),
        "{dom}"
    );
    assert!(dom.contains(
        r#"<tr data-name="rate_limited"><td class="name" title="rate_limited">rate_limited</td><td>1</td>"#
    ));
    assert!(
        dom.contains(
            r#"<tr data-name="bob" class="link"><td class="name" title="bob">bob</td><td>2</td><td>1</td>"#
        ),
        "keys with their denials"
    );

    let artifacts =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/test-artifacts");
    std::fs::create_dir_all(&artifacts).unwrap();
    let shot = artifacts.join("dashboard.png");
    let _ = std::fs::remove_file(&shot);
    let out = flags(&[&format!("--screenshot={}", shot.display())])
        .output()
        .unwrap();
    assert!(
        shot.exists(),
        "no screenshot: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The collector on PostgreSQL (a real server; `make postgres` starts it):
/// records stored idempotently, usage report exact, import idempotent.
#[test]
fn collector_stores_in_postgresql_by_url() {
    let url = std::env::var("TOLLGATE_PG_URL")
        .expect("TOLLGATE_PG_URL (make test starts PostgreSQL and sets it)");
    let team = format!("pg-{}", std::process::id());
    let p = policy(
        r#"{"models": ["claude-*"]}"#,
        &[("pg-key", "tg-audit-pg", &format!(r#""team": "{team}""#))],
    );
    let (grpc, http) = (free_port(), free_port());
    let mut c = Command::new(tollgate_bin())
        .args([
            "collector",
            "--listen",
            &grpc,
            "--http",
            &http,
            "--db",
            &url,
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(800));
    let gw = Gateway::start_with(
        &p,
        Options {
            external_collector: Some(grpc.clone()),
            ..Options::default()
        },
    );
    for i in 0..3 {
        let r = gw.post_with(
            "/v1/messages",
            &[
                ("x-api-key", "tg-audit-pg"),
                ("x-request-id", &format!("{team}-{i}")),
            ],
            MSG,
        );
        assert_eq!(r.status(), 200);
        let _ = r.text();
    }
    let usage = || {
        let out = cli_ok(Command::new(tollgate_bin()).args([
            "usage", "--by", "team", "--since", "1h", "--format", "json", "--db", &url,
        ]));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        v["rows"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["name"] == team.as_str())
            .cloned()
    };
    let deadline = Instant::now() + Duration::from_secs(15);
    let row = loop {
        if let Some(r) = usage().filter(|r| r["requests"] == 3) {
            break r;
        }
        if Instant::now() > deadline {
            let _ = c.kill();
            let out = c.wait_with_output().unwrap();
            panic!(
                "no PostgreSQL rows for {team}: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(300));
    };
    assert_eq!(
        (row["input_tokens"].as_u64(), row["output_tokens"].as_u64()),
        (Some(3 * 61), Some(3 * 74))
    );
    let out = Command::new(tollgate_bin())
        .args(["audit", "import"])
        .arg(&gw.audit_log)
        .args(["--db", &url])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(", 0 new or completed,"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let out = Command::new(tollgate_bin())
        .args([
            "audit", "tail", "--format", "json", "-n", "1000", "--db", &url,
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        text.lines()
            .filter(|l| l.contains(&format!("\"request_id\":\"{team}-")))
            .count(),
        3
    );
    let _ = c.kill();
    let _ = c.wait();
}

#[test]
fn collector_absent_at_start_loses_nothing_once_it_arrives_or_the_file_is_imported() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("audit.db");
    let (grpc, http) = (free_port(), free_port());
    // Nothing listens on `grpc` yet.
    let gw = Gateway::start_with(
        &audit_policy(),
        Options {
            external_collector: Some(grpc.clone()),
            ..Options::default()
        },
    );
    for i in 0..10 {
        let r = gw.post_with(
            "/v1/messages",
            &[("x-api-key", KEY), ("x-request-id", &format!("absent-{i}"))],
            MSG,
        );
        assert_eq!(r.status(), 200, "requests flow without a collector");
        let _ = r.text();
    }
    let mut c = collector(&grpc, &http, &db);
    for i in 10..15 {
        let r = gw.post_with(
            "/v1/messages",
            &[("x-api-key", KEY), ("x-request-id", &format!("absent-{i}"))],
            MSG,
        );
        assert_eq!(r.status(), 200);
        let _ = r.text();
    }
    std::thread::sleep(Duration::from_millis(2500));
    c.kill().unwrap();
    c.wait().unwrap();
    // Whatever the gRPC stream lost shows as gaps in the Envoy's numbers:
    // every request is either stored or counted missing.
    let gaps = || audit_gaps(&db);
    let numbered = || -> Vec<serde_json::Value> {
        let out = Command::new(tollgate_bin())
            .args(["audit", "tail", "--format", "json", "-n", "1000", "--db"])
            .arg(&db)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|r| r["origin"]["seq"].is_u64())
            .collect()
    };
    let lost = gaps();
    let stored = numbered().len() as u64;
    assert_eq!(lost["missing"].as_u64().unwrap() + stored, 15, "{lost}");
    cli_ok(
        Command::new(tollgate_bin())
            .args(["audit", "import"])
            .arg(&gw.audit_log)
            .arg("--db")
            .arg(&db),
    );
    // The imported records fill every gap.
    let after = gaps();
    assert_eq!(
        (
            after["missing"].as_u64(),
            after["gaps"].as_array().map(Vec::len)
        ),
        (Some(0), Some(0)),
        "{after}"
    );
    assert_numbered_without_holes(&numbered(), 15);
    let out = Command::new(tollgate_bin())
        .args(["audit", "tail", "--format", "json", "-n", "1000", "--db"])
        .arg(&db)
        .output()
        .unwrap();
    let complete = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains("\"request_id\":\"absent-") && l.contains("\"complete\":true"))
        .count();
    assert_eq!(complete, 15, "every request has its complete record");
}

/// `records` are `total` requests numbered 1, 2, 3, … without a hole in
/// each worker's stream (`origin.envoy`: the Envoy's replica id, `/`, the
/// worker), all streams of one Envoy.
fn assert_numbered_without_holes(records: &[serde_json::Value], total: usize) {
    let mut streams: std::collections::BTreeMap<String, Vec<u64>> = Default::default();
    for r in records {
        let envoy = r["origin"]["envoy"].as_str().unwrap().to_string();
        streams
            .entry(envoy)
            .or_default()
            .push(r["origin"]["seq"].as_u64().unwrap());
    }
    let replicas: std::collections::BTreeSet<&str> = streams
        .keys()
        .map(|s| s.split_once('/').map_or(s.as_str(), |(replica, _)| replica))
        .collect();
    assert_eq!(replicas.len(), 1, "one Envoy: {streams:?}");
    for (stream, seqs) in streams.iter_mut() {
        seqs.sort_unstable();
        let whole: Vec<u64> = (1..=seqs.len() as u64).collect();
        assert_eq!(*seqs, whole, "stream {stream}");
    }
    assert_eq!(streams.values().map(Vec::len).sum::<usize>(), total);
}

/// `tollgate audit gaps` on a store, every gap settled, as JSON.
fn audit_gaps(db: &std::path::Path) -> serde_json::Value {
    let out = cli_ok(
        Command::new(tollgate_bin())
            .args([
                "audit", "gaps", "--settle", "0s", "--format", "json", "--db",
            ])
            .arg(db),
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The JSON records of a file access log (`-` lines skipped); panics on a
/// line that is not a record, so a torn line fails the test.
fn file_records(path: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter(|l| !l.trim().is_empty() && l.trim() != "-")
        .map(|l| {
            serde_json::from_str(l)
                .unwrap_or_else(|e| panic!("{}: not a record ({e}): {l}", path.display()))
        })
        .collect()
}

/// The audit file log and its rotated files in `dir`.
fn log_files(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("audit.jsonl"))
        })
        .collect();
    files.sort();
    files
}

/// Waits until the HTTP side of a collector answers `/healthz`.
fn wait_http(http: &str) {
    let client = reqwest::blocking::Client::new();
    let deadline = Instant::now() + Duration::from_secs(15);
    while client
        .get(format!("http://{http}/healthz"))
        .send()
        .map_or(true, |r| !r.status().is_success())
    {
        assert!(Instant::now() < deadline, "collector http {http} not up");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// POSTs a body to `/api/ingest`, retrying while the collector is still
/// reading its store (503); the status and the JSON answer.
fn ingest(http: &str, body: String) -> (u16, serde_json::Value) {
    let client = reqwest::blocking::Client::new();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let r = client
            .post(format!("http://{http}/api/ingest"))
            .header("content-type", "application/x-ndjson")
            .body(body.clone())
            .send()
            .unwrap();
        let status = r.status().as_u16();
        if status != 503 || Instant::now() > deadline {
            return (status, r.json().unwrap());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Every record a gateway logged to its audit.jsonl, POSTed to a second
/// collector's `/api/ingest` (as Vector or Fluent Bit would ship it), is
/// stored there exactly as the gateway's own collector stored it.
#[test]
fn a_real_gateways_file_log_posted_to_another_collector_is_stored_whole() {
    // One worker: one numbering stream, so the gaps held back below are
    // known numbers.
    let gw = Gateway::start_with(
        &audit_policy(),
        Options {
            concurrency: 1,
            ..Options::default()
        },
    );
    let mut ids = Vec::new();
    for i in 0..10 {
        let id = format!("ship-{i}");
        let (key, body) = match i {
            3 => ("tg-audit-nobody", MSG),
            5 => (
                KEY,
                r#"{"model":"claude-sonnet-4-5","max_tokens":300,"stream":true,"messages":[]}"#,
            ),
            7 => (KEY, r#"{"model":"o3-pro","max_tokens":5,"messages":[]}"#),
            _ => (KEY, MSG),
        };
        let r = gw.post_with(
            "/v1/messages",
            &[("x-api-key", key), ("x-request-id", &id)],
            body,
        );
        let _ = r.text();
        ids.push(id);
    }
    // Envoy flushes the file every second.
    let deadline = Instant::now() + Duration::from_secs(15);
    let lines: Vec<String> = loop {
        let text = std::fs::read_to_string(&gw.audit_log).unwrap_or_default();
        let lines: Vec<String> = text
            .lines()
            .filter(|l| l.contains("\"request_id\":\"ship-"))
            .map(str::to_string)
            .collect();
        if lines.len() == ids.len() {
            break lines;
        }
        assert!(Instant::now() < deadline, "file log has {lines:?}");
        std::thread::sleep(Duration::from_millis(200));
    };

    // The Envoy's workers numbered their requests 1, 2, 3, … without a hole.
    let record = |l: &String| -> serde_json::Value { serde_json::from_str(l).unwrap() };
    let records: Vec<serde_json::Value> = lines.iter().map(record).collect();
    assert_numbered_without_holes(&records, 10);
    let mut lines = lines;
    lines.sort_by_key(|l| record(l)["origin"]["seq"].as_u64());

    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("second.db");
    let (grpc, http) = (free_port(), free_port());
    let mut c = collector(&grpc, &http, &db);
    wait_http(&http);
    let gaps = || audit_gaps(&db);
    // Records 4, 5 and 8 held back (as if lost on the way).
    let first: Vec<String> = lines
        .iter()
        .enumerate()
        .filter(|(i, _)| ![3, 4, 7].contains(i))
        .map(|(_, l)| l.clone())
        .collect();
    let (status, answer) = ingest(&http, first.join("\n"));
    assert_eq!(status, 200, "{answer}");
    assert_eq!(
        answer,
        serde_json::json!({"lines": 7, "stored": 7, "duplicates": 0, "expired": 0, "invalid": 0})
    );
    let held_back = gaps();
    assert_eq!(held_back["missing"], 3, "{held_back}");
    assert_eq!(
        held_back["gaps"]
            .as_array()
            .unwrap()
            .iter()
            .map(|g| (
                g["from_seq"].as_u64().unwrap(),
                g["to_seq"].as_u64().unwrap()
            ))
            .collect::<Vec<_>>(),
        [(4, 5), (8, 8)]
    );
    // The whole file, as a shipper that resends after a timeout would: the
    // seven are duplicates, the three new ones fill the gaps.
    let (status, all) = ingest(&http, lines.join("\n") + "\n-\n");
    assert_eq!(status, 200, "{all}");
    assert_eq!(
        all,
        serde_json::json!({"lines": 10, "stored": 3, "duplicates": 7, "expired": 0, "invalid": 0})
    );
    assert_eq!(gaps()["missing"], 0);
    let (status, garbage) = ingest(&http, "GET / HTTP/1.1\nhello".to_string());
    assert_eq!(status, 400);
    assert!(
        garbage["error"]
            .as_str()
            .unwrap()
            .starts_with("no audit record in the body (line 1: "),
        "{garbage}"
    );

    let out = Command::new(tollgate_bin())
        .args(["audit", "tail", "--format", "json", "-n", "1000", "--db"])
        .arg(&db)
        .output()
        .unwrap();
    let shipped: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(shipped.len(), ids.len());
    for id in &ids {
        let there = shipped.iter().find(|r| r["request_id"] == id.as_str());
        assert_eq!(there, Some(&gw.audit_record(id)), "{id}");
    }
    let _ = c.kill();
    let _ = c.wait();
}

/// A small size limit rotates audit.jsonl many times under a steady stream
/// of requests: every line is whole, every request is in exactly one file,
/// and the collector stored every one.
#[test]
fn the_file_log_rotates_by_size_without_losing_a_line() {
    let gw = Gateway::start_with(
        &audit_policy(),
        Options {
            extra_args: ["--audit-log-max-bytes", "8192", "--audit-log-keep", "1000"]
                .map(String::from)
                .to_vec(),
            ..Options::default()
        },
    );
    let mut sent = Vec::new();
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(5) {
        let id = format!("rot-{}", sent.len());
        let status = gw
            .post_with(
                "/v1/messages",
                &[("x-api-key", KEY), ("x-request-id", &id)],
                MSG,
            )
            .status();
        assert_eq!(status, 200);
        sent.push(id);
        std::thread::sleep(Duration::from_millis(10));
    }
    let dir = gw.audit_log.parent().unwrap().to_path_buf();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let mut in_files: Vec<String> = log_files(&dir)
            .iter()
            .flat_map(|f| file_records(f))
            .filter(|r| r["complete"] == true)
            .map(|r| r["request_id"].as_str().unwrap().to_string())
            .collect();
        in_files.sort();
        let mut want = sent.clone();
        want.sort();
        if in_files == want {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the files hold {} records for {} requests",
            in_files.len(),
            sent.len()
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    let files = log_files(&dir);
    assert!(
        files.len() >= 3,
        "rotated at least twice in 5 s at 8 KiB: {files:?}"
    );
    assert!(files.contains(&dir.join("audit.jsonl.1")));
    let stored: std::collections::HashSet<String> = gw
        .audit_records()
        .into_iter()
        .filter(|r| r["complete"] == true)
        .map(|r| r["request_id"].as_str().unwrap().to_string())
        .collect();
    for id in &sent {
        assert!(stored.contains(id), "{id} not in the store");
    }
}

/// Writes need the collector's write token: a POST to the gateway's own
/// collector without it (or with another) is refused and stores nothing,
/// while Envoy's access-log stream, which carries the token `tollgate run`
/// gave it, keeps storing every request; a log shipper holding the token
/// from the state directory is let in.
#[test]
fn an_unauthenticated_write_to_the_collector_is_refused() {
    let gw = Gateway::start(&audit_policy());
    let r = gw.post_with(
        "/v1/messages",
        &[("x-api-key", KEY), ("x-request-id", "auth-envoy")],
        MSG,
    );
    assert_eq!(r.status(), 200);
    // Stored through Envoy's authenticated stream.
    let mut forged = gw.audit_record("auth-envoy");
    let http = gw.collector_http.clone().unwrap();
    let token_file = gw.dir.path().join("state/collector-token");
    let token = std::fs::read_to_string(&token_file).unwrap();
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&token_file).unwrap().permissions().mode() & 0o777,
        0o600
    );
    forged["request_id"] = "auth-forged".into();
    forged["cost_usd"] = 1000.0.into();
    let client = reqwest::blocking::Client::new();
    let post = |auth: Option<String>| {
        let mut req = client
            .post(format!("{http}/api/ingest"))
            .body(format!("{forged}\n"));
        if let Some(a) = auth {
            req = req.header("authorization", a);
        }
        let r = req.send().unwrap();
        (r.status().as_u16(), r.text().unwrap())
    };
    for auth in [None, Some("Bearer not-the-token".to_string())] {
        let (status, body) = post(auth);
        assert_eq!(status, 401, "{body}");
        assert!(
            body.contains("writing audit records needs the collector's write token"),
            "{body}"
        );
    }
    let stored = |id: &str| {
        let out = cli_ok(
            Command::new(tollgate_bin())
                .args(["audit", "tail", "--format", "json", "-n", "100", "--db"])
                .arg(&gw.audit_db),
        );
        String::from_utf8_lossy(&out.stdout).contains(id)
    };
    assert!(!stored("auth-forged"), "a refused write stored nothing");
    let (status, body) = post(Some(format!("Bearer {}", token.trim())));
    assert_eq!(status, 200, "{body}");
    assert!(stored("auth-forged"));
}
