//! Fetching the key table from the key service into shared data, once per
//! Envoy (`crate::policy::table` says what the table is and how a request
//! reads it).
//!
//! - One fetcher per Envoy: every VM's timer may start a fetch, and the one
//!   that takes the lease [`LEASE_KEY`] (its id and an expiry, with CAS)
//!   does; a VM that dies mid-call is replaced when its lease runs out.
//! - The protocol (`GET <path>?epoch=&since=&after=&wait_ms=`): the service
//!   answers the records changed since generation `since` of its `epoch`
//!   (all of them for `since=0` or another epoch), at most a page at a
//!   time, sorted by hash, continued `after` the last hash of the page
//!   before (the `x-tollgate-keys-next` header). Asked for the generation it
//!   is at, it holds the call until something changes or `wait_ms` passes:
//!   a key change reaches Envoy as soon as the service has it.
//! - Consistency across pages: the state written when the last page is in
//!   is the generation the first page reported. A page may already carry
//!   newer records; the next call, since that generation, sends them
//!   again. Writing a record twice is harmless.
//! - A new epoch (the service restarted) is a whole table: while it is
//!   written, the state names both epochs, so keys the old table had keep
//!   working; once it is in, records of the old epoch are no key.

use crate::host::SharedStore;
use crate::policy::table::{entry_key, record, split_once, TableState};

/// Shared-data key of the fetch lease: holder id, then expiry (ms).
pub const LEASE_KEY: &str = "tollgate/keys/fetcher";
/// How long the service may hold a call open when nothing changed (ms).
pub const WAIT_MS: u64 = 10_000;
/// The call's timeout: the wait, and time to send a page.
pub const CALL_TIMEOUT_MS: u64 = WAIT_MS + 5_000;
/// A lease outlives the longest call; a holder that died is replaced then.
const LEASE_MS: u64 = CALL_TIMEOUT_MS + 5_000;
/// After a failed call, the next try waits this long (ms).
pub const RETRY_MS: u64 = 1_000;

/// What a response said, as the filter reads it from the host.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Page {
    pub status: u16,
    pub epoch: Option<u64>,
    pub generation: Option<u64>,
    /// The last hash of this page when more follow.
    pub next: Option<String>,
    pub body: Vec<u8>,
}

/// A whole-table or changes fetch that takes more than one page.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Paging {
    epoch: u64,
    since: u64,
    /// What the first page reported: the state once the last is in.
    generation: u64,
    after: String,
}

/// One VM's side of the fetch.
#[derive(Debug)]
pub struct KeyFetch {
    vm: String,
    in_flight: bool,
    paging: Option<Paging>,
    /// After a failed call, no new one before this instant.
    retry_at_ms: u64,
}

/// What a response did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Applied {
    /// Records written; the table is at this state (`None`: more pages to
    /// come).
    Records {
        written: usize,
        state: Option<TableState>,
    },
    /// Nothing usable: the reason, for the log. The next try waits
    /// [`RETRY_MS`].
    Failed(String),
}

impl KeyFetch {
    pub fn new(vm: String) -> KeyFetch {
        KeyFetch {
            vm,
            in_flight: false,
            paging: None,
            retry_at_ms: 0,
        }
    }

    /// The path and query of the call to start now, if this VM should
    /// start one: none is under way here and this VM holds, or just took,
    /// the lease. `path` is the service's path (`/v1/keys`).
    pub fn next_call(
        &mut self,
        store: &impl SharedStore,
        path: &str,
        now_ms: u64,
    ) -> Option<String> {
        if self.in_flight || !self.take_lease(store, now_ms) {
            return None;
        }
        let query = match (&self.paging, TableState::read(store)) {
            (Some(p), _) => format!("epoch={:x}&since={}&after={}", p.epoch, p.since, p.after),
            (None, Some(s)) => format!(
                "epoch={:x}&since={}&wait_ms={WAIT_MS}",
                s.epoch, s.generation
            ),
            (None, None) => "since=0".to_string(),
        };
        self.in_flight = true;
        Some(format!("{path}?{query}"))
    }

    /// The call could not be started: try again after [`RETRY_MS`].
    pub fn not_started(&mut self, store: &impl SharedStore, now_ms: u64) {
        self.in_flight = false;
        self.back_off(store, now_ms);
    }

    /// Applies an answer (`None`: the call failed).
    pub fn on_response(
        &mut self,
        store: &impl SharedStore,
        page: Option<&Page>,
        now_ms: u64,
    ) -> Applied {
        self.in_flight = false;
        let applied = match page {
            Some(page) if page.status == 200 => self.apply(store, page),
            Some(page) => Applied::Failed(format!(
                "the key service answered {}: {}",
                page.status,
                String::from_utf8_lossy(page.body.get(..200).unwrap_or(&page.body))
            )),
            None => Applied::Failed("no answer from the key service".to_string()),
        };
        if let Applied::Failed(_) = applied {
            // Start over: a page run cut short is asked for again whole.
            self.paging = None;
            self.back_off(store, now_ms);
        }
        applied
    }

