//! The mock provider: replays recorded Anthropic and OpenAI exchanges
//! (`tests/fixtures/exchanges.json`) and checks what it receives. It stands in
//! for api.anthropic.com / api.openai.com in the demo and end-to-end tests,
//! the only part of the path that is not real.
//!
//! Checks: the real key Envoy injects must be present and exact, and no
//! header may carry a Tollgate virtual key (`tg-…`). Violations are answered
//! with 401 and recorded for tests (`GET /__mock/violations`).
//!
//! `GET /v1/models` and `GET /v1/models/{id}` answer from the recorded list of
//! the provider whose real key arrived (`x-api-key`: Anthropic, a bearer
//! token: OpenAI), as the two hosts would.
//!
//! Faults on request, for the failure tests: `x-mock-exchange: NAME` picks
//! the recorded exchange, `x-mock-delay-ms` paces stream events,
//! `x-mock-reset-after: N` drops the connection after N events,
//! `x-mock-stall-ms: MS` goes silent (before the headers, or after N events
//! with `x-mock-stall-after: N`). `x-mock-exchange-for-key: KEY=NAME, …`
//! answers the requests that arrive with the real key KEY with exchange
//! NAME, the way one of several provider keys is rate limited while the
//! next is not (the failover tests).
//!
//! Every LLM answer carries the provider's own rate-limit headers
//! (`anthropic-ratelimit-*`, OpenAI's `x-ratelimit-*`), limit and
//! remaining; `x-mock-ratelimit-limit` / `x-mock-ratelimit-remaining` set
//! them per request (see [`ratelimit_headers`]).
//!
//! The Admin API's Rate Limits endpoints answer the admin key
//! ([`DEFAULT_ADMIN_KEY`]) from recorded responses ([`admin`]).
//!
//! This crate is a test double: the `tollgate` binary links it only with its
//! `mock` cargo feature (on by default for development builds).

use anyhow::{Context, Result};
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

mod admin;
pub use admin::{WORKSPACE_WITHOUT_OVERRIDES, WORKSPACE_WITH_OVERRIDES};

mod embedded {
    include!(concat!(env!("OUT_DIR"), "/fixtures.rs"));
}

/// The "real" keys the mock expects Envoy to inject (demo and tests only).
pub const DEFAULT_ANTHROPIC_KEY: &str = "sk-ant-mock-real-key";
pub const DEFAULT_OPENAI_KEY: &str = "sk-openai-mock-real-key";
/// The Admin API key the mock's Rate Limits endpoints accept.
pub const DEFAULT_ADMIN_KEY: &str = "sk-ant-admin-mock-key";

pub struct MockConfig {
    /// The `x-api-key` expected on Anthropic routes.
    pub anthropic_key: String,
    /// Further `x-api-key`s accepted on Anthropic routes: the other keys
    /// of a gateway that fails over across several (`--anthropic-key-env`).
    pub failover_anthropic_keys: Vec<String>,
    /// The bearer token expected on OpenAI routes.
    pub openai_key: String,
    /// The `x-api-key` expected on the Admin API.
    pub admin_key: String,
    /// Delay between streamed events.
    pub event_delay_ms: u64,
}

impl MockConfig {
    /// The default keys, as `tollgate run --upstream mock` injects them.
    pub fn with_default_keys(event_delay_ms: u64) -> MockConfig {
        MockConfig {
            anthropic_key: DEFAULT_ANTHROPIC_KEY.to_string(),
            failover_anthropic_keys: Vec::new(),
            openai_key: DEFAULT_OPENAI_KEY.to_string(),
            admin_key: DEFAULT_ADMIN_KEY.to_string(),
            event_delay_ms,
        }
    }
}

/// One entry of `exchanges.json`.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct Exchange {
    pub name: String,
    pub route: String,
    /// `POST` unless stated: the LLM calls. `GET` exchanges have no request.
    #[serde(default = "default_method")]
    pub method: String,
    pub request: Option<String>,
    pub response: String,
    pub status: u16,
    pub content_type: String,
    pub stream: bool,
    pub usage: Option<serde_json::Value>,
    pub model: String,
    /// Response headers the provider sends with it (`retry-after` on 429
    /// and 529).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub headers: std::collections::BTreeMap<String, String>,
}

fn default_method() -> String {
    "POST".to_string()
}

pub fn fixture(path: &str) -> Option<&'static [u8]> {
    embedded::FIXTURES
        .iter()
        .find(|(p, _)| *p == path)
        .map(|(_, b)| *b)
}

pub fn exchanges() -> Vec<Exchange> {
    fixture("exchanges.json")
        .and_then(|b| serde_json::from_slice(b).ok())
        .unwrap_or_default()
}

