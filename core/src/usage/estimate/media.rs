//! Inline media: recognising base64 images and PDFs in a string, reading an
//! image's dimensions and a PDF's page count from their first bytes, and
//! what each costs (the per-provider image rules live with the provider's
//! framing, in `usage/anthropic.rs` and `usage/openai.rs`).

use super::text::hex4;
use crate::route::Provider;
use crate::usage::{anthropic, openai};

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

/// Media found in a string, settled once its block says what it is.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum Media {
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
pub(super) fn sniff_media(s: &str) -> Option<Media> {
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

/// [`sniff_media`] on a JSON string read in place (`raw` starts after its
/// opening quote): `Some(None)` when it is no media, `Some(Some(_))` when it
/// is, `None` when serde must unescape it to say (a data URL, or base64
/// whose escapes stand for base64 characters, as `\/` or a `\n` line wrap).
/// The first character outside the base64 alphabet decides: the closing
/// quote, with no escape before it, makes the raw bytes the whole string;
/// any other character, or an escape of one, fails [`sniff_media`]'s
/// alphabet check, as prose does at its first space.
pub(super) fn sniff_in_place(raw: &[u8]) -> Option<Option<Media>> {
    if raw.starts_with(b"data:") {
        return None;
    }
    let mut i = 0;
    let mut escaped = false;
    loop {
        let n = i + raw.get(i..)?.iter().position(|b| {
            !(b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'-' | b'_' | b'='))
        })?;
        match raw.get(n..)? {
            [b'"', ..] if escaped => return None,
            [b'"', ..] => return Some(sniff_media(std::str::from_utf8(raw.get(..n)?).ok()?)),
            [b'\\', b'n' | b'r' | b'/', ..] => i = n + 2,
            [b'\\', b'u', ..] => match hex4(raw, n + 2) {
                Some(c) if u8::try_from(c).is_ok_and(is_base64_char) => i = n + 6,
                _ => return Some(None),
            },
            _ => return Some(None),
        }
        escaped = true;
    }
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

/// Tokens of one image, by the provider's rule.
pub(super) fn image_tokens(provider: Provider, dims: Option<(u32, u32)>, low_detail: bool) -> u64 {
    match provider {
        Provider::Anthropic => anthropic::framing::image_tokens(dims),
        Provider::OpenAi => openai::framing::image_tokens(dims, low_detail),
    }
}

pub(super) fn pdf_tokens(pages: Option<u64>, bytes: u64) -> u64 {
    let pages = pages.unwrap_or_else(|| bytes.div_ceil(PDF_BYTES_PER_PAGE).max(1));
    pages.saturating_mul(PDF_TOKENS_PER_PAGE)
}

#[cfg(test)]
mod tests {
    use super::*;

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
