//! OpenAI usage. Chat Completions: `usage.{prompt_tokens, completion_tokens,
//! prompt_tokens_details.{cached_tokens, cache_write_tokens},
//! completion_tokens_details.reasoning_tokens}`; streams carry it only in a
//! final chunk with empty `choices` when `stream_options.include_usage` is
//! set. Responses: `usage.{input_tokens, output_tokens,
//! input_tokens_details.{cached_tokens, cache_write_tokens},
//! output_tokens_details.reasoning_tokens}`; streams end with
//! `response.completed` / `.incomplete` / `.failed` carrying the response.
//! Both name the tier that served the request in a top-level `service_tier`;
//! web searches are the Responses API's `web_search_call` output items.
//!
//! OpenAI's prompt / input counts include cached and cache-written tokens;
//! normalised `input` excludes them (see [`Usage`]). Reasoning tokens are
//! already inside the completion / output count: never added again.

use super::estimate::TextCounter;
use super::{for_each_string_value, Reported, Usage};
use serde::Deserialize;
use std::borrow::Cow;

#[derive(Deserialize, Default)]
struct InputDetails {
    cached_tokens: Option<u64>,
    cache_write_tokens: Option<u64>,
}

#[derive(Deserialize, Default)]
struct OutputDetails {
    reasoning_tokens: Option<u64>,
}

#[derive(Deserialize, Default)]
struct RawUsage {
    prompt_tokens: Option<u64>,
    completion_tokens: Option<u64>,
    prompt_tokens_details: Option<InputDetails>,
    completion_tokens_details: Option<OutputDetails>,
    input_tokens: Option<u64>,
    output_tokens: Option<u64>,
    input_tokens_details: Option<InputDetails>,
    output_tokens_details: Option<OutputDetails>,
}

/// One item of a Responses `output` array; only its kind and status matter.
#[derive(Deserialize)]
struct OutputItem<'a> {
    #[serde(rename = "type", borrow)]
    kind: Cow<'a, str>,
    #[serde(borrow)]
    status: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct Body<'a> {
    #[serde(borrow)]
    model: Option<Cow<'a, str>>,
    usage: Option<RawUsage>,
    #[serde(borrow)]
    service_tier: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    output: Vec<OutputItem<'a>>,
    /// Responses stream events wrap the response: `response.completed`,
    /// `.incomplete` and `.failed` carry its final usage; `.created` and
    /// `.in_progress` carry `"usage": null`.
    #[serde(borrow)]
    response: Option<Box<Body<'a>>>,
}

impl Body<'_> {
    /// The normalised usage this body reports, if it reports one.
    fn usage(&self) -> Option<Usage> {
        let u = self.usage.as_ref()?;
        let prompt = u.prompt_tokens.or(u.input_tokens).unwrap_or(0);
        let details = u
            .prompt_tokens_details
            .as_ref()
            .or(u.input_tokens_details.as_ref());
        let cached = details.and_then(|d| d.cached_tokens).unwrap_or(0);
        let written = details.and_then(|d| d.cache_write_tokens).unwrap_or(0);
        let cache_read = cached.min(prompt);
        let cache_write = written.min(prompt - cache_read);
        Some(Usage {
            input: prompt - cache_read - cache_write,
            output: u.completion_tokens.or(u.output_tokens).unwrap_or(0),
            cache_write,
            cache_write_1h: 0,
            cache_read,
            reasoning: u
                .completion_tokens_details
                .as_ref()
                .or(u.output_tokens_details.as_ref())
                .and_then(|d| d.reasoning_tokens)
                .unwrap_or(0),
            // A search that failed is not billed.
            web_search_requests: self
                .output
                .iter()
                .filter(|i| i.kind == "web_search_call" && i.status.as_deref() != Some("failed"))
                .count() as u64,
            service_tier: self.service_tier.as_deref().map(str::to_string),
            inference_geo: None,
        })
    }
}

pub fn json(body: &[u8]) -> Option<(Usage, Option<String>)> {
    let b: Body = serde_json::from_slice(body).ok()?;
    Some((b.usage()?, b.model.map(Cow::into_owned)))
}