#[derive(Debug, Clone, Serialize)]
struct Received {
    seq: u64,
    method: String,
    path: String,
    headers: serde_json::Map<String, serde_json::Value>,
    body_len: usize,
    model: Option<String>,
    stream: bool,
    exchange: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
struct Violation {
    seq: u64,
    reason: String,
    header: Option<String>,
}

#[derive(Default)]
struct Log {
    seq: u64,
    requests: Vec<Received>,
    violations: Vec<Violation>,
}

#[derive(Clone)]
struct AppState {
    config: Arc<MockConfig>,
    exchanges: Arc<Vec<Exchange>>,
    log: Arc<Mutex<Log>>,
    /// The organization's rate limits when a test replaced the recorded
    /// ones (`POST /__mock/admin/rate_limits`).
    org_limits: Arc<Mutex<Option<Vec<serde_json::Value>>>>,
}

pub async fn serve(
    listener: tokio::net::TcpListener,
    config: MockConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let state = AppState {
        config: Arc::new(config),
        exchanges: Arc::new(exchanges()),
        log: Arc::default(),
        org_limits: Arc::default(),
    };
    // Each LLM path also with a trailing slash: Envoy's path-separated
    // prefix routes forward `/v1/messages/` as the messages route, and the
    // gateway meters it as one, so the stand-in provider serves it too.
    let app = [
        "/v1/messages",
        "/v1/messages/count_tokens",
        "/v1/chat/completions",
        "/v1/responses",
    ]
    .into_iter()
    .fold(Router::new(), |app, path| {
        app.route(path, post(provider))
            .route(&format!("{path}/"), post(provider))
    })
    .route("/v1/organizations/rate_limits", get(admin::organization))
    .route(
        "/v1/organizations/workspaces/{id}/rate_limits",
        get(admin::workspace),
    )
    .route("/v1/models", get(models))
    .route("/v1/models/{id}", get(models))
    .route("/__mock/requests", get(requests))
    .route("/__mock/violations", get(violations))
    .route("/__mock/reset", post(reset))
    .route(
        "/__mock/admin/rate_limits",
        post(admin::replace_organization),
    )
    .route("/__mock/health", get(|| async { "ok" }))
    .route(
        "/__mock/exchanges",
        get(|State(s): State<AppState>| async move { Json(s.exchanges.as_ref().clone()) }),
    )
    // Providers accept request bodies up to 32 MB (images, PDFs); axum's
    // default limit is 2 MB.
    .layer(axum::extract::DefaultBodyLimit::max(64 << 20))
    .with_state(state);
    // A provider flushes each SSE event as it is written; without
    // TCP_NODELAY the first small event would wait for Envoy's delayed ACK
    // (~40 ms) and every stream's time to first byte would measure that.
    use axum::serve::ListenerExt;
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
        .context("mock provider")
}

async fn requests(State(s): State<AppState>) -> impl IntoResponse {
    Json(s.log.lock().map(|l| l.requests.clone()).unwrap_or_default())
}

async fn violations(State(s): State<AppState>) -> impl IntoResponse {
    Json(
        s.log
            .lock()
            .map(|l| l.violations.clone())
            .unwrap_or_default(),
    )
}

async fn reset(State(s): State<AppState>) -> impl IntoResponse {
    if let Ok(mut l) = s.log.lock() {
        *l = Log::default();
    }
    StatusCode::NO_CONTENT
}

fn is_openai(path: &str) -> bool {
    path.starts_with("/v1/chat/") || path.starts_with("/v1/responses")
}

/// An error the mock answers in the provider's shape (small, unlike the
/// `Response` it becomes).
struct Failure {
    openai: bool,
    status: StatusCode,
    kind: &'static str,
    message: String,
}

impl Failure {
    fn new(openai: bool, status: StatusCode, kind: &'static str, message: &str) -> Failure {
        Failure {
            openai,
            status,
            kind,
            message: message.to_string(),
        }
    }
}

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        error(self.openai, self.status, self.kind, &self.message)
    }
}

/// A provider-shaped error from the mock itself.
fn error(openai: bool, status: StatusCode, kind: &str, message: &str) -> Response {
    let body = if openai {
        serde_json::json!({"error": {"message": message, "type": kind, "param": null, "code": kind}})
    } else {
        serde_json::json!({"type": "error", "error": {"type": kind, "message": message}})
    };
    (status, Json(body)).into_response()
}

/// Shows the first 6 characters of a leaked secret, never the whole value.
fn redact(v: &str) -> String {
    format!("{}…", v.chars().take(6).collect::<String>())
}

fn default_exchange(path: &str, body: &serde_json::Value) -> &'static str {
    let stream = body["stream"].as_bool().unwrap_or(false);
    match path {
        "/v1/messages/count_tokens" => "count-tokens",
        "/v1/chat/completions"
            if stream
                && body.pointer("/stream_options/include_usage")
                    == Some(&serde_json::Value::Bool(true)) =>
        {
            "chat-stream-usage"
        }
        "/v1/chat/completions" if stream => "chat-stream-no-usage",
        "/v1/chat/completions" => "chat-basic",
        "/v1/responses" if stream => "responses-stream",
        "/v1/responses" => "responses-basic",
        _ if stream => "messages-stream",
        _ => "messages-basic",
    }
}

