//! The in-place, SIMD reader held to the rule: SIMD and scalar classifiers
//! give the same masks, and every way of counting a string (raw JSON with
//! escapes or unescaped text, SIMD or scalar masks) gives the count of the
//! rule as first written ([`rule`]), on random strings and on every string
//! of every recorded exchange. Requests give the same result read in place
//! or all through serde.
//!
//! On wasm these run with `simd128` under Node.js (`make estimate-simd-check`),
//! natively with SSE2 on x86-64.

use super::classify::{classify, scalar, Masks, SIMD};
use super::text::{text_tokens, text_tokens_with};
use super::walk::IN_PLACE;
use super::{read, rule};
use crate::route::Route;

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures");

/// SplitMix64: a seeded generator, so a failure names a reproducible case.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[self.below(items.len())]
    }
}

/// The masks by their definition, one byte at a time.
fn masks_by_definition(w: &[u8; 64], json: bool) -> Masks {
    let mut m = Masks::default();
    for (i, &b) in w.iter().enumerate() {
        let bit = 1u64 << i;
        if b.is_ascii_alphabetic() {
            m.letter |= bit;
        } else if b.is_ascii_digit() {
            m.digit |= bit;
        } else if b == b' ' {
            m.blank |= bit;
        } else if !(0x20..0x80).contains(&b) || (json && (b == b'"' || b == b'\\')) {
            m.special |= bit;
        }
    }
    m
}

/// `make estimate-simd-check` builds these tests for wasm with `simd128`:
/// a build that lost it would compare scalar with scalar, so it fails here.
#[cfg(target_arch = "wasm32")]
const _: () = assert!(SIMD, "built for wasm without simd128 (.cargo/config.toml)");

#[test]
fn simd_and_scalar_classifiers_give_the_masks_of_the_definition() {
    let mut rng = Rng(1);
    let alphabet = b"aZ09 !\"\\\n\t\x0c\x7f\x80\xff\xc3\xa9{}-_@`[/:";
    for case in 0..20_000 {
        let mut w = [0u8; 64];
        for b in w.iter_mut() {
            // Half the bytes from anywhere, half from the class edges.
            *b = if rng.below(2) == 0 {
                rng.next() as u8
            } else {
                alphabet[rng.below(alphabet.len())]
            };
        }
        for json in [false, true] {
            let want = masks_by_definition(&w, json);
            assert_eq!(scalar(&w, json), want, "case {case}: scalar, json {json}");
            assert_eq!(
                classify(&w, json),
                want,
                "case {case}: SIMD {SIMD}, json {json}"
            );
        }
    }
}

/// Most windows of a prompt are printable ASCII with no special byte at all,
/// which the SIMD classifiers answer without taking the special bitmasks,
/// many only letters and spaces, answered from those two masks: such
/// windows, and ones with a single other byte anywhere.
#[test]
fn simd_classifier_gives_the_masks_of_the_definition_on_plain_ascii_windows() {
    let mut rng = Rng(5);
    let printable: Vec<u8> = (b' '..=b'~')
        .filter(|b| !matches!(b, b'"' | b'\\'))
        .collect();
    let words = b"aZqz AMm ";
    let special = b"\"\\\n\t\x0c\x00\x1f\x80\xc3\xff";
    let other = b"09@[`{.-~\x7f\"\\\n\t\x0c\x00\x1f\x80\xc3\xff";
    for case in 0..20_000 {
        let mut w = [0u8; 64];
        // A third of the windows only letters and spaces (then answered
        // from those two masks alone), with one other byte half the time.
        let only_words = case % 3 == 2;
        for b in w.iter_mut() {
            *b = if only_words {
                words[rng.below(words.len())]
            } else {
                printable[rng.below(printable.len())]
            };
        }
        if only_words {
            if case % 2 == 1 {
                w[rng.below(64)] = other[rng.below(other.len())];
            }
        } else if case % 2 == 1 {
            w[rng.below(64)] = special[rng.below(special.len())];
        }
        for json in [false, true] {
            assert_eq!(
                classify(&w, json),
                masks_by_definition(&w, json),
                "case {case}: SIMD {SIMD}, json {json}: {:?}",
                String::from_utf8_lossy(&w)
            );
        }
    }
}

