//! `tollgate_core::host::Host` over proxy-wasm hostcalls. Every host status
//! is turned into a core value here; nothing unwraps.

use crate::keys::KeysOptions;
use proxy_wasm::hostcalls;
use proxy_wasm::types::{BufferType, MapType, MetricType, Status};
use std::time::Duration;
use tollgate_core::flow::{FilterOptions, Refusal, VM_OPTIONS_ENV};
use tollgate_core::host::{
    CallFailed, HeaderList, Host, LocalReply, Queue, QuotaMethod, RootHost, SharedPlane,
    SharedStore, Stat, StoreError,
};
use tollgate_core::meter::SharedOptions;
use tollgate_core::reply::error_reply;
use tollgate_core::route::Provider;

/// Zero-sized: hostcalls act on the context the SDK made current.
pub struct Hostcalls;

impl Hostcalls {
    /// The wall clock in ms. Inside [`one_instant`] (a request callback) it
    /// is the VM clock when the VM keeps one ([`use_vm_clock`]), else read
    /// once and shared by the callback's phases.
    pub fn now(&self) -> u64 {
        INSTANT.with(|i| match i.get() {
            Instant::Outside => read_clock(),
            Instant::Unread => {
                let t = match VM_CLOCK.get() {
                    0 => read_clock(),
                    t => t,
                };
                i.set(Instant::Read(t));
                t
            }
            Instant::Read(t) => t,
        })
    }
}

