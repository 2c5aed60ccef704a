//! Policy files on disk: read and validate one for loading (the gateway,
//! `policy render`), or check several and say what is wrong, line by line
//! (`policy check`). Validation itself is `tollgate_core::policy::compile`.
//!
//! A policy may include other files: `"include": ["provider-limits.json"]`,
//! paths relative to the policy file. An included file is an object of the
//! policy's named sections ([`INCLUDABLE`]): `tollgate limits pull` writes
//! `provider_pools` into one, so a refresh never rewrites the policy a
//! person edits. Includes are resolved here, before compiling: the filter
//! receives one document without `include` (wasm cannot open files, and a
//! filter handed an `include` refuses it as an unknown field). A name
//! defined twice, in the policy and an included file or in two included
//! files, is an error: nothing overrides silently. Errors in what an
//! included file brought name that file.

use crate::clock::now_ms;
use std::path::{Path, PathBuf};
use tollgate_core::policy::{self, schema::join, PolicyError};

/// The sections an included file may hold: the policy's maps of named
/// entries, which merge by name.
pub const INCLUDABLE: [&str; 4] = ["groups", "pools", "provider_pools", "prices"];

/// A valid policy, ready to hand to Envoy.
#[derive(Debug, Clone, PartialEq)]
pub struct Loaded {
    /// The policy re-serialised compactly, includes merged: the ECDS file
    /// then changes only when the policy does, not when its whitespace does.
    pub json: String,
    /// The same document, parsed (the key table is built from it).
    pub doc: serde_json::Value,
    pub keys: usize,
}

/// A policy file and the files it includes, as read from disk at one
/// moment: the gateway compares two readings to see an edit of any of them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sources {
    pub path: PathBuf,
    /// `None`: the file could not be read.
    pub bytes: Option<Vec<u8>>,
    /// Each included file, resolved against the policy's directory.
    pub included: Vec<(PathBuf, Option<Vec<u8>>)>,
}

/// Just the `include` list, read without building a DOM of the policy (a
/// large policy's keys are skipped, not stored).
#[derive(serde::Deserialize)]
struct IncludeList {
    #[serde(default)]
    include: Option<serde_json::Value>,
}

