//! Keys kept outside the compiled policy: the key table.
//!
//! A 100,000-key policy is a 17 MB document. Sent whole through Envoy's
//! filter configuration, every key change would travel in full and be
//! compiled again in every worker's VM (seconds, and hundreds of MB), and it
//! could not travel at all as a Kubernetes object (etcd refuses objects over
//! ~1.5 MB). So with a key service (`docs/keys-at-scale.md`) the filter's
//! configuration carries the policy without its keys, and the keys travel
//! as a table:
//!
//! - the service (`tollgate run`, `tollgate collector --policy`) turns the
//!   policy file's `keys` into one [`entries`] line per secret hash and
//!   serves the whole table or the lines changed since a generation;
//! - one VM per Envoy fetches them and writes each into Envoy's shared data
//!   ([`entry_key`] → [`record`]), once per Envoy, then publishes the
//!   table's [`TableState`];
//! - each VM compiles a key from its record the first time a request
//!   presents it ([`KeyTable`]), against the same groups, defaults and pools
//!   as the inline path ([`super::compile`]), and keeps it until the table's
//!   generation moves on.
//!
//! A key change costs what the change is: its lines, one shared-data write
//! each, and a recompile of the keys that are used again.

use super::raw::{Obj, RawKey, RawPolicy};
use super::{Key, Policy, Secret};
use crate::host::SharedStore;
use hashbrown::HashMap;
use serde_json::Value;
use std::cell::RefCell;
use std::sync::Arc;

/// Shared-data name of the table's state: `"<epoch> <generation>"`, or
/// `"<epoch> <generation> <next epoch>"` while a whole new table (a
/// restarted service's) is being written. Absent until the first table is
/// in.
pub const STATE_KEY: &str = "tollgate/keys/state";

/// Shared-data name of one secret's record.
pub fn entry_key(hash: &[u8; 32]) -> String {
    format!("tollgate/keys/{}", hex::encode(hash))
}

/// The record stored for a secret: the epoch it belongs to, then the key's
/// JSON object exactly as the policy file has it. An empty record is a key
/// removed since.
pub fn record(epoch: u64, key_json: &str) -> String {
    format!("{epoch:x}\n{key_json}")
}

/// Which table a VM's view reflects: the service's epoch (a new one on each
/// start of the service, whose generations count from 1 again) and the
/// generation within it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TableState {
    pub epoch: u64,
    pub generation: u64,
    /// While a new epoch's whole table is written: its records are already
    /// valid (the old epoch's stay so until the state moves on).
    pub next_epoch: Option<u64>,
}

impl TableState {
    pub fn encode(&self) -> String {
        match self.next_epoch {
            Some(next) => format!("{:x} {} {next:x}", self.epoch, self.generation),
            None => format!("{:x} {}", self.epoch, self.generation),
        }
    }

    pub fn decode(bytes: &[u8]) -> Option<TableState> {
        let text = std::str::from_utf8(bytes).ok()?;
        let mut parts = text.split(' ');
        let epoch = u64::from_str_radix(parts.next()?, 16).ok()?;
        let generation = parts.next()?.parse().ok()?;
        let next_epoch = match parts.next() {
            Some(n) => Some(u64::from_str_radix(n, 16).ok()?),
            None => None,
        };
        Some(TableState {
            epoch,
            generation,
            next_epoch,
        })
    }

    /// The state the store holds now, if a table was ever loaded.
    pub fn read(store: &impl SharedStore) -> Option<TableState> {
        store
            .get(STATE_KEY)
            .and_then(|(bytes, _)| TableState::decode(&bytes))
    }

    pub fn accepts(&self, epoch: u64) -> bool {
        epoch == self.epoch || self.next_epoch == Some(epoch)
    }
}

/// The lines of a policy document's key table: for each secret (current
/// and previous) of each key, its hash in lower-case hex and the key's JSON
/// object, compact. The service diffs two of these to serve changes.
pub fn entries(doc: &Value) -> HashMap<String, String> {
    let mut out = HashMap::new();
    for key in doc
        .get("keys")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let json = key.to_string();
        let previous = key
            .get("previous")
            .and_then(Value::as_array)
            .into_iter()
            .flatten();
        for holder in std::iter::once(key).chain(previous) {
            if let Some(h) = holder.get("key_sha256").and_then(Value::as_str) {
                out.insert(h.to_ascii_lowercase(), json.clone());
            }
        }
    }
    out
}

