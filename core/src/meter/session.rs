//! Session pools: one declared set of limits, a bucket set per distinct
//! value of a request header (per key), in a bounded table of slots.
//!
//! Shared-data keys cannot be deleted in the ABI, so a key per session ever
//! seen would grow without end. A pool instead owns `max_tracked` slots,
//! each two records: its owner (`tollgate/2/session/<pool>/<i>`: the
//! SHA-256 of key id and header value, then when it was last used) and its
//! buckets (`.../<i>/buckets`, the usual [`super::record::Record`]). A
//! session looks for itself in the [`PROBES`] slots its hash leads to; a
//! new one takes the first free slot there, else the least recently used
//! *idle* one (every bucket back to full: a per-minute bucket refilled, a
//! calendar window with nothing used in it), whose buckets are then exactly
//! a fresh session's, so eviction never forgives anything. When every slot
//! it may take holds an active session, it is refused
//! ([`Full`], 429 `session_pool_full`): a bound that never lets a session
//! shed its use by being forgotten.

use super::record::Record;
use super::store::{self, CREATE_CAS, MAX_ATTEMPTS};
use super::{Bucket, Clock};
use crate::host::{SharedStore, StoreError};
use crate::policy::SessionPool;
use sha2::{Digest, Sha256};

/// Slots a session may occupy (fewer when the pool tracks fewer).
pub const PROBES: u32 = 8;

/// A slot's last use is rewritten at most this often (one write a minute
/// per active session, not one per request).
pub const TOUCH_MS: u64 = 60_000;

const OWNER_LEN: usize = 40;

/// Every slot a session could take holds an active session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Full;

/// The owner a session is tracked as: its key and its header value, so
/// that another key sending the same value draws from buckets of its own.
pub fn owner(key_id: &str, value: &[u8]) -> [u8; 32] {
    Sha256::new()
        .chain_update(key_id.as_bytes())
        .chain_update([0u8])
        .chain_update(value)
        .finalize()
        .into()
}

/// The header value as audit records and bucket names show it: as sent
/// when short and printable, else `sha256:` and 16 hex digits of its hash
/// (a session id is an identifier, but a long or odd one is not
/// worth a record's space, and never a secret's).
pub fn display(value: &[u8]) -> String {
    const MAX: usize = 64;
    let printable = value.iter().all(|b| b.is_ascii_graphic());
    match std::str::from_utf8(value) {
        Ok(s) if printable && !s.is_empty() && s.len() <= MAX => s.to_string(),
        _ => {
            let digest = Sha256::digest(value);
            let mut out = String::from("sha256:");
            for b in digest.iter().take(8) {
                out.push_str(&format!("{b:02x}"));
            }
            out
        }
    }
}

fn owner_key(pool: &str, slot: u32) -> String {
    format!("tollgate/2/session/{pool}/{slot}")
}

/// The record that holds a slot's buckets.
pub fn buckets_key(pool: &str, slot: u32) -> String {
    format!("tollgate/2/session/{pool}/{slot}/buckets")
}

/// The buckets of a session in a slot: scope `session:<pool>:<value>`
/// (what errors and audit name), record the slot's.
pub fn buckets(pool: &SessionPool, value: &str, slot: u32) -> Vec<Bucket> {
    let scope = format!("session:{}:{value}", pool.name);
    let key = buckets_key(&pool.name, slot);
    pool.limits
        .iter()
        .map(|(metric, limit)| {
            Bucket::with_limit(scope.clone(), metric, limit).stored_at(key.clone())
        })
        .collect()
}

fn decode(bytes: &[u8]) -> Option<([u8; 32], u64)> {
    let owner: [u8; 32] = bytes.get(..32)?.try_into().ok()?;
    let used: [u8; 8] = bytes.get(32..OWNER_LEN)?.try_into().ok()?;
    Some((owner, u64::from_le_bytes(used)))
}

fn encode(owner: &[u8; 32], used: u64) -> [u8; OWNER_LEN] {
    let mut out = [0u8; OWNER_LEN];
    out[..32].copy_from_slice(owner);
    out[32..].copy_from_slice(&used.to_le_bytes());
    out
}

/// The slots a session may take, in probe order.
fn probes(pool: &SessionPool, owner: &[u8; 32]) -> impl Iterator<Item = u32> {
    let n = pool.max_tracked.max(1);
    let mut first = [0u8; 8];
    first.copy_from_slice(&owner[..8]);
    let start = (u64::from_le_bytes(first) % u64::from(n)) as u32;
    (0..PROBES.min(n)).map(move |j| (start + j) % n)
}

