//! The character-class rule as it was written before the in-place, SIMD
//! reader (one table lookup per byte, eight letters at a time in a u64):
//! kept verbatim as the oracle the reader is held to.
#![allow(clippy::indexing_slicing)]

const LETTERS_PER_TOKEN: u64 = 8;
const NON_ASCII_LETTERS_PER_TOKEN: u64 = 3;
const DIGITS_PER_TOKEN: u64 = 3;
const SYMBOLS_PER_TOKEN: u64 = 2;

/// Byte classes of the character-class rule, one table lookup per byte.
const LETTER: u8 = 0;
const DIGIT: u8 = 1;
/// `\n` and `\r`: a line break.
const BREAK: u8 = 2;
/// Space and tab.
const BLANK: u8 = 3;
/// ASCII punctuation and controls other than white space.
const SYMBOL: u8 = 4;
/// Form feed: ASCII white space that is no break and no blank; it starts a
/// symbol run but does not continue one.
const FEED: u8 = 5;
/// The first byte of a multi-byte UTF-8 character (or a continuation byte).
const NON_ASCII: u8 = 6;

// Evaluated at compile time: an out-of-range index would fail the build,
// never a request.
#[allow(clippy::indexing_slicing)]
static CLASS: [u8; 256] = {
    let mut t = [NON_ASCII; 256];
    let mut b = 0;
    while b < 128 {
        let c = b as u8;
        t[b] = if c.is_ascii_alphabetic() {
            LETTER
        } else if c.is_ascii_digit() {
            DIGIT
        } else if c == b'\n' || c == b'\r' {
            BREAK
        } else if c == b' ' || c == b'\t' {
            BLANK
        } else if c == 0x0C {
            FEED
        } else {
            SYMBOL
        };
        b += 1;
    }
    t
};

fn class(b: u8) -> u8 {
    // The table has 256 entries: any u8 indexes it.
    CLASS.get(usize::from(b)).copied().unwrap_or(NON_ASCII)
}

/// Index of the first byte at or after `i` whose class is not in `run`
/// (a bit set of classes), or the length.
fn run_end(bytes: &[u8], i: usize, run: u8) -> usize {
    // An iterator rather than indexing: no bounds check per byte.
    let rest = bytes.get(i..).unwrap_or_default();
    i + rest
        .iter()
        .position(|b| run & (1 << class(*b)) == 0)
        .unwrap_or(rest.len())
}

/// Index of the first byte at or after `i` that is not an ASCII letter.
/// Words are most of a prompt: eight bytes are classified at once (SWAR on
/// a u64), so a word costs one or two steps instead of a step per letter.
fn letters_end(bytes: &[u8], mut i: usize) -> usize {
    const HIGH: u64 = 0x8080_8080_8080_8080;
    while let Some(chunk) = bytes.get(i..i + 8) {
        let Ok(eight) = <[u8; 8]>::try_from(chunk) else {
            break;
        };
        let x = u64::from_le_bytes(eight);
        // Fold case and drop the high bit: letters become 0x61..=0x7a. Adding
        // 0x1f (0x05) sets a byte's high bit iff it is >= 0x61 (>= 0x7b);
        // no byte exceeds 0x7f + 0x1f, so nothing carries into the next one.
        let y = (x | 0x2020_2020_2020_2020) & !HIGH;
        let at_least_a = y.wrapping_add(0x1f1f_1f1f_1f1f_1f1f) & HIGH;
        let past_z = y.wrapping_add(0x0505_0505_0505_0505) & HIGH;
        let letters = at_least_a & !past_z & !x;
        if letters == HIGH {
            i += 8;
            continue;
        }
        return i + ((!letters & HIGH).trailing_zeros() / 8) as usize;
    }
    run_end(bytes, i, 1 << LETTER)
}

/// Tokens of a piece of text by the character-class rule above. ASCII runs
/// are measured with one table lookup per byte (this is the estimator's hot
/// loop, run over every byte of every prompt); only non-ASCII characters are
/// decoded.
pub(super) fn text_tokens(s: &str) -> u64 {
    let bytes = s.as_bytes();
    let mut tokens = 0u64;
    let mut i = 0usize;
    while let Some(&c) = bytes.get(i) {
        let start = i;
        let t = match class(c) {
            LETTER => {
                i = letters_end(bytes, i + 1);
                if bytes.get(i).is_some_and(|b| !b.is_ascii()) {
                    let run = (i - start) as u64;
                    letters_run(s, &mut i, run, false)
                } else {
                    ((i - start) as u64).div_ceil(LETTERS_PER_TOKEN)
                }
            }
            DIGIT => {
                i = run_end(bytes, i + 1, 1 << DIGIT);
                ((i - start) as u64).div_ceil(DIGITS_PER_TOKEN)
            }
            BREAK => {
                // A line break and the indentation after it are one token.
                i = run_end(bytes, i + 1, (1 << BREAK) | (1 << BLANK));
                1
            }
            BLANK => {
                i = run_end(bytes, i + 1, 1 << BLANK);
                // A single space rides on the next word.
                u64::from(i - start > 1)
            }
            SYMBOL | FEED => {
                i = run_end(bytes, i + 1, 1 << SYMBOL);
                ((i - start) as u64).div_ceil(SYMBOLS_PER_TOKEN)
            }
            _ => {
                let Some(ch) = s.get(i..).and_then(|r| r.chars().next()) else {
                    break;
                };
                i += ch.len_utf8();
                if is_one_token_per_char(ch) || !ch.is_alphabetic() {
                    1
                } else {
                    letters_run(s, &mut i, 1, true)
                }
            }
        };
        tokens = tokens.saturating_add(t);
    }
    tokens
}

/// Continues a run of `run` letters that ends just before `*i`; accented
/// and other non-ASCII letters stay in their word, at a denser rate.
fn letters_run(s: &str, i: &mut usize, mut run: u64, mut non_ascii: bool) -> u64 {
    let bytes = s.as_bytes();
    loop {
        match bytes.get(*i) {
            Some(d) if d.is_ascii_alphabetic() => {
                *i += 1;
                run += 1;
            }
            Some(d) if !d.is_ascii() => match s.get(*i..).and_then(|r| r.chars().next()) {
                Some(ch) if ch.is_alphabetic() && !is_one_token_per_char(ch) => {
                    *i += ch.len_utf8();
                    run += 1;
                    non_ascii = true;
                }
                _ => break,
            },
            _ => break,
        }
    }
    if non_ascii {
        run.div_ceil(NON_ASCII_LETTERS_PER_TOKEN)
    } else {
        run.div_ceil(LETTERS_PER_TOKEN)
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