/// One request as it arrived, for the checks and the request log.
struct Incoming<'a> {
    method: &'static str,
    path: &'a str,
    /// Which real key it must carry: OpenAI's bearer token or Anthropic's
    /// `x-api-key`.
    openai: bool,
    headers: &'a HeaderMap,
    body_len: usize,
    model: Option<String>,
    stream: bool,
    exchange: Option<String>,
}

/// Checks what every provider request must satisfy (the exact real key, no
/// virtual key), records the request and any violation,
/// and returns its sequence number, or the error a provider would answer.
/// `problems` holds what the caller already found wrong with the body.
fn check_and_record(
    s: &AppState,
    req: Incoming<'_>,
    body_problems: Vec<(String, Option<String>)>,
) -> Result<u64, Failure> {
    let mut header_json = serde_json::Map::new();
    let mut problems = Vec::new();
    for (name, value) in req.headers {
        let v = String::from_utf8_lossy(value.as_bytes());
        header_json.insert(name.to_string(), v.clone().into_owned().into());
        if v.contains("tg-") {
            problems.push((
                "mock provider: virtual key leaked upstream".to_string(),
                Some(format!("{name}: {}", redact(&v))),
            ));
        }
    }
    let (key_header, expected) = if req.openai {
        (
            "authorization",
            vec![format!("Bearer {}", s.config.openai_key)],
        )
    } else {
        let mut keys = vec![s.config.anthropic_key.clone()];
        keys.extend(s.config.failover_anthropic_keys.iter().cloned());
        ("x-api-key", keys)
    };
    let got = req
        .headers
        .get(key_header)
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
    if !got.as_ref().is_some_and(|g| expected.contains(g)) && problems.is_empty() {
        problems.push((
            "mock provider: missing or wrong real API key".to_string(),
            got.map(|g| format!("{key_header}: {}", redact(&g))),
        ));
    }
    problems.extend(body_problems);

    let Ok(mut log) = s.log.lock() else {
        return Err(Failure::new(
            req.openai,
            StatusCode::INTERNAL_SERVER_ERROR,
            "api_error",
            "mock log poisoned",
        ));
    };
    log.seq += 1;
    let seq = log.seq;
    log.requests.push(Received {
        seq,
        method: req.method.into(),
        path: req.path.to_string(),
        headers: header_json,
        body_len: req.body_len,
        model: req.model,
        stream: req.stream,
        exchange: req.exchange,
    });
    for (reason, header) in &problems {
        log.violations.push(Violation {
            seq,
            reason: reason.clone(),
            header: header.clone(),
        });
    }
    match problems.first() {
        Some((reason, _)) if reason.contains("body") => Err(Failure::new(
            req.openai,
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            reason,
        )),
        Some((reason, _)) => Err(Failure::new(
            req.openai,
            StatusCode::UNAUTHORIZED,
            "authentication_error",
            reason,
        )),
        None => Ok(seq),
    }
}

/// The recorded exchange of this name and its response bytes.
fn recorded(s: &AppState, name: &str, openai: bool) -> Result<(&'static [u8], Exchange), Failure> {
    let Some(ex) = s.exchanges.iter().find(|e| e.name == name) else {
        let known: Vec<&str> = s.exchanges.iter().map(|e| e.name.as_str()).collect();
        return Err(Failure::new(
            openai,
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            &format!(
                "mock provider: unknown exchange {name:?}; known: {}",
                known.join(", ")
            ),
        ));
    };
    match fixture(&ex.response) {
        Some(bytes) => Ok((bytes, ex.clone())),
        None => Err(Failure::new(
            openai,
            StatusCode::INTERNAL_SERVER_ERROR,
            "api_error",
            &format!("mock provider: fixture {} missing", ex.response),
        )),
    }
}

/// `x-mock-exchange-for-key: KEY=NAME, KEY2=NAME2`: the exchange for the
/// real key this request arrived with (`x-api-key`, or OpenAI's bearer
/// token), if the header names it.
fn exchange_for_key(headers: &HeaderMap) -> Option<String> {
    let text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let key = text("x-api-key")
        .or_else(|| text("authorization").and_then(|a| a.strip_prefix("Bearer ")))?;
    text("x-mock-exchange-for-key")?
        .split(',')
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == key)
        .map(|(_, name)| name.to_string())
}