/// The document without its keys: what the filter's configuration carries
/// when a key service serves the keys.
pub fn without_keys(doc: &Value) -> Value {
    match doc.as_object() {
        // Copies all but the keys (copying them to drop them would cost as
        // much as the rest of loading a 100,000-key policy).
        Some(obj) => Value::Object(
            obj.iter()
                .filter(|(name, _)| *name != "keys")
                .map(|(name, v)| (name.clone(), v.clone()))
                .collect(),
        ),
        None => doc.clone(),
    }
}

/// `bytes` before and after the first `sep`.
pub fn split_once(bytes: &[u8], sep: u8) -> Option<(&[u8], &[u8])> {
    let at = bytes.iter().position(|b| *b == sep)?;
    Some((bytes.get(..at)?, bytes.get(at + 1..)?))
}

/// [`without_keys`] straight from the document's bytes: the keys are
/// skipped, not built (at 100,000 keys, a quarter of the time of parsing
/// the whole document), so the filter configuration is ready before the
/// keys are.
pub fn base_document(bytes: &[u8]) -> Result<Value, serde_json::Error> {
    use serde::de::{Deserializer, IgnoredAny, MapAccess, Visitor};
    struct Base;
    impl<'de> Visitor<'de> for Base {
        type Value = Value;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a policy object")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
            let mut out = serde_json::Map::new();
            while let Some(name) = map.next_key::<String>()? {
                if name == "keys" {
                    map.next_value::<IgnoredAny>()?;
                } else {
                    out.insert(name, map.next_value()?);
                }
            }
            Ok(Value::Object(out))
        }
    }
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let base = (&mut de).deserialize_map(Base)?;
    de.end()?;
    Ok(base)
}

/// Why a presented key could not be looked up in the table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TableError {
    /// No table was loaded into this Envoy yet.
    NotLoaded,
    /// The record does not parse, or names a group this VM's policy does
    /// not have yet (the filter configuration and the table are delivered
    /// separately and may cross for a moment).
    Unusable(String),
}

/// A VM's view of the key table at one generation: the policy's groups,
/// defaults and pools to compile keys against, and the keys compiled so
/// far. Interior mutability: requests add keys to a policy they share; a
/// new generation gets a new view (see [`Policy::with_table_state`]).
#[derive(Debug)]
pub struct KeyTable {
    base: Arc<RawPolicy>,
    state: Option<TableState>,
    /// Keys compiled in this view; a caller's index is the policy's own
    /// callers' count plus its position here.
    loaded: RefCell<Vec<Arc<Key>>>,
    index: RefCell<HashMap<[u8; 32], Secret>>,
}

impl KeyTable {
    pub fn new(base: Arc<RawPolicy>, state: Option<TableState>) -> KeyTable {
        KeyTable {
            base,
            state,
            loaded: RefCell::default(),
            index: RefCell::default(),
        }
    }

    pub fn state(&self) -> Option<TableState> {
        self.state
    }

    pub fn base(&self) -> &Arc<RawPolicy> {
        &self.base
    }

    pub(super) fn loaded(&self, i: usize) -> Option<Arc<Key>> {
        self.loaded.borrow().get(i).cloned()
    }

    pub(super) fn cached(&self, hash: &[u8; 32]) -> Option<Secret> {
        self.index.borrow().get(hash).copied()
    }

    /// How many keys this view compiled.
    pub fn compiled(&self) -> usize {
        self.loaded.borrow().len()
    }

