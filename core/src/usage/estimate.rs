//! Reads a request body once, without building a DOM of the prompt: the
//! scalar fields (model, max_tokens, stream, stream_options) are read as
//! values; the prompt fields are walked by a counting visitor that only adds
//! up string lengths.
//!
//! The estimate rule (measured against the recorded exchanges in
//! `tests/fixtures`; see `docs/metering.md`):
//! - text in `system`, `messages`, `tools`, `input`, `instructions`: one
//!   token per 3.6 characters, plus 4 tokens per message for role framing;
//! - images: a fixed 1,600 tokens on Anthropic routes (the cost of a ~1.15
//!   megapixel image, the size Anthropic scales images to) and 765 on OpenAI
//!   routes (a 1024×1024 high-detail image);
//! - documents (base64 PDF): 2,500 tokens per started 60 KB of decoded data;
//!   text documents count as text;
//! - tools: their JSON (names, descriptions, schemas) as text, plus 300 tokens
//!   for the tool-use system prompt the provider adds.

use super::{RequestError, RequestInfo};
use crate::route::{Provider, Route};
use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use std::borrow::Cow;
use std::fmt;

const CHARS_PER_TOKEN: f64 = 3.6;
const TOKENS_PER_MESSAGE: u64 = 4;
const TOOL_PROMPT_TOKENS: u64 = 300;
const PDF_BYTES_PER_CHUNK: u64 = 60_000;
const PDF_TOKENS_PER_CHUNK: u64 = 2_500;

/// What a subtree of the prompt contributes.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
struct Counts {
    chars: u64,
    images: u64,
    doc_bytes: u64,
    messages: u64,
}

impl Counts {
    fn add(&mut self, o: Counts) {
        self.chars += o.chars;
        self.images += o.images;
        self.doc_bytes += o.doc_bytes;
        self.messages += o.messages;
    }
}

/// Counts a JSON subtree. `is_message_list` marks the top of `messages` /
/// `input` so each element counts as a message.
struct Count {
    is_message_list: bool,
}

impl<'de> DeserializeSeed<'de> for Count {
    type Value = Counts;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Counts, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Count {
    type Value = Counts;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_str<E>(self, s: &str) -> Result<Counts, E> {
        Ok(Counts {
            chars: s.chars().count() as u64,
            ..Default::default()
        })
    }
    fn visit_bool<E>(self, _: bool) -> Result<Counts, E> {
        Ok(Counts {
            chars: 4,
            ..Default::default()
        })
    }
    fn visit_i64<E>(self, _: i64) -> Result<Counts, E> {
        Ok(Counts {
            chars: 2,
            ..Default::default()
        })
    }
    fn visit_u64<E>(self, _: u64) -> Result<Counts, E> {
        Ok(Counts {
            chars: 2,
            ..Default::default()
        })
    }
    fn visit_f64<E>(self, _: f64) -> Result<Counts, E> {
        Ok(Counts {
            chars: 3,
            ..Default::default()
        })
    }
    fn visit_unit<E>(self) -> Result<Counts, E> {
        Ok(Counts::default())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Counts, A::Error> {
        let mut total = Counts::default();
        while let Some(c) = seq.next_element_seed(Count {
            is_message_list: false,
        })? {
            total.add(c);
            if self.is_message_list {
                total.messages += 1;
            }
        }
        Ok(total)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Counts, A::Error> {
        let mut total = Counts::default();
        let mut kind: Option<String> = None;
        let mut media: Option<String> = None;
        let mut data_chars = 0u64;
        while let Some(key) = map.next_key::<Cow<'de, str>>()? {
            match key.as_ref() {
                "type" | "media_type" => {
                    let v = map.next_value_seed(Tag)?;
                    if key == "type" {
                        kind = kind.or(v);
                    } else {
                        media = v;
                    }
                }
                _ => {
                    let c = map.next_value_seed(Count {
                        is_message_list: false,
                    })?;
                    if key == "source" || key == "data" {
                        data_chars += c.chars;
                    }
                    total.add(c);
                }
            }
        }
        Ok(match kind.as_deref() {
            Some("image" | "image_url" | "input_image") => Counts {
                images: 1,
                ..Default::default()
            },
            Some("document" | "input_file") if media.as_deref() != Some("text/plain") => {
                // base64: 4 characters per 3 bytes.
                Counts {
                    doc_bytes: data_chars * 3 / 4,
                    ..Default::default()
                }
            }
            _ => total,
        })
    }
}

/// The value of a `type` / `media_type` field if it is a string; anything
/// else is skipped.
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
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Option<String>, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(None)
    }
}

