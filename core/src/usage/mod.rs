//! Provider usage: what a request asks for (model, max_tokens, stream, an
//! input-token estimate) and what the provider reports it used.
//!
//! One normalised [`Usage`] for every provider; the per-provider modules map
//! their fields onto it.

pub mod anthropic;
pub mod estimate;
pub mod inject;
pub mod openai;
pub mod sse;

use crate::route::{Provider, Route};
use estimate::TextCounter;

/// Usage normalised across providers: one count per class the providers
/// bill, and the tier and region the response says served the request.
///
/// Normalisation rule (written once, here):
/// - `input` counts only uncached input tokens. `cache_write` (5-minute, or
///   a write whose lifetime the provider does not name), `cache_write_1h`
///   and `cache_read` are separate classes, never inside `input`.
///   Anthropic reports them apart already: `input_tokens`,
///   `cache_creation_input_tokens` (of which `cache_creation.
///   ephemeral_1h_input_tokens` are 1-hour writes, the rest 5-minute),
///   `cache_read_input_tokens`. OpenAI's `prompt_tokens` / `input_tokens`
///   *include* `cached_tokens` and `cache_write_tokens`, so `input = prompt -
///   cached - written`.
/// - `output` is every output token billed, reasoning included: OpenAI's
///   `completion_tokens` / `output_tokens` already contain
///   `reasoning_tokens`, Anthropic's `output_tokens` contains
///   `output_tokens_details.thinking_tokens`. `reasoning` repeats that part
///   for the audit record and is never priced on its own.
/// - `web_search_requests`: Anthropic `server_tool_use.web_search_requests`;
///   OpenAI Responses `web_search_call` output items that did not fail.
/// - `service_tier` / `inference_geo`: what the *response* reports
///   (Anthropic `usage.service_tier`, `usage.inference_geo`; OpenAI the
///   top-level `service_tier`), never what the request asked for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Usage {
    pub input: u64,
    pub output: u64,
    pub cache_write: u64,
    pub cache_write_1h: u64,
    pub cache_read: u64,
    pub reasoning: u64,
    pub web_search_requests: u64,
    pub service_tier: Option<String>,
    pub inference_geo: Option<String>,
}

impl Usage {
    /// Tokens charged to input-tokens-per-minute buckets: input plus cache
    /// writes, plus cache reads only when the policy says so.
    pub fn input_for_limit(&self, count_cache_reads: bool) -> u64 {
        self.input
            + self.cache_writes()
            + if count_cache_reads {
                self.cache_read
            } else {
                0
            }
    }

    /// Cache writes of either lifetime.
    pub fn cache_writes(&self) -> u64 {
        self.cache_write + self.cache_write_1h
    }

    /// The whole prompt: input, cache writes and cache reads. Long-context
    /// prices switch on this count.
    pub fn prompt(&self) -> u64 {
        self.input + self.cache_writes() + self.cache_read
    }

    /// Every token of every class (daily token quotas count these).
    pub fn total(&self) -> u64 {
        self.prompt() + self.output
    }
}

/// What the request body says, read before it goes upstream.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RequestInfo {
    pub model: Option<String>,
    pub max_tokens: Option<u64>,
    pub stream: bool,
    /// OpenAI `stream_options.include_usage` as the client sent it.
    pub include_usage: Option<bool>,
    /// Estimated input tokens (see `docs/metering.md` for the rule).
    pub input_estimate: u64,
}

/// Why a request body could not be read; becomes a 400 with this message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestError(pub String);

/// Reads model, max_tokens, stream and an input-token estimate from a request
/// body of the given route, without building a DOM of the prompt.
pub fn inspect_request(route: Route, body: &[u8]) -> Result<RequestInfo, RequestError> {
    estimate::inspect(route, body)
}

/// Usage from a complete (non-streamed) JSON response body.
pub fn parse_json_usage(route: Route, body: &[u8]) -> Option<(Usage, Option<String>)> {
    match route.provider() {
        Provider::Anthropic => anthropic::json(body),
        Provider::OpenAi => openai::json(body),
    }
}

