//! Crossing, dedup and window rollover, through the store as the collector
//! runs them (`store_counted`), with a policy inline.

use super::super::store::AuditStore;
use super::super::{store_counted_at, Stats};
use super::engine::{Period, WindowId};
use super::*;
use std::collections::HashSet;
use std::sync::Arc;
use tollgate_core::audit::Tokens;

const DAY: u64 = 86_400_000;
/// 2026-12-05T00:00:00Z.
const DEC_5: u64 = 1_796_428_800_000;
/// What the alerts take as now in these tests: 2026-12-06T01:00:00Z, so
/// that 5 and 6 December are both live windows whatever the wall clock.
const NOW: u64 = DEC_5 + DAY + 3_600_000;

fn policy(json: &str) -> Policy {
    tollgate_core::policy::compile(json.as_bytes(), "p.json", 0)
        .unwrap()
        .0
}

fn key_policy(alerts: &str, zone: &str) -> Policy {
    policy(&format!(
        r#"{{"version":1,"settings":{{"time_zone":"{zone}","default_price":{{"input":1,"output":1}}}},
            "pools":{{"team:payments":{{"budget_usd_per_month":10,"alerts":[0.5]}}}},
            "keys":[{{"id":"ci-bot","key_sha256":"{}","team":"payments",
                      "limits":{{"requests_per_minute":5,"tokens_per_day":1000,"alerts":{alerts}}}}}]}}"#,
        tollgate_core::vkey::sha256_hex("tg-ci")
    ))
}

fn record(id: &str, at: u64, tokens: u64, usd: f64) -> AuditRecord {
    AuditRecord {
        request_id: id.into(),
        timestamp_ms: at,
        complete: true,
        key_id: Some("ci-bot".into()),
        team: Some("payments".into()),
        route: "anthropic.messages".into(),
        tokens: Tokens {
            input: Some(tokens / 2),
            output: Some(tokens - tokens / 2),
            ..Default::default()
        },
        cost_usd: Some(usd),
        ..Default::default()
    }
}

struct Fixture {
    _dir: tempfile::TempDir,
    store: AuditStore,
    stats: Arc<Stats>,
}

fn fixture(p: &Policy) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let store = AuditStore::open(dir.path().join("a.db")).unwrap();
    let stats = Arc::new(Stats::default());
    stats.alerts.with_webhook();
    stats.alerts.set_policy(p);
    Fixture {
        _dir: dir,
        store,
        stats,
    }
}

impl Fixture {
    fn ingest(&self, records: &[AuditRecord]) {
        store_counted_at(&self.store, &self.stats, records, NOW).unwrap();
    }

    /// (entity, limit, threshold, window name) of every recorded alert.
    fn sent(&self) -> Vec<(String, String, f64, String)> {
        self.store
            .alerts()
            .unwrap()
            .iter()
            .map(|a| {
                let e: serde_json::Value = serde_json::from_str(&a.event).unwrap();
                (
                    a.entity.clone(),
                    a.limit.clone(),
                    e["threshold"].as_f64().unwrap(),
                    e["window"]["name"].as_str().unwrap().to_string(),
                )
            })
            .collect()
    }
}

fn sent(entity: &str, limit: &str, t: f64, window: &str) -> (String, String, f64, String) {
    (entity.into(), limit.into(), t, window.into())
}

