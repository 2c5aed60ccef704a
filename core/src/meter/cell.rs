//! The fixed-size record each bucket keeps in shared data, and the arithmetic
//! on it. Pure functions of (record, limit, now): no host, no clock.

use crate::time::{self, Millis};

/// 17 bytes: version, value (f64), stamp (u64), little-endian. Fixed size so
/// a shared-data write never grows, and versioned so a future layout can be
/// told apart from this one.
pub const CELL_LEN: usize = 17;
const CELL_VERSION: u8 = 1;

/// One bucket's state. For a per-minute token bucket `value` is the balance
/// (negative = debt) and `stamp` the time it was computed; for a calendar
/// quota `value` is what was used and `stamp` the start of its window.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Cell {
    pub value: f64,
    pub stamp: Millis,
}

impl Cell {
    pub fn encode(&self) -> [u8; CELL_LEN] {
        let mut out = [0u8; CELL_LEN];
        out[0] = CELL_VERSION;
        out[1..9].copy_from_slice(&self.value.to_le_bytes());
        out[9..17].copy_from_slice(&self.stamp.to_le_bytes());
        out
    }

    /// `None` for an empty value (the ABI's "deleted") or a foreign layout.
    pub fn decode(bytes: &[u8]) -> Option<Cell> {
        if bytes.len() != CELL_LEN || bytes.first() != Some(&CELL_VERSION) {
            return None;
        }
        let value = f64::from_le_bytes(bytes.get(1..9)?.try_into().ok()?);
        let stamp = u64::from_le_bytes(bytes.get(9..17)?.try_into().ok()?);
        value.is_finite().then_some(Cell { value, stamp })
    }
}

/// How a limit refills.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refill {
    /// Continuous token bucket: capacity = limit, refilled at limit/60 per
    /// second, as the providers' own limiters do.
    PerMinute,
    /// Calendar day in the policy's time zone; resets at the boundary.
    Day,
    /// Calendar month in the policy's time zone.
    Month,
}

/// A bucket's state as seen at one instant.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct View {
    /// What is left right now (may be negative after debt).
    pub remaining: f64,
    /// When the bucket is full again (per-minute) or the window resets.
    pub reset_at: Millis,
}

impl Refill {
    /// Brings a stored cell up to `now`: refills a bucket, or starts a fresh
    /// window. A missing cell is a full bucket / an unused window. Lowering a
    /// limit clamps a stored balance to the new capacity here, on read.
    pub fn current(self, cell: Option<Cell>, limit: f64, now: Millis, utc_offset_min: i32) -> Cell {
        match self {
            Refill::PerMinute => match cell {
                None => Cell {
                    value: limit,
                    stamp: now,
                },
                Some(c) => {
                    let elapsed_ms = now.saturating_sub(c.stamp) as f64;
                    let refilled = c.value + elapsed_ms * limit / 60_000.0;
                    Cell {
                        value: refilled.min(limit),
                        stamp: now.max(c.stamp),
                    }
                }
            },
            Refill::Day | Refill::Month => {
                let window = self.window(now, utc_offset_min);
                match cell {
                    Some(c) if c.stamp == window.start => c,
                    _ => Cell {
                        value: 0.0,
                        stamp: window.start,
                    },
                }
            }
        }
    }

    fn window(self, now: Millis, utc_offset_min: i32) -> time::Window {
        match self {
            Refill::Month => time::month_window(now, utc_offset_min),
            _ => time::day_window(now, utc_offset_min),
        }
    }

    /// Whether `amount` fits now. A per-minute bucket needs the whole amount
    /// in its balance (the caller caps amounts at the capacity, so a request
    /// larger than the limit can still pass when the bucket is full). A
    /// calendar quota admits while anything is left: the request's real size
    /// is only known at the end, and refusing on an estimate would block
    /// requests that fit.
    pub fn fits(self, current: Cell, limit: f64, amount: f64) -> bool {
        match self {
            Refill::PerMinute => current.value >= amount,
            Refill::Day | Refill::Month => current.value < limit,
        }
    }

