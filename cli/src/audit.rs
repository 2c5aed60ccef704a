//! `tollgate audit`: read the collector's audit records.

use crate::collector::sheet::{self, Align, Column};
use crate::collector::store::AuditStore;
use anyhow::Result;
use std::collections::HashSet;
use std::path::PathBuf;
use tollgate_core::audit::{AuditRecord, Outcome};
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
    // Read before the newest rows: a record stored in between then shows up
    // in both reads, once (skipped below), instead of in neither.
    let mut last = store.last_seq()?;
    let mut records = store.tail(args.lines)?;
    records.reverse();
    match args.format {
        Format::Table => println!("{}", sheet::table(&COLUMNS, true, &records)),
        Format::Json => records.iter().for_each(print_json),
    }
    if !args.follow {
        return Ok(());
    }
    let mut shown: HashSet<String> = records.into_iter().map(|r| r.request_id).collect();
    loop {
        std::thread::sleep(std::time::Duration::from_millis(500));
        let (new, next) = store.since(last)?;
        for r in new.iter().filter(|r| !shown.contains(&r.request_id)) {
            match args.format {
                Format::Table => println!("{}", row(r)),
                Format::Json => print_json(r),
            }
        }
        // Only the first read can overlap the initial tail.
        shown.clear();
        last = next;
    }
}

fn text(v: &Option<String>) -> String {
    v.clone().unwrap_or_else(|| "-".to_string())
}

fn num(v: Option<u64>) -> String {
    v.map_or_else(|| "-".to_string(), |v| v.to_string())
}

const fn left(
    header: &'static str,
    width: u16,
    value: fn(&AuditRecord) -> String,
) -> Column<AuditRecord> {
    Column {
        table: Some(header),
        csv: None,
        width,
        gap: 1,
        align: Align::Left,
        value,
    }
}

const fn right(
    header: &'static str,
    width: u16,
    value: fn(&AuditRecord) -> String,
) -> Column<AuditRecord> {
    Column {
        align: Align::Right,
        ..left(header, width, value)
    }
}

/// The table's columns: text left-aligned, the numbers at the end (status
/// onwards) right-aligned.
const COLUMNS: [Column<AuditRecord>; 11] = [
    Column {
        gap: 0,
        ..left("time", 20, |r| format_rfc3339(r.timestamp_ms))
    },
    left("key", 16, |r| text(&r.key_id)),
    left("user", 20, |r| text(&r.user)),
    left("team", 10, |r| text(&r.team)),
    left("route", 22, |r| r.route.clone()),
    left("model", 26, |r| {
        text(&r.model_served.clone().or(r.model_requested.clone()))
    }),
    // A record still provisional when Envoy logged it belongs to a request
    // the client or upstream abandoned before the response ended.
    left("decision", 24, |r| match (r.decision, r.complete) {
        (Outcome::Denied, _) => format!("denied {}", r.reason.as_str()),
        (Outcome::Allowed, true) => "allowed".to_string(),
        (Outcome::Allowed, false) => "aborted".to_string(),
    }),
    right("status", 6, |r| {
        if r.status == 0 {
            "-".to_string()
        } else {
            r.status.to_string()
        }
    }),
    // Before the provider reports usage, the estimate is all there is.
    right("input", 7, |r| {
        num(r
            .tokens
            .input
            .or(Some(r.tokens.input_estimated).filter(|v| *v > 0)))
    }),
    right("output", 7, |r| num(r.tokens.output)),
    right("cost", 9, |r| {
        r.cost_usd
            .map_or_else(|| "-".to_string(), |c| format!("${c:.5}"))
    }),
];

#[cfg(test)]
fn header() -> String {
    sheet::table(&COLUMNS, true, [])
}

/// One table row, for records that arrive after the table was printed.
fn row(r: &AuditRecord) -> String {
    sheet::table(&COLUMNS, false, [r])
}

fn print_json(r: &AuditRecord) {
    println!("{}", serde_json::to_string(r).unwrap_or_default());
}

#[cfg(test)]
mod tests {
    use super::*;
    use tollgate_core::audit::{Reason, Tokens};

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
    fn audit_tail_rows_show_identity_decision_tokens_and_cost() {
        let served = AuditRecord {
            request_id: "r1".into(),
            timestamp_ms: 1_700_000_000_000,
            complete: true,
            key_id: Some("alice-laptop".into()),
            user: Some("alice".into()),
            team: Some("payments".into()),
            route: "anthropic.messages".into(),
            model_requested: Some("claude-sonnet-4-5".into()),
            model_served: Some("claude-sonnet-4-5-20250929".into()),
            status: 200,
            tokens: Tokens {
                input_estimated: 30,
                input: Some(25),
                output: Some(120),
                ..Default::default()
            },
            cost_usd: Some(0.0021),
            ..Default::default()
        };
        assert_eq!(
            row(&served),
            "2023-11-14T22:13:20Z alice-laptop     alice                payments   anthropic.messages     claude-sonnet-4-5-20250929 allowed                     200      25     120  $0.00210"
        );
        let denied = AuditRecord {
            decision: Outcome::Denied,
            reason: Reason::RateLimited,
            status: 429,
            model_served: None,
            tokens: Tokens::default(),
            cost_usd: None,
            ..served.clone()
        };
        assert_eq!(
            row(&denied),
            "2023-11-14T22:13:20Z alice-laptop     alice                payments   anthropic.messages     claude-sonnet-4-5          denied rate_limited         429       -       -         -"
        );
        let aborted = AuditRecord {
            complete: false,
            status: 0,
            key_id: None,
            model_served: None,
            tokens: Tokens {
                input_estimated: 30,
                ..Default::default()
            },
            cost_usd: None,
            ..served.clone()
        };
        assert_eq!(
            row(&aborted),
            "2023-11-14T22:13:20Z -                alice                payments   anthropic.messages     claude-sonnet-4-5          aborted                       -      30       -         -"
        );
        assert_eq!(
            header(),
            "time                 key              user                 team       route                  model                      decision                 status   input  output      cost"
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