#[test]
fn sends_one_event_per_threshold_crossed_and_none_for_further_requests() {
    let f = fixture(&key_policy("[0.5, 0.8, 1.0]", "UTC"));
    f.ingest(&[record("r1", DEC_5 + 1000, 400, 0.0)]);
    assert_eq!(f.sent(), [], "40% crosses nothing");
    // 400 + 450 = 850: past 50% and 80% in one batch, one event each.
    f.ingest(&[record("r2", DEC_5 + 2000, 450, 0.0)]);
    assert_eq!(
        f.sent(),
        [
            sent("key:ci-bot", "tokens_per_day", 0.5, "2026-12-05"),
            sent("key:ci-bot", "tokens_per_day", 0.8, "2026-12-05"),
        ]
    );
    // Replayed (stored already): no usage, no event.
    f.ingest(&[record("r2", DEC_5 + 2000, 450, 0.0)]);
    f.ingest(&[record("r3", DEC_5 + 3000, 100, 0.0)]);
    f.ingest(&[record("r4", DEC_5 + 4000, 100, 0.0)]);
    assert_eq!(f.sent().len(), 3);
    assert_eq!(
        f.sent()[2],
        sent("key:ci-bot", "tokens_per_day", 1.0, "2026-12-05")
    );
    f.ingest(&[record("r5", DEC_5 + 5000, 500, 0.0)]);
    assert_eq!(f.sent().len(), 3, "past 100% nothing more");
    // Each recorded event waits for the webhook.
    let pending = f.store.due_alerts(u64::MAX, 10).unwrap();
    assert_eq!(pending.len(), 3);
}

#[test]
fn the_event_names_entity_limit_used_threshold_and_window_with_a_slack_text() {
    let f = fixture(&key_policy("[0.5]", "+02:00"));
    // 23:30 UTC on Dec 4 is 01:30 on Dec 5 at +02:00: that day's window.
    let at = DEC_5 - 30 * 60_000;
    f.ingest(&[record("r1", at, 520, 0.0)]);
    let alerts = f.store.alerts().unwrap();
    assert_eq!(alerts.len(), 1);
    let mut event: serde_json::Value = serde_json::from_str(&alerts[0].event).unwrap();
    event["at"] = "…".into();
    assert_eq!(
        event,
        serde_json::json!({
            "id": "key:ci-bot/tokens_per_day/0.5/2026-12-05",
            "entity": "key:ci-bot",
            "limit": "tokens_per_day",
            "threshold": 0.5,
            "used": 520.0,
            "limit_value": 1000.0,
            "ratio": 0.52,
            "window": {
                "period": "day",
                "name": "2026-12-05",
                "start": "2026-12-04T22:00:00Z",
                "end": "2026-12-05T22:00:00Z"
            },
            "at": "…",
            "text": "Tollgate: key:ci-bot reached 50% of its tokens_per_day (520 tokens of 1000 tokens) for day 2026-12-05"
        })
    );
    assert_eq!(
        (
            alerts[0].threshold_ppm,
            alerts[0].window_start_ms,
            alerts[0].delivered_ms
        ),
        (500_000, DEC_5 - 2 * 3_600_000, None)
    );
}

#[test]
fn a_new_day_counts_from_zero_and_alerts_again_while_the_month_keeps_counting() {
    let f = fixture(&key_policy("[0.5]", "UTC"));
    f.ingest(&[record("d1", DEC_5 + 1000, 600, 3.0)]);
    f.ingest(&[record("d2", DEC_5 + DAY + 1000, 300, 3.0)]);
    assert_eq!(
        f.sent(),
        [
            sent("key:ci-bot", "tokens_per_day", 0.5, "2026-12-05"),
            sent("pool:team:payments", "budget_usd_per_month", 0.5, "2026-12"),
        ],
        "300 tokens on Dec 6 is 30% of that day; $6 of $10 is the month's 60%"
    );
    f.ingest(&[record("d3", DEC_5 + DAY + 2000, 300, 0.0)]);
    assert_eq!(
        f.sent()[2],
        sent("key:ci-bot", "tokens_per_day", 0.5, "2026-12-06")
    );
    // A record of Dec 5 arriving late counts into Dec 5, which has its
    // event already.
    f.ingest(&[record("late", DEC_5 + 5000, 500, 0.0)]);
    assert_eq!(f.sent().len(), 3);
}

#[test]
fn records_of_a_day_over_for_more_than_a_day_alert_nothing() {
    let f = fixture(&key_policy("[0.5]", "UTC"));
    // Dec 2 ended 3 days before NOW: an import of history, not news.
    f.ingest(&[record("old", DEC_5 - 3 * DAY, 900, 0.0)]);
    assert_eq!(f.sent(), []);
}