/// Envoy's wall clock in ms: one host call.
fn read_clock() -> u64 {
    hostcalls::get_current_time()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Makes this VM's requests use the VM clock: the time of the worker's
/// last timer tick, kept by [`tick_clock`], instead of a clock read of
/// their own (one host call per request callback, three per served
/// request). The timer then runs every `crate::CLOCK_TICK_MS`, so the
/// time a request sees is at most that old: buckets refill as of then
/// (never more than they should), and expiries and day boundaries apply
/// that much later. Not with a shared store, whose leases are bounded in
/// time.
pub fn use_vm_clock() {
    VM_CLOCK.set(read_clock().max(1));
}

/// Whether this VM's requests use the VM clock ([`use_vm_clock`]).
pub fn keeps_vm_clock() -> bool {
    VM_CLOCK.get() != 0
}

/// The timer's tick: a VM that keeps a clock reads it now. Returns the time.
pub fn tick_clock() -> u64 {
    let now = read_clock();
    if keeps_vm_clock() {
        VM_CLOCK.set(now.max(1));
    }
    now
}

#[derive(Clone, Copy)]
enum Instant {
    /// Not in a request callback: every read asks the host.
    Outside,
    Unread,
    Read(u64),
}

thread_local! {
    static INSTANT: std::cell::Cell<Instant> = const { std::cell::Cell::new(Instant::Outside) };
    /// The VM clock (ms), 0 when the VM keeps none ([`use_vm_clock`]).
    static VM_CLOCK: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
    /// This VM's audit stream: one per worker VM, for the VM's life.
    static NUMBERING: std::cell::RefCell<tollgate_core::audit::Numbering> =
        std::cell::RefCell::new(tollgate_core::audit::Numbering::default());
}

/// Runs one request callback with one clock read at most: a request's
/// phases ask for the time several times (admission, audit, headers), and
/// each read is a host call; microseconds apart, they are one instant.
pub fn one_instant<T>(f: impl FnOnce() -> T) -> T {
    INSTANT.with(|i| i.set(Instant::Unread));
    let out = f();
    INSTANT.with(|i| i.set(Instant::Outside));
    out
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

    fn set_response_headers(&mut self, headers: &HeaderList) {
        let pairs = headers
            .iter()
            .map(|(n, v)| (n.as_str(), v.as_slice()))
            .collect();
        log_status(
            "set response headers",
            hostcalls::set_map_bytes(MapType::HttpResponseHeaders, pairs),
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

    fn next_origin(
        &mut self,
        proposal: &dyn Fn() -> String,
    ) -> Option<tollgate_core::audit::Origin> {
        NUMBERING.with(|n| n.borrow_mut().next(self, proposal))
    }

    fn set_audit_record(&mut self, record: &[u8]) {
        // The SDK joins the path; Envoy stores it as filter state `wasm.tollgate_audit`.
        log_status(
            "publish audit record",
            hostcalls::set_property(vec!["tollgate_audit"], Some(record)),
        );
    }

    fn stat(&mut self, stat: Stat, delta: i64) {
        if stat.is_histogram() {
            // Each sample counts in a distribution: recorded at once.
            if let Some(id) = metric_id(stat) {
                log_status(
                    "record stat",
                    hostcalls::record_metric(id, delta.max(0) as u64),
                );
            }
        } else {
            add_pending(stat, delta);
        }
    }

    fn set_gauge(&mut self, name: &str, value: u64) {
        if let Some(id) = named_gauge_id(name) {
            // On a gauge, Envoy's record_metric sets the value.
            log_status("set gauge", hostcalls::record_metric(id, value));
        }
    }

    fn property(&self, path: &[&str]) -> Option<Vec<u8>> {
        // Envoy answers Ok, NotFound, or a serialisation / internal
        // failure; the SDK turns only other statuses into a panic.
        match hostcalls::get_property(path.to_vec()) {
            Ok(value) => value,
            Err(status) => {
                log::warn!("tollgate: property {path:?}: host status {status:?}");
                None
            }
        }
    }

    fn now_ms(&self) -> u64 {
        self.now()
    }

    fn call_quota(
        &mut self,
        method: QuotaMethod,
        message: &[u8],
        timeout_ms: u64,
    ) -> Result<(), CallFailed> {
        grpc_call(method, message, timeout_ms).map(|_| ())
    }

    fn may_hold(&self) -> bool {
        crate::held::room()
    }

    fn held_for(&self, bucket: &str) -> bool {
        crate::held::held_for(bucket)
    }
}

impl SharedPlane for Hostcalls {
    fn enqueue(&self, queue: Queue, message: &[u8]) {
        match queue_id(queue) {
            Some(id) => log_status(
                "enqueue for the sync leader",
                hostcalls::enqueue_shared_queue(id, Some(message)),
            ),
            None => log::warn!("shared queue {} is not registered", queue.name()),
        }
    }
}

impl RootHost for Hostcalls {
    fn dequeue(&self, queue: Queue) -> Option<Vec<u8>> {
        hostcalls::dequeue_shared_queue(queue_id(queue)?)
            .ok()
            .flatten()
    }

    fn call_quota(
        &mut self,
        method: QuotaMethod,
        message: &[u8],
        timeout_ms: u64,
    ) -> Result<u32, CallFailed> {
        grpc_call(method, message, timeout_ms)
    }

    fn stat(&mut self, stat: Stat, delta: i64) {
        Host::stat(self, stat, delta)
    }

    fn now_ms(&self) -> u64 {
        self.now()
    }
}

thread_local! {
    /// The quota service's Envoy cluster (with a shared store).
    static QUOTA_CLUSTER: std::cell::RefCell<String> = const { std::cell::RefCell::new(String::new()) };
    /// Ids of the shared queues, by `Queue` position.
    static QUEUES: std::cell::RefCell<[Option<u32>; Queue::ALL.len()]> =
        const { std::cell::RefCell::new([None; Queue::ALL.len()]) };
}

/// Registers the shared queues (every VM does: the host returns the same id
/// for a name, and the last registrant gets the notifications, which the
/// leader does not need: it drains on its tick) and remembers the cluster.
pub fn init_shared(cluster: &str) {
    QUOTA_CLUSTER.with(|c| *c.borrow_mut() = cluster.to_string());
    QUEUES.with(|q| {
        let mut q = q.borrow_mut();
        for (slot, queue) in q.iter_mut().zip(Queue::ALL) {
            *slot = hostcalls::register_shared_queue(queue.name()).ok();
        }
    });
}

fn queue_id(queue: Queue) -> Option<u32> {
    let at = Queue::ALL.iter().position(|q| *q == queue)?;
    QUEUES.with(|q| q.borrow().get(at).copied().flatten())
}

/// A unary gRPC call to the quota service as an HTTP/2 callout with gRPC
/// framing (a 5-byte prefix: not compressed, then the length). Hand-written
/// rather than the SDK's `dispatch_grpc_call`, which panics (trapping the
/// VM) when the host answers `BadArgument`, as Envoy does for a cluster that
/// does not exist; the HTTP callout returns that as an error instead, and
/// the limit's `on_store_failure` decides.
fn grpc_call(method: QuotaMethod, message: &[u8], timeout_ms: u64) -> Result<u32, CallFailed> {
    let cluster = QUOTA_CLUSTER.with(|c| c.borrow().clone());
    if cluster.is_empty() {
        return Err(CallFailed);
    }
    let path = format!("/{}/{}", QuotaMethod::SERVICE, method.name());
    let mut body = Vec::with_capacity(message.len() + 5);
    body.push(0);
    body.extend_from_slice(&(message.len() as u32).to_be_bytes());
    body.extend_from_slice(message);
    hostcalls::dispatch_http_call(
        &cluster,
        vec![
            (":method", "POST"),
            (":path", &path),
            (":authority", &cluster),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
        ],
        Some(&body),
        vec![],
        Duration::from_millis(timeout_ms.max(1)),
    )
    .map_err(|status| {
        log::warn!("quota call {} not started: {status:?}", method.name());
        CallFailed
    })
}

/// The message of a gRPC callout's answer, or `None` when the call failed
/// (no response, a non-OK `grpc-status`, a malformed frame). The counts are
/// the callback's: a map is read only when the host says it has entries,
/// because reading the map of a failed call is `BadArgument` for Envoy, on
/// which the SDK's getters panic.
pub fn grpc_response(num_headers: usize, body_size: usize, num_trailers: usize) -> Option<Vec<u8>> {
    let grpc_status = |map: MapType| {
        hostcalls::get_map_bytes(map)
            .ok()?
            .into_iter()
            .find(|(name, _)| name == "grpc-status")
            .map(|(_, value)| value)
    };
    // A trailers-only answer (errors) carries grpc-status in its headers.
    let status = if num_trailers > 0 {
        grpc_status(MapType::HttpCallResponseTrailers)
    } else if num_headers > 0 {
        grpc_status(MapType::HttpCallResponseHeaders)
    } else {
        None
    };
    if status.as_deref() != Some(b"0") || body_size < 5 {
        return None;
    }
    let body = hostcalls::get_buffer(BufferType::HttpCallResponseBody, 0, body_size)
        .ok()
        .flatten()?;
    let (prefix, message) = body.split_at_checked(5)?;
    let len = u32::from_be_bytes(prefix.get(1..5)?.try_into().ok()?) as usize;
    (prefix.first() == Some(&0) && message.len() == len).then(|| message.to_vec())
}

thread_local! {
    /// Metric ids of this VM by `Stat::index`, defined on first use.
    static METRICS: std::cell::RefCell<[Option<u32>; Stat::COUNT]> =
        const { std::cell::RefCell::new([None; Stat::COUNT]) };
}

thread_local! {
    /// Counter and gauge deltas not yet handed to Envoy. A request adds to
    /// them without a host call (three to five increments per request were
    /// a tenth of its host calls); the root's timer hands them over
    /// ([`flush_stats`], at least every [`crate::STATS_FLUSH_MS`]), so
    /// Envoy's figures lag by at most that.
    static PENDING: std::cell::RefCell<[Option<(Stat, i64)>; Stat::COUNT]> =
        const { std::cell::RefCell::new([None; Stat::COUNT]) };
}

fn add_pending(stat: Stat, delta: i64) {
    PENDING.with(|p| {
        if let Some(slot) = p.borrow_mut().get_mut(stat.index()) {
            let sum = slot.map_or(0, |(_, d)| d) + delta;
            *slot = Some((stat, sum));
        }
    });
}

/// Hands the pending counter and gauge deltas to Envoy: one host call per
/// stat that moved since the last flush.
pub fn flush_stats() {
    let pending = PENDING.with(|p| std::mem::replace(&mut *p.borrow_mut(), [None; Stat::COUNT]));
    for (stat, delta) in pending.into_iter().flatten() {
        if delta != 0 {
            if let Some(id) = metric_id(stat) {
                log_status("update stat", hostcalls::increment_metric(id, delta));
            }
        }
    }
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
        } else if stat.is_histogram() {
            MetricType::Histogram
        } else {
            MetricType::Counter
        };
        let id = hostcalls::define_metric(kind, &stat.name()).ok()?;
        *slot = Some(id);
        Some(id)
    })
}