    /// Applies a debit (positive) or credit (negative) to a current cell.
    pub fn charge(self, current: Cell, amount: f64) -> Cell {
        match self {
            Refill::PerMinute => Cell {
                value: current.value - amount,
                ..current
            },
            Refill::Day | Refill::Month => Cell {
                value: (current.value + amount).max(0.0),
                ..current
            },
        }
    }

    /// Remaining amount and reset time of a current cell.
    pub fn view(self, current: Cell, limit: f64, now: Millis, utc_offset_min: i32) -> View {
        match self {
            Refill::PerMinute => {
                let missing = (limit - current.value).max(0.0);
                View {
                    remaining: current.value,
                    reset_at: now + (missing * 60_000.0 / limit).ceil() as u64,
                }
            }
            Refill::Day | Refill::Month => View {
                remaining: limit - current.value,
                reset_at: self.window(now, utc_offset_min).end,
            },
        }
    }

    /// Milliseconds until `amount` would fit.
    pub fn wait_ms(
        self,
        current: Cell,
        limit: f64,
        amount: f64,
        now: Millis,
        utc_offset_min: i32,
    ) -> u64 {
        match self {
            Refill::PerMinute => {
                let missing = (amount - current.value).max(0.0);
                (missing * 60_000.0 / limit).ceil() as u64
            }
            Refill::Day | Refill::Month => self.window(now, utc_offset_min).end.saturating_sub(now),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cell_round_trips_and_rejects_foreign_bytes() {
        let c = Cell {
            value: -12.5,
            stamp: 1_700_000_000_123,
        };
        assert_eq!(Cell::decode(&c.encode()), Some(c));
        assert_eq!(Cell::decode(b""), None);
        assert_eq!(Cell::decode(&[2u8; CELL_LEN]), None);
    }

    #[test]
    fn bucket_refills_continuously_and_clamps_to_capacity() {
        let r = Refill::PerMinute;
        // 60 per minute = 1 per second; 0 left at t=0, 1.5 s later 1.5 left.
        let c = r.current(
            Some(Cell {
                value: 0.0,
                stamp: 0,
            }),
            60.0,
            1_500,
            0,
        );
        assert_eq!(c.value, 1.5);
        // An hour later the balance is the capacity, not 3,600.
        let c = r.current(
            Some(Cell {
                value: 0.0,
                stamp: 0,
            }),
            60.0,
            3_600_000,
            0,
        );
        assert_eq!(c.value, 60.0);
        // A lowered limit clamps an old full balance on read.
        let c = r.current(
            Some(Cell {
                value: 100.0,
                stamp: 0,
            }),
            10.0,
            0,
            0,
        );
        assert_eq!(c.value, 10.0);
    }

    #[test]
    fn debt_delays_the_next_request_until_refilled() {
        let r = Refill::PerMinute;
        let c = r.charge(
            Cell {
                value: 10.0,
                stamp: 0,
            },
            70.0,
        ); // 60 in debt
        assert_eq!(c.value, -60.0);
        assert!(!r.fits(c, 600.0, 1.0));
        // 600/min = 10/s: 61 tokens missing takes 6.1 s.
        assert_eq!(r.wait_ms(c, 600.0, 1.0, 0, 0), 6_100);
    }

    #[test]
    fn calendar_window_resets_at_the_boundary() {
        let r = Refill::Day;
        let day = 86_400_000;
        let used = Cell {
            value: 500.0,
            stamp: 0,
        };
        assert_eq!(r.current(Some(used), 1000.0, day - 1, 0), used);
        assert_eq!(
            r.current(Some(used), 1000.0, day, 0),
            Cell {
                value: 0.0,
                stamp: day
            }
        );
        assert_eq!(r.wait_ms(used, 1000.0, 1.0, day - 5_000, 0), 5_000);
        assert!(r.fits(used, 1000.0, 10_000.0));
        assert!(!r.fits(
            Cell {
                value: 1000.0,
                stamp: 0
            },
            1000.0,
            1.0
        ));
    }
}
