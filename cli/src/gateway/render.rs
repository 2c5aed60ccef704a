//! Renders Envoy's configuration from the templates under `envoy/`: the
//! bootstrap, the ECDS resource carrying the policy, and the SDS secrets
//! carrying the real provider keys. Values are written as JSON strings,
//! which are valid YAML double-quoted scalars, so no value can break the
//! YAML structure.

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

const BOOTSTRAP: &str = include_str!("../../../envoy/bootstrap.yaml");
const TLS: &str = include_str!("../../../envoy/tls.yaml");
const ECDS: &str = include_str!("../../../envoy/ecds.yaml");
const SECRET: &str = include_str!("../../../envoy/secret.yaml");
const QUOTA: &str = include_str!("../../../envoy/quota.yaml");
const KEYS: &str = include_str!("../../../envoy/keys.yaml");
const LISTENER_TLS: &str = include_str!("../../../envoy/listener-tls.yaml");
const JWT: &str = include_str!("../../../envoy/jwt.yaml");

/// TLS on the listener, optionally verifying client certificates (mTLS):
/// the verified certificate's SPIFFE ID identifies the policy's "spiffe"
/// identities.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenerTls {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// CA bundle client certificates are verified against; `None`: no
    /// client certificate is asked for.
    pub client_ca: Option<PathBuf>,
    /// Refuse connections without a verified client certificate.
    pub require_client_cert: bool,
}

/// Envoy's `jwt_authn` with a local JWKS: the verified payload identifies
/// the policy's "jwt" identities.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JwtProvider {
    pub issuer: String,
    /// Accepted `aud` values; empty: `aud` is not checked.
    pub audiences: Vec<String>,
    pub jwks: PathBuf,
}

/// Where a provider's traffic goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upstream {
    /// Host name sent as `:authority` and SNI.
    pub host: String,
    pub address: String,
    pub port: u16,
    pub tls: bool,
}

impl Upstream {
    /// Parses `https://api.anthropic.com`, `http://127.0.0.1:9612`, ...
    pub fn parse(url: &str) -> Result<Upstream> {
        let (tls, rest) = if let Some(r) = url.strip_prefix("https://") {
            (true, r)
        } else if let Some(r) = url.strip_prefix("http://") {
            (false, r)
        } else {
            bail!("upstream {url:?} must start with http:// or https:// (or be `mock`)");
        };
        let authority = rest.split('/').next().unwrap_or_default();
        if rest.trim_end_matches('/') != authority {
            bail!(
                "upstream {url:?} must not have a path: Tollgate forwards the client's path as is"
            );
        }
        let (host, port) = match authority.rsplit_once(':') {
            Some((h, p)) => (
                h,
                p.parse::<u16>()
                    .with_context(|| format!("bad port in upstream {url:?}"))?,
            ),
            None => (authority, if tls { 443 } else { 80 }),
        };
        if host.is_empty() {
            bail!("upstream {url:?} has no host");
        }
        Ok(Upstream {
            host: host.to_string(),
            address: host.to_string(),
            port,
            tls,
        })
    }

    /// The mock provider on loopback.
    #[cfg(any(test, feature = "mock"))]
    pub fn local(port: u16) -> Upstream {
        Upstream {
            host: "127.0.0.1".to_string(),
            address: "127.0.0.1".to_string(),
            port,
            tls: false,
        }
    }

    fn is_ip(&self) -> bool {
        self.address.parse::<std::net::IpAddr>().is_ok()
    }
}

impl std::fmt::Display for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let scheme = if self.tls { "https" } else { "http" };
        write!(f, "{scheme}://{}:{}", self.host, self.port)
    }
}

/// Files of one gateway instance under its state directory.
#[derive(Debug, Clone)]
pub struct Layout {
    pub dir: PathBuf,
}

