//! Reads a request body once, without building a DOM of the prompt: the
//! scalar fields (model, max_tokens, stream, stream_options) are read as
//! small values; the prompt fields are walked by a serde visitor that adds up
//! an estimate as the strings stream past and keeps nothing else.
//!
//! # The estimate rule
//!
//! Providers tokenize with byte-pair encodings whose tokens follow word
//! boundaries, so the rule counts by character class rather than dividing a
//! length by a constant (which is wrong by 2–4× for code or Chinese):
//!
//! - a run of letters is one token per started 8 letters (a leading space
//!   belongs to the word); 3 letters per token when the run has non-ASCII
//!   letters (accented Latin, Cyrillic, Greek…);
//! - a run of digits is one token per started 3 digits;
//! - a run of ASCII punctuation is one token per started 2 characters
//!   (`",`, `":`, `();`);
//! - a line break and the indentation after it are one token; a run of two
//!   or more spaces is one token; a single space is free;
//! - each CJK ideograph, kana, Hangul syllable, emoji or other non-ASCII
//!   symbol is one token;
//! - a string of 256 or more base64 characters that is no known media type
//!   is one token per 3 characters;
//! - `tools` / `functions`, a `tool_use` block's `input`, `response_format`
//!   and Responses `text` are shown to the model as JSON: every key costs its
//!   text plus 2 tokens (`"key":`), every string value 1 more (its quotes),
//!   every number or literal 1.
//!
//! Framing, from the providers' documentation: Anthropic adds about 4 tokens
//! per request, 3 per message and 3 for a system prompt; tools add its
//! tool-use system prompt (346 tokens with `tool_choice` auto or none, 313
//! with any or a named tool, for the Claude 4 family). OpenAI adds 3 per
//! message and 3 to prime the reply (Responses `instructions` count as a
//! message); tools add about 12.
//!
//! Media are counted per item, never by their base64 length:
//!
//! - images: the dimensions are read from the base64 header (PNG, JPEG, GIF,
//!   WebP). Anthropic: `width × height / 750` after scaling the long edge to
//!   at most 1,568 px, capped at 1,600; 1,600 when the size is unknown (a URL,
//!   a file id, an unreadable header). OpenAI (GPT-4o-style tiles): 85 at
//!   `detail: low`; otherwise fit in 2048×2048, shortest side down to 768,
//!   then 85 + 170 per 512-px tile; 765 (a 1024×1024 image) when unknown;
//! - PDF documents: 2,000 tokens per page (Anthropic documents 1,500–3,000
//!   per page: the extracted text plus the page as an image), pages counted
//!   from the decoded file's `/Type /Page` objects (the first 4 MiB,
//!   extrapolated beyond); when the page objects are compressed, 2,000 per
//!   started 50 KB of data; one page when only a URL or file id is given;
//! - plain-text documents count as text.
//!
//! The estimate only sizes the reservation made before the request goes
//! upstream; settlement replaces it with the provider's own count. It is
//! measured against the recorded exchanges by
//! `estimator_error_against_every_fixture_is_reported_and_bounded`.

use super::{RequestError, RequestInfo};
use crate::route::{Provider, Route};
use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use std::borrow::Cow;
use std::fmt;

const LETTERS_PER_TOKEN: u64 = 8;
const NON_ASCII_LETTERS_PER_TOKEN: u64 = 3;
const DIGITS_PER_TOKEN: u64 = 3;
const SYMBOLS_PER_TOKEN: u64 = 2;

const ANTHROPIC_BASE: u64 = 4;
const ANTHROPIC_PER_MESSAGE: u64 = 3;
const ANTHROPIC_SYSTEM: u64 = 3;
const ANTHROPIC_TOOL_PROMPT_AUTO: u64 = 346;
const ANTHROPIC_TOOL_PROMPT_ANY: u64 = 313;
const OPENAI_REPLY_PRIMING: u64 = 3;
const OPENAI_PER_MESSAGE: u64 = 3;
const OPENAI_TOOLS: u64 = 12;

const ANTHROPIC_IMAGE_MAX_EDGE: f64 = 1568.0;
const ANTHROPIC_IMAGE_PIXELS_PER_TOKEN: f64 = 750.0;
const ANTHROPIC_IMAGE_MAX_TOKENS: u64 = 1_600;
const OPENAI_IMAGE_LOW: u64 = 85;
const OPENAI_IMAGE_PER_TILE: u64 = 170;
const OPENAI_IMAGE_UNKNOWN: u64 = 765;

