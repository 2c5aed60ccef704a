//! `tollgate_core::host::Host` over proxy-wasm hostcalls. Every host status
//! is turned into a core value here; nothing unwraps.

use proxy_wasm::hostcalls;
use proxy_wasm::types::{BufferType, MapType, MetricType, Status};
use tollgate_core::flow::{FilterOptions, Refusal};
use tollgate_core::host::{HeaderList, Host, LocalReply, SharedStore, Stat, StoreError};
use tollgate_core::reply::error_reply;
use tollgate_core::route::Provider;

/// Zero-sized: hostcalls act on the context the SDK made current.
pub struct Hostcalls;

impl Hostcalls {
    pub fn now(&self) -> u64 {
        hostcalls::get_current_time()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0)
    }
}

fn log_status(what: &str, result: Result<(), Status>) {
    if let Err(status) = result {
        log::warn!("{what} failed: {status:?}");
    }
}

impl SharedStore for Hostcalls {
    fn get(&self, key: &str) -> Option<(Vec<u8>, u32)> {
        match hostcalls::get_shared_data(key) {
            Ok((Some(value), Some(cas))) => Some((value, cas)),
            _ => None,
        }
    }

    fn set(&self, key: &str, value: &[u8], cas: u32) -> Result<(), StoreError> {
        let cas = if cas == 0 { None } else { Some(cas) };
        match hostcalls::set_shared_data(key, Some(value), cas) {
            Ok(()) => Ok(()),
            Err(Status::CasMismatch) => {
                if let Some(id) = metric_id(Stat::CasConflict) {
                    let _ = hostcalls::increment_metric(id, 1);
                }
                Err(StoreError::CasMismatch)
            }
            Err(_) => Err(StoreError::Failed),
        }
    }
}

impl Host for Hostcalls {
    fn request_headers(&self) -> HeaderList {
        hostcalls::get_map_bytes(MapType::HttpRequestHeaders).unwrap_or_default()
    }

    fn set_request_header(&mut self, name: &str, value: Option<&[u8]>) {
        log_status(
            "set request header",
            hostcalls::set_map_value_bytes(MapType::HttpRequestHeaders, name, value),
        );
    }

    fn request_body(&self, size: usize) -> Option<Vec<u8>> {
        hostcalls::get_buffer(BufferType::HttpRequestBody, 0, size)
            .ok()
            .flatten()
    }

    fn replace_request_body(&mut self, body: &[u8]) {
        log_status(
            "replace request body",
            hostcalls::set_buffer(BufferType::HttpRequestBody, 0, usize::MAX, body),
        );
    }

    fn response_headers(&self) -> HeaderList {
        hostcalls::get_map_bytes(MapType::HttpResponseHeaders).unwrap_or_default()
    }

    fn set_response_header(&mut self, name: &str, value: Option<&[u8]>) {
        log_status(
            "set response header",
            hostcalls::set_map_value_bytes(MapType::HttpResponseHeaders, name, value),
        );
    }

    fn response_body(&self, size: usize) -> Option<Vec<u8>> {
        hostcalls::get_buffer(BufferType::HttpResponseBody, 0, size)
            .ok()
            .flatten()
    }

    fn replace_response_body(&mut self, body: &[u8]) {
        log_status(
            "replace response body",
            hostcalls::set_buffer(BufferType::HttpResponseBody, 0, usize::MAX, body),
        );
    }

    fn set_audit_record(&mut self, record: &[u8]) {
        // The SDK joins the path; Envoy stores it as filter state `wasm.tollgate_audit`.
        log_status(
            "publish audit record",
            hostcalls::set_property(vec!["tollgate_audit"], Some(record)),
        );
    }

    fn stat(&mut self, stat: Stat, delta: i64) {
        if let Some(id) = metric_id(stat) {
            log_status("update stat", hostcalls::increment_metric(id, delta));
        }
    }

    fn now_ms(&self) -> u64 {
        self.now()
    }
}

thread_local! {
    /// Metric ids of this VM by `Stat::index`, defined on first use.
    static METRICS: std::cell::RefCell<[Option<u32>; Stat::COUNT]> =
        const { std::cell::RefCell::new([None; Stat::COUNT]) };
}

fn metric_id(stat: Stat) -> Option<u32> {
    METRICS.with(|m| {
        let mut m = m.borrow_mut();
        let slot = m.get_mut(stat.index())?;
        if let Some(id) = slot {
            return Some(*id);
        }
        let kind = if stat.is_gauge() {
            MetricType::Gauge
        } else {
            MetricType::Counter
        };
        let id = hostcalls::define_metric(kind, &stat.name()).ok()?;
        *slot = Some(id);
        Some(id)
    })
}

/// VM configuration: deployment options, not policy. Empty means defaults.
pub fn parse_options(bytes: &[u8]) -> Result<FilterOptions, String> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(FilterOptions::default());
    }
    let v: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|e| format!("vm configuration: {e}"))?;
    let obj = v
        .as_object()
        .ok_or("vm configuration must be a JSON object")?;
    if let Some(name) = obj.keys().find(|k| *k != "hold_request_headers") {
        return Err(format!(
            "vm configuration: unknown field {name:?} (known: hold_request_headers)"
        ));
    }
    let hold = match obj.get("hold_request_headers") {
        None => true,
        Some(b) => b
            .as_bool()
            .ok_or("vm configuration: hold_request_headers must be true or false")?,
    };
    Ok(FilterOptions {
        hold_request_headers: hold,
    })
}

/// The answer when no valid policy was ever loaded: fail closed.
pub fn no_policy_reply() -> LocalReply {
    let refusal = Refusal::NoPolicy;
    error_reply(
        Provider::Anthropic,
        refusal.kind(),
        &refusal.message(),
        "",
        None,
    )
}