impl Layout {
    pub fn bootstrap(&self) -> PathBuf {
        self.dir.join("envoy.yaml")
    }
    pub fn ecds_dir(&self) -> PathBuf {
        self.dir.join("ecds")
    }
    pub fn ecds(&self) -> PathBuf {
        self.ecds_dir().join("tollgate.yaml")
    }
    pub fn secret(&self, provider: &str) -> PathBuf {
        self.dir.join("secrets").join(format!("{provider}.yaml"))
    }
    pub fn audit_log(&self) -> PathBuf {
        self.dir.join("audit.jsonl")
    }
    pub fn audit_db(&self) -> PathBuf {
        self.dir.join("audit.db")
    }
    pub fn envoy_log(&self) -> PathBuf {
        self.dir.join("envoy.log")
    }
    pub fn ready(&self) -> PathBuf {
        self.dir.join("ready.json")
    }
    /// The in-process collector's write token, for log shippers.
    pub fn collector_token(&self) -> PathBuf {
        self.dir.join("collector-token")
    }
}

/// Everything the bootstrap needs.
#[derive(Debug, Clone)]
pub struct Gateway {
    pub listen: std::net::SocketAddr,
    pub admin_port: u16,
    /// Collector host (IP or DNS name) and port.
    pub collector: (String, u16),
    pub anthropic: Upstream,
    /// Anthropic keys to fail over across, in order (1: no failover).
    pub anthropic_keys: usize,
    pub openai: Upstream,
    pub body_limit_bytes: u64,
    pub audit_flush_interval_ms: u64,
    pub stream_idle_timeout_s: u64,
    pub ca_bundle: PathBuf,
    /// The quota service's replicas (host, port), with limits shared by
    /// every Envoy through it; empty for limits in this Envoy alone.
    pub quota: Vec<(String, u16)>,
    /// TLS (and mTLS) on the listener; `None`: plain HTTP.
    pub listener_tls: Option<ListenerTls>,
    /// JWT verification before the filter; `None`: none.
    pub jwt: Option<JwtProvider>,
    /// The collector's write token, sent with Envoy's access-log stream;
    /// `None`: a collector that takes every write.
    pub collector_token: Option<String>,
    /// The key service; `None`: the keys travel in the filter configuration.
    pub keys: Option<std::net::SocketAddr>,
}

/// The Envoy cluster of the quota service in every configuration Tollgate
/// ships (`envoy/quota.yaml`, the Istio and Envoy Gateway manifests).
pub const QUOTA_CLUSTER: &str = "tollgate_quota";

/// The Envoy cluster of the key service.
pub const KEYS_CLUSTER: &str = "tollgate_keys";

/// The filter's VM configuration: deployment options, not policy. It must
/// stay byte-identical across policy reloads so Envoy keeps the VM (and
/// its shared-data balances).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmOptions {
    pub hold_request_headers: bool,
    /// Limits shared by every replica; `None`: this Envoy alone.
    pub shared: Option<SharedVm>,
    /// Keys from the key service on this cluster; `None`: from the policy.
    pub keys: Option<String>,
}

/// How the filter reaches the shared store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharedVm {
    /// The Envoy cluster of the quota service.
    pub cluster: String,
    /// How often each Envoy syncs its leases (ms); the quota service's
    /// `--sync-period-ms` must agree, since leases last three periods.
    pub sync_period_ms: u64,
}

impl VmOptions {
    pub fn json(&self) -> String {
        let mut v = serde_json::json!({ "hold_request_headers": self.hold_request_headers });
        if let (Some(shared), Some(obj)) = (&self.shared, v.as_object_mut()) {
            obj.insert(
                "shared".to_string(),
                serde_json::json!({ "cluster": shared.cluster, "sync_period_ms": shared.sync_period_ms }),
            );
        }
        if let (Some(cluster), Some(obj)) = (&self.keys, v.as_object_mut()) {
            obj.insert(
                "keys".to_string(),
                serde_json::json!({ "cluster": cluster, "path": crate::key_service::PATH }),
            );
        }
        v.to_string()
    }
}