/// The top-level request object.
struct Request {
    route: Route,
}

#[derive(Default)]
struct Fields {
    model: Option<serde_json::Value>,
    max_tokens: Option<(String, serde_json::Value)>,
    stream: Option<serde_json::Value>,
    stream_options: Option<serde_json::Value>,
    prompt: Counts,
    tools: Counts,
    has_tools: bool,
}

impl<'de> Visitor<'de> for Request {
    type Value = Fields;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Fields, A::Error> {
        let max_field = match self.route {
            Route::OpenAiResponses => "max_output_tokens",
            _ => "max_tokens",
        };
        let mut f = Fields::default();
        while let Some(key) = map.next_key::<Cow<'de, str>>()? {
            match key.as_ref() {
                "model" => f.model = Some(map.next_value()?),
                "stream" => f.stream = Some(map.next_value()?),
                "stream_options" => f.stream_options = Some(map.next_value()?),
                k if k == max_field
                    || (self.route == Route::OpenAiChat && k == "max_completion_tokens") =>
                {
                    let v: serde_json::Value = map.next_value()?;
                    // max_completion_tokens supersedes the deprecated max_tokens.
                    if f.max_tokens
                        .as_ref()
                        .is_none_or(|(name, _)| name != "max_completion_tokens")
                    {
                        f.max_tokens = Some((k.to_string(), v));
                    }
                }
                "messages" | "input" => f.prompt.add(map.next_value_seed(Count {
                    is_message_list: true,
                })?),
                "system" | "instructions" => f.prompt.add(map.next_value_seed(Count {
                    is_message_list: false,
                })?),
                "tools" | "functions" => {
                    f.has_tools = true;
                    f.tools.add(map.next_value_seed(Count {
                        is_message_list: false,
                    })?);
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
    let text = f.prompt.chars + f.tools.chars;
    let image_tokens = match route.provider() {
        Provider::Anthropic => 1_600,
        Provider::OpenAi => 765,
    };
    let images = f.prompt.images + f.tools.images;
    let docs = f.prompt.doc_bytes.div_ceil(PDF_BYTES_PER_CHUNK) * PDF_TOKENS_PER_CHUNK;
    (text as f64 / CHARS_PER_TOKEN).ceil() as u64
        + f.prompt.messages * TOKENS_PER_MESSAGE
        + images * image_tokens
        + docs
        + if f.has_tools { TOOL_PROMPT_TOKENS } else { 0 }
}

pub fn inspect(route: Route, body: &[u8]) -> Result<RequestInfo, RequestError> {
    let trimmed = body
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .map_or(&b""[..], |i| body.get(i..).unwrap_or_default());
    if !trimmed.is_empty() && trimmed.first() != Some(&b'{') {
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
        None => None,
        Some(serde_json::Value::String(m)) if !m.trim().is_empty() => Some(m.clone()),
        Some(_) => {
            return Err(RequestError(
                "model: must be a non-empty string".to_string(),
            ))
        }
    };
    let max_tokens = match &f.max_tokens {
        None | Some((_, serde_json::Value::Null)) => None,
        Some((name, v)) => Some(
            v.as_u64()
                .ok_or_else(|| RequestError(format!("{name}: must be a non-negative integer")))?,
        ),
    };
    let stream = match &f.stream {
        None | Some(serde_json::Value::Null) => false,
        Some(serde_json::Value::Bool(b)) => *b,
        Some(_) => return Err(RequestError("stream: must be true or false".to_string())),
    };
    let include_usage = f
        .stream_options
        .as_ref()
        .and_then(|o| o.get("include_usage"))
        .and_then(|b| b.as_bool());
    Ok(RequestInfo {
        model,
        max_tokens,
        stream,
        include_usage,
        input_estimate: tokens(route, &f),
    })
}
