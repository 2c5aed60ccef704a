//! Bounded compare-and-swap updates of one record in shared data.
//!
//! Shared data has one global lock per process; a CAS fails only when another
//! worker wrote the same key between our read and our write. Retries are
//! bounded so a pathological hot key cannot spin a worker: after
//! [`MAX_ATTEMPTS`] the update gives up with [`Contention`], which callers
//! count and handle (deny at admission, log at reconciliation).
//!
//! Creation race: the host ignores `cas` when a key does not exist, so two
//! workers could both create the same key and one debit would be lost. A key
//! is therefore created with [`CREATE_CAS`], a CAS value the host hands out
//! only after 2^32 - 1 writes: on a missing key the write creates it, and if
//! another worker created it first the write fails with a mismatch and we
//! retry on the existing value.

use super::cell::Cell;
use super::record::Record;
use crate::host::{SharedStore, StoreError};

pub const MAX_ATTEMPTS: u32 = 8;
pub const CREATE_CAS: u32 = u32::MAX;

/// The CAS retries ran out (or the host refused the write).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Contention;

/// What an update closure decides for the current record.
// A step lives on the stack for one CAS attempt: boxing the ~500-byte
// record would allocate on every write of the request path.
#[allow(clippy::large_enum_variant)]
pub enum Step<T> {
    /// Write the new record and return `T`.
    Write(Record, T),
    /// Leave the cell as it is and return `T` (a denial reads only).
    Keep(T),
}

/// A record as read, with the CAS token a write must present
/// ([`CREATE_CAS`] when the key does not exist yet).
#[derive(Debug, Clone, Copy)]
pub struct Read {
    pub record: Option<Record>,
    pub cas: u32,
}

/// Reads a record and its CAS token in one host call. A value that is not
/// a record (the ABI's empty "deleted" value, a foreign layout) reads as
/// none, and the next write replaces it under its CAS token.
pub fn read_with_cas(store: &dyn SharedStore, key: &str) -> Read {
    match store.get(key) {
        None => Read {
            record: None,
            cas: CREATE_CAS,
        },
        Some((bytes, cas)) => Read {
            record: Record::decode(&bytes),
            cas,
        },
    }
}

/// Reads the record at `key`, lets `decide` compute the next state, and
/// writes it with CAS, retrying on conflicts. `decide` may run several times.
pub fn update<T>(
    store: &dyn SharedStore,
    key: &str,
    decide: impl FnMut(Option<Record>) -> Step<T>,
) -> Result<T, Contention> {
    update_from(store, key, None, decide)
}

/// [`update`] starting from a read already made (its CAS token guards the
/// first write); only a retry after a conflict reads again.
pub fn update_from<T>(
    store: &dyn SharedStore,
    key: &str,
    mut first: Option<Read>,
    mut decide: impl FnMut(Option<Record>) -> Step<T>,
) -> Result<T, Contention> {
    for _ in 0..MAX_ATTEMPTS {
        let Read { record, cas } = first.take().unwrap_or_else(|| read_with_cas(store, key));
        match decide(record) {
            Step::Keep(out) => return Ok(out),
            Step::Write(next, out) => match store.set(key, &next.encode(), cas) {
                Ok(()) => return Ok(out),
                Err(StoreError::CasMismatch) => continue,
                Err(StoreError::Failed) => return Err(Contention),
            },
        }
    }
    Err(Contention)
}

/// Reads a record without writing.
pub fn read(store: &dyn SharedStore, key: &str) -> Option<Record> {
    read_with_cas(store, key).record
}

/// Reads a version-1 cell (one bucket per key), for the upgrade.
pub fn read_v1(store: &dyn SharedStore, key: &str) -> Option<Cell> {
    store.get(key).and_then(|(bytes, _)| Cell::decode(&bytes))
}
