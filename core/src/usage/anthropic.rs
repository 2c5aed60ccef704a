//! Anthropic Messages usage. JSON: `usage.{input_tokens, output_tokens,
//! cache_creation_input_tokens, cache_creation.{ephemeral_5m_input_tokens,
//! ephemeral_1h_input_tokens}, cache_read_input_tokens,
//! server_tool_use.web_search_requests, output_tokens_details.thinking_tokens,
//! service_tier, inference_geo}`. Stream: `message_start.message.usage`
//! carries the input counts; every `message_delta.usage` is cumulative (the
//! last one wins; it always has `output_tokens` and may repeat the input
//! fields, and carries the final `server_tool_use`).

use super::estimate::TextCounter;
use super::{for_each_string_value, Reported, Usage};
use serde::Deserialize;
use std::borrow::Cow;

#[derive(Deserialize, Default)]
struct RawUsage<'a> {
    input_tokens: Option<u64>,
    output_tokens: Option<u64>,
    cache_creation_input_tokens: Option<u64>,
    cache_creation: Option<CacheCreation>,
    cache_read_input_tokens: Option<u64>,
    server_tool_use: Option<ServerToolUse>,
    output_tokens_details: Option<OutputDetails>,
    #[serde(borrow)]
    service_tier: Option<Cow<'a, str>>,
    #[serde(borrow)]
    inference_geo: Option<Cow<'a, str>>,
}

/// The cache writes by lifetime; their sum is `cache_creation_input_tokens`.
#[derive(Deserialize)]
struct CacheCreation {
    ephemeral_5m_input_tokens: Option<u64>,
    ephemeral_1h_input_tokens: Option<u64>,
}

#[derive(Deserialize)]
struct ServerToolUse {
    web_search_requests: Option<u64>,
}

#[derive(Deserialize)]
struct OutputDetails {
    thinking_tokens: Option<u64>,
}

// Strings are `Cow` so that a value with a JSON escape (which cannot be
// borrowed from the input) does not make the whole event unreadable.
#[derive(Deserialize)]
struct Message<'a> {
    #[serde(borrow)]
    model: Option<Cow<'a, str>>,
    #[serde(borrow)]
    usage: Option<RawUsage<'a>>,
}

#[derive(Deserialize)]
struct StreamEvent<'a> {
    #[serde(rename = "type", borrow)]
    kind: Cow<'a, str>,
    #[serde(borrow)]
    message: Option<Message<'a>>,
    #[serde(borrow)]
    usage: Option<RawUsage<'a>>,
}

/// Applies the counts one usage object names; the others keep their value
/// (stream usage is cumulative and a later object may name only some).
fn merge(into: &mut Usage, u: &RawUsage) {
    let set = |field: &mut u64, v: Option<u64>| {
        if let Some(v) = v {
            *field = v;
        }
    };
    set(&mut into.input, u.input_tokens);
    set(&mut into.output, u.output_tokens);
    set(&mut into.cache_read, u.cache_read_input_tokens);
    set(
        &mut into.web_search_requests,
        u.server_tool_use
            .as_ref()
            .and_then(|s| s.web_search_requests),
    );
    set(
        &mut into.reasoning,
        u.output_tokens_details
            .as_ref()
            .and_then(|d| d.thinking_tokens),
    );
    // Cache writes: the total and its 1-hour part, each as last named. The
    // breakdown alone also gives the total; older responses have no
    // breakdown, and then every write is a 5-minute one. The 1-hour part
    // never exceeds the total, so inconsistent counts are never charged twice.
    let mut total = into.cache_writes();
    let mut one_hour = into.cache_write_1h;
    if let Some(c) = &u.cache_creation {
        one_hour = c.ephemeral_1h_input_tokens.unwrap_or(0);
        total = c.ephemeral_5m_input_tokens.unwrap_or(0) + one_hour;
    }
    set(&mut total, u.cache_creation_input_tokens);
    into.cache_write_1h = one_hour.min(total);
    into.cache_write = total - into.cache_write_1h;
    if let Some(t) = &u.service_tier {
        into.service_tier = Some(t.to_string());
    }
    if let Some(g) = &u.inference_geo {
        into.inference_geo = Some(g.to_string());
    }
}

pub fn json(body: &[u8]) -> Option<(Usage, Option<String>)> {
    let m: Message = serde_json::from_slice(body).ok()?;
    let mut usage = Usage::default();
    merge(&mut usage, m.usage.as_ref()?);
    Some((usage, m.model.map(Cow::into_owned)))
}