/// Which of a stream's counts the provider has reported so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Reported {
    /// The input counts: Anthropic `message_start`, OpenAI's usage chunk or
    /// final Responses event.
    pub input: bool,
    /// The output count: an Anthropic `message_delta` usage (the output
    /// count `message_start` carries is a placeholder), OpenAI's usage.
    pub output: bool,
}

impl Reported {
    fn add(&mut self, other: Reported) {
        self.input |= other.input;
        self.output |= other.output;
    }
}

/// Incremental usage reader for a streamed (SSE) response, fed each chunk as
/// it passes. Keeps only the incomplete tail of the stream; JSON-parses only
/// events whose data mentions `"usage"`. The text of content deltas is
/// counted in place with the estimator's text rule ([`TextCounter`]), so a
/// stream that ends before the provider's count is charged for the text it
/// relayed.
#[derive(Debug)]
pub struct StreamUsage {
    provider: Provider,
    splitter: sse::Splitter,
    usage: Option<Usage>,
    model: Option<String>,
    reported: Reported,
    /// The text of every content delta seen, counted as one text.
    relayed: TextCounter,
    /// A mid-stream `error` event was seen.
    pub errored: bool,
}

impl StreamUsage {
    pub fn new(route: Route) -> StreamUsage {
        let provider = route.provider();
        StreamUsage {
            provider,
            splitter: sse::Splitter::with_filter(match provider {
                Provider::Anthropic => anthropic::wanted_event,
                Provider::OpenAi => openai::wanted_event,
            }),
            usage: None,
            model: None,
            reported: Reported::default(),
            relayed: TextCounter::default(),
            errored: false,
        }
    }

    pub fn feed(&mut self, chunk: &[u8]) {
        let StreamUsage {
            provider,
            splitter,
            usage,
            model,
            reported,
            relayed,
            errored,
        } = self;
        let provider = *provider;
        splitter.feed(chunk, |event| {
            // Anthropic and the Responses API name their error events;
            // Chat Completions sends an unnamed `data: {"error": ...}`.
            if event.name == "error" || starts_with_error_object(&event.data) {
                *errored = true;
            }
            // Content deltas are most of a stream and carry no usage: their
            // text is counted in place and nothing is parsed.
            let delta_only = match provider {
                Provider::Anthropic if event.name == "content_block_delta" => {
                    anthropic::count_delta(&event.data, relayed);
                    true
                }
                Provider::OpenAi if event.name.ends_with(".delta") => {
                    openai::count_responses_delta(&event.data, relayed);
                    true
                }
                // Chat chunks are unnamed and carry text and usage alike.
                Provider::OpenAi if event.name.is_empty() => {
                    openai::count_chat_delta(&event.data, relayed);
                    false
                }
                _ => false,
            };
            if delta_only {
                return;
            }
            // Only events that carry a usage object are parsed, plus the
            // first one naming the model (a stream without usage still
            // says which model served it).
            let wanted = has_usage_object(&event.data)
                || (model.is_none() && contains(&event.data, b"\"model\""));
            if !wanted {
                return;
            }
            reported.add(match provider {
                Provider::Anthropic => anthropic::stream_event(&event.data, usage, model),
                Provider::OpenAi => openai::stream_event(&event.data, usage, model),
            });
        });
    }

    pub fn usage(&self) -> Option<&Usage> {
        self.usage.as_ref()
    }

    /// Which counts the provider has reported so far.
    pub fn reported(&self) -> Reported {
        self.reported
    }

    /// Tokens of the text the content deltas carried so far (answer text,
    /// thinking, tool-call arguments), by the estimator's text rule.
    pub fn relayed_tokens(&self) -> u64 {
        self.relayed.tokens()
    }

    pub fn model(&self) -> Option<&str> {
        self.model.as_deref()
    }

