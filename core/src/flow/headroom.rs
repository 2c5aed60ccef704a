//! The provider's own headroom, as every provider response reports it
//! (`anthropic-ratelimit-*`, OpenAI's `x-ratelimit-*`), exported as gauges
//! per model group. Tollgate's buckets count only the traffic that crosses
//! this gateway; these headers count the organization's, whoever sent it,
//! so they are what to alert on before the provider starts answering 429.
//!
//! One gauge per group and header, named
//! `tollgate.provider.<group>.<measure>_<limit|remaining>` (Envoy prefixes
//! `wasmcustom.`): `tollgate.provider.anthropic:claude-sonnet-4.requests_remaining`.
//! The group is the provider pool whose models name the request's model,
//! without its `provider:` prefix; a model no provider pool lists falls in
//! `<provider>:other`, so the set of gauges is bounded by the policy, not
//! by the model names clients send. Dots in a group become `_`: Envoy splits
//! stat names at dots, and the shipped bootstrap's `stats_tags` rule lifts
//! the one element after `tollgate.provider.` into the tag
//! `tollgate_provider_group`.

use crate::host::{header, HeaderList, Host};
use crate::policy::Policy;
use crate::route::Provider;

/// Each provider header read, with the gauge suffix it sets. Anthropic
/// reports requests, input, output and all tokens; OpenAI requests and
/// tokens. The `-reset` headers are times, not amounts: not gauges.
const HEADERS: [(&str, &str); 12] = [
    ("anthropic-ratelimit-requests-limit", "requests_limit"),
    (
        "anthropic-ratelimit-requests-remaining",
        "requests_remaining",
    ),
    (
        "anthropic-ratelimit-input-tokens-limit",
        "input_tokens_limit",
    ),
    (
        "anthropic-ratelimit-input-tokens-remaining",
        "input_tokens_remaining",
    ),
    (
        "anthropic-ratelimit-output-tokens-limit",
        "output_tokens_limit",
    ),
    (
        "anthropic-ratelimit-output-tokens-remaining",
        "output_tokens_remaining",
    ),
    ("anthropic-ratelimit-tokens-limit", "tokens_limit"),
    ("anthropic-ratelimit-tokens-remaining", "tokens_remaining"),
    ("x-ratelimit-limit-requests", "requests_limit"),
    ("x-ratelimit-remaining-requests", "requests_remaining"),
    ("x-ratelimit-limit-tokens", "tokens_limit"),
    ("x-ratelimit-remaining-tokens", "tokens_remaining"),
];

/// The metrics group of a request's model (see the module docs).
pub fn group(policy: &Policy, provider: Provider, model: Option<&str>) -> String {
    let group = model
        .and_then(|m| policy.provider_pools_for(m).next())
        .map_or_else(
            || format!("{}:other", provider.name()),
            |pool| pool.group().to_string(),
        );
    group.replace('.', "_")
}

/// The gauge a header of `group` sets, by its name.
pub fn gauge_name(group: &str, suffix: &str) -> String {
    format!("tollgate.provider.{group}.{suffix}")
}

/// Sets a gauge for every rate-limit header of the provider's response
/// (read before Tollgate writes the caller's own into the same names).
/// Values that are not whole numbers are skipped.
pub fn observe(
    host: &mut impl Host,
    policy: &Policy,
    provider: Provider,
    model: Option<&str>,
    headers: &HeaderList,
) {
    let mut group = None;
    for (name, suffix) in HEADERS {
        let Some(value) = header(headers, name)
            .and_then(|v| std::str::from_utf8(v).ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
        else {
            continue;
        };
        let group = group.get_or_insert_with(|| self::group(policy, provider, model));
        host.set_gauge(&gauge_name(group, suffix), value);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::testing::FakeHost;

    fn policy() -> Policy {
        crate::policy::compile(
            br#"{"version": 1, "provider_pools": {
                "provider:anthropic:claude-sonnet-4": {"models": ["claude-sonnet-4-5", "claude-sonnet-4-5-*"],
                    "limits": {"requests_per_minute": 4000}},
                "provider:openai:gpt-4.1": {"models": ["gpt-4.1"], "limits": {"requests_per_minute": 500}}}}"#,
            "p.json",
            0,
        )
        .unwrap()
        .0
    }

    #[test]
    fn every_rate_limit_header_becomes_a_gauge_of_the_models_group() {
        let mut host = FakeHost::new();
        let headers: HeaderList = [
            ("anthropic-ratelimit-requests-limit", "4000"),
            ("anthropic-ratelimit-requests-remaining", "3999"),
            ("anthropic-ratelimit-input-tokens-remaining", "1999000"),
            ("anthropic-ratelimit-output-tokens-limit", "400000"),
            ("anthropic-ratelimit-tokens-remaining", "2399000"),
            ("anthropic-ratelimit-requests-reset", "2026-12-05T10:00:00Z"),
            ("anthropic-ratelimit-output-tokens-remaining", "lots"),
        ]
        .iter()
        .map(|(n, v)| (n.to_string(), v.as_bytes().to_vec()))
        .collect();
        let p = policy();
        observe(
            &mut host,
            &p,
            Provider::Anthropic,
            Some("claude-sonnet-4-5-20250929"),
            &headers,
        );
        let g = |s: &str| host.gauges.get(s).copied();
        let name = |s: &str| gauge_name("anthropic:claude-sonnet-4", s);
        assert_eq!(g(&name("requests_limit")), Some(4000));
        assert_eq!(g(&name("requests_remaining")), Some(3999));
        assert_eq!(g(&name("input_tokens_remaining")), Some(1_999_000));
        assert_eq!(g(&name("output_tokens_limit")), Some(400_000));
        assert_eq!(g(&name("tokens_remaining")), Some(2_399_000));
        assert_eq!(g(&name("output_tokens_remaining")), None, "not a number");
        assert_eq!(host.gauges.len(), 5, "{:?}", host.gauges);
        assert_eq!(
            name("requests_remaining"),
            "tollgate.provider.anthropic:claude-sonnet-4.requests_remaining"
        );
    }

    #[test]
    fn models_no_provider_pool_lists_share_their_providers_other_group() {
        let p = policy();
        assert_eq!(
            group(&p, Provider::Anthropic, Some("claude-haiku-4-5")),
            "anthropic:other"
        );
        assert_eq!(group(&p, Provider::OpenAi, None), "openai:other");
        // Dots would split the stat name in Envoy's tag extraction.
        assert_eq!(
            group(&p, Provider::OpenAi, Some("gpt-4.1")),
            "openai:gpt-4_1"
        );
        let mut host = FakeHost::new();
        let headers: HeaderList = vec![
            ("x-ratelimit-limit-requests".into(), b"500".to_vec()),
            ("x-ratelimit-remaining-tokens".into(), b"29000".to_vec()),
        ];
        observe(&mut host, &p, Provider::OpenAi, Some("gpt-4o"), &headers);
        assert_eq!(
            host.gauges.keys().collect::<Vec<_>>(),
            [
                "tollgate.provider.openai:other.requests_limit",
                "tollgate.provider.openai:other.tokens_remaining"
            ]
        );
    }
}
