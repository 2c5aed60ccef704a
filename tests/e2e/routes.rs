//! Every request path is metered or refused, classified exactly as the real
//! Envoy routes it: near misses of the LLM paths sent raw (as no HTTP client
//! would send them) under `unknown_routes: pass`, `/v1/models` on both route
//! families cut to a key's allowlist, `count_tokens` off the request bucket,
//! and the path settings of every shipped mesh manifest.

use serde_json::Value;
use std::process::Command;
use std::time::{Duration, Instant};
use tollgate_e2e::{policy, Gateway};

const KEY: &str = "tg-routes-near-miss";
/// A contractor: the defaults' `claude-haiku-*` only, 6 requests a minute
/// (refilling one per 10 s, so the remaining count is exact in a test).
const CAROL: &str = "tg-routes-carol";
/// Another contractor, for the SDK calls.
const FRANK: &str = "tg-routes-frank";
/// An engineer: `claude-sonnet-*` and `gpt-4o-mini*`.
const DAVE: &str = "tg-routes-dave";

const HAIKU: &str =
    r#"{"model":"claude-haiku-4-5","max_tokens":10,"messages":[{"role":"user","content":"hi"}]}"#;
const CHAT: &str =
    r#"{"model":"gpt-4o-mini","max_tokens":10,"messages":[{"role":"user","content":"hi"}]}"#;

