//! Anthropic Messages usage. JSON: `usage.{input_tokens, output_tokens,
//! cache_creation_input_tokens, cache_read_input_tokens}`. Stream:
//! `message_start.message.usage` carries the input counts; every
//! `message_delta.usage` is cumulative (the last one wins; it always has
//! `output_tokens` and may repeat the input fields).

use super::Usage;
use serde::Deserialize;
use std::borrow::Cow;

#[derive(Deserialize, Default)]
struct RawUsage {
    input_tokens: Option<u64>,
    output_tokens: Option<u64>,
    cache_creation_input_tokens: Option<u64>,
    cache_read_input_tokens: Option<u64>,
}

// Strings are `Cow` so that a value with a JSON escape (which cannot be
// borrowed from the input) does not make the whole event unreadable.
#[derive(Deserialize)]
struct Message<'a> {
    #[serde(borrow)]
    model: Option<Cow<'a, str>>,
    usage: Option<RawUsage>,
}

#[derive(Deserialize)]
struct StreamEvent<'a> {
    #[serde(rename = "type", borrow)]
    kind: Cow<'a, str>,
    #[serde(borrow)]
    message: Option<Message<'a>>,
    usage: Option<RawUsage>,
}

fn merge(into: &mut Usage, u: &RawUsage) {
    if let Some(v) = u.input_tokens {
        into.input = v;
    }
    if let Some(v) = u.output_tokens {
        into.output = v;
    }
    if let Some(v) = u.cache_creation_input_tokens {
        into.cache_write = v;
    }
    if let Some(v) = u.cache_read_input_tokens {
        into.cache_read = v;
    }
}

pub fn json(body: &[u8]) -> Option<(Usage, Option<String>)> {
    let m: Message = serde_json::from_slice(body).ok()?;
    let mut usage = Usage::default();
    merge(&mut usage, m.usage.as_ref()?);
    Some((usage, m.model.map(Cow::into_owned)))
}

/// Applies one stream event's data; returns whether it carried usage.
pub fn stream_event(data: &[u8], usage: &mut Option<Usage>, model: &mut Option<String>) -> bool {
    let Ok(e) = serde_json::from_slice::<StreamEvent>(data) else {
        return false;
    };
    let raw = match e.kind.as_ref() {
        // `message_start` names the model and carries the input counts (and
        // an output count of 1 or so, replaced by the first `message_delta`).
        "message_start" => e.message.and_then(|m| {
            if let Some(m) = m.model {
                *model = Some(m.into_owned());
            }
            m.usage
        }),
        // Cumulative: each one replaces the counts it names; a mid-stream
        // `error` simply leaves the last counts seen.
        "message_delta" => e.usage,
        _ => None,
    };
    match raw {
        Some(u) => {
            merge(usage.get_or_insert_with(Usage::default), &u);
            true
        }
        None => false,
    }
}

/// Whether a stream event of this name can carry usage, the model or an
/// error. Content events (most of a stream) cannot; an unknown name is kept.
pub fn may_carry_usage(event: &[u8]) -> bool {
    !matches!(
        event,
        b"content_block_start"
            | b"content_block_delta"
            | b"content_block_stop"
            | b"ping"
            | b"message_stop"
    )
}
