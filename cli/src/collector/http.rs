//! The collector's HTTP side: Prometheus `/metrics`, `/api/usage` (the same
//! JSON as `tollgate usage --format json`) and a small dashboard at `/`.

use super::report::{parse_since, GroupBy};
use super::store::AuditStore;
use super::Stats;
use axum::extract::{Query, State};
use axum::http::{header, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use std::collections::HashMap;
use std::fmt::Write;
use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Arc;

const DASHBOARD: &str = include_str!("dashboard.html");

/// Label values beyond this many per label are folded into `other`, so a
/// policy with 100k keys cannot explode a Prometheus server.
pub const MAX_SERIES: usize = 200;

#[derive(Clone)]
struct App {
    store: AuditStore,
    stats: Arc<Stats>,
}

pub async fn serve(
    listener: tokio::net::TcpListener,
    store: AuditStore,
    stats: Arc<Stats>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let app = Router::new()
        .route("/", get(|| async { Html(DASHBOARD) }))
        .route("/metrics", get(metrics))
        .route("/api/usage", get(usage))
        .route("/healthz", get(|| async { "ok" }))
        .with_state(App { store, stats });
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await?;
    Ok(())
}

fn error(status: StatusCode, msg: String) -> Response {
    (status, Json(serde_json::json!({ "error": msg }))).into_response()
}

async fn usage(State(app): State<App>, Query(q): Query<HashMap<String, String>>) -> Response {
    let by_text = q.get("by").map(String::as_str).unwrap_or("team");
    let Some(by) = GroupBy::parse(by_text) else {
        return error(
            StatusCode::BAD_REQUEST,
            format!("by={by_text}: use key, user, team, project, app, agent, model or day"),
        );
    };
    let since = match parse_since(
        q.get("since").map(String::as_str).unwrap_or("7d"),
        crate::clock::now_ms(),
    ) {
        Ok(s) => s,
        Err(e) => return error(StatusCode::BAD_REQUEST, e.to_string()),
    };
    let store = app.store.clone();
    match tokio::task::spawn_blocking(move || store.report(by, since)).await {
        Ok(Ok(r)) => Json(r).into_response(),
        Ok(Err(e)) => error(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}")),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

async fn metrics(State(app): State<App>) -> Response {
    let store = app.store.clone();
    let rows = tokio::task::spawn_blocking(move || {
        store.rows(
            "SELECT COALESCE(team,''), COALESCE(app,''), COALESCE(agent,''), COALESCE(model_served, model_requested, ''),
                    decision, reason, COUNT(*), CAST(COALESCE(SUM(input_tokens),0) AS BIGINT),
                    CAST(COALESCE(SUM(output_tokens),0) AS BIGINT), CAST(COALESCE(SUM(cache_write_tokens),0) AS BIGINT),
                    CAST(COALESCE(SUM(cache_read_tokens),0) AS BIGINT), COALESCE(SUM(cost_usd),0)
             FROM audit WHERE timestamp_ms >= $1 GROUP BY 1, 2, 3, 4, 5, 6 ORDER BY 7 DESC",
            0,
        )
    })
    .await;
    let rows = match rows {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => return error(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}")),
        Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    };
    let rows = rows.into_iter().filter(|r| r.len() == 12).map(|r| {
        (
            [r[0].text(), r[1].text(), r[2].text(), r[3].text()],
            r[4].text(),
            r[5].text(),
            [r[6].int(), r[7].int(), r[8].int(), r[9].int(), r[10].int()],
            r[11].real(),
        )
    });
    // Bounded cardinality: the busiest MAX_SERIES values of each label keep
    // their name, the rest become "other".
    let mut seen: [HashMap<String, usize>; 4] = Default::default();
    let mut series: HashMap<String, ([i64; 5], f64)> = HashMap::new();
    let mut denials: HashMap<String, i64> = HashMap::new();
    for (labels, decision, reason, n, cost) in rows {
        let mut names = Vec::with_capacity(4);
        for (i, v) in labels.iter().enumerate() {
            let count = seen[i].len();
            let kept = if seen[i].contains_key(v) || count < MAX_SERIES {
                seen[i].entry(v.clone()).or_insert(count);
                v.clone()
            } else {
                "other".to_string()
            };
            names.push(escape(&kept));
        }
        let key = format!(
            "team=\"{}\",app=\"{}\",agent=\"{}\",model=\"{}\",decision=\"{}\"",
            names[0],
            names[1],
            names[2],
            names[3],
            escape(&decision)
        );
        let e = series.entry(key).or_default();
        for (a, b) in e.0.iter_mut().zip(n) {
            *a += b;
        }
        e.1 += cost;
        if decision == "denied" {
            *denials.entry(reason).or_default() += n[0];
        }
    }
    let mut out = String::new();
    let mut keys: Vec<&String> = series.keys().collect();
    keys.sort();
    let _ = writeln!(out, "# HELP tollgate_requests_total Requests seen by the gateway, by identity, model and decision.\n# TYPE tollgate_requests_total counter");
    for k in &keys {
        let _ = writeln!(out, "tollgate_requests_total{{{k}}} {}", series[*k].0[0]);
    }
    let _ = writeln!(out, "# HELP tollgate_tokens_total Tokens reported by the provider, by class.\n# TYPE tollgate_tokens_total counter");
    for k in &keys {
        for (i, class) in ["input", "output", "cache_write", "cache_read"]
            .iter()
            .enumerate()
        {
            let _ = writeln!(
                out,
                "tollgate_tokens_total{{{k},class=\"{class}\"}} {}",
                series[*k].0[i + 1]
            );
        }
    }
    let _ = writeln!(out, "# HELP tollgate_cost_usd_total Cost in USD priced from the policy.\n# TYPE tollgate_cost_usd_total counter");
    for k in &keys {
        let _ = writeln!(out, "tollgate_cost_usd_total{{{k}}} {}", series[*k].1);
    }
    let _ = writeln!(out, "# HELP tollgate_denials_total Denied requests by reason.\n# TYPE tollgate_denials_total counter");
    let mut reasons: Vec<_> = denials.into_iter().collect();
    reasons.sort();
    for (reason, n) in reasons {
        let _ = writeln!(
            out,
            "tollgate_denials_total{{reason=\"{}\"}} {n}",
            escape(&reason)
        );
    }
    let s = &app.stats;
    for (name, help, v) in [
        (
            "tollgate_collector_entries_received_total",
            "Access-log entries received from Envoy.",
            s.received.load(Ordering::Relaxed),
        ),
        (
            "tollgate_collector_records_stored_total",
            "Audit records written to the store.",
            s.stored.load(Ordering::Relaxed),
        ),
        (
            "tollgate_collector_records_dropped_total",
            "Records dropped because the write queue was full.",
            s.dropped.load(Ordering::Relaxed),
        ),
        (
            "tollgate_collector_records_invalid_total",
            "Entries whose audit record could not be parsed.",
            s.invalid.load(Ordering::Relaxed),
        ),
        (
            "tollgate_collector_entries_without_record_total",
            "Entries without a Tollgate record.",
            s.without_record.load(Ordering::Relaxed),
        ),
    ] {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}"
        );
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response()
}