fn post(path: &str, headers: &str, body: &str) -> Vec<u8> {
    format!(
        "POST {path} HTTP/1.1\r\nhost: gw\r\nconnection: close\r\ncontent-type: application/json\r\ncontent-length: {}\r\n{headers}\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// What a near miss came to.
#[derive(Debug, Clone, PartialEq)]
enum Outcome {
    /// Forwarded to the provider at `upstream`, audited as `route` with the
    /// recorded usage (input, output) charged.
    Metered {
        upstream: String,
        route: String,
        usage: (u64, u64),
    },
    /// Answered with this status, by Envoy or the filter; never forwarded.
    Refused(u16),
}

fn metered(upstream: &str, route: &str, usage: (u64, u64)) -> Outcome {
    Outcome::Metered {
        upstream: upstream.to_string(),
        route: route.to_string(),
        usage,
    }
}

#[test]
fn near_misses_are_metered_as_their_route_or_refused_never_forwarded_unmetered() {
    let p = policy(
        r#"{"models": ["claude-*", "gpt-4o*"], "limits": {"requests_per_minute": 100000}}"#,
        &[("k", KEY, "")],
    )
    .replacen(
        r#""version": 1,"#,
        r#""version": 1, "settings": {"unknown_routes": "pass"},"#,
        1,
    );
    let gw = Gateway::start(&p);
    // messages-basic and chat-basic, as recorded.
    let messages = |upstream| metered(upstream, "anthropic.messages", (61, 74));
    let chat = metered("/v1/chat/completions", "openai.chat_completions", (58, 69));
    let anthropic = format!("x-api-key: {KEY}\r\n");
    let openai = format!("authorization: Bearer {KEY}\r\n");
    let cases: Vec<(&str, &str, &str, Outcome)> = vec![
        ("/v1//messages", &anthropic, HAIKU, messages("/v1/messages")),
        (
            "/v1/messages/",
            &anthropic,
            HAIKU,
            messages("/v1/messages/"),
        ),
        (
            "/v1/./messages",
            &anthropic,
            HAIKU,
            messages("/v1/messages"),
        ),
        (
            "/v1/foo/../messages",
            &anthropic,
            HAIKU,
            messages("/v1/messages"),
        ),
        ("/v1%2Fmessages", &anthropic, HAIKU, Outcome::Refused(400)),
        ("/V1/messages", &anthropic, HAIKU, Outcome::Refused(404)),
        (
            "/v1/messages?beta=true",
            &anthropic,
            HAIKU,
            messages("/v1/messages"),
        ),
        ("/v1/messages#x", &anthropic, HAIKU, Outcome::Refused(400)),
        (
            "/v1/%6dessages",
            &anthropic,
            HAIKU,
            messages("/v1/messages"),
        ),
        ("/v1\\messages", &anthropic, HAIKU, messages("/v1/messages")),
        (
            "/v1/%2e%2e/v1/messages",
            &anthropic,
            HAIKU,
            messages("/v1/messages"),
        ),
        ("/v1/messages%2f", &anthropic, HAIKU, Outcome::Refused(400)),
        ("//v1/chat//completions", &openai, CHAT, chat.clone()),
        ("/v1/Chat/Completions", &openai, CHAT, Outcome::Refused(404)),
    ];
    let mut failures = Vec::new();
    for (i, (path, key, body, expected)) in cases.iter().enumerate() {
        let id = format!("nm-{i}");
        let (status, text) = gw.raw(&post(path, &format!("{key}x-request-id: {id}\r\n"), body));
        let upstream = gw
            .mock_requests()
            .into_iter()
            .find(|m| m["headers"]["x-request-id"] == id.as_str());
        let got = match upstream {
            Some(m) => {
                let r = gw.audit_record(&id);
                if r["tokens"]["output_reserved"] != 10 {
                    failures.push(format!("{path}: max_tokens not reserved: {r}"));
                }
                Outcome::Metered {
                    upstream: m["path"].as_str().unwrap_or_default().to_string(),
                    route: r["route"].as_str().unwrap_or_default().to_string(),
                    usage: (
                        r["tokens"]["input"].as_u64().unwrap_or(0),
                        r["tokens"]["output"].as_u64().unwrap_or(0),
                    ),
                }
            }
            None => Outcome::Refused(status),
        };
        if got != *expected || (status == 200) != matches!(expected, Outcome::Metered { .. }) {
            failures.push(format!(
                "{path}: expected {expected:?}, got {got:?} (status {status}): {}",
                text.chars().take(300).collect::<String>()
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));

    // The case near miss is the filter's refusal (Envoy routes it to the
    // catch-all): provider-shaped, named, audited.
    let (_, text) = gw.raw(&post(
        "/V1/messages",
        &format!("{anthropic}x-request-id: nm-case\r\n"),
        HAIKU,
    ));
    assert!(
        text.contains(r#""type":"not_found_error""#)
            && text.contains("/V1/messages is not an LLM API route served by this gateway (paths are case-sensitive: /v1/messages)"),
        "{text}"
    );
    assert_eq!(gw.audit_record("nm-case")["reason"], "unknown_route");

    // Nothing reached the provider unmetered: every request it saw has an
    // audit record of an LLM route with its usage charged.
    let forwarded = gw.mock_requests();
    assert_eq!(
        forwarded.len(),
        cases
            .iter()
            .filter(|c| matches!(c.3, Outcome::Metered { .. }))
            .count(),
        "only the metered near misses reached the provider: {forwarded:?}"
    );
    for m in &forwarded {
        let id = m["headers"]["x-request-id"].as_str().unwrap();
        let r = gw.audit_record(id);
        assert_ne!(r["route"], "other", "{m}");
        assert!(r["tokens"]["output"].as_u64().unwrap_or(0) > 0, "{r}");
    }
    assert!(
        gw.mock_violations().is_empty(),
        "{:?}",
        gw.mock_violations()
    );
}

fn models_policy() -> String {
    policy(
        r#"{"models": ["claude-haiku-*"], "limits": {"requests_per_minute": 100}}"#,
        &[
            ("carol", CAROL, r#""limits": {"requests_per_minute": 6}"#),
            ("frank", FRANK, ""),
            ("dave", DAVE, r#""groups": ["engineering"]"#),
        ],
    )
    .replacen(
        r#""keys":"#,
        r#""groups": {"engineering": {"models": ["claude-sonnet-*", "gpt-4o-mini*"]}}, "keys":"#,
        1,
    )
}

fn get(gw: &Gateway, path: &str, headers: &[(&str, &str)]) -> tollgate_e2e::Response {
    headers
        .iter()
        .fold(gw.client().get(gw.url(path)), |r, (n, v)| r.header(*n, *v))
        .send()
        .unwrap()
}

fn ids(list: &Value) -> Vec<&str> {
    list["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect()
}

fn header(r: &tollgate_e2e::Response, name: &str) -> Option<String> {
    r.headers()
        .get(name)
        .map(|v| v.to_str().unwrap().to_string())
}

#[test]
fn models_lists_only_the_keys_models_on_both_route_families() {
    let gw = Gateway::start(&models_policy());
    let anthropic = [("x-api-key", CAROL), ("anthropic-version", "2023-06-01")];

    // Anthropic's family: x-api-key and anthropic-version.
    let r = get(
        &gw,
        "/v1/models?limit=20",
        &[anthropic[0], anthropic[1], ("x-request-id", "m-list")],
    );
    assert_eq!(r.status(), 200);
    let length = header(&r, "content-length");
    assert_eq!(
        header(&r, "anthropic-ratelimit-requests-remaining").as_deref(),
        Some("5")
    );
    let body = r.text().unwrap();
    assert_eq!(length, Some(body.len().to_string()), "content-length fixed");
    let list: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(ids(&list), ["claude-haiku-4-5-20251001"]);
    assert_eq!(list["data"][0]["display_name"], "Claude Haiku 4.5");
    assert_eq!(list["first_id"], "claude-haiku-4-5-20251001");
    assert_eq!(list["last_id"], "claude-haiku-4-5-20251001");
    assert_eq!(list["has_more"], false);
    let rec = gw.audit_record("m-list");
    assert_eq!(rec["route"], "anthropic.models");
    assert_eq!(rec["decision"], "allowed");
    assert_eq!(rec["tokens"]["output_reserved"], 0);
    assert_eq!(rec["detail"], "listed 1 of the provider's 6 models");

    // count_tokens takes nothing from the request bucket.
    for _ in 0..3 {
        let r = gw.post_with(
            "/v1/messages/count_tokens",
            &[("x-api-key", CAROL)],
            r#"{"model":"claude-haiku-4-5","messages":[]}"#,
        );
        assert_eq!(r.status(), 200);
        assert_eq!(
            header(&r, "anthropic-ratelimit-requests-remaining").as_deref(),
            Some("5")
        );
    }

    // OpenAI's family: a bearer token alone. Nothing the contractor may use.
    let r = get(
        &gw,
        "/v1/models",
        &[
            ("authorization", &format!("Bearer {CAROL}")),
            ("x-request-id", "m-openai"),
        ],
    );
    assert_eq!(r.status(), 200);
    assert_eq!(
        header(&r, "x-ratelimit-remaining-requests").as_deref(),
        Some("4")
    );
    let list: Value = r.json().unwrap();
    assert_eq!(list, serde_json::json!({"object": "list", "data": []}));
    assert_eq!(gw.audit_record("m-openai")["route"], "openai.models");
    // The engineer sees its OpenAI models, every field as OpenAI sent it.
    let list: Value = get(
        &gw,
        "/v1/models",
        &[("authorization", &format!("Bearer {DAVE}"))],
    )
    .json()
    .unwrap();
    assert_eq!(ids(&list), ["gpt-4o-mini", "gpt-4o-mini-2024-07-18"]);
    assert_eq!(list["data"][0]["owned_by"], "system");
    assert_eq!(list["data"][0]["created"], 1721172741);
    // The rule is anthropic-version, not the key's header: x-api-key alone
    // is OpenAI's family too, and reaches OpenAI with OpenAI's key (the
    // mock answers each provider's list only to that provider's real key).
    let list: Value = get(&gw, "/v1/models", &[("x-api-key", DAVE)])
        .json()
        .unwrap();
    assert_eq!(ids(&list), ["gpt-4o-mini", "gpt-4o-mini-2024-07-18"]);
    // Claude Code with a bearer token sends anthropic-version: Anthropic's.
    let list: Value = get(
        &gw,
        "/v1/models",
        &[
            ("authorization", &format!("Bearer {DAVE}")),
            ("anthropic-version", "2023-06-01"),
        ],
    )
    .json()
    .unwrap();
    assert_eq!(
        ids(&list),
        ["claude-sonnet-4-5-20250929", "claude-sonnet-4-20250514"]
    );

    // One model outside the allowlist: not found, never forwarded.
    let upstream_before = gw.mock_requests().len();
    let r = get(
        &gw,
        "/v1/models/claude-opus-4-1",
        &[anthropic[0], anthropic[1], ("x-request-id", "m-opus")],
    );
    assert_eq!(r.status(), 404);
    let body: Value = r.json().unwrap();
    assert_eq!(body["error"]["type"], "not_found_error");
    assert_eq!(
        body["error"]["message"],
        "model: claude-opus-4-1 not found for this key"
    );
    assert_eq!(gw.mock_requests().len(), upstream_before);
    let rec = gw.audit_record("m-opus");
    assert_eq!(rec["reason"], "model_not_allowed");
    assert_eq!(rec["model_requested"], "claude-opus-4-1");
    // One inside it: the provider's answer.
    let r = get(&gw, "/v1/models/claude-haiku-4-5-20251001", &anthropic);
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.json::<Value>().unwrap()["display_name"],
        "Claude Haiku 4.5"
    );

    // The provider saw the real keys and no Tollgate header.
    let seen = gw.mock_requests();
    let paths: Vec<(&str, bool)> = seen
        .iter()
        .map(|m| {
            (
                m["path"].as_str().unwrap(),
                m["headers"]["authorization"].is_string(),
            )
        })
        .collect();
    assert!(
        paths.contains(&("/v1/models", true)) && paths.contains(&("/v1/models", false)),
        "{paths:?}"
    );
    assert!(
        gw.mock_violations().is_empty(),
        "{:?}",
        gw.mock_violations()
    );

    // Any other path under /v1/ stays refused by default, named.
    let r = get(&gw, "/v1/files", &anthropic);
    assert_eq!(r.status(), 404);
    assert_eq!(
        r.json::<Value>().unwrap()["error"]["message"],
        "/v1/files is not an LLM API route served by this gateway"
    );
}

#[test]
fn official_sdks_list_and_retrieve_models_through_the_gateway() {
    let gw = Gateway::start(&models_policy());
    let script = r#"
import json, os, anthropic, openai
gw = os.environ["GATEWAY"]
a = anthropic.Anthropic(base_url=gw, api_key=os.environ["CONTRACTOR"], max_retries=0)
o = openai.OpenAI(base_url=gw + "/v1", api_key=os.environ["ENGINEER"], max_retries=0)
out = {"anthropic": [m.id for m in a.models.list()], "openai": [m.id for m in o.models.list()]}
out["haiku"] = a.models.retrieve("claude-haiku-4-5-20251001").display_name
try:
    a.models.retrieve("claude-opus-4-1")
    out["opus"] = "found"
except anthropic.NotFoundError as e:
    out["opus"] = e.body["error"]["message"]
print(json.dumps(out))
"#;
    let python = std::env::var_os("TOLLGATE_PYTHON")
        .map(Into::into)
        .unwrap_or_else(|| {
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/python")
        });
    let out = Command::new(python)
        .args(["-c", script])
        .env("GATEWAY", &gw.base)
        .env("CONTRACTOR", FRANK)
        .env("ENGINEER", DAVE)
        .output()
        .expect("running the SDKs (make sdk installs them)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        v,
        serde_json::json!({
            "anthropic": ["claude-haiku-4-5-20251001"],
            "openai": ["gpt-4o-mini", "gpt-4o-mini-2024-07-18"],
            "haiku": "Claude Haiku 4.5",
            "opus": "model: claude-opus-4-1 not found for this key",
        })
    );
}

#[test]
fn without_the_header_hold_the_list_goes_out_chunked_and_still_cut() {
    // Istio's WasmPlugin mode: response headers leave before the body's
    // new length is known.
    let p = models_policy().replacen(
        r#""version": 1,"#,
        r#""version": 1, "settings": {"hold_request_headers": false},"#,
        1,
    );
    let gw = Gateway::start(&p);
    let deadline = Instant::now() + Duration::from_secs(10);
    let r = loop {
        let r = get(
            &gw,
            "/v1/models",
            &[("x-api-key", FRANK), ("anthropic-version", "2023-06-01")],
        );
        if header(&r, "content-length").is_none() || Instant::now() > deadline {
            break r;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "content-length"), None, "no stale length");
    assert_eq!(header(&r, "transfer-encoding").as_deref(), Some("chunked"));
    assert_eq!(ids(&r.json().unwrap()), ["claude-haiku-4-5-20251001"]);
}

/// Where this project does not render the HCM, its manifests set the same
/// path handling (and the filter normalises anyway).
#[test]
fn mesh_manifests_normalise_paths_as_the_shipped_envoy_does() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let yaml = |rel: &str| -> serde_yaml::Value {
        serde_yaml::from_str(&std::fs::read_to_string(root.join(rel)).unwrap()).unwrap()
    };
    let istio = yaml("deploy/istio/paths-envoyfilter.yaml");
    assert_eq!(istio["kind"], "EnvoyFilter");
    let hcm = &istio["spec"]["configPatches"][0]["patch"]["value"]["typed_config"];
    assert_eq!(hcm["normalize_path"], true);
    assert_eq!(hcm["merge_slashes"], true);
    assert_eq!(hcm["path_with_escaped_slashes_action"], "REJECT_REQUEST");
    let eg = yaml("deploy/envoy-gateway/client-traffic-policy.yaml");
    assert_eq!(eg["kind"], "ClientTrafficPolicy");
    assert_eq!(eg["spec"]["path"]["escapedSlashesAction"], "RejectRequest");
    assert_eq!(eg["spec"]["path"]["disableMergeSlashes"], false);
    assert_eq!(eg["spec"]["targetRefs"][0]["name"], "llm-gateway");
}
