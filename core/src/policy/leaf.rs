//! Policy values that can be wrong on their own (a count, an amount, a hash,
//! a time, a pool name), each checked by one function. The serde types below
//! call these functions while deserialising, so parsing a valid policy is
//! its validation; the schema walker (`schema::check`) calls the same
//! functions to report every error of an invalid one with its path.

use super::pattern::{Glob, ModelPattern};
use super::UnknownRoutes;
use serde::{Deserialize, Deserializer};

/// A count per minute or per day: whole and positive.
pub fn count(n: f64) -> Result<u64, String> {
    if n <= 0.0 {
        return Err("must be a positive whole number (omit the field for no limit)".to_string());
    }
    if n.fract() != 0.0 || n > 1e15 {
        return Err("must be a positive whole number".to_string());
    }
    Ok(n as u64)
}

/// A money budget: a positive amount of USD.
pub fn usd(n: f64) -> Result<f64, String> {
    if n <= 0.0 || !n.is_finite() {
        return Err("must be a positive amount of USD (omit the field for no budget)".to_string());
    }
    Ok(n)
}

/// A price: USD per million tokens, zero or more.
pub fn price(n: f64) -> Result<f64, String> {
    if n < 0.0 || !n.is_finite() {
        return Err("must be a non-negative USD amount per million tokens".to_string());
    }
    Ok(n)
}

/// A prompt size above which other prices apply: whole and positive.
pub fn threshold(n: f64) -> Result<u64, String> {
    if n <= 0.0 || n.fract() != 0.0 || n > 1e15 {
        return Err("must be a positive whole number of prompt tokens".to_string());
    }
    Ok(n as u64)
}

/// A web-search price: USD per 1,000 searches, zero or more.
pub fn per_thousand(n: f64) -> Result<f64, String> {
    if n < 0.0 || !n.is_finite() {
        return Err("must be a non-negative USD amount per 1,000 web searches".to_string());
    }
    Ok(n)
}

/// A price multiplier (by served tier or region): positive; 1 is the list
/// price, 0.5 half of it.
pub fn multiplier(n: f64) -> Result<f64, String> {
    if n <= 0.0 || !n.is_finite() {
        return Err(
            "must be a positive multiplier of the list price (1 is the list price)".to_string(),
        );
    }
    Ok(n)
}

/// Free text that must say something (ids, identity attributes).
pub fn text(s: &str) -> Result<(), String> {
    if s.trim().is_empty() {
        return Err("must not be empty".to_string());
    }
    Ok(())
}

/// The SHA-256 of a virtual key, as 64 hex characters (either case).
pub fn sha256(s: &str) -> Result<[u8; 32], String> {
    const WHAT: &str = "must be 64 hex characters (the SHA-256 of the virtual key)";
    if s.len() != 64 {
        return Err(format!("{WHAT}, found {}", s.len()));
    }
    let mut out = [0u8; 32];
    hex::decode_to_slice(s, &mut out)
        .map_err(|_| format!("{WHAT}: contains a non-hex character"))?;
    Ok(out)
}

/// `<kind>:<value>` with kind one of [`super::POOL_KINDS`].
pub fn pool_name(s: &str) -> Result<(), String> {
    match s.split_once(':') {
        Some((k, rest)) if super::POOL_KINDS.contains(&k) && !rest.is_empty() => Ok(()),
        _ => Err(format!(
            "pool names are <kind>:<value> with kind one of {}",
            super::POOL_KINDS.join(", ")
        )),
    }
}

/// `provider:<provider>:<group>`: a provider's own limit on a group of its
/// models (`provider:anthropic:claude-sonnet-4`), as `tollgate limits pull`
/// names them. The name is the bucket's scope, so refusals read
/// `… reached for provider:anthropic:claude-sonnet-4`.
pub fn provider_pool_name(s: &str) -> Result<(), String> {
    let ok = s
        .strip_prefix("provider:")
        .and_then(|rest| rest.split_once(':'))
        .is_some_and(|(provider, group)| {
            !provider.is_empty()
                && !group.is_empty()
                && !s.chars().any(|c| c.is_whitespace() || c.is_control())
        });
    if ok {
        Ok(())
    } else {
        Err("provider pool names are provider:<provider>:<group>, e.g. provider:anthropic:claude-sonnet-4".to_string())
    }
}

