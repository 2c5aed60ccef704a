//! The collector's HTTP side: Prometheus `/metrics` (see `metrics.rs`), `/api/usage` (the same
//! JSON as `tollgate usage --format json`), `POST /api/ingest` (Envoy's file access log shipped
//! over HTTP, see `ingest.rs`) and a small dashboard at `/`.

use super::report::{parse_since, GroupBy};
use super::store::AuditStore;
use super::Stats;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;

const DASHBOARD: &str = include_str!("dashboard.html");

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
        .route(
            "/api/ingest",
            post(ingest).layer(DefaultBodyLimit::max(super::ingest::MAX_BODY)),
        )
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

/// Stores the records of a JSON-lines body; answers what it did.
async fn ingest(State(app): State<App>, body: Result<Bytes, BytesRejection>) -> Response {
    use super::ingest::{self, Refused};
    let body = match body {
        Ok(b) => b,
        Err(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            return error(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("body over {} bytes: send smaller batches", ingest::MAX_BODY),
            )
        }
        Err(e) => return error(e.status(), e.body_text()),
    };
    let (store, stats) = (app.store.clone(), app.stats.clone());
    match tokio::task::spawn_blocking(move || ingest::ingest(&store, &stats, &body)).await {
        Ok(Ok(done)) => Json(done).into_response(),
        Ok(Err(Refused::Garbage(e))) => error(StatusCode::BAD_REQUEST, e),
        Ok(Err(Refused::Unavailable(e))) => error(StatusCode::SERVICE_UNAVAILABLE, e),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

/// Prometheus text from the counters in memory; never reads the store.
async fn metrics(State(app): State<App>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        super::metrics::render(&app.stats),
    )
        .into_response()
}
