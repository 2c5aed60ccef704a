//! Every rejected case in `policies/tests/rejected.json` with its exact
//! messages, and the example policy's compiled form.

use super::*;
use crate::meter::Metric;
use serde_json::Value;

const REJECTED: &str = include_str!("../../../policies/tests/rejected.json");
const EXAMPLE: &str = include_str!("../../../policies/example.json");

fn case_text(case: &Value) -> String {
    match case.get("policy_text").and_then(Value::as_str) {
        Some(t) => t.to_string(),
        None => case["policy"].to_string(),
    }
}

#[test]
fn every_rejected_case_reports_every_error_with_path_value_and_reason() {
    let cases: Vec<Value> = serde_json::from_str(REJECTED).unwrap();
    assert!(cases.len() >= 14);
    for case in &cases {
        let name = case["name"].as_str().unwrap();
        let errors = match compile(case_text(case).as_bytes(), "policy.json", 0) {
            Ok(_) => panic!("case {name:?} was accepted"),
            Err(e) => e.iter().map(ToString::to_string).collect::<Vec<_>>(),
        };
        let expected: Vec<&str> = case["errors"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e.as_str().unwrap())
            .collect();
        assert_eq!(errors, expected, "case {name:?}");
    }
}

#[test]
fn example_policy_compiles_with_resolved_limits_models_and_pools() {
    let (p, report) = compile(EXAMPLE.as_bytes(), "example.json", 0).unwrap();
    assert!(report.warnings.is_empty());
    assert_eq!(p.keys().len(), 4);
    let alice = p.lookup(&crate::vkey::sha256(b"tg-demo-alice")).unwrap();
    assert_eq!(alice.id, "alice-laptop");
    assert_eq!(alice.limits.get(Metric::Requests), Some(50.0));
    assert!(alice.models.allows("claude-sonnet-4-5") && !alice.models.allows("claude-opus-4-1"));
    let pools: Vec<&str> = alice
        .pools
        .iter()
        .map(|i| p.pool(*i).unwrap().name.as_str())
        .collect();
    assert_eq!(pools, ["team:payments", "project:chatbot"]);
    // Bob: contractors group limits, defaults for the rest.
    let bob = p.lookup(&crate::vkey::sha256(b"tg-demo-bob")).unwrap();
    assert_eq!(bob.limits.get(Metric::TokensPerDay), Some(200_000.0));
    assert_eq!(bob.limits.get(Metric::Requests), Some(60.0));
    assert_eq!(bob.models.describe(), "claude-haiku-*");
    assert_eq!(p.price("claude-sonnet-4-5").map(|x| x.output), Some(15.0));
    assert_eq!(
        p.price("gpt-4o-mini").map(|x| x.input),
        Some(0.15),
        "longer glob wins"
    );
    assert_eq!(p.price("llama-3"), None);
}

#[test]
fn most_restrictive_group_limit_applies_when_the_key_sets_none() {
    let json = format!(
        r#"{{"version":1,"defaults":{{"limits":{{"requests_per_minute":100}}}},
            "groups":{{"a":{{"limits":{{"requests_per_minute":30,"tokens_per_day":10}}}},"b":{{"limits":{{"requests_per_minute":20}}}}}},
            "keys":[{{"id":"k","key_sha256":"{}","groups":["a","b"],"limits":{{"tokens_per_day":50}}}}]}}"#,
        crate::vkey::sha256_hex("tg-k")
    );
    let (p, _) = compile(json.as_bytes(), "p.json", 0).unwrap();
    let k = &p.keys()[0];
    assert_eq!(k.limits.get(Metric::Requests), Some(20.0));
    assert_eq!(
        k.limits.get(Metric::TokensPerDay),
        Some(50.0),
        "the key's own value wins"
    );
    assert!(
        k.models.describe() == "no models",
        "no group lists models and no defaults: nothing allowed"
    );
}