const PDF_TOKENS_PER_PAGE: u64 = 2_000;
const PDF_BYTES_PER_PAGE: u64 = 50_000;
/// Decoded bytes of a PDF scanned for page objects; larger files are
/// extrapolated, so a 30 MB upload costs milliseconds, not a full decode.
const PDF_SCAN_BYTES: usize = 4 << 20;
/// Decoded bytes of an image searched for its dimensions (a JPEG's frame
/// header follows its EXIF and ICC segments, each at most 64 KiB).
const IMAGE_SCAN_BYTES: usize = 1 << 20;
/// Strings at least this long made only of base64 characters are treated as
/// opaque data (an image in an unknown format, a file), not words.
const BLOB_MIN_CHARS: usize = 256;

// ---------------------------------------------------------------- text

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
fn text_tokens(s: &str) -> u64 {
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

// ---------------------------------------------------------------- media

/// Media found in a string, settled once its block says what it is.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Media {
    Image(Option<(u32, u32)>),
    Pdf {
        pages: Option<u64>,
        bytes: u64,
    },
    /// Base64 of an unrecognised kind; `text` is what it costs as text.
    Blob {
        bytes: u64,
        text: u64,
    },
}

/// Decodes standard or URL-safe base64 lazily, skipping line breaks, and
/// stops at padding.
struct Base64<'a> {
    input: std::slice::Iter<'a, u8>,
    acc: u32,
    bits: u32,
}

impl<'a> Base64<'a> {
    fn new(s: &'a str) -> Base64<'a> {
        Base64 {
            input: s.as_bytes().iter(),
            acc: 0,
            bits: 0,
        }
    }
}

impl Iterator for Base64<'_> {
    type Item = u8;
    fn next(&mut self) -> Option<u8> {
        loop {
            if self.bits >= 8 {
                self.bits -= 8;
                return Some((self.acc >> self.bits) as u8);
            }
            let c = *self.input.next()?;
            let v = match c {
                b'A'..=b'Z' => c - b'A',
                b'a'..=b'z' => c - b'a' + 26,
                b'0'..=b'9' => c - b'0' + 52,
                b'+' | b'-' => 62,
                b'/' | b'_' => 63,
                b'=' => return None,
                _ => continue,
            };
            self.acc = ((self.acc << 6) | u32::from(v)) & 0xFF_FFFF;
            self.bits += 6;
        }
    }
}

fn is_base64_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'-' | b'_' | b'=' | b'\n' | b'\r')
}

/// Recognises inline media: a `data:` URL with base64, bare base64 whose
/// first bytes are an image or PDF signature, or any other base64 run of at
/// least [`BLOB_MIN_CHARS`]. Prose has spaces and fails the alphabet check at
/// its first word.
fn sniff_media(s: &str) -> Option<Media> {
    let (mime, payload) = match s.strip_prefix("data:") {
        Some(rest) => {
            let comma = rest.find(',')?;
            let (head, body) = rest.split_at(comma);
            let mime = head.strip_suffix(";base64")?;
            (Some(mime), body.get(1..).unwrap_or_default())
        }
        None => (None, s),
    };
    let mut head = [0u8; 4];
    for (slot, b) in head
        .iter_mut()
        .zip(Base64::new(payload.get(..8).unwrap_or(payload)))
    {
        *slot = b;
    }
    let signed = matches!(
        &head,
        b"%PDF" | b"\x89PNG" | b"GIF8" | b"RIFF" | [0xFF, 0xD8, 0xFF, _]
    );
    let long = payload.len() >= BLOB_MIN_CHARS;
    if mime.is_none()
        && (!(signed || long) || payload.len() < 16 || !payload.bytes().all(is_base64_char))
    {
        return None;
    }
    let bytes = (payload.len() as u64) * 3 / 4;
    if &head == b"%PDF" || mime == Some("application/pdf") {
        return Some(Media::Pdf {
            pages: pdf_pages(payload, bytes),
            bytes,
        });
    }
    let dims = image_dims(Base64::new(payload).take(IMAGE_SCAN_BYTES));
    if dims.is_some() || mime.is_some_and(|m| m.starts_with("image/")) {
        return Some(Media::Image(dims));
    }
    // Base64 shown as text tokenizes at about 3 characters per token.
    Some(Media::Blob {
        bytes,
        text: (payload.len() as u64).div_ceil(3),
    })
}

fn be16(b: &[u8], i: usize) -> Option<u32> {
    Some(u32::from(*b.get(i)?) << 8 | u32::from(*b.get(i + 1)?))
}

fn le16(b: &[u8], i: usize) -> Option<u32> {
    Some(u32::from(*b.get(i)?) | u32::from(*b.get(i + 1)?) << 8)
}

fn le24(b: &[u8], i: usize) -> Option<u32> {
    Some(le16(b, i)? | u32::from(*b.get(i + 2)?) << 16)
}

