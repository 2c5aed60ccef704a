//! Model name patterns: exact names or globs with `*` (any run of characters)
//! and `?` (one character). Hand-written rather than `globset` because the
//! filter ships as wasm and a regex engine would triple its size.

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct ModelPattern {
    text: String,
}

impl ModelPattern {
    /// Compiles a pattern; rejects empty patterns and characters that have
    /// glob meaning elsewhere (`[`, `]`, `{`, `}`) so that a security team's
    /// `claude-[sonnet]` is an error rather than a silent literal.
    pub fn parse(text: &str) -> Result<ModelPattern, String> {
        if text.is_empty() {
            return Err("empty model pattern".to_string());
        }
        if let Some(c) = text.chars().find(|c| matches!(c, '[' | ']' | '{' | '}')) {
            return Err(format!(
                "'{c}' is not supported in model patterns (only '*' and '?')"
            ));
        }
        if text.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err("model patterns cannot contain whitespace".to_string());
        }
        Ok(ModelPattern {
            text: text.to_string(),
        })
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    pub fn is_exact(&self) -> bool {
        !self.text.contains(['*', '?'])
    }

    pub fn matches(&self, model: &str) -> bool {
        glob_match(self.text.as_bytes(), model.as_bytes())
    }

    /// The order price lookups try patterns in: exact names before globs,
    /// among globs the longer (more specific) first; ties alphabetically, so
    /// listings read in a stable order.
    pub fn lookup_order(&self, other: &ModelPattern) -> std::cmp::Ordering {
        let key = |p: &ModelPattern| {
            let glob = !p.is_exact();
            (glob, if glob { usize::MAX - p.text.len() } else { 0 })
        };
        key(self)
            .cmp(&key(other))
            .then_with(|| self.text.cmp(&other.text))
    }

    /// Whether some model name matches both patterns (`claude-*` and
    /// `*-opus-5` do: `claude-opus-5`).
    pub fn overlaps(&self, other: &ModelPattern) -> bool {
        walk(self.text.as_bytes(), other.text.as_bytes(), true, |x, y| {
            let wild = |c: u8| c == b'*' || c == b'?';
            (x == y || wild(x) || wild(y)).then_some((x == b'*', y == b'*'))
        })
    }

    /// Whether every model name `other` matches, this one matches too
    /// (`claude-*` covers `claude-opus-*`; `claude-?` does not). Sound but
    /// not complete: `other`'s `*` must fall inside one of this pattern's.
    pub fn covers(&self, other: &ModelPattern) -> bool {
        // `other`'s stars are never skipped: every text they can stand for
        // must be absorbed by one of ours.
        walk(
            self.text.as_bytes(),
            other.text.as_bytes(),
            false,
            |x, y| match (x, y) {
                (b'*', _) => Some((true, false)),
                (_, b'*') => None,
                (b'?', _) => Some((false, false)),
                (_, b'?') => None,
                _ => (x == y).then_some((false, false)),
            },
        )
    }
}

/// A pattern over identity values (SPIFFE IDs, JWT claims): an exact
/// value or a glob with `*` (any run of characters, `/` included) and `?`
/// (one character), matched as model patterns are. `[`, `]`, `{`, `}` are
/// refused for the same reason: a security team's `team-[ab]` must be an
/// error, not a silent literal. Unlike model names, claims may hold spaces
/// (`"name": "Alice Smith"`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Glob {
    text: String,
}

