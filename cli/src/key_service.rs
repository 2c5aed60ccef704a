//! The key service: serves the policy file's keys to Envoy as a table
//! (`GET /v1/keys`), so that a key change travels as the change alone
//! rather than as the whole policy through the filter configuration. The
//! table and its pages are the core's ([`KeyService`]); this is the HTTP
//! side: long polls that answer as soon as the table changes, and which
//! generation some Envoy has confirmed loading (a call saying it is at the
//! current one), for `tollgate run` to say ready only then.

use crate::output::status;
use crate::policy_file;
use anyhow::{Context, Result};
use axum::extract::{Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use serde_json::Value;
use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;
use tollgate_core::sync::key_service::{KeyService, PAGE};

/// The path Envoy fetches (the filter's default `keys.path`).
pub const PATH: &str = "/v1/keys";
/// The longest a call is held open, whatever it asks (ms): below the
/// filter's call timeout.
const MAX_WAIT_MS: u64 = 10_000;

/// How long a call waits for a service that has no valid policy yet
/// before it is answered 503. `tollgate run` starts Envoy while it checks
/// the policy, so Envoy's first call often comes before the table: held,
/// it is answered the moment the table loads, instead of a 503 and the
/// filter's retry a second later (`tollgate_core::sync::keys::RETRY_MS`).
const LOADING_HOLD: Duration = Duration::from_millis(2_000);

/// The table served, shared by the HTTP handlers and the policy watch.
#[derive(Clone)]
pub struct KeyTable {
    service: Arc<Mutex<KeyService>>,
    /// The generation now: a held call wakes when it moves.
    generation: watch::Sender<u64>,
    /// The newest generation a caller said it is at.
    confirmed: watch::Sender<u64>,
}

impl KeyTable {
    /// A table with no policy yet, with a new epoch (Envoy fetches the
    /// whole table from a service it has not seen): calls are answered 503
    /// until [`KeyTable::update`] gives it one (an empty table would make
    /// Envoy refuse every key as unknown).
    pub fn empty() -> KeyTable {
        KeyTable {
            service: Arc::new(Mutex::new(KeyService::new(rand::random::<u64>() >> 1))),
            generation: watch::channel(0).0,
            confirmed: watch::channel(0).0,
        }
    }

    /// Takes a new (valid) policy document's keys; returns how many records
    /// changed.
    pub fn update(&self, doc: &Value) -> usize {
        let (changed, generation) = {
            let mut service = self.service.lock().unwrap_or_else(|p| p.into_inner());
            (service.update(doc), service.generation())
        };
        self.generation.send_replace(generation);
        changed
    }

    pub fn generation(&self) -> u64 {
        *self.generation.borrow()
    }

    /// Waits until some caller confirms it has the current generation.
    pub async fn confirmed(&self, timeout: Duration) -> Result<()> {
        let want = self.generation();
        let mut rx = self.confirmed.subscribe();
        tokio::time::timeout(timeout, rx.wait_for(|g| *g >= want))
            .await
            .with_context(|| {
                format!(
                    "Envoy did not load the key table within {}s (see its log for \"key table\")",
                    timeout.as_secs()
                )
            })?
            .context("the key service stopped")?;
        Ok(())
    }

    pub fn router(&self) -> Router {
        Router::new()
            .route(PATH, get(keys))
            .with_state(self.clone())
    }
}

/// Serves the table on `addr` until `shutdown`.
pub async fn serve(
    table: KeyTable,
    addr: SocketAddr,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(SocketAddr, tokio::task::JoinHandle<Result<()>>)> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the key service {addr}"))?;
    let local = listener.local_addr()?;
    let task = tokio::spawn(async move {
        axum::serve(listener, table.router())
            .with_graceful_shutdown(shutdown)
            .await?;
        Ok(())
    });
    Ok((local, task))
}

/// Keeps `table` on the policy file at `path` (and the files it
/// includes) until `stop`: a valid edit's keys replace the table's; an
/// invalid one is reported and the table kept, as the gateway does.
pub async fn watch(table: KeyTable, path: PathBuf, stop: impl Future<Output = ()>) {
    tokio::pin!(stop);
    let mut watch = policy_file::Watch::new(&path);
    let mut tick = tokio::time::interval(WATCH_EVERY);
    loop {
        tokio::select! {
            _ = &mut stop => return,
            _ = tick.tick() => {}
        }
        let Some(current) = watch.changed() else {
            continue;
        };
        let loading = current.clone();
        match tokio::task::spawn_blocking(move || loading.load()).await {
            Ok(Ok(p)) => {
                let changed = table.update(&p.doc);
                if changed > 0 {
                    status(format_args!(
                        "key service: {} ({} keys, {changed} key records changed, generation {})",
                        path.display(),
                        p.keys,
                        table.generation()
                    ));
                }
            }
            Ok(Err(errors)) => {
                eprintln!(
                    "key service: policy {} has {} error(s); the key table stays as it was:",
                    path.display(),
                    errors.len()
                );
                for e in errors {
                    eprintln!("  error: {e}");
                }
            }
            Err(e) => eprintln!("key service: loading the policy failed: {e}"),
        }
    }
}

/// How often the collector's key service looks at the policy file (a
/// `stat`; a read only when it changed).
const WATCH_EVERY: Duration = Duration::from_millis(100);

fn bad_request(msg: String) -> Response {
    (StatusCode::BAD_REQUEST, msg).into_response()
}

/// A query parameter: absent, parsed, or what is wrong with it.
fn param<T>(
    q: &HashMap<String, String>,
    name: &str,
    problem: &str,
    parse: impl Fn(&str) -> Option<T>,
) -> Result<Option<T>, String> {
    match q.get(name) {
        None => Ok(None),
        Some(v) => parse(v)
            .map(Some)
            .ok_or_else(|| format!("{name}: {problem}: {v:?}")),
    }
}

/// `GET /v1/keys?epoch=<hex>&since=<generation>&after=<hash>&wait_ms=<ms>`.
async fn keys(State(table): State<KeyTable>, Query(q): Query<HashMap<String, String>>) -> Response {
    let epoch = match param(&q, "epoch", "not hexadecimal", |e| {
        u64::from_str_radix(e, 16).ok()
    }) {
        Ok(e) => e,
        Err(msg) => return bad_request(msg),
    };
    let since = match param(&q, "since", "not a generation", |s| s.parse::<u64>().ok()) {
        Ok(s) => s.unwrap_or(0),
        Err(msg) => return bad_request(msg),
    };
    let wait_ms = match param(&q, "wait_ms", "not a number", |s| s.parse::<u64>().ok()) {
        Ok(w) => w.unwrap_or(0),
        Err(msg) => return bad_request(msg),
    };
    if table.generation() == 0 {
        let mut rx = table.generation.subscribe();
        let _ = tokio::time::timeout(LOADING_HOLD, rx.wait_for(|g| *g != 0)).await;
    }
    if table.generation() == 0 {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "the key service has no valid policy yet (see its log)",
        )
            .into_response();
    }
    let after = q.get("after").map(String::as_str);
    let current = table
        .service
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .is_current(epoch, since);
    if current && after.is_none() {
        // The caller has this generation: say so, then hold the call until
        // the next one (or the wait is over).
        table.confirmed.send_if_modified(|g| {
            let newer = since > *g;
            if newer {
                *g = since;
            }
            newer
        });
        if wait_ms > 0 {
            let mut rx = table.generation.subscribe();
            let wait = Duration::from_millis(wait_ms.min(MAX_WAIT_MS));
            let _ = tokio::time::timeout(wait, rx.wait_for(|g| *g != since)).await;
        }
    }
    let page = {
        let service = table.service.lock().unwrap_or_else(|p| p.into_inner());
        service.page(epoch, since, after, PAGE)
    };
    let mut headers = HeaderMap::new();
    let mut put = |name: &'static str, value: String| {
        if let Ok(v) = HeaderValue::from_str(&value) {
            headers.insert(name, v);
        }
    };
    put("x-tollgate-keys-epoch", format!("{:x}", page.epoch));
    put("x-tollgate-keys-generation", page.generation.to_string());
    if let Some(next) = &page.next {
        put("x-tollgate-keys-next", next.clone());
    }
    put("content-type", "text/plain; charset=utf-8".to_string());
    (StatusCode::OK, headers, page.body()).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn doc(ids: &[&str]) -> Value {
        let keys: Vec<Value> = ids
            .iter()
            .map(|id| json!({"id": id, "key_sha256": tollgate_core::vkey::sha256_hex(id)}))
            .collect();
        json!({"version": 1, "keys": keys})
    }

    /// An empty table served on a free port until the test ends.
    async fn started() -> (KeyTable, SocketAddr) {
        let table = KeyTable::empty();
        let at = "127.0.0.1:0".parse().unwrap();
        let (addr, _) = serve(table.clone(), at, std::future::pending())
            .await
            .unwrap();
        (table, addr)
    }

    async fn get(addr: SocketAddr, query: &str) -> (u16, HashMap<String, String>, String) {
        let url = format!("http://{addr}{PATH}?{query}");
        let resp = reqwest::get(&url).await.unwrap();
        let status = resp.status().as_u16();
        let headers = resp
            .headers()
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_string()))
            .collect();
        (status, headers, resp.text().await.unwrap())
    }

    #[tokio::test]
    async fn a_call_made_before_the_policy_loads_is_answered_when_it_does() {
        let (table, addr) = started().await;
        let call = tokio::spawn(async move {
            let asked = std::time::Instant::now();
            (get(addr, "since=0").await, asked.elapsed())
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        table.update(&doc(&["a"]));
        let ((status, headers, body), took) = call.await.unwrap();
        assert_eq!((status, body.lines().count()), (200, 1), "{body}");
        assert_eq!(headers["x-tollgate-keys-generation"], "1");
        // Answered on the load, not at the end of the hold (2 s): 300 ms
        // of waiting plus a loaded machine's scheduling.
        assert!(took < Duration::from_millis(1_800), "{took:?}");
    }

    #[tokio::test]
    async fn a_held_call_answers_when_a_key_changes_and_confirms_the_generation() {
        let (table, addr) = started().await;
        table.update(&doc(&["a", "b"]));
        let (status, headers, body) = get(addr, "since=0").await;
        assert_eq!(status, 200);
        assert_eq!(body.lines().count(), 2);
        assert_eq!(headers["x-tollgate-keys-generation"], "1");
        let epoch = headers["x-tollgate-keys-epoch"].clone();
        // Not confirmed until a call says it is at generation 1.
        assert!(table.confirmed(Duration::from_millis(50)).await.is_err());
        let held = tokio::spawn(async move {
            let started = std::time::Instant::now();
            let answer = get(addr, &format!("epoch={epoch}&since=1&wait_ms=5000")).await;
            (answer, started.elapsed())
        });
        table.confirmed(Duration::from_secs(5)).await.unwrap();
        assert_eq!(table.update(&doc(&["a", "b", "c"])), 1);
        let ((status, headers, body), took) = held.await.unwrap();
        assert_eq!(status, 200);
        assert_eq!(headers["x-tollgate-keys-generation"], "2");
        assert_eq!(
            body,
            format!(
                "{} {}\n",
                tollgate_core::vkey::sha256_hex("c"),
                json!({"id": "c", "key_sha256": tollgate_core::vkey::sha256_hex("c")})
            )
        );
        // Answered on the change, not at the end of the wait (5 s); the
        // bound leaves 4 s for a loaded machine.
        assert!(took < Duration::from_secs(4), "{took:?}");
    }

    #[tokio::test]
    async fn a_malformed_query_is_refused_with_what_is_wrong() {
        let (table, addr) = started().await;
        // No policy yet (after the hold): not an empty table, which would
        // refuse every key.
        let (status, _, body) = get(addr, "since=0").await;
        assert_eq!(
            (status, body.as_str()),
            (503, "the key service has no valid policy yet (see its log)")
        );
        table.update(&doc(&["a"]));
        let (status, _, body) = get(addr, "epoch=xyz").await;
        assert_eq!(
            (status, body.as_str()),
            (400, "epoch: not hexadecimal: \"xyz\"")
        );
        let (status, _, body) = get(addr, "since=-1").await;
        assert_eq!(
            (status, body.as_str()),
            (400, "since: not a generation: \"-1\"")
        );
    }
}
