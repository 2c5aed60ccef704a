//! The record each key and each pool keeps in shared data: all of its
//! buckets in one fixed-size value, so that a request reads and writes one
//! record per scope (a key and its pools) instead of one per bucket.
//!
//! Layout (version 2, little-endian):
//! - byte 0: version (2); byte 1: flags; byte 2: slot count `n`;
//! - bytes 3..11: `queued_at` (ms; when the scope was last handed to the
//!   sync leader, with a shared store);
//! - then `n` slots of [`SLOT_LEN`] bytes, one per row of the metric table,
//!   in table order (new rows are appended, so an older record decodes with
//!   the missing slots empty).
//!
//! Version 1 kept one 17-byte cell per bucket under
//! `tollgate/1/<scope>/<metric>`; [`migrate_v1`] carries those balances over
//! the first time a version-2 filter meets a scope, so an upgrade keeps them.

use super::cell::Cell;
use super::metric::Metric;
use crate::host::SharedStore;

pub const RECORD_VERSION: u8 = 2;
const HEADER_LEN: usize = 11;
/// A slot: thirteen 8-byte fields.
pub const SLOT_LEN: usize = 104;
pub const RECORD_LEN: usize = HEADER_LEN + SLOT_LEN * Metric::COUNT;

/// The key is revoked (learned from the shared store's revocation list).
pub const FLAG_REVOKED: u8 = 1;
/// The slots hold leases from a shared store, not local balances.
pub const FLAG_LEASED: u8 = 2;

/// One bucket's state.
///
/// Alone (no shared store), `value`/`stamp` are the bucket as
/// [`super::cell::Refill`] computes it: a per-minute balance (negative =
/// debt) and the time it was computed, or a calendar window's use and the
/// window's start.
///
/// With a shared store, `value` is what is left of this replica's lease
/// (the balance lives in Redis), and the other fields track the sync:
/// `consumed` since the last sync was sent, `inflight` the consumption of a
/// sync awaiting its answer (sequence `seq`, 0 when none), `expires` the end
/// of the lease, `shared` the unleased balance Redis reported, and
/// `fallback`/`fallback_stamp` the local bucket used while the store cannot
/// be reached (`on_store_failure: local`), `rate` the consumption per sync
/// period (a moving average) and `last` the largest recent single charge,
/// from which the leader sizes the next lease, with `asked`, what Redis
/// admitted for this Envoy synchronously since the last sync (demand the
/// leases did not serve).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Slot {
    /// Whether the local bucket (`value`/`stamp`) was ever written: a
    /// missing bucket is a full one (or an unused window).
    pub written: bool,
    pub value: f64,
    pub stamp: u64,
    pub consumed: f64,
    pub inflight: f64,
    pub seq: u64,
    pub expires: u64,
    pub shared: f64,
    pub fallback: f64,
    pub fallback_stamp: u64,
    pub rate: f64,
    pub last: f64,
    pub asked: f64,
}

impl Slot {
    /// Whether nothing was ever written to this slot.
    pub fn is_empty(&self) -> bool {
        *self == Slot::default()
    }

    /// The local bucket as a cell (`None` when it was never written).
    pub fn cell(&self) -> Option<Cell> {
        self.written.then_some(Cell {
            value: self.value,
            stamp: self.stamp,
        })
    }

