//! Rate-limit response headers: the caller's own most restrictive bucket
//! per limit, in the shape of the provider the route speaks. Names come from
//! the metric table ([`crate::meter::METRICS`]) as static strings; only the
//! values are formatted.

use super::refusal::trim_num;
use crate::meter::metric::{Headers, Names, OpenAiFamily};
use crate::meter::{self, BucketState, Metric};
use crate::route::Provider;
use crate::time::format_rfc3339;

/// Go-style duration as OpenAI prints it: `20ms`, `1s`, `6m0s`, `1h2m3s`.
fn go_duration(ms: u64) -> String {
    if ms < 1000 {
        return format!("{ms}ms");
    }
    let secs = ms.div_ceil(1000);
    let (h, m, s) = (secs / 3600, secs % 3600 / 60, secs % 60);
    match (h, m) {
        (0, 0) => format!("{s}s"),
        (0, _) => format!("{m}m{s}s"),
        _ => format!("{h}h{m}m{s}s"),
    }
}

/// What is left, as a header value: whole units, USD to the micro-dollar.
fn remaining(s: &BucketState) -> String {
    let left = s.view.remaining.max(0.0);
    if s.bucket.metric.is_usd() {
        format!("{left:.6}")
    } else {
        left.floor().to_string()
    }
}

/// The caller's own most restrictive bucket per metric, as the provider's
/// rate-limit headers (and Tollgate's own for quotas and budgets).
pub fn rate_limit_headers(
    provider: Provider,
    states: &[BucketState],
    now: u64,
) -> Vec<(&'static str, String)> {
    let mut out = Vec::with_capacity(12);
    // One bucket as three headers: limit, remaining, reset.
    let mut push = |names: Names, values: [String; 3]| out.extend(names.into_iter().zip(values));
    // OpenAI's one token family: the input or output bucket with the least
    // left relative to its limit.
    let mut openai_tokens: Option<&BucketState> = None;
    for metric in Metric::all() {
        let Some(s) = meter::most_restrictive(states, metric) else {
            continue;
        };
        match (metric.spec().headers, provider) {
            (Headers::Tollgate(names), _) => push(
                names,
                [
                    trim_num(s.bucket.limit),
                    remaining(s),
                    format_rfc3339(s.view.reset_at),
                ],
            ),
            (Headers::Provider { anthropic, .. }, Provider::Anthropic) => push(
                anthropic,
                [
                    trim_num(s.bucket.limit),
                    remaining(s),
                    format_rfc3339(s.view.reset_at.max(now)),
                ],
            ),
            (Headers::Provider { openai, .. }, Provider::OpenAi) => match openai {
                OpenAiFamily::Requests => push(OPENAI_REQUESTS, openai_values(s, now)),
                OpenAiFamily::Tokens => {
                    let ratio = |s: &BucketState| s.view.remaining / s.bucket.limit;
                    if openai_tokens.is_none_or(|t| ratio(s) < ratio(t)) {
                        openai_tokens = Some(s);
                    }
                }
            },
        }
    }
    if let Some(s) = openai_tokens {
        push(OPENAI_TOKENS, openai_values(s, now));
    }
    out
}

const OPENAI_REQUESTS: Names = [
    "x-ratelimit-limit-requests",
    "x-ratelimit-remaining-requests",
    "x-ratelimit-reset-requests",
];
const OPENAI_TOKENS: Names = [
    "x-ratelimit-limit-tokens",
    "x-ratelimit-remaining-tokens",
    "x-ratelimit-reset-tokens",
];

fn openai_values(s: &BucketState, now: u64) -> [String; 3] {
    [
        trim_num(s.bucket.limit),
        remaining(s),
        go_duration(s.view.reset_at.saturating_sub(now)),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openai_durations_read_like_go() {
        assert_eq!(go_duration(20), "20ms");
        assert_eq!(go_duration(1_000), "1s");
        assert_eq!(go_duration(360_000), "6m0s");
        assert_eq!(go_duration(3_723_000), "1h2m3s");
    }
}
