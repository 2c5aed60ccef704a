//! Policy edits while the gateway runs: the policy file and every file it
//! includes (`provider-limits.json`, rewritten by `tollgate limits pull` or
//! the refresh of `tollgate run`) are polled, a valid edit of any of them is
//! rendered into the ECDS file Envoy watches (Envoy then swaps the filter
//! configuration for new requests, no restart), and an invalid one is
//! reported and ignored, so the previous policy stays live. With a key
//! service, the ECDS file carries the policy without its keys and changes
//! only when something else does; the keys go to the key table
//! ([`crate::key_service`]), which sends Envoy only the keys that changed.

use super::render::{self, Layout};
use crate::key_service::KeyTable;
use crate::output::status;
use crate::{atomic_file, policy_file};
use anyhow::Result;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tollgate_core::policy::table;

/// How often the policy file is looked at. Polling, not inotify: editors
/// replace files by rename and Kubernetes swaps ConfigMap symlinks, which
/// file watches miss or report twice. A look is a `stat` of each file; the
/// files are read only when one changed (a 100,000-key policy is 17 MB).
pub const EVERY: Duration = Duration::from_millis(100);

pub struct PolicyWatch {
    path: PathBuf,
    wasm: PathBuf,
    vm: render::VmOptions,
    layout: Layout,
    /// With a key service: the table it serves, which takes every edit's
    /// keys; the ECDS file then carries the policy without them.
    keys: Option<KeyTable>,
    /// The compact policy Envoy's filter configuration has now.
    live: String,
    /// The files as last applied; an edit is noticed by a `stat`.
    watch: policy_file::Watch,
}

/// What the filter configuration carries of a policy: all of it, or with a
/// key service, all but its keys.
pub fn configured(p: &policy_file::Loaded, keys: bool) -> String {
    if keys {
        table::without_keys(&p.doc).to_string()
    } else {
        p.json.clone()
    }
}

impl PolicyWatch {
    /// Watches `path`, whose filter configuration Envoy has now is `live`
    /// ([`configured`]); with a key service, `keys` serves its keys.
    pub fn new(
        path: &Path,
        live: String,
        wasm: &Path,
        vm: render::VmOptions,
        layout: &Layout,
        keys: Option<KeyTable>,
    ) -> PolicyWatch {
        PolicyWatch {
            path: path.to_path_buf(),
            wasm: wasm.to_path_buf(),
            vm,
            layout: layout.clone(),
            live,
            keys,
            watch: policy_file::Watch::seeing(path, policy_file::read(path)),
        }
    }

    /// Reads the file once; applies it if it changed and is valid. Fails
    /// only when the ECDS file cannot be written.
    pub fn poll(&mut self) -> Result<()> {
        let started = std::time::Instant::now();
        let Some(current) = self.watch.changed() else {
            return Ok(());
        };
        match current.load() {
            Ok(p) => self.apply(&p, started),
            Err(errors) => {
                eprintln!("policy edit rejected; the previous policy stays live:");
                for e in errors {
                    eprintln!("  error: {e}");
                }
                Ok(())
            }
        }
    }

    /// A valid policy: the filter configuration first (a new group before
    /// the keys that name it), then the key table, each only if it changed.
    fn apply(&mut self, p: &policy_file::Loaded, started: std::time::Instant) -> Result<()> {
        let configured = configured(p, self.keys.is_some());
        let reconfigured = configured != self.live;
        if reconfigured {
            atomic_file::write(
                &self.layout.ecds(),
                &render::ecds(&configured, &self.wasm, &self.vm)?,
                0o644,
            )?;
            self.live = configured;
        }
        let changed = match &self.keys {
            Some(table) => table.update(&p.doc),
            None => 0,
        };
        if reconfigured || changed > 0 {
            let records = if self.keys.is_some() {
                format!(", {changed} key records changed")
            } else {
                String::new()
            };
            status(format_args!(
                "policy reloaded: {} ({} keys{records}; {} ms)",
                self.path.display(),
                p.keys,
                started.elapsed().as_millis()
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_edits_reach_the_ecds_file_and_invalid_ones_do_not() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout {
            dir: dir.path().to_path_buf(),
        };
        let policy = dir.path().join("policy.json");
        let wasm = Path::new("/x/tollgate.wasm");
        std::fs::write(&policy, r#"{"version": 1}"#).unwrap();
        let vm = render::VmOptions {
            hold_request_headers: true,
            shared: None,
            keys: None,
        };
        let mut watch =
            PolicyWatch::new(&policy, r#"{"version":1}"#.into(), wasm, vm, &layout, None);
        watch.poll().unwrap();
        assert!(!layout.ecds().exists(), "unchanged file: nothing written");

        std::fs::write(
            &policy,
            r#"{"version": 1, "defaults": {"models": ["claude-*"]}}"#,
        )
        .unwrap();
        watch.poll().unwrap();
        let ecds = std::fs::read_to_string(layout.ecds()).unwrap();
        assert!(ecds.contains(r#"\"models\":[\"claude-*\"]"#), "{ecds}");

        std::fs::write(&policy, r#"{"version": 2}"#).unwrap();
        watch.poll().unwrap();
        assert_eq!(
            std::fs::read_to_string(layout.ecds()).unwrap(),
            ecds,
            "an invalid edit leaves the live policy"
        );
    }

    #[test]
    fn an_edit_of_an_included_file_reloads_the_policy() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout {
            dir: dir.path().to_path_buf(),
        };
        let policy = dir.path().join("policy.json");
        let limits = dir.path().join("provider-limits.json");
        let pools = |rpm: u32| {
            format!(
                r#"{{"provider_pools": {{"provider:anthropic:claude-sonnet-4": {{"models": ["claude-sonnet-4-5"], "limits": {{"requests_per_minute": {rpm}}}}}}}}}"#
            )
        };
        std::fs::write(&limits, pools(4000)).unwrap();
        std::fs::write(
            &policy,
            r#"{"version": 1, "include": ["provider-limits.json"]}"#,
        )
        .unwrap();
        let vm = render::VmOptions {
            hold_request_headers: true,
            shared: None,
            keys: None,
        };
        let live = policy_file::load(&policy).unwrap().json;
        let mut watch = PolicyWatch::new(&policy, live, Path::new("/x/t.wasm"), vm, &layout, None);
        watch.poll().unwrap();
        assert!(!layout.ecds().exists(), "nothing changed");

        std::fs::write(&limits, pools(3000)).unwrap();
        watch.poll().unwrap();
        let ecds = std::fs::read_to_string(layout.ecds()).unwrap();
        assert!(ecds.contains(r#"\"requests_per_minute\":3000"#), "{ecds}");
        assert!(!ecds.contains("include"), "{ecds}");

        // An included file that breaks the policy leaves the live one.
        std::fs::write(&limits, "{").unwrap();
        watch.poll().unwrap();
        assert_eq!(std::fs::read_to_string(layout.ecds()).unwrap(), ecds);
    }
}
