//! Who may write audit records: the collector's write token. Both ways in
//! (Envoy's gRPC access-log stream and `POST /api/ingest`) store records
//! that reports, budgets' alerts and `tollgate quota reseed` trust, so a
//! write must carry `authorization: Bearer <token>`. `tollgate run`
//! generates the token at each start, gives it to its own Envoy (the
//! access logger's `initial_metadata`) and writes it to
//! `<state dir>/collector-token` for log shippers; a standalone
//! `tollgate collector` takes it from `--write-token-file` (without one it
//! accepts every write, and says so at start). Reads (dashboard, `/api/*`
//! GETs, `/metrics`) stay open, as they are today.

use anyhow::{bail, Context, Result};
use std::path::Path;
use std::sync::Arc;

/// What an unauthenticated write is told (HTTP 401, gRPC UNAUTHENTICATED).
pub const REFUSED: &str = "writing audit records needs the collector's write token: send \
     `authorization: Bearer <token>` (the token of --write-token-file; tollgate run writes it to \
     <state dir>/collector-token)";

/// Shortest token accepted from a file: a guessable token is no token.
const MIN_LEN: usize = 16;

#[derive(Debug, Clone, Default)]
pub struct WriteToken(Option<Arc<str>>);

impl WriteToken {
    /// Every write accepted (a collector started without a token).
    pub fn open() -> WriteToken {
        WriteToken(None)
    }

    pub fn new(token: &str) -> WriteToken {
        WriteToken(Some(Arc::from(token)))
    }

    /// A fresh token: 32 random bytes, hex.
    pub fn generate() -> String {
        use std::fmt::Write;
        let bytes: [u8; 32] = rand::random();
        bytes.iter().fold(String::with_capacity(64), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
    }

    /// The token in `path` (surrounding whitespace ignored).
    pub fn read(path: &Path) -> Result<String> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading the write token {}", path.display()))?;
        let token = text.trim();
        if token.len() < MIN_LEN || token.chars().any(|c| c.is_whitespace() || c.is_control()) {
            bail!(
                "{}: the write token must be one word of at least {MIN_LEN} characters (e.g. `openssl rand -hex 32`)",
                path.display()
            );
        }
        Ok(token.to_string())
    }

    pub fn is_open(&self) -> bool {
        self.0.is_none()
    }

    /// Whether a write with this `authorization` header value may store
    /// records. Compared in constant time: how much of a guess matched
    /// must not show in the answer's timing.
    pub fn allows(&self, authorization: Option<&[u8]>) -> bool {
        let Some(token) = &self.0 else {
            return true;
        };
        let Some(given) = authorization.and_then(|a| a.strip_prefix(b"Bearer ")) else {
            return false;
        };
        let want = token.as_bytes();
        given.len() == want.len()
            && given
                .iter()
                .zip(want)
                .fold(0u8, |diff, (a, b)| diff | (a ^ b))
                == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_bearer_token_itself_is_allowed() {
        let t = WriteToken::new("0123456789abcdef0123");
        assert!(t.allows(Some(b"Bearer 0123456789abcdef0123")));
        for bad in [
            None,
            Some(&b"0123456789abcdef0123"[..]),
            Some(b"Bearer 0123456789abcdef012"),
            Some(b"Bearer 0123456789abcdef01234"),
            Some(b"Bearer 0123456789abcdef0124"),
            Some(b"Basic 0123456789abcdef0123"),
        ] {
            assert!(!t.allows(bad), "{bad:?}");
        }
        assert!(WriteToken::open().allows(None));
    }

    #[test]
    fn a_token_file_holds_one_long_word() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, format!("{}\n", WriteToken::generate())).unwrap();
        assert_eq!(WriteToken::read(&path).unwrap().len(), 64);
        std::fs::write(&path, "short\n").unwrap();
        assert_eq!(
            WriteToken::read(&path).unwrap_err().to_string(),
            format!(
                "{}: the write token must be one word of at least 16 characters (e.g. `openssl rand -hex 32`)",
                path.display()
            )
        );
    }
}
