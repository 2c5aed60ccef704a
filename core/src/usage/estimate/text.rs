//! The text rule: character classes, runs, and the per-string token count
//! (the rule itself is in the [module docs](super)).
//!
//! A string is read once, in place: prompt strings straight from the request
//! body with their JSON escapes ([`json_text_tokens`]), other strings as
//! serde handed them ([`text_tokens`]). Both feed characters to one run
//! counter ([`Runs`]). Most of a prompt is printable ASCII; it is classified
//! 64 bytes at a time into bit masks (`classify`: wasm `simd128`, x86 SSE2,
//! or plain 64-bit arithmetic, all giving the same masks) and whole runs are
//! counted from the masks with a few bit operations. Only escapes, non-ASCII
//! characters and controls are decoded one at a time, and an escape is
//! decoded only to learn the class of the one character it stands for.

use super::classify::{classify, Masks};

const LETTERS_PER_TOKEN: u64 = 8;
const NON_ASCII_LETTERS_PER_TOKEN: u64 = 3;
const DIGITS_PER_TOKEN: u64 = 3;
const SYMBOLS_PER_TOKEN: u64 = 2;

/// What one character is to the rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Class {
    /// An ASCII letter.
    Letter,
    Digit,
    /// `\n` and `\r`: a line break.
    Break,
    /// Space and tab.
    Blank,
    /// ASCII punctuation and controls other than white space.
    Symbol,
    /// Form feed: ASCII white space that is no break and no blank; it starts
    /// a symbol run but does not continue one.
    Feed,
    /// A non-ASCII letter of a script that writes words (accented Latin,
    /// Cyrillic, Greek…): it joins a letter run and makes it denser.
    NonAsciiLetter,
    /// A character that is one token on its own: CJK, kana, Hangul, emoji,
    /// any other non-ASCII symbol.
    Alone,
}

impl Class {
    fn of_ascii(b: u8) -> Class {
        match b {
            b'a'..=b'z' | b'A'..=b'Z' => Class::Letter,
            b'0'..=b'9' => Class::Digit,
            b'\n' | b'\r' => Class::Break,
            b' ' | b'\t' => Class::Blank,
            0x0C => Class::Feed,
            _ => Class::Symbol,
        }
    }

    fn of(c: char) -> Class {
        match u8::try_from(c) {
            Ok(b) if b.is_ascii() => Class::of_ascii(b),
            _ if is_one_token_per_char(c) || !c.is_alphabetic() => Class::Alone,
            _ => Class::NonAsciiLetter,
        }
    }
}

/// Scripts without spaces between words, and pictographs, which byte-pair
/// vocabularies tokenize about one character at a time.
fn is_one_token_per_char(c: char) -> bool {
    matches!(u32::from(c),
        0x1100..=0x11FF     // Hangul Jamo
        | 0x2E80..=0x9FFF   // CJK radicals, kana, CJK ideographs
        | 0xAC00..=0xD7AF   // Hangul syllables
        | 0xF900..=0xFAFF   // CJK compatibility ideographs
        | 0xFF00..=0xFFEF   // full-width forms
        | 0x1F000..=0x1FAFF // emoji and pictographs
        | 0x20000..=0x3FFFF // CJK extensions
    )
}

/// The run a character can continue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum Run {
    #[default]
    None,
    /// ASCII letters only: 8 letters per token.
    Letters,
    /// Letters with at least one non-ASCII letter: 3 per token.
    MixedLetters,
    Digits,
    /// A line break and the breaks and blanks after it: one token.
    Break,
    /// Blanks: one token from two on (a single space rides on the next word).
    Blanks,
    Symbols,
}

/// Counts tokens as characters arrive: the open run and its length, and the
/// tokens of the runs already closed.
#[derive(Debug, Clone, Copy, Default)]
struct Runs {
    tokens: u64,
    run: Run,
    len: u64,
}