fn chosen_exchange(headers: &HeaderMap) -> Option<String> {
    headers
        .get("x-mock-exchange")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

/// `GET /v1/models` and `GET /v1/models/{id}`: the recorded list of the
/// provider whose key arrived, or the one model of it (404 in the
/// provider's shape when absent, as the providers answer).
async fn models(State(s): State<AppState>, uri: Uri, headers: HeaderMap) -> Response {
    let path = uri.path();
    let openai = !headers.contains_key("x-api-key");
    let chosen = chosen_exchange(&headers).unwrap_or_else(|| {
        if openai {
            "openai-models-list"
        } else {
            "models-list"
        }
        .to_string()
    });
    let req = Incoming {
        method: "GET",
        path,
        openai,
        headers: &headers,
        body_len: 0,
        model: None,
        stream: false,
        exchange: Some(chosen.clone()),
    };
    let seq = match check_and_record(&s, req, Vec::new()) {
        Ok(seq) => seq,
        Err(failure) => return failure.into_response(),
    };
    let (bytes, ex) = match recorded(&s, &chosen, openai) {
        Ok(found) => found,
        Err(failure) => return failure.into_response(),
    };
    let body = match path.strip_prefix("/v1/models/") {
        None => bytes.to_vec(),
        Some(id) => {
            let list: serde_json::Value = serde_json::from_slice(bytes).unwrap_or_default();
            let one = list
                .get("data")
                .and_then(|d| d.as_array())
                .and_then(|d| d.iter().find(|m| m["id"] == id));
            match one {
                Some(model) => model.to_string().into_bytes(),
                None => {
                    let message = if openai {
                        format!("The model '{id}' does not exist")
                    } else {
                        format!("model: {id}")
                    };
                    let kind = if openai {
                        "model_not_found"
                    } else {
                        "not_found_error"
                    };
                    return error(openai, StatusCode::NOT_FOUND, kind, &message);
                }
            }
        }
    };
    let request_id = format!("req_mock_{seq:06}");
    Response::builder()
        .status(StatusCode::from_u16(ex.status).unwrap_or(StatusCode::OK))
        .header("content-type", ex.content_type.as_str())
        .header("request-id", request_id.as_str())
        .header("x-request-id", request_id.as_str())
        .body(Body::from(body))
        .unwrap_or_else(|_| {
            error(
                openai,
                StatusCode::INTERNAL_SERVER_ERROR,
                "api_error",
                "mock response",
            )
        })
}

async fn provider(
    State(s): State<AppState>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let path = uri.path().to_string();
    let route = path.strip_suffix('/').unwrap_or(&path);
    let openai = is_openai(route);
    let parsed: Option<serde_json::Value> = serde_json::from_slice(&body).ok();
    let model = parsed
        .as_ref()
        .and_then(|v| v["model"].as_str())
        .map(str::to_string);
    let stream = parsed
        .as_ref()
        .and_then(|v| v["stream"].as_bool())
        .unwrap_or(false);
    let chosen = exchange_for_key(&headers)
        .or_else(|| chosen_exchange(&headers))
        .or_else(|| {
            parsed
                .as_ref()
                .map(|b| default_exchange(route, b).to_string())
        });
    let mut body_problems = Vec::new();
    if parsed.is_none() || model.is_none() {
        body_problems.push((
            "mock provider: request body is not JSON with a model".to_string(),
            None,
        ));
    }
    let req = Incoming {
        method: "POST",
        path: &path,
        openai,
        headers: &headers,
        body_len: body.len(),
        model: model.clone(),
        stream,
        exchange: chosen.clone(),
    };
    let seq = match check_and_record(&s, req, body_problems) {
        Ok(seq) => seq,
        Err(failure) => return failure.into_response(),
    };
    let (bytes, ex) = match recorded(&s, &chosen.unwrap_or_default(), openai) {
        Ok(found) => found,
        Err(failure) => return failure.into_response(),
    };
    // Clients see the model they asked for, as with the real providers'
    // aliases; usage stays exactly as recorded.
    let quoted = serde_json::Value::String(ex.model.clone()).to_string();
    let text = String::from_utf8_lossy(bytes);
    let text = match &model {
        Some(m) => text.replace(&quoted, &serde_json::Value::String(m.clone()).to_string()),
        None => text.into_owned(),
    };
    let header_u64 = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
    };
    let delay = header_u64("x-mock-delay-ms").unwrap_or(s.config.event_delay_ms);
    let status = StatusCode::from_u16(ex.status).unwrap_or(StatusCode::OK);
    let request_id = format!("req_mock_{seq:06}");
    let mut builder = Response::builder()
        .status(status)
        .header("content-type", ex.content_type.as_str())
        .header("request-id", request_id.as_str())
        .header("x-request-id", request_id.as_str());
    for (name, value) in ex
        .headers
        .iter()
        .chain(&ratelimit_headers(openai, &headers))
    {
        builder = builder.header(name.as_str(), value.as_str());
    }
    // `x-mock-reset-after: N` aborts the stream after N events, as a provider
    // connection dropping mid-answer would.
    let reset_after = header_u64("x-mock-reset-after").map(|n| n as usize);
    // `x-mock-stall-ms: MS` holds the answer for MS milliseconds, as a
    // provider that stops talking would: before the response headers, or,
    // with `x-mock-stall-after: N`, after N streamed events.
    let stall_ms = header_u64("x-mock-stall-ms").unwrap_or(0);
    let stall = match header_u64("x-mock-stall-after") {
        Some(after) if ex.stream => Some((after as usize, stall_ms)),
        _ => {
            tokio::time::sleep(Duration::from_millis(stall_ms)).await;
            None
        }
    };
    let body = if ex.stream {
        Body::from_stream(sse_chunks(
            text,
            delay,
            seq,
            Interruption { reset_after, stall },
        ))
    } else {
        Body::from(text)
    };
    builder.body(body).unwrap_or_else(|_| {
        error(
            openai,
            StatusCode::INTERNAL_SERVER_ERROR,
            "api_error",
            "mock response",
        )
    })
}

