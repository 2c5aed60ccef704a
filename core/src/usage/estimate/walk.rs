//! The prompt walk: a serde visitor over the prompt fields of a request
//! (messages, system, tools…) that adds up the estimate as strings stream
//! past and keeps nothing else.

use super::media::{image_tokens, pdf_tokens, sniff_in_place, sniff_media, Media};
use super::scalar::Key;
use super::text::{json_text_tokens, text_tokens};
use crate::route::Provider;
use crate::usage::{anthropic, openai};
use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use std::fmt;

/// What a subtree of the prompt adds up to.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub(super) struct Tally {
    /// Settled tokens: text, framing, media whose kind is known.
    pub(super) tokens: u64,
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

    pub(super) fn add(&mut self, provider: Provider, o: Tally) {
        if o.pending.is_some() {
            self.settle(provider);
            self.pending = o.pending;
        }
        self.tokens = self.tokens.saturating_add(o.tokens);
        self.low_detail |= o.low_detail;
        self.remote |= o.remote;
    }

    /// Charges pending media by their own kind (outside any typed block).
    pub(super) fn settle(&mut self, provider: Provider) {
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
pub(super) enum Mode {
    /// Prompt content: strings are text, blocks are typed.
    Prompt,
    /// A list of messages: each element adds per-message framing.
    Messages,
    /// Shown to the model as JSON (tool definitions, tool inputs).
    Json,
}

#[cfg(test)]
thread_local! {
    /// Strings read in place so far, for the tests that check the walk does.
    pub(super) static IN_PLACE: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

#[derive(Clone, Copy)]
pub(super) struct Walk<'de> {
    provider: Provider,
    mode: Mode,
    /// The request body, to read string values in place (empty: never).
    body: &'de [u8],
}

impl<'de> Walk<'de> {
    /// Reads prompt content of this provider's request, whose body is `body`.
    pub(super) fn prompt(provider: Provider, body: &'de [u8]) -> Walk<'de> {
        Walk {
            provider,
            mode: Mode::Prompt,
            body,
        }
    }

    pub(super) fn with(self, mode: Mode) -> Walk<'de> {
        Walk { mode, ..self }
    }

    fn per_message(self) -> u64 {
        match self.provider {
            Provider::Anthropic => anthropic::framing::PER_MESSAGE,
            Provider::OpenAi => openai::framing::PER_MESSAGE,
        }
    }

    /// Reads the value of `key`: a string in place in the body when it can
    /// (prompt text, with its escapes, never copied), anything else through
    /// serde.
    pub(super) fn value<A: MapAccess<'de>>(
        self,
        map: &mut A,
        key: &str,
    ) -> Result<Tally, A::Error> {
        match self.value_at(key).and_then(|at| self.string_in_place(at)) {
            Some((t, few_escapes)) => {
                // serde must still move past the string, known valid by now.
                if few_escapes {
                    map.next_value_seed(SkipString)?;
                } else {
                    map.next_value::<IgnoredAny>()?;
                }
                Ok(t)
            }
            None => map.next_value_seed(self),
        }
    }

    /// Where the value of `key` starts in the body: past the key's closing
    /// quote, the colon and white space. Only a key serde borrowed from the
    /// body (one without escapes) lies inside the body's memory and says
    /// where it is; an unescaped copy lies elsewhere and gives `None`.
    fn value_at(self, k: &str) -> Option<usize> {
        let start = (k.as_ptr() as usize).checked_sub(self.body.as_ptr() as usize)?;
        let end = start.checked_add(k.len())?;
        if self.body.get(start.checked_sub(1)?) != Some(&b'"') || self.body.get(end) != Some(&b'"')
        {
            return None;
        }
        // JSON's white space, exactly what serde skips (not the form feed
        // `is_ascii_whitespace` also takes): the value read here must be the
        // one serde then moves past.
        let white = |i: usize| {
            self.body.get(i..).map_or(i, |r| {
                i + r
                    .iter()
                    .take_while(|b| matches!(b, b' ' | b'\t' | b'\n' | b'\r'))
                    .count()
            })
        };
        let colon = white(end + 1);
        (self.body.get(colon) == Some(&b':')).then(|| white(colon + 1))
    }

    /// A string value at `at`, read in place, and whether it has few enough
    /// escapes for [`SkipString`]; `None` when it is no string or serde must
    /// read it (an escaped data URL or base64, an invalid string).
    fn string_in_place(self, at: usize) -> Option<(Tally, bool)> {
        let raw = self.body.get(at..)?.strip_prefix(b"\"")?;
        let media = match self.mode {
            Mode::Json => None,
            Mode::Prompt | Mode::Messages => sniff_in_place(raw)?,
        };
        let (text, few_escapes) = match media {
            // Media read in place have no escape.
            Some(_) => (0, true),
            None => {
                let s = json_text_tokens(raw)?;
                (s.tokens, s.escapes.saturating_mul(ESCAPE_SPACING) <= s.end)
            }
        };
        #[cfg(test)]
        IN_PLACE.with(|n| n.set(n.get() + 1));
        Some((self.string(media, text), few_escapes))
    }

    /// What a string costs: `text` is its count as text, `media` what it
    /// holds if it is inline media.
    fn string(self, media: Option<Media>, text: u64) -> Tally {
        match self.mode {
            Mode::Json => Tally::tokens(text.saturating_add(1)),
            Mode::Prompt | Mode::Messages => {
                let mut t = match media {
                    Some(m) => Tally {
                        pending: Some(m),
                        ..Tally::default()
                    },
                    None => Tally::tokens(text),
                };
                // A bare string where messages are expected (the Responses
                // API's `input`) is one user message.
                if self.mode == Mode::Messages {
                    t.settle(self.provider);
                    t.tokens = t.tokens.saturating_add(self.per_message());
                }
                t
            }
        }
    }
}

