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
//! message); tools add about 12. These numbers, and each provider's image
//! rule below, live beside the provider: `framing` in `usage/anthropic.rs`
//! and `usage/openai.rs`, where a newcomer looking for "what does Tollgate
//! assume about this provider" already reads its usage fields.
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
//!
//! # Layout
//!
//! - `text`: character classes and the per-string token count, and
//!   [`TextCounter`], the same count over a text that arrives in pieces (the
//!   deltas a stream relays, charged when it ends before its usage);
//! - `media`: base64 images and PDFs: dimensions, pages, what they cost;
//! - `walk`: the serde visitor over the prompt fields;
//! - `scalar`: model, max_tokens, stream, stream_options;
//! - this module: the request object and [`inspect`].

mod classify;
mod media;
mod scalar;
mod text;
mod walk;

#[cfg(all(test, not(target_family = "wasm")))]
mod accuracy;
#[cfg(test)]
mod rule;
#[cfg(test)]
mod tests;

use super::{anthropic, openai, RequestError, RequestInfo};
use crate::route::{Provider, Route};
use scalar::{IncludeUsage, Key, Scalar};
use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, Visitor};
use std::fmt;
use walk::{Mode, Tag, Tally, Walk};

pub use text::TextCounter;

/// The top-level request object.
struct Request<'de> {
    route: Route,
    /// The body being read, for prompt strings read in place.
    body: &'de [u8],
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

impl<'de> Visitor<'de> for Request<'de> {
    type Value = Fields;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Fields, A::Error> {
        let provider = self.route.provider();
        let walk = Walk::prompt(provider, self.body);
        let mut f = Fields::default();
        while let Some(key) = map.next_key_seed(Key)? {
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
                    let mut t = walk.with(Mode::Messages).value(&mut map, &key)?;
                    t.settle(provider);
                    f.prompt.add(provider, t);
                }
                ("system" | "instructions", _) => {
                    let mut t = walk.value(&mut map, &key)?;
                    t.settle(provider);
                    f.has_system = true;
                    f.prompt.add(provider, t);
                }
                ("tools" | "functions", _) => {
                    let t = walk.with(Mode::Json).value(&mut map, &key)?;
                    f.tools.get_or_insert_with(Tally::default).add(provider, t);
                }
                ("tool_choice", _) => f.tool_choice = map.next_value_seed(Tag)?,
                // Structured-output schemas are shown to the model.
                ("response_format", Route::OpenAiChat) | ("text", Route::OpenAiResponses) => {
                    let t = walk.with(Mode::Json).value(&mut map, &key)?;
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

impl<'de> DeserializeSeed<'de> for Request<'de> {
    type Value = Fields;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Fields, D::Error> {
        d.deserialize_map(self)
    }
}

fn tokens(route: Route, f: &Fields) -> u64 {
    let tools = f.tools.map(|t| t.tokens);
    match route.provider() {
        Provider::Anthropic => anthropic::framing::request(
            f.prompt.tokens,
            f.has_system,
            tools,
            f.tool_choice.as_deref(),
        ),
        Provider::OpenAi => openai::framing::request(
            f.prompt.tokens,
            route == Route::OpenAiResponses && f.has_system,
            tools,
        ),
    }
}

pub fn inspect(route: Route, body: &[u8]) -> Result<RequestInfo, RequestError> {
    read(route, body, true)
}

/// [`inspect`], with prompt strings read in place or, for the tests that
/// hold the two equal, all through serde.
fn read(route: Route, body: &[u8], in_place: bool) -> Result<RequestInfo, RequestError> {
    let first = body.iter().find(|b| !b.is_ascii_whitespace());
    if first.is_some_and(|b| *b != b'{') {
        return Err(RequestError(
            "request body must be a JSON object".to_string(),
        ));
    }
    let mut de = serde_json::Deserializer::from_slice(body);
    let f = Request {
        route,
        body: if in_place { body } else { &[] },
    }
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