/// Pieces of prompt text as they appear inside a JSON string: words,
/// numbers, punctuation, white space, escapes, multi-byte UTF-8.
const PIECES: &[&str] = &[
    "the",
    "quick",
    "internationalization",
    "Rate",
    "limiter",
    "a",
    "ok",
    "x",
    "déjà",
    "naïve",
    "straße",
    "привет",
    "мир",
    "中文",
    "速率限制器",
    "😀",
    "👍🏽",
    "مرحبا",
    "नमस्ते",
    "한국어",
    "ｆｕｌｌ",
    "0",
    "42",
    "2025",
    "3.14159",
    "1234567",
    "-",
    ".",
    ",",
    "!?",
    "();",
    "{}",
    "[]",
    "::",
    "->",
    "=>",
    "#",
    "@",
    "`",
    "~",
    "|",
    "'",
    "\u{7f}",
    " ",
    " ",
    " ",
    "  ",
    "    ",
    "\\n",
    "\\r\\n",
    "\\n    ",
    "\\t",
    "\\\"",
    "\\\\",
    "\\/",
    "\\b",
    "\\f",
    "\\u00e9",
    "\\u00E9",
    "\\u0041",
    "\\u0020",
    "\\u000a",
    "\\u4e2d",
    "\\ud83d\\ude00",
    "\\u0000",
    "\\u001f",
    "\\u00a0",
    "\\uff21",
    "\\u0030",
    "\\u002e",
];

/// Filler that lands a string on an exact length: one byte each.
const ONE_BYTE: &[&str] = &["a", "Z", "7", " ", ".", "-", "_", "("];

/// A random JSON string body (escapes raw, no quotes) of about `len` bytes.
fn raw_string(rng: &mut Rng, len: usize) -> String {
    let mut s = String::new();
    loop {
        let piece = if rng.below(3) == 0 {
            // A word of random letters, up to 20 long.
            (0..1 + rng.below(20))
                .map(|_| char::from(b'a' + rng.below(26) as u8))
                .collect()
        } else {
            rng.pick(PIECES).to_string()
        };
        if s.len() + piece.len() > len {
            break;
        }
        s.push_str(&piece);
    }
    while s.len() < len {
        s.push_str(rng.pick(ONE_BYTE));
    }
    s
}

fn unescape(raw: &str) -> String {
    serde_json::from_str(&format!("\"{raw}\"")).unwrap()
}

/// Every way of counting `raw` gives the rule's count of its text.
fn assert_counts_agree(raw: &str, context: &str) {
    let text = unescape(raw);
    let want = rule::text_tokens(&text);
    // The raw string as it sits in a body: its closing quote, then more JSON.
    let body = format!("{raw}\"}},\"x\":\"y\"}}");
    for (name, simd) in [("scalar", false), ("SIMD", true)] {
        let masks = |w: &[u8; 64], json: bool| {
            if simd {
                classify(w, json)
            } else {
                scalar(w, json)
            }
        };
        assert_eq!(
            text_tokens_with(body.as_bytes(), true, masks),
            Some((want, raw.len())),
            "{context}: in place, {name} masks: {raw:?}"
        );
        assert_eq!(
            text_tokens_with(text.as_bytes(), false, masks).map(|(t, _)| t),
            Some(want),
            "{context}: unescaped, {name} masks: {text:?}"
        );
    }
    assert_eq!(text_tokens(&text), want, "{context}: text_tokens {text:?}");
}

#[test]
fn in_place_simd_and_scalar_counts_equal_the_rule_on_random_strings() {
    let mut rng = Rng(17);
    let mut lengths: Vec<usize> = (0..=64).collect();
    // Around every 16-byte boundary up to 8 windows.
    for k in 1..=32 {
        lengths.extend((16 * k - 3)..=(16 * k + 3));
    }
    for (case, &len) in lengths.iter().cycle().take(8_000).enumerate() {
        let raw = raw_string(&mut rng, len);
        assert_counts_agree(&raw, &format!("case {case}, {len} bytes"));
    }
    for case in 0..300 {
        let len = rng.below(5_000);
        let raw = raw_string(&mut rng, len);
        assert_counts_agree(&raw, &format!("long case {case}"));
    }
}

/// Prompts of plain ASCII (most of them): whole windows without a special
/// byte, read by the run step alone, with words, numbers and punctuation of
/// every length running across window edges; now and then an escape or a
/// non-ASCII letter between them.
#[test]
fn in_place_simd_and_scalar_counts_equal_the_rule_on_plain_ascii_prompts() {
    let mut rng = Rng(23);
    let run = |rng: &mut Rng, chars: &[u8], max: usize| -> String {
        (0..1 + rng.below(max))
            .map(|_| char::from(chars[rng.below(chars.len())]))
            .collect()
    };
    for case in 0..2_000 {
        let len = rng.below(3_000);
        let mut raw = String::new();
        while raw.len() < len {
            let piece = match rng.below(20) {
                0..=7 => run(&mut rng, b"abcdefghijklmnopqrstuvwxyzXY", 12),
                8 => run(&mut rng, b"x", 150),
                9..=10 => run(&mut rng, b"0123456789", 8),
                11..=12 => run(&mut rng, b".,;:!?()-=<>{}[]*'/", 5),
                13..=17 => run(&mut rng, b" ", 3),
                // A line break and its indentation.
                18 => format!("\\n{}", run(&mut rng, b" ", 70)),
                _ => rng.pick(PIECES).to_string(),
            };
            raw.push_str(&piece);
        }
        assert_counts_agree(&raw, &format!("plain case {case}, {len} bytes"));
    }
}