#[test]
fn a_restarted_collector_counts_from_the_store_and_repeats_nothing() {
    let p = key_policy("[0.5, 1.0]", "UTC");
    let f = fixture(&p);
    f.ingest(&[record("r1", DEC_5 + 1000, 700, 0.0)]);
    assert_eq!(f.sent().len(), 1);
    // A new collector on the same store: counts Dec 5 from the store.
    let restarted = Fixture {
        _dir: tempfile::tempdir().unwrap(),
        store: f.store.clone(),
        stats: Arc::new(Stats::default()),
    };
    restarted.stats.alerts.with_webhook();
    restarted.stats.alerts.set_policy(&p);
    restarted.stats.alerts.refresh(&f.store, DEC_5 + 2000);
    restarted.ingest(&[record("r2", DEC_5 + 3000, 100, 0.0)]);
    assert_eq!(restarted.sent().len(), 1, "800 of 1000: nothing new");
    restarted.ingest(&[record("r3", DEC_5 + 4000, 200, 0.0)]);
    assert_eq!(
        restarted.sent(),
        [
            sent("key:ci-bot", "tokens_per_day", 0.5, "2026-12-05"),
            sent("key:ci-bot", "tokens_per_day", 1.0, "2026-12-05"),
        ]
    );
}

#[test]
fn a_complete_record_counts_what_it_adds_to_its_provisional_one() {
    let f = fixture(&key_policy("[0.5]", "UTC"));
    let mut provisional = record("r1", DEC_5 + 1000, 400, 0.0);
    provisional.complete = false;
    f.ingest(&[provisional]);
    f.ingest(&[record("r1", DEC_5 + 1000, 450, 0.0)]);
    assert_eq!(f.sent(), [], "450, not 850");
    f.ingest(&[record("r2", DEC_5 + 2000, 50, 0.0)]);
    assert_eq!(f.sent().len(), 1);
}

#[test]
fn a_lowered_limit_alerts_at_the_next_refresh_and_without_a_policy_nothing_counts() {
    let f = fixture(&key_policy("[0.5]", "UTC"));
    let now = NOW;
    f.ingest(&[record("r1", now, 300, 0.0)]);
    assert_eq!(f.sent(), []);
    f.stats.alerts.set_policy(&policy(&format!(
        r#"{{"version":1,"keys":[{{"id":"ci-bot","key_sha256":"{}","limits":{{"tokens_per_day":500,"alerts":[0.5]}}}}]}}"#,
        tollgate_core::vkey::sha256_hex("tg-ci")
    )));
    f.stats.alerts.refresh(&f.store, now);
    assert_eq!(f.sent().len(), 1, "300 of 500");

    let dir = tempfile::tempdir().unwrap();
    let store = AuditStore::open(dir.path().join("b.db")).unwrap();
    let stats = Stats::default();
    store_counted_at(&store, &stats, &[record("r1", now, 5000, 0.0)], now).unwrap();
    assert_eq!(store.alerts().unwrap(), []);
}

#[test]
fn gauges_show_each_limits_use_in_its_current_window() {
    let f = fixture(&key_policy("[0.5]", "UTC"));
    let now = NOW;
    f.ingest(&[
        record("r1", now, 250, 1.25),
        record("old", now - 40 * DAY, 900, 5.0),
    ]);
    let mut out = String::new();
    f.stats.alerts.render(&mut out, now);
    let samples: Vec<&str> = out.lines().filter(|l| !l.starts_with('#')).collect();
    assert_eq!(
        samples,
        [
            r#"tollgate_budget_used_ratio{entity="key:ci-bot",limit="tokens_per_day"} 0.25"#,
            r#"tollgate_budget_used_ratio{entity="pool:team:payments",limit="budget_usd_per_month"} 0.125"#,
            r#"tollgate_budget_used{entity="key:ci-bot",limit="tokens_per_day"} 250"#,
            r#"tollgate_budget_used{entity="pool:team:payments",limit="budget_usd_per_month"} 1.25"#,
            r#"tollgate_budget_limit{entity="key:ci-bot",limit="tokens_per_day"} 1000"#,
            r#"tollgate_budget_limit{entity="pool:team:payments",limit="budget_usd_per_month"} 10"#,
            "tollgate_alerts_delivered_total 0",
            "tollgate_alert_webhook_failures_total 0",
        ],
        "requests_per_minute has no gauge; a record of 40 days ago is outside both windows"
    );
    // Tomorrow the day's gauge is gone until its window has use.
    let mut out = String::new();
    f.stats.alerts.render(&mut out, now + 2 * DAY);
    assert!(!out.contains("tokens_per_day"), "{out}");
}

