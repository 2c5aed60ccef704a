//! What the core needs from its host (Envoy through proxy-wasm, or a fake in
//! tests). The filter crate implements these traits with hostcalls and nothing
//! else; every decision is made here, in the core.

/// A header list as read from the host: lower-case names, raw byte values.
/// Values are bytes because a client may send non-UTF-8 header values and the
/// SDK's `String` getters panic on them.
pub type HeaderList = Vec<(String, Vec<u8>)>;

/// Outcome of a compare-and-swap write to shared data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreError {
    /// Another worker wrote the key since we read it; re-read and retry.
    CasMismatch,
    /// The host refused the write for another reason.
    Failed,
}

/// Process-wide key/value store shared by every worker (proxy-wasm shared
/// data). Keys cannot be deleted and `cas` only guards keys that exist.
pub trait SharedStore {
    /// Current value and its CAS token, or `None` if the key was never written.
    fn get(&self, key: &str) -> Option<(Vec<u8>, u32)>;
    /// Writes `value` if the key's CAS token still equals `cas`. `cas == 0`
    /// writes unconditionally. On a missing key the host ignores `cas` and
    /// creates it (see `meter::store` for how creation races are closed).
    fn set(&self, key: &str, value: &[u8], cas: u32) -> Result<(), StoreError>;
}

/// Process-wide queues between the workers and the sync leader (proxy-wasm
/// shared queues; every worker can enqueue, the leader dequeues).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Queue {
    /// Buckets whose leases need a sync (a prost `SyncRequest` naming them).
    Sync,
    /// Settlements of requests admitted by the shared store (prost
    /// `SettleRequest`s), sent by the leader.
    Settle,
    /// Synchronous admissions whose client left before the answer (prost
    /// `AdmitRequest`s): the leader repeats each (it is idempotent) and
    /// gives back what it took if it was admitted.
    Cancel,
}

impl Queue {
    pub const ALL: [Queue; 3] = [Queue::Sync, Queue::Settle, Queue::Cancel];

    /// The shared queue's name in Envoy.
    pub fn name(self) -> &'static str {
        match self {
            Queue::Sync => "tollgate.sync",
            Queue::Settle => "tollgate.settle",
            Queue::Cancel => "tollgate.cancel",
        }
    }
}

/// Methods of the shared-limit service, `tollgate.quota.v1.Quota`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuotaMethod {
    Admit,
    Settle,
    Sync,
}

impl QuotaMethod {
    /// The gRPC service every method belongs to.
    pub const SERVICE: &'static str = "tollgate.quota.v1.Quota";

    pub fn name(self) -> &'static str {
        match self {
            QuotaMethod::Admit => "Admit",
            QuotaMethod::Settle => "Settle",
            QuotaMethod::Sync => "Sync",
        }
    }
}

/// A call to the shared-limit service could not be started (no cluster,
/// the host refused it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CallFailed;

/// Shared data and the queues to the sync leader: what the shared meter
/// needs from a worker or from the leader.
pub trait SharedPlane: SharedStore {
    /// Appends a message to a process-wide queue.
    fn enqueue(&self, queue: Queue, message: &[u8]);
}

/// What the sync leader needs from its host (the filter's root context).
pub trait RootHost: SharedPlane {
    /// The next message of a queue, if any.
    fn dequeue(&self, queue: Queue) -> Option<Vec<u8>>;
    /// Starts a call to the shared-limit service; its answer reaches the
    /// leader with the returned token.
    fn call_quota(
        &mut self,
        method: QuotaMethod,
        message: &[u8],
        timeout_ms: u64,
    ) -> Result<u32, CallFailed>;
    fn stat(&mut self, stat: Stat, delta: i64);
    fn now_ms(&self) -> u64;
}