    /// The VM stops: hand the lease over at once.
    pub fn release(&mut self, store: &impl SharedStore) {
        if self.holder(store).is_some_and(|(id, _, _)| id == self.vm) {
            self.hold_lease(store, 0);
        }
    }

    fn apply(&mut self, store: &impl SharedStore, page: &Page) -> Applied {
        let (Some(epoch), Some(generation)) = (page.epoch, page.generation) else {
            return Applied::Failed("the key service's answer has no epoch or generation".into());
        };
        let current = TableState::read(store);
        let first = self.paging.is_none();
        // A page of a run asked for another epoch: the service restarted
        // mid-run. Start again.
        if self.paging.as_ref().is_some_and(|p| p.epoch != epoch) {
            return Applied::Failed("the key service restarted during a fetch".into());
        }
        if first {
            if let Some(s) = current.filter(|s| s.epoch != epoch) {
                // A new table: its records count from now, the old one's
                // until it is in.
                let both = TableState {
                    next_epoch: Some(epoch),
                    ..s
                };
                let _ = store.set(crate::policy::table::STATE_KEY, both.encode().as_bytes(), 0);
            }
        }
        let mut written = 0;
        for line in page.body.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
            let Some((hash, value)) = split_once(line, b' ') else {
                return Applied::Failed("a malformed line in the key table".into());
            };
            let Some(hash) = parse_hash(hash) else {
                return Applied::Failed("a malformed hash in the key table".into());
            };
            let stored = if value == b"-" {
                Vec::new()
            } else {
                record(epoch, &String::from_utf8_lossy(value)).into_bytes()
            };
            if store.set(&entry_key(&hash), &stored, 0).is_err() {
                return Applied::Failed("shared data refused a key record".into());
            }
            written += 1;
        }
        let since = match (&self.paging, current) {
            (Some(p), _) => p.since,
            (None, Some(s)) if s.epoch == epoch => s.generation,
            (None, _) => 0,
        };
        let run_generation = self.paging.as_ref().map_or(generation, |p| p.generation);
        match &page.next {
            Some(after) => {
                self.paging = Some(Paging {
                    epoch,
                    since,
                    generation: run_generation,
                    after: after.clone(),
                });
                Applied::Records {
                    written,
                    state: None,
                }
            }
            None => {
                self.paging = None;
                let state = TableState {
                    epoch,
                    generation: run_generation,
                    next_epoch: None,
                };
                if store
                    .set(
                        crate::policy::table::STATE_KEY,
                        state.encode().as_bytes(),
                        0,
                    )
                    .is_err()
                {
                    return Applied::Failed("shared data refused the key table's state".into());
                }
                Applied::Records {
                    written,
                    state: Some(state),
                }
            }
        }
    }

    fn holder(&self, store: &impl SharedStore) -> Option<(String, u64, u32)> {
        let (bytes, cas) = store.get(LEASE_KEY)?;
        let text = String::from_utf8(bytes).ok()?;
        let (id, until) = text.split_once(' ')?;
        Some((id.to_string(), until.parse().ok()?, cas))
    }

    /// Takes or keeps the lease; false while another VM holds it, or this
    /// one waits out a retry.
    fn take_lease(&self, store: &impl SharedStore, now_ms: u64) -> bool {
        if self.retry_at_ms > now_ms {
            return false;
        }
        let cas = match self.holder(store) {
            Some((id, until, _)) if id != self.vm && until > now_ms => return false,
            Some((_, _, cas)) => cas,
            None => 0,
        };
        let lease = format!("{} {}", self.vm, now_ms + LEASE_MS);
        store.set(LEASE_KEY, lease.as_bytes(), cas).is_ok()
    }

    /// A failed call: this VM keeps the lease through the wait, so the
    /// others do not call meanwhile either.
    fn back_off(&mut self, store: &impl SharedStore, now_ms: u64) {
        self.retry_at_ms = now_ms + RETRY_MS;
        self.hold_lease(store, self.retry_at_ms);
    }

    fn hold_lease(&self, store: &impl SharedStore, until_ms: u64) {
        let lease = format!("{} {until_ms}", self.vm);
        let _ = store.set(LEASE_KEY, lease.as_bytes(), 0);
    }
}

/// A 64-digit hex hash; anything else (another length, a non-hex digit)
/// is `None`.
fn parse_hash(digits: &[u8]) -> Option<[u8; 32]> {
    let mut out = [0u8; 32];
    hex::decode_to_slice(digits, &mut out).ok()?;
    Some(out)
}

#[cfg(test)]
mod tests;