/// A SPIFFE ID or a glob over SPIFFE IDs, as the mTLS peer's certificate
/// carries it in its URI SAN (`spiffe://cluster.local/ns/billing/sa/api`,
/// `spiffe://cluster.local/ns/billing/sa/*`).
pub fn spiffe(s: &str) -> Result<Glob, String> {
    const WHAT: &str = "must be a SPIFFE ID or pattern, spiffe://<trust domain>/<path> (e.g. spiffe://cluster.local/ns/billing/sa/api)";
    let domain = s
        .strip_prefix("spiffe://")
        .map(|rest| rest.split('/').next().unwrap_or_default());
    match domain {
        Some(d) if !d.is_empty() && !s.chars().any(char::is_whitespace) => Glob::parse(s),
        _ => Err(WHAT.to_string()),
    }
}

/// A pattern a JWT claim must match ([`Glob`]).
pub fn claim(s: &str) -> Result<Glob, String> {
    Glob::parse(s)
}

/// The policy format version this build reads.
pub fn version(v: u64) -> Result<u32, String> {
    match v {
        1 => Ok(1),
        _ => Err("unsupported policy version (expected 1)".to_string()),
    }
}

pub fn unknown_routes(s: &str) -> Result<UnknownRoutes, String> {
    match s {
        "deny" => Ok(UnknownRoutes::Deny),
        "pass" => Ok(UnknownRoutes::Pass),
        _ => Err("must be \"deny\" or \"pass\"".to_string()),
    }
}

/// A request's priority: `"batch"` (0), `"normal"` (50, the default),
/// `"interactive"` (100), or a number from 0 to 100. Reserved headroom
/// (`reserve`) is kept for requests at or above a priority.
pub fn priority(v: &serde_json::Value) -> Result<u8, String> {
    const WHAT: &str =
        "must be \"batch\", \"normal\", \"interactive\" or a whole number from 0 to 100";
    match v {
        serde_json::Value::String(s) => match s.as_str() {
            "batch" => Ok(Priority::BATCH),
            "normal" => Ok(Priority::NORMAL),
            "interactive" => Ok(Priority::INTERACTIVE),
            _ => Err(WHAT.to_string()),
        },
        serde_json::Value::Number(n) => n
            .as_u64()
            .filter(|n| *n <= 100)
            .map(|n| n as u8)
            .ok_or_else(|| WHAT.to_string()),
        _ => Err(WHAT.to_string()),
    }
}

/// A fraction strictly between 0 and 1 (a reserved share of a limit).
pub fn fraction(n: f64) -> Result<f64, String> {
    if n > 0.0 && n < 1.0 {
        Ok(n)
    } else {
        Err("must be a fraction between 0 and 1 (exclusive), e.g. 0.2".to_string())
    }
}

/// A request header name as Envoy hands it over: lower case token
/// characters (RFC 9110), so a policy cannot name a header no request has.
pub fn header_name(s: &str) -> Result<(), String> {
    let token =
        |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || "!#$%&'*+.^_`|~-".contains(c);
    if s.is_empty() || !s.chars().all(token) {
        return Err(
            "must be a header name in lower case (e.g. x-claude-code-session-id)".to_string(),
        );
    }
    Ok(())
}

/// Most thresholds one `alerts` list may hold: each is an event a day or a
/// month per entity, and a list longer than this is a typo, not a plan.
pub const MAX_ALERTS: usize = 10;

/// One alert threshold: a fraction of a quota or budget above 0 and at most
/// 1.5 (past 1, an alert for spend beyond a limit that admitted the request
/// that crossed it, such as a long stream settled after the reservation).
pub fn alert_threshold(n: f64) -> Result<f64, String> {
    if n > 0.0 && n <= 1.5 {
        Ok(n)
    } else {
        Err("must be a fraction of the limit above 0 and at most 1.5, e.g. 0.8 for 80%".to_string())
    }
}

/// A whole `alerts` list, its thresholds each valid: listed once each, in
/// increasing order (a list read top to bottom is the order its events
/// come in). On error, the position of the first offending threshold and
/// why (`None` for the list itself).
pub fn alerts(list: &[f64]) -> Result<(), (Option<usize>, String)> {
    if list.len() > MAX_ALERTS {
        return Err((
            None,
            format!("at most {MAX_ALERTS} thresholds, found {}", list.len()),
        ));
    }
    for (i, pair) in list.windows(2).enumerate() {
        if let [before, after] = pair {
            if after <= before {
                return Err((
                    Some(i + 1),
                    format!("thresholds must increase, each listed once (after {before})"),
                ));
            }
        }
    }
    Ok(())
}