/// Width and height from an image file's header.
fn image_dims(mut bytes: impl Iterator<Item = u8>) -> Option<(u32, u32)> {
    let mut h = [0u8; 30];
    let mut n = 0;
    for slot in h.iter_mut() {
        match bytes.next() {
            Some(b) => *slot = b,
            None => break,
        }
        n += 1;
    }
    let h = h.get(..n)?;
    let dims = if h.starts_with(b"\x89PNG\r\n\x1a\n") && h.get(12..16) == Some(b"IHDR") {
        (
            be16(h, 16)? << 16 | be16(h, 18)?,
            be16(h, 20)? << 16 | be16(h, 22)?,
        )
    } else if h.starts_with(b"GIF8") {
        (le16(h, 6)?, le16(h, 8)?)
    } else if h.starts_with(b"RIFF") && h.get(8..12) == Some(b"WEBP") {
        match h.get(12..16)? {
            b"VP8 " => (le16(h, 26)? & 0x3FFF, le16(h, 28)? & 0x3FFF),
            b"VP8L" => {
                let b = le24(h, 21)? | u32::from(*h.get(24)?) << 24;
                ((b & 0x3FFF) + 1, ((b >> 14) & 0x3FFF) + 1)
            }
            b"VP8X" => (le24(h, 24)? + 1, le24(h, 27)? + 1),
            _ => return None,
        }
    } else if h.starts_with(b"\xFF\xD8") {
        jpeg_dims(h.get(2..)?.iter().copied().chain(bytes))?
    } else {
        return None;
    };
    (dims.0 > 0 && dims.1 > 0).then_some(dims)
}

/// Walks JPEG segments to the first start-of-frame marker.
fn jpeg_dims(mut b: impl Iterator<Item = u8>) -> Option<(u32, u32)> {
    loop {
        if b.next()? != 0xFF {
            return None;
        }
        let mut marker = b.next()?;
        while marker == 0xFF {
            marker = b.next()?;
        }
        match marker {
            // Standalone markers have no length.
            0x01 | 0xD0..=0xD7 => continue,
            // End of image or start of scan before any frame header.
            0xD9 | 0xDA => return None,
            _ => {}
        }
        let len = u32::from(b.next()?) << 8 | u32::from(b.next()?);
        // SOF0–SOF15, except DHT (C4), JPG (C8) and DAC (CC).
        if matches!(marker, 0xC0..=0xCF) && !matches!(marker, 0xC4 | 0xC8 | 0xCC) {
            let _precision = b.next()?;
            let height = u32::from(b.next()?) << 8 | u32::from(b.next()?);
            let width = u32::from(b.next()?) << 8 | u32::from(b.next()?);
            return Some((width, height));
        }
        for _ in 0..len.checked_sub(2)? {
            b.next()?;
        }
    }
}

/// Counts `/Type /Page` objects (not the `/Pages` tree) in a base64 PDF.
fn pdf_pages(payload: &str, bytes: u64) -> Option<u64> {
    const TYPE: &[u8] = b"/Type";
    const PAGE: &[u8] = b"/Page";
    #[derive(Clone, Copy)]
    enum St {
        Scan,
        AfterType,
        Page(usize),
        AfterPage,
    }
    let mut st = St::Scan;
    let mut window = [0u8; 5];
    let mut pages = 0u64;
    let mut scanned = 0u64;
    for b in Base64::new(payload).take(PDF_SCAN_BYTES) {
        scanned += 1;
        st = match st {
            St::AfterType if b.is_ascii_whitespace() => St::AfterType,
            St::AfterType if b == b'/' => St::Page(1),
            St::Page(i) if PAGE.get(i) == Some(&b) => {
                if i + 1 == PAGE.len() {
                    St::AfterPage
                } else {
                    St::Page(i + 1)
                }
            }
            St::AfterPage => {
                if !b.is_ascii_alphanumeric() {
                    pages += 1;
                }
                St::Scan
            }
            _ => St::Scan,
        };
        window.rotate_left(1);
        if let Some(last) = window.last_mut() {
            *last = b;
        }
        if window == TYPE {
            st = St::AfterType;
        }
    }
    if pages == 0 || scanned == 0 {
        return None;
    }
    // Only a prefix was scanned: pages are spread through the file.
    Some(if scanned >= PDF_SCAN_BYTES as u64 && bytes > scanned {
        (pages as f64 * bytes as f64 / scanned as f64).ceil() as u64
    } else {
        pages
    })
}

