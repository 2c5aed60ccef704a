//! Incremental Server-Sent Events splitter, following the WHATWG event-stream
//! parsing rules that the providers' streams rely on:
//!
//! - a network chunk may end anywhere, even inside a CRLF pair or a UTF-8
//!   character, so only the unfinished line is carried to the next chunk;
//! - lines end in LF, CRLF or a lone CR; an event ends at a blank line;
//! - `field:value` with at most one space after the colon removed
//!   (`data:{..}` and `data: {..}` are the same); a line without a colon is a
//!   field with an empty value;
//! - several `data:` lines of one event are joined with `\n`;
//! - lines starting with `:` are comments (proxies send `: keep-alive`);
//! - an event without any `data:` line is not dispatched;
//! - a UTF-8 byte-order mark at the very start of the stream is ignored.
//!
//! Complete lines are read straight from the chunk; only the incomplete tail
//! is copied. The line and event buffers keep their capacity, so a stream
//! allocates only while its largest event is still growing.

/// An event larger than this is dropped rather than buffered: it protects the
/// worker's memory from an upstream that never sends a blank line. The
/// largest legitimate event is a Responses `response.completed`, which
/// repeats the whole response; 8 MiB is far above a maximum-length answer.
pub const MAX_EVENT_BYTES: usize = 8 << 20;

/// One complete event: its `event:` name (empty if none) and its `data:`
/// lines joined with `\n`.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Event {
    pub name: String,
    pub data: Vec<u8>,
}

#[derive(Debug)]
pub struct Splitter {
    /// Bytes of the current line when it started in an earlier chunk.
    line: Vec<u8>,
    /// The event being assembled.
    event: Event,
    has_data: bool,
    /// A CR ended the previous chunk: an LF starting this one belongs to it.
    pending_cr: bool,
    /// No line has been completed yet (where a byte-order mark may sit).
    at_start: bool,
    /// The current line or event passed [`MAX_EVENT_BYTES`]; it is skipped
    /// up to the next blank line.
    oversized: bool,
    /// Events dropped for their size.
    pub dropped: u64,
    /// Whether an event of this name is wanted; the data of an unwanted one
    /// is never copied and the event is not dispatched.
    wanted: fn(&[u8]) -> bool,
    /// The current event's name was not wanted.
    unwanted: bool,
}

impl Default for Splitter {
    fn default() -> Splitter {
        Splitter {
            line: Vec::new(),
            event: Event::default(),
            has_data: false,
            pending_cr: false,
            at_start: true,
            oversized: false,
            dropped: 0,
            wanted: |_| true,
            unwanted: false,
        }
    }
}

impl Splitter {
    pub fn new() -> Splitter {
        Splitter::default()
    }

    /// A splitter that dispatches only events whose name (empty when the
    /// event has none) `wanted` accepts: the data of events a reader never
    /// looks at (pings, block starts and stops, audio deltas) is not copied.
    pub fn with_filter(wanted: fn(&[u8]) -> bool) -> Splitter {
        Splitter {
            wanted,
            ..Splitter::default()
        }
    }

    /// Feeds a chunk and calls `on_event` for every event it completes.
    pub fn feed(&mut self, chunk: &[u8], mut on_event: impl FnMut(&Event)) {
        let mut rest = chunk;
        if self.pending_cr {
            self.pending_cr = false;
            if let Some(after) = rest.strip_prefix(b"\n") {
                rest = after;
            }
        }
        while let Some(pos) = rest.iter().position(|b| *b == b'\n' || *b == b'\r') {
            let (head, tail) = rest.split_at(pos);
            let cr = tail.first() == Some(&b'\r');
            rest = tail.get(1..).unwrap_or_default();
            if cr {
                match rest.first() {
                    Some(b'\n') => rest = rest.get(1..).unwrap_or_default(),
                    // The LF of a CRLF may arrive with the next chunk.
                    None => self.pending_cr = true,
                    _ => {}
                }
            }
            if self.line.is_empty() {
                self.end_line(head, &mut on_event);
            } else {
                let mut line = std::mem::take(&mut self.line);
                if !self.oversized {
                    line.extend_from_slice(head);
                }
                self.end_line(&line, &mut on_event);
                line.clear();
                self.line = line;
            }
        }
        if self.line.len() + rest.len() + self.event.data.len() > MAX_EVENT_BYTES {
            self.oversized = true;
        }
        if !self.oversized {
            self.line.extend_from_slice(rest);
        } else if self.line.is_empty() && !rest.is_empty() {
            // Keep one byte so the next line end still knows a line was open.
            self.line.push(b'x');
        }
    }