    /// Events dropped because they passed [`sse::MAX_EVENT_BYTES`].
    pub fn dropped_events(&self) -> u64 {
        self.splitter.dropped
    }
}

/// Offset of the first `needle` in `haystack`. Scans for the needle's
/// first byte with a tight loop and compares only there: SSE data is
/// scanned on every event, so this is on the streaming hot path.
pub(crate) fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    let (&first, rest) = needle.split_first()?;
    let mut from = 0;
    while let Some(i) = haystack
        .get(from..)
        .and_then(|h| h.iter().position(|b| *b == first))
    {
        let at = from + i;
        if haystack.get(at + 1..at + needle.len()) == Some(rest) {
            return Some(at);
        }
        from = at + 1;
    }
    None
}

pub(crate) fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    find(haystack, needle).is_some()
}

/// Whether `"usage"` appears as a key whose value is an object. Chat chunks
/// of a stream with `include_usage` carry `"usage":null` on every content
/// chunk, and the Responses API's `response.created` / `in_progress` events
/// carry `"usage":null` too; neither is worth a JSON parse. A `"usage"`
/// inside generated text is escaped (`\"usage\"`) and never matches.
pub(crate) fn has_usage_object(data: &[u8]) -> bool {
    const KEY: &[u8] = b"\"usage\"";
    let mut rest = data;
    while let Some(i) = find(rest, KEY) {
        rest = rest.get(i + KEY.len()..).unwrap_or_default();
        let mut after = rest.iter().filter(|b| !b.is_ascii_whitespace());
        if after.next() == Some(&b':') && after.next() == Some(&b'{') {
            return true;
        }
    }
    false
}

/// Calls `count` with every string value of an object key in `keys`
/// (unquoted, as `b"text"`) in the JSON `data`: the bytes just after the
/// value's opening quote, ready for [`TextCounter::push_json`], which
/// returns where the value's closing quote is. One pass: every string is
/// skipped whole (its escapes too), so a key-like text inside a string
/// never matches, and a key whose value is not a string (`"content":null`,
/// `"content":[...]`) is passed over. Stops at a string it cannot end.
pub(crate) fn for_each_string_value(
    data: &[u8],
    keys: &[&[u8]],
    mut count: impl FnMut(&[u8]) -> Option<usize>,
) {
    // Event data is short and dense with short strings: a plain byte loop
    // beats a vectorised search that pays its set-up at every string.
    let mut at = 0;
    while let Some(&b) = data.get(at) {
        at += 1;
        if b != b'"' {
            continue;
        }
        let start = at;
        let Some(end) = string_end(data, start) else {
            return;
        };
        at = end + 1;
        if !data.get(start..end).is_some_and(|s| keys.contains(&s)) {
            continue;
        }
        // A key: `:` and a string value may follow, with white space between.
        let next = |from: usize| {
            data.get(from..)
                .and_then(|d| d.iter().position(|b| !b.is_ascii_whitespace()))
                .map(|i| from + i)
        };
        let Some(colon) = next(at).filter(|i| data.get(*i) == Some(&b':')) else {
            continue;
        };
        let Some(quote) = next(colon + 1).filter(|i| data.get(*i) == Some(&b'"')) else {
            continue;
        };
        match data.get(quote + 1..).and_then(&mut count) {
            Some(close) => at = quote + 1 + close + 1,
            None => return,
        }
    }
}

/// The index of the quote closing the JSON string whose first byte is at
/// `start`, skipping escaped characters.
fn string_end(data: &[u8], start: usize) -> Option<usize> {
    let mut i = start;
    while let Some(&b) = data.get(i) {
        match b {
            b'"' => return Some(i),
            b'\\' => i += 2,
            _ => i += 1,
        }
    }
    None
}

fn starts_with_error_object(data: &[u8]) -> bool {
    let start = data
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .and_then(|i| data.get(i..))
        .unwrap_or_default();
    start.starts_with(b"{\"error\"")
}

#[cfg(test)]
mod tests;