fn image_tokens(provider: Provider, dims: Option<(u32, u32)>, low_detail: bool) -> u64 {
    match provider {
        Provider::Anthropic => {
            let Some((w, h)) = dims else {
                return ANTHROPIC_IMAGE_MAX_TOKENS;
            };
            let (w, h) = (f64::from(w), f64::from(h));
            let scale = (ANTHROPIC_IMAGE_MAX_EDGE / w.max(h)).min(1.0);
            let t = (w * scale) * (h * scale) / ANTHROPIC_IMAGE_PIXELS_PER_TOKEN;
            (t.ceil() as u64).clamp(1, ANTHROPIC_IMAGE_MAX_TOKENS)
        }
        Provider::OpenAi => {
            if low_detail {
                return OPENAI_IMAGE_LOW;
            }
            let Some((w, h)) = dims else {
                return OPENAI_IMAGE_UNKNOWN;
            };
            let (mut w, mut h) = (f64::from(w), f64::from(h));
            let fit = (2048.0 / w.max(h)).min(1.0);
            w *= fit;
            h *= fit;
            let short = (768.0 / w.min(h)).min(1.0);
            w *= short;
            h *= short;
            let tiles = (w / 512.0).ceil() as u64 * (h / 512.0).ceil() as u64;
            OPENAI_IMAGE_LOW + OPENAI_IMAGE_PER_TILE * tiles.max(1)
        }
    }
}

fn pdf_tokens(pages: Option<u64>, bytes: u64) -> u64 {
    let pages = pages.unwrap_or_else(|| bytes.div_ceil(PDF_BYTES_PER_PAGE).max(1));
    pages.saturating_mul(PDF_TOKENS_PER_PAGE)
}

// ---------------------------------------------------------------- walking

/// What a subtree of the prompt adds up to.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
struct Tally {
    /// Settled tokens: text, framing, media whose kind is known.
    tokens: u64,
    /// Media seen in a string, waiting for its block's `type` and `detail`.
    pending: Option<Media>,
    /// `detail: "low"` (OpenAI images).
    low_detail: bool,
    /// The content is only referenced (a URL or file id), size unknown.
    remote: bool,
}

impl Tally {
    fn tokens(tokens: u64) -> Tally {
        Tally {
            tokens,
            ..Tally::default()
        }
    }

    fn add(&mut self, provider: Provider, o: Tally) {
        if o.pending.is_some() {
            self.settle(provider);
            self.pending = o.pending;
        }
        self.tokens = self.tokens.saturating_add(o.tokens);
        self.low_detail |= o.low_detail;
        self.remote |= o.remote;
    }

    /// Charges pending media by their own kind (outside any typed block).
    fn settle(&mut self, provider: Provider) {
        let t = match self.pending.take() {
            None => 0,
            Some(Media::Image(dims)) => image_tokens(provider, dims, self.low_detail),
            Some(Media::Pdf { pages, bytes }) => pdf_tokens(pages, bytes),
            Some(Media::Blob { text, .. }) => text,
        };
        self.tokens = self.tokens.saturating_add(t);
    }
}

/// A content block's `type`, as far as the estimate cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Image,
    Document,
    /// An Anthropic `source` of type `url`: the content is elsewhere.
    Remote,
    /// Encrypted reasoning handed back to the provider; not input text.
    Opaque,
    Other,
}

impl Kind {
    fn of(tag: &str) -> Kind {
        match tag {
            "image" | "image_url" | "input_image" => Kind::Image,
            // Anthropic `document`, a Files API `source` of type `file`, and
            // OpenAI's chat `file` / Responses `input_file` parts.
            "document" | "file" | "input_file" => Kind::Document,
            "url" => Kind::Remote,
            "redacted_thinking" | "reasoning" => Kind::Opaque,
            _ => Kind::Other,
        }
    }
}

/// How a subtree is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Prompt content: strings are text, blocks are typed.
    Prompt,
    /// A list of messages: each element adds per-message framing.
    Messages,
    /// Shown to the model as JSON (tool definitions, tool inputs).
    Json,
}

#[derive(Clone, Copy)]
struct Walk {
    provider: Provider,
    mode: Mode,
}

impl Walk {
    fn with(self, mode: Mode) -> Walk {
        Walk { mode, ..self }
    }

    fn per_message(self) -> u64 {
        match self.provider {
            Provider::Anthropic => ANTHROPIC_PER_MESSAGE,
            Provider::OpenAi => OPENAI_PER_MESSAGE,
        }
    }
}

