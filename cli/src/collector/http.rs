//! The collector's HTTP side: Prometheus `/metrics` (see `metrics.rs`), `/api/usage` (the same
//! JSON as `tollgate usage --format json`), `POST /api/ingest` (Envoy's file access log shipped
//! over HTTP, see `ingest.rs`) and the dashboard at `/` with the views it reads: `/api/series`
//! (usage per hour or day), `/api/burndown` (each daily and monthly limit's use, from the
//! policy) and `/api/key` (one key's drill-down); with `--serve-keys`, the key table Envoy
//! fetches (`/v1/keys`, see `crate::key_service`). Every `/api` read takes the same view
//! parameters (`since`, `until`, `team`, `project`, `user`, `app`, `agent`, `model`, `key`;
//! see `filter.rs`).

use super::filter::Filter;
use super::report::GroupBy;
use super::series::Bucket;
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
use std::path::PathBuf;
use std::sync::Arc;

const DASHBOARD: &str = include_str!("dashboard.html");

/// The view of a request without `since`: the last week.
const DEFAULT_SINCE: &str = "7d";

/// A compiled policy, with the files it was compiled from and their stamps
/// then.
type Compiled = (
    Vec<PathBuf>,
    Vec<crate::policy_file::Stamp>,
    tollgate_core::policy::Policy,
);

/// The burn-down's policy file and its last compiled form.
struct CachedPolicy {
    path: PathBuf,
    compiled: std::sync::Mutex<Option<Compiled>>,
}

#[derive(Clone)]
struct App {
    store: AuditStore,
    stats: Arc<Stats>,
    /// The policy whose limits the burn-down draws: compiled again only
    /// when its files' stamps changed, so edits show at once and a
    /// 100,000-key policy is not compiled (0.4 s) per dashboard view.
    policy: Option<Arc<CachedPolicy>>,
    /// Writes (`POST /api/ingest`) without it are refused.
    token: super::auth::WriteToken,
}

pub async fn serve(
    listener: tokio::net::TcpListener,
    store: AuditStore,
    stats: Arc<Stats>,
    policy: Option<PathBuf>,
    token: super::auth::WriteToken,
    keys: Option<crate::key_service::KeyTable>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let app = Router::new()
        .route("/", get(|| async { Html(DASHBOARD) }))
        .route("/metrics", get(metrics))
        .route("/api/usage", get(usage))
        .route("/api/series", get(series))
        .route("/api/burndown", get(burndown))
        .route("/api/key", get(key))
        .route(
            "/api/ingest",
            post(ingest).layer(DefaultBodyLimit::max(super::ingest::MAX_BODY)),
        )
        .route("/healthz", get(|| async { "ok" }))
        .with_state(App {
            store,
            stats,
            policy: policy.map(|path| {
                Arc::new(CachedPolicy {
                    path,
                    compiled: std::sync::Mutex::new(None),
                })
            }),
            token,
        });
    let app = match keys {
        Some(table) => app.merge(table.router()),
        None => app,
    };
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await?;
    Ok(())
}

fn error(status: StatusCode, msg: String) -> Response {
    (status, Json(serde_json::json!({ "error": msg }))).into_response()
}

type Params = Query<HashMap<String, String>>;

/// The view a query asks for, or what is wrong with it.
fn view(q: &HashMap<String, String>) -> Result<Filter, String> {
    Filter::from_query(q, DEFAULT_SINCE, crate::clock::now_ms()).map_err(|e| e.to_string())
}

/// The view and the series bucket (`day` unless asked) a query asks for.
fn view_and_bucket(q: &HashMap<String, String>) -> Result<(Filter, Bucket), String> {
    let text = q.get("bucket").map(String::as_str).unwrap_or("day");
    let bucket = Bucket::parse(text).ok_or_else(|| format!("bucket={text}: use hour or day"))?;
    Ok((view(q)?, bucket))
}

fn bad_request(msg: String) -> Response {
    error(StatusCode::BAD_REQUEST, msg)
}

