//! The mock provider: replays recorded Anthropic and OpenAI exchanges
//! (`tests/fixtures/exchanges.json`) and checks what it receives. It stands in
//! for api.anthropic.com / api.openai.com in the demo and end-to-end tests,
//! the only part of the path that is not real.
//!
//! Checks: the real key Envoy injects must be present and exact, and no
//! header may carry a Tollgate virtual key (`tg-…`). Violations are answered
//! with 401 and recorded for tests (`GET /__mock/violations`).
//!
//! Faults on request, for the failure tests: `x-mock-exchange: NAME` picks
//! the recorded exchange, `x-mock-delay-ms` paces stream events,
//! `x-mock-reset-after: N` drops the connection after N events,
//! `x-mock-stall-ms: MS` goes silent (before the headers, or after N events
//! with `x-mock-stall-after: N`).
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

mod embedded {
    include!(concat!(env!("OUT_DIR"), "/fixtures.rs"));
}

/// The "real" keys the mock expects Envoy to inject (demo and tests only).
pub const DEFAULT_ANTHROPIC_KEY: &str = "sk-ant-mock-real-key";
pub const DEFAULT_OPENAI_KEY: &str = "sk-openai-mock-real-key";

pub struct MockConfig {
    /// The `x-api-key` expected on Anthropic routes.
    pub anthropic_key: String,
    /// The bearer token expected on OpenAI routes.
    pub openai_key: String,
    /// Delay between streamed events.
    pub event_delay_ms: u64,
}

impl MockConfig {
    /// The default keys, as `tollgate run --upstream mock` injects them.
    pub fn with_default_keys(event_delay_ms: u64) -> MockConfig {
        MockConfig {
            anthropic_key: DEFAULT_ANTHROPIC_KEY.to_string(),
            openai_key: DEFAULT_OPENAI_KEY.to_string(),
            event_delay_ms,
        }
    }
}

/// One entry of `exchanges.json`.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct Exchange {
    pub name: String,
    pub route: String,
    pub request: String,
    pub response: String,
    pub status: u16,
    pub content_type: String,
    pub stream: bool,
    pub usage: Option<serde_json::Value>,
    pub model: String,
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
    };
    let app = Router::new()
        .route("/v1/messages", post(provider))
        .route("/v1/messages/count_tokens", post(provider))
        .route("/v1/chat/completions", post(provider))
        .route("/v1/responses", post(provider))
        .route("/__mock/requests", get(requests))
        .route("/__mock/violations", get(violations))
        .route("/__mock/reset", post(reset))
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

/// A provider-shaped error from the mock itself.
fn error(path: &str, status: StatusCode, kind: &str, message: &str) -> Response {
    let body = if is_openai(path) {
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

async fn provider(
    State(s): State<AppState>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let path = uri.path().to_string();
    let parsed: Option<serde_json::Value> = serde_json::from_slice(&body).ok();
    let model = parsed
        .as_ref()
        .and_then(|v| v["model"].as_str())
        .map(str::to_string);
    let stream = parsed
        .as_ref()
        .and_then(|v| v["stream"].as_bool())
        .unwrap_or(false);
    let chosen = headers
        .get("x-mock-exchange")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
        .or_else(|| {
            parsed
                .as_ref()
                .map(|b| default_exchange(&path, b).to_string())
        });

    let mut header_json = serde_json::Map::new();
    for (name, value) in &headers {
        header_json.insert(
            name.to_string(),
            String::from_utf8_lossy(value.as_bytes())
                .into_owned()
                .into(),
        );
    }
    let mut problems = Vec::new();
    for (name, value) in &headers {
        let v = String::from_utf8_lossy(value.as_bytes());
        if v.contains("tg-") {
            problems.push((
                "mock provider: virtual key leaked upstream".to_string(),
                Some(format!("{name}: {}", redact(&v))),
            ));
        }
    }
    let (key_header, expected) = if is_openai(&path) {
        ("authorization", format!("Bearer {}", s.config.openai_key))
    } else {
        ("x-api-key", s.config.anthropic_key.clone())
    };
    let got = headers
        .get(key_header)
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
    if got.as_deref() != Some(expected.as_str()) && problems.is_empty() {
        problems.push((
            "mock provider: missing or wrong real API key".to_string(),
            got.map(|g| format!("{key_header}: {}", redact(&g))),
        ));
    }
    if parsed.is_none() || model.is_none() {
        problems.push((
            "mock provider: request body is not JSON with a model".to_string(),
            None,
        ));
    }

    let seq = {
        let Ok(mut log) = s.log.lock() else {
            return error(
                &path,
                StatusCode::INTERNAL_SERVER_ERROR,
                "api_error",
                "mock log poisoned",
            );
        };
        log.seq += 1;
        let seq = log.seq;
        log.requests.push(Received {
            seq,
            method: "POST".into(),
            path: path.clone(),
            headers: header_json,
            body_len: body.len(),
            model: model.clone(),
            stream,
            exchange: chosen.clone(),
        });
        for (reason, header) in &problems {
            log.violations.push(Violation {
                seq,
                reason: reason.clone(),
                header: header.clone(),
            });
        }
        seq
    };
    if let Some((reason, _)) = problems.first() {
        let status = if reason.contains("body") {
            StatusCode::BAD_REQUEST
        } else {
            StatusCode::UNAUTHORIZED
        };
        let kind = if status == StatusCode::BAD_REQUEST {
            "invalid_request_error"
        } else {
            "authentication_error"
        };
        return error(&path, status, kind, reason);
    }

    let name = chosen.unwrap_or_default();
    let Some(ex) = s.exchanges.iter().find(|e| e.name == name) else {
        let known: Vec<&str> = s.exchanges.iter().map(|e| e.name.as_str()).collect();
        return error(
            &path,
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            &format!(
                "mock provider: unknown exchange {name:?}; known: {}",
                known.join(", ")
            ),
        );
    };
    let Some(bytes) = fixture(&ex.response) else {
        return error(
            &path,
            StatusCode::INTERNAL_SERVER_ERROR,
            "api_error",
            &format!("mock provider: fixture {} missing", ex.response),
        );
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
    let builder = Response::builder()
        .status(status)
        .header("content-type", ex.content_type.as_str())
        .header("request-id", request_id.as_str())
        .header("x-request-id", request_id.as_str());
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
            &path,
            StatusCode::INTERNAL_SERVER_ERROR,
            "api_error",
            "mock response",
        )
    })
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
            assert!(fixture(&e.request).is_some(), "{} request missing", e.name);
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
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let config = MockConfig {
            anthropic_key: "real".into(),
            openai_key: "oreal".into(),
            event_delay_ms: 20,
        };
        tokio::spawn(serve(listener, config, std::future::pending()));
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
        raw(
            addr,
            format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"),
        )
        .await
    }
}