#[test]
fn alerts_come_from_the_key_else_its_first_group_with_some_else_the_defaults() {
    let key = |id: &str, rest: &str| {
        format!(
            r#"{{"id":"{id}","key_sha256":"{}"{rest}}}"#,
            crate::vkey::sha256_hex(&format!("tg-{id}"))
        )
    };
    let json = format!(
        r#"{{"version":1,"defaults":{{"limits":{{"tokens_per_day":1000,"alerts":[0.9]}}}},
            "groups":{{"quiet":{{}},"a":{{"limits":{{"alerts":[0.5,1]}}}},"b":{{"limits":{{"alerts":[0.8]}}}}}},
            "pools":{{"team:payments":{{"budget_usd_per_day":50,"alerts":[0.25,0.75,1.5]}}}},
            "keys":[{},{},{},{}]}}"#,
        key("own", r#","groups":["a"],"limits":{"alerts":[0.7]}"#),
        key("grouped", r#","groups":["quiet","b","a"]"#),
        key("default", ""),
        key("off", r#","groups":["a"],"limits":{"alerts":[]}"#),
    );
    let (p, _) = compile(json.as_bytes(), "p.json", 0).unwrap();
    let alerts: Vec<(&str, &[f64])> = p
        .keys()
        .iter()
        .map(|k| (k.id.as_str(), k.limits.alerts()))
        .collect();
    assert_eq!(
        alerts,
        [
            ("own", &[0.7][..]),
            ("grouped", &[0.8][..]),
            ("default", &[0.9][..]),
            ("off", &[][..]),
        ]
    );
    assert_eq!(p.pools[0].limits.alerts(), [0.25, 0.75, 1.5]);
}

#[test]
fn expired_keys_are_a_warning_not_an_error() {
    let json = format!(
        r#"{{"version":1,"keys":[{{"id":"old","key_sha256":"{}","expires_at":"2020-01-01T00:00:00Z"}}]}}"#,
        crate::vkey::sha256_hex("tg-old")
    );
    let (_, report) = compile(json.as_bytes(), "p.json", 1_700_000_000_000).unwrap();
    let w: Vec<String> = report.warnings.iter().map(ToString::to_string).collect();
    assert_eq!(w, ["p.json: keys[0].expires_at: already expired: this key is refused (value: \"2020-01-01T00:00:00Z\")"]);
}

#[test]
fn lookup_is_by_hash_and_case_insensitive_in_the_file() {
    let upper = crate::vkey::sha256_hex("tg-x").to_ascii_uppercase();
    let json = format!(r#"{{"version":1,"keys":[{{"id":"x","key_sha256":"{upper}"}}]}}"#);
    let (p, _) = compile(json.as_bytes(), "p.json", 0).unwrap();
    assert_eq!(
        p.lookup(&crate::vkey::sha256(b"tg-x"))
            .map(|k| k.id.clone()),
        Some("x".to_string())
    );
    assert!(p.lookup(&crate::vkey::sha256(b"tg-y")).is_none());
}

#[test]
fn valid_policies_take_the_typed_path_and_compile_as_the_dom_path_does() {
    let rich = r#"{"version":1,
        "defaults":{"models":["claude-haiku-*"],"limits":{"requests_per_minute":60}},
        "groups":{"eng":{"models":["claude-*"],"limits":{"tokens_per_day":1000}}},
        "pools":{"team:payments":{"budget_usd_per_month":2000.5}},
        "keys":[{"id":"a","key_sha256":"AB00000000000000000000000000000000000000000000000000000000000001",
                 "user":"alice@example.com","team":"payments","groups":["eng"],
                 "limits":{"output_tokens_per_minute":8000},"expires_at":"2027-06-30T00:00:00Z","revoked":false},
                {"id":"b","key_sha256":"ab00000000000000000000000000000000000000000000000000000000000002",
                 "previous":[{"key_sha256":"ab00000000000000000000000000000000000000000000000000000000000003","not_after":"2026-12-06T12:00:00Z"},
                             {"key_sha256":"AB00000000000000000000000000000000000000000000000000000000000004","not_after":"2026-12-01"}]}],
        "prices":{"claude-sonnet-4-*":{"input":3,"output":15,"cache_read":0.3},
                  "claude-opus-5-5":{"input":5,"output":25,"cache_write_1h":10,"web_search_per_thousand":10,
                                     "long_context":{"above_input_tokens":200000,"input":10,"output":37.5},
                                     "tiers":{"batch":0.5,"priority":2},"regions":{"us":1.1}}},
        "settings":{"unknown_routes":"pass","time_zone":"+02:00","default_price":{"input":1,"output":2},
                    "cache_reads_count_toward_input_limit":true,"hold_request_headers":false}}"#;
    for doc in [EXAMPLE, rich] {
        assert!(
            serde_json::from_slice::<super::raw::Obj<super::raw::RawPolicy>>(doc.as_bytes())
                .is_ok(),
            "the typed fast path takes it: {doc}"
        );
        let (fast, fast_report) = compile(doc.as_bytes(), "p.json", 0).unwrap();
        let (dom, dom_report) = compile_checked(doc.as_bytes(), "p.json", 0).unwrap();
        assert_eq!(format!("{:?}", fast.keys()), format!("{:?}", dom.keys()));
        assert_eq!(format!("{:?}", fast.pools), format!("{:?}", dom.pools));
        assert_eq!(
            format!("{:?}", fast.settings),
            format!("{:?}", dom.settings)
        );
        assert_eq!(fast.model_patterns(), dom.model_patterns());
        assert_eq!(fast_report, dom_report);
        assert_eq!(fast.index.len(), dom.index.len());
        for (hash, secret) in &dom.index {
            assert_eq!(fast.lookup_secret(hash), Some(*secret));
        }
    }
}

#[test]
fn price_lookup_prefers_the_policy_then_the_shipped_table_then_the_default() {
    let json = format!(
        r#"{{"version":1,"keys":[{{"id":"k","key_sha256":"{}"}}],
            "prices":{{"claude-opus-5-5":{{"input":1,"output":2}}}},
            "settings":{{"default_price":{{"input":7,"output":8}}}}}}"#,
        crate::vkey::sha256_hex("tg-k")
    );
    let (p, _) = compile(json.as_bytes(), "p.json", 0).unwrap();
    assert_eq!(
        p.price("claude-opus-5-5").map(|x| x.input),
        Some(1.0),
        "policy wins"
    );
    let shipped = p.price("claude-sonnet-5-5").unwrap();
    assert_eq!(
        (shipped.input, shipped.output, shipped.cache_read),
        (2.0, 10.0, 0.1)
    );
    assert_eq!(
        p.price("claude-sonnet-5-5-20261201").map(|x| x.input),
        Some(2.0),
        "dated snapshot"
    );
    assert_eq!(
        p.price("llama-3-70b").map(|x| x.input),
        Some(7.0),
        "default last"
    );
    // A model newer than the table is not priced as its elder.
    let (bare, _) = compile(br#"{"version":1}"#, "p.json", 0).unwrap();
    assert!(bare.price("claude-sonnet-5-7").is_none());
    assert!(bare.price("gpt-6.1-sol").is_some());
}

