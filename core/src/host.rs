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
}

impl Stat {
    /// The stat name; Envoy prefixes it with `wasmcustom.`.
    pub fn name(self) -> String {
        match self {
            Stat::Decision(r) => format!("tollgate.decisions.{}", r.as_str()),
            Stat::CasConflict => "tollgate.cas_conflicts".to_string(),
            Stat::CasExhausted => "tollgate.cas_exhausted".to_string(),
            Stat::UsageUnreadable => "tollgate.usage_unreadable".to_string(),
            Stat::ReservationsOutstanding => "tollgate.reservations_outstanding".to_string(),
        }
    }

    pub fn is_gauge(self) -> bool {
        self == Stat::ReservationsOutstanding
    }

    /// How many distinct stats there are: [`Stat::index`] is below this.
    pub const COUNT: usize = crate::audit::Reason::COUNT + 4;

    /// A dense index, so a host can keep its metric handles in an array and
    /// never format a name on the request path.
    pub fn index(self) -> usize {
        let reasons = crate::audit::Reason::COUNT;
        match self {
            Stat::Decision(r) => r as usize,
            Stat::CasConflict => reasons,
            Stat::CasExhausted => reasons + 1,
            Stat::UsageUnreadable => reasons + 2,
            Stat::ReservationsOutstanding => reasons + 3,
        }
    }
}

/// Everything a request needs from its host besides shared data.
pub trait Host: SharedStore {
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
    /// The current response body chunk (`size` bytes). Not buffered: for a
    /// stream this is only the newest chunk.
    fn response_body(&self, size: usize) -> Option<Vec<u8>>;
    /// Replaces the current response body chunk with `body`.
    fn replace_response_body(&mut self, body: &[u8]);
    /// Publishes the audit record as filter state (`wasm.tollgate_audit`),
    /// where Envoy's access loggers read it.
    fn set_audit_record(&mut self, record: &[u8]);
    /// Adds `delta` to a counter or gauge.
    fn stat(&mut self, stat: Stat, delta: i64);
    /// Wall-clock time in milliseconds since the Unix epoch. The core asks the
    /// host for the time once per phase and passes it down; nothing below the
    /// flow reads a clock.
    fn now_ms(&self) -> u64;
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
        stats.extend([
            Stat::CasConflict,
            Stat::CasExhausted,
            Stat::UsageUnreadable,
            Stat::ReservationsOutstanding,
        ]);
        let mut seen = [false; Stat::COUNT];
        for s in stats {
            assert!(!seen[s.index()], "{} shares index {}", s.name(), s.index());
            seen[s.index()] = true;
        }
        assert!(seen.iter().all(|s| *s), "every index is used");
    }
}