/// Counters and gauges the filter exports as Envoy stats
/// (`wasmcustom.tollgate.*` on the admin `/stats` endpoint).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stat {
    /// A decision by reason (`tollgate.decisions.rate_limited`, ...).
    Decision(crate::audit::Reason),
    /// Shared-data writes that lost a CAS race and were retried.
    CasConflict,
    /// Shared-data updates that gave up after the bounded CAS retries.
    CasExhausted,
    /// Responses whose usage could not be read (compressed, missing, cut).
    UsageUnreadable,
    /// Admitted requests not yet settled (gauge).
    ReservationsOutstanding,
    /// Lease syncs with the shared store that succeeded / failed.
    SyncOk,
    SyncFailed,
    /// Requests admitted through a synchronous call to the shared store
    /// (strict limits, cold keys, exhausted leases), and such calls that
    /// failed (the limit's `on_store_failure` decided).
    RemoteAdmits,
    RemoteAdmitFailed,
    /// Requests metered locally at limit / replicas because the shared
    /// store could not be reached (`on_store_failure: local`).
    FallbackAdmits,
    /// Milliseconds of each synchronous admission round trip (histogram).
    RemoteAdmitRttMs,
    /// Requests held for a limit to refill (`max_wait_ms`) right now
    /// (gauge), and held requests admitted in the end (counter).
    Held,
    HeldAdmitted,
    ShadowWouldDeny,
    Downgraded,
    Throttled,
    /// Key-table records this Envoy wrote from the key service, and fetch
    /// calls that failed (`crate::sync::keys`).
    KeyRecords,
    KeyFetchFailed,
    /// Requests that ended before the filter published a record (a client
    /// that left after its headers, before any body byte): Envoy's
    /// access-log entry for them carries no audit record.
    EndedUnpublished,
}

/// Every stat besides decisions, with its name, in index order.
const STATS: [(Stat, &str); 18] = [
    (Stat::CasConflict, "tollgate.cas_conflicts"),
    (Stat::CasExhausted, "tollgate.cas_exhausted"),
    (Stat::UsageUnreadable, "tollgate.usage_unreadable"),
    (
        Stat::ReservationsOutstanding,
        "tollgate.reservations_outstanding",
    ),
    (Stat::SyncOk, "tollgate.quota.sync_ok"),
    (Stat::SyncFailed, "tollgate.quota.sync_failed"),
    (Stat::RemoteAdmits, "tollgate.quota.remote_admits"),
    (
        Stat::RemoteAdmitFailed,
        "tollgate.quota.remote_admit_failed",
    ),
    (Stat::FallbackAdmits, "tollgate.quota.fallback_admits"),
    (Stat::RemoteAdmitRttMs, "tollgate.quota.remote_admit_rtt_ms"),
    (Stat::Held, "tollgate.held"),
    (Stat::HeldAdmitted, "tollgate.held_admitted"),
    (Stat::ShadowWouldDeny, "tollgate.ladder.shadow_would_deny"),
    (Stat::Downgraded, "tollgate.ladder.downgraded"),
    (Stat::Throttled, "tollgate.ladder.throttled"),
    (Stat::KeyRecords, "tollgate.keys.records"),
    (Stat::KeyFetchFailed, "tollgate.keys.fetch_failed"),
    (Stat::EndedUnpublished, "tollgate.ended_unpublished"),
];

impl Stat {
    /// The stat name; Envoy prefixes it with `wasmcustom.`.
    pub fn name(self) -> String {
        match self {
            Stat::Decision(r) => format!("tollgate.decisions.{}", r.as_str()),
            other => STATS
                .iter()
                .find(|(s, _)| *s == other)
                .map_or("tollgate.unknown", |(_, n)| n)
                .to_string(),
        }
    }

    pub fn is_gauge(self) -> bool {
        matches!(self, Stat::ReservationsOutstanding | Stat::Held)
    }

    /// Values recorded one by one into a distribution (Envoy histogram).
    pub fn is_histogram(self) -> bool {
        self == Stat::RemoteAdmitRttMs
    }

    /// How many distinct stats there are: [`Stat::index`] is below this.
    pub const COUNT: usize = crate::audit::Reason::COUNT + STATS.len();

    /// A dense index, so a host can keep its metric handles in an array and
    /// never format a name on the request path.
    pub fn index(self) -> usize {
        let reasons = crate::audit::Reason::COUNT;
        match self {
            Stat::Decision(r) => r as usize,
            other => reasons + STATS.iter().position(|(s, _)| *s == other).unwrap_or(0),
        }
    }
}

