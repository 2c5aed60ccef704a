//! Anthropic's Rate Limits API (Admin API), as documented: the
//! organization's limits by group (`GET /v1/organizations/rate_limits`,
//! `?model=`, `?group_type=`) and a workspace's overrides
//! (`GET /v1/organizations/workspaces/{id}/rate_limits`), served from the
//! recorded responses `anthropic/admin-rate-limits.json` and
//! `anthropic/admin-workspace-rate-limits.json`.
//!
//! Paging is the API's own: `?limit=N` (1 to 1000) cuts a page and its
//! `next_page` cursor goes back as `?page=`; without `limit` everything is
//! one page and `next_page` is null, as the real API answers today. Tests
//! page with `limit`. Only the admin key is accepted (`x-api-key`).
//!
//! A test changes the organization's limits with
//! `POST /__mock/admin/rate_limits` (a body of the endpoint's shape,
//! `{"data": [...]}`), as Anthropic adjusting them would.

use super::{error, AppState, Failure};
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

/// The workspace whose overrides are recorded; another known workspace
/// has none (as the default workspace, which has no entry).
pub const WORKSPACE_WITH_OVERRIDES: &str = "wrkspc_01MockTeam";
pub const WORKSPACE_WITHOUT_OVERRIDES: &str = "wrkspc_01MockPlain";

const GROUP_TYPES: [&str; 6] = [
    "model_group",
    "batch",
    "token_count",
    "files",
    "skills",
    "web_search",
];

fn fail(status: StatusCode, kind: &str, message: &str) -> Response {
    error(false, status, kind, message)
}

/// The query string's parameters, decoded enough for the values the API
/// takes (model names, group types, numbers, this mock's cursors).
fn params(query: Option<&str>) -> Vec<(String, String)> {
    query
        .unwrap_or_default()
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (k.to_string(), v.replace("%3A", ":").replace("%2F", "/"))
        })
        .collect()
}

fn param<'a>(params: &'a [(String, String)], name: &str) -> Option<&'a str> {
    params
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

fn authorized(s: &AppState, headers: &HeaderMap) -> Result<(), Failure> {
    let key = headers.get("x-api-key").and_then(|v| v.to_str().ok());
    if key == Some(s.config.admin_key.as_str()) {
        return Ok(());
    }
    Err(Failure::new(
        false,
        StatusCode::UNAUTHORIZED,
        "authentication_error",
        "invalid x-api-key: the Admin API needs an admin key (sk-ant-admin…)",
    ))
}

fn recorded(path: &str) -> Vec<Value> {
    super::fixture(path)
        .and_then(|b| serde_json::from_slice::<Value>(b).ok())
        .and_then(|v| v.get("data").and_then(Value::as_array).cloned())
        .unwrap_or_default()
}

/// Filters by `group_type` (and `model`), then cuts the page.
fn answer(mut entries: Vec<Value>, params: &[(String, String)]) -> Response {
    if let Some(kind) = param(params, "group_type") {
        if !GROUP_TYPES.contains(&kind) {
            return fail(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                &format!(
                    "group_type: must be one of {}, got {kind:?}",
                    GROUP_TYPES.join(", ")
                ),
            );
        }
        entries.retain(|e| e["group_type"] == kind);
    }
    let start = match param(params, "page") {
        None => 0,
        Some(cursor) => match cursor
            .strip_prefix("page_")
            .and_then(|n| n.parse::<usize>().ok())
        {
            Some(n) => n,
            None => {
                return fail(
                    StatusCode::BAD_REQUEST,
                    "invalid_request_error",
                    "page: not a cursor this API returned",
                )
            }
        },
    };
    let limit = match param(params, "limit").map(str::parse::<usize>) {
        None => usize::MAX,
        Some(Ok(n)) if (1..=1000).contains(&n) => n,
        Some(_) => {
            return fail(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                "limit: must be a whole number from 1 to 1000",
            )
        }
    };
    let end = start.saturating_add(limit).min(entries.len());
    let page: Vec<Value> = entries.get(start..end).unwrap_or_default().to_vec();
    let next = (end < entries.len()).then(|| format!("page_{end}"));
    Json(json!({ "data": page, "next_page": next })).into_response()
}

/// `GET /v1/organizations/rate_limits`
pub async fn organization(
    State(s): State<AppState>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Response {
    if let Err(failure) = authorized(&s, &headers) {
        return failure.into_response();
    }
    let params = params(query.as_deref());
    let replaced = s.org_limits.lock().ok().and_then(|l| l.clone());
    let mut entries = replaced.unwrap_or_else(|| recorded("anthropic/admin-rate-limits.json"));
    if let Some(model) = param(&params, "model") {
        entries.retain(|e| {
            e["models"]
                .as_array()
                .is_some_and(|m| m.iter().any(|id| id == model))
        });
        if entries.is_empty() {
            return fail(
                StatusCode::NOT_FOUND,
                "not_found_error",
                &format!("model: {model} has no rate limits for this organization"),
            );
        }
    }
    answer(entries, &params)
}

/// `GET /v1/organizations/workspaces/{id}/rate_limits`: only overrides.
pub async fn workspace(
    State(s): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Response {
    if let Err(failure) = authorized(&s, &headers) {
        return failure.into_response();
    }
    let entries = match id.as_str() {
        WORKSPACE_WITH_OVERRIDES => recorded("anthropic/admin-workspace-rate-limits.json"),
        WORKSPACE_WITHOUT_OVERRIDES => Vec::new(),
        _ => {
            return fail(
                StatusCode::NOT_FOUND,
                "not_found_error",
                &format!("workspace: {id} not found"),
            )
        }
    };
    answer(entries, &params(query.as_deref()))
}

/// `POST /__mock/admin/rate_limits`: the organization's limits from now on.
pub async fn replace_organization(State(s): State<AppState>, Json(body): Json<Value>) -> Response {
    let Some(data) = body.get("data").and_then(Value::as_array) else {
        return fail(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "expected {\"data\": [...]} as the Rate Limits API answers",
        );
    };
    if let Ok(mut l) = s.org_limits.lock() {
        *l = Some(data.clone());
    }
    StatusCode::NO_CONTENT.into_response()
}
