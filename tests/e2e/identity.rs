//! Callers without virtual keys on a live gateway: a workload identified by
//! the SPIFFE ID of its client certificate (real mTLS on Envoy's listener,
//! certificates generated here) and a caller with only a JWT (verified by
//! Envoy's real `jwt_authn` against a local JWKS, key generated here) are
//! each admitted, limited and audited under the policy's identity; a
//! forged token or claim header is not trusted; an unknown SPIFFE ID is
//! refused as an unknown key is.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use rcgen::{ExtendedKeyUsagePurpose, KeyPair, SanType};
use serde_json::{json, Value};
use tollgate_e2e::pki::Pki;
use tollgate_e2e::{sha, Gateway, Options};

const HAIKU: &str =
    r#"{"model":"claude-haiku-4-5","max_tokens":50,"messages":[{"role":"user","content":"hi"}]}"#;
const BILLING: &str = "spiffe://cluster.local/ns/billing/sa/api";
const ISSUER: &str = "https://idp.tollgate.test";
const KEY: &str = "tg-e2e-identity-key";

fn policy() -> String {
    json!({
        "version": 1,
        "defaults": { "models": ["claude-haiku-*"], "limits": { "requests_per_minute": 1000 } },
        "keys": [ { "id": "laptop", "key_sha256": sha(KEY) } ],
        "identities": [
            { "id": "billing-svc", "spiffe": "spiffe://cluster.local/ns/billing/sa/*",
              "team": "billing", "limits": { "requests_per_minute": 2 } },
            { "id": "finops", "jwt": { "iss": ISSUER, "groups": "finops" },
              "user": "finops-analysts", "limits": { "requests_per_minute": 2 } }
        ]
    })
    .to_string()
}

fn tls_gateway(pki: &Pki, certs: &tempfile::TempDir, more: &[&str]) -> Gateway {
    pki.server_files(certs.path());
    let file = |n: &str| certs.path().join(n).display().to_string();
    let mut extra_args = vec![
        "--tls-cert".into(),
        file("server.pem"),
        "--tls-key".into(),
        file("server.key"),
        "--client-ca".into(),
        file("ca.pem"),
    ];
    extra_args.extend(more.iter().map(|a| a.to_string()));
    Gateway::start_with(
        &policy(),
        Options {
            extra_args,
            ..Options::default()
        },
    )
}

/// POSTs the Haiku request; returns (status, body).
fn call(
    client: &reqwest::blocking::Client,
    url: &str,
    headers: &[(&str, &str)],
    request_id: &str,
) -> (u16, Value) {
    let mut req = client
        .post(format!("{url}/v1/messages"))
        .header("content-type", "application/json")
        .header("x-request-id", request_id)
        .body(HAIKU);
    for (n, v) in headers {
        req = req.header(*n, *v);
    }
    let r = req.send().unwrap();
    (r.status().as_u16(), r.json().unwrap_or_default())
}

fn message(body: &Value) -> &str {
    body["error"]["message"].as_str().unwrap_or_default()
}

