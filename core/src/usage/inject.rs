//! OpenAI Chat streams report usage only when the request asks for it
//! (`stream_options.include_usage: true`). Tollgate asks on the client's
//! behalf so streamed spend is never recorded as zero, and removes the extra
//! usage-only chunk from the client's stream so clients that index
//! `choices[0]` on every chunk keep working.

use super::{contains, find, has_usage_object, sse};

/// The request body with `stream_options.include_usage` set to true, or
/// `None` if it cannot be rewritten (not a JSON object).
pub fn include_usage(body: &[u8]) -> Option<Vec<u8>> {
    let start = body.iter().position(|b| !b.is_ascii_whitespace())?;
    if body.get(start) != Some(&b'{') {
        return None;
    }
    if !contains(body, b"\"stream_options\"") {
        // Common case: insert the field after the opening brace; no DOM.
        let rest = body.get(start + 1..)?;
        let empty = rest.iter().all(|b| b.is_ascii_whitespace() || *b == b'}');
        let mut out = Vec::with_capacity(body.len() + 48);
        out.extend_from_slice(body.get(..=start)?);
        out.extend_from_slice(br#""stream_options":{"include_usage":true}"#);
        if !empty {
            out.push(b',');
        }
        out.extend_from_slice(rest);
        return Some(out);
    }
    // The client sent stream_options without include_usage (or with false):
    // rare, so rewrite through a DOM.
    let mut v: serde_json::Value = serde_json::from_slice(body).ok()?;
    let opts = v
        .as_object_mut()?
        .entry("stream_options")
        .or_insert_with(|| serde_json::json!({}));
    if !opts.is_object() {
        *opts = serde_json::json!({});
    }
    opts.as_object_mut()?
        .insert("include_usage".into(), true.into());
    serde_json::to_vec(&v).ok()
}

/// The request body with its top-level `model` replaced (a downgrade), or
/// `None` if it is not a JSON object. Rewritten through a DOM: a downgrade
/// is the exception, and the field can sit anywhere in the object.
pub fn replace_model(body: &[u8], model: &str) -> Option<Vec<u8>> {
    let mut v: serde_json::Value = serde_json::from_slice(body).ok()?;
    v.as_object_mut()?
        .insert("model".into(), serde_json::Value::String(model.to_string()));
    serde_json::to_vec(&v).ok()
}

/// Removes the usage-only chunk (`"choices":[]` with `usage`) from a chat
/// stream. Bytes are forwarded event by event: an incomplete event waits in
/// the carry until its end arrives, so the client still gets every content
/// event as soon as it is complete.
#[derive(Debug, Default)]
pub struct UsageChunkStripper {
    carry: Vec<u8>,
}

impl UsageChunkStripper {
    /// What to forward for this chunk (everything at the end of the stream),
    /// or `None` to forward the chunk as it is: a chunk of whole events none
    /// of which carries a usage object passes without a copy.
    pub fn filter(&mut self, chunk: &[u8], end_of_stream: bool) -> Option<Vec<u8>> {
        if self.carry.is_empty()
            && (end_of_stream || last_event_end(chunk) == chunk.len())
            && !has_usage_object(chunk)
        {
            return None;
        }
        self.carry.extend_from_slice(chunk);
        let cut = if end_of_stream {
            self.carry.len()
        } else {
            last_event_end(&self.carry)
        };
        let complete: Vec<u8> = self.carry.drain(..cut).collect();
        let mut out = Vec::with_capacity(complete.len());
        for event in split_events(&complete) {
            if !is_usage_only(event) {
                out.extend_from_slice(event);
            }
        }
        Some(out)
    }
}

/// Byte offset just past the last blank line (event end) in `buf`.
fn last_event_end(buf: &[u8]) -> usize {
    let mut end = 0;
    let mut i = 0;
    while i + 1 < buf.len() {
        match (buf.get(i), buf.get(i + 1), buf.get(i + 2), buf.get(i + 3)) {
            (Some(b'\r'), Some(b'\n'), Some(b'\r'), Some(b'\n')) => {
                end = i + 4;
                i += 4;
            }
            (Some(b'\n'), Some(b'\n'), _, _) => {
                end = i + 2;
                i += 2;
            }
            _ => i += 1,
        }
    }
    end
}

fn split_events(buf: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    let mut rest = buf;
    while !rest.is_empty() {
        let end = last_event_end_first(rest).unwrap_or(rest.len());
        let (event, tail) = rest.split_at(end);
        out.push(event);
        rest = tail;
    }
    out
}

fn last_event_end_first(buf: &[u8]) -> Option<usize> {
    let lf = find(buf, b"\n\n").map(|p| p + 2);
    let crlf = find(buf, b"\r\n\r\n").map(|p| p + 4);
    match (lf, crlf) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

fn is_usage_only(event: &[u8]) -> bool {
    if !contains(event, b"\"usage\"") || !contains(event, b"\"choices\"") {
        return false;
    }
    let mut data = Vec::new();
    sse::Splitter::new().feed(event, |e| data = e.data.clone());
    if data.is_empty() {
        // The event lacks its terminating blank line (end of stream).
        sse::Splitter::new().feed(&[event, b"\n\n"].concat(), |e| data = e.data.clone());
    }
    serde_json::from_slice::<serde_json::Value>(&data)
        .map(|v| {
            v.get("choices")
                .and_then(|c| c.as_array())
                .is_some_and(|c| c.is_empty())
                && v.get("usage").is_some_and(|u| u.is_object())
        })
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inserts_include_usage_without_a_dom_or_merges_it() {
        let out = include_usage(br#"{"model":"g","stream":true}"#).unwrap();
        assert_eq!(
            out,
            br#"{"stream_options":{"include_usage":true},"model":"g","stream":true}"#
        );
        let out =
            include_usage(br#"{"model":"g","stream_options":{"include_usage":false}}"#).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["stream_options"]["include_usage"], true);
        assert_eq!(include_usage(b"[1]"), None);
    }

    #[test]
    fn strips_only_the_usage_chunk_at_every_split_point() {
        let stream = concat!(
            "data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}],\"usage\":null}\n\n",
            "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":1}}\n\n",
            "data: [DONE]\n\n"
        )
        .as_bytes();
        let want = concat!(
            "data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}],\"usage\":null}\n\n",
            "data: [DONE]\n\n"
        )
        .as_bytes();
        for cut in 0..=stream.len() {
            let mut s = UsageChunkStripper::default();
            let (a, b) = stream.split_at(cut);
            let mut out = s.filter(a, false).unwrap_or_else(|| a.to_vec());
            out.extend(s.filter(b, true).unwrap_or_else(|| b.to_vec()));
            assert_eq!(out, want, "cut at {cut}");
        }
    }
}