/// Applies one stream event's data (a chat chunk or a Responses event);
/// returns which counts it reported (OpenAI reports them together, once).
pub fn stream_event(
    data: &[u8],
    usage: &mut Option<Usage>,
    model: &mut Option<String>,
) -> Reported {
    let Ok(b) = serde_json::from_slice::<Body>(data) else {
        return Reported::default();
    };
    let b = match b.response {
        Some(r) => *r,
        None => b,
    };
    if let Some(m) = &b.model {
        *model = Some(m.to_string());
    }
    match b.usage() {
        Some(u) => {
            *usage = Some(u);
            Reported {
                input: true,
                output: true,
            }
        }
        None => Reported::default(),
    }
}

/// Responses stream events whose `delta` is text the model generated: the
/// answer, a refusal, a function call's arguments, a custom tool's input,
/// reasoning text and its summary. Other `*.delta` events (audio, as
/// base64) carry no usage and are skipped unread.
const TEXT_DELTAS: &[&[u8]] = &[
    b"response.output_text.delta",
    b"response.refusal.delta",
    b"response.function_call_arguments.delta",
    b"response.custom_tool_call_input.delta",
    b"response.reasoning_text.delta",
    b"response.reasoning_summary_text.delta",
];

/// Whether the stream reader wants an event of this name. Chat chunks have
/// no name (kept); of the Responses API's `*.delta` events, which carry only
/// generated content, the text ones are kept for their text to be counted.
pub fn wanted_event(event: &[u8]) -> bool {
    !event.ends_with(b".delta") || TEXT_DELTAS.contains(&event)
}

/// Counts the text of a Responses text delta (`"delta": "..."`).
pub(crate) fn count_responses_delta(data: &[u8], relayed: &mut TextCounter) {
    for_each_string_value(data, &[b"delta"], |raw| relayed.push_json(raw));
}

/// Counts the text a chat chunk's choices carry: `delta.content`,
/// `delta.refusal` and `delta.tool_calls[].function.arguments`, for every
/// choice. `logprobs.content` is an array and is not matched.
pub(crate) fn count_chat_delta(data: &[u8], relayed: &mut TextCounter) {
    for_each_string_value(data, &[b"content", b"refusal", b"arguments"], |raw| {
        relayed.push_json(raw)
    });
}

/// How OpenAI frames a prompt: the tokens it adds around the text, for the
/// input estimate made before a request goes upstream (`usage::estimate`).
/// From OpenAI's documentation: 3 per message and 3 to prime the reply
/// (Responses `instructions` count as a message); tools add about 12.
pub(crate) mod framing {
    pub(crate) const PER_MESSAGE: u64 = 3;
    const REPLY_PRIMING: u64 = 3;
    const TOOLS: u64 = 12;

    const IMAGE_LOW: u64 = 85;
    const IMAGE_PER_TILE: u64 = 170;
    const IMAGE_UNKNOWN: u64 = 765;

    /// A request's tokens around its prompt text: `tools` is what the tool
    /// definitions cost as JSON, if there are any; `instructions` says a
    /// Responses request has `instructions`, which become a system message.
    pub(crate) fn request(prompt: u64, instructions: bool, tools: Option<u64>) -> u64 {
        let tools = tools.map_or(0, |t| t.saturating_add(TOOLS));
        REPLY_PRIMING
            .saturating_add(prompt)
            .saturating_add(tools)
            .saturating_add(if instructions { PER_MESSAGE } else { 0 })
    }

    /// GPT-4o-style tiles: 85 at `detail: low`; otherwise fit in 2048×2048,
    /// shortest side down to 768, then 85 + 170 per 512-px tile; 765 (a
    /// 1024×1024 image) when the size is unknown.
    pub(crate) fn image_tokens(dims: Option<(u32, u32)>, low_detail: bool) -> u64 {
        if low_detail {
            return IMAGE_LOW;
        }
        let Some((w, h)) = dims else {
            return IMAGE_UNKNOWN;
        };
        let (mut w, mut h) = (f64::from(w), f64::from(h));
        let fit = (2048.0 / w.max(h)).min(1.0);
        w *= fit;
        h *= fit;
        let short = (768.0 / w.min(h)).min(1.0);
        w *= short;
        h *= short;
        let tiles = (w / 512.0).ceil() as u64 * (h / 512.0).ceil() as u64;
        IMAGE_LOW + IMAGE_PER_TILE * tiles.max(1)
    }
}