impl<'de> DeserializeSeed<'de> for Walk {
    type Value = Tally;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Tally, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Walk {
    type Value = Tally;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_str<E>(self, s: &str) -> Result<Tally, E> {
        Ok(match self.mode {
            Mode::Json => Tally::tokens(text_tokens(s).saturating_add(1)),
            Mode::Prompt | Mode::Messages => {
                let mut t = match sniff_media(s) {
                    Some(m) => Tally {
                        pending: Some(m),
                        ..Tally::default()
                    },
                    None => Tally::tokens(text_tokens(s)),
                };
                // A bare string where messages are expected (the Responses
                // API's `input`) is one user message.
                if self.mode == Mode::Messages {
                    t.settle(self.provider);
                    t.tokens = t.tokens.saturating_add(self.per_message());
                }
                t
            }
        })
    }
    fn visit_bool<E>(self, _: bool) -> Result<Tally, E> {
        Ok(Tally::tokens(1))
    }
    fn visit_i64<E>(self, _: i64) -> Result<Tally, E> {
        Ok(Tally::tokens(1))
    }
    fn visit_u64<E>(self, _: u64) -> Result<Tally, E> {
        Ok(Tally::tokens(1))
    }
    fn visit_f64<E>(self, _: f64) -> Result<Tally, E> {
        Ok(Tally::tokens(1))
    }
    fn visit_unit<E>(self) -> Result<Tally, E> {
        Ok(Tally::tokens(u64::from(self.mode == Mode::Json)))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Tally, A::Error> {
        let mut total = Tally::tokens(u64::from(self.mode == Mode::Json));
        let element = match self.mode {
            Mode::Messages => self.with(Mode::Prompt),
            m => self.with(m),
        };
        while let Some(mut t) = seq.next_element_seed(element)? {
            // Media do not travel past their list element.
            t.settle(self.provider);
            if self.mode == Mode::Messages {
                t.tokens = t.tokens.saturating_add(self.per_message());
            }
            total.add(self.provider, t);
        }
        Ok(total)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Tally, A::Error> {
        if self.mode == Mode::Json {
            let mut t = Tally::tokens(1);
            while let Some(key) = map.next_key::<Cow<'de, str>>()? {
                let v = map.next_value_seed(self)?;
                t.add(
                    self.provider,
                    Tally::tokens(text_tokens(&key).saturating_add(2)),
                );
                t.add(self.provider, v);
            }
            return Ok(t);
        }
        let inner = self.with(Mode::Prompt);
        let mut t = Tally::default();
        let mut kind = Kind::Other;
        while let Some(key) = map.next_key::<Cow<'de, str>>()? {
            match key.as_ref() {
                "type" => {
                    kind = map
                        .next_value_seed(Tag)?
                        .map_or(Kind::Other, |k| Kind::of(&k))
                }
                "detail" => t.low_detail = map.next_value_seed(Tag)?.as_deref() == Some("low"),
                "file_id" | "file_url" => {
                    map.next_value::<IgnoredAny>()?;
                    t.remote = true;
                }
                // Framing and identifiers the model does not see as text,
                // and the signatures of reasoning blocks.
                "role" | "media_type" | "cache_control" | "signature" | "id" | "tool_use_id"
                | "call_id" | "status" | "encrypted_content" | "citations" => {
                    map.next_value::<IgnoredAny>()?;
                }
                // A tool call's arguments reach the model as JSON.
                "input" => t.add(self.provider, map.next_value_seed(inner.with(Mode::Json))?),
                _ => t.add(self.provider, map.next_value_seed(inner)?),
            }
        }
        Ok(match kind {
            Kind::Image => {
                let dims = match t.pending {
                    Some(Media::Image(d)) => d,
                    _ => None,
                };
                Tally::tokens(image_tokens(self.provider, dims, t.low_detail))
            }
            Kind::Document => {
                let media = match t.pending.take() {
                    Some(Media::Pdf { pages, bytes }) => pdf_tokens(pages, bytes),
                    Some(Media::Blob { bytes, .. }) => pdf_tokens(None, bytes),
                    Some(Media::Image(d)) => image_tokens(self.provider, d, t.low_detail),
                    // Only a URL or file id: one page.
                    None if t.remote => return Ok(Tally::tokens(pdf_tokens(Some(1), 0))),
                    // A plain-text document is its text.
                    None => 0,
                };
                Tally::tokens(t.tokens.saturating_add(media))
            }
            Kind::Remote => Tally {
                remote: true,
                ..Tally::default()
            },
            Kind::Opaque => Tally::default(),
            Kind::Other => t,
        })
    }
}

/// The value of a `type` / `detail` / `tool_choice` field if it is a string,
/// or an object's own `type`; anything else is skipped.
struct Tag;

impl<'de> DeserializeSeed<'de> for Tag {
    type Value = Option<String>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Option<String>, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Tag {
    type Value = Option<String>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a type tag")
    }
    fn visit_str<E>(self, s: &str) -> Result<Option<String>, E> {
        Ok(Some(s.to_string()))
    }
    fn visit_bool<E>(self, _: bool) -> Result<Option<String>, E> {
        Ok(None)
    }
    fn visit_i64<E>(self, _: i64) -> Result<Option<String>, E> {
        Ok(None)
    }
    fn visit_u64<E>(self, _: u64) -> Result<Option<String>, E> {
        Ok(None)
    }
    fn visit_f64<E>(self, _: f64) -> Result<Option<String>, E> {
        Ok(None)
    }
    fn visit_unit<E>(self) -> Result<Option<String>, E> {
        Ok(None)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Option<String>, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(None)
    }
    /// `tool_choice: {"type": "any"}`: the object's own `type`.
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Option<String>, A::Error> {
        let mut tag = None;
        while let Some(key) = map.next_key::<Cow<'de, str>>()? {
            if key == "type" {
                tag = map.next_value_seed(Tag)?;
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(tag)
    }
}

// ---------------------------------------------------------------- scalars

/// A top-level scalar field, kept small: objects and arrays in its place are
/// skipped, not built.
#[derive(Debug, Clone, PartialEq)]
enum Scalar {
    Null,
    Bool(bool),
    U64(u64),
    Str(String),
    /// A negative or fractional number, an object, an array.
    Other,
}

impl<'de> serde::Deserialize<'de> for Scalar {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Scalar, D::Error> {
        d.deserialize_any(ScalarVisitor)
    }
}

struct ScalarVisitor;

impl<'de> Visitor<'de> for ScalarVisitor {
    type Value = Scalar;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_str<E>(self, s: &str) -> Result<Scalar, E> {
        Ok(Scalar::Str(s.to_string()))
    }
    fn visit_bool<E>(self, b: bool) -> Result<Scalar, E> {
        Ok(Scalar::Bool(b))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Scalar, E> {
        Ok(Scalar::U64(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Scalar, E> {
        Ok(u64::try_from(v).map_or(Scalar::Other, Scalar::U64))
    }
    fn visit_f64<E>(self, _: f64) -> Result<Scalar, E> {
        Ok(Scalar::Other)
    }
    fn visit_unit<E>(self) -> Result<Scalar, E> {
        Ok(Scalar::Null)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Scalar, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Scalar::Other)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Scalar, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(Scalar::Other)
    }
}

/// `stream_options.include_usage` if `stream_options` is an object and the
/// field a boolean; any other value is skipped.
struct IncludeUsage;

impl<'de> DeserializeSeed<'de> for IncludeUsage {
    type Value = Option<bool>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Option<bool>, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for IncludeUsage {
    type Value = Option<bool>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("stream options")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Option<bool>, A::Error> {
        let mut include = None;
        while let Some(key) = map.next_key::<Cow<'de, str>>()? {
            if key == "include_usage" {
                include = match map.next_value()? {
                    Scalar::Bool(b) => Some(b),
                    _ => None,
                };
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(include)
    }
    fn visit_bool<E>(self, _: bool) -> Result<Option<bool>, E> {
        Ok(None)
    }
    fn visit_i64<E>(self, _: i64) -> Result<Option<bool>, E> {
        Ok(None)
    }
    fn visit_u64<E>(self, _: u64) -> Result<Option<bool>, E> {
        Ok(None)
    }
    fn visit_f64<E>(self, _: f64) -> Result<Option<bool>, E> {
        Ok(None)
    }
    fn visit_str<E>(self, _: &str) -> Result<Option<bool>, E> {
        Ok(None)
    }
    fn visit_unit<E>(self) -> Result<Option<bool>, E> {
        Ok(None)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Option<bool>, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(None)
    }
}

// ---------------------------------------------------------------- request

/// The top-level request object.
struct Request {
    route: Route,
}

#[derive(Default)]
struct Fields {
    model: Option<Scalar>,
    /// With the field name it came from, for the error message.
    max_tokens: Option<(&'static str, Scalar)>,
    stream: Option<Scalar>,
    include_usage: Option<bool>,
    prompt: Tally,
    has_system: bool,
    tools: Option<Tally>,
    tool_choice: Option<String>,
}

impl<'de> Visitor<'de> for Request {
    type Value = Fields;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Fields, A::Error> {
        let provider = self.route.provider();
        let walk = Walk {
            provider,
            mode: Mode::Prompt,
        };
        let mut f = Fields::default();
        while let Some(key) = map.next_key::<Cow<'de, str>>()? {
            match (key.as_ref(), self.route) {
                ("model", _) => f.model = Some(map.next_value()?),
                ("stream", _) => f.stream = Some(map.next_value()?),
                ("stream_options", _) => f.include_usage = map.next_value_seed(IncludeUsage)?,
                ("max_output_tokens", Route::OpenAiResponses) => {
                    f.max_tokens = Some(("max_output_tokens", map.next_value()?))
                }
                // `max_completion_tokens` supersedes the deprecated `max_tokens`.
                ("max_completion_tokens", Route::OpenAiChat) => {
                    f.max_tokens = Some(("max_completion_tokens", map.next_value()?))
                }
                ("max_tokens", r) if r != Route::OpenAiResponses => {
                    let v = map.next_value()?;
                    if !matches!(f.max_tokens, Some(("max_completion_tokens", _))) {
                        f.max_tokens = Some(("max_tokens", v));
                    }
                }
                ("messages" | "input", _) => {
                    let mut t = map.next_value_seed(walk.with(Mode::Messages))?;
                    t.settle(provider);
                    f.prompt.add(provider, t);
                }
                ("system" | "instructions", _) => {
                    let mut t = map.next_value_seed(walk)?;
                    t.settle(provider);
                    f.has_system = true;
                    f.prompt.add(provider, t);
                }
                ("tools" | "functions", _) => {
                    let t = map.next_value_seed(walk.with(Mode::Json))?;
                    f.tools.get_or_insert_with(Tally::default).add(provider, t);
                }
                ("tool_choice", _) => f.tool_choice = map.next_value_seed(Tag)?,
                // Structured-output schemas are shown to the model.
                ("response_format", Route::OpenAiChat) | ("text", Route::OpenAiResponses) => {
                    let t = map.next_value_seed(walk.with(Mode::Json))?;
                    f.prompt.add(provider, t);
                }
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(f)
    }
}

impl<'de> DeserializeSeed<'de> for Request {
    type Value = Fields;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Fields, D::Error> {
        d.deserialize_map(self)
    }
}

fn tokens(route: Route, f: &Fields) -> u64 {
    let prompt = f.prompt.tokens;
    match route.provider() {
        Provider::Anthropic => {
            let tools = f.tools.map_or(0, |t| {
                let prompt = match f.tool_choice.as_deref() {
                    Some("any" | "tool") => ANTHROPIC_TOOL_PROMPT_ANY,
                    _ => ANTHROPIC_TOOL_PROMPT_AUTO,
                };
                t.tokens.saturating_add(prompt)
            });
            ANTHROPIC_BASE
                .saturating_add(prompt)
                .saturating_add(tools)
                .saturating_add(if f.has_system { ANTHROPIC_SYSTEM } else { 0 })
        }
        Provider::OpenAi => {
            let tools = f.tools.map_or(0, |t| t.tokens.saturating_add(OPENAI_TOOLS));
            // Responses `instructions` become a system message.
            let instructions = if route == Route::OpenAiResponses && f.has_system {
                OPENAI_PER_MESSAGE
            } else {
                0
            };
            OPENAI_REPLY_PRIMING
                .saturating_add(prompt)
                .saturating_add(tools)
                .saturating_add(instructions)
        }
    }
}

pub fn inspect(route: Route, body: &[u8]) -> Result<RequestInfo, RequestError> {
    let first = body.iter().find(|b| !b.is_ascii_whitespace());
    if first.is_some_and(|b| *b != b'{') {
        return Err(RequestError(
            "request body must be a JSON object".to_string(),
        ));
    }
    let mut de = serde_json::Deserializer::from_slice(body);
    let f = Request { route }
        .deserialize(&mut de)
        .and_then(|f| de.end().map(|()| f))
        .map_err(|e| RequestError(format!("request body is not valid JSON: {e}")))?;
    let model = match f.model.as_ref() {
        None | Some(Scalar::Null) => None,
        Some(Scalar::Str(m)) if !m.trim().is_empty() => Some(m.clone()),
        Some(_) => {
            return Err(RequestError(
                "model: must be a non-empty string".to_string(),
            ))
        }
    };
    let max_tokens = match &f.max_tokens {
        None | Some((_, Scalar::Null)) => None,
        Some((_, Scalar::U64(v))) => Some(*v),
        Some((name, _)) => {
            return Err(RequestError(format!(
                "{name}: must be a non-negative integer"
            )))
        }
    };
    let stream = match &f.stream {
        None | Some(Scalar::Null) => false,
        Some(Scalar::Bool(b)) => *b,
        Some(_) => return Err(RequestError("stream: must be true or false".to_string())),
    };
    Ok(RequestInfo {
        model,
        max_tokens,
        stream,
        include_usage: f.include_usage,
        input_estimate: tokens(route, &f),
    })
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

    fn b64(bytes: &[u8]) -> String {
        const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut out = String::new();
        for c in bytes.chunks(3) {
            let n = c
                .iter()
                .enumerate()
                .fold(0u32, |n, (i, b)| n | (u32::from(*b) << (16 - 8 * i)));
            for i in 0..4 {
                if i <= c.len() {
                    out.push(A[((n >> (18 - 6 * i)) & 63) as usize] as char);
                } else {
                    out.push('=');
                }
            }
        }
        out
    }

    #[test]
    fn image_headers_give_dimensions() {
        let mut png = b"\x89PNG\r\n\x1a\n\0\0\0\x0dIHDR".to_vec();
        png.extend_from_slice(&[0, 0, 3, 0x20, 0, 0, 2, 0x58, 8, 2, 0, 0, 0]);
        assert_eq!(image_dims(png.iter().copied()), Some((800, 600)));
        let gif = b"GIF89a\x40\x01\xf0\x00\0\0";
        assert_eq!(image_dims(gif.iter().copied()), Some((320, 240)));
        // JPEG: SOI, an APP0 segment, then SOF0 with height 480, width 640.
        let mut jpg = vec![0xFF, 0xD8, 0xFF, 0xE0, 0, 16];
        jpg.extend_from_slice(&[0; 14]);
        jpg.extend_from_slice(&[0xFF, 0xC0, 0, 17, 8, 0x01, 0xE0, 0x02, 0x80, 3]);
        assert_eq!(image_dims(jpg.iter().copied()), Some((640, 480)));
        let mut webp = b"RIFF\0\0\0\0WEBPVP8X\x0a\0\0\0\0\0\0\0".to_vec();
        webp.extend_from_slice(&[0x7F, 0x07, 0, 0x37, 0x04, 0]); // 1920 x 1080
        assert_eq!(image_dims(webp.iter().copied()), Some((1920, 1080)));
        assert_eq!(image_dims(b"not an image".iter().copied()), None);
        assert_eq!(image_dims(b"\xFF\xD8\xFF".iter().copied()), None);
        // Through base64 in a data URL.
        let url = format!("data:image/png;base64,{}", b64(&png));
        assert_eq!(sniff_media(&url), Some(Media::Image(Some((800, 600)))));
    }

    #[test]
    fn image_token_formulas_follow_the_providers() {
        // Anthropic: w*h/750, long edge scaled to 1568, capped at 1,600.
        assert_eq!(
            image_tokens(Provider::Anthropic, Some((200, 150)), false),
            40
        );
        assert_eq!(
            image_tokens(Provider::Anthropic, Some((1000, 1000)), false),
            1334
        );
        assert_eq!(
            image_tokens(Provider::Anthropic, Some((4000, 3000)), false),
            1600
        );
        assert_eq!(image_tokens(Provider::Anthropic, None, false), 1600);
        // OpenAI: 1024x1024 high detail is 4 tiles; 2048x4096 becomes
        // 768x1536, 2x3 tiles; low detail is flat.
        assert_eq!(
            image_tokens(Provider::OpenAi, Some((1024, 1024)), false),
            765
        );
        assert_eq!(
            image_tokens(Provider::OpenAi, Some((2048, 4096)), false),
            85 + 170 * 6
        );
        assert_eq!(image_tokens(Provider::OpenAi, Some((4096, 4096)), true), 85);
        assert_eq!(image_tokens(Provider::OpenAi, None, false), 765);
    }

    #[test]
    fn pdf_pages_are_counted_not_the_page_tree() {
        let pdf = b"%PDF-1.4\n1 0 obj << /Type /Pages /Count 3 >> endobj\n2 0 obj <</Type/Page/Parent 1 0 R>> endobj\n3 0 obj << /Type /Page >> endobj\n4 0 obj << /Type\n/Page /X 1 >> endobj\n";
        let data = b64(pdf);
        assert_eq!(
            sniff_media(&data),
            Some(Media::Pdf {
                pages: Some(3),
                bytes: (data.len() as u64) * 3 / 4
            })
        );
        // A file larger than the scanned prefix: pages are extrapolated.
        let big = b64(&pdf.repeat(PDF_SCAN_BYTES / pdf.len() + 1));
        let bytes = big.len() as u64 * 3 / 4;
        let pages = pdf_pages(&big, 2 * bytes).unwrap();
        let want = 2 * 3 * (PDF_SCAN_BYTES / pdf.len()) as u64;
        assert!(pages.abs_diff(want) <= 6, "{pages} vs {want}");
    }

    #[test]
    fn prose_is_not_mistaken_for_base64() {
        let prose = "word ".repeat(100);
        assert_eq!(sniff_media(&prose), None);
        assert_eq!(sniff_media("data:text/plain,hello"), None);
        let blob = "QUJD".repeat(100);
        assert!(matches!(sniff_media(&blob), Some(Media::Blob { .. })));
    }
}