/// How many values a session pool tracks: whole, 1 to 1,000,000 (each is
/// two shared-data entries).
pub fn max_tracked(n: f64) -> Result<u32, String> {
    if n < 1.0 || n.fract() != 0.0 || n > 1_000_000.0 {
        return Err("must be a whole number from 1 to 1000000".to_string());
    }
    Ok(n as u32)
}

/// A header name ([`header_name`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeaderName(pub String);

impl<'de> Deserialize<'de> for HeaderName {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        checked(d, |s: String| header_name(&s).map(|()| HeaderName(s)))
    }
}

/// A session pool's bound ([`max_tracked`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MaxTracked(pub u32);

impl<'de> Deserialize<'de> for MaxTracked {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        checked(d, |n: f64| max_tracked(n).map(MaxTracked))
    }
}

/// Milliseconds a request may be held for a limit to refill: positive,
/// at most 60,000 (a client waiting longer has given up).
pub fn wait_ms(n: f64) -> Result<u64, String> {
    if n <= 0.0 || n.fract() != 0.0 || n > 60_000.0 {
        return Err("must be a whole number of milliseconds from 1 to 60000".to_string());
    }
    Ok(n as u64)
}

/// A request priority ([`priority`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Priority(pub u8);

impl Priority {
    pub const BATCH: u8 = 0;
    pub const NORMAL: u8 = 50;
    pub const INTERACTIVE: u8 = 100;

    pub fn name(self) -> String {
        match self.0 {
            Priority::BATCH => "batch".to_string(),
            Priority::NORMAL => "normal".to_string(),
            Priority::INTERACTIVE => "interactive".to_string(),
            n => format!("priority {n}"),
        }
    }
}

impl Default for Priority {
    fn default() -> Self {
        Priority(Priority::NORMAL)
    }
}

impl<'de> Deserialize<'de> for Priority {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        checked(d, |v: serde_json::Value| priority(&v).map(Priority))
    }
}

/// Deserialises a `T` through a checking function, so that a bad value
/// fails inside deserialisation with the function's reason.
fn checked<'de, D, T, U, E>(d: D, check: impl FnOnce(T) -> Result<U, E>) -> Result<U, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
    E: std::fmt::Display,
{
    let raw = T::deserialize(d)?;
    check(raw).map_err(serde::de::Error::custom)
}

/// A positive whole count ([`count`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Count(pub u64);

impl<'de> Deserialize<'de> for Count {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        checked(d, |n: f64| count(n).map(Count))
    }
}

/// A positive USD amount ([`usd`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Usd(pub f64);

impl<'de> Deserialize<'de> for Usd {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        checked(d, |n: f64| usd(n).map(Usd))
    }
}

/// USD per million tokens ([`price`]).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct PerMillion(pub f64);

impl<'de> Deserialize<'de> for PerMillion {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        checked(d, |n: f64| price(n).map(PerMillion))
    }
}

/// A prompt-size threshold ([`threshold`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Threshold(pub u64);

impl<'de> Deserialize<'de> for Threshold {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        checked(d, |n: f64| threshold(n).map(Threshold))
    }
}

/// USD per 1,000 web searches ([`per_thousand`]).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct PerThousand(pub f64);

impl<'de> Deserialize<'de> for PerThousand {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        checked(d, |n: f64| per_thousand(n).map(PerThousand))
    }
}

/// A price multiplier ([`multiplier`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Multiplier(pub f64);

impl<'de> Deserialize<'de> for Multiplier {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        checked(d, |n: f64| multiplier(n).map(Multiplier))
    }
}

/// Non-empty text ([`text`]).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Text(pub String);

impl<'de> Deserialize<'de> for Text {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        checked(d, |s: String| text(&s).map(|()| Text(s)))
    }
}

/// A key hash ([`sha256`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Sha256(pub [u8; 32]);

impl<'de> Deserialize<'de> for Sha256 {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        checked(d, |s: std::borrow::Cow<'de, str>| sha256(&s).map(Sha256))
    }
}

/// An RFC 3339 time: milliseconds since the Unix epoch, and the text as
/// written (warnings quote it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Time {
    pub ms: u64,
    pub text: String,
}

