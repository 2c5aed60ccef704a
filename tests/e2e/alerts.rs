//! Budget alerts through the real Envoy and the real collector: a key's
//! daily token quota with `"alerts": [0.5, 1.0]`, a webhook receiver run by
//! the test, and requests that cross 50% then 100%. Exactly one event per
//! threshold arrives; neither further requests nor a second collector
//! process on the same store (as after a restart) repeat one.

use serde_json::Value;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tollgate_e2e::{policy, tollgate_bin, Gateway, Options};

/// A webhook that answers 200 and keeps every JSON body it receives.
struct Receiver {
    url: String,
    events: Arc<Mutex<Vec<Value>>>,
}

impl Receiver {
    fn start() -> Receiver {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/hooks/tollgate", listener.local_addr().unwrap());
        let events = Arc::new(Mutex::new(Vec::new()));
        let kept = events.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { continue };
                let mut reader = BufReader::new(conn.try_clone().unwrap());
                let mut len = 0usize;
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                        break;
                    }
                    if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                        len = v.trim().parse().unwrap();
                    }
                }
                let mut body = vec![0u8; len];
                reader.read_exact(&mut body).unwrap();
                kept.lock()
                    .unwrap()
                    .push(serde_json::from_slice(&body).unwrap());
                let _ = conn.write_all(
                    b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
                );
            }
        });
        Receiver { url, events }
    }

    fn events(&self) -> Vec<Value> {
        self.events.lock().unwrap().clone()
    }

    /// Polls until `n` events arrived (at most 20 s).
    fn wait_for(&self, n: usize) -> Vec<Value> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let events = self.events();
            if events.len() >= n {
                return events;
            }
            assert!(
                Instant::now() < deadline,
                "{} of {n} events: {events:?}",
                events.len()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// Tokens of one `messages-basic` reply of the mock, every class.
fn tokens_per_request() -> u64 {
    let exchanges: Value = serde_json::from_str(
        &std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/exchanges.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let usage = &exchanges
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "messages-basic")
        .unwrap()["usage"];
    [
        "input",
        "output",
        "cache_write",
        "cache_write_1h",
        "cache_read",
    ]
    .iter()
    .map(|c| usage[*c].as_u64().unwrap())
    .sum()
}

const BODY: &str =
    r#"{"model":"claude-haiku-4-5","max_tokens":100,"messages":[{"role":"user","content":"hi"}]}"#;

fn send(gw: &Gateway, id: &str) -> u16 {
    gw.post_with(
        "/v1/messages",
        &[
            ("x-api-key", "tg-alerted"),
            ("x-request-id", id),
            ("x-mock-exchange", "messages-basic"),
        ],
        BODY,
    )
    .status()
    .as_u16()
}

/// One sample of the collector's /metrics, polled until it reads `value`.
fn wait_for_sample(http: &str, sample: &str, value: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    let want = format!("{sample} {value}\n");
    loop {
        let text = reqwest::blocking::get(format!("{http}/metrics"))
            .and_then(|r| r.text())
            .unwrap_or_default();
        if text.contains(&want) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "no {want:?} in /metrics:\n{}",
            text.lines()
                .filter(|l| l.starts_with("tollgate_budget") || l.starts_with("tollgate_alert"))
                .collect::<Vec<_>>()
                .join("\n")
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A standalone `tollgate collector` on the gateway's store, stopped on drop.
struct Collector(Child);

impl Collector {
    /// A `tollgate collector` on `db` watching `policy`'s alerts and
    /// posting them to `webhook`.
    fn start(
        listen: &str,
        http: &str,
        db: &std::path::Path,
        policy: &std::path::Path,
        webhook: &str,
    ) -> Collector {
        Collector(
            Command::new(tollgate_bin())
                .args(["collector", "--listen", listen, "--http", http, "--db"])
                .arg(db)
                .arg("--policy")
                .arg(policy)
                .args(["--alert-webhook", webhook])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        )
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        unsafe {
            libc::kill(self.0.id() as i32, libc::SIGTERM);
        }
        let _ = self.0.wait();
    }
}

fn free_addr() -> String {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .to_string()
}

#[test]
fn a_daily_quota_sends_one_event_per_threshold_and_never_repeats_it() {
    let t = tokens_per_request();
    // Four requests fill the quota: 25%, 50%, 75%, 100%.
    let limit = 4 * t;
    let webhook = Receiver::start();
    let gw = Gateway::start_with(
        &policy(
            r#"{"models": ["claude-*"]}"#,
            &[(
                "alerted",
                "tg-alerted",
                &format!(r#""limits": {{"tokens_per_day": {limit}, "alerts": [0.5, 1.0]}}"#),
            )],
        ),
        Options {
            extra_args: vec!["--alert-webhook".into(), webhook.url.clone()],
            ..Options::default()
        },
    );
    let http = gw.collector_http.clone().unwrap();
    let gauge = r#"tollgate_budget_used{entity="key:alerted",limit="tokens_per_day"}"#;
    assert_eq!(send(&gw, "alert-1"), 200);
    wait_for_sample(&http, gauge, &t.to_string());
    assert_eq!(webhook.events(), [] as [Value; 0], "25% crosses nothing");

    assert_eq!(send(&gw, "alert-2"), 200);
    let events = webhook.wait_for(1);
    let record = gw.audit_record("alert-2");
    let day = &tollgate_core::time::format_rfc3339(record["timestamp_ms"].as_u64().unwrap())[..10];
    let e = &events[0];
    assert_eq!(
        (
            &e["entity"],
            &e["limit"],
            &e["threshold"],
            &e["used"],
            &e["limit_value"],
            &e["window"]["period"],
            &e["window"]["name"],
        ),
        (
            &Value::from("key:alerted"),
            &Value::from("tokens_per_day"),
            &Value::from(0.5),
            &Value::from((2 * t) as f64),
            &Value::from(limit as f64),
            &Value::from("day"),
            &Value::from(day),
        )
    );
    assert_eq!(
        e["text"],
        format!(
            "Tollgate: key:alerted reached 50% of its tokens_per_day ({} tokens of {limit} tokens) for day {day}",
            2 * t
        )
    );
    assert_eq!(e["window"]["start"], format!("{day}T00:00:00Z"));

    // 75%: counted (the gauge says so), no event.
    assert_eq!(send(&gw, "alert-3"), 200);
    wait_for_sample(&http, gauge, &(3 * t).to_string());
    wait_for_sample(&http, "tollgate_alerts_delivered_total", "1");
    assert_eq!(webhook.events().len(), 1);

    assert_eq!(send(&gw, "alert-4"), 200);
    let events = webhook.wait_for(2);
    assert_eq!(
        (&events[1]["threshold"], &events[1]["used"]),
        (&Value::from(1.0), &Value::from(limit as f64))
    );
    // The quota is spent: refused, charged nothing, no event.
    assert_eq!(send(&gw, "alert-5"), 429);
    gw.audit_record("alert-5");
    wait_for_sample(
        &http,
        r#"tollgate_budget_used_ratio{entity="key:alerted",limit="tokens_per_day"}"#,
        "1",
    );

    // A second collector process on the same store, as after a restart:
    // it counts the day from the store, finds both thresholds recorded,
    // and a record it ingests itself (past 100%) adds no event either.
    let policy_path = gw.policy.clone();
    let http2 = free_addr();
    let second = Collector::start(
        "127.0.0.1:0",
        &http2,
        &gw.audit_db,
        &policy_path,
        &webhook.url,
    );
    let http2 = format!("http://{http2}");
    wait_for_sample(&http2, gauge, &limit.to_string());
    let mut late = record.clone();
    late["request_id"] = "alert-late".into();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let r = reqwest::blocking::Client::new()
            .post(format!("{http2}/api/ingest"))
            .body(format!("{late}\n"))
            .send();
        if matches!(&r, Ok(r) if r.status().is_success()) {
            break;
        }
        assert!(Instant::now() < deadline, "ingest refused: {r:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
    wait_for_sample(&http2, gauge, &(5 * t).to_string());
    // Absence needs a wait: a crossing is recorded before /api/ingest
    // answers and the sender, woken by it, posts within milliseconds; 1.5 s
    // is the margin.
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(webhook.events().len(), 2, "{:?}", webhook.events());
    drop(second);
}

/// Complete records stored in `db` whose request id starts with `prefix`.
fn complete_records(db: &std::path::Path, prefix: &str) -> usize {
    let out = Command::new(tollgate_bin())
        .args(["audit", "tail", "--format", "json", "-n", "1000", "--db"])
        .arg(db)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|r| {
            r["complete"] == true && r["request_id"].as_str().unwrap_or("").starts_with(prefix)
        })
        .count()
}

#[test]
fn a_team_pool_crossing_50_and_80_percent_through_two_envoys_sends_two_events() {
    // 135 tokens a request at $1,000 per million either way: $0.135 each,
    // ten of them fill the pool's $1.35 a day.
    let policy_json = format!(
        r#"{{"version": 1, "defaults": {{"models": ["claude-*"]}},
            "prices": {{"claude-*": {{"input": 1000, "output": 1000}}}},
            "pools": {{"team:payments": {{"budget_usd_per_day": 1.35, "alerts": [0.5, 0.8]}}}},
            "keys": [{{"id": "alice", "key_sha256": "{}", "team": "payments"}},
                     {{"id": "bob", "key_sha256": "{}", "team": "payments"}}]}}"#,
        tollgate_e2e::sha("tg-alice"),
        tollgate_e2e::sha("tg-bob")
    );
    assert_eq!(tokens_per_request(), 135);
    let webhook = Receiver::start();
    let dir = tempfile::tempdir().unwrap();
    let (policy_path, db) = (dir.path().join("policy.json"), dir.path().join("audit.db"));
    std::fs::write(&policy_path, &policy_json).unwrap();
    let (grpc, http) = (free_addr(), free_addr());
    let _collector = Collector::start(&grpc, &http, &db, &policy_path, &webhook.url);
    let envoys: Vec<Gateway> = (0..2)
        .map(|_| {
            Gateway::start_with(
                &policy_json,
                Options {
                    external_collector: Some(grpc.clone()),
                    ..Options::default()
                },
            )
        })
        .collect();
    // Nine requests, alternating replicas and keys: 90% of the pool.
    for i in 0..9 {
        let (gw, key) = [(&envoys[0], "tg-alice"), (&envoys[1], "tg-bob")][i % 2];
        let r = gw.post_with(
            "/v1/messages",
            &[
                ("x-api-key", key),
                ("x-request-id", &format!("pool-{i}")),
                ("x-mock-exchange", "messages-basic"),
            ],
            BODY,
        );
        assert_eq!(r.status().as_u16(), 200, "request {i}");
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while complete_records(&db, "pool-") < 9 {
        assert!(
            Instant::now() < deadline,
            "the collector did not store the 9 records"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    webhook.wait_for(2);
    // Absence needs a wait: every record is stored and counted, and the
    // sender posts what they crossed within milliseconds; 1.5 s is margin.
    std::thread::sleep(Duration::from_millis(1500));
    let events = webhook.events();
    let got: Vec<(&Value, &Value, &Value)> = events
        .iter()
        .map(|e| (&e["entity"], &e["limit"], &e["threshold"]))
        .collect();
    let (pool, limit) = (
        Value::from("pool:team:payments"),
        Value::from("budget_usd_per_day"),
    );
    assert_eq!(
        got,
        [
            (&pool, &limit, &Value::from(0.5)),
            (&pool, &limit, &Value::from(0.8))
        ]
    );
    assert!(
        events[0]["text"].as_str().unwrap().starts_with(
            "Tollgate: pool:team:payments reached 50% of its budget_usd_per_day (USD "
        ),
        "{}",
        events[0]["text"]
    );
    // `used` is the use counted when the crossing was seen: the records
    // arrive in batches, so anywhere from the crossing request to all nine.
    for (e, at_least) in events.iter().zip([5.0 * 0.135, 8.0 * 0.135]) {
        let used = e["used"].as_f64().unwrap();
        assert!(used > at_least - 1e-9 && used < 9.0 * 0.135 + 1e-9, "{e}");
        assert_eq!(e["limit_value"], 1.35);
    }
}