impl<'de> DeserializeSeed<'de> for Walk<'de> {
    type Value = Tally;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Tally, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Walk<'de> {
    type Value = Tally;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_str<E>(self, s: &str) -> Result<Tally, E> {
        let media = match self.mode {
            Mode::Json => None,
            Mode::Prompt | Mode::Messages => sniff_media(s),
        };
        let text = match media {
            Some(_) => 0,
            None => text_tokens(s),
        };
        Ok(self.string(media, text))
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
            while let Some(key) = map.next_key_seed(Key)? {
                let v = self.value(&mut map, &key)?;
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
        while let Some(key) = map.next_key_seed(Key)? {
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
                "input" => t.add(self.provider, inner.with(Mode::Json).value(&mut map, &key)?),
                _ => t.add(self.provider, inner.value(&mut map, &key)?),
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

/// Moves serde past a string value the walk has already read in place and
/// found valid (escapes, UTF-8, no raw controls, a closing quote). Asked for
/// bytes, serde_json looks only for the closing quote or a backslash
/// (`memchr2`, SIMD in the wasm build) instead of checking every byte again
/// for controls, as it does for `IgnoredAny` or a `str` (SWAR, 8 bytes at a
/// time) and, for a `str`, validating the UTF-8 once more. On a 900 KB prompt
/// that second scan was a third of the estimate's time (in V8).
///
/// But serde stops at each escape to copy the bytes before it (a new
/// `memchr2` call, a copy): for a string dense in escapes (code, JSON in a
/// string: one every 10–40 bytes) its `IgnoredAny` skip, which does neither,
/// is faster (by a third in V8 on escaped source code), so the walk uses this
/// only on strings with at most one escape per [`ESCAPE_SPACING`] bytes.
struct SkipString;

/// Fewest bytes per escape for [`SkipString`]: measured in V8, its per-byte
/// saving pays for an escape's cost at about one escape per 100 bytes.
const ESCAPE_SPACING: usize = 128;

impl<'de> DeserializeSeed<'de> for SkipString {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_bytes(self)
    }
}

impl<'de> Visitor<'de> for SkipString {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a string")
    }
    fn visit_bytes<E>(self, _: &[u8]) -> Result<(), E> {
        Ok(())
    }
}

/// The value of a `type` / `detail` / `tool_choice` field if it is a string,
/// or an object's own `type`; anything else is skipped.
pub(super) struct Tag;

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
        while let Some(key) = map.next_key_seed(Key)? {
            if key == "type" {
                tag = map.next_value_seed(Tag)?;
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(tag)
    }
}