/// Applies one stream event's data; returns which counts it reported.
pub fn stream_event(
    data: &[u8],
    usage: &mut Option<Usage>,
    model: &mut Option<String>,
) -> Reported {
    let Ok(e) = serde_json::from_slice::<StreamEvent>(data) else {
        return Reported::default();
    };
    let (raw, is_delta) = match e.kind.as_ref() {
        // `message_start` names the model and carries the input counts (and
        // an output count of 1 or so, replaced by the first `message_delta`).
        "message_start" => (
            e.message.and_then(|m| {
                if let Some(m) = m.model {
                    *model = Some(m.into_owned());
                }
                m.usage
            }),
            false,
        ),
        // Cumulative: each one replaces the counts it names; a mid-stream
        // `error` simply leaves the last counts seen.
        "message_delta" => (e.usage, true),
        _ => (None, false),
    };
    let Some(u) = raw else {
        return Reported::default();
    };
    let reported = Reported {
        input: u.input_tokens.is_some(),
        output: is_delta && u.output_tokens.is_some(),
    };
    merge(usage.get_or_insert_with(Usage::default), &u);
    reported
}

/// Whether the stream reader wants an event of this name: every one that can
/// carry usage, the model or an error, and the content deltas whose text it
/// counts. Block starts and stops, pings and `message_stop` carry none of
/// these and their data is never copied; an unknown name is kept.
pub fn wanted_event(event: &[u8]) -> bool {
    !matches!(
        event,
        b"content_block_start" | b"content_block_stop" | b"ping" | b"message_stop"
    )
}

/// Counts the model text a `content_block_delta` carries: the answer
/// (`text_delta.text`), thinking (`thinking_delta.thinking`, billed as
/// output) and a tool call's input as the model writes it
/// (`input_json_delta.partial_json`). A `signature_delta` and citations are
/// not text the model generated token by token, and are not counted.
pub(crate) fn count_delta(data: &[u8], relayed: &mut TextCounter) {
    for_each_string_value(data, &[b"text", b"thinking", b"partial_json"], |raw| {
        relayed.push_json(raw)
    });
}

/// How Anthropic frames a prompt: the tokens it adds around the text, for the
/// input estimate made before a request goes upstream (`usage::estimate`).
/// From Anthropic's documentation: about 4 tokens per request, 3 per message
/// and 3 for a system prompt; tools add its tool-use system prompt (346
/// tokens with `tool_choice` auto or none, 313 with any or a named tool, for
/// the Claude 4 family).
pub(crate) mod framing {
    pub(crate) const PER_REQUEST: u64 = 4;
    pub(crate) const PER_MESSAGE: u64 = 3;
    pub(crate) const SYSTEM: u64 = 3;
    const TOOL_PROMPT_AUTO: u64 = 346;
    const TOOL_PROMPT_ANY: u64 = 313;

    const IMAGE_MAX_EDGE: f64 = 1568.0;
    const IMAGE_PIXELS_PER_TOKEN: f64 = 750.0;
    const IMAGE_MAX_TOKENS: u64 = 1_600;

    /// A request's tokens around its prompt text: `tools` is what the tool
    /// definitions cost as JSON, if there are any.
    pub(crate) fn request(
        prompt: u64,
        has_system: bool,
        tools: Option<u64>,
        tool_choice: Option<&str>,
    ) -> u64 {
        let tools = tools.map_or(0, |t| {
            let prompt = match tool_choice {
                Some("any" | "tool") => TOOL_PROMPT_ANY,
                _ => TOOL_PROMPT_AUTO,
            };
            t.saturating_add(prompt)
        });
        PER_REQUEST
            .saturating_add(prompt)
            .saturating_add(tools)
            .saturating_add(if has_system { SYSTEM } else { 0 })
    }

    /// `width × height / 750` after scaling the long edge to at most
    /// 1,568 px, capped at 1,600; 1,600 when the size is unknown.
    pub(crate) fn image_tokens(dims: Option<(u32, u32)>) -> u64 {
        let Some((w, h)) = dims else {
            return IMAGE_MAX_TOKENS;
        };
        let (w, h) = (f64::from(w), f64::from(h));
        let scale = (IMAGE_MAX_EDGE / w.max(h)).min(1.0);
        let t = (w * scale) * (h * scale) / IMAGE_PIXELS_PER_TOKEN;
        (t.ceil() as u64).clamp(1, IMAGE_MAX_TOKENS)
    }
}
