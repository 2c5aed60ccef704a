//! The key table's fetcher in this VM: starts the calls the core's
//! [`KeyFetch`] asks for (`dispatch_http_call` to the key service's
//! cluster), hands it their answers, and tells the root when the table's
//! state moved on so that it takes a fresh view of it. The protocol and
//! the lease that makes one VM per Envoy fetch are the core's
//! (`tollgate_core::sync::keys`).

use crate::host::Hostcalls;
use proxy_wasm::hostcalls;
use proxy_wasm::types::{BufferType, MapType};
use std::time::Duration;
use tollgate_core::host::{SharedStore, Stat};
use tollgate_core::sync::keys::{Applied, KeyFetch, Page, CALL_TIMEOUT_MS};

/// Where the key service is: VM options `{"keys": {"cluster": ..., "path": ...}}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeysOptions {
    pub cluster: String,
    pub path: String,
}

/// Failed calls between two warnings (a minute of retries).
const FAILURES_PER_LOG: u32 = 60;

pub struct Fetcher {
    options: KeysOptions,
    fetch: KeyFetch,
    /// The token of the call under way.
    token: Option<u32>,
}

impl Fetcher {
    pub fn new(options: KeysOptions, vm: String) -> Fetcher {
        Fetcher {
            options,
            fetch: KeyFetch::new(vm),
            token: None,
        }
    }

    /// Starts the next call if this VM is the one to make it.
    pub fn poll(&mut self) {
        let now = Hostcalls.now();
        let Some(path) = self.fetch.next_call(&Hostcalls, &self.options.path, now) else {
            return;
        };
        let cluster = &self.options.cluster;
        match hostcalls::dispatch_http_call(
            cluster,
            vec![
                (":method", "GET"),
                (":path", &path),
                (":authority", cluster),
            ],
            None,
            vec![],
            Duration::from_millis(CALL_TIMEOUT_MS),
        ) {
            Ok(token) => self.token = Some(token),
            Err(status) => {
                stat(Stat::KeyFetchFailed, 1);
                let failures = failed_in_a_row(true);
                if failures % FAILURES_PER_LOG == 1 {
                    log::warn!(
                        "key table: call to cluster {cluster} not started: {status:?} (is the cluster defined?); {failures} failed in a row"
                    );
                }
                self.fetch.not_started(&Hostcalls, now);
            }
        }
    }

    /// Whether `token` is this fetcher's call.
    pub fn owns(&self, token: u32) -> bool {
        self.token == Some(token)
    }

    /// The answer to this fetcher's call: applied to shared data. Returns
    /// whether the table's state moved on (a view to renew); the next call
    /// starts at once.
    pub fn on_response(&mut self, num_headers: usize, body_size: usize) -> bool {
        self.token = None;
        let page = read_page(num_headers, body_size);
        let applied = self
            .fetch
            .on_response(&Hostcalls, page.as_ref(), Hostcalls.now());
        if !matches!(applied, Applied::Failed(_)) {
            let failures = failed_in_a_row(false);
            if failures > 0 {
                log::info!(
                    "key table: the key service answers again, after {failures} failed calls"
                );
            }
        }
        match &applied {
            Applied::Records { written, .. } => stat(Stat::KeyRecords, *written as i64),
            Applied::Failed(_) => stat(Stat::KeyFetchFailed, 1),
        }
        let moved = match applied {
            Applied::Records {
                written,
                state: Some(state),
            } => {
                if written > 0 {
                    log::info!(
                        "key table: {written} records in, generation {} of epoch {:x}",
                        state.generation,
                        state.epoch
                    );
                }
                true
            }
            Applied::Records { state: None, .. } => false,
            Applied::Failed(why) => {
                // Calls are retried every second, by whichever VM takes the
                // lease: the count is the Envoy's, so it is said at the
                // first failure and once a minute while it lasts.
                let failures = failed_in_a_row(true);
                if failures % FAILURES_PER_LOG == 1 {
                    log::warn!(
                        "key table: {why}; retrying every {} ms ({failures} failed in a row; keys already loaded keep working)",
                        tollgate_core::sync::keys::RETRY_MS,
                    );
                }
                false
            }
        };
        self.poll();
        moved
    }

    /// The VM stops: another takes the fetching over at once.
    pub fn release(&mut self) {
        self.fetch.release(&Hostcalls);
    }
}

fn stat(stat: Stat, delta: i64) {
    tollgate_core::host::RootHost::stat(&mut Hostcalls, stat, delta);
}

/// Shared-data key of the fetch calls failed in a row, across the VMs.
const FAILURES_KEY: &str = "tollgate/keys/failures";

/// Counts a failed call (`true`) and returns the count, or on a success
/// returns the count it ends and resets it. Not on the request path: one
/// read per answer, a write when the count changes.
fn failed_in_a_row(failed: bool) -> u32 {
    let now = Hostcalls
        .get(FAILURES_KEY)
        .and_then(|(b, _)| Some(u32::from_le_bytes(b.get(..4)?.try_into().ok()?)))
        .unwrap_or(0);
    let next = if failed { now.saturating_add(1) } else { 0 };
    if next != now {
        let _ = Hostcalls.set(FAILURES_KEY, &next.to_le_bytes(), 0);
    }
    if failed {
        next
    } else {
        now
    }
}

/// The answer as the core reads it. A failed call (no headers) is `None`;
/// maps are read only when the host says they have entries (see
/// `host::grpc_response`).
fn read_page(num_headers: usize, body_size: usize) -> Option<Page> {
    if num_headers == 0 {
        return None;
    }
    let headers = hostcalls::get_map_bytes(MapType::HttpCallResponseHeaders).ok()?;
    let header = |name: &str| {
        headers
            .iter()
            .find(|(n, _)| n == name)
            .and_then(|(_, v)| String::from_utf8(v.clone()).ok())
    };
    let body = if body_size > 0 {
        hostcalls::get_buffer(BufferType::HttpCallResponseBody, 0, body_size)
            .ok()
            .flatten()
            .unwrap_or_default()
    } else {
        Vec::new()
    };
    Some(Page {
        status: header(":status")?.parse().ok()?,
        epoch: header("x-tollgate-keys-epoch").and_then(|e| u64::from_str_radix(&e, 16).ok()),
        generation: header("x-tollgate-keys-generation").and_then(|g| g.parse().ok()),
        next: header("x-tollgate-keys-next"),
        body,
    })
}