/// Whether a slot's buckets hold nothing: each back to full, its overflow
/// too, so a new session may have them as they are.
fn idle(store: &dyn SharedStore, pool: &SessionPool, slot: u32, clock: Clock) -> bool {
    let buckets = buckets(pool, "", slot);
    let at_rest = |b: &Bucket, record: &Record| {
        let current = b.current(record, clock);
        match b.refill() {
            super::cell::Refill::PerMinute => current.value >= b.limit,
            _ => current.value <= 0.0,
        }
    };
    let main = store::read(store, &buckets_key(&pool.name, slot)).unwrap_or_default();
    buckets.iter().all(|b| {
        at_rest(b, &main)
            && b.overflow()
                .is_none_or(|o| at_rest(&o, &store::read(store, o.store_key()).unwrap_or_default()))
    })
}

/// The slot of `owner` in `pool`: the one it holds, else one it claims
/// (free, else the least recently used idle one). One read per probed slot
/// for a session already tracked; a new session also reads the buckets of
/// the occupied slots it considers.
pub fn slot(
    store: &dyn SharedStore,
    pool: &SessionPool,
    owner: &[u8; 32],
    clock: Clock,
) -> Result<u32, Full> {
    for _ in 0..MAX_ATTEMPTS {
        let mut free: Option<(u32, u32)> = None;
        let mut occupied: Vec<(u32, u32, u64)> = Vec::new();
        let mut mine = None;
        for s in probes(pool, owner) {
            match store.get(&owner_key(&pool.name, s)) {
                Some((bytes, cas)) => match decode(&bytes) {
                    Some((o, used)) if &o == owner => {
                        mine = Some((s, cas, used));
                        break;
                    }
                    Some((_, used)) => occupied.push((s, cas, used)),
                    None => {
                        free.get_or_insert((s, cas));
                    }
                },
                None => {
                    free.get_or_insert((s, CREATE_CAS));
                }
            }
        }
        if let Some((s, cas, used)) = mine {
            if clock.now.saturating_sub(used) >= TOUCH_MS {
                // A lost race here only delays the touch.
                let _ = store.set(&owner_key(&pool.name, s), &encode(owner, clock.now), cas);
            }
            return Ok(s);
        }
        let claim = free.or_else(|| {
            occupied.sort_by_key(|(_, _, used)| *used);
            occupied
                .iter()
                .find(|(s, _, _)| idle(store, pool, *s, clock))
                .map(|(s, cas, _)| (*s, *cas))
        });
        let Some((s, cas)) = claim else {
            return Err(Full);
        };
        match store.set(&owner_key(&pool.name, s), &encode(owner, clock.now), cas) {
            Ok(()) => return Ok(s),
            // Another worker claimed or touched it: look again.
            Err(StoreError::CasMismatch) => continue,
            Err(StoreError::Failed) => return Err(Full),
        }
    }
    Err(Full)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::policy::{Limit, Limits};
    use crate::testing::MemStore;

    fn pool(max_tracked: u32) -> SessionPool {
        let mut limits = Limits::default();
        limits.set(crate::meter::Metric::Requests, Limit::new(1.0));
        SessionPool {
            name: "cc".into(),
            header: "x-session".into(),
            limits,
            max_tracked,
        }
    }

    const CLOCK: Clock = Clock {
        now: 1_795_000_000_000,
        utc_offset_min: 0,
    };

    #[test]
    fn a_session_keeps_its_slot_and_a_claim_lost_to_another_worker_looks_again() {
        let store = MemStore::new();
        let p = pool(100);
        let a = owner("k", b"a");
        store.inject_conflicts(1);
        let first = slot(&*store, &p, &a, CLOCK).unwrap();
        assert_eq!(store.mismatches.get(), 1, "the first claim lost a race");
        assert_eq!(slot(&*store, &p, &a, CLOCK), Ok(first));
        assert!(probes(&p, &a).any(|s| s == first));
        assert_eq!(probes(&p, &a).count(), PROBES as usize);
        // Another key sending the same value is another session.
        assert_ne!(owner("k", b"a"), owner("k2", b"a"));
    }

    #[test]
    fn a_free_slot_is_taken_before_an_idle_one_and_an_active_one_never() {
        let store = MemStore::new();
        let p = pool(1);
        let (a, b) = (owner("k", b"a"), owner("k", b"b"));
        assert_eq!(slot(&*store, &p, &a, CLOCK), Ok(0));
        // a has used nothing yet: its slot is idle, so b may take it.
        assert_eq!(slot(&*store, &p, &b, CLOCK), Ok(0));
        // b spends its minute: active, so a is refused.
        let buckets = buckets(&p, "b", 0);
        let demand = crate::meter::Demand::one_request();
        crate::meter::admit(&*store, &buckets, &demand, CLOCK).unwrap();
        assert_eq!(slot(&*store, &p, &a, CLOCK), Err(Full));
        let later = Clock {
            now: CLOCK.now + 60_000,
            ..CLOCK
        };
        assert_eq!(slot(&*store, &p, &a, later), Ok(0), "refilled: idle again");
    }
}
