//! `tollgate prices`: the effective price table (the shipped one, with a
//! policy's own prices and default price merged when `--policy` is given).

use crate::output::Output;
use crate::policy_file;
use crate::price_view::{self, Format};
use anyhow::Result;
use std::io::Write;
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct PricesArgs {
    #[arg(long, value_enum, default_value = "table")]
    format: Format,
    /// Merge this policy's "prices" and settings.default_price (they override the shipped table).
    #[arg(long)]
    policy: Option<PathBuf>,
}

pub fn run(args: PricesArgs) -> Result<()> {
    let policy = match &args.policy {
        Some(path) => Some(policy_file::open(path)?.0),
        None => None,
    };
    let rows = price_view::rows(policy.as_ref());
    let mut out = Output::stdout();
    match args.format {
        Format::Table => out.write_all(price_view::to_table(&rows).as_bytes())?,
        Format::Json => writeln!(
            out,
            "{}",
            serde_json::to_string_pretty(&price_view::to_json(&rows))?
        )?,
    }
    out.flush()?;
    Ok(())
}