/// At most this many gauges named at run time per VM. Their names come
/// from the policy's provider pools (plus one `<provider>:other` group per
/// provider), so a policy stays far below it; the cap only keeps a long
/// run of reloads with ever new group names from growing the map.
const MAX_NAMED_GAUGES: usize = 1024;

thread_local! {
    /// Gauge ids of this VM by name ([`Host::set_gauge`]), defined on first use.
    static NAMED_GAUGES: std::cell::RefCell<std::collections::BTreeMap<String, u32>> =
        const { std::cell::RefCell::new(std::collections::BTreeMap::new()) };
}

fn named_gauge_id(name: &str) -> Option<u32> {
    NAMED_GAUGES.with(|m| {
        let mut m = m.borrow_mut();
        if let Some(id) = m.get(name) {
            return Some(*id);
        }
        // Envoy hands out a new id (and keeps it) at every definition,
        // even of a name it knows: past the cap, drop the update instead.
        if m.len() >= MAX_NAMED_GAUGES {
            log::warn!(
                "tollgate: {MAX_NAMED_GAUGES} provider gauges defined; {name} is not exported"
            );
            return None;
        }
        let id = hostcalls::define_metric(MetricType::Gauge, name).ok()?;
        m.insert(name.to_string(), id);
        Some(id)
    })
}

