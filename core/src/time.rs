//! Calendar arithmetic on Unix milliseconds: RFC 3339 parsing and printing,
//! and the day / month windows of quotas and budgets. Hand-written (Howard
//! Hinnant's civil-date algorithms) to keep a date crate out of the wasm.

/// Milliseconds since the Unix epoch.
pub type Millis = u64;

const MS_PER_DAY: i64 = 86_400_000;

fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = if z >= 0 { z } else { z - 146_096 } / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (if m <= 2 { y + 1 } else { y }, m, d)
}

fn days_in_month(y: i64, m: i64) -> i64 {
    match m {
        2 if (y % 4 == 0 && y % 100 != 0) || y % 400 == 0 => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

fn digits(s: &str, range: std::ops::Range<usize>) -> Option<i64> {
    let part = s.get(range)?;
    if part.bytes().all(|b| b.is_ascii_digit()) {
        part.parse().ok()
    } else {
        None
    }
}

/// Parses `2027-06-30T00:00:00Z`, `2027-06-30T02:00:00+02:00` or a bare date
/// `2027-06-30` (midnight UTC), with optional fractional seconds.
pub fn parse_rfc3339(s: &str) -> Result<Millis, String> {
    let bad = || format!("'{s}' is not an RFC 3339 time such as 2027-06-30T00:00:00Z");
    let b = s.as_bytes();
    if b.len() < 10 || b.get(4) != Some(&b'-') || b.get(7) != Some(&b'-') {
        return Err(bad());
    }
    let (y, mo, d) = (
        digits(s, 0..4).ok_or_else(bad)?,
        digits(s, 5..7).ok_or_else(bad)?,
        digits(s, 8..10).ok_or_else(bad)?,
    );
    if !(1..=12).contains(&mo) || d < 1 || d > days_in_month(y, mo) {
        return Err(bad());
    }
    let mut ms = days_from_civil(y, mo, d) * MS_PER_DAY;
    if b.len() > 10 {
        if !matches!(b.get(10), Some(b'T' | b't' | b' ')) || b.len() < 20 {
            return Err(bad());
        }
        if b.get(13) != Some(&b':') || b.get(16) != Some(&b':') {
            return Err(bad());
        }
        let (h, mi, sec) = (
            digits(s, 11..13).ok_or_else(bad)?,
            digits(s, 14..16).ok_or_else(bad)?,
            digits(s, 17..19).ok_or_else(bad)?,
        );
        if h > 23 || mi > 59 || sec > 60 {
            return Err(bad());
        }
        ms += ((h * 60 + mi) * 60 + sec) * 1000;
        let mut i = 19;
        if b.get(i) == Some(&b'.') {
            i += 1;
            let start = i;
            while b.get(i).is_some_and(|c| c.is_ascii_digit()) {
                i += 1;
            }
            if i == start {
                return Err(bad());
            }
            let frac = s.get(start..i.min(start + 3)).unwrap_or("0");
            let scale = [100, 10, 1];
            let unit = scale
                .get(frac.len().saturating_sub(1))
                .copied()
                .unwrap_or(1);
            ms += digits(frac, 0..frac.len()).unwrap_or(0) * unit;
        }
        match s.get(i..) {
            Some("Z" | "z") => {}
            Some(off) => ms -= parse_offset_minutes(off).map_err(|_| bad())? as i64 * 60_000,
            None => return Err(bad()),
        }
    }
    u64::try_from(ms).map_err(|_| bad())
}

/// Parses a fixed UTC offset `+HH:MM` / `-HH:MM` (or `UTC`/`Z`) into minutes.
pub fn parse_offset_minutes(s: &str) -> Result<i32, String> {
    if s == "UTC" || s == "Z" || s == "Etc/UTC" {
        return Ok(0);
    }
    let bad = || format!("'{s}' is not a time zone: use UTC or a fixed offset such as +02:00");
    let b = s.as_bytes();
    if b.len() != 6 || b.get(3) != Some(&b':') {
        return Err(bad());
    }
    let sign = match b.first() {
        Some(b'+') => 1,
        Some(b'-') => -1,
        _ => return Err(bad()),
    };
    let h = digits(s, 1..3).ok_or_else(bad)?;
    let m = digits(s, 4..6).ok_or_else(bad)?;
    if h > 14 || m > 59 {
        return Err(bad());
    }
    Ok(sign * (h * 60 + m) as i32)
}

/// Formats as `2027-06-30T00:00:00Z` (seconds precision), as rate-limit
/// reset headers expect.
pub fn format_rfc3339(ms: Millis) -> String {
    let secs = (ms / 1000) as i64;
    let (y, m, d) = civil_from_days(secs.div_euclid(86_400));
    let rem = secs.rem_euclid(86_400);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// A calendar window of a quota or budget: `[start, end)` in Unix ms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    pub start: Millis,
    pub end: Millis,
}

/// The local day containing `now` in a zone `offset_min` minutes from UTC.
pub fn day_window(now: Millis, offset_min: i32) -> Window {
    let off = offset_min as i64 * 60_000;
    let local = now as i64 + off;
    let start = local.div_euclid(MS_PER_DAY) * MS_PER_DAY - off;
    Window {
        start: start.max(0) as u64,
        end: (start + MS_PER_DAY).max(0) as u64,
    }
}

/// The local calendar month containing `now`.
pub fn month_window(now: Millis, offset_min: i32) -> Window {
    let off = offset_min as i64 * 60_000;
    let local = now as i64 + off;
    let (y, m, _) = civil_from_days(local.div_euclid(MS_PER_DAY));
    let start = days_from_civil(y, m, 1) * MS_PER_DAY - off;
    let end = start + days_in_month(y, m) * MS_PER_DAY;
    Window {
        start: start.max(0) as u64,
        end: end.max(0) as u64,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_formats_rfc3339_round_trip() {
        let t = parse_rfc3339("2027-06-30T00:00:00Z");
        assert_eq!(t, Ok(1_814_313_600_000));
        assert_eq!(format_rfc3339(1_814_313_600_000), "2027-06-30T00:00:00Z");
        assert_eq!(parse_rfc3339("2027-06-30T02:00:00+02:00"), t);
        assert_eq!(parse_rfc3339("2027-06-30"), t);
        assert_eq!(
            parse_rfc3339("2027-06-30T00:00:00.250Z"),
            Ok(1_814_313_600_250)
        );
    }

    #[test]
    fn rejects_impossible_dates_with_example() {
        assert_eq!(
            parse_rfc3339("2027-02-30T00:00:00Z").err().as_deref(),
            Some("'2027-02-30T00:00:00Z' is not an RFC 3339 time such as 2027-06-30T00:00:00Z")
        );
        assert!(parse_rfc3339("next tuesday").is_err());
        assert!(parse_rfc3339("2027-06-30T25:00:00Z").is_err());
        assert!(parse_rfc3339("2027-06-30T00:00:00").is_err());
    }

    #[test]
    fn day_and_month_windows_follow_the_zone() {
        let noon = parse_rfc3339("2026-11-23T12:00:00Z").unwrap_or(0);
        let w = day_window(noon, 0);
        assert_eq!(format_rfc3339(w.start), "2026-11-23T00:00:00Z");
        assert_eq!(format_rfc3339(w.end), "2026-11-24T00:00:00Z");
        let w = day_window(noon, -14 * 60);
        assert_eq!(format_rfc3339(w.start), "2026-11-22T14:00:00Z");
        let m = month_window(parse_rfc3339("2028-02-29T23:00:00Z").unwrap_or(0), 120);
        assert_eq!(format_rfc3339(m.start), "2028-02-29T22:00:00Z");
        assert_eq!(format_rfc3339(m.end), "2028-03-31T22:00:00Z");
    }

    #[test]
    fn offsets_parse() {
        assert_eq!(parse_offset_minutes("+02:00"), Ok(120));
        assert_eq!(parse_offset_minutes("-05:30"), Ok(-330));
        assert_eq!(parse_offset_minutes("UTC"), Ok(0));
        assert!(parse_offset_minutes("Europe/Paris").is_err());
    }
}