#[test]
fn a_workload_with_only_its_spiffe_id_is_admitted_limited_and_audited_under_its_identity() {
    let pki = Pki::new();
    let certs = tempfile::tempdir().unwrap();
    let gw = tls_gateway(&pki, &certs, &[]);
    let url = gw.base.replace("http://", "https://");
    let billing = pki.client(Some(BILLING));

    for i in 0..2 {
        let (status, body) = call(&billing, &url, &[], &format!("spiffe-{i}"));
        assert_eq!(status, 200, "{body}");
    }
    let (status, body) = call(&billing, &url, &[], "spiffe-limited");
    assert_eq!(status, 429, "{body}");
    assert!(
        message(&body)
            .starts_with("requests_per_minute limit of 2 reached for key:billing-svc; retry in "),
        "{body}"
    );

    let first = gw.audit_record("spiffe-0");
    assert_eq!(first["decision"], "allowed");
    assert_eq!(first["key_id"], "billing-svc");
    assert_eq!(first["identified_by"], "spiffe");
    assert_eq!(first["principal"], BILLING);
    assert_eq!(first["team"], "billing");
    let limited = gw.audit_record("spiffe-limited");
    assert_eq!(
        (
            &limited["reason"],
            &limited["key_id"],
            &limited["identified_by"]
        ),
        (
            &json!("rate_limited"),
            &json!("billing-svc"),
            &json!("spiffe")
        )
    );
    assert_eq!(limited["bucket"], "key:billing-svc:requests_per_minute");

    // A verified certificate whose SPIFFE ID no identity names: refused
    // as an unknown key, naming it.
    let stranger = pki.client(Some("spiffe://cluster.local/ns/other/sa/x"));
    let (status, body) = call(&stranger, &url, &[], "spiffe-unknown");
    assert_eq!(status, 401, "{body}");
    assert_eq!(body["error"]["type"], "authentication_error");
    assert_eq!(
        message(&body),
        "no virtual key, and no identity of the policy matches the caller (spiffe://cluster.local/ns/other/sa/x)"
    );
    let refused = gw.audit_record("spiffe-unknown");
    assert_eq!(
        (
            &refused["reason"],
            &refused["key_id"],
            &refused["principal"]
        ),
        (
            &json!("unknown_key"),
            &Value::Null,
            &json!("spiffe://cluster.local/ns/other/sa/x")
        )
    );

    // Without a client certificate: a virtual key still works over TLS,
    // and nothing at all is a missing key.
    let anonymous = pki.client(None);
    let (status, body) = call(&anonymous, &url, &[("x-api-key", KEY)], "tls-key");
    assert_eq!(status, 200, "{body}");
    assert_eq!(gw.audit_record("tls-key")["identified_by"], "key");
    let (status, body) = call(&anonymous, &url, &[], "tls-nothing");
    assert_eq!(status, 401);
    assert!(message(&body).starts_with("missing API key"), "{body}");

    // A certificate from another CA never reaches the filter.
    let rogue = Pki::new();
    let forged = reqwest::blocking::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(pki.ca.pem().as_bytes()).unwrap())
        .identity({
            let (cert, key) = rogue.leaf(
                SanType::URI(BILLING.try_into().unwrap()),
                ExtendedKeyUsagePurpose::ClientAuth,
            );
            reqwest::Identity::from_pem(format!("{cert}{key}").as_bytes()).unwrap()
        })
        .build()
        .unwrap();
    let sent = forged
        .post(format!("{url}/v1/messages"))
        .header("x-request-id", "rogue")
        .body(HAIKU)
        .send();
    assert!(sent.is_err(), "the handshake fails: {sent:?}");
}

#[test]
fn with_require_client_cert_a_client_without_a_certificate_is_refused_at_the_handshake() {
    let pki = Pki::new();
    let certs = tempfile::tempdir().unwrap();
    let gw = tls_gateway(&pki, &certs, &["--require-client-cert"]);
    let url = gw.base.replace("http://", "https://");
    let sent = pki
        .client(None)
        .post(format!("{url}/v1/messages"))
        .header("x-api-key", KEY)
        .body(HAIKU)
        .send();
    assert!(sent.is_err(), "no certificate, no connection: {sent:?}");
    let (status, body) = call(&pki.client(Some(BILLING)), &url, &[], "required-cert");
    assert_eq!(status, 200, "{body}");
    assert_eq!(gw.audit_record("required-cert")["key_id"], "billing-svc");
}

/// An ES256 key: signs JWTs and describes itself as a JWKS.
struct Signer {
    key: KeyPair,
    kid: &'static str,
}

impl Signer {
    fn new(kid: &'static str) -> Signer {
        Signer {
            key: KeyPair::generate().unwrap(),
            kid,
        }
    }

    fn jwks(&self) -> String {
        // Uncompressed P-256 point: 0x04, X, Y.
        let raw = self.key.public_key_raw();
        json!({ "keys": [ { "kty": "EC", "crv": "P-256", "alg": "ES256", "use": "sig",
            "kid": self.kid, "x": URL_SAFE_NO_PAD.encode(&raw[1..33]),
            "y": URL_SAFE_NO_PAD.encode(&raw[33..65]) } ] })
        .to_string()
    }

    fn sign(&self, claims: &Value) -> String {
        let header = json!({ "alg": "ES256", "typ": "JWT", "kid": self.kid });
        let input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let rng = ring::rand::SystemRandom::new();
        let pair = ring::signature::EcdsaKeyPair::from_pkcs8(
            &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
            &self.key.serialize_der(),
            &rng,
        )
        .unwrap();
        let sig = pair.sign(&rng, input.as_bytes()).unwrap();
        format!("{input}.{}", URL_SAFE_NO_PAD.encode(sig.as_ref()))
    }
}