/// The VM options and where they came from: the VM configuration, or when
/// that is empty the environment variable [`VM_OPTIONS_ENV`]. Istio and
/// Envoy Gateway set only the plugin configuration (the policy) and
/// environment variables, which Envoy hands the VM through WASI.
pub fn vm_options() -> (Vec<u8>, &'static str) {
    let configured = hostcalls::get_buffer(BufferType::VmConfiguration, 0, usize::MAX)
        .ok()
        .flatten()
        .unwrap_or_default();
    if !configured.iter().all(u8::is_ascii_whitespace) {
        return (configured, "the VM configuration");
    }
    match std::env::var_os(VM_OPTIONS_ENV) {
        Some(value) => (
            value.into_encoded_bytes(),
            "the environment variable TOLLGATE_VM_OPTIONS",
        ),
        None => (configured, "the VM configuration"),
    }
}

/// What the VM configuration says: the flow's options, the quota
/// service's cluster (with `shared`), where the key table comes from (with
/// `keys`).
#[derive(Debug, Default)]
pub struct VmOptions {
    pub flow: FilterOptions,
    pub quota_cluster: Option<String>,
    pub keys: Option<KeysOptions>,
}

/// VM configuration: deployment options, not policy. Empty means defaults.
/// `{"hold_request_headers": true, "shared": {"cluster": "tollgate_quota",
/// "sync_period_ms": 100, "admit_timeout_ms": 1000}, "keys": {"cluster":
/// "tollgate_keys", "path": "/v1/keys"}}`; with `shared`, every bucket is
/// shared by the replicas through the quota service on `cluster`; with
/// `keys`, the policy's keys come from the key service on `cluster`.
pub fn parse_options(bytes: &[u8]) -> Result<VmOptions, String> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(VmOptions::default());
    }
    let v: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|e| format!("vm configuration: {e}"))?;
    let obj = v
        .as_object()
        .ok_or("vm configuration must be a JSON object")?;
    if let Some(name) = obj
        .keys()
        .find(|k| !["hold_request_headers", "shared", "keys"].contains(&k.as_str()))
    {
        return Err(format!(
            "vm configuration: unknown field {name:?} (known: hold_request_headers, shared, keys)"
        ));
    }
    let hold = match obj.get("hold_request_headers") {
        None => true,
        Some(b) => b
            .as_bool()
            .ok_or("vm configuration: hold_request_headers must be true or false")?,
    };
    let (shared, cluster) = match obj.get("shared") {
        None => (None, None),
        Some(s) => {
            let s = s
                .as_object()
                .ok_or("vm configuration: shared must be an object")?;
            if let Some(name) = s
                .keys()
                .find(|k| !["cluster", "sync_period_ms", "admit_timeout_ms"].contains(&k.as_str()))
            {
                return Err(format!(
                    "vm configuration: shared: unknown field {name:?} (known: cluster, sync_period_ms, admit_timeout_ms)"
                ));
            }
            let defaults = SharedOptions::default();
            let ms = |name: &str, default: u64| match s.get(name) {
                None => Ok(default),
                Some(v) => v.as_u64().filter(|n| *n > 0).ok_or(format!(
                    "vm configuration: shared.{name} must be a positive whole number of ms"
                )),
            };
            let cluster = match s.get("cluster") {
                None => "tollgate_quota".to_string(),
                Some(c) => c
                    .as_str()
                    .filter(|c| !c.is_empty())
                    .ok_or("vm configuration: shared.cluster must be a cluster name")?
                    .to_string(),
            };
            (
                Some(SharedOptions {
                    sync_period_ms: ms("sync_period_ms", defaults.sync_period_ms)?,
                    admit_timeout_ms: ms("admit_timeout_ms", defaults.admit_timeout_ms)?,
                }),
                Some(cluster),
            )
        }
    };
    Ok(VmOptions {
        flow: FilterOptions {
            hold_request_headers: hold,
            shared,
        },
        quota_cluster: cluster,
        keys: obj.get("keys").map(keys_options).transpose()?,
    })
}

fn keys_options(v: &serde_json::Value) -> Result<KeysOptions, String> {
    let k = v
        .as_object()
        .ok_or("vm configuration: keys must be an object")?;
    if let Some(name) = k
        .keys()
        .find(|n| !["cluster", "path"].contains(&n.as_str()))
    {
        return Err(format!(
            "vm configuration: keys: unknown field {name:?} (known: cluster, path)"
        ));
    }
    let text = |name: &str, default: &str| match k.get(name) {
        None => Ok(default.to_string()),
        Some(c) => c
            .as_str()
            .filter(|c| !c.is_empty())
            .map(str::to_string)
            .ok_or(format!(
                "vm configuration: keys.{name} must be a non-empty string"
            )),
    };
    let path = text("path", "/v1/keys")?;
    if !path.starts_with('/') {
        return Err("vm configuration: keys.path must start with /".to_string());
    }
    Ok(KeysOptions {
        cluster: text("cluster", "tollgate_keys")?,
        path,
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