/// Runs a store read off the async workers and answers its JSON.
async fn answer<T: serde::Serialize + Send + 'static>(
    read: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
) -> Response {
    match tokio::task::spawn_blocking(read).await {
        Ok(Ok(r)) => Json(r).into_response(),
        Ok(Err(e)) => error(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}")),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

async fn usage(State(app): State<App>, Query(q): Params) -> Response {
    let by_text = q.get("by").map(String::as_str).unwrap_or("team");
    let Some(by) = GroupBy::parse(by_text) else {
        return error(
            StatusCode::BAD_REQUEST,
            format!("by={by_text}: use key, user, team, project, app, agent, model or day"),
        );
    };
    let view = match view(&q) {
        Ok(v) => v,
        Err(e) => return bad_request(e),
    };
    answer(move || app.store.usage(by, &view)).await
}

async fn series(State(app): State<App>, Query(q): Params) -> Response {
    let (view, bucket) = match view_and_bucket(&q) {
        Ok(vb) => vb,
        Err(e) => return bad_request(e),
    };
    answer(move || app.store.series(&view, bucket, crate::clock::now_ms())).await
}

/// The burn-down needs the policy: a collector started without one
/// answers an empty list and says why.
async fn burndown(State(app): State<App>, Query(q): Params) -> Response {
    let view = match view(&q) {
        Ok(v) => v,
        Err(e) => return bad_request(e),
    };
    let Some(path) = app.policy.clone() else {
        return Json(serde_json::json!({
            "limits": [],
            "note": "the collector was started without --policy: no limits to draw",
        }))
        .into_response();
    };
    answer(move || {
        let mut compiled = path.compiled.lock().unwrap_or_else(|p| p.into_inner());
        let fresh = compiled.as_ref().is_some_and(|(paths, stamps, _)| {
            paths
                .iter()
                .map(|p| crate::policy_file::stamp(p))
                .eq(stamps.iter().cloned())
        });
        if !fresh {
            let sources = crate::policy_file::read(&path.path);
            let policy = sources.compiled_quietly().map_err(|errors| {
                anyhow::anyhow!("policy {}: {}", path.path.display(), errors.join("; "))
            })?;
            *compiled = Some((sources.paths(), sources.stamps(), policy));
        }
        let Some((_, _, policy)) = compiled.as_ref() else {
            anyhow::bail!("policy {}: not compiled", path.path.display());
        };
        let limits = super::burndown::build(&*app.store, policy, &view, crate::clock::now_ms())?;
        Ok(serde_json::json!({ "policy": path.path.display().to_string(), "limits": limits }))
    })
    .await
}

async fn key(State(app): State<App>, Query(q): Params) -> Response {
    let Some(id) = q.get("id").filter(|i| !i.is_empty()).cloned() else {
        return error(StatusCode::BAD_REQUEST, "id: name the key".to_string());
    };
    let (view, bucket) = match view_and_bucket(&q) {
        Ok(vb) => vb,
        Err(e) => return bad_request(e),
    };
    answer(move || super::drilldown::build(&*app.store, &id, &view, bucket, crate::clock::now_ms()))
        .await
}

/// Stores the records of a JSON-lines body; answers what it did.
async fn ingest(
    State(app): State<App>,
    headers: axum::http::HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    use super::ingest::{self, Refused};
    let authorization = headers.get(header::AUTHORIZATION).map(|v| v.as_bytes());
    if !app.token.allows(authorization) {
        return error(StatusCode::UNAUTHORIZED, super::auth::REFUSED.to_string());
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::collector::filter::tests::query;

    /// The burn-down compiles the policy once, and again after an edit:
    /// the next view shows the edited limit.
    #[tokio::test]
    async fn the_burn_down_follows_a_policy_edit() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("policy.json");
        let policy = |per_day: u32| {
            format!(
                r#"{{"version": 1, "keys": [{{"id": "a", "key_sha256": "{}", "limits": {{"tokens_per_day": {per_day}}}}}]}}"#,
                tollgate_core::vkey::sha256_hex("tg-a")
            )
        };
        std::fs::write(&file, policy(1000)).unwrap();
        let store = AuditStore::open(dir.path().join("audit.db")).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(serve(
            listener,
            store,
            Arc::new(Stats::default()),
            Some(file.clone()),
            super::super::auth::WriteToken::open(),
            None,
            std::future::pending(),
        ));
        let amount = || async {
            let text = reqwest::get(format!("http://{addr}/api/burndown?since=1h"))
                .await
                .unwrap()
                .text()
                .await
                .unwrap();
            let v: serde_json::Value = serde_json::from_str(&text).unwrap();
            v["limits"][0]["amount"].as_f64()
        };
        assert_eq!(amount().await, Some(1000.0));
        assert_eq!(amount().await, Some(1000.0), "from the compiled copy");
        std::fs::write(&file, policy(20000)).unwrap();
        assert_eq!(amount().await, Some(20000.0), "the edit shows at once");
    }

    #[test]
    fn a_view_query_names_its_bucket_or_says_what_is_wrong() {
        let (view, bucket) =
            view_and_bucket(&query(&[("since", "1970-01-02"), ("model", "m1")])).unwrap();
        assert_eq!(bucket, Bucket::Day, "by day unless asked");
        assert_eq!(view, Filter::since(86_400_000).and(GroupBy::Model, "m1"));
        assert_eq!(
            view_and_bucket(&query(&[("bucket", "hour")])).unwrap().1,
            Bucket::Hour
        );
        assert_eq!(
            view_and_bucket(&query(&[("bucket", "week")])).unwrap_err(),
            "bucket=week: use hour or day"
        );
        assert_eq!(
            super::view(&query(&[("since", "last week")])).unwrap_err(),
            "--since \"last week\": use a duration such as 7d, 24h, 30m or an RFC 3339 time"
        );
    }
}