impl<'de> Deserialize<'de> for Time {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        checked(d, |text: String| {
            crate::time::parse_rfc3339(&text).map(|ms| Time { ms, text })
        })
    }
}

/// A time zone of calendar windows: its text and minutes east of UTC.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TimeZone {
    pub text: String,
    pub offset_min: i32,
}

impl<'de> Deserialize<'de> for TimeZone {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        checked(d, |text: String| {
            crate::time::parse_offset_minutes(&text).map(|offset_min| TimeZone { text, offset_min })
        })
    }
}

/// A pool name ([`pool_name`]).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct PoolName(pub String);

impl<'de> Deserialize<'de> for PoolName {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        checked(d, |s: String| pool_name(&s).map(|()| PoolName(s)))
    }
}

/// A provider pool name ([`provider_pool_name`]).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct ProviderPoolName(pub String);

impl<'de> Deserialize<'de> for ProviderPoolName {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        checked(d, |s: String| {
            provider_pool_name(&s).map(|()| ProviderPoolName(s))
        })
    }
}

/// A SPIFFE ID pattern ([`spiffe`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpiffePattern(pub Glob);

impl<'de> Deserialize<'de> for SpiffePattern {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        checked(d, |s: std::borrow::Cow<'de, str>| {
            spiffe(&s).map(SpiffePattern)
        })
    }
}

/// A JWT claim pattern ([`claim`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimPattern(pub Glob);

impl<'de> Deserialize<'de> for ClaimPattern {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        checked(d, |s: std::borrow::Cow<'de, str>| {
            claim(&s).map(ClaimPattern)
        })
    }
}

/// The policy format version ([`version`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Version(pub u32);

impl<'de> Deserialize<'de> for Version {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        checked(d, |v: u64| version(v).map(Version))
    }
}

impl<'de> Deserialize<'de> for UnknownRoutes {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        checked(d, |s: std::borrow::Cow<'de, str>| unknown_routes(&s))
    }
}

impl<'de> Deserialize<'de> for ModelPattern {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        checked(d, |s: std::borrow::Cow<'de, str>| ModelPattern::parse(&s))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn parse<T: for<'de> Deserialize<'de>>(json: &str) -> Result<T, String> {
        serde_json::from_str(json).map_err(|e| e.to_string())
    }

    #[test]
    fn bad_leaves_fail_inside_deserialisation_with_the_checkers_reason() {
        assert_eq!(parse::<Count>("60").unwrap(), Count(60));
        assert!(parse::<Count>("1.5")
            .unwrap_err()
            .starts_with("must be a positive whole number"));
        assert!(parse::<Count>("0")
            .unwrap_err()
            .contains("omit the field for no limit"));
        assert!(parse::<Usd>("-1")
            .unwrap_err()
            .contains("positive amount of USD"));
        assert!(parse::<Sha256>("\"abc\"")
            .unwrap_err()
            .contains("must be 64 hex characters (the SHA-256 of the virtual key), found 3"));
        assert!(parse::<PoolName>("\"division:x\"")
            .unwrap_err()
            .contains("pool names are <kind>:<value>"));
        assert!(parse::<ProviderPoolName>("\"provider:anthropic\"")
            .unwrap_err()
            .contains("provider pool names are provider:<provider>:<group>"));
        assert_eq!(
            parse::<ProviderPoolName>("\"provider:anthropic:claude-sonnet-4\"").unwrap(),
            ProviderPoolName("provider:anthropic:claude-sonnet-4".into())
        );
        assert!(parse::<ModelPattern>("\"claude-[x]\"")
            .unwrap_err()
            .contains("'[' is not supported in model patterns"));
        assert_eq!(
            parse::<TimeZone>("\"+02:00\"").unwrap(),
            TimeZone {
                text: "+02:00".into(),
                offset_min: 120
            }
        );
        assert!(parse::<Version>("2")
            .unwrap_err()
            .contains("unsupported policy version"));
        assert!(parse::<Multiplier>("0")
            .unwrap_err()
            .contains("positive multiplier"));
        assert!(parse::<PerThousand>("-10")
            .unwrap_err()
            .contains("per 1,000 web searches"));
        assert!(parse::<Text>("\"  \"")
            .unwrap_err()
            .contains("must not be empty"));
    }
}
