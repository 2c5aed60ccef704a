//! Embeds the recorded provider exchanges (`tests/fixtures/`) into the
//! crate, so the mock provider of an installed `tollgate` needs no files.
//!
//! A mock without its manifest would answer every request with "unknown
//! exchange", far from the cause; so a checkout without the fixtures fails
//! here, naming the directory it looked in.

use std::fmt::Write;
use std::path::{Path, PathBuf};

/// The manifest the mock serves from; every other fixture is named in it.
const MANIFEST: &str = "exchanges.json";

fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for e in std::fs::read_dir(dir)? {
        let p = e?.path();
        if p.is_dir() {
            walk(&p, out)?;
        } else if matches!(p.extension().and_then(|e| e.to_str()), Some("json" | "sse")) {
            out.push(p);
        }
    }
    Ok(())
}

fn fail(message: &str) -> ! {
    eprintln!("error: {message}");
    std::process::exit(1);
}

fn main() {
    let crate_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let root = crate_dir
        .parent()
        .unwrap_or(crate_dir)
        .join("tests/fixtures");
    println!("cargo:rerun-if-changed={}", root.display());
    let mut files = Vec::new();
    if let Err(e) = walk(&root, &mut files) {
        fail(&format!(
            "tollgate-mock embeds the recorded exchanges of {} and cannot read it: {e}. \
             Build from a full checkout of the repository, or build `tollgate` without \
             the mock provider (`cargo build -p tollgate --no-default-features`).",
            root.display()
        ));
    }
    files.sort();
    if !files
        .iter()
        .any(|f| f.strip_prefix(&root).ok() == Some(Path::new(MANIFEST)))
    {
        fail(&format!(
            "tollgate-mock found no {MANIFEST} in {} ({} fixture file(s)): the mock provider \
             would serve no exchange. Restore tests/fixtures/ or build `tollgate` without the \
             mock provider (`cargo build -p tollgate --no-default-features`).",
            root.display(),
            files.len()
        ));
    }
    let mut code = String::from("pub static FIXTURES: &[(&str, &[u8])] = &[\n");
    for f in &files {
        println!("cargo:rerun-if-changed={}", f.display());
        let rel = f
            .strip_prefix(&root)
            .unwrap_or(f)
            .to_string_lossy()
            .replace('\\', "/");
        let abs = std::fs::canonicalize(f).unwrap_or_else(|_| f.clone());
        let _ = writeln!(
            code,
            "    ({rel:?}, include_bytes!({:?})),",
            abs.to_string_lossy()
        );
    }
    code.push_str("];\n");
    let Some(out_dir) = std::env::var_os("OUT_DIR") else {
        fail("OUT_DIR is not set (build scripts run under cargo)");
    };
    let out = PathBuf::from(out_dir).join("fixtures.rs");
    if let Err(e) = std::fs::write(&out, code) {
        fail(&format!("cannot write {}: {e}", out.display()));
    }
}