#[test]
fn engine_thresholds_need_the_whole_fraction_and_forgotten_crossings_come_back() {
    let p = key_policy("[0.5, 1.0]", "UTC");
    let mut engine = engine::Engine::new(engine::Targets::of(&p));
    let id = WindowId {
        period: Period::Day,
        start: DEC_5,
    };
    let who = identity(&record("r", DEC_5, 0, 0.0));
    engine.seed(id, DEC_5 + DAY, &[]);
    engine.add(
        id,
        &who,
        Used {
            tokens: 499.0,
            usd: 0.0,
        },
    );
    assert_eq!(engine.crossings(id, "key:ci-bot"), []);
    engine.add(
        id,
        &who,
        Used {
            tokens: 1.0,
            usd: 0.0,
        },
    );
    let c = engine.crossings(id, "key:ci-bot");
    assert_eq!(
        c.iter().map(|c| c.threshold).collect::<Vec<_>>(),
        [0.5],
        "500 of 1000 is 50%"
    );
    assert_eq!(engine.crossings(id, "key:ci-bot"), []);
    engine.forget(&c[0]);
    assert_eq!(engine.crossings(id, "key:ci-bot"), c);
}

#[test]
fn retries_back_off_exponentially_up_to_five_minutes() {
    let secs: Vec<u64> = [0, 1, 2, 5, 8, 9, 20]
        .iter()
        .map(|a| webhook::backoff(*a).as_secs())
        .collect();
    assert_eq!(secs, [1, 2, 4, 32, 256, 300, 300]);
}

