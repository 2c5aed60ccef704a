//! Where commands print. A reader that goes away early (`tollgate usage |
//! head -1`) closes the pipe; Rust ignores SIGPIPE, so the next write fails
//! with EPIPE. `println!` would panic on that ("failed printing to stdout")
//! and exit 101; here the write error is marked as a closed stdout, travels
//! up like any error (so a long listing or `--follow` stops at once), and
//! `main` ends the program quietly with status 0, as `cat` or ripgrep do.
//!
//! Services (`run`, `collector`, `mock`) print progress with [`status`]:
//! a closed stdout must not stop a gateway, so those lines are dropped.

use std::fmt::Display;
use std::io::{self, BufWriter, Stdout, Write};

/// How a listing command prints: a plain-text table for people, or JSON
/// for programs (`--format table|json`).
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Table,
    Json,
}

/// Marks an EPIPE that came from stdout (a socket's EPIPE is a real error).
#[derive(Debug)]
struct StdoutClosed;

impl std::fmt::Display for StdoutClosed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("stdout closed by its reader")
    }
}

impl std::error::Error for StdoutClosed {}

fn mark(e: io::Error) -> io::Error {
    if e.kind() == io::ErrorKind::BrokenPipe {
        io::Error::new(io::ErrorKind::BrokenPipe, StdoutClosed)
    } else {
        e
    }
}

/// Buffered stdout whose closed-pipe errors [`is_closed_stdout`] recognises.
/// Flush before returning (buffered bytes dropped with it are lost silently).
pub struct Output {
    inner: BufWriter<Stdout>,
}

impl Output {
    pub fn stdout() -> Output {
        Output {
            inner: BufWriter::new(io::stdout()),
        }
    }
}

impl Write for Output {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.inner.write(buf).map_err(mark)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush().map_err(mark)
    }
}

/// Whether this error is stdout's reader having gone away: success for a
/// command, whose reader took what it wanted.
pub fn is_closed_stdout(e: &anyhow::Error) -> bool {
    e.chain().any(|cause| {
        cause
            .downcast_ref::<io::Error>()
            .and_then(|io| io.get_ref())
            .is_some_and(|inner| inner.is::<StdoutClosed>())
    })
}

/// One progress line of a service, flushed at once so logs stay current; a
/// closed or broken stdout drops it (the service keeps serving).
pub fn status(line: impl Display) {
    let mut out = io::stdout().lock();
    let _ = writeln!(out, "{line}").and_then(|()| out.flush());
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::Context;

    #[test]
    fn only_stdouts_broken_pipe_counts_as_closed_stdout() {
        let closed = anyhow::Error::new(mark(io::Error::from(io::ErrorKind::BrokenPipe)));
        assert!(is_closed_stdout(&closed));
        assert!(is_closed_stdout(&closed.context("printing the report")));
        // A peer closing a socket is a failure, not a satisfied reader.
        let socket = anyhow::Error::new(io::Error::from(io::ErrorKind::BrokenPipe));
        assert!(!is_closed_stdout(&socket));
        let full = anyhow::Error::new(mark(io::Error::other("disk full")));
        assert!(!is_closed_stdout(&full));
        let wrapped: anyhow::Result<()> =
            Err(mark(io::Error::from(io::ErrorKind::BrokenPipe))).context("writing");
        assert!(is_closed_stdout(&wrapped.unwrap_err()));
    }
}
