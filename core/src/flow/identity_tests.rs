//! Callers without a virtual key: identities recognised by the mTLS peer's
//! SPIFFE ID or a verified JWT's claims are metered, limited and audited
//! as keys are; a presented virtual key decides alone.
#![allow(clippy::unwrap_used, clippy::panic)]

use super::*;
use crate::mesh::{encode_payloads, JWT_PAYLOADS, PEER_URI_SAN};
use crate::testing::FakeHost;
use serde_json::json;

const ALICE: &str = "tg-alice-key";
const BILLING: &str = "spiffe://cluster.local/ns/billing/sa/api";

fn policy(identities: &str) -> Rc<Policy> {
    let json = format!(
        r#"{{
        "version": 1,
        "defaults": {{ "models": ["claude-haiku-*"], "limits": {{ "requests_per_minute": 10 }} }},
        "groups": {{ "engineering": {{ "models": ["claude-sonnet-*"] }} }},
        "pools": {{ "team:billing": {{ "requests_per_minute": 100 }} }},
        "keys": [ {{ "id": "alice-laptop", "key_sha256": "{}", "groups": ["engineering"] }} ],
        "identities": [ {identities} ],
        "prices": {{ "claude-sonnet-*": {{ "input": 3, "output": 15 }} }}
      }}"#,
        crate::vkey::sha256_hex(ALICE),
    );
    Rc::new(
        crate::policy::compile(json.as_bytes(), "test.json", 0)
            .unwrap()
            .0,
    )
}

const IDENTITIES: &str = r#"
    { "id": "billing-svc", "spiffe": "spiffe://cluster.local/ns/billing/sa/*", "team": "billing",
      "groups": ["engineering"], "limits": { "requests_per_minute": 2 } },
    { "id": "finops", "jwt": { "iss": "https://idp.example.com", "groups": "finops" },
      "user": "finops-analysts", "groups": ["engineering"] },
    { "id": "gone", "spiffe": "spiffe://cluster.local/ns/old/sa/batch", "revoked": true }"#;

const SONNET: &str =
    r#"{"model":"claude-sonnet-4-5","max_tokens":100,"messages":[{"role":"user","content":"hi"}]}"#;

fn unkeyed() -> FakeHost {
    FakeHost::new()
        .with_request_header(":path", "/v1/messages")
        .with_request_header(":method", "POST")
        .with_request_header("x-request-id", "req-1")
        .with_body(SONNET)
}

fn alice_jwt() -> Vec<u8> {
    encode_payloads(&[(
        "idp",
        json!({"iss": "https://idp.example.com", "sub": "alice@example.com",
               "groups": ["eng", "finops"], "exp": 1_900_000_000}),
    )])
}

fn send(flow: &mut RequestFlow, host: &mut FakeHost) -> Decision {
    match flow.on_request_headers(host, false) {
        Decision::Pause => {
            let n = host.body_len();
            flow.on_request_body(host, n, true)
        }
        other => other,
    }
}

fn reply(d: Decision) -> LocalReply {
    match d {
        Decision::Reply(r) => r,
        other => panic!("expected a local reply, got {other:?}"),
    }
}

fn message(r: &LocalReply) -> String {
    let b: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    b["error"]["message"].as_str().unwrap().to_string()
}

#[test]
fn spiffe_peer_is_metered_limited_and_audited_as_its_identity() {
    let p = policy(IDENTITIES);
    let store = crate::testing::MemStore::new();
    for _ in 0..2 {
        let mut host = unkeyed()
            .with_store(store.clone())
            .with_property(&PEER_URI_SAN, BILLING.as_bytes());
        let mut flow = RequestFlow::new(p.clone());
        assert_eq!(send(&mut flow, &mut host), Decision::Continue);
        let rec = host.last_audit().unwrap();
        assert_eq!(rec.key_id.as_deref(), Some("billing-svc"));
        assert_eq!(rec.identified_by, Some(Method::Spiffe));
        assert_eq!(rec.principal.as_deref(), Some(BILLING));
        assert_eq!(rec.team.as_deref(), Some("billing"));
    }
    let mut host = unkeyed()
        .with_store(store.clone())
        .with_property(&PEER_URI_SAN, BILLING.as_bytes());
    let r = reply(send(&mut RequestFlow::new(p), &mut host));
    assert_eq!(r.status, 429);
    assert_eq!(
        message(&r),
        "requests_per_minute limit of 2 reached for key:billing-svc; retry in 30s"
    );
    let rec = host.last_audit().unwrap();
    assert_eq!(
        (rec.reason, rec.key_id.as_deref(), rec.identified_by),
        (
            Reason::RateLimited,
            Some("billing-svc"),
            Some(Method::Spiffe)
        )
    );
    assert_eq!(
        rec.bucket.as_deref(),
        Some("key:billing-svc:requests_per_minute")
    );
}