#[test]
fn invalid_strings_are_left_to_serde() {
    for raw in [
        &b"raw\ncontrol\""[..],
        b"tab\there\"",
        b"lone \\ud83d surrogate\"",
        b"lone \\ude00 low\"",
        b"bad \\x escape\"",
        b"short \\u12\"",
        b"bad utf-8 \xff\"",
        b"cut \xc3",
        b"cut \xe4\xb8\"",
        b"cut \xf0\x9f\x98 \"",
        b"overlong \xc0\x80\"",
        b"overlong \xe0\x80\xaf\"",
        b"overlong \xf0\x8f\xbf\xbf\"",
        b"surrogate \xed\xa0\x80\"",
        b"above U+10FFFF \xf4\x90\x80\x80\"",
        b"above U+10FFFF \xf5\x80\x80\x80\"",
        b"lone continuation \x80\"",
        b"no closing quote",
    ] {
        assert_eq!(
            text_tokens_with(raw, true, classify),
            None,
            "{}",
            String::from_utf8_lossy(raw)
        );
    }
}

/// UTF-8 is decoded in place by hand: on random bytes around the edges of
/// its encodings, a string is read in place exactly when serde reads it
/// (valid UTF-8), and then to the rule's count.
#[test]
fn in_place_reads_exactly_the_utf8_serde_reads() {
    let mut rng = Rng(31);
    let alphabet = [
        b'a', b' ', b'.', 0x7f, 0x80, 0x8f, 0x90, 0x9f, 0xa0, 0xbf, 0xc0, 0xc1, 0xc2, 0xc3, 0xdf,
        0xe0, 0xe4, 0xed, 0xee, 0xef, 0xf0, 0xf1, 0xf4, 0xf5, 0xff,
    ];
    let mut valid = 0;
    for case in 0..50_000 {
        let len = 1 + rng.below(12);
        let mut raw: Vec<u8> = (0..len)
            .map(|_| alphabet[rng.below(alphabet.len())])
            .collect();
        let through_serde = serde_json::from_slice::<String>(&[b"\"", &raw[..], b"\""].concat());
        raw.push(b'"');
        let in_place = text_tokens_with(&raw, true, classify);
        match through_serde {
            Ok(text) => {
                valid += 1;
                assert_eq!(
                    in_place,
                    Some((rule::text_tokens(&text), len)),
                    "case {case}: {raw:x?}"
                );
            }
            Err(_) => assert_eq!(in_place, None, "case {case}: {raw:x?}"),
        }
    }
    assert!(valid > 1_000, "{valid} valid strings");
}

/// The strings of a JSON text, raw: each `"..."` with its escapes.
fn raw_strings(json: &str) -> Vec<&str> {
    let bytes = json.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'"' {
            let start = i + 1;
            let mut j = start;
            while j < bytes.len() && bytes[j] != b'"' {
                j += if bytes[j] == b'\\' { 2 } else { 1 };
            }
            if j <= bytes.len() {
                out.push(&json[start..j.min(bytes.len())]);
            }
            i = j + 1;
        } else {
            i += 1;
        }
    }
    out
}

fn fixture_files() -> Vec<std::path::PathBuf> {
    let mut files = Vec::new();
    let mut dirs = vec![std::path::PathBuf::from(FIXTURES)];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                dirs.push(p);
            } else {
                files.push(p);
            }
        }
    }
    files.sort();
    files
}

const ROUTES: [Route; 4] = [
    Route::AnthropicMessages,
    Route::AnthropicCountTokens,
    Route::OpenAiChat,
    Route::OpenAiResponses,
];

#[test]
fn in_place_counts_equal_the_rule_on_every_fixture_string() {
    let mut strings = 0;
    let mut requests = 0;
    let mut in_place = 0;
    for path in fixture_files() {
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue;
        };
        let name = path.display().to_string();
        for raw in raw_strings(&text) {
            if serde_json::from_str::<String>(&format!("\"{raw}\"")).is_ok() {
                assert_counts_agree(raw, &name);
                strings += 1;
            }
        }
        if name.ends_with(".json") {
            for route in ROUTES {
                in_place += in_place_reads(|| {
                    assert_eq!(
                        read(route, text.as_bytes(), true),
                        read(route, text.as_bytes(), false),
                        "{name} as {route:?}"
                    );
                });
            }
            requests += 1;
        }
    }
    assert!(
        strings > 500 && requests > 20 && in_place > 200,
        "{strings} strings in {requests} JSON fixtures, {in_place} read in place"
    );
}