    fn end_line(&mut self, line: &[u8], on_event: &mut impl FnMut(&Event)) {
        let line = if std::mem::take(&mut self.at_start) {
            line.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(line)
        } else {
            line
        };
        if line.is_empty() {
            if self.oversized {
                self.dropped += 1;
            } else if self.has_data && !self.unwanted {
                on_event(&self.event);
            }
            self.event.name.clear();
            self.event.data.clear();
            self.has_data = false;
            self.oversized = false;
            self.unwanted = false;
            return;
        }
        if self.oversized || line.first() == Some(&b':') {
            return;
        }
        let (field, value) = match line.iter().position(|b| *b == b':') {
            Some(i) => {
                let v = line.get(i + 1..).unwrap_or_default();
                (
                    line.get(..i).unwrap_or_default(),
                    v.strip_prefix(b" ").unwrap_or(v),
                )
            }
            None => (line, &b""[..]),
        };
        match field {
            // An unwanted event is never dispatched: its data is not kept.
            b"data" if self.unwanted => {}
            b"data" => {
                if self.event.data.len() + value.len() + 1 > MAX_EVENT_BYTES {
                    self.oversized = true;
                    return;
                }
                if self.has_data {
                    self.event.data.push(b'\n');
                }
                self.event.data.extend_from_slice(value);
                self.has_data = true;
            }
            b"event" => {
                // Reuses the name's buffer; valid UTF-8 is borrowed, not copied twice.
                self.event.name.clear();
                self.unwanted = !(self.wanted)(value);
                if self.unwanted {
                    self.event.data.clear();
                } else {
                    match std::str::from_utf8(value) {
                        Ok(name) => self.event.name.push_str(name),
                        Err(_) => self.event.name.push_str(&String::from_utf8_lossy(value)),
                    }
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn events(chunks: &[&[u8]]) -> Vec<(String, String)> {
        let mut s = Splitter::new();
        let mut out = Vec::new();
        for c in chunks {
            s.feed(c, |e| {
                out.push((
                    e.name.clone(),
                    String::from_utf8_lossy(&e.data).into_owned(),
                ))
            });
        }
        out
    }

    fn at_every_split(doc: &[u8]) -> Vec<(String, String)> {
        let whole = events(&[doc]);
        for cut in 0..=doc.len() {
            assert_eq!(events(&[&doc[..cut], &doc[cut..]]), whole, "cut at {cut}");
        }
        let bytes: Vec<&[u8]> = doc.chunks(1).collect();
        assert_eq!(events(&bytes), whole, "byte by byte");
        whole
    }

    fn ev(name: &str, data: &str) -> (String, String) {
        (name.to_string(), data.to_string())
    }

    #[test]
    fn splits_lf_crlf_and_cr_with_or_without_space_and_comments() {
        let doc = b"event: a\ndata: 1\n\n: keep-alive\n\nevent:b\r\ndata:2\r\ndata: 3\r\n\r\ndata: 4\r\rdata: [DONE]\n\n";
        assert_eq!(
            at_every_split(doc),
            vec![ev("a", "1"), ev("b", "2\n3"), ev("", "4"), ev("", "[DONE]")]
        );
    }

    #[test]
    fn only_one_space_after_the_colon_is_removed() {
        assert_eq!(
            at_every_split(b"data:  two spaces\n\ndata\n\n"),
            vec![ev("", " two spaces"), ev("", "")]
        );
    }

    #[test]
    fn an_event_without_data_is_not_dispatched_and_its_name_does_not_leak() {
        assert_eq!(
            at_every_split(b"event: ping\n\ndata: x\n\nevent: a\nid: 7\nretry: 10\ndata: y\n\n"),
            vec![ev("", "x"), ev("a", "y")]
        );
    }

    #[test]
    fn a_byte_order_mark_at_the_start_is_ignored() {
        assert_eq!(
            at_every_split(b"\xEF\xBB\xBFevent: a\ndata: 1\n\n"),
            vec![ev("a", "1")]
        );
    }

    #[test]
    fn an_unterminated_event_is_not_emitted() {
        assert_eq!(events(&[b"data: {\"usage\":"]), vec![]);
        assert_eq!(events(&[b"data: {}\n"]), vec![]);
    }

    #[test]
    fn an_event_over_the_size_cap_is_dropped_and_the_stream_recovers() {
        let big = vec![b'a'; MAX_EVENT_BYTES + 10];
        let mut s = Splitter::new();
        let mut out = Vec::new();
        for part in [&b"data: "[..], &big[..], b"\n\n", b"data: after\n\n"] {
            // Sent in 64 KiB pieces, as a proxy would.
            for piece in part.chunks(1 << 16) {
                s.feed(piece, |e| out.push(e.data.clone()));
            }
        }
        assert_eq!(out, vec![b"after".to_vec()]);
        assert_eq!(s.dropped, 1);
        assert!(s.line.capacity() <= MAX_EVENT_BYTES + (1 << 16));
        // Many data lines that together pass the cap are dropped too.
        let mut s = Splitter::new();
        let line = [b"data: ".as_slice(), &vec![b'b'; 1 << 20], b"\n"].concat();
        let mut out = Vec::new();
        for _ in 0..9 {
            s.feed(&line, |e| out.push(e.data.len()));
        }
        s.feed(b"\ndata: ok\n\n", |e| out.push(e.data.len()));
        assert_eq!(out, vec![2]);
    }

    #[test]
    fn a_filtered_splitter_skips_unwanted_events_at_every_split() {
        let doc = b"event: content_block_delta\ndata: {\"usage\":{}}\n\nevent: message_delta\ndata: {\"a\":1}\n\ndata: unnamed\n\n";
        let wanted: fn(&[u8]) -> bool = |name| name != b"content_block_delta";
        for cut in 0..=doc.len() {
            let mut s = Splitter::with_filter(wanted);
            let mut out = Vec::new();
            for part in [&doc[..cut], &doc[cut..]] {
                s.feed(part, |e| {
                    out.push((
                        e.name.clone(),
                        String::from_utf8_lossy(&e.data).into_owned(),
                    ))
                });
            }
            assert_eq!(
                out,
                vec![ev("message_delta", "{\"a\":1}"), ev("", "unnamed")],
                "cut at {cut}"
            );
        }
    }
}