/// Everything a request needs from its host besides shared data.
pub trait Host: SharedPlane {
    /// All request headers in one host call.
    fn request_headers(&self) -> HeaderList;
    /// Sets (`Some`) or removes (`None`) a request header.
    fn set_request_header(&mut self, name: &str, value: Option<&[u8]>);
    /// The buffered request body (up to `size` bytes).
    fn request_body(&self, size: usize) -> Option<Vec<u8>>;
    /// Replaces the buffered request body (used to add
    /// `stream_options.include_usage` for OpenAI streams).
    fn replace_request_body(&mut self, body: &[u8]);
    /// All response headers in one host call.
    fn response_headers(&self) -> HeaderList;
    /// Sets (`Some`) or removes (`None`) a response header.
    fn set_response_header(&mut self, name: &str, value: Option<&[u8]>);
    /// Replaces every response header with `headers`, in one host call.
    fn set_response_headers(&mut self, headers: &HeaderList);
    /// The current response body chunk (`size` bytes). Not buffered: for a
    /// stream this is only the newest chunk.
    fn response_body(&self, size: usize) -> Option<Vec<u8>>;
    /// Replaces the current response body chunk with `body`.
    fn replace_response_body(&mut self, body: &[u8]);
    /// Publishes the audit record as filter state (`wasm.tollgate_audit`),
    /// where Envoy's access loggers read it.
    fn set_audit_record(&mut self, record: &[u8]);
    /// The next number of this worker VM's audit stream
    /// ([`crate::audit::Numbering`], which the VM keeps for its life);
    /// `None` when shared data refused to name the stream.
    fn next_origin(&mut self, proposal: &dyn Fn() -> String) -> Option<crate::audit::Origin>;
    /// Adds `delta` to a counter or gauge.
    fn stat(&mut self, stat: Stat, delta: i64);
    /// Sets a gauge whose name is known only at run time (the provider's
    /// headroom per model group, `flow::headroom`), defining it on first
    /// use. [`Stat`] is a fixed table the host keeps by index; these names
    /// come from the policy's provider pools, so the host keeps them by name.
    fn set_gauge(&mut self, name: &str, value: u64);
    /// A property of the request or its connection (proxy-wasm
    /// `get_property`: `["connection", "uri_san_peer_certificate"]`), as the
    /// host serialises it; `None` when absent.
    fn property(&self, path: &[&str]) -> Option<Vec<u8>>;
    /// Wall-clock time in milliseconds since the Unix epoch. The core asks the
    /// host for the time once per phase and passes it down; nothing below the
    /// flow reads a clock.
    fn now_ms(&self) -> u64;
    /// Starts a call to the shared-limit service for this request; the
    /// answer arrives through `RequestFlow::on_quota_response`.
    fn call_quota(
        &mut self,
        method: QuotaMethod,
        message: &[u8],
        timeout_ms: u64,
    ) -> Result<(), CallFailed>;
    /// Whether one more request may be held for a limit to refill (the
    /// host keeps them, bounded, and retries them from its timer through
    /// `RequestFlow::on_wait_tick`).
    fn may_hold(&self) -> bool;
    /// Whether requests are held for this bucket (`key:a:requests_per_minute`):
    /// a new request then queues behind them, in arrival order.
    fn held_for(&self, bucket: &str) -> bool;
}

/// What a lifecycle callback tells the host to do next.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Let the headers or body through.
    Continue,
    /// Hold the request until more of it arrives (body buffering).
    Pause,
    /// Answer the client now; nothing goes upstream.
    Reply(LocalReply),
}

/// A response generated by Tollgate itself (a denial).
#[derive(Debug, Clone, PartialEq)]
pub struct LocalReply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl LocalReply {
    /// The value of a header of this reply, for tests and logs.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Looks a header up by lower-case name in a header list.
pub fn header<'a>(headers: &'a HeaderList, name: &str) -> Option<&'a [u8]> {
    headers
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_slice())
}

#[cfg(test)]
mod tests {
    use super::Stat;
    use crate::audit::Reason;

    #[test]
    fn every_stat_has_its_own_index_below_count() {
        let mut stats: Vec<Stat> = Reason::ALL.iter().map(|r| Stat::Decision(*r)).collect();
        stats.extend(super::STATS.iter().map(|(s, _)| *s));
        let mut seen = [false; Stat::COUNT];
        for s in stats {
            assert!(!seen[s.index()], "{} shares index {}", s.name(), s.index());
            seen[s.index()] = true;
        }
        assert!(seen.iter().all(|s| *s), "every index is used");
    }
}
