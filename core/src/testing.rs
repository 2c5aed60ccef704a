//! In-memory fakes of the host for tests: a shared-data store with Envoy's
//! exact semantics (CAS ignored on missing keys, no deletion) that can inject
//! CAS conflicts, and a builder-style request host.

use crate::host::{
    CallFailed, HeaderList, Host, Queue, QuotaMethod, RootHost, SharedPlane, SharedStore, Stat,
    StoreError,
};
use std::cell::{Cell as StdCell, RefCell};
use std::collections::HashMap;
use std::collections::VecDeque;
use std::rc::Rc;

/// Shared data as Envoy implements it: a global CAS counter starting at 1,
/// `set` with a non-zero `cas` fails on an existing key whose CAS differs,
/// and creates a missing key whatever `cas` says.
#[derive(Debug, Default)]
pub struct MemStore {
    map: RefCell<HashMap<String, (Vec<u8>, u32)>>,
    next_cas: StdCell<u32>,
    /// Number of upcoming `set` calls that find the key changed under them
    /// (as if another worker wrote in between).
    conflicts: StdCell<u32>,
    /// Number of `set` calls that hit a CAS mismatch so far.
    pub mismatches: StdCell<u32>,
    /// The process-wide shared queues.
    queues: RefCell<HashMap<&'static str, VecDeque<Vec<u8>>>>,
    /// The audit numbering of the worker VM the tests' requests run in:
    /// a VM's own state, kept here because a test's hosts come and go per
    /// request while its store stands for the one Envoy (and VM) they share.
    pub numbering: RefCell<crate::audit::Numbering>,
}

impl MemStore {
    pub fn new() -> Rc<MemStore> {
        Rc::new(MemStore {
            next_cas: StdCell::new(1),
            ..Default::default()
        })
    }

    /// The next `n` conditional writes lose a race: another writer bumps the
    /// key's CAS first.
    pub fn inject_conflicts(&self, n: u32) {
        self.conflicts.set(n);
    }

    fn bump(&self) -> u32 {
        let c = self.next_cas.get();
        self.next_cas.set(c.wrapping_add(1).max(1));
        c
    }

    pub fn len(&self) -> usize {
        self.map.borrow().len()
    }

    pub fn enqueue(&self, queue: Queue, message: &[u8]) {
        self.queues
            .borrow_mut()
            .entry(queue.name())
            .or_default()
            .push_back(message.to_vec());
    }

    pub fn dequeue(&self, queue: Queue) -> Option<Vec<u8>> {
        self.queues.borrow_mut().get_mut(queue.name())?.pop_front()
    }

    /// How many messages wait in a queue.
    pub fn queued(&self, queue: Queue) -> usize {
        self.queues
            .borrow()
            .get(queue.name())
            .map_or(0, VecDeque::len)
    }

    pub fn is_empty(&self) -> bool {
        self.map.borrow().is_empty()
    }
}

impl SharedStore for MemStore {
    fn get(&self, key: &str) -> Option<(Vec<u8>, u32)> {
        self.map.borrow().get(key).cloned()
    }

    fn set(&self, key: &str, value: &[u8], cas: u32) -> Result<(), StoreError> {
        if self.conflicts.get() > 0 {
            self.conflicts.set(self.conflicts.get() - 1);
            let bumped = self.bump();
            if let Some(entry) = self.map.borrow_mut().get_mut(key) {
                entry.1 = bumped;
            }
            if cas != 0 {
                self.mismatches.set(self.mismatches.get() + 1);
                return Err(StoreError::CasMismatch);
            }
        }
        let new_cas = self.bump();
        let mut map = self.map.borrow_mut();
        match map.get_mut(key) {
            Some(entry) => {
                if cas != 0 && cas != entry.1 {
                    self.mismatches.set(self.mismatches.get() + 1);
                    return Err(StoreError::CasMismatch);
                }
                *entry = (value.to_vec(), new_cas);
            }
            None => {
                map.insert(key.to_string(), (value.to_vec(), new_cas));
            }
        }
        Ok(())
    }
}

/// A request as the filter would see it, and everything the core did to it.
#[derive(Debug)]
pub struct FakeHost {
    pub store: Rc<MemStore>,
    pub request_headers: HeaderList,
    pub request_body: Vec<u8>,
    pub response_headers: HeaderList,
    /// The response chunk the next `response_body` call returns.
    pub response_chunk: Vec<u8>,
    /// Every audit record published, in order (JSON).
    pub audit: Vec<Vec<u8>>,
    /// Stats as the filter would export them, by name.
    pub stats: std::collections::BTreeMap<String, i64>,
    /// Gauges named at run time (the provider's headroom), by name.
    pub gauges: std::collections::BTreeMap<String, u64>,
    pub now_ms: u64,
    /// Calls to the quota service this request started, in order.
    pub quota_calls: Vec<(QuotaMethod, Vec<u8>)>,
    /// When set, starting a quota call fails (no cluster, host refused).
    pub quota_unreachable: bool,
    /// How many more requests the host would hold (`may_hold`).
    pub hold_room: usize,
    /// Buckets other requests are held for (`held_for`).
    pub held_buckets: Vec<String>,
    /// Calls made through the host, by method: each is one proxy-wasm host
    /// call in the filter (the host-call budget test counts them).
    pub calls: std::cell::RefCell<std::collections::BTreeMap<&'static str, u32>>,
    /// Properties by path (`connection.uri_san_peer_certificate`), as the
    /// host serialises them.
    pub properties: Vec<(Vec<String>, Vec<u8>)>,
}