/// The provider's rate-limit headers for one answer: each family's limit
/// and remaining (Anthropic: requests, input-tokens, output-tokens, tokens;
/// OpenAI: requests, tokens). By default the organization has just spent
/// this request: requests remaining is the limit less one, tokens the
/// whole limit. `x-mock-ratelimit-limit` / `x-mock-ratelimit-remaining`
/// set a number for every family (`17`) or per family
/// (`requests=17, output-tokens=900`). The `-reset` headers are left out:
/// nothing here reads them.
fn ratelimit_headers(
    openai: bool,
    headers: &HeaderMap,
) -> std::collections::BTreeMap<String, String> {
    let families: &[(&str, u64)] = if openai {
        &[("requests", 5_000), ("tokens", 2_000_000)]
    } else {
        &[
            ("requests", 4_000),
            ("input-tokens", 2_000_000),
            ("output-tokens", 400_000),
            ("tokens", 2_400_000),
        ]
    };
    let set = |name: &str, family: &str| -> Option<u64> {
        let text = headers.get(name)?.to_str().ok()?;
        if let Ok(all) = text.trim().parse::<u64>() {
            return Some(all);
        }
        text.split(',').find_map(|pair| {
            let (f, n) = pair.split_once('=')?;
            (f.trim() == family).then(|| n.trim().parse().ok())?
        })
    };
    let mut out = std::collections::BTreeMap::new();
    for (family, default_limit) in families {
        let limit = set("x-mock-ratelimit-limit", family).unwrap_or(*default_limit);
        let spent = u64::from(*family == "requests");
        let remaining =
            set("x-mock-ratelimit-remaining", family).unwrap_or(limit.saturating_sub(spent));
        for (kind, value) in [("limit", limit), ("remaining", remaining)] {
            let name = if openai {
                format!("x-ratelimit-{kind}-{family}")
            } else {
                format!("anthropic-ratelimit-{family}-{kind}")
            };
            out.insert(name, value.to_string());
        }
    }
    out
}

/// How a streamed answer breaks off, if it does (test headers).
#[derive(Clone, Copy)]
struct Interruption {
    /// Abort the connection after this many events.
    reset_after: Option<usize>,
    /// After this many events, go silent for this many milliseconds.
    stall: Option<(usize, u64)>,
}

