//! `tollgate usage`: who spent what, from the audit store.

use crate::collector::report::{parse_since, GroupBy};
use crate::collector::store::AuditStore;
use anyhow::Result;
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
    let since = parse_since(&args.since, crate::run::now_ms())?;
    let report = store.report(args.by, since)?;
    match args.format {
        Format::Table => print!("{}", report.to_table()),
        Format::Csv => print!("{}", report.to_csv()?),
        Format::Json => println!("{}", serde_json::to_string_pretty(&report)?),
    }
    Ok(())
}
