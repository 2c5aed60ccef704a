//! Incremental Server-Sent Events splitter. Events may be cut anywhere
//! between network chunks; lines end in LF, CRLF or a lone CR; an event ends
//! at a blank line. Only the incomplete tail is kept between chunks.

/// One complete event: its `event:` name (empty if none) and its `data:`
/// lines joined with `\n`.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Event {
    pub name: String,
    pub data: Vec<u8>,
}

#[derive(Debug, Default)]
pub struct Splitter {
    /// Bytes of the current, unfinished line.
    line: Vec<u8>,
    /// The event being assembled.
    event: Event,
    has_data: bool,
    /// A CR ended the previous chunk: a following LF belongs to it.
    pending_cr: bool,
}

impl Splitter {
    pub fn new() -> Splitter {
        Splitter::default()
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
            self.line.extend_from_slice(head);
            let crlf = tail.first() == Some(&b'\r');
            rest = tail.get(1..).unwrap_or_default();
            if crlf {
                match rest.first() {
                    Some(b'\n') => rest = rest.get(1..).unwrap_or_default(),
                    None => self.pending_cr = true,
                    _ => {}
                }
            }
            self.end_line(&mut on_event);
        }
        self.line.extend_from_slice(rest);
    }

    fn end_line(&mut self, on_event: &mut impl FnMut(&Event)) {
        let line = std::mem::take(&mut self.line);
        if line.is_empty() {
            if self.has_data {
                on_event(&self.event);
            }
            self.event.name.clear();
            self.event.data.clear();
            self.has_data = false;
        } else if line.first() == Some(&b':') {
            // Comment (keep-alive).
        } else {
            let (field, value) = match line.iter().position(|b| *b == b':') {
                Some(i) => {
                    let v = line.get(i + 1..).unwrap_or_default();
                    (
                        line.get(..i).unwrap_or_default(),
                        v.strip_prefix(b" ").unwrap_or(v),
                    )
                }
                None => (line.as_slice(), &b""[..]),
            };
            match field {
                b"data" => {
                    if self.has_data {
                        self.event.data.push(b'\n');
                    }
                    self.event.data.extend_from_slice(value);
                    self.has_data = true;
                }
                b"event" => self.event.name = String::from_utf8_lossy(value).into_owned(),
                _ => {}
            }
            self.line = line;
            self.line.clear();
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

    #[test]
    fn splits_lf_crlf_and_cr_with_or_without_space_and_comments() {
        let doc = b"event: a\ndata: 1\n\n: keep-alive\n\nevent:b\r\ndata:2\r\ndata: 3\r\n\r\ndata: 4\r\rdata: [DONE]\n\n";
        let want = vec![
            ("a".to_string(), "1".to_string()),
            ("b".to_string(), "2\n3".to_string()),
            (String::new(), "4".to_string()),
            (String::new(), "[DONE]".to_string()),
        ];
        assert_eq!(events(&[doc]), want);
        for cut in 0..doc.len() {
            assert_eq!(events(&[&doc[..cut], &doc[cut..]]), want, "cut at {cut}");
        }
        let bytes: Vec<&[u8]> = doc.chunks(1).collect();
        assert_eq!(events(&bytes), want);
    }

    #[test]
    fn an_unterminated_event_is_not_emitted() {
        assert_eq!(events(&[b"data: {\"usage\":"]), vec![]);
    }
}