/// The file names of `include` (`None` when the policy has none), when it
/// is a list of them. A document that is not JSON has none: the compiler
/// says what is wrong with it.
fn include_names(bytes: &[u8]) -> Result<Option<Vec<String>>, String> {
    let Ok(IncludeList { include }) = serde_json::from_slice(bytes) else {
        return Ok(None);
    };
    match include {
        None => Ok(None),
        Some(serde_json::Value::Array(items)) => items
            .iter()
            .map(|i| match i.as_str() {
                Some(s) if !s.trim().is_empty() => Ok(s.to_string()),
                _ => Err(format!(
                    "include: expected a list of file names, found {i} in it"
                )),
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Some),
        Some(other) => Err(format!(
            "include: expected a list of file names, found {other}"
        )),
    }
}

/// Reads a policy file and every file it includes.
pub fn read(path: &Path) -> Sources {
    resolve(path, std::fs::read(path).ok())
}

/// Notices edits of a policy file and of the files it includes, for the
/// watchers that apply them (the gateway's, the alerts', the key
/// service's): each look is a `stat` per file, and the files are read only
/// when one changed (a 100,000-key policy is 17 MB).
pub struct Watch {
    path: PathBuf,
    seen: Option<Sources>,
    stamps: Vec<Stamp>,
}

impl Watch {
    /// Nothing seen yet: the first look reads the files.
    pub fn new(path: &Path) -> Watch {
        Watch {
            path: path.to_path_buf(),
            seen: None,
            stamps: Vec::new(),
        }
    }

    /// `seen` is what the caller already applied.
    pub fn seeing(path: &Path, seen: Sources) -> Watch {
        Watch {
            seen: Some(seen),
            ..Watch::new(path)
        }
    }

    /// The files as they are now, if they changed since last seen. A file
    /// briefly missing mid-save is not a change.
    pub fn changed(&mut self) -> Option<&Sources> {
        let looked = self.seen.as_ref().map(Sources::stamps);
        if looked.as_ref().is_some_and(|l| *l == self.stamps) {
            return None;
        }
        self.stamps = looked.unwrap_or_default();
        let current = read(&self.path);
        if current.bytes.is_none() || self.seen.as_ref() == Some(&current) {
            return None;
        }
        self.seen = Some(current);
        self.seen.as_ref()
    }
}

/// A policy's text as `path` and the files it includes, read from beside it.
fn resolve(path: &Path, bytes: Option<Vec<u8>>) -> Sources {
    let dir = path.parent().unwrap_or(Path::new("."));
    let included = bytes
        .as_deref()
        .and_then(|b| include_names(b).ok().flatten())
        .unwrap_or_default()
        .into_iter()
        .map(|name| {
            let p = dir.join(name);
            let b = std::fs::read(&p).ok();
            (p, b)
        })
        .collect();
    Sources {
        path: path.to_path_buf(),
        bytes,
        included,
    }
}

/// What a `stat` says of a file: size, modification time, inode. A
/// watcher reads a file again only when its stamp changed (a 100,000-key
/// policy is 17 MB).
pub type Stamp = Option<(u64, Option<std::time::SystemTime>, u64)>;

pub fn stamp(path: &Path) -> Stamp {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some((m.len(), m.modified().ok(), m.ino()))
}

impl Sources {
    /// The stamps of the policy file and of the files it included when
    /// read: unchanged, reading them again would find the same bytes.
    pub fn stamps(&self) -> Vec<Stamp> {
        self.paths().iter().map(|p| stamp(p)).collect()
    }

    /// The policy file and the files it included when read.
    pub fn paths(&self) -> Vec<PathBuf> {
        std::iter::once(self.path.clone())
            .chain(self.included.iter().map(|(p, _)| p.clone()))
            .collect()
    }

    /// [`Sources::compiled`] without printing warnings, for a reader that
    /// reads the policy again and again (the dashboard's burn-down), where
    /// the gateway already said them once.
    pub fn compiled_quietly(&self) -> Result<policy::Policy, Vec<String>> {
        self.compile().map(|(policy, _, _)| policy)
    }

    /// Whether `file` is one of the included files.
    pub fn includes(&self, file: &Path) -> bool {
        let canonical = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
        let file = canonical(file);
        self.included.iter().any(|(p, _)| canonical(p) == file)
    }

    fn name(&self) -> String {
        self.path.display().to_string()
    }

    /// The policy with its includes merged: one document (bytes as read
    /// when nothing is included, so a large policy takes the compiler's
    /// streaming path), and where each included entry came from.
    fn merged(&self) -> Result<(Vec<u8>, Origins), Vec<String>> {
        let name = self.name();
        let bytes = self.bytes.as_ref().ok_or_else(|| {
            let e = std::fs::read(&self.path).err();
            vec![format!(
                "{name}: cannot read: {}",
                e.map_or("missing".to_string(), |e| e.to_string())
            )]
        })?;
        if include_names(bytes)
            .map_err(|e| vec![format!("{name}: {e}")])?
            .is_none()
        {
            return Ok((bytes.clone(), Origins::default()));
        }
        let mut doc: serde_json::Value = serde_json::from_slice(bytes)
            .map_err(|e| vec![format!("{name}: $: invalid JSON: {e}")])?;
        let Some(main) = doc.as_object_mut() else {
            return Ok((bytes.clone(), Origins::default()));
        };
        main.remove("include");
        let mut origins = Origins::default();
        let mut errors = Vec::new();
        for (path, bytes) in &self.included {
            let file = path.display().to_string();
            let Some(bytes) = bytes else {
                let e = std::fs::read(path).err();
                errors.push(format!(
                    "{file}: cannot read (included by {name}): {}",
                    e.map_or("missing".to_string(), |e| e.to_string())
                ));
                continue;
            };
            let part: serde_json::Value = match serde_json::from_slice(bytes) {
                Ok(v) => v,
                Err(e) => {
                    errors.push(format!("{file}: $: invalid JSON: {e}"));
                    continue;
                }
            };
            let Some(part) = part.as_object() else {
                errors.push(format!(
                    "{file}: $: an included file is an object of sections ({})",
                    INCLUDABLE.join(", ")
                ));
                continue;
            };
            for (section, entries) in part {
                if !INCLUDABLE.contains(&section.as_str()) {
                    errors.push(format!(
                        "{file}: {section}: included files hold only {} (the rest belongs in {name})",
                        INCLUDABLE.join(", ")
                    ));
                    continue;
                }
                let Some(entries) = entries.as_object() else {
                    errors.push(format!("{file}: {section}: expected an object"));
                    continue;
                };
                let target = main
                    .entry(section.clone())
                    .or_insert_with(|| serde_json::Value::Object(Default::default()));
                let Some(target) = target.as_object_mut() else {
                    // The policy's own section has the wrong type: the
                    // compiler reports it at its path.
                    continue;
                };
                for (entry, value) in entries {
                    let at = join(section, entry);
                    if target.contains_key(entry) {
                        let first = origins.file_of(&at).unwrap_or(&name).to_string();
                        errors.push(format!(
                            "{file}: {at}: already defined in {first}: an included file adds entries, it never replaces one"
                        ));
                        continue;
                    }
                    target.insert(entry.clone(), value.clone());
                    origins.0.push((at, file.clone()));
                }
            }
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        serde_json::to_vec(&doc)
            .map(|b| (b, origins))
            .map_err(|e| vec![format!("{name}: {e}")])
    }

    /// Compiles the merged policy; warnings go to stderr. On failure, every
    /// error, each naming file, JSON path, value and reason.
    pub fn compiled(&self) -> Result<(policy::Policy, Vec<u8>), Vec<String>> {
        let (policy, report, bytes) = self.compile()?;
        for w in &report.warnings {
            eprintln!("warning: {w}");
        }
        Ok((policy, bytes))
    }

    fn compile(&self) -> Result<(policy::Policy, policy::PolicyReport, Vec<u8>), Vec<String>> {
        let document = self.document()?;
        let (policy, report) = document.compile()?;
        Ok((policy, report, document.bytes))
    }

    /// The merged document, merged once for every check and parse of it.
    pub fn document(&self) -> Result<Document, Vec<String>> {
        let (bytes, origins) = self.merged()?;
        Ok(Document {
            name: self.name(),
            bytes,
            origins,
        })
    }

    /// The merged policy as Envoy gets it.
    pub fn load(&self) -> Result<Loaded, Vec<String>> {
        let document = self.document()?;
        // The checks and the parse that the key table and the filter
        // configuration are made from, side by side: each takes about half
        // of loading a 100,000-key policy.
        let (keys, doc) = std::thread::scope(|s| {
            let doc = s.spawn(|| document.parse());
            (document.check(), doc.join())
        });
        let keys = keys?;
        let doc = doc.map_err(|_| vec!["parsing the policy failed".to_string()])??;
        Ok(Loaded {
            json: doc.to_string(),
            doc,
            keys,
        })
    }
}

/// A policy document with its includes merged ([`Sources::document`]).
pub struct Document {
    name: String,
    bytes: Vec<u8>,
    origins: Origins,
}

impl Document {
    fn compile(&self) -> Result<(policy::Policy, policy::PolicyReport), Vec<String>> {
        policy::compile(&self.bytes, &self.name, now_ms()).map_err(|errors| {
            errors
                .into_iter()
                .map(|e| self.origins.attribute(e).to_string())
                .collect()
        })
    }

    /// Every check of the policy, its warnings printed; the number of keys.
    pub fn check(&self) -> Result<usize, Vec<String>> {
        let (policy, report) = self.compile()?;
        for w in &report.warnings {
            eprintln!("warning: {w}");
        }
        Ok(policy.keys().len())
    }

    /// [`Document::parse`] without the keys (skipped, not built): what the
    /// filter configuration carries with a key service.
    pub fn parse_base(&self) -> Result<serde_json::Value, Vec<String>> {
        tollgate_core::policy::table::base_document(&self.bytes)
            .map_err(|e| vec![format!("{}: {e}", self.name)])
    }

    /// The document as JSON, not checked: see [`Document::check`].
    pub fn parse(&self) -> Result<serde_json::Value, Vec<String>> {
        serde_json::from_slice(&self.bytes).map_err(|e| vec![format!("{}: {e}", self.name)])
    }
}

/// Which included file each merged entry came from, by its JSON path
/// (`provider_pools["provider:anthropic:claude-sonnet-4"]`).
#[derive(Debug, Default)]
struct Origins(Vec<(String, String)>);

impl Origins {
    fn file_of(&self, at: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(path, _)| path == at)
            .map(|(_, f)| f.as_str())
    }

    /// The error, naming the included file whose entry it is about.
    fn attribute(&self, mut e: PolicyError) -> PolicyError {
        let from = self.0.iter().find(|(at, _)| {
            e.path
                .strip_prefix(at.as_str())
                .is_some_and(|rest| rest.is_empty() || rest.starts_with(['.', '[']))
        });
        if let Some((_, file)) = from {
            e.file = file.clone();
        }
        e
    }
}

/// Reads and validates a policy file and its includes; warnings go to
/// stderr. On failure, every error, each naming file, JSON path, value and
/// reason.
pub fn load(path: &Path) -> Result<Loaded, Vec<String>> {
    read(path).load()
}

/// Reads and compiles a policy file (includes merged): the policy and the
/// bytes it came from. Warnings go to stderr; errors as [`load`]'s.
pub fn compiled(path: &Path) -> Result<(policy::Policy, Vec<u8>), Vec<String>> {
    read(path).compiled()
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
    let sources = read(file);
    if sources.bytes.is_none() {
        // One line says it all: there is nothing to count errors in.
        return Verdict {
            lines: sources.merged().err().unwrap_or_default(),
            ok: false,
        };
    }
    match sources.compile() {
        Ok((p, report, _)) => {
            let mut lines: Vec<String> = report
                .warnings
                .iter()
                .map(|w| format!("warning: {w}"))
                .collect();
            let revoked = p.keys().iter().filter(|k| k.revoked).count();
            let provider = match p.provider_pools.len() {
                0 => String::new(),
                n => format!(" ({n} provider)"),
            };
            let identities = match p.identities().len() {
                0 => String::new(),
                n => format!(", {n} identities"),
            };
            lines.push(format!(
                "{name}: OK: {} keys ({revoked} revoked){identities}, {} groups, {} pools{provider}, {} model patterns, {} warnings",
                p.keys().len(),
                p.groups.len(),
                p.pools.len() + p.provider_pools.len(),
                p.model_patterns().len(),
                report.warnings.len()
            ));
            Verdict { lines, ok: true }
        }
        Err(errors) => {
            let mut lines = errors.clone();
            lines.push(format!("{name}: {} error(s)", errors.len()));
            Verdict { lines, ok: false }
        }
    }
}

/// Whether `text` would be a valid policy at `path` (its includes read
/// from beside it).
pub fn validate(text: &str, path: &Path) -> Result<(), Vec<String>> {
    resolve(path, Some(text.as_bytes().to_vec()))
        .compile()
        .map(|_| ())
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

    const LIMITS: &str = r#"{"provider_pools": {"provider:anthropic:claude-sonnet-4": {
        "models": ["claude-sonnet-4-5"], "limits": {"requests_per_minute": 4000}}}}"#;

    #[test]
    fn included_sections_merge_into_one_document_without_include() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("policy.json");
        std::fs::write(
            &path,
            r#"{"version": 1, "include": ["provider-limits.json"], "pools": {"team:a": {"requests_per_minute": 5}}}"#,
        )
        .unwrap();
        std::fs::write(dir.path().join("provider-limits.json"), LIMITS).unwrap();
        let loaded = load(&path).unwrap();
        let v: serde_json::Value = serde_json::from_str(&loaded.json).unwrap();
        assert_eq!(v.get("include"), None, "the filter never sees include");
        assert_eq!(
            v["provider_pools"]["provider:anthropic:claude-sonnet-4"]["limits"]
                ["requests_per_minute"],
            4000
        );
        assert_eq!(v["pools"]["team:a"]["requests_per_minute"], 5);
        let verdict = check(&path);
        assert!(
            verdict.lines[0]
                .ends_with("0 groups, 2 pools (1 provider), 0 model patterns, 0 warnings"),
            "{verdict:?}"
        );
        // Reading again is equal until an included file changes.
        let before = read(&path);
        assert_eq!(read(&path), before);
        std::fs::write(
            dir.path().join("provider-limits.json"),
            LIMITS.replace("4000", "3000"),
        )
        .unwrap();
        assert_ne!(read(&path), before);
    }

    #[test]
    fn include_errors_name_the_included_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("policy.json");
        let limits = dir.path().join("provider-limits.json");
        let name = |p: &Path| p.display().to_string();
        std::fs::write(
            &path,
            r#"{"version": 1, "include": ["provider-limits.json"],
                "provider_pools": {"provider:anthropic:claude-haiku-4-5": {"models": ["claude-haiku-4-5"], "limits": {"requests_per_minute": 1}}}}"#,
        )
        .unwrap();
        let errors = load(&path).unwrap_err();
        assert_eq!(
            errors,
            [format!(
                "{}: cannot read (included by {}): No such file or directory (os error 2)",
                name(&limits),
                name(&path)
            )]
        );
        // A bad value is reported in the file it came from.
        std::fs::write(&limits, LIMITS.replace("4000", "0")).unwrap();
        let errors = load(&path).unwrap_err();
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(
            errors[0].starts_with(&format!(
                "{}: provider_pools[\"provider:anthropic:claude-sonnet-4\"].limits.requests_per_minute: must be a positive whole number",
                name(&limits)
            )),
            "{errors:?}"
        );
        // Nothing overrides silently; sections outside the named maps stay in the policy.
        std::fs::write(
            &limits,
            r#"{"provider_pools": {"provider:anthropic:claude-haiku-4-5": {"models": ["x"], "limits": {}}},
                "settings": {"time_zone": "UTC"}}"#,
        )
        .unwrap();
        assert_eq!(
            load(&path).unwrap_err(),
            [
                format!("{}: provider_pools[\"provider:anthropic:claude-haiku-4-5\"]: already defined in {}: an included file adds entries, it never replaces one", name(&limits), name(&path)),
                format!("{}: settings: included files hold only groups, pools, provider_pools, prices (the rest belongs in {})", name(&limits), name(&path)),
            ]
        );
        std::fs::write(
            &path,
            r#"{"version": 1, "include": "provider-limits.json"}"#,
        )
        .unwrap();
        assert_eq!(
            load(&path).unwrap_err(),
            [format!(
                "{}: include: expected a list of file names, found \"provider-limits.json\"",
                name(&path)
            )]
        );
    }

    #[test]
    fn validate_reads_the_includes_beside_the_policy() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("policy.json");
        std::fs::write(dir.path().join("provider-limits.json"), LIMITS).unwrap();
        let text = r#"{"version": 1, "include": ["provider-limits.json"]}"#;
        assert_eq!(validate(text, &path), Ok(()));
        let dup = r#"{"version": 1, "include": ["provider-limits.json", "provider-limits.json"]}"#;
        assert_eq!(validate(dup, &path).unwrap_err().len(), 1);
    }
}