fn claims(sub: &str, groups: &[&str]) -> Value {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    json!({ "iss": ISSUER, "sub": sub, "aud": "tollgate", "groups": groups,
            "iat": now, "exp": now + 600 })
}

#[test]
fn a_caller_with_only_a_verified_jwt_is_admitted_limited_and_audited_and_forgeries_are_not_trusted()
{
    let idp = Signer::new("idp-1");
    let certs = tempfile::tempdir().unwrap();
    let jwks = certs.path().join("jwks.json");
    std::fs::write(&jwks, idp.jwks()).unwrap();
    let gw = Gateway::start_with(
        &policy(),
        Options {
            extra_args: vec![
                "--jwt-issuer".into(),
                ISSUER.into(),
                "--jwt-jwks".into(),
                jwks.display().to_string(),
                "--jwt-audience".into(),
                "tollgate".into(),
            ],
            ..Options::default()
        },
    );
    let client = gw.client();
    let token = idp.sign(&claims("alice@example.com", &["eng", "finops"]));
    let bearer = format!("Bearer {token}");

    for i in 0..2 {
        let (status, body) = call(
            client,
            &gw.base,
            &[("authorization", &bearer)],
            &format!("jwt-{i}"),
        );
        assert_eq!(status, 200, "{body}");
    }
    let (status, body) = call(
        client,
        &gw.base,
        &[("authorization", &bearer)],
        "jwt-limited",
    );
    assert_eq!(status, 429, "{body}");
    assert!(
        message(&body)
            .starts_with("requests_per_minute limit of 2 reached for key:finops; retry in "),
        "{body}"
    );
    let first = gw.audit_record("jwt-0");
    assert_eq!(first["key_id"], "finops");
    assert_eq!(first["identified_by"], "jwt");
    assert_eq!(first["principal"], format!("{ISSUER}/alice@example.com"));
    assert_eq!(first["user"], "finops-analysts");
    assert_eq!(gw.audit_record("jwt-limited")["reason"], "rate_limited");
    // The token went no further than the gateway.
    let upstream = serde_json::to_string(&gw.mock_requests()).unwrap();
    assert!(!upstream.contains(&token), "the JWT reached the provider");

    // The same claims signed by a key the JWKS does not hold: jwt_authn
    // writes no payload, so the token is only an unknown virtual key.
    let forger = Signer::new("idp-1");
    let forged = format!(
        "Bearer {}",
        forger.sign(&claims("mallory@example.com", &["finops"]))
    );
    let (status, body) = call(
        client,
        &gw.base,
        &[("authorization", &forged)],
        "jwt-forged",
    );
    assert_eq!(
        (status, message(&body)),
        (401, "invalid x-api-key"),
        "{body}"
    );
    let refused = gw.audit_record("jwt-forged");
    assert_eq!(
        (
            &refused["reason"],
            &refused["key_id"],
            &refused["identified_by"]
        ),
        (&json!("unknown_key"), &Value::Null, &Value::Null)
    );

    // Claims in headers, as `claim_to_headers` would forward them, are not
    // evidence: only the metadata jwt_authn writes is.
    let payload = URL_SAFE_NO_PAD.encode(claims("mallory@example.com", &["finops"]).to_string());
    let (status, body) = call(
        client,
        &gw.base,
        &[
            ("x-jwt-payload", &payload),
            ("x-jwt-groups", "finops"),
            ("x-jwt-iss", ISSUER),
        ],
        "jwt-headers",
    );
    assert_eq!(status, 401, "{body}");
    assert!(message(&body).starts_with("missing API key"), "{body}");

    // A valid token of a caller no identity names: refused by principal.
    let bob = format!("Bearer {}", idp.sign(&claims("bob@example.com", &["eng"])));
    let (status, body) = call(client, &gw.base, &[("authorization", &bob)], "jwt-unknown");
    assert_eq!(status, 401, "{body}");
    assert_eq!(
        message(&body),
        format!("no virtual key, and no identity of the policy matches the caller (JWT {ISSUER}/bob@example.com)")
    );
    // A virtual key in Authorization is no JWT: it still opens its key.
    let (status, body) = call(
        client,
        &gw.base,
        &[("authorization", &format!("Bearer {KEY}"))],
        "jwt-key",
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(gw.audit_record("jwt-key")["key_id"], "laptop");
}