impl Runs {
    fn push(&mut self, c: Class) {
        let continues = match (self.run, c) {
            (Run::Letters, Class::NonAsciiLetter) => {
                self.run = Run::MixedLetters;
                true
            }
            (Run::Letters | Run::MixedLetters, Class::Letter | Class::NonAsciiLetter)
            | (Run::Digits, Class::Digit)
            | (Run::Break, Class::Break | Class::Blank)
            | (Run::Blanks, Class::Blank)
            | (Run::Symbols, Class::Symbol) => true,
            _ => false,
        };
        if continues {
            self.len += 1;
            return;
        }
        self.close();
        self.len = 1;
        self.run = match c {
            Class::Letter => Run::Letters,
            Class::NonAsciiLetter => Run::MixedLetters,
            Class::Digit => Run::Digits,
            Class::Break => Run::Break,
            Class::Blank => Run::Blanks,
            Class::Symbol | Class::Feed => Run::Symbols,
            Class::Alone => {
                self.tokens = self.tokens.saturating_add(1);
                self.len = 0;
                Run::None
            }
        };
    }

    fn close(&mut self) {
        let len = self.len;
        let t = match self.run {
            Run::None => 0,
            Run::Letters => len.div_ceil(LETTERS_PER_TOKEN),
            Run::MixedLetters => len.div_ceil(NON_ASCII_LETTERS_PER_TOKEN),
            Run::Digits => len.div_ceil(DIGITS_PER_TOKEN),
            Run::Break => 1,
            Run::Blanks => u64::from(len > 1),
            Run::Symbols => len.div_ceil(SYMBOLS_PER_TOKEN),
        };
        self.tokens = self.tokens.saturating_add(t);
        self.run = Run::None;
        self.len = 0;
    }

    fn finish(mut self) -> u64 {
        self.close();
        self.tokens
    }

    /// Takes the first `n` (1..=64) characters of `m`, every one a letter,
    /// digit, space or ASCII symbol. Runs that close inside them are counted
    /// from the masks: a run of up to `k` characters of a class counted one
    /// token per `k` is one token, so only the rare longer runs are measured
    /// one by one.
    #[inline(always)]
    fn ascii(&mut self, m: &Masks, n: u32) {
        let valid = u64::MAX >> (64 - n.clamp(1, 64));
        let continuing = match self.run {
            Run::None => 0,
            Run::Letters | Run::MixedLetters => m.letter,
            Run::Digits => m.digit,
            Run::Break | Run::Blanks => m.blank,
            Run::Symbols => m.symbol(),
        } & valid;
        let e = continuing.trailing_ones();
        if e >= n {
            self.len += u64::from(n);
            return;
        }
        self.len += u64::from(e);
        self.close();
        // The run holding the last character stays open for what follows.
        let top = n - 1;
        let (last, run) = if m.letter >> top & 1 == 1 {
            (m.letter, Run::Letters)
        } else if m.digit >> top & 1 == 1 {
            (m.digit, Run::Digits)
        } else if m.blank >> top & 1 == 1 {
            (m.blank, Run::Blanks)
        } else {
            (m.symbol(), Run::Symbols)
        };
        // Characters e..top are fresh runs; the last one reaches down from
        // `top` (never below `e`, whose class differs from the run before).
        let fresh = valid & (u64::MAX << e);
        let lo = ((last & fresh) << (63 - top)).leading_ones();
        let closed = fresh & low_bits(n - lo);
        let t = runs_of(m.letter & closed, LETTERS_PER_TOKEN)
            + runs_of(m.digit & closed, DIGITS_PER_TOKEN)
            + runs_of(m.symbol() & closed, SYMBOLS_PER_TOKEN)
            + pairs(m.blank & closed);
        self.tokens = self.tokens.saturating_add(t);
        self.run = run;
        self.len = u64::from(lo);
    }
}

/// The bits below `n` (0..=64).
fn low_bits(n: u32) -> u64 {
    match n {
        0 => 0,
        _ => u64::MAX >> (64 - n.min(64)),
    }
}