    /// Reads the secret's record and compiles its key. `first_index` is
    /// the policy's own callers' count. `Ok(None)`: no such key.
    pub(super) fn load(
        &self,
        store: &impl SharedStore,
        hash: &[u8; 32],
        first_index: usize,
    ) -> Result<Option<Secret>, TableError> {
        // This view's state lags the store's by up to a timer period: when
        // it has none yet or refuses a record's epoch, the store's decides.
        let state = match self.state {
            Some(s) => s,
            None => TableState::read(store).ok_or(TableError::NotLoaded)?,
        };
        let Some((bytes, _)) = store.get(&entry_key(hash)) else {
            return Ok(None);
        };
        // Empty: removed from the table.
        let Some((epoch, json)) = split_once(&bytes, b'\n') else {
            return Ok(None);
        };
        let epoch = std::str::from_utf8(epoch)
            .ok()
            .and_then(|e| u64::from_str_radix(e, 16).ok());
        // A record of an earlier epoch is a key the current table no
        // longer has (shared data cannot delete).
        let current =
            |e: u64| state.accepts(e) || TableState::read(store).is_some_and(|now| now.accepts(e));
        if !epoch.is_some_and(current) {
            return Ok(None);
        }
        let Obj(raw): Obj<RawKey> = serde_json::from_slice(json)
            .map_err(|e| TableError::Unusable(format!("key record: {e}")))?;
        if let Some(g) = raw
            .groups
            .iter()
            .find(|g| !self.base.groups.contains_key(*g))
        {
            return Err(TableError::Unusable(format!(
                "key {} names group {:?}, which this policy does not have yet",
                raw.id.0, g.0
            )));
        }
        let key = super::compile::table_key(&raw, &self.base);
        let mut loaded = self.loaded.borrow_mut();
        let position = first_index + loaded.len();
        let mut index = self.index.borrow_mut();
        let mut found = None;
        let secrets = std::iter::once((raw.key_sha256.0, None)).chain(
            raw.previous
                .iter()
                .map(|p| (p.key_sha256.0, Some(p.not_after.ms))),
        );
        for (h, not_after_ms) in secrets {
            let secret = Secret {
                key: position,
                not_after_ms,
            };
            if h == *hash {
                found = Some(secret);
            }
            index.insert(h, secret);
        }
        loaded.push(Arc::new(key));
        Ok(found)
    }
}

impl Policy {
    /// This policy with a fresh view of the key table at `state`: what a
    /// VM switches to when the table's generation moves on (keys compiled
    /// under the old one are dropped and compiled again when next used).
    /// `None` when the policy has no key table.
    pub fn with_table_state(&self, state: TableState) -> Option<Policy> {
        let table = self.table.as_ref()?;
        Some(Policy {
            keys: self.keys.clone(),
            key_count: self.key_count,
            identities: self.identities.clone(),
            index: self.index.clone(),
            pools: self.pools.clone(),
            provider_pools: self.provider_pools.clone(),
            session_pools: self.session_pools.clone(),
            groups: self.groups.clone(),
            prices: self.prices.clone(),
            settings: self.settings.clone(),
            table: Some(KeyTable::new(table.base.clone(), Some(state))),
        })
    }

    /// Makes this policy (compiled from a document without keys) take its
    /// keys from the table in shared data, whose state is `state` now.
    pub fn use_key_table(&mut self, base: Arc<RawPolicy>, state: Option<TableState>) {
        self.table = Some(KeyTable::new(base, state));
    }

