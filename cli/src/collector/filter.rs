//! What a dashboard view selects: a time range and equality filters on the
//! values reports group by (`team=payments`, `model=claude-sonnet-4-5`,
//! `key=alice`). Every panel of the dashboard reads through one [`Filter`],
//! so a filter applies to all of them alike, and the page keeps it in its
//! URL query, so a view can be bookmarked.

use super::report::{parse_since, GroupBy};
use super::store::Param;
use anyhow::{bail, Result};
use std::collections::HashMap;

/// The dimensions a view may filter on, in the order the page shows them.
pub const DIMENSIONS: [GroupBy; 7] = [
    GroupBy::Team,
    GroupBy::Project,
    GroupBy::User,
    GroupBy::App,
    GroupBy::Agent,
    GroupBy::Model,
    GroupBy::Key,
];

#[derive(Debug, Clone, PartialEq, Default)]
pub struct Filter {
    /// Records at or after this instant (Unix ms).
    pub since_ms: u64,
    /// Records before this instant; `None`: up to now.
    pub until_ms: Option<u64>,
    /// Each dimension's value must equal this one, spelt as reports show
    /// it (`(none)` for a record without the attribute).
    pub equals: Vec<(GroupBy, String)>,
}

impl Filter {
    /// Everything since `since_ms`.
    pub fn since(since_ms: u64) -> Filter {
        Filter {
            since_ms,
            ..Filter::default()
        }
    }

    /// The same view, also restricted to `dimension = value`.
    pub fn and(mut self, dimension: GroupBy, value: &str) -> Filter {
        self.equals.retain(|(d, _)| *d != dimension);
        self.equals.push((dimension, value.to_string()));
        self
    }

    /// The filter of a query string: `since` (a duration back from now or
    /// a time, default `default_since`), `until` (a time; a bare date
    /// `2026-12-05` means the end of that UTC day, so `since=2026-12-01&
    /// until=2026-12-05` is five whole days), and one parameter per
    /// dimension. Empty parameters are ignored (an emptied form field).
    pub fn from_query(
        q: &HashMap<String, String>,
        default_since: &str,
        now_ms: u64,
    ) -> Result<Filter> {
        let present = |name: &str| q.get(name).map(|v| v.trim()).filter(|v| !v.is_empty());
        let since_ms = parse_since(present("since").unwrap_or(default_since), now_ms)?;
        let until_ms = match present("until") {
            None => None,
            Some(u) => Some(parse_until(u)?),
        };
        if let Some(until) = until_ms.filter(|u| *u <= since_ms) {
            bail!(
                "until {} is not after since {}",
                tollgate_core::time::format_rfc3339(until),
                tollgate_core::time::format_rfc3339(since_ms)
            );
        }
        let equals = DIMENSIONS
            .iter()
            .filter_map(|d| present(d.as_str()).map(|v| (*d, v.to_string())))
            .collect();
        Ok(Filter {
            since_ms,
            until_ms,
            equals,
        })
    }

    /// The end of the range: `until`, else `now_ms`.
    pub fn end(&self, now_ms: u64) -> u64 {
        self.until_ms.unwrap_or(now_ms)
    }

    /// SQL conditions for the range's end and each dimension (each starting
    /// with ` AND `), numbering their parameters after those in `params`,
    /// to which it appends them. The range's start is each source's own
    /// (raw records and rollups read it differently; see `report.rs`).
    pub fn conditions<'a>(&'a self, day_expr: &'static str, params: &mut Vec<Param<'a>>) -> String {
        let mut sql = String::new();
        if let Some(until) = self.until_ms {
            params.push(Param::Int(i64::try_from(until).unwrap_or(i64::MAX)));
            sql.push_str(&format!(" AND timestamp_ms < ${}", params.len()));
        }
        for (dimension, value) in &self.equals {
            params.push(Param::Text(value));
            sql.push_str(&format!(
                " AND {} = ${}",
                dimension.sql(day_expr),
                params.len()
            ));
        }
        sql
    }
}

/// An RFC 3339 time, or a date meaning the end of that UTC day.
fn parse_until(s: &str) -> Result<u64> {
    match tollgate_core::time::parse_rfc3339(s) {
        Ok(ms) if is_date(s) => Ok(ms + 86_400_000),
        Ok(ms) => Ok(ms),
        Err(_) => bail!("until {s:?}: use a date such as 2026-12-05 or an RFC 3339 time"),
    }
}

fn is_date(s: &str) -> bool {
    s.len() == 10 && s.bytes().filter(|b| *b == b'-').count() == 2
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A request's query pairs, as axum hands them to a handler.
    pub(crate) fn query(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn a_query_names_the_range_and_the_dimensions() {
        let day = 86_400_000;
        let f = Filter::from_query(
            &query(&[
                ("since", "1970-01-02"),
                ("until", "1970-01-03"),
                ("model", "claude-sonnet-4-5"),
                ("team", "payments"),
                ("user", " "),
                ("by", "team"),
            ]),
            "7d",
            100 * day,
        )
        .unwrap();
        assert_eq!(
            f,
            Filter {
                since_ms: day,
                until_ms: Some(3 * day),
                equals: vec![
                    (GroupBy::Team, "payments".into()),
                    (GroupBy::Model, "claude-sonnet-4-5".into())
                ],
            }
        );
        let mut params = vec![Param::Int(0)];
        assert_eq!(
            f.conditions("DAY", &mut params),
            " AND timestamp_ms < $2 AND COALESCE(team, '(none)') = $3 \
             AND COALESCE(model_served, model_requested, '(none)') = $4"
        );
        assert_eq!(params.len(), 4);
        let plain = Filter::from_query(&query(&[]), "7d", 10 * day).unwrap();
        assert_eq!(plain, Filter::since(3 * day));
        assert_eq!(plain.conditions("DAY", &mut Vec::new()), "");
        let instant =
            Filter::from_query(&query(&[("until", "1970-01-01T00:00:01Z")]), "1d", day).unwrap();
        assert_eq!(instant.until_ms, Some(1000));
    }

    #[test]
    fn a_range_that_ends_before_it_starts_is_refused() {
        let err = Filter::from_query(
            &query(&[("since", "1970-01-05"), ("until", "1970-01-01T12:00:00Z")]),
            "7d",
            0,
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "until 1970-01-01T12:00:00Z is not after since 1970-01-05T00:00:00Z"
        );
        let err = Filter::from_query(&query(&[("until", "tomorrow")]), "7d", 0).unwrap_err();
        assert_eq!(
            err.to_string(),
            "until \"tomorrow\": use a date such as 2026-12-05 or an RFC 3339 time"
        );
    }
}