/// Tokens of the runs of set bits in `m` (all closed) at one token per
/// started `k` (2, 3 or 8) characters.
fn runs_of(m: u64, k: u64) -> u64 {
    if m == 0 {
        return 0;
    }
    let starts = m & !(m << 1);
    let mut tokens = u64::from(starts.count_ones());
    // Characters with at least `k` of their run before them: only runs
    // longer than `k` have any, and cost more than one token. Runs of 2, 4
    // and 8 are found by doubling.
    let two = m & (m << 1);
    let mut long = match k {
        2 => two & (m << 2),
        3 => two & (two << 2),
        8 => {
            let four = two & (two << 2);
            let eight = four & (four << 4);
            eight & (m << 8)
        }
        _ => (1..=k.min(63)).fold(m, |a, j| a & (m << j)),
    };
    if long == 0 {
        return tokens;
    }
    let ends = m & !(m >> 1);
    while long != 0 {
        let p = long.trailing_zeros();
        let end = p + (ends >> p).trailing_zeros();
        let start = 63 - (starts & (u64::MAX >> (63 - p))).leading_zeros();
        let len = u64::from(end - start + 1);
        tokens += (len - 1) / k;
        long &= u64::MAX.checked_shl(end + 1).unwrap_or(0);
    }
    tokens
}

/// Runs of two or more set bits in `m` (all closed): one token each.
fn pairs(m: u64) -> u64 {
    u64::from((m & (m << 1) & !(m << 2)).count_ones())
}

/// What the character at a special byte was.
enum Step {
    /// A character of this class, `usize` bytes long in the input.
    Char(Class, usize),
    /// The closing quote of a JSON string.
    End,
    /// Not a valid JSON string (or not one this reader vouches for).
    Invalid,
}

/// Reads the character at `bytes[i]`, which `classify` marked special: a
/// control, a non-ASCII byte or, in a JSON string, a quote or backslash.
fn step(bytes: &[u8], i: usize, json: bool) -> Step {
    let Some(&b) = bytes.get(i) else {
        return Step::Invalid;
    };
    if b.is_ascii() {
        return match b {
            b'"' if json => Step::End,
            b'\\' if json => escape(bytes, i),
            // Raw controls are not allowed in a JSON string.
            _ if json && b < 0x20 => Step::Invalid,
            _ => Step::Char(Class::of_ascii(b), 1),
        };
    }
    match utf8_char(bytes, i, b) {
        Some((c, width)) => Step::Char(Class::of(c), width),
        None => Step::Invalid,
    }
}

/// The character whose UTF-8 encoding starts with `b0` at `bytes[i]`, and
/// its width; `None` if the encoding is invalid. Decoded by hand rather
/// than with `str::from_utf8` on its bytes: that call, made for every
/// character of a CJK prompt, cost more than all the rest of its reading
/// (in V8). The checks are UTF-8's: continuation bytes, no overlong form
/// (the code point needs the width), no surrogate and nothing above
/// U+10FFFF (`char::from_u32`).
fn utf8_char(bytes: &[u8], i: usize, b0: u8) -> Option<(char, usize)> {
    let next = |k: usize| {
        bytes
            .get(i + k)
            .filter(|b| *b & 0xC0 == 0x80)
            .map(|b| u32::from(b & 0x3F))
    };
    let (code, width, least) = match b0 {
        0xC2..=0xDF => (u32::from(b0 & 0x1F) << 6 | next(1)?, 2, 0x80),
        0xE0..=0xEF => (
            u32::from(b0 & 0x0F) << 12 | next(1)? << 6 | next(2)?,
            3,
            0x800,
        ),
        0xF0..=0xF4 => (
            u32::from(b0 & 0x07) << 18 | next(1)? << 12 | next(2)? << 6 | next(3)?,
            4,
            0x1_0000,
        ),
        _ => return None,
    };
    if code < least {
        return None;
    }
    Some((char::from_u32(code)?, width))
}

