//! Wall-clock time as the core takes it: Unix milliseconds, passed in.

/// Now, in Unix milliseconds (0 on a clock set before 1970).
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// A duration as commands take it: a whole number followed by `s`, `m`,
/// `h` or `d` (`30s`, `15m`, `24h`, `7d`), in milliseconds.
pub fn parse_duration_ms(s: &str) -> Result<u64, String> {
    let invalid = || format!("invalid duration {s:?}: use a number followed by s, m, h or d");
    let (number, unit_ms) = [
        ('s', 1_000),
        ('m', 60_000),
        ('h', 3_600_000),
        ('d', 86_400_000),
    ]
    .into_iter()
    .find_map(|(unit, ms)| Some((s.strip_suffix(unit)?, ms)))
    .ok_or_else(invalid)?;
    if number.is_empty() || !number.bytes().all(|b| b.is_ascii_digit()) {
        return Err(invalid());
    }
    number
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(unit_ms))
        .ok_or_else(|| format!("invalid duration {s:?}: too long"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_are_a_whole_number_and_a_unit() {
        assert_eq!(parse_duration_ms("30s"), Ok(30_000));
        assert_eq!(parse_duration_ms("15m"), Ok(900_000));
        assert_eq!(parse_duration_ms("24h"), Ok(86_400_000));
        assert_eq!(parse_duration_ms("7d"), Ok(604_800_000));
        assert_eq!(parse_duration_ms("0s"), Ok(0));
        for bad in [
            "24x", "24", "h", "", "1.5h", "-1h", "+1h", " 1h", "1 h", "1H",
        ] {
            assert_eq!(
                parse_duration_ms(bad),
                Err(format!(
                    "invalid duration {bad:?}: use a number followed by s, m, h or d"
                )),
                "{bad:?}"
            );
        }
        assert_eq!(
            parse_duration_ms("99999999999999999d"),
            Err("invalid duration \"99999999999999999d\": too long".to_string())
        );
    }
}
