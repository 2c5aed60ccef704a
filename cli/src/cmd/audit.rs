//! `tollgate audit`: read the collector's audit records.

use crate::audit_view::{self, Format};
use crate::clock::now_ms;
use crate::cmd::usage::Format as ReportFormat;
use crate::collector::gaps;
use crate::collector::report::parse_since;
use crate::collector::store::AuditStore;
use crate::output::Output;
use anyhow::Result;
use std::io::Write;
use std::path::PathBuf;

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
    /// List the records that never reached the store: holes in each Envoy's
    /// sequence numbers.
    Gaps(GapsArgs),
}

#[derive(clap::Args, Debug)]
struct GapsArgs {
    #[arg(long, default_value = ".tollgate/audit.db")]
    db: PathBuf,
    /// Only gaps among the records since: a duration back from now (7d, 24h) or an
    /// RFC 3339 time (default: the whole store).
    #[arg(long)]
    since: Option<String>,
    /// List a gap once the record after it is this old: until then the missing
    /// request may still be streaming (its record is logged when it ends).
    #[arg(long, default_value = "30m")]
    settle: String,
    #[arg(long, value_enum, default_value_t = ReportFormat::Table)]
    format: ReportFormat,
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
    let mut out = Output::stdout();
    match args.command {
        AuditCommand::Tail(t) => {
            let store = AuditStore::open_existing(&t.db)?;
            audit_view::tail(&store, t.lines, t.follow, t.format, &mut out)?;
        }
        AuditCommand::Import { file, db } => {
            let store = AuditStore::open(&db)?;
            let s = store.import_jsonl(&file)?;
            write!(
                out,
                "imported {}: {} records read, {} new or completed, {} already stored, {} invalid lines",
                file.display(),
                s.lines,
                s.stored,
                s.duplicates(),
                s.invalid
            )?;
            if s.expired > 0 {
                write!(
                    out,
                    ", {} older than the retention horizon (already in the daily rollups)",
                    s.expired
                )?;
            }
            writeln!(out)?;
        }
        AuditCommand::Gaps(g) => {
            let store = AuditStore::open_existing(&g.db)?;
            let now = now_ms();
            let since = g
                .since
                .as_deref()
                .map(|s| parse_since(s, now))
                .transpose()?
                .unwrap_or(0);
            let settled = parse_since(&g.settle, now).map_err(|_| {
                anyhow::anyhow!("--settle {:?}: use a duration such as 30m or 0s", g.settle)
            })?;
            let found = store.gaps(since, settled)?;
            match g.format {
                ReportFormat::Table => out.write_all(gaps::to_table(&found).as_bytes())?,
                ReportFormat::Csv => out.write_all(gaps::to_csv(&found)?.as_bytes())?,
                ReportFormat::Json => writeln!(
                    out,
                    "{}",
                    serde_json::to_string_pretty(&serde_json::json!({
                        "since_ms": since,
                        "settled_ms": settled,
                        "missing": found.iter().map(gaps::Gap::missing).sum::<u64>(),
                        "gaps": found,
                    }))?
                )?,
            }
        }
    }
    out.flush()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> AuditArgs {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            audit: AuditArgs,
        }
        <Cli as clap::Parser>::try_parse_from(std::iter::once("audit").chain(args.iter().copied()))
            .unwrap()
            .audit
    }

    #[test]
    fn audit_tail_defaults_and_flags() {
        let AuditCommand::Tail(t) = parse(&["tail"]).command else {
            unreachable!()
        };
        assert_eq!(t.db, PathBuf::from(".tollgate/audit.db"));
        assert_eq!((t.lines, t.follow, t.format), (20, false, Format::Table));
        let AuditCommand::Tail(t) = parse(&[
            "tail", "-n", "5", "--follow", "--format", "json", "--db", "x.db",
        ])
        .command
        else {
            unreachable!()
        };
        assert_eq!(t.db, PathBuf::from("x.db"));
        assert_eq!((t.lines, t.follow, t.format), (5, true, Format::Json));
    }

    #[test]
    fn audit_gaps_defaults_and_flags() {
        let AuditCommand::Gaps(g) = parse(&["gaps"]).command else {
            unreachable!()
        };
        assert_eq!(
            (g.db, g.since, g.settle.as_str(), g.format),
            (
                PathBuf::from(".tollgate/audit.db"),
                None,
                "30m",
                ReportFormat::Table
            )
        );
        let AuditCommand::Gaps(g) = parse(&[
            "gaps", "--since", "7d", "--settle", "0s", "--format", "csv", "--db", "x.db",
        ])
        .command
        else {
            unreachable!()
        };
        assert_eq!(
            (g.db, g.since.as_deref(), g.settle.as_str(), g.format),
            (PathBuf::from("x.db"), Some("7d"), "0s", ReportFormat::Csv)
        );
    }

    #[test]
    fn audit_tail_on_a_missing_database_names_it_and_says_how_to_start() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("nothing-here.db");
        let err = run(parse(&["tail", "--db", db.to_str().unwrap()]))
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            format!(
                "no audit database at {0} — start the gateway with `tollgate run` (or `tollgate collector --db {0}`) first",
                db.display()
            )
        );
        assert!(!db.exists(), "reading must not create the database");
    }
}