/// The class of the character a JSON escape at `bytes[i]` stands for.
fn escape(bytes: &[u8], i: usize) -> Step {
    let class = match bytes.get(i + 1) {
        Some(b'"' | b'\\' | b'/' | b'b') => Class::Symbol,
        Some(b'f') => Class::Feed,
        Some(b'n' | b'r') => Class::Break,
        Some(b't') => Class::Blank,
        Some(b'u') => {
            let Some(hi) = hex4(bytes, i + 2) else {
                return Step::Invalid;
            };
            // A surrogate pair is one character, `\ud83d\ude00`; a lone
            // surrogate is an error serde reports.
            let (code, len) = match hi {
                0xD800..=0xDBFF => match (bytes.get(i + 6..i + 8), hex4(bytes, i + 8)) {
                    (Some(b"\\u"), Some(lo @ 0xDC00..=0xDFFF)) => {
                        (0x10000 + ((hi - 0xD800) << 10) + (lo - 0xDC00), 12)
                    }
                    _ => return Step::Invalid,
                },
                0xDC00..=0xDFFF => return Step::Invalid,
                _ => (hi, 6),
            };
            return match char::from_u32(code) {
                Some(c) => Step::Char(Class::of(c), len),
                None => Step::Invalid,
            };
        }
        _ => return Step::Invalid,
    };
    Step::Char(class, 2)
}

/// The four hex digits of a `\u` escape at `bytes[i..]`.
pub(super) fn hex4(bytes: &[u8], i: usize) -> Option<u32> {
    let digits = bytes.get(i..i + 4)?;
    digits.iter().try_fold(0u32, |n, d| {
        let v = char::from(*d).to_digit(16)?;
        Some(n << 4 | v)
    })
}

/// What reading a text found.
pub(super) struct Scanned {
    pub(super) tokens: u64,
    /// Where reading stopped: the closing quote, or the end.
    pub(super) end: usize,
    /// JSON escapes met on the way.
    pub(super) escapes: usize,
}

/// Reads `bytes` window by window; `json` says they are the inside of a
/// JSON string (escapes decoded, ends at the closing quote). `None` if the
/// string is not valid JSON.
fn scan(bytes: &[u8], json: bool, classify: impl Fn(&[u8; 64], bool) -> Masks) -> Option<Scanned> {
    scan_runs(Runs::default(), bytes, json, classify).map(|(runs, end, escapes)| Scanned {
        tokens: runs.finish(),
        end,
        escapes,
    })
}

/// [`scan`] continuing from `runs` (a text that arrives in pieces): returns
/// the runs with the run at the end still open, where reading stopped and
/// the escapes met.
fn scan_runs(
    mut runs: Runs,
    bytes: &[u8],
    json: bool,
    classify: impl Fn(&[u8; 64], bool) -> Masks,
) -> Option<(Runs, usize, usize)> {
    let mut base = 0usize;
    let mut escapes = 0usize;
    let mut tail = [0u8; 64];
    loop {
        let window = match bytes.get(base..base + 64) {
            Some(w) => <&[u8; 64]>::try_from(w).ok()?,
            None => {
                // The last bytes, padded with NULs: a control, so special,
                // and past the end.
                let rest = bytes.get(base..).unwrap_or_default();
                tail.fill(0);
                tail.get_mut(..rest.len())?.copy_from_slice(rest);
                &tail
            }
        };
        let m = classify(window, json);
        if m.special == 0 {
            // Most windows of a prompt: 64 plain ASCII characters, read
            // by the same step with its bounds known (inlined for them).
            runs.ascii(&m, 64);
            base += 64;
            continue;
        }
        let mut a = 0u32;
        while a < 64 {
            let special = m.special >> a;
            let b = if special == 0 {
                64
            } else {
                a + special.trailing_zeros()
            };
            if b > a {
                runs.ascii(&m.shifted(a), b - a);
            }
            if b >= 64 {
                a = 64;
                break;
            }
            let i = base + b as usize;
            if i >= bytes.len() {
                return if json {
                    None
                } else {
                    Some((runs, bytes.len(), escapes))
                };
            }
            if json {
                escapes += usize::from(bytes.get(i) == Some(&b'\\'));
            }
            match step(bytes, i, json) {
                Step::Char(c, len) => {
                    runs.push(c);
                    a = b + len as u32;
                }
                Step::End => return Some((runs, i, escapes)),
                Step::Invalid => return None,
            }
        }
        base += a as usize;
    }
}

/// Tokens of a piece of text by the character-class rule.
pub(super) fn text_tokens(s: &str) -> u64 {
    scan(s.as_bytes(), false, classify).map_or(0, |s| s.tokens)
}

