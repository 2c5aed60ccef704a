//! The key service's side of the key table ([`super::keys`] is Envoy's):
//! the table of the policy file now, every record with the generation that
//! last changed it (removed keys stay as tombstones, so any generation's
//! changes can be told), and the pages it answers. Pure data: the CLI
//! serves it over HTTP and swaps tables when the policy file changes.

use crate::policy::table::entries;
use serde_json::Value;
use std::collections::BTreeMap;

/// Records per page: about 1 MB of a typical key's JSON (a 100,000-key
/// table in 25 calls), and some 10 ms of shared-data writes for the VM
/// that applies it, between two of its requests.
pub const PAGE: usize = 4_000;

#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    /// The key's JSON, `None` once removed.
    json: Option<String>,
    changed_at: u64,
}

/// The table a service serves.
#[derive(Debug)]
pub struct KeyService {
    epoch: u64,
    generation: u64,
    /// By hash (lower-case hex), sorted: pages continue after a hash.
    entries: BTreeMap<String, Entry>,
}

/// One answer: the records (hash, JSON or `None` for removed), the
/// generation, and the last hash when more pages follow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServedPage {
    pub epoch: u64,
    pub generation: u64,
    pub records: Vec<(String, Option<String>)>,
    pub next: Option<String>,
}

impl ServedPage {
    /// The body: a line per record, `<hash> <json>` or `<hash> -`.
    pub fn body(&self) -> String {
        let mut out = String::new();
        for (hash, json) in &self.records {
            out.push_str(hash);
            out.push(' ');
            out.push_str(json.as_deref().unwrap_or("-"));
            out.push('\n');
        }
        out
    }
}

impl KeyService {
    /// A service whose generations are counted within `epoch` (a new one
    /// each start: Envoy then fetches the whole table again).
    pub fn new(epoch: u64) -> KeyService {
        KeyService {
            epoch,
            generation: 0,
            entries: BTreeMap::new(),
        }
    }

    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Takes the keys of a (valid) policy document: a new generation when
    /// any record changed. Returns how many did.
    pub fn update(&mut self, doc: &Value) -> usize {
        let mut new = entries(doc);
        let next = self.generation + 1;
        let mut changed = 0;
        for (hash, entry) in self.entries.iter_mut() {
            let json = new.remove(hash);
            if entry.json != json {
                entry.json = json;
                entry.changed_at = next;
                changed += 1;
            }
        }
        for (hash, json) in new {
            self.entries.insert(
                hash,
                Entry {
                    json: Some(json),
                    changed_at: next,
                },
            );
            changed += 1;
        }
        if changed > 0 || self.generation == 0 {
            self.generation = next;
        }
        changed
    }

    /// Whether a call that says it is at `since` of `epoch` is up to date
    /// (the service then waits for a change before answering).
    pub fn is_current(&self, epoch: Option<u64>, since: u64) -> bool {
        epoch == Some(self.epoch) && since == self.generation
    }

    /// The records changed after generation `since` of `epoch` (all live
    /// records for another epoch or `since = 0`), after hash `after`, at
    /// most `limit`.
    pub fn page(
        &self,
        epoch: Option<u64>,
        since: u64,
        after: Option<&str>,
        limit: usize,
    ) -> ServedPage {
        let whole = epoch != Some(self.epoch) || since == 0;
        let range = match after {
            Some(a) => self
                .entries
                .range::<str, _>((std::ops::Bound::Excluded(a), std::ops::Bound::Unbounded)),
            None => self.entries.range::<str, _>(..),
        };
        let mut records = Vec::new();
        let mut next = None;
        for (hash, entry) in range {
            let wanted = if whole {
                entry.json.is_some()
            } else {
                entry.changed_at > since
            };
            if !wanted {
                continue;
            }
            if records.len() == limit {
                next = records
                    .last()
                    .map(|(h, _): &(String, Option<String>)| h.clone());
                break;
            }
            records.push((hash.clone(), entry.json.clone()));
        }
        ServedPage {
            epoch: self.epoch,
            generation: self.generation,
            records,
            next,
        }
    }
}