#[test]
fn unpriced_allowlists_fail_on_both_paths_until_a_price_applies() {
    let doc = |prices: &str, settings: &str| {
        format!(
            r#"{{"version":1,"groups":{{"eng":{{"models":["claude-opus-5-5","my-model-*"]}}}},
                "keys":[{{"id":"k","key_sha256":"{}","groups":["eng"],"limits":{{"budget_usd_per_day":5}}}}],
                "prices":{{{prices}}},"settings":{{{settings}}}}}"#,
            crate::vkey::sha256_hex("tg-k")
        )
    };
    let want = ["p.json: groups.eng.models[1]: model \"my-model-*\" has no price and a USD budget applies to keys in this group (add it under \"prices\" or settings.default_price)"];
    let unpriced = doc("", "");
    for result in [
        compile(unpriced.as_bytes(), "p.json", 0),
        compile_checked(unpriced.as_bytes(), "p.json", 0),
    ] {
        let errors: Vec<String> = result
            .unwrap_err()
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(errors, want);
    }
    // A price for some model of the pattern, or a default, is enough: the
    // flow refuses the models still unpriced.
    assert!(compile(
        doc(r#""my-model-small":{"input":1,"output":1}"#, "").as_bytes(),
        "p.json",
        0
    )
    .is_ok());
    assert!(compile(
        doc("", r#""default_price":{"input":1,"output":1}"#).as_bytes(),
        "p.json",
        0
    )
    .is_ok());
    // Without a budget nothing is checked: unpriced models cost nothing.
    let free = unpriced.replace(
        r#""limits":{"budget_usd_per_day":5}"#,
        r#""limits":{"requests_per_minute":5}"#,
    );
    assert!(compile(free.as_bytes(), "p.json", 0).is_ok());
}

#[test]
fn arrays_where_the_policy_has_objects_are_refused_by_both_paths() {
    // Serde's derived structs would read `[1]` as `{"version": 1}`; the
    // fuzzer found the typed path accepting what the schema refuses.
    let sha = crate::vkey::sha256_hex("tg-a");
    for (doc, error) in [
        (
            "[1]".to_string(),
            "p.json: $: expected an object, found an array (value: [1])".to_string(),
        ),
        (
            format!(r#"{{"version":1,"keys":[["a","{sha}"]]}}"#),
            format!(
                "p.json: keys[0]: expected an object, found an array (value: [\"a\",\"{sha}\"])"
            ),
        ),
        (
            r#"{"version":1,"settings":[true]}"#.to_string(),
            "p.json: settings: expected an object, found an array (value: [true])".to_string(),
        ),
    ] {
        let fast = compile(doc.as_bytes(), "p.json", 0).unwrap_err();
        let dom = compile_checked(doc.as_bytes(), "p.json", 0).unwrap_err();
        assert_eq!(fast, dom, "{doc}");
        assert_eq!(
            fast.iter().map(ToString::to_string).collect::<Vec<_>>(),
            [error],
            "{doc}"
        );
    }
}

#[test]
fn every_secret_of_a_rotated_key_opens_the_same_key_until_its_not_after() {
    let json = format!(
        r#"{{"version":1,"keys":[
            {{"id":"k","key_sha256":"{}","previous":[
                {{"key_sha256":"{}","not_after":"2026-12-06T12:00:00Z"}},
                {{"key_sha256":"{}","not_after":"2026-12-01T00:00:00Z"}}]}},
            {{"id":"other","key_sha256":"{}"}}]}}"#,
        crate::vkey::sha256_hex("tg-new"),
        crate::vkey::sha256_hex("tg-old"),
        crate::vkey::sha256_hex("tg-older"),
        crate::vkey::sha256_hex("tg-other"),
    );
    let (p, report) = compile(json.as_bytes(), "p.json", 0).unwrap();
    assert!(report.warnings.is_empty());
    let until = crate::time::parse_rfc3339("2026-12-06T12:00:00Z").unwrap();
    let older = crate::time::parse_rfc3339("2026-12-01T00:00:00Z").unwrap();
    let secret = |k: &str| p.lookup_secret(&crate::vkey::sha256(k.as_bytes()));
    assert_eq!(
        secret("tg-new"),
        Some(Secret {
            key: 0,
            not_after_ms: None
        })
    );
    assert_eq!(
        secret("tg-old"),
        Some(Secret {
            key: 0,
            not_after_ms: Some(until)
        })
    );
    assert_eq!(secret("tg-older").map(|s| s.key), Some(0));
    assert_eq!(secret("tg-other").map(|s| s.key), Some(1));
    let old = secret("tg-old").unwrap();
    assert_eq!(old.check_valid(until - 1), Ok(()));
    assert_eq!(
        old.check_valid(until),
        Err(KeyRefusal::SecretRotated(until))
    );

    let k = &p.keys()[0];
    assert_eq!(k.secrets(), 3);
    assert_eq!(k.previous_not_after_ms, [until, older]);
    assert_eq!(
        k.status(older - 1),
        KeyStatus::Rotating { until_ms: until },
        "the rotation lasts until its last previous secret stops"
    );
    assert_eq!(k.status(until - 1), KeyStatus::Rotating { until_ms: until });
    assert_eq!(k.status(until), KeyStatus::Active);
    assert_eq!(p.keys()[1].status(0), KeyStatus::Active);
}

