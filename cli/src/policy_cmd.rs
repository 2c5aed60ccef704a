//! `tollgate policy check|render|schema`: validate policies with precise
//! errors, render the ECDS resource Envoy loads, print the JSON Schema.

use crate::run::{self, render};
use anyhow::{bail, Result};
use std::path::PathBuf;
use tollgate_core::policy;

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
    /// Print the ECDS resource (the wasm filter with this policy) that Envoy loads.
    Render {
        file: PathBuf,
        /// Path of tollgate.wasm as Envoy will see it.
        #[arg(long, default_value = "target/tollgate.wasm")]
        wasm: PathBuf,
        /// Hold request headers until the body decision (needs Envoy >= 1.35 and a raw Envoy config).
        #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
        hold_request_headers: bool,
    },
    /// Print the policy JSON Schema (policies/schema.json).
    Schema,
}

pub fn run(args: PolicyArgs) -> Result<()> {
    match args.command {
        PolicyCommand::Check { files } => check(&files),
        PolicyCommand::Render {
            file,
            wasm,
            hold_request_headers,
        } => {
            let json = match run::load_policy(&file) {
                Ok((json, _)) => json,
                Err(errors) => fail(&errors),
            };
            let wasm = std::fs::canonicalize(&wasm).unwrap_or(wasm);
            print!("{}", render::ecds(&json, &wasm, hold_request_headers)?);
            Ok(())
        }
        PolicyCommand::Schema => {
            println!(
                "{}",
                serde_json::to_string_pretty(&policy::schema::json_schema())?
            );
            Ok(())
        }
    }
}

fn fail(errors: &[String]) -> ! {
    for e in errors {
        eprintln!("{e}");
    }
    std::process::exit(1);
}

fn check(files: &[PathBuf]) -> Result<()> {
    let mut failed = 0;
    for file in files {
        let name = file.display().to_string();
        let bytes = match std::fs::read(file) {
            Ok(b) => b,
            Err(e) => {
                println!("{name}: cannot read: {e}");
                failed += 1;
                continue;
            }
        };
        match policy::compile(&bytes, &name, run::now_ms()) {
            Ok((p, report)) => {
                for w in &report.warnings {
                    println!("warning: {w}");
                }
                let revoked = p.keys().iter().filter(|k| k.revoked).count();
                println!(
                    "{name}: OK: {} keys ({revoked} revoked), {} groups, {} pools, {} model patterns, {} warnings",
                    p.keys().len(),
                    p.groups.len(),
                    p.pools.len(),
                    p.model_patterns().len(),
                    report.warnings.len()
                );
            }
            Err(errors) => {
                for e in &errors {
                    println!("{e}");
                }
                println!("{name}: {} error(s)", errors.len());
                failed += 1;
            }
        }
    }
    if failed > 0 {
        bail!("{failed} of {} policy file(s) invalid", files.len());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use serde_json::Value;
    use tollgate_core::policy::{compile, schema::json_schema};

    const SCHEMA_FILE: &str = include_str!("../../policies/schema.json");
    const REJECTED: &str = include_str!("../../policies/tests/rejected.json");

    fn examples() -> Vec<(String, String)> {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../policies");
        let mut out: Vec<(String, String)> = std::fs::read_dir(dir)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "json") && !p.ends_with("schema.json"))
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