fn q(s: &str) -> String {
    serde_json::Value::String(s.to_string()).to_string()
}

fn p(path: &Path) -> String {
    q(&path.to_string_lossy())
}

/// Replaces every `{{name}}`; fails on an unknown or leftover placeholder.
pub fn fill(template: &str, values: &[(&str, String)]) -> Result<String> {
    let mut out = String::with_capacity(template.len() + 1024);
    let mut rest = template;
    while let Some((before, after)) = rest.split_once("{{") {
        out.push_str(before);
        let (name, tail) = after
            .split_once("}}")
            .context("unterminated {{ in template")?;
        match values.iter().find(|(n, _)| *n == name) {
            Some((_, v)) => out.push_str(v),
            None => bail!("template placeholder {{{{{name}}}}} has no value"),
        }
        rest = tail;
    }
    out.push_str(rest);
    Ok(out)
}

fn tls_block(u: &Upstream, ca_bundle: &Path) -> Result<String> {
    if !u.tls {
        return Ok(String::new());
    }
    fill(TLS, &[("host", q(&u.host)), ("ca_bundle", p(ca_bundle))])
}

pub fn bootstrap(gw: &Gateway, layout: &Layout) -> Result<String> {
    let dns = |u: &Upstream| if u.is_ip() { "STATIC" } else { "LOGICAL_DNS" }.to_string();
    let failover =
        super::failover::placeholders(gw.anthropic_keys, gw.stream_idle_timeout_s, layout)?;
    let mut values = vec![
        ("admin_port", gw.admin_port.to_string()),
        ("listen_address", q(&gw.listen.ip().to_string())),
        ("listen_port", gw.listen.port().to_string()),
        ("body_limit_bytes", gw.body_limit_bytes.to_string()),
        ("stream_idle_timeout", gw.stream_idle_timeout_s.to_string()),
        (
            "audit_flush_interval",
            format!("{}s", gw.audit_flush_interval_ms as f64 / 1000.0),
        ),
        ("audit_log_path", p(&layout.audit_log())),
        ("openai_host", q(&gw.openai.host)),
        ("anthropic_host", q(&gw.anthropic.host)),
        ("ecds_path", p(&layout.ecds())),
        ("ecds_dir", p(&layout.ecds_dir())),
        ("anthropic_secret_path", p(&layout.secret("anthropic"))),
        ("openai_secret_path", p(&layout.secret("openai"))),
        ("anthropic_dns_type", dns(&gw.anthropic)),
        ("anthropic_address", q(&gw.anthropic.address)),
        ("anthropic_port", gw.anthropic.port.to_string()),
        ("anthropic_tls", tls_block(&gw.anthropic, &gw.ca_bundle)?),
        ("openai_dns_type", dns(&gw.openai)),
        ("openai_address", q(&gw.openai.address)),
        ("openai_port", gw.openai.port.to_string()),
        ("openai_tls", tls_block(&gw.openai, &gw.ca_bundle)?),
        ("collector_address", q(&gw.collector.0)),
        ("collector_port", gw.collector.1.to_string()),
        ("collector_dns_type", dns_type(&gw.collector.0)),
        ("quota_cluster", quota_cluster(&gw.quota)?),
        ("keys_cluster", keys_cluster(gw.keys)?),
        ("listener_tls", listener_tls(gw.listener_tls.as_ref())?),
        ("jwt_filter", jwt_filter(gw.jwt.as_ref())?),
        (
            "collector_auth",
            collector_auth(gw.collector_token.as_deref()),
        ),
    ];
    values.extend(failover);
    fill(BOOTSTRAP, &values)
}

/// The listener's TLS transport socket, or nothing for plain HTTP.
fn listener_tls(tls: Option<&ListenerTls>) -> Result<String> {
    let Some(tls) = tls else {
        return Ok(String::new());
    };
    let validation = match &tls.client_ca {
        Some(ca) => format!(
            "            validation_context:\n              trusted_ca: {{ filename: {} }}",
            p(ca)
        ),
        None => String::new(),
    };
    fill(
        LISTENER_TLS,
        &[
            (
                "require_client_certificate",
                tls.require_client_cert.to_string(),
            ),
            ("cert_path", p(&tls.cert)),
            ("key_path", p(&tls.key)),
            ("client_validation", validation),
        ],
    )
}

