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