impl Default for FakeHost {
    fn default() -> Self {
        FakeHost {
            store: MemStore::new(),
            request_headers: Vec::new(),
            request_body: Vec::new(),
            response_headers: Vec::new(),
            response_chunk: Vec::new(),
            audit: Vec::new(),
            stats: Default::default(),
            gauges: Default::default(),
            now_ms: 1_795_000_000_000,
            quota_calls: Vec::new(),
            quota_unreachable: false,
            hold_room: 1024,
            held_buckets: Vec::new(),
            calls: Default::default(),
            properties: Vec::new(),
        }
    }
}

impl FakeHost {
    fn count(&self, call: &'static str) {
        *self.calls.borrow_mut().entry(call).or_default() += 1;
    }

    /// Host calls made so far, in total.
    pub fn host_calls(&self) -> u32 {
        self.calls.borrow().values().sum()
    }

    pub fn new() -> FakeHost {
        FakeHost::default()
    }

    pub fn with_store(mut self, store: Rc<MemStore>) -> FakeHost {
        self.store = store;
        self
    }

    pub fn with_request_header(mut self, name: &str, value: &str) -> FakeHost {
        self.request_headers
            .push((name.to_string(), value.as_bytes().to_vec()));
        self
    }

    /// A property the host answers (`&["connection", "uri_san_peer_certificate"]`).
    pub fn with_property(mut self, path: &[&str], value: &[u8]) -> FakeHost {
        self.properties
            .push((path.iter().map(|p| p.to_string()).collect(), value.to_vec()));
        self
    }

    pub fn with_body(mut self, body: &str) -> FakeHost {
        self.request_body = body.as_bytes().to_vec();
        self
    }

    pub fn with_response_header(mut self, name: &str, value: &str) -> FakeHost {
        self.response_headers
            .push((name.to_string(), value.as_bytes().to_vec()));
        self
    }

    pub fn at(mut self, now_ms: u64) -> FakeHost {
        self.now_ms = now_ms;
        self
    }

    pub fn body_len(&self) -> usize {
        self.request_body.len()
    }

    pub fn request_header(&self, name: &str) -> Option<String> {
        crate::host::header(&self.request_headers, name)
            .map(|v| String::from_utf8_lossy(v).into_owned())
    }

    pub fn response_header(&self, name: &str) -> Option<String> {
        crate::host::header(&self.response_headers, name)
            .map(|v| String::from_utf8_lossy(v).into_owned())
    }

    /// The last audit record published, parsed.
    pub fn last_audit(&self) -> Option<crate::audit::AuditRecord> {
        self.audit
            .last()
            .and_then(|r| crate::audit::AuditRecord::from_json(r).ok())
    }
}

fn set_header(list: &mut HeaderList, name: &str, value: Option<&[u8]>) {
    list.retain(|(n, _)| n != name);
    if let Some(v) = value {
        list.push((name.to_string(), v.to_vec()));
    }
}

impl SharedStore for FakeHost {
    fn get(&self, key: &str) -> Option<(Vec<u8>, u32)> {
        self.count("get_shared_data");
        self.store.get(key)
    }

    fn set(&self, key: &str, value: &[u8], cas: u32) -> Result<(), StoreError> {
        self.count("set_shared_data");
        self.store.set(key, value, cas)
    }
}

impl Host for FakeHost {
    fn next_origin(&mut self, proposal: &dyn Fn() -> String) -> Option<crate::audit::Origin> {
        let store = self.store.clone();
        let mut numbering = store.numbering.borrow_mut();
        numbering.next(&*self, proposal)
    }

    fn request_headers(&self) -> HeaderList {
        self.count("get_request_headers");
        self.request_headers.clone()
    }

    fn set_request_header(&mut self, name: &str, value: Option<&[u8]>) {
        self.count("set_request_header");
        set_header(&mut self.request_headers, name, value);
    }

    fn request_body(&self, size: usize) -> Option<Vec<u8>> {
        self.count("get_request_body");
        Some(
            self.request_body
                .get(..size.min(self.request_body.len()))?
                .to_vec(),
        )
    }

    fn replace_request_body(&mut self, body: &[u8]) {
        self.count("set_request_body");
        self.request_body = body.to_vec();
    }