    pub fn set_cell(&mut self, cell: Cell) {
        self.written = true;
        self.value = cell.value;
        self.stamp = cell.stamp;
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Record {
    pub flags: u8,
    pub queued_at: u64,
    pub slots: [Slot; Metric::COUNT],
}

impl Record {
    pub fn slot(&self, metric: Metric) -> Slot {
        self.slots.get(metric as usize).copied().unwrap_or_default()
    }

    pub fn slot_mut(&mut self, metric: Metric) -> Option<&mut Slot> {
        self.slots.get_mut(metric as usize)
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(RECORD_LEN);
        out.push(RECORD_VERSION);
        out.push(self.flags);
        out.push(Metric::COUNT as u8);
        out.extend_from_slice(&self.queued_at.to_le_bytes());
        for s in &self.slots {
            for f in [
                s.value, s.consumed, s.inflight, s.shared, s.fallback, s.rate, s.last, s.asked,
            ] {
                out.extend_from_slice(&f.to_le_bytes());
            }
            for n in [
                s.stamp,
                s.seq,
                s.expires,
                s.fallback_stamp,
                s.written as u64,
            ] {
                out.extend_from_slice(&n.to_le_bytes());
            }
        }
        out
    }

    /// `None` for an empty value (the ABI's "deleted"), a foreign layout or
    /// non-finite numbers.
    pub fn decode(bytes: &[u8]) -> Option<Record> {
        let (&version, rest) = bytes.split_first()?;
        let (&flags, rest) = rest.split_first()?;
        let (&count, rest) = rest.split_first()?;
        if version != RECORD_VERSION || rest.len() != 8 + SLOT_LEN * count as usize {
            return None;
        }
        let mut words = rest
            .chunks_exact(8)
            .map(|w| <[u8; 8]>::try_from(w).unwrap_or_default());
        let mut next = || words.next().map(u64::from_le_bytes);
        let mut record = Record {
            flags,
            queued_at: next()?,
            ..Record::default()
        };
        for i in 0..count as usize {
            let mut float = || next().map(f64::from_bits).filter(|f| f.is_finite());
            let (value, consumed, inflight, shared, fallback, rate, last, asked) = (
                float()?,
                float()?,
                float()?,
                float()?,
                float()?,
                float()?,
                float()?,
                float()?,
            );
            let slot = Slot {
                value,
                consumed,
                inflight,
                shared,
                fallback,
                rate,
                last,
                asked,
                stamp: next()?,
                seq: next()?,
                expires: next()?,
                fallback_stamp: next()?,
                written: next()? & 1 == 1,
            };
            // Slots of rows this build does not know are skipped.
            if let Some(s) = record.slots.get_mut(i) {
                *s = slot;
            }
        }
        Some(record)
    }
}

/// The shared-data key of a scope's record: `tollgate/2/key:alice-laptop`.
pub fn store_key(scope: &str) -> String {
    format!("tollgate/2/{scope}")
}

/// A scope's balances as the version-1 filter left them (one cell per
/// bucket), for the first version-2 write of that scope. The old cells stay
/// as they are: clearing them before the new record is written would lose
/// them to a request refused in between, or to a worker racing this one to
/// create the record (both then migrate the same values; one write wins).
pub fn migrate_v1(store: &dyn SharedStore, scope: &str) -> Option<Record> {
    let mut record = Record::default();
    let mut found = false;
    for metric in Metric::all() {
        let key = format!("tollgate/1/{scope}/{}", metric.name());
        if let Some(cell) = super::store::read_v1(store, &key) {
            if let Some(slot) = record.slot_mut(metric) {
                slot.set_cell(cell);
            }
            found = true;
        }
    }
    found.then_some(record)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_record_round_trips_and_rejects_foreign_bytes() {
        let mut r = Record {
            flags: FLAG_LEASED,
            queued_at: 7,
            ..Record::default()
        };
        *r.slot_mut(Metric::OutputTokens).unwrap() = Slot {
            value: -12.5,
            stamp: 1_700_000_000_123,
            consumed: 3.0,
            inflight: 4.0,
            seq: 9,
            expires: 10,
            shared: 11.5,
            fallback: 12.0,
            fallback_stamp: 13,
            written: true,
            rate: 14.0,
            last: 15.0,
            asked: 16.0,
        };
        let bytes = r.encode();
        assert_eq!(bytes.len(), RECORD_LEN);
        assert_eq!(Record::decode(&bytes), Some(r));
        assert_eq!(Record::decode(b""), None);
        assert_eq!(Record::decode(&bytes[..bytes.len() - 1]), None);
        let mut v3 = bytes.clone();
        v3[0] = 3;
        assert_eq!(Record::decode(&v3), None);
    }

    #[test]
    fn a_record_with_fewer_slots_decodes_with_the_rest_empty() {
        let mut r = Record::default();
        r.slot_mut(Metric::Requests).unwrap().value = 5.0;
        let mut bytes = r.encode();
        bytes[2] = 1;
        bytes.truncate(HEADER_LEN + SLOT_LEN);
        let decoded = Record::decode(&bytes).unwrap();
        assert_eq!(decoded.slot(Metric::Requests).value, 5.0);
        assert!(decoded.slot(Metric::UsdPerMonth).is_empty());
    }
}
