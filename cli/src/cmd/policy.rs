//! `tollgate policy check|render|schema`: validate policies with precise
//! errors, render what a proxy loads, print the JSON Schema.

use crate::gateway::render;
use crate::output::Output;
use crate::{mesh, policy_file};
use anyhow::{bail, Result};
use std::io::Write;
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct PolicyArgs {
    #[command(subcommand)]
    command: PolicyCommand,
}

#[derive(clap::Subcommand, Debug)]
enum PolicyCommand {
    /// Validate policy files: every error on its own line (file, JSON path, value, reason); exit 1 on any error.
    Check {
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Print what a proxy loads: the ECDS resource (Envoy), a WasmPlugin (Istio)
    /// or an EnvoyExtensionPolicy (Envoy Gateway) carrying this policy.
    Render {
        file: PathBuf,
        #[arg(long, value_enum, default_value = "ecds")]
        format: RenderFormat,
        /// OCI image of tollgate.wasm (`tollgate package`), for istio and envoy-gateway.
        #[arg(long, default_value = concat!("ghcr.io/tollgate-proxy/tollgate:", env!("CARGO_PKG_VERSION")))]
        image: String,
        /// Namespace of the rendered resource.
        #[arg(long, default_value = "istio-system")]
        namespace: String,
        /// Istio: workloads selected by this label (key=value); Envoy Gateway: the Gateway's name.
        #[arg(long, default_value = "istio=ingressgateway")]
        target: String,
        /// Path of tollgate.wasm as Envoy will see it.
        #[arg(long, default_value = "target/tollgate.wasm")]
        wasm: PathBuf,
        /// Hold request headers until the body decision (needs Envoy >= 1.35 and a raw Envoy config).
        #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
        hold_request_headers: bool,
        /// Share limits with the other replicas through the quota service behind this Envoy
        /// cluster (`tollgate_quota` in the shipped manifests; docs/deploy.md).
        #[arg(long, value_parser = clap::builder::NonEmptyStringValueParser::new())]
        quota_cluster: Option<String>,
        /// With --quota-cluster: how often each Envoy syncs its leases (ms). The quota
        /// service's --sync-period-ms must be the same.
        #[arg(long, default_value_t = 100, requires = "quota_cluster", value_parser = clap::value_parser!(u64).range(1..))]
        sync_period_ms: u64,
        /// Leave the keys out: the filter fetches them from the key service
        /// (`tollgate collector --serve-keys`) behind this Envoy cluster (`tollgate_keys` in the
        /// shipped manifests). Needed for key sets too large for a Kubernetes object
        /// (docs/keys-at-scale.md).
        #[arg(long, value_parser = clap::builder::NonEmptyStringValueParser::new())]
        key_service_cluster: Option<String>,
    },
    /// Print the policy JSON Schema (policies/schema.json).
    Schema,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum RenderFormat {
    /// Envoy ECDS resource (what `tollgate run` writes).
    Ecds,
    /// Istio WasmPlugin.
    Istio,
    /// Envoy Gateway EnvoyExtensionPolicy.
    EnvoyGateway,
}

pub fn run(args: PolicyArgs) -> Result<()> {
    let mut out = Output::stdout();
    match args.command {
        PolicyCommand::Check { files } => {
            let mut failed = 0;
            for file in &files {
                let verdict = policy_file::check(file);
                for line in &verdict.lines {
                    writeln!(out, "{line}")?;
                }
                failed += usize::from(!verdict.ok);
            }
            out.flush()?;
            if failed > 0 {
                bail!("{failed} of {} policy file(s) invalid", files.len());
            }
        }
        PolicyCommand::Render {
            file,
            format,
            image,
            namespace,
            target,
            wasm,
            hold_request_headers,
            quota_cluster,
            sync_period_ms,
            key_service_cluster,
        } => {
            let json = match policy_file::load(&file) {
                Ok(loaded) => {
                    crate::gateway::reload::configured(&loaded, key_service_cluster.is_some())
                }
                Err(errors) => {
                    for e in &errors {
                        eprintln!("{e}");
                    }
                    bail!(
                        "policy {} has {} error(s); nothing rendered",
                        file.display(),
                        errors.len()
                    );
                }
            };
            let vm = render::VmOptions {
                hold_request_headers,
                shared: quota_cluster.map(|cluster| render::SharedVm {
                    cluster,
                    sync_period_ms,
                }),
                keys: key_service_cluster,
            };
            let text = match format {
                RenderFormat::Ecds => {
                    let wasm = std::fs::canonicalize(&wasm).unwrap_or(wasm);
                    render::ecds(&json, &wasm, &vm)?
                }
                RenderFormat::Istio => mesh::istio(&json, &image, &namespace, &target, &vm)?,
                RenderFormat::EnvoyGateway => {
                    mesh::envoy_gateway(&json, &image, &namespace, &target, &vm)?
                }
            };
            out.write_all(text.as_bytes())?;
        }
        PolicyCommand::Schema => writeln!(
            out,
            "{}",
            serde_json::to_string_pretty(&tollgate_core::policy::schema::json_schema())?
        )?,
    }
    out.flush()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use serde_json::Value;
    use tollgate_core::policy::{compile, schema::json_schema};

    const SCHEMA_FILE: &str = include_str!("../../../policies/schema.json");
    const REJECTED: &str = include_str!("../../../policies/tests/rejected.json");

    fn examples() -> Vec<(String, String)> {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../policies");
        let mut out: Vec<(String, String)> = std::fs::read_dir(dir)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            // Policies only: not the schema, nor the shipped price table
            // (its own format, held valid by the core's table tests).
            .filter(|p| {
                p.extension().is_some_and(|x| x == "json")
                    && !p.ends_with("schema.json")
                    && !p.ends_with("prices.json")
            })
            .map(|p| {
                (
                    p.display().to_string(),
                    std::fs::read_to_string(&p).unwrap(),
                )
            })
            .collect();
        out.sort();
        out
    }

    #[test]
    fn committed_schema_matches_the_parser_definition() {
        let committed: Value = serde_json::from_str(SCHEMA_FILE).unwrap();
        assert_eq!(
            committed,
            json_schema(),
            "policies/schema.json is stale: run `tollgate policy schema > policies/schema.json`"
        );
    }

    #[test]
    fn schema_and_parser_agree_on_examples_and_rejected_cases() {
        let validator = jsonschema::validator_for(&json_schema()).unwrap();
        let examples = examples();
        assert!(!examples.is_empty());
        for (name, text) in &examples {
            let v: Value = serde_json::from_str(text).unwrap();
            assert!(validator.is_valid(&v), "schema rejects example {name}");
            assert!(
                compile(text.as_bytes(), name, 0).is_ok(),
                "parser rejects example {name}"
            );
        }
        let cases: Vec<Value> = serde_json::from_str(REJECTED).unwrap();
        for case in &cases {
            let name = case["name"].as_str().unwrap();
            let Some(policy) = case.get("policy") else {
                continue;
            };
            assert!(
                compile(policy.to_string().as_bytes(), "policy.json", 0).is_err(),
                "parser accepts {name}"
            );
            // Cross-reference rules (duplicates, unknown groups, calendar
            // dates) are beyond JSON Schema; the case file says which.
            let schema_rejects = case["schema_rejects"].as_bool().unwrap();
            assert_eq!(
                !validator.is_valid(policy),
                schema_rejects,
                "schema and case file disagree on {name}"
            );
        }
    }
}
