//! Failover across several Anthropic keys (`tollgate run --anthropic-key-env`,
//! repeated): the bootstrap pieces that send Anthropic routes through one
//! internal listener per key (`envoy/key-listener.yaml`, each injecting its
//! own credential from its own SDS file) behind an aggregate cluster
//! (`envoy/key-failover.yaml`), and the route's retry of the provider's 429
//! and 529 on the next key. With one key none of it is rendered: the
//! bootstrap is the one every deployment uses.
//!
//! The wasm filter sees one request and the answer of the last attempt, so a
//! request served by the second key is admitted, charged and audited once.

use super::render::{fill, Layout};
use anyhow::Result;

const KEY_LISTENER: &str = include_str!("../../../envoy/key-listener.yaml");
const KEY_FAILOVER: &str = include_str!("../../../envoy/key-failover.yaml");

/// The provider's answers that another key may not get: its rate limit
/// (per organization or workspace, so per key when keys belong to different
/// ones) and overload.
const RETRIED_STATUSES: &str = "[429, 529]";

/// The SDS file stem and secret name of the `index`th Anthropic key; the
/// first keeps the names a single-key gateway has always used.
pub fn anthropic_secret(index: usize) -> (String, String) {
    match index {
        0 => ("anthropic".into(), "anthropic_api_key".into()),
        i => (format!("anthropic-{i}"), format!("anthropic_api_key_{i}")),
    }
}

/// The placeholders of `envoy/bootstrap.yaml` that failover fills, in the
/// order `(name, value)`; all empty (and the route on the plain `anthropic`
/// cluster) for a single key.
pub fn placeholders(
    keys: usize,
    stream_idle_timeout_s: u64,
    layout: &Layout,
) -> Result<Vec<(&'static str, String)>> {
    if keys < 2 {
        return Ok(vec![
            ("bootstrap_extensions", String::new()),
            ("anthropic_route_cluster", "anthropic".into()),
            ("anthropic_retry", String::new()),
            ("anthropic_key_listeners", String::new()),
            ("anthropic_key_clusters", String::new()),
        ]);
    }
    let names: Vec<String> = (0..keys).map(|i| format!("anthropic_key_{i}")).collect();
    let mut listeners = Vec::with_capacity(keys);
    let mut clusters = vec![fill(KEY_FAILOVER, &[("members", json(&names))])?];
    for (i, name) in names.iter().enumerate() {
        let (file, secret) = anthropic_secret(i);
        listeners.push(fill(
            KEY_LISTENER,
            &[
                ("name", q(name)),
                ("stream_idle_timeout", stream_idle_timeout_s.to_string()),
                ("secret_name", q(&secret)),
                ("secret_path", q(&layout.secret(&file).to_string_lossy())),
            ],
        )?);
        clusters.push(format!(
            "  - name: {n}\n    connect_timeout: 10s\n    load_assignment:\n      cluster_name: {n}\n      endpoints:\n      - lb_endpoints:\n        - endpoint:\n            address:\n              envoy_internal_address: {{ server_listener_name: {n} }}\n",
            n = q(name)
        ));
    }
    Ok(vec![
        (
            "bootstrap_extensions",
            "bootstrap_extensions:\n- name: envoy.bootstrap.internal_listener\n  typed_config:\n    \"@type\": type.googleapis.com/envoy.extensions.bootstrap.internal_listener.v3.InternalListener".into(),
        ),
        ("anthropic_route_cluster", "anthropic_keys".into()),
        ("anthropic_retry", retry(keys)),
        ("anthropic_key_listeners", listeners.concat()),
        ("anthropic_key_clusters", clusters.concat()),
    ])
}

/// The route's retries: each key once, in order. Envoy's default back-off
/// (25 ms base) is all the wait: the next key has its own limit.
fn retry(keys: usize) -> String {
    let indent = " ".repeat(18);
    [
        "retry_policy:".to_string(),
        "  retry_on: retriable-status-codes".into(),
        format!("  retriable_status_codes: {RETRIED_STATUSES}"),
        format!("  num_retries: {}", keys - 1),
        "  retry_priority:".into(),
        "    name: envoy.retry_priorities.previous_priorities".into(),
        "    typed_config:".into(),
        "      \"@type\": type.googleapis.com/envoy.extensions.retry.priority.previous_priorities.v3.PreviousPrioritiesConfig".into(),
        "      update_frequency: 1".into(),
    ]
    .iter()
    .map(|l| format!("{indent}{l}"))
    .collect::<Vec<_>>()
    .join("\n")
}

fn q(s: &str) -> String {
    serde_json::Value::String(s.to_string()).to_string()
}

fn json(names: &[String]) -> String {
    serde_json::Value::from(names.to_vec()).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    #[test]
    fn two_keys_render_a_listener_each_behind_an_aggregate_that_retries_429_and_529() {
        let layout = Layout {
            dir: PathBuf::from("/tmp/tg"),
        };
        let p = placeholders(2, 600, &layout).unwrap();
        let get = |name: &str| p.iter().find(|(n, _)| *n == name).unwrap().1.clone();
        assert_eq!(get("anthropic_route_cluster"), "anthropic_keys");
        assert!(get("anthropic_retry").contains("retriable_status_codes: [429, 529]"));
        assert!(get("anthropic_retry").contains("num_retries: 1"));
        let listeners = get("anthropic_key_listeners");
        assert!(listeners.contains("path: \"/tmp/tg/secrets/anthropic.yaml\""));
        assert!(listeners.contains("path: \"/tmp/tg/secrets/anthropic-1.yaml\""));
        assert!(listeners.contains("name: \"anthropic_api_key_1\""));
        assert!(get("anthropic_key_clusters")
            .contains("clusters: [\"anthropic_key_0\",\"anthropic_key_1\"]"));
        assert!(placeholders(1, 600, &layout)
            .unwrap()
            .iter()
            .all(|(n, v)| v.is_empty() || *n == "anthropic_route_cluster"));
    }
}