/// The access logger's `authorization` metadata for the collector's write
/// token, or nothing. (Envoy sends `initial_metadata` with the stream;
/// there is no secret reference for it, so the token sits in the
/// bootstrap, which only this state directory's owner reads.)
fn collector_auth(token: Option<&str>) -> String {
    token.map_or_else(String::new, |t| {
        format!(
            "                  initial_metadata: [{{ key: authorization, value: {} }}]",
            q(&format!("Bearer {t}"))
        )
    })
}

/// The `jwt_authn` filter, or nothing.
fn jwt_filter(jwt: Option<&JwtProvider>) -> Result<String> {
    let Some(jwt) = jwt else {
        return Ok(String::new());
    };
    let audiences = if jwt.audiences.is_empty() {
        String::new()
    } else {
        let list: Vec<String> = jwt.audiences.iter().map(|a| q(a)).collect();
        format!("                  audiences: [{}]", list.join(", "))
    };
    fill(
        JWT,
        &[
            ("jwt_issuer", q(&jwt.issuer)),
            ("jwt_audiences", audiences),
            ("jwks_path", p(&jwt.jwks)),
        ],
    )
}

/// STATIC for IP addresses, STRICT_DNS for names (every address a name
/// resolves to is an endpoint).
fn dns_type(host: &str) -> String {
    if host.parse::<std::net::IpAddr>().is_ok() {
        "STATIC"
    } else {
        "STRICT_DNS"
    }
    .to_string()
}

/// The `tollgate_quota` cluster, or nothing without a shared store.
fn quota_cluster(replicas: &[(String, u16)]) -> Result<String> {
    let Some((first, _)) = replicas.first() else {
        return Ok(String::new());
    };
    let endpoints: Vec<String> = replicas
        .iter()
        .map(|(host, port)| {
            format!(
                "        - endpoint:\n            address:\n              socket_address: {{ address: {}, port_value: {port} }}",
                q(host)
            )
        })
        .collect();
    fill(
        QUOTA,
        &[
            ("quota_cluster_name", QUOTA_CLUSTER.to_string()),
            ("quota_dns_type", dns_type(first)),
            ("quota_endpoints", endpoints.join("\n")),
        ],
    )
}

/// The `tollgate_keys` cluster, or nothing without a key service.
fn keys_cluster(at: Option<std::net::SocketAddr>) -> Result<String> {
    let Some(at) = at else {
        return Ok(String::new());
    };
    fill(
        KEYS,
        &[
            ("keys_cluster_name", KEYS_CLUSTER.to_string()),
            ("keys_address", q(&at.ip().to_string())),
            ("keys_port", at.port().to_string()),
        ],
    )
}

/// The ECDS resource: the wasm filter with the policy as its configuration.
/// `policy_json` must already have passed `tollgate_core::policy::compile`.
pub fn ecds(policy_json: &str, wasm: &Path, vm: &VmOptions) -> Result<String> {
    fill(
        ECDS,
        &[
            ("wasm_path", p(wasm)),
            ("vm_options_json", q(&vm.json())),
            ("policy_json", q(policy_json)),
            ("hold_request_headers", vm.hold_request_headers.to_string()),
        ],
    )
}

