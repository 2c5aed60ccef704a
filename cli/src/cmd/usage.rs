//! `tollgate usage`: who spent what, from the audit store.

use crate::clock::now_ms;
use crate::collector::report::{parse_since, GroupBy};
use crate::collector::store::AuditStore;
use crate::output::Output;
use anyhow::Result;
use std::io::Write;
use std::path::PathBuf;

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Table,
    Json,
    Csv,
}

#[derive(clap::Args, Debug)]
pub struct UsageArgs {
    /// Group rows by this attribute.
    #[arg(long, value_enum, default_value = "team")]
    by: GroupBy,
    /// Window start: a duration back from now (7d, 24h, 30m) or an RFC 3339 time.
    #[arg(long, default_value = "7d")]
    since: String,
    #[arg(long, value_enum, default_value = "table")]
    format: Format,
    #[arg(long, default_value = ".tollgate/audit.db")]
    db: PathBuf,
}

pub fn run(args: UsageArgs) -> Result<()> {
    let store = AuditStore::open_existing(&args.db)?;
    let since = parse_since(&args.since, now_ms())?;
    let report = store.report(args.by, since)?;
    let mut out = Output::stdout();
    match args.format {
        Format::Table => out.write_all(report.to_table().as_bytes())?,
        Format::Csv => out.write_all(report.to_csv()?.as_bytes())?,
        Format::Json => writeln!(out, "{}", serde_json::to_string_pretty(&report)?)?,
    }
    out.flush()?;
    Ok(())
}
