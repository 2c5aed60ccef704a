//! `tollgate audit`: read the collector's audit records.

use crate::collector::store::AuditStore;
use anyhow::Result;
use std::path::PathBuf;
use tollgate_core::audit::AuditRecord;
use tollgate_core::time::format_rfc3339;

#[derive(clap::Args, Debug)]
pub struct AuditArgs {
    #[command(subcommand)]
    command: AuditCommand,
}

#[derive(clap::Subcommand, Debug)]
enum AuditCommand {
    /// Show the newest records (and follow new ones with --follow).
    Tail(TailArgs),
    /// Import a JSON-lines audit log (Envoy's file access log) idempotently.
    Import {
        file: PathBuf,
        #[arg(long, default_value = ".tollgate/audit.db")]
        db: PathBuf,
    },
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum Format {
    Table,
    Json,
}

#[derive(clap::Args, Debug)]
struct TailArgs {
    #[arg(long, default_value = ".tollgate/audit.db")]
    db: PathBuf,
    /// How many records.
    #[arg(short = 'n', long = "lines", default_value_t = 20)]
    lines: usize,
    /// Keep printing new records as they arrive.
    #[arg(long)]
    follow: bool,
    #[arg(long, value_enum, default_value_t = Format::Table)]
    format: Format,
}

pub fn run(args: AuditArgs) -> Result<()> {
    match args.command {
        AuditCommand::Tail(t) => tail(t),
        AuditCommand::Import { file, db } => {
            let store = AuditStore::open(&db)?;
            let s = store.import_jsonl(&file)?;
            println!(
                "imported {}: {} records read, {} new or completed, {} already stored, {} invalid lines",
                file.display(),
                s.lines,
                s.stored,
                s.lines - s.stored - s.invalid,
                s.invalid
            );
            Ok(())
        }
    }
}

fn tail(args: TailArgs) -> Result<()> {
    let store = AuditStore::open_existing(&args.db)?;
    let mut records = store.tail(args.lines)?;
    records.reverse();
    if args.format == Format::Table {
        println!("{}", header());
    }
    for r in &records {
        print(r, args.format);
    }
    if !args.follow {
        return Ok(());
    }
    let (_, mut last) = store.since(i64::MAX)?;
    if last == i64::MAX {
        last = store.since(0)?.1;
    }
    loop {
        std::thread::sleep(std::time::Duration::from_millis(500));
        let (new, next) = store.since(last)?;
        for r in &new {
            print(r, args.format);
        }
        last = next;
    }
}

fn header() -> String {
    format!(
        "{:<20} {:<16} {:<22} {:<10} {:<24} {:<26} {:>6} {:>7} {:>7} {:>9}",
        "time", "key", "user", "team", "route", "model", "status", "input", "output", "cost"
    )
}

fn print(r: &AuditRecord, format: Format) {
    match format {
        Format::Json => println!("{}", serde_json::to_string(r).unwrap_or_default()),
        Format::Table => {
            let dash = || "-".to_string();
            let model = r
                .model_served
                .clone()
                .or(r.model_requested.clone())
                .unwrap_or_else(dash);
            let status = if r.decision == tollgate_core::audit::Outcome::Denied {
                format!("{} {}", r.status, r.reason.as_str())
            } else if !r.complete {
                "in-flight/aborted".to_string()
            } else {
                r.status.to_string()
            };
            let n = |v: Option<u64>| v.map(|v| v.to_string()).unwrap_or_else(dash);
            println!(
                "{:<20} {:<16} {:<22} {:<10} {:<24} {:<26} {:>6} {:>7} {:>7} {:>9}",
                format_rfc3339(r.timestamp_ms),
                r.key_id.clone().unwrap_or_else(dash),
                r.user.clone().unwrap_or_else(dash),
                r.team.clone().unwrap_or_else(dash),
                r.route,
                model,
                status,
                n(r.tokens
                    .input
                    .or(Some(r.tokens.input_estimated).filter(|v| *v > 0))),
                n(r.tokens.output),
                r.cost_usd.map(|c| format!("${c:.5}")).unwrap_or_else(dash)
            );
        }
    }
}
