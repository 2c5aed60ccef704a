//! Provider usage: what a request asks for (model, max_tokens, stream, an
//! input-token estimate) and what the provider reports it used.
//!
//! One normalised [`Usage`] for every provider; the per-provider modules map
//! their fields onto it.

use crate::route::Route;

/// Token usage normalised across providers.
///
/// Normalisation rule (written once, here): `input` counts only uncached
/// input tokens; `cache_write` and `cache_read` are separate classes. For
/// Anthropic that is `input_tokens`, `cache_creation_input_tokens`,
/// `cache_read_input_tokens` as reported. OpenAI's `prompt_tokens` /
/// `input_tokens` already *include* cached tokens, so `input = prompt -
/// cached` and `cache_read = cached`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub input: u64,
    pub output: u64,
    pub cache_write: u64,
    pub cache_read: u64,
}

impl Usage {
    /// Tokens charged to input-tokens-per-minute buckets: input plus cache
    /// writes, plus cache reads only when the policy says so.
    pub fn input_for_limit(&self, count_cache_reads: bool) -> u64 {
        self.input
            + self.cache_write
            + if count_cache_reads {
                self.cache_read
            } else {
                0
            }
    }

    /// Every token of every class (daily token quotas count these).
    pub fn total(&self) -> u64 {
        self.input + self.output + self.cache_write + self.cache_read
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
/// body of the given route.
pub fn inspect_request(route: Route, body: &[u8]) -> Result<RequestInfo, RequestError> {
    let v: serde_json::Value = serde_json::from_slice(body)
        .map_err(|e| RequestError(format!("request body is not valid JSON: {e}")))?;
    let obj = v
        .as_object()
        .ok_or_else(|| RequestError("request body must be a JSON object".to_string()))?;
    let model = match obj.get("model") {
        Some(serde_json::Value::String(m)) if !m.is_empty() => Some(m.clone()),
        Some(_) => {
            return Err(RequestError(
                "model: must be a non-empty string".to_string(),
            ))
        }
        None => None,
    };
    let max_field = match route {
        Route::OpenAiResponses => "max_output_tokens",
        Route::OpenAiChat if obj.contains_key("max_completion_tokens") => "max_completion_tokens",
        _ => "max_tokens",
    };
    let max_tokens =
        match obj.get(max_field) {
            None | Some(serde_json::Value::Null) => None,
            Some(n) => Some(n.as_u64().ok_or_else(|| {
                RequestError(format!("{max_field}: must be a non-negative integer"))
            })?),
        };
    let stream = obj.get("stream").and_then(|s| s.as_bool()).unwrap_or(false);
    let include_usage = obj
        .get("stream_options")
        .and_then(|o| o.get("include_usage"))
        .and_then(|b| b.as_bool());
    let chars = body.len() as u64;
    Ok(RequestInfo {
        model,
        max_tokens,
        stream,
        include_usage,
        input_estimate: chars.div_ceil(4),
    })
}

/// Usage from a complete (non-streamed) JSON response body.
pub fn parse_json_usage(route: Route, body: &[u8]) -> Option<(Usage, Option<String>)> {
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    let model = v.get("model").and_then(|m| m.as_str()).map(str::to_string);
    let u = v.get("usage")?;
    let n = |f: &str| u.get(f).and_then(|x| x.as_u64()).unwrap_or(0);
    let usage = match route.provider() {
        crate::route::Provider::Anthropic => Usage {
            input: n("input_tokens"),
            output: n("output_tokens"),
            cache_write: n("cache_creation_input_tokens"),
            cache_read: n("cache_read_input_tokens"),
        },
        crate::route::Provider::OpenAi => {
            let prompt = u
                .get("prompt_tokens")
                .or(u.get("input_tokens"))
                .and_then(|x| x.as_u64())
                .unwrap_or(0);
            let out = u
                .get("completion_tokens")
                .or(u.get("output_tokens"))
                .and_then(|x| x.as_u64())
                .unwrap_or(0);
            let cached = u
                .get("prompt_tokens_details")
                .or(u.get("input_tokens_details"))
                .and_then(|d| d.get("cached_tokens"))
                .and_then(|x| x.as_u64())
                .unwrap_or(0);
            Usage {
                input: prompt.saturating_sub(cached),
                output: out,
                cache_write: 0,
                cache_read: cached,
            }
        }
    };
    Some((usage, model))
}

/// Incremental usage reader for a streamed (SSE) response. Fed each chunk as
/// it passes; never buffers more than one incomplete event.
#[derive(Debug, Default)]
pub struct StreamUsage {
    route: Option<Route>,
    carry: Vec<u8>,
    usage: Option<Usage>,
    model: Option<String>,
}

impl StreamUsage {
    pub fn new(route: Route) -> StreamUsage {
        StreamUsage {
            route: Some(route),
            ..Default::default()
        }
    }

    pub fn feed(&mut self, chunk: &[u8]) {
        self.carry.extend_from_slice(chunk);
        while let Some(end) = self.carry.windows(2).position(|w| w == b"\n\n") {
            let event: Vec<u8> = self.carry.drain(..end + 2).collect();
            for line in event.split(|b| *b == b'\n') {
                if let Some(data) = line.strip_prefix(b"data: ") {
                    self.data(data);
                }
            }
        }
    }

    fn data(&mut self, data: &[u8]) {
        let Ok(v) = serde_json::from_slice::<serde_json::Value>(data) else {
            return;
        };
        let Some(route) = self.route else { return };
        let u = match v.get("type").and_then(|t| t.as_str()) {
            Some("message_start") => v.get("message").and_then(|m| m.get("usage")),
            Some("message_delta") => v.get("usage"),
            _ => v
                .get("usage")
                .or(v.get("response").and_then(|r| r.get("usage"))),
        };
        let Some(u) = u else { return };
        if let Some(m) = v
            .get("message")
            .and_then(|m| m.get("model"))
            .or(v.get("model"))
            .and_then(|m| m.as_str())
        {
            self.model = Some(m.to_string());
        }
        let wrapped = serde_json::json!({ "usage": u });
        if let Some((new, _)) = parse_json_usage(route, wrapped.to_string().as_bytes()) {
            let prev = self.usage.unwrap_or_default();
            self.usage = Some(Usage {
                input: if new.input > 0 { new.input } else { prev.input },
                output: new.output.max(prev.output),
                cache_write: if new.cache_write > 0 {
                    new.cache_write
                } else {
                    prev.cache_write
                },
                cache_read: if new.cache_read > 0 {
                    new.cache_read
                } else {
                    prev.cache_read
                },
            });
        }
    }

    pub fn usage(&self) -> Option<Usage> {
        self.usage
    }

    pub fn model(&self) -> Option<&str> {
        self.model.as_deref()
    }
}