#[tokio::test]
async fn a_refused_delivery_stays_pending_and_is_retried_until_the_webhook_takes_it() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let f = fixture(&key_policy("[0.5]", "UTC"));
    let (store, stats) = (f.store.clone(), f.stats.clone());
    tokio::task::spawn_blocking(move || {
        // The sender takes what is due by the wall clock: the record is now.
        let now = crate::clock::now_ms();
        store_counted_at(&store, &stats, &[record("r1", now, 600, 0.0)], now).unwrap()
    })
    .await
    .unwrap();
    // A webhook that answers 503 once, then 200; it keeps every body.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    let bodies = Arc::new(Mutex::new(Vec::<String>::new()));
    let kept = bodies.clone();
    tokio::spawn(async move {
        let mut n = 0;
        loop {
            let (mut conn, _) = listener.accept().await.unwrap();
            let mut buf = vec![0u8; 8192];
            let mut got = Vec::new();
            // Headers, then a body of content-length bytes.
            loop {
                let r = conn.read(&mut buf).await.unwrap();
                got.extend_from_slice(&buf[..r]);
                let text = String::from_utf8_lossy(&got).to_string();
                if let Some((head, body)) = text.split_once("\r\n\r\n") {
                    let len: usize = head
                        .lines()
                        .find_map(|l| {
                            l.to_ascii_lowercase()
                                .strip_prefix("content-length: ")
                                .map(|v| v.trim().parse().unwrap())
                        })
                        .unwrap_or(0);
                    if body.len() >= len {
                        kept.lock().unwrap().push(body.to_string());
                        break;
                    }
                }
                if r == 0 {
                    break;
                }
            }
            n += 1;
            let status = if n == 1 {
                "503 Service Unavailable"
            } else {
                "200 OK"
            };
            let _ = conn
                .write_all(
                    format!("HTTP/1.1 {status}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                        .as_bytes(),
                )
                .await;
        }
    });
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let sender = tokio::spawn(webhook::deliver(
        f.store.clone(),
        f.stats.clone(),
        url,
        async move {
            let _ = stop_rx.await;
        },
    ));
    // The first attempt fails, the retry a second later succeeds.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    loop {
        let alerts = f.store.alerts().unwrap();
        if alerts[0].delivered_ms.is_some() {
            assert_eq!(alerts[0].attempts, 2);
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{alerts:?}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let bodies = bodies.lock().unwrap().clone();
    assert_eq!(bodies.len(), 2);
    assert_eq!(bodies[0], bodies[1], "the same event, retried");
    assert!(bodies[0].contains(r#""threshold":0.5"#), "{}", bodies[0]);
    assert_eq!(f.stats.alerts.failed.load(Ordering::Relaxed), 1);
    assert_eq!(f.stats.alerts.delivered.load(Ordering::Relaxed), 1);
    let _ = stop_tx.send(());
    sender.await.unwrap();
}

/// Every `tollgate_*` name in a PromQL expression.
fn metric_names(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = expr;
    while let Some(at) = rest.find("tollgate_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        out.push(tail[..end].to_string());
        rest = &tail[end..];
    }
    out
}

#[test]
fn shipped_alert_rules_and_dashboard_use_only_metrics_the_collector_exports() {
    let exported: HashSet<String> = super::super::metrics::render(&Stats::default())
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split(' ').next())
        .map(str::to_string)
        .collect();
    assert!(exported.contains("tollgate_budget_used_ratio"));

    let rules: serde_yaml::Value = serde_yaml::from_str(include_str!(
        "../../../../deploy/prometheus/tollgate-alerts.yaml"
    ))
    .unwrap();
    let mut rule_exprs = Vec::new();
    for group in rules["groups"].as_sequence().unwrap() {
        assert!(group["name"].as_str().is_some(), "{group:?}");
        for rule in group["rules"].as_sequence().unwrap() {
            let name = rule["alert"].as_str().unwrap();
            assert!(
                rule["labels"]["severity"].as_str().is_some()
                    && rule["annotations"]["summary"].as_str().is_some(),
                "{name}: needs a severity and a summary"
            );
            rule_exprs.push((name.to_string(), rule["expr"].as_str().unwrap().to_string()));
        }
    }

    let dashboard: serde_json::Value = serde_json::from_str(include_str!(
        "../../../../deploy/grafana/tollgate-dashboard.json"
    ))
    .unwrap();
    assert_eq!(dashboard["uid"], "tollgate-budgets");
    let mut panel_exprs = Vec::new();
    let mut ids = HashSet::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        let title = panel["title"].as_str().unwrap();
        assert!(
            ids.insert(panel["id"].as_u64().unwrap()),
            "{title}: id taken"
        );
        for key in ["x", "y", "w", "h"] {
            assert!(panel["gridPos"][key].is_u64(), "{title}: gridPos.{key}");
        }
        for target in panel["targets"].as_array().unwrap() {
            panel_exprs.push((
                title.to_string(),
                target["expr"].as_str().unwrap().to_string(),
            ));
        }
    }

    let mut used = HashSet::new();
    for (what, expr) in rule_exprs.iter().chain(&panel_exprs) {
        let names = metric_names(expr);
        assert!(!names.is_empty(), "{what}: {expr} reads no Tollgate metric");
        for name in names {
            assert!(
                exported.contains(&name),
                "{what}: {name} is not exported by the collector"
            );
            used.insert(name);
        }
    }
    for needed in [
        "tollgate_budget_used_ratio",
        "tollgate_budget_used",
        "tollgate_audit_missing_records",
        "tollgate_alert_webhook_failures_total",
    ] {
        assert!(used.contains(needed), "{needed} is used by neither file");
    }
}