#[test]
fn key_status_puts_revoked_before_expired_before_rotating() {
    let json = format!(
        r#"{{"version":1,"keys":[
            {{"id":"r","key_sha256":"{}","revoked":true,"expires_at":"2020-01-01T00:00:00Z"}},
            {{"id":"e","key_sha256":"{}","expires_at":"2020-01-01T00:00:00Z",
              "previous":[{{"key_sha256":"{}","not_after":"2030-01-01T00:00:00Z"}}]}}]}}"#,
        crate::vkey::sha256_hex("tg-r"),
        crate::vkey::sha256_hex("tg-e"),
        crate::vkey::sha256_hex("tg-e-old"),
    );
    let (p, _) = compile(json.as_bytes(), "p.json", 0).unwrap();
    let now = crate::time::parse_rfc3339("2025-01-01T00:00:00Z").unwrap();
    assert_eq!(p.keys()[0].status(now), KeyStatus::Revoked);
    assert_eq!(
        p.keys()[1].status(now),
        KeyStatus::Expired {
            at_ms: crate::time::parse_rfc3339("2020-01-01T00:00:00Z").unwrap()
        }
    );
}

#[test]
fn both_paths_agree_on_previous_secrets_at_the_edges() {
    let (h, old) = (
        crate::vkey::sha256_hex("tg-now"),
        crate::vkey::sha256_hex("tg-then"),
    );
    for (previous, accepted) in [
        ("[]".to_string(), true),
        (
            format!(r#"[{{"key_sha256":"{old}","not_after":"2026-12-06"}}]"#),
            true,
        ),
        ("null".to_string(), false),
        (format!(r#"[["{old}","2026-12-06"]]"#), false),
        (format!(r#"[{{"key_sha256":"{old}"}}]"#), false),
        (
            format!(r#"[{{"key_sha256":"{h}","not_after":"2026-12-06"}}]"#),
            false,
        ),
    ] {
        let doc = format!(
            r#"{{"version":1,"keys":[{{"id":"k","key_sha256":"{h}","previous":{previous}}}]}}"#
        );
        let fast = compile(doc.as_bytes(), "p.json", 0);
        let dom = compile_checked(doc.as_bytes(), "p.json", 0);
        assert_eq!(fast.is_ok(), accepted, "{doc}");
        match (fast, dom) {
            (Ok((f, _)), Ok((d, _))) => {
                assert_eq!(format!("{:?}", f.keys()), format!("{:?}", d.keys()));
            }
            (Err(f), Err(d)) => assert_eq!(f, d, "{doc}"),
            (f, d) => panic!(
                "paths disagree on {doc}: fast {}, DOM {}",
                f.is_ok(),
                d.is_ok()
            ),
        }
    }
}

#[test]
fn identities_are_callers_with_a_keys_fields_but_not_keys() {
    let json = format!(
        r#"{{"version":1,"defaults":{{"limits":{{"requests_per_minute":100}}}},
            "groups":{{"eng":{{"models":["claude-sonnet-*"],"limits":{{"requests_per_minute":30}}}}}},
            "pools":{{"team:billing":{{"tokens_per_day":1000}}}},
            "keys":[{{"id":"k","key_sha256":"{}"}}],
            "identities":[
              {{"id":"billing-svc","spiffe":"spiffe://cluster.local/ns/billing/sa/*","team":"billing","groups":["eng"]}},
              {{"id":"finops","jwt":{{"groups":"finops"}},"limits":{{"requests_per_minute":5}},"expires_at":"2020-01-01T00:00:00Z"}}]}}"#,
        crate::vkey::sha256_hex("tg-k")
    );
    let (p, report) = compile(json.as_bytes(), "p.json", 1_800_000_000_000).unwrap();
    assert_eq!(p.keys().len(), 1, "identities are not keys");
    assert_eq!(p.callers().len(), 3);
    let ids: Vec<String> = p
        .identities()
        .iter()
        .map(|i| p.key(i.caller).unwrap().id.clone())
        .collect();
    assert_eq!(ids, ["billing-svc", "finops"]);
    let svc = p.key(p.identities()[0].caller).unwrap();
    assert_eq!(svc.limits.get(Metric::Requests), Some(30.0), "group limit");
    assert!(svc.models.allows("claude-sonnet-4-5"));
    assert_eq!(p.pool(svc.pools[0]).unwrap().name, "team:billing");
    assert!(
        matches!(&p.identities()[0].matcher, MeshMatch::Spiffe(g) if g.matches("spiffe://cluster.local/ns/billing/sa/api"))
    );
    let finops = p.key(p.identities()[1].caller).unwrap();
    assert_eq!(finops.limits.get(Metric::Requests), Some(5.0));
    assert_eq!(
        report.warnings.iter().map(ToString::to_string).collect::<Vec<_>>(),
        ["p.json: identities[1].expires_at: already expired: this identity is refused (value: \"2020-01-01T00:00:00Z\")"]
    );
    // The DOM path builds the same policy.
    let (q, _) = compile_checked(json.as_bytes(), "p.json", 1).unwrap();
    assert_eq!(q.callers().len(), 3);
}
