//! Envoy's file access log of audit records (`audit.jsonl`), the durable
//! copy of what the gRPC stream may lose, and its rotated predecessors.
//!
//! Envoy cannot rotate a file access log itself; it reopens it by path on
//! `POST /reopen_logs` (admin), so rotation is a rename followed by that
//! request. Lines Envoy flushes between the two land in the renamed file,
//! which is kept: nothing is lost. Rotated files are numbered like
//! logrotate's: `audit.jsonl.1` is the newest, `audit.jsonl.<keep>` the
//! oldest kept.

use std::io;
use std::path::{Path, PathBuf};

/// When to rotate, and how many rotated files to keep.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rotation {
    /// Rotate once the live file reaches this size (bytes).
    pub max_bytes: u64,
    /// Rotated files kept (the oldest beyond are deleted); at least 1.
    pub keep: usize,
}

/// The `n`th rotated file of `live` (`audit.jsonl.n`).
pub fn rotated(live: &Path, n: usize) -> PathBuf {
    let mut name = live.as_os_str().to_owned();
    name.push(format!(".{n}"));
    PathBuf::from(name)
}

/// The numbers of the rotated files of `live` present, newest (lowest) first.
fn rotated_numbers(live: &Path) -> Vec<usize> {
    let (Some(dir), Some(name)) = (live.parent(), live.file_name()) else {
        return Vec::new();
    };
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    let prefix = format!("{}.", name.to_string_lossy());
    let mut numbers: Vec<usize> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            entry
                .file_name()
                .to_str()?
                .strip_prefix(&prefix)?
                .parse()
                .ok()
        })
        .filter(|n| *n > 0)
        .collect();
    numbers.sort_unstable();
    numbers
}

/// Every file of the log, oldest first: the rotated ones from the highest
/// number down, then the live one. Only files that exist.
pub fn oldest_first(live: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = rotated_numbers(live)
        .into_iter()
        .rev()
        .map(|n| rotated(live, n))
        .collect();
    if live.exists() {
        files.push(live.to_path_buf());
    }
    files
}

/// Renames `live` to `live.1`, shifting older files up one number and
/// deleting those past `keep`. Says whether there was a live file to
/// rotate; the caller then asks Envoy to reopen it.
pub fn rotate(live: &Path, keep: usize) -> io::Result<bool> {
    if !live.exists() {
        return Ok(false);
    }
    let keep = keep.max(1);
    for n in rotated_numbers(live).into_iter().rev() {
        if n >= keep {
            std::fs::remove_file(rotated(live, n))?;
        } else {
            std::fs::rename(rotated(live, n), rotated(live, n + 1))?;
        }
    }
    std::fs::rename(live, rotated(live, 1))?;
    Ok(true)
}

/// Whether `live` has reached the rotation size.
pub fn due(live: &Path, rotation: Rotation) -> bool {
    std::fs::metadata(live).is_ok_and(|m| m.len() >= rotation.max_bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(p: &Path) -> String {
        std::fs::read_to_string(p).unwrap()
    }

    #[test]
    fn rotation_shifts_numbers_keeps_n_files_and_lists_them_oldest_first() {
        let dir = tempfile::tempdir().unwrap();
        let live = dir.path().join("audit.jsonl");
        // An unrelated file with a similar name is left alone.
        std::fs::write(dir.path().join("audit.jsonl.bak"), "x").unwrap();
        assert!(!rotate(&live, 2).unwrap(), "nothing to rotate yet");
        for generation in ["a", "b", "c", "d"] {
            std::fs::write(&live, generation).unwrap();
            assert!(rotate(&live, 2).unwrap());
            assert!(!live.exists());
        }
        assert_eq!(read(&rotated(&live, 1)), "d");
        assert_eq!(read(&rotated(&live, 2)), "c");
        assert!(!rotated(&live, 3).exists(), "only `keep` rotated files");
        std::fs::write(&live, "e").unwrap();
        assert_eq!(
            oldest_first(&live)
                .iter()
                .map(|p| read(p))
                .collect::<Vec<_>>(),
            ["c", "d", "e"]
        );
        assert_eq!(read(&dir.path().join("audit.jsonl.bak")), "x");
        // Fewer kept than before: the surplus goes at the next rotation.
        std::fs::write(rotated(&live, 5), "old").unwrap();
        rotate(&live, 2).unwrap();
        assert_eq!(
            oldest_first(&live)
                .iter()
                .map(|p| read(p))
                .collect::<Vec<_>>(),
            ["d", "e"]
        );
    }

    #[test]
    fn due_once_the_live_file_reaches_the_size() {
        let dir = tempfile::tempdir().unwrap();
        let live = dir.path().join("audit.jsonl");
        let rotation = Rotation {
            max_bytes: 4,
            keep: 1,
        };
        assert!(!due(&live, rotation));
        std::fs::write(&live, "abc").unwrap();
        assert!(!due(&live, rotation));
        std::fs::write(&live, "abcd").unwrap();
        assert!(due(&live, rotation));
    }
}