#[test]
fn verified_jwt_claims_identify_the_caller_by_a_list_claim() {
    let mut host = unkeyed().with_property(&JWT_PAYLOADS, &alice_jwt());
    let mut flow = RequestFlow::new(policy(IDENTITIES));
    assert_eq!(send(&mut flow, &mut host), Decision::Continue);
    let rec = host.last_audit().unwrap();
    assert_eq!(rec.key_id.as_deref(), Some("finops"));
    assert_eq!(rec.identified_by, Some(Method::Jwt));
    assert_eq!(
        rec.principal.as_deref(),
        Some("https://idp.example.com/alice@example.com")
    );
    assert_eq!(rec.user.as_deref(), Some("finops-analysts"));
}

#[test]
fn the_first_identity_that_matches_wins() {
    // Both match this caller: the JWT entry comes first.
    let p = policy(
        r#"{ "id": "by-jwt", "jwt": { "sub": "*@example.com" }, "groups": ["engineering"] },
           { "id": "by-spiffe", "spiffe": "spiffe://cluster.local/ns/billing/sa/api", "groups": ["engineering"] }"#,
    );
    let mut host = unkeyed()
        .with_property(&PEER_URI_SAN, BILLING.as_bytes())
        .with_property(&JWT_PAYLOADS, &alice_jwt());
    let mut flow = RequestFlow::new(p);
    assert_eq!(send(&mut flow, &mut host), Decision::Continue);
    assert_eq!(host.last_audit().unwrap().key_id.as_deref(), Some("by-jwt"));
}

#[test]
fn a_presented_virtual_key_wins_over_the_mesh() {
    let mut host = unkeyed()
        .with_request_header("x-api-key", ALICE)
        .with_property(&PEER_URI_SAN, BILLING.as_bytes());
    let mut flow = RequestFlow::new(policy(IDENTITIES));
    assert_eq!(send(&mut flow, &mut host), Decision::Continue);
    let rec = host.last_audit().unwrap();
    assert_eq!(rec.key_id.as_deref(), Some("alice-laptop"));
    assert_eq!(
        (rec.identified_by, rec.principal),
        (Some(Method::Key), None)
    );
    // An unknown key is refused as such, not rescued by the peer's identity.
    let mut host = unkeyed()
        .with_request_header("x-api-key", "tg-nope")
        .with_property(&PEER_URI_SAN, BILLING.as_bytes());
    let r = reply(RequestFlow::new(policy(IDENTITIES)).on_request_headers(&mut host, false));
    assert_eq!(
        (r.status, message(&r)),
        (401, "invalid x-api-key".to_string())
    );
}

#[test]
fn an_unknown_mesh_caller_is_refused_like_an_unknown_key_naming_its_principal() {
    let other = "spiffe://cluster.local/ns/other/sa/x";
    let mut host = unkeyed().with_property(&PEER_URI_SAN, other.as_bytes());
    let r = reply(RequestFlow::new(policy(IDENTITIES)).on_request_headers(&mut host, false));
    assert_eq!(r.status, 401);
    let b: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!(b["error"]["type"], "authentication_error");
    assert_eq!(
        message(&r),
        "no virtual key, and no identity of the policy matches the caller (spiffe://cluster.local/ns/other/sa/x)"
    );
    let rec = host.last_audit().unwrap();
    assert_eq!(
        (rec.reason, rec.key_id, rec.identified_by),
        (Reason::UnknownKey, None, None)
    );
    assert_eq!(rec.principal.as_deref(), Some(other));
    // A JWT whose claims match no identity, likewise.
    let bob = encode_payloads(&[(
        "idp",
        json!({"iss": "https://idp.example.com", "sub": "bob@example.com", "groups": ["eng"]}),
    )]);
    let mut host = unkeyed().with_property(&JWT_PAYLOADS, &bob);
    let r = reply(RequestFlow::new(policy(IDENTITIES)).on_request_headers(&mut host, false));
    assert_eq!(
        message(&r),
        "no virtual key, and no identity of the policy matches the caller (JWT https://idp.example.com/bob@example.com)"
    );
}

#[test]
fn without_key_or_mesh_evidence_the_key_is_missing() {
    let mut host = unkeyed();
    let r = reply(RequestFlow::new(policy(IDENTITIES)).on_request_headers(&mut host, false));
    assert_eq!(r.status, 401);
    assert!(message(&r).starts_with("missing API key"));
    // A policy without identities never asks the mesh.
    let mut host = unkeyed().with_property(&PEER_URI_SAN, BILLING.as_bytes());
    let p = policy("");
    let r = reply(RequestFlow::new(p).on_request_headers(&mut host, false));
    assert!(message(&r).starts_with("missing API key"));
}

#[test]
fn a_revoked_identity_is_refused_by_name() {
    let mut host =
        unkeyed().with_property(&PEER_URI_SAN, b"spiffe://cluster.local/ns/old/sa/batch");
    let r = reply(RequestFlow::new(policy(IDENTITIES)).on_request_headers(&mut host, false));
    assert_eq!(
        (r.status, message(&r)),
        (401, "identity gone has been revoked".to_string())
    );
    let rec = host.last_audit().unwrap();
    assert_eq!(
        (rec.reason, rec.key_id.as_deref(), rec.identified_by),
        (Reason::RevokedKey, Some("gone"), Some(Method::Spiffe))
    );
}