/// Tokens of a JSON string read in place: `raw` starts just after its
/// opening quote; `end` is the index of its closing quote. `None` when the
/// string is not valid (a raw control, a bad escape, a lone surrogate, bad
/// UTF-8, no closing quote): serde then reads it and reports the error.
pub(super) fn json_text_tokens(raw: &[u8]) -> Option<Scanned> {
    scan(raw, true, classify)
}

/// Counts a text that arrives in pieces (the deltas of a streamed answer)
/// by the same rule as one string: a run open at the end of one piece
/// continues into the next, so the count is the count of the pieces joined.
/// Copy-sized: a stream keeps one and never allocates for it.
#[derive(Debug, Clone, Copy, Default)]
pub struct TextCounter {
    runs: Runs,
}

impl TextCounter {
    /// Adds a JSON string read in place: `raw` starts just after its opening
    /// quote. Returns the index of the closing quote, or `None` (and adds
    /// nothing) when it is not a valid JSON string.
    pub fn push_json(&mut self, raw: &[u8]) -> Option<usize> {
        let (runs, end, _) = scan_runs(self.runs, raw, true, classify)?;
        self.runs = runs;
        Some(end)
    }

    /// Tokens of everything added so far.
    pub fn tokens(&self) -> u64 {
        self.runs.finish()
    }
}

#[cfg(test)]
pub(super) fn text_tokens_with(
    s: &[u8],
    json: bool,
    classify: impl Fn(&[u8; 64], bool) -> Masks,
) -> Option<(u64, usize)> {
    scan(s, json, classify).map(|s| (s.tokens, s.end))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_rule_counts_words_numbers_symbols_and_dense_scripts() {
        assert_eq!(text_tokens(""), 0);
        // 9 short words; the single spaces ride on the words.
        assert_eq!(
            text_tokens("the quick brown fox jumps over the lazy dog"),
            9
        );
        // Long words cost one token per started 8 letters.
        assert_eq!(text_tokens("internationalization"), 3);
        // "2025" is two 3-digit groups; each "-" and "." one symbol token.
        assert_eq!(text_tokens("2025-11-23."), 2 + 1 + 1 + 1 + 1 + 1);
        // A line break and its indentation are one token.
        assert_eq!(text_tokens("a\n        b"), 3);
        assert_eq!(text_tokens("a\r\nb"), 3);
        // CJK is about one token per character.
        assert_eq!(text_tokens("速率限制器"), 5);
        // Accented letters stay in their word, at 3 letters per token.
        assert_eq!(text_tokens("déjà"), 2);
        assert_eq!(text_tokens("привет мир"), 2 + 1);
    }

    /// A streamed answer's text arrives in deltas cut between any two
    /// characters, even inside a word: the count is the count of the text
    /// joined, whatever the cuts.
    #[test]
    fn text_counted_in_pieces_counts_as_the_pieces_joined() {
        let text = "internationalization\n  of 2025-11-23: 速率 déjà \"vu\" 🙂 end";
        let whole = text_tokens(text);
        let chars: Vec<(usize, char)> = text.char_indices().collect();
        for &(cut, _) in &chars {
            for &(cut2, _) in chars.iter().filter(|(i, _)| *i >= cut) {
                let mut counter = TextCounter::default();
                for piece in [&text[..cut], &text[cut..cut2], &text[cut2..]] {
                    let json = serde_json::to_string(piece).unwrap();
                    let raw = &json.as_bytes()[1..];
                    assert_eq!(counter.push_json(raw), Some(raw.len() - 1));
                }
                assert_eq!(counter.tokens(), whole, "cut at {cut} and {cut2}");
            }
        }
        // Long words cost as one word, not as two halves.
        let mut counter = TextCounter::default();
        counter.push_json(b"internation\"").unwrap();
        counter.push_json(b"alization\"").unwrap();
        assert_eq!(counter.tokens(), 3);
        // An invalid string adds nothing.
        assert_eq!(counter.push_json(b"bad \\q escape\""), None);
        assert_eq!(counter.push_json(b"no closing quote"), None);
        assert_eq!(counter.tokens(), 3);
    }
}