impl Glob {
    pub fn parse(text: &str) -> Result<Glob, String> {
        if text.is_empty() {
            return Err("empty pattern".to_string());
        }
        if let Some(c) = text.chars().find(|c| matches!(c, '[' | ']' | '{' | '}')) {
            return Err(format!(
                "'{c}' is not supported in patterns (only '*' and '?')"
            ));
        }
        if text.chars().any(char::is_control) {
            return Err("patterns cannot contain control characters".to_string());
        }
        Ok(Glob {
            text: text.to_string(),
        })
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    pub fn matches(&self, value: &str) -> bool {
        glob_match(self.text.as_bytes(), value.as_bytes())
    }
}

/// Explores pairs of positions in two patterns, both at once, from the
/// start: a `*` in `a` (and in `b` when `skip_b_stars`) may be skipped (it
/// matches nothing), and `step`
/// says whether the two characters under the positions can consume one
/// name character together, and for each side whether it stays on a `*`.
/// True when both ends are reached. At most (a+1)·(b+1) states, no
/// recursion: hostile patterns cannot blow the stack.
fn walk(
    a: &[u8],
    b: &[u8],
    skip_b_stars: bool,
    step: impl Fn(u8, u8) -> Option<(bool, bool)>,
) -> bool {
    let width = b.len() + 1;
    let mut seen = vec![false; (a.len() + 1) * width];
    let mut todo = vec![(0usize, 0usize)];
    while let Some((i, j)) = todo.pop() {
        match seen.get_mut(i * width + j) {
            Some(s) if !*s => *s = true,
            _ => continue,
        }
        let (x, y) = (a.get(i).copied(), b.get(j).copied());
        if x.is_none() && y.is_none() {
            return true;
        }
        if x == Some(b'*') {
            todo.push((i + 1, j));
        }
        if skip_b_stars && y == Some(b'*') {
            todo.push((i, j + 1));
        }
        if let (Some(x), Some(y)) = (x, y) {
            if let Some((stay_a, stay_b)) = step(x, y) {
                todo.push((i + usize::from(!stay_a), j + usize::from(!stay_b)));
            }
        }
    }
    false
}

/// Iterative glob match with single-star backtracking: linear in practice,
/// never recursive, so hostile model names cannot blow the stack.
fn glob_match(pattern: &[u8], text: &[u8]) -> bool {
    let (mut p, mut t) = (0usize, 0usize);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        match pattern.get(p) {
            Some(b'*') => {
                star = Some((p, t));
                p += 1;
            }
            Some(&c) if c == b'?' || Some(&c) == text.get(t) => {
                p += 1;
                t += 1;
            }
            _ => match star {
                Some((sp, st)) => {
                    p = sp + 1;
                    t = st + 1;
                    star = Some((sp, st + 1));
                }
                None => return false,
            },
        }
    }
    pattern
        .get(p..)
        .is_some_and(|rest| rest.iter().all(|c| *c == b'*'))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::panic)]
    use super::*;

    fn m(p: &str, t: &str) -> bool {
        ModelPattern::parse(p)
            .map(|p| p.matches(t))
            .unwrap_or(false)
    }

    #[test]
    fn matches_exact_names_and_globs() {
        assert!(m("claude-haiku-4-5", "claude-haiku-4-5"));
        assert!(!m("claude-haiku-4-5", "claude-haiku-4-50"));
        assert!(m("claude-haiku-*", "claude-haiku-4-5-20251001"));
        assert!(!m("claude-haiku-*", "claude-sonnet-4-5"));
        assert!(m("*", ""));
        assert!(m("gpt-4?-mini", "gpt-4o-mini"));
        assert!(m("*sonnet*", "claude-sonnet-4-5"));
        assert!(!m("claude-*-4", "claude-sonnet-4-5"));
        assert!(m("a*b*c", "aXXbYYc"));
    }

    fn p(text: &str) -> ModelPattern {
        ModelPattern::parse(text).unwrap_or_else(|e| panic!("{text}: {e}"))
    }

    #[test]
    fn overlapping_patterns_share_a_model_name() {
        for (a, b) in [
            ("claude-*", "*-opus-5"),
            ("claude-opus-*", "claude-opus-5-5*"),
            ("gpt-6.1-sol", "gpt-6.1-*"),
            ("*", "anything"),
            ("a?c", "a*"),
            ("claude-*-5", "claude-opus-*"),
        ] {
            assert!(p(a).overlaps(&p(b)), "{a} and {b}");
            assert!(p(b).overlaps(&p(a)), "{b} and {a}");
        }
        for (a, b) in [
            ("claude-*", "gpt-*"),
            ("claude-opus-*", "claude-sonnet-*"),
            ("claude-sonet-*", "claude-sonnet-4-5*"),
            ("a?", "abc"),
            ("gpt-4o", "gpt-4o-mini"),
        ] {
            assert!(!p(a).overlaps(&p(b)), "{a} and {b}");
            assert!(!p(b).overlaps(&p(a)), "{b} and {a}");
        }
    }

    #[test]
    fn covering_pattern_matches_every_name_the_other_does() {
        for (a, b) in [
            ("claude-*", "claude-opus-*"),
            ("claude-*", "claude-opus-5"),
            ("*", "*"),
            ("a*", "a?*"),
            ("gpt-?o*", "gpt-4o-mini*"),
        ] {
            assert!(p(a).covers(&p(b)), "{a} covers {b}");
        }
        for (a, b) in [
            ("claude-opus-*", "claude-*"),
            ("claude-?", "claude-*"),
            ("claude-opus-5", "claude-opus-5*"),
            ("a?", "a*"),
        ] {
            assert!(!p(a).covers(&p(b)), "{a} does not cover {b}");
        }
    }

    #[test]
    fn lookups_try_exact_names_then_longer_globs() {
        let mut v = [p("claude-*"), p("claude-opus-5"), p("claude-opus-*")];
        v.sort_by(|a, b| a.lookup_order(b));
        let order: Vec<&str> = v.iter().map(ModelPattern::as_str).collect();
        assert_eq!(order, ["claude-opus-5", "claude-opus-*", "claude-*"]);
    }

    #[test]
    fn rejects_bracket_globs_with_reason() {
        assert_eq!(
            ModelPattern::parse("claude-[ab]").err().as_deref(),
            Some("'[' is not supported in model patterns (only '*' and '?')")
        );
        assert_eq!(
            ModelPattern::parse("").err().as_deref(),
            Some("empty model pattern")
        );
    }
}