    pub fn key_table(&self) -> Option<&KeyTable> {
        self.table.as_ref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::MemStore;

    fn doc() -> Value {
        serde_json::json!({
            "version": 1,
            "groups": {"eng": {"models": ["claude-*"], "limits": {"requests_per_minute": 7}}},
            "keys": [
                {"id": "alice", "key_sha256": crate::vkey::sha256_hex("tg-alice"), "groups": ["eng"], "team": "payments"},
                {"id": "bob", "key_sha256": crate::vkey::sha256_hex("tg-bob"), "revoked": true,
                 "previous": [{"key_sha256": crate::vkey::sha256_hex("tg-bob-old"), "not_after": "2030-01-01T00:00:00Z"}]}
            ]
        })
    }

    fn table_policy(store: &std::rc::Rc<MemStore>, epoch: u64) -> Policy {
        let d = doc();
        for (h, json) in entries(&d) {
            let mut hash = [0u8; 32];
            hex::decode_to_slice(&h, &mut hash).unwrap();
            store
                .set(&entry_key(&hash), record(epoch, &json).as_bytes(), 0)
                .unwrap();
        }
        let base = serde_json::to_vec(&without_keys(&d)).unwrap();
        let (mut policy, _) = super::super::compile(&base, "p", 0).unwrap();
        let raw = super::super::base_of(&base).unwrap();
        let state = TableState {
            epoch,
            generation: 1,
            next_epoch: None,
        };
        policy.use_key_table(Arc::new(raw), Some(state));
        policy
    }

    #[test]
    fn a_key_from_the_table_compiles_as_the_same_key_inline_does() {
        let store = MemStore::new();
        let policy = table_policy(&store, 7);
        let (inline, _) = super::super::compile(doc().to_string().as_bytes(), "p", 0).unwrap();
        let hash = crate::vkey::sha256(b"tg-alice");
        let secret = policy.resolve(&*store, &hash).unwrap().unwrap();
        let from_table = policy.key(secret.key).unwrap();
        let inline_key = inline.lookup(&hash).unwrap();
        assert_eq!(format!("{from_table:?}"), format!("{inline_key:?}"));
        // Compiled once: the second lookup reads nothing from the store.
        assert_eq!(policy.key_table().unwrap().compiled(), 1);
        assert_eq!(policy.resolve(&*store, &hash).unwrap(), Some(secret));
        assert_eq!(policy.key_table().unwrap().compiled(), 1);
    }

    #[test]
    fn a_previous_secret_opens_its_key_until_not_after() {
        let store = MemStore::new();
        let policy = table_policy(&store, 7);
        let old = policy
            .resolve(&*store, &crate::vkey::sha256(b"tg-bob-old"))
            .unwrap()
            .unwrap();
        assert_eq!(old.not_after_ms, Some(1_893_456_000_000));
        let bob = policy.key(old.key).unwrap();
        assert!(bob.revoked);
        // The current secret is the same key, compiled once.
        let current = policy
            .resolve(&*store, &crate::vkey::sha256(b"tg-bob"))
            .unwrap()
            .unwrap();
        assert_eq!((current.key, current.not_after_ms), (old.key, None));
    }

    #[test]
    fn unknown_removed_and_stale_records_are_no_key() {
        let store = MemStore::new();
        let policy = table_policy(&store, 7);
        let alice = crate::vkey::sha256(b"tg-alice");
        assert_eq!(
            policy.resolve(&*store, &crate::vkey::sha256(b"tg-nobody")),
            Ok(None)
        );
        // A record of another epoch: the current table does not have it.
        store
            .set(&entry_key(&alice), record(6, "{}").as_bytes(), 0)
            .unwrap();
        assert_eq!(policy.resolve(&*store, &alice), Ok(None));
        // Removed.
        store.set(&entry_key(&alice), b"", 0).unwrap();
        assert_eq!(policy.resolve(&*store, &alice), Ok(None));
    }

    #[test]
    fn before_any_table_and_with_an_unknown_group_the_lookup_says_why() {
        let store = MemStore::new();
        let mut policy = table_policy(&store, 7);
        let base = policy.key_table().unwrap().base().clone();
        policy.use_key_table(base, None);
        let alice = crate::vkey::sha256(b"tg-alice");
        assert_eq!(policy.resolve(&*store, &alice), Err(TableError::NotLoaded));
        let policy = policy
            .with_table_state(TableState {
                epoch: 7,
                generation: 2,
                next_epoch: None,
            })
            .unwrap();
        let json = r#"{"id":"carol","key_sha256":"00","groups":["ops"]}"#;
        store
            .set(&entry_key(&alice), record(7, json).as_bytes(), 0)
            .unwrap();
        assert!(matches!(
            policy.resolve(&*store, &alice),
            Err(TableError::Unusable(_))
        ));
        let json = format!(
            r#"{{"id":"carol","key_sha256":"{}","groups":["ops"]}}"#,
            crate::vkey::sha256_hex("tg-alice")
        );
        store
            .set(&entry_key(&alice), record(7, &json).as_bytes(), 0)
            .unwrap();
        assert_eq!(
            policy.resolve(&*store, &alice),
            Err(TableError::Unusable(
                "key carol names group \"ops\", which this policy does not have yet".into()
            ))
        );
    }

    #[test]
    fn the_base_read_from_bytes_is_the_document_without_its_keys() {
        let text = doc().to_string();
        assert_eq!(
            base_document(text.as_bytes()).unwrap().to_string(),
            without_keys(&doc()).to_string()
        );
        assert!(base_document(b"{\"version\": 1, \"keys\": [").is_err());
        assert!(base_document(b"[1]").is_err());
    }

    #[test]
    fn a_new_epochs_records_count_while_it_is_written() {
        let state = TableState {
            epoch: 1,
            generation: 9,
            next_epoch: Some(2),
        };
        assert_eq!(TableState::decode(state.encode().as_bytes()), Some(state));
        assert!(state.accepts(1) && state.accepts(2) && !state.accepts(3));
        let done = TableState {
            epoch: 2,
            generation: 1,
            next_epoch: None,
        };
        assert_eq!(TableState::decode(done.encode().as_bytes()), Some(done));
        assert_eq!(TableState::decode(b"zz 1"), None);
    }
}