/// Splits an SSE document into events and yields them with a delay between
/// events and realistic chunking: every third event is cut in two at an
/// arbitrary byte, every fifth travels with the next one.
fn sse_chunks(
    text: String,
    delay_ms: u64,
    seed: u64,
    cut: Interruption,
) -> impl futures_util::Stream<Item = Result<Bytes, std::io::Error>> {
    let sep = if text.contains("\r\n\r\n") {
        "\r\n\r\n"
    } else {
        "\n\n"
    };
    let mut events: Vec<String> = text.split_inclusive(sep).map(str::to_string).collect();
    if events.is_empty() {
        events.push(text);
    }
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(4);
    tokio::spawn(async move {
        let mut i = 0;
        while i < events.len() {
            if let Some((_, ms)) = cut.stall.filter(|(after, _)| i == *after) {
                tokio::time::sleep(Duration::from_millis(ms)).await;
            }
            if cut.reset_after.is_some_and(|n| i >= n) {
                let _ = tx
                    .send(Err(std::io::Error::other(
                        "mock provider: reset mid-stream",
                    )))
                    .await;
                return;
            }
            let Some(event) = events.get(i) else {
                return;
            };
            let mut chunk = event.clone();
            if i % 5 == 4 {
                if let Some(next) = events.get(i + 1) {
                    i += 1;
                    chunk.push_str(next);
                }
            }
            if i % 3 == 1 && chunk.len() > 2 {
                let cut = 1 + ((seed as usize + i * 7) % (chunk.len() - 1));
                let cut = (cut..chunk.len())
                    .find(|c| chunk.is_char_boundary(*c))
                    .unwrap_or(chunk.len());
                let (a, b) = chunk.split_at(cut);
                if tx.send(Ok(Bytes::from(a.to_string()))).await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(delay_ms / 2)).await;
                chunk = b.to_string();
            }
            if tx.send(Ok(Bytes::from(chunk))).await.is_err() {
                return;
            }
            i += 1;
            if i < events.len() {
                tokio::time::sleep(Duration::from_millis(delay_ms)).await;
            }
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifest_names_existing_fixtures() {
        let ex = exchanges();
        assert!(ex.len() >= 9, "manifest has {} exchanges", ex.len());
        for e in &ex {
            match &e.request {
                Some(request) => assert!(fixture(request).is_some(), "{} request missing", e.name),
                None => assert_eq!(e.method, "GET", "{}: only a GET has no request", e.name),
            }
            assert!(
                fixture(&e.response).is_some(),
                "{} response missing",
                e.name
            );
        }
    }

    #[test]
    fn default_exchange_follows_route_and_stream_flag() {
        let j = |s: &str| serde_json::from_str::<serde_json::Value>(s).unwrap();
        assert_eq!(
            default_exchange("/v1/messages", &j(r#"{"stream":true}"#)),
            "messages-stream"
        );
        assert_eq!(default_exchange("/v1/messages", &j("{}")), "messages-basic");
        assert_eq!(
            default_exchange("/v1/chat/completions", &j(r#"{"stream":true}"#)),
            "chat-stream-no-usage"
        );
        assert_eq!(
            default_exchange(
                "/v1/chat/completions",
                &j(r#"{"stream":true,"stream_options":{"include_usage":true}}"#)
            ),
            "chat-stream-usage"
        );
        assert_eq!(
            default_exchange("/v1/responses", &j(r#"{"stream":true}"#)),
            "responses-stream"
        );
    }

    #[tokio::test]
    async fn streams_events_over_time_and_flags_leaked_keys() {
        let config = MockConfig {
            anthropic_key: "real".into(),
            failover_anthropic_keys: Vec::new(),
            openai_key: "oreal".into(),
            admin_key: "admin".into(),
            event_delay_ms: 20,
        };
        let addr = started(config).await;
        let ok = raw_post(
            addr,
            "/v1/messages",
            &[("x-api-key", "real")],
            r#"{"model":"claude-x","stream":true}"#,
        )
        .await;
        assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
        assert!(ok.contains("event: message_stop"));
        assert!(ok.contains(r#""model":"claude-x""#), "model substituted");
        let leak = raw_post(
            addr,
            "/v1/messages",
            &[("x-api-key", "tg-secret-key")],
            r#"{"model":"m"}"#,
        )
        .await;
        assert!(leak.starts_with("HTTP/1.1 401"), "{leak}");
        assert!(leak.contains("mock provider: virtual key leaked upstream"));
        let v = raw_get(addr, "/__mock/violations").await;
        assert!(v.contains("x-api-key: tg-sec…"), "{v}");
        assert!(!v.contains("tg-secret-key"));
    }

    #[tokio::test]
    async fn serves_the_pricing_exchanges_by_name() {
        let addr = started(MockConfig::with_default_keys(0)).await;
        let anthropic = [("x-api-key", DEFAULT_ANTHROPIC_KEY)];
        let bearer = format!("Bearer {DEFAULT_OPENAI_KEY}");
        let openai = [("authorization", bearer.as_str())];
        for (path, headers, exchange, body, wants) in [
            (
                "/v1/messages",
                &anthropic[..],
                "messages-stream-web-search-1h-priority",
                r#"{"model":"claude-opus-5-5","stream":true}"#,
                &[
                    r#""ephemeral_1h_input_tokens":4147"#,
                    r#""web_search_requests":3"#,
                    r#""service_tier":"priority""#,
                ][..],
            ),
            (
                "/v1/messages",
                &anthropic[..],
                "messages-long-context",
                r#"{"model":"claude-haiku-5-5"}"#,
                &[r#""cache_read_input_tokens": 122759"#][..],
            ),
            (
                "/v1/responses",
                &openai[..],
                "responses-reasoning",
                r#"{"model":"gpt-6.1-sol"}"#,
                &[r#""reasoning_tokens": 2944"#][..],
            ),
            (
                "/v1/responses",
                &openai[..],
                "responses-stream-web-search",
                r#"{"model":"gpt-6.1-sol","stream":true}"#,
                &[
                    r#""type":"web_search_call""#,
                    r#""service_tier":"priority""#,
                ][..],
            ),
        ] {
            let mut h = headers.to_vec();
            h.push(("x-mock-exchange", exchange));
            let resp = raw_post(addr, path, &h, body).await;
            assert!(resp.starts_with("HTTP/1.1 200"), "{exchange}: {resp}");
            for want in wants {
                assert!(resp.contains(want), "{exchange}: {want} missing");
            }
        }
    }

    #[tokio::test]
    async fn serves_each_providers_model_list_to_its_key() {
        let config = MockConfig {
            anthropic_key: "real".into(),
            failover_anthropic_keys: Vec::new(),
            openai_key: "oreal".into(),
            admin_key: "admin".into(),
            event_delay_ms: 0,
        };
        let addr = started(config).await;
        let body = |r: &str| r.split("\r\n\r\n").nth(1).unwrap().to_string();
        let anthropic = raw_get_with(addr, "/v1/models", &[("x-api-key", "real")]).await;
        assert!(anthropic.starts_with("HTTP/1.1 200"), "{anthropic}");
        let list: serde_json::Value = serde_json::from_str(&body(&anthropic)).unwrap();
        assert_eq!(list["first_id"], "claude-opus-4-5-20251101");
        assert_eq!(list["data"][0]["type"], "model");
        let openai = raw_get_with(addr, "/v1/models", &[("authorization", "Bearer oreal")]).await;
        let list: serde_json::Value = serde_json::from_str(&body(&openai)).unwrap();
        assert_eq!(list["object"], "list");
        assert_eq!(list["data"][0]["id"], "gpt-4o");
        let one = raw_get_with(
            addr,
            "/v1/models/claude-opus-4-1-20250805",
            &[("x-api-key", "real")],
        )
        .await;
        let model: serde_json::Value = serde_json::from_str(&body(&one)).unwrap();
        assert_eq!(model["display_name"], "Claude Opus 4.1");
        let missing = raw_get_with(
            addr,
            "/v1/models/gpt-9",
            &[("authorization", "Bearer oreal")],
        )
        .await;
        assert!(missing.starts_with("HTTP/1.1 404"), "{missing}");
        assert!(
            missing.contains("The model 'gpt-9' does not exist"),
            "{missing}"
        );
    }

    /// A mock on a free port, serving until the test ends.
    async fn started(config: MockConfig) -> std::net::SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(serve(listener, config, std::future::pending()));
        addr
    }

    fn body_json(response: &str) -> serde_json::Value {
        serde_json::from_str(response.split("\r\n\r\n").nth(1).unwrap()).unwrap()
    }

    #[tokio::test]
    async fn rate_limits_api_filters_pages_and_wants_the_admin_key() {
        let addr = started(MockConfig::with_default_keys(0)).await;
        let admin = [("x-api-key", DEFAULT_ADMIN_KEY)];
        let get = |path: &'static str| raw_get_with(addr, path, &admin);

        let all = body_json(&get("/v1/organizations/rate_limits").await);
        assert_eq!(all["data"].as_array().unwrap().len(), 7);
        assert_eq!(all["next_page"], serde_json::Value::Null);
        assert_eq!(all["data"][0]["type"], "rate_limit");
        assert_eq!(
            all["data"][0]["limits"][0],
            serde_json::json!({"type": "requests_per_minute", "value": 4000})
        );

        let groups = body_json(&get("/v1/organizations/rate_limits?group_type=model_group").await);
        assert_eq!(groups["data"].as_array().unwrap().len(), 4);
        let bad = get("/v1/organizations/rate_limits?group_type=model").await;
        assert!(bad.starts_with("HTTP/1.1 400"), "{bad}");

        let one = body_json(&get("/v1/organizations/rate_limits?model=claude-haiku-4-5").await);
        assert_eq!(one["data"].as_array().unwrap().len(), 1);
        assert_eq!(one["data"][0]["models"][1], "claude-haiku-4-5-20251001");
        let none = get("/v1/organizations/rate_limits?model=claude-2").await;
        assert!(none.starts_with("HTTP/1.1 404"), "{none}");
        assert!(none.contains("not_found_error"), "{none}");

        // Pages of 3 over the 7 groups: 3, 3, 1, and the cursor of each.
        let mut seen = Vec::new();
        let mut page: Option<String> = None;
        loop {
            let path = match &page {
                None => "/v1/organizations/rate_limits?limit=3".to_string(),
                Some(p) => format!("/v1/organizations/rate_limits?limit=3&page={p}"),
            };
            let v = body_json(&raw_get_with(addr, &path, &admin).await);
            seen.push(v["data"].as_array().unwrap().len());
            match v["next_page"].as_str() {
                Some(next) => page = Some(next.to_string()),
                None => break,
            }
        }
        assert_eq!(seen, [3, 3, 1]);

        let ws = body_json(
            &raw_get_with(
                addr,
                &format!("/v1/organizations/workspaces/{WORKSPACE_WITH_OVERRIDES}/rate_limits"),
                &admin,
            )
            .await,
        );
        assert_eq!(ws["data"][0]["type"], "workspace_rate_limit");
        assert_eq!(ws["data"][0]["limits"][0]["org_limit"], 4000);
        let plain = body_json(
            &raw_get_with(
                addr,
                &format!("/v1/organizations/workspaces/{WORKSPACE_WITHOUT_OVERRIDES}/rate_limits"),
                &admin,
            )
            .await,
        );
        assert_eq!(plain["data"], serde_json::json!([]));
        let unknown = get("/v1/organizations/workspaces/wrkspc_nope/rate_limits").await;
        assert!(unknown.starts_with("HTTP/1.1 404"), "{unknown}");

        // A test changes the organization's limits.
        let replaced = raw_post(
            addr,
            "/__mock/admin/rate_limits",
            &[("content-type", "application/json")],
            r#"{"data": [{"type": "rate_limit", "group_type": "model_group", "models": ["m"], "limits": []}]}"#,
        )
        .await;
        assert!(replaced.starts_with("HTTP/1.1 204"), "{replaced}");
        let now = body_json(&get("/v1/organizations/rate_limits").await);
        assert_eq!(now["data"][0]["models"], serde_json::json!(["m"]));
        assert_eq!(now["data"].as_array().unwrap().len(), 1);

        for key in [DEFAULT_ANTHROPIC_KEY, "sk-ant-admin-wrong"] {
            let denied =
                raw_get_with(addr, "/v1/organizations/rate_limits", &[("x-api-key", key)]).await;
            assert!(denied.starts_with("HTTP/1.1 401"), "{denied}");
            assert!(denied.contains("authentication_error"), "{denied}");
        }
    }

    #[tokio::test]
    async fn answers_carry_the_providers_rate_limit_headers_as_asked() {
        let addr = started(MockConfig::with_default_keys(0)).await;
        let body = r#"{"model":"claude-sonnet-4-5"}"#;
        let plain = raw_post(
            addr,
            "/v1/messages",
            &[("x-api-key", DEFAULT_ANTHROPIC_KEY)],
            body,
        )
        .await;
        assert!(
            plain.contains("anthropic-ratelimit-requests-limit: 4000\r\n"),
            "{plain}"
        );
        assert!(plain.contains("anthropic-ratelimit-requests-remaining: 3999\r\n"));
        assert!(plain.contains("anthropic-ratelimit-output-tokens-remaining: 400000\r\n"));
        let asked = raw_post(
            addr,
            "/v1/messages",
            &[
                ("x-api-key", DEFAULT_ANTHROPIC_KEY),
                ("x-mock-ratelimit-remaining", "requests=17, tokens=900"),
                ("x-mock-ratelimit-limit", "50"),
            ],
            body,
        )
        .await;
        assert!(
            asked.contains("anthropic-ratelimit-requests-remaining: 17\r\n"),
            "{asked}"
        );
        assert!(asked.contains("anthropic-ratelimit-tokens-remaining: 900\r\n"));
        assert!(asked.contains("anthropic-ratelimit-input-tokens-limit: 50\r\n"));
        assert!(asked.contains("anthropic-ratelimit-input-tokens-remaining: 50\r\n"));
        let bearer = format!("Bearer {DEFAULT_OPENAI_KEY}");
        let openai = raw_post(
            addr,
            "/v1/chat/completions",
            &[
                ("authorization", &bearer),
                ("x-mock-ratelimit-remaining", "12"),
            ],
            r#"{"model":"gpt-4o-mini"}"#,
        )
        .await;
        assert!(
            openai.contains("x-ratelimit-remaining-requests: 12\r\n"),
            "{openai}"
        );
        assert!(openai.contains("x-ratelimit-limit-tokens: 2000000\r\n"));
        // A recorded 529 carries its retry-after.
        let overloaded = raw_post(
            addr,
            "/v1/messages",
            &[
                ("x-api-key", DEFAULT_ANTHROPIC_KEY),
                ("x-mock-exchange", "error-overloaded"),
            ],
            body,
        )
        .await;
        assert!(overloaded.starts_with("HTTP/1.1 529"), "{overloaded}");
        assert!(overloaded.contains("retry-after: 7\r\n"), "{overloaded}");
    }

    #[tokio::test]
    async fn one_of_several_keys_is_answered_with_the_exchange_named_for_it() {
        let addr = started(MockConfig {
            failover_anthropic_keys: vec!["second".into()],
            ..MockConfig::with_default_keys(0)
        })
        .await;
        let control = format!("{DEFAULT_ANTHROPIC_KEY}=error-rate-limited, third=error-overloaded");
        let send = |key: &'static str| {
            let control = control.clone();
            async move {
                raw_post(
                    addr,
                    "/v1/messages",
                    &[("x-api-key", key), ("x-mock-exchange-for-key", &control)],
                    r#"{"model":"claude-sonnet-4-5"}"#,
                )
                .await
            }
        };
        let first = send(DEFAULT_ANTHROPIC_KEY).await;
        assert!(first.starts_with("HTTP/1.1 429"), "{first}");
        assert!(first.contains("retry-after: 13\r\n"), "{first}");
        assert!(first.contains("\"rate_limit_error\""), "{first}");
        // The failover key is accepted, and not named: the usual answer.
        let second = send("second").await;
        assert!(second.starts_with("HTTP/1.1 200"), "{second}");
        // A key the mock was not given is still refused.
        let third = send("third").await;
        assert!(third.starts_with("HTTP/1.1 401"), "{third}");
    }

    async fn raw(addr: std::net::SocketAddr, req: String) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(req.as_bytes()).await.unwrap();
        let mut out = Vec::new();
        s.read_to_end(&mut out).await.unwrap();
        String::from_utf8_lossy(&out).into_owned()
    }

    async fn raw_post(
        addr: std::net::SocketAddr,
        path: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> String {
        let h: String = headers
            .iter()
            .map(|(n, v)| format!("{n}: {v}\r\n"))
            .collect();
        raw(addr, format!("POST {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\ncontent-length: {}\r\n{h}\r\n{body}", body.len())).await
    }

    async fn raw_get(addr: std::net::SocketAddr, path: &str) -> String {
        raw_get_with(addr, path, &[]).await
    }

    async fn raw_get_with(
        addr: std::net::SocketAddr,
        path: &str,
        headers: &[(&str, &str)],
    ) -> String {
        let h: String = headers
            .iter()
            .map(|(n, v)| format!("{n}: {v}\r\n"))
            .collect();
        raw(
            addr,
            format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n{h}\r\n"),
        )
        .await
    }
}
