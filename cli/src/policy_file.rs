//! Policy files on disk: read and validate one for loading (the gateway,
//! `policy render`), or check several and say what is wrong, line by line
//! (`policy check`). Validation itself is `tollgate_core::policy::compile`.

use crate::clock::now_ms;
use std::path::Path;
use tollgate_core::policy;

/// A valid policy, ready to hand to Envoy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Loaded {
    /// The policy re-serialised compactly: the ECDS file then changes only
    /// when the policy does, not when its whitespace does.
    pub json: String,
    pub keys: usize,
}

/// Reads and validates a policy file; warnings go to stderr. On failure,
/// every error, each naming file, JSON path, value and reason.
pub fn load(path: &Path) -> Result<Loaded, Vec<String>> {
    let (policy, bytes) = compiled(path)?;
    let v: serde_json::Value = serde_json::from_slice(&bytes).map_err(|e| vec![e.to_string()])?;
    Ok(Loaded {
        json: v.to_string(),
        keys: policy.keys().len(),
    })
}

/// Reads and compiles a policy file: the policy and the bytes it came from.
/// Warnings go to stderr; errors as [`load`]'s.
pub fn compiled(path: &Path) -> Result<(policy::Policy, Vec<u8>), Vec<String>> {
    let bytes =
        std::fs::read(path).map_err(|e| vec![format!("{}: cannot read: {e}", path.display())])?;
    let name = path.display().to_string();
    match policy::compile(&bytes, &name, now_ms()) {
        Ok((policy, report)) => {
            for w in &report.warnings {
                eprintln!("warning: {w}");
            }
            Ok((policy, bytes))
        }
        Err(errors) => Err(errors.iter().map(|e| e.to_string()).collect()),
    }
}

/// [`compiled`] for a command that reads a policy: each error on stderr,
/// then one error saying how many.
pub fn open(path: &Path) -> anyhow::Result<(policy::Policy, Vec<u8>)> {
    compiled(path).map_err(|errors| {
        for e in &errors {
            eprintln!("{e}");
        }
        anyhow::anyhow!("policy {} has {} error(s)", path.display(), errors.len())
    })
}

/// What `policy check` says about one file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// Warnings and a summary, or every error and their count.
    pub lines: Vec<String>,
    pub ok: bool,
}

pub fn check(file: &Path) -> Verdict {
    let name = file.display().to_string();
    let bytes = match std::fs::read(file) {
        Ok(b) => b,
        Err(e) => {
            return Verdict {
                lines: vec![format!("{name}: cannot read: {e}")],
                ok: false,
            }
        }
    };
    match policy::compile(&bytes, &name, now_ms()) {
        Ok((p, report)) => {
            let mut lines: Vec<String> = report
                .warnings
                .iter()
                .map(|w| format!("warning: {w}"))
                .collect();
            let revoked = p.keys().iter().filter(|k| k.revoked).count();
            lines.push(format!(
                "{name}: OK: {} keys ({revoked} revoked), {} groups, {} pools, {} model patterns, {} warnings",
                p.keys().len(),
                p.groups.len(),
                p.pools.len(),
                p.model_patterns().len(),
                report.warnings.len()
            ));
            Verdict { lines, ok: true }
        }
        Err(errors) => {
            let mut lines: Vec<String> = errors.iter().map(ToString::to_string).collect();
            lines.push(format!("{name}: {} error(s)", errors.len()));
            Verdict { lines, ok: false }
        }
    }
}

/// Whether `text` would be a valid policy (named `name` in errors).
pub fn validate(text: &str, name: &str) -> Result<(), Vec<String>> {
    policy::compile(text.as_bytes(), name, now_ms())
        .map(|_| ())
        .map_err(|errors| errors.iter().map(ToString::to_string).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn load_compacts_and_counts_keys_and_check_summarises() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.json");
        std::fs::write(
            &path,
            "{\n  \"version\": 1,\n  \"keys\": [ {\"id\": \"a\", \"key_sha256\": \"0000000000000000000000000000000000000000000000000000000000000000\"} ]\n}\n",
        )
        .unwrap();
        let loaded = load(&path).unwrap();
        assert_eq!(
            loaded.json,
            r#"{"version":1,"keys":[{"id":"a","key_sha256":"0000000000000000000000000000000000000000000000000000000000000000"}]}"#
        );
        assert_eq!(loaded.keys, 1);
        let v = check(&path);
        assert!(v.ok);
        assert_eq!(
            v.lines,
            [format!(
                "{}: OK: 1 keys (0 revoked), 0 groups, 0 pools, 0 model patterns, 0 warnings",
                path.display()
            )]
        );
    }

    #[test]
    fn an_unreadable_file_is_one_error_naming_it() {
        let path = Path::new("/nonexistent/p.json");
        let errors = load(path).unwrap_err();
        assert_eq!(errors.len(), 1);
        assert!(
            errors[0].starts_with("/nonexistent/p.json: cannot read: "),
            "{errors:?}"
        );
        let v = check(path);
        assert!(!v.ok);
        assert_eq!(v.lines, errors);
    }
}
