//! The one table of limits. Each row names a limit once: its policy field,
//! what a request draws from it, how it refills, and the response headers
//! that describe it. The policy schema, the serde structs, the meter, the
//! refusal messages and the rate-limit headers all read this table, so a new
//! limit is a variant of [`Metric`] plus its row in [`METRICS`] (and its
//! tests); `docs/policy.md` shows the diff of one.

use super::cell::Refill;

/// One limit kind. The discriminant is the row's index in [`METRICS`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Metric {
    Requests,
    InputTokens,
    OutputTokens,
    TokensPerDay,
    UsdPerDay,
    UsdPerMonth,
}

/// What a request draws from a bucket; [`crate::meter::Demand`] holds one
/// amount per measure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Measure {
    Requests,
    /// Input plus cache writes (plus cache reads when the policy says so).
    InputTokens,
    OutputTokens,
    /// Every token of every class.
    AllTokens,
    Usd,
}

/// Which OpenAI `x-ratelimit-*` header family reports a limit. OpenAI has
/// one token family for input and output together: the more restrictive of
/// the two fills it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenAiFamily {
    Requests,
    Tokens,
}

/// Header names of one bucket: limit, remaining, reset.
pub type Names = [&'static str; 3];

/// How responses describe a limit. Anthropic has its own names for the
/// per-minute limits it also enforces; limits no provider has (quotas and
/// budgets) use Tollgate's own `tollgate-ratelimit-*` names on both route
/// families.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Headers {
    Provider {
        anthropic: Names,
        openai: OpenAiFamily,
    },
    Tollgate(Names),
}

/// One row of [`METRICS`].
#[derive(Debug, Clone, Copy)]
pub struct Spec {
    pub metric: Metric,
    /// The policy field (`limits.requests_per_minute`), also the name used
    /// in errors, bucket labels and shared-data keys.
    pub field: &'static str,
    /// The field's description in `policies/schema.json`.
    pub doc: &'static str,
    pub measure: Measure,
    pub refill: Refill,
    pub headers: Headers,
}

/// `names!("anthropic-ratelimit-requests")` → the `-limit`, `-remaining`
/// and `-reset` header names, as static strings (nothing is formatted on
/// the request path).
macro_rules! names {
    ($prefix:literal) => {
        [
            concat!($prefix, "-limit"),
            concat!($prefix, "-remaining"),
            concat!($prefix, "-reset"),
        ]
    };
}

/// The first row, named so that [`Metric::spec`] has a fallback that is
/// not an index.
const REQUESTS: Spec = Spec {
    metric: Metric::Requests,
    field: "requests_per_minute",
    doc: "Requests per minute (token bucket, continuous refill).",
    measure: Measure::Requests,
    refill: Refill::PerMinute,
    headers: Headers::Provider {
        anthropic: names!("anthropic-ratelimit-requests"),
        openai: OpenAiFamily::Requests,
    },
};

/// Every limit a policy can set, in [`Metric`] order.
pub const METRICS: &[Spec] = &[
    REQUESTS,
    Spec {
        metric: Metric::InputTokens,
        field: "input_tokens_per_minute",
        doc: "Input tokens per minute (input + cache writes; cache reads only if settings say so).",
        measure: Measure::InputTokens,
        refill: Refill::PerMinute,
        headers: Headers::Provider {
            anthropic: names!("anthropic-ratelimit-input-tokens"),
            openai: OpenAiFamily::Tokens,
        },
    },
    Spec {
        metric: Metric::OutputTokens,
        field: "output_tokens_per_minute",
        doc: "Output tokens per minute; max_tokens is reserved up front.",
        measure: Measure::OutputTokens,
        refill: Refill::PerMinute,
        headers: Headers::Provider {
            anthropic: names!("anthropic-ratelimit-output-tokens"),
            openai: OpenAiFamily::Tokens,
        },
    },
    Spec {
        metric: Metric::TokensPerDay,
        field: "tokens_per_day",
        doc: "All tokens per calendar day.",
        measure: Measure::AllTokens,
        refill: Refill::Day,
        headers: Headers::Tollgate(names!("tollgate-ratelimit-tokens-per-day")),
    },
    Spec {
        metric: Metric::UsdPerDay,
        field: "budget_usd_per_day",
        doc: "USD per calendar day.",
        measure: Measure::Usd,
        refill: Refill::Day,
        headers: Headers::Tollgate(names!("tollgate-ratelimit-usd-per-day")),
    },
    Spec {
        metric: Metric::UsdPerMonth,
        field: "budget_usd_per_month",
        doc: "USD per calendar month.",
        measure: Measure::Usd,
        refill: Refill::Month,
        headers: Headers::Tollgate(names!("tollgate-ratelimit-usd-per-month")),
    },
];

impl Metric {
    pub const COUNT: usize = METRICS.len();

    /// Every metric, in table order.
    pub fn all() -> impl Iterator<Item = Metric> {
        METRICS.iter().map(|s| s.metric)
    }

    /// This metric's row.
    pub fn spec(self) -> &'static Spec {
        // The discriminant is the row index (held by a test); the fallback
        // is unreachable but keeps the request path free of indexing.
        METRICS.get(self as usize).unwrap_or(&REQUESTS)
    }

    /// The metric whose policy field is `field`.
    pub fn from_field(field: &str) -> Option<Metric> {
        METRICS.iter().find(|s| s.field == field).map(|s| s.metric)
    }

    /// The policy field name, used in messages, bucket labels and keys.
    pub fn name(self) -> &'static str {
        self.spec().field
    }

    pub fn refill(self) -> Refill {
        self.spec().refill
    }

    pub fn measure(self) -> Measure {
        self.spec().measure
    }

    /// Quotas and budgets cannot be retried away; per-minute buckets can.
    pub fn is_quota(self) -> bool {
        self.refill() != Refill::PerMinute
    }

    /// Money budgets (amounts in USD rather than counts).
    pub fn is_usd(self) -> bool {
        self.measure() == Measure::Usd
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_row_sits_at_its_metrics_index_with_a_unique_field() {
        for (i, spec) in METRICS.iter().enumerate() {
            assert_eq!(spec.metric as usize, i, "{} is out of order", spec.field);
            assert_eq!(Metric::from_field(spec.field), Some(spec.metric));
            assert_eq!(spec.metric.spec().field, spec.field);
        }
        let mut fields: Vec<&str> = METRICS.iter().map(|s| s.field).collect();
        fields.sort();
        fields.dedup();
        assert_eq!(fields.len(), METRICS.len(), "field names are unique");
    }

    #[test]
    fn header_names_follow_the_provider_and_tollgate_conventions() {
        let Headers::Provider { anthropic, .. } = Metric::InputTokens.spec().headers else {
            panic!("input tokens have Anthropic headers");
        };
        assert_eq!(
            anthropic,
            [
                "anthropic-ratelimit-input-tokens-limit",
                "anthropic-ratelimit-input-tokens-remaining",
                "anthropic-ratelimit-input-tokens-reset"
            ]
        );
        assert_eq!(
            Metric::UsdPerMonth.spec().headers,
            Headers::Tollgate([
                "tollgate-ratelimit-usd-per-month-limit",
                "tollgate-ratelimit-usd-per-month-remaining",
                "tollgate-ratelimit-usd-per-month-reset"
            ])
        );
    }
}