    fn response_headers(&self) -> HeaderList {
        self.count("get_response_headers");
        self.response_headers.clone()
    }

    fn set_response_header(&mut self, name: &str, value: Option<&[u8]>) {
        self.count("set_response_header");
        set_header(&mut self.response_headers, name, value);
    }

    fn set_response_headers(&mut self, headers: &HeaderList) {
        self.count("set_response_headers");
        self.response_headers = headers.clone();
    }

    fn response_body(&self, size: usize) -> Option<Vec<u8>> {
        self.count("get_response_body");
        Some(
            self.response_chunk
                .get(..size.min(self.response_chunk.len()))?
                .to_vec(),
        )
    }

    fn replace_response_body(&mut self, body: &[u8]) {
        self.count("set_response_body");
        self.response_chunk = body.to_vec();
    }

    fn set_audit_record(&mut self, record: &[u8]) {
        self.count("set_property");
        self.audit.push(record.to_vec());
    }

    fn stat(&mut self, stat: crate::host::Stat, delta: i64) {
        // Not a host call: the filter adds it to the worker's pending
        // counters, which its timer hands to Envoy.
        if stat.is_histogram() {
            self.count("record_metric");
        }
        *self.stats.entry(stat.name()).or_default() += delta;
    }

    fn set_gauge(&mut self, name: &str, value: u64) {
        self.count("record_metric");
        self.gauges.insert(name.to_string(), value);
    }

    fn property(&self, path: &[&str]) -> Option<Vec<u8>> {
        self.count("get_property");
        self.properties
            .iter()
            .find(|(p, _)| p.iter().map(String::as_str).eq(path.iter().copied()))
            .map(|(_, v)| v.clone())
    }

    /// The filter's VM clock, which its timer reads
    /// (`filter::host::use_vm_clock`): no host call for a request. With a
    /// shared store the filter reads the clock once per request callback
    /// instead; this host does not count those (the host-call budget is
    /// the filter's without one).
    fn now_ms(&self) -> u64 {
        self.now_ms
    }

    fn call_quota(
        &mut self,
        method: QuotaMethod,
        message: &[u8],
        _timeout_ms: u64,
    ) -> Result<(), CallFailed> {
        self.count("dispatch_grpc_call");
        if self.quota_unreachable {
            return Err(CallFailed);
        }
        self.quota_calls.push((method, message.to_vec()));
        Ok(())
    }

    fn may_hold(&self) -> bool {
        self.hold_room()
    }

    fn held_for(&self, bucket: &str) -> bool {
        self.held_buckets.iter().any(|b| b == bucket)
    }
}

impl FakeHost {
    fn hold_room(&self) -> bool {
        self.hold_room > 0
    }
}

impl SharedPlane for FakeHost {
    fn enqueue(&self, queue: Queue, message: &[u8]) {
        self.count("enqueue_shared_queue");
        self.count("enqueue_shared_queue");
        self.store.enqueue(queue, message);
    }
}

/// The sync leader's host in tests: the shared store and queues, a clock,
/// and the calls it started (answered by the test with their tokens).
#[derive(Debug)]
pub struct FakeRoot {
    pub store: Rc<MemStore>,
    pub now_ms: u64,
    pub calls: Vec<(u32, QuotaMethod, Vec<u8>)>,
    pub stats: std::collections::BTreeMap<String, i64>,
    next_token: u32,
}

impl FakeRoot {
    pub fn new(store: Rc<MemStore>, now_ms: u64) -> FakeRoot {
        FakeRoot {
            store,
            now_ms,
            calls: Vec::new(),
            stats: Default::default(),
            next_token: 1,
        }
    }
}

impl SharedStore for FakeRoot {
    fn get(&self, key: &str) -> Option<(Vec<u8>, u32)> {
        self.store.get(key)
    }

    fn set(&self, key: &str, value: &[u8], cas: u32) -> Result<(), StoreError> {
        self.store.set(key, value, cas)
    }
}

impl SharedPlane for FakeRoot {
    fn enqueue(&self, queue: Queue, message: &[u8]) {
        self.store.enqueue(queue, message);
    }
}

impl RootHost for FakeRoot {
    fn dequeue(&self, queue: Queue) -> Option<Vec<u8>> {
        self.store.dequeue(queue)
    }

    fn call_quota(
        &mut self,
        method: QuotaMethod,
        message: &[u8],
        _timeout_ms: u64,
    ) -> Result<u32, CallFailed> {
        let token = self.next_token;
        self.next_token += 1;
        self.calls.push((token, method, message.to_vec()));
        Ok(token)
    }

    fn stat(&mut self, stat: Stat, delta: i64) {
        *self.stats.entry(stat.name()).or_default() += delta;
    }

    fn now_ms(&self) -> u64 {
        self.now_ms
    }
}
