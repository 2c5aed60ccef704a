//! `tollgate audit`: read the collector's audit records.

use crate::audit_view::{self, Format};
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
            writeln!(
                out,
                "imported {}: {} records read, {} new or completed, {} already stored, {} invalid lines",
                file.display(),
                s.lines,
                s.stored,
                s.lines.saturating_sub(s.stored).saturating_sub(s.invalid),
                s.invalid
            )?;
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