/// An SDS secret file for the credential injector. OpenAI expects the whole
/// `Authorization` value, so its secret is `Bearer <key>`.
pub fn secret(name: &str, value: &str) -> Result<String> {
    fill(
        SECRET,
        &[("secret_name", q(name)), ("secret_value", q(value))],
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_upstream_urls() {
        let u = Upstream::parse("https://api.anthropic.com").unwrap();
        assert_eq!(
            (u.host.as_str(), u.port, u.tls),
            ("api.anthropic.com", 443, true)
        );
        let u = Upstream::parse("http://127.0.0.1:9612/").unwrap();
        assert_eq!((u.host.as_str(), u.port, u.tls), ("127.0.0.1", 9612, false));
        assert_eq!(
            Upstream::parse("api.anthropic.com")
                .unwrap_err()
                .to_string(),
            "upstream \"api.anthropic.com\" must start with http:// or https:// (or be `mock`)"
        );
        assert!(Upstream::parse("https://x.com/v1").is_err());
    }

    #[test]
    fn fill_rejects_unknown_placeholders() {
        assert_eq!(fill("a {{x}} b", &[("x", "1".into())]).unwrap(), "a 1 b");
        assert_eq!(
            fill("a {{y}}", &[("x", "1".into())])
                .unwrap_err()
                .to_string(),
            "template placeholder {{y}} has no value"
        );
    }

    fn layout() -> Layout {
        Layout {
            dir: PathBuf::from("/tmp/tg"),
        }
    }

    /// A gateway for Anthropic over TLS and OpenAI on the local mock.
    fn test_gateway() -> Gateway {
        Gateway {
            listen: "127.0.0.1:8080".parse().unwrap(),
            admin_port: 9901,
            collector: ("127.0.0.1".to_string(), 9611),
            anthropic: Upstream::parse("https://api.anthropic.com").unwrap(),
            anthropic_keys: 1,
            openai: Upstream::local(9612),
            body_limit_bytes: 1 << 25,
            audit_flush_interval_ms: 1000,
            stream_idle_timeout_s: 600,
            ca_bundle: PathBuf::from("/etc/ssl/certs/ca-certificates.crt"),
            quota: Vec::new(),
            listener_tls: None,
            jwt: None,
            collector_token: None,
            keys: None,
        }
    }

    /// The bootstrap of [`test_gateway`].
    fn rendered_bootstrap() -> String {
        bootstrap(&test_gateway(), &layout()).unwrap()
    }

    #[test]
    fn every_template_renders_without_leftovers() {
        let b = rendered_bootstrap();
        assert!(b.contains("sni: \"api.anthropic.com\""));
        assert!(b.contains("port_value: 9612"));
        assert!(!b.contains("{{"));
        assert!(
            !b.contains("tollgate_quota"),
            "no shared store, no quota cluster"
        );
        let shared = bootstrap(
            &Gateway {
                quota: vec![("127.0.0.1".into(), 9614), ("127.0.0.2".into(), 9615)],
                ..test_gateway()
            },
            &layout(),
        )
        .unwrap();
        assert!(shared.contains("- name: tollgate_quota"));
        assert!(shared.contains("socket_address: { address: \"127.0.0.2\", port_value: 9615 }"));
        let vm = VmOptions {
            hold_request_headers: true,
            shared: None,
            keys: None,
        };
        let e = ecds(
            "{\"version\":1,\"keys\":[]}",
            Path::new("/x/tollgate.wasm"),
            &vm,
        )
        .unwrap();
        assert!(e.contains(r#"value: "{\"version\":1,\"keys\":[]}""#));
        assert!(e.contains("allow_on_headers_stop_iteration: true"));
        assert_eq!(
            VmOptions {
                shared: Some(SharedVm {
                    cluster: QUOTA_CLUSTER.into(),
                    sync_period_ms: 100
                }),
                ..vm.clone()
            }
            .json(),
            r#"{"hold_request_headers":true,"shared":{"cluster":"tollgate_quota","sync_period_ms":100}}"#
        );
        // A key service: its cluster, and the VM option naming it.
        assert!(
            !b.contains("tollgate_keys"),
            "no key service, no keys cluster"
        );
        let keyed = bootstrap(
            &Gateway {
                keys: Some("127.0.0.1:9616".parse().unwrap()),
                ..test_gateway()
            },
            &layout(),
        )
        .unwrap();
        assert!(keyed.contains("- name: tollgate_keys"));
        assert!(keyed.contains("socket_address: { address: \"127.0.0.1\", port_value: 9616 }"));
        assert_eq!(
            VmOptions {
                keys: Some(KEYS_CLUSTER.into()),
                ..vm.clone()
            }
            .json(),
            r#"{"hold_request_headers":true,"keys":{"cluster":"tollgate_keys","path":"/v1/keys"}}"#
        );
        let s = secret("openai_api_key", "Bearer sk-\"quoted\"").unwrap();
        assert!(s.contains(r#"inline_string: "Bearer sk-\"quoted\"""#));
    }

    #[test]
    fn listener_mtls_and_jwt_authn_render_only_when_asked() {
        let plain = rendered_bootstrap();
        assert!(!plain.contains("initial_metadata"), "no token, no metadata");
        let with_token = bootstrap(
            &Gateway {
                collector_token: Some("t0k3n".into()),
                ..test_gateway()
            },
            &layout(),
        )
        .unwrap();
        assert!(with_token.contains(
            "envoy_grpc: { cluster_name: tollgate_collector }\n                  initial_metadata: [{ key: authorization, value: \"Bearer t0k3n\" }]"
        ));
        assert!(!plain.contains("DownstreamTlsContext"));
        assert!(!plain.contains("jwt_authn"));
        let b = bootstrap(
            &Gateway {
                listener_tls: Some(ListenerTls {
                    cert: PathBuf::from("/certs/server.pem"),
                    key: PathBuf::from("/certs/server.key"),
                    client_ca: Some(PathBuf::from("/certs/ca.pem")),
                    require_client_cert: true,
                }),
                jwt: Some(JwtProvider {
                    issuer: "https://idp.example.com".into(),
                    audiences: vec!["tollgate".into(), "llm".into()],
                    jwks: PathBuf::from("/certs/jwks.json"),
                }),
                ..test_gateway()
            },
            &layout(),
        )
        .unwrap();
        for line in [
            "require_client_certificate: true",
            "- certificate_chain: { filename: \"/certs/server.pem\" }",
            "private_key: { filename: \"/certs/server.key\" }",
            "trusted_ca: { filename: \"/certs/ca.pem\" }",
            "issuer: \"https://idp.example.com\"",
            "audiences: [\"tollgate\", \"llm\"]",
            "filename: \"/certs/jwks.json\"",
            "payload_in_metadata: tollgate",
            "forward: false",
            "requires: { allow_missing_or_failed: {} }",
        ] {
            assert!(b.contains(line), "{line} in:\n{b}");
        }
        // TLS alone asks for no client certificate.
        let tls_only = listener_tls(Some(&ListenerTls {
            cert: PathBuf::from("/c.pem"),
            key: PathBuf::from("/k.pem"),
            client_ca: None,
            require_client_cert: false,
        }))
        .unwrap();
        assert!(!tls_only.contains("validation_context"), "{tls_only}");
        assert!(tls_only.contains("require_client_certificate: false"));
        // jwt_authn runs before the filter, which reads its metadata.
        let (jwt, filter) = (
            b.find("envoy.filters.http.jwt_authn").unwrap(),
            b.find("- name: tollgate").unwrap(),
        );
        assert!(jwt < filter);
    }

    #[test]
    fn bootstrap_normalises_paths_as_the_filter_classifies_them() {
        let b = rendered_bootstrap();
        // The same steps as tollgate_core::route::normalize, in the HCM.
        for setting in [
            "normalize_path: true",
            "merge_slashes: true",
            "path_with_escaped_slashes_action: REJECT_REQUEST",
        ] {
            assert_eq!(b.matches(setting).count(), 1, "{setting}");
        }
        // OpenAI's /v1/models: the header the filter's rule reads, absent.
        let header = tollgate_core::route::FAMILY_HEADER;
        assert!(b.contains(&format!(
            "- name: {header}\n                    present_match: false\n"
        )));
    }
}