fn in_place_reads(f: impl FnOnce()) -> usize {
    let before = IN_PLACE.with(|n| n.get());
    f();
    IN_PLACE.with(|n| n.get()) - before
}

#[test]
fn prompt_strings_are_read_in_place_unless_serde_must_unescape_them() {
    let est = |body: &str| {
        let mut tokens = 0;
        let n = in_place_reads(|| {
            tokens = read(Route::AnthropicMessages, body.as_bytes(), true)
                .unwrap()
                .input_estimate;
        });
        (tokens, n)
    };
    // The system prompt and the message text are read in place ("role" and
    // "model" are no prompt text): 4 per request, 3 for the system prompt
    // and `Be brief.`, 3 per message and `Say "hi"` with its line break.
    let plain = r#"{"model":"m","system":"Be brief.","messages":[{"role":"user","content":"Say \"hi\"\n"}]}"#;
    assert_eq!(est(plain), (4 + 3 + 3 + 3 + 5, 2), "{plain}");
    // An escaped key is unescaped by serde, which then reads its value.
    let escaped = plain.replace(r#""content""#, r#""cont\u0065nt""#);
    assert_eq!(est(&escaped), (est(plain).0, 1), "{escaped}");
    // A form feed before the value is white space to Rust, not to JSON:
    // serde refuses the body, and the walk must not have read ahead of it.
    for body in [
        "{\"system\":\x0c\"Be brief.\"}",
        "{\"system\":\"Be brief.\",\"messages\":[{\"content\"\x0c:\"hi\"}]}",
    ] {
        let (in_place, n) = {
            let mut r = None;
            let n =
                in_place_reads(|| r = Some(read(Route::AnthropicMessages, body.as_bytes(), true)));
            (r, n)
        };
        let through_serde = read(Route::AnthropicMessages, body.as_bytes(), false);
        assert!(through_serde.is_err(), "{body:?}");
        assert_eq!(in_place, Some(through_serde), "{body:?}");
        assert!(n <= 1, "{body:?}: {n} read in place");
    }
    // Base64 with an escaped slash: serde unescapes it for the media check.
    let b64 = r#"{"messages":[{"role":"user","content":[{"type":"image","source":{"data":"iVBORw0KGgo\/AAAA"}}]}]}"#;
    assert_eq!(est(b64).1, 0, "{b64}");
}

#[test]
fn requests_read_in_place_and_through_serde_agree() {
    let mut rng = Rng(99);
    let odd = [
        "\\ud83d",
        "\\x",
        "\u{1}",
        "\\u00",
        "data:image/png;base64,iVBORw0KGgo=",
        "iVBORw0KGgoAAAANSUhEUgAAAPAAAACg\\/",
        "iVBORw0KGgoAAAANSUhEUgAAAPAAAACgCAIAAAA\\nAAAA",
        "JVBERi0xLjQK\\u0041",
        "QUJD",
    ];
    for case in 0..3_000 {
        let len = rng.below(300);
        let mut content = raw_string(&mut rng, len);
        if rng.below(4) == 0 {
            let at = if rng.below(2) == 0 { 0 } else { content.len() };
            content.insert_str(at, odd[rng.below(odd.len())]);
        }
        if rng.below(5) == 0 {
            content = content.repeat(10);
        }
        let bodies = [
            format!(r#"{{"model":"m","messages":[{{"role":"user","content":"{content}"}}]}}"#),
            format!(
                r#"{{"system" : "{content}", "messages":[{{"role":"user","content":[{{"type":"text","text":"{content}"}},{{"type":"image","source":{{"type":"base64","data":"{content}"}}}}]}}]}}"#
            ),
            format!(
                r#"{{"input":"{content}","instructions":"{content}","tools":[{{"name":"t","description":"{content}","input_schema":{{"type":"object","properties":{{"q":{{"type":"string","description":"{content}"}}}}}}}}]}}"#
            ),
            format!(
                r#"{{"messages":[{{"role":"assistant","content":[{{"type":"tool_use","id":"x","name":"f","input":{{"q":"{content}","n":[1,"{content}"]}}}}]}},{{"role":"user","content":[{{"type":"image_url","image_url":{{"url":"{content}","detail":"low"}}}}]}}]}}"#
            ),
        ];
        for body in &bodies {
            for route in ROUTES {
                assert_eq!(
                    read(route, body.as_bytes(), true),
                    read(route, body.as_bytes(), false),
                    "case {case} as {route:?}: {body}"
                );
            }
        }
    }
}
