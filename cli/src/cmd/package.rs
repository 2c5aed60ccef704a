//! `tollgate package`: tollgate.wasm as an OCI image for Istio and Envoy
//! Gateway (layout directory and tarball).

use crate::oci;
use crate::output::Output;
use anyhow::{Context, Result};
use std::io::Write;
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct PackageArgs {
    /// The filter module.
    #[arg(long, default_value = "target/tollgate.wasm")]
    wasm: PathBuf,
    /// OCI layout directory to write; `<out>.tar` is written beside it.
    #[arg(long, default_value = "target/oci/tollgate")]
    out: PathBuf,
    /// Tag recorded in the layout's index.
    #[arg(long, default_value = env!("CARGO_PKG_VERSION"))]
    tag: String,
}

pub fn run(args: PackageArgs) -> Result<()> {
    let wasm = std::fs::read(&args.wasm).with_context(|| {
        format!(
            "reading {} (build it with `make wasm`)",
            args.wasm.display()
        )
    })?;
    let manifest = oci::write(&wasm, &args.tag, &args.out)?;
    let mut out = Output::stdout();
    writeln!(
        out,
        "OCI image layout: {} (tag {})",
        args.out.display(),
        args.tag
    )?;
    writeln!(
        out,
        "tarball:          {}",
        args.out.with_extension("tar").display()
    )?;
    writeln!(out, "manifest:         {manifest}")?;
    writeln!(
        out,
        "plugin.wasm:      {} ({} bytes)",
        oci::digest(&wasm),
        wasm.len()
    )?;
    writeln!(
        out,
        "push it with e.g. `oras cp --from-oci-layout {}:{} registry.example.com/tollgate:{}`",
        args.out.display(),
        args.tag,
        args.tag
    )?;
    out.flush()?;
    Ok(())
}
