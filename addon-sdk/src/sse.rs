//! An incremental parser for Server-Sent Events (`text/event-stream`), the format
//! OpenAI-compatible APIs stream completions in.
//!
//! Feed it body chunks as they arrive ([`SseParser::feed`]); it returns each event as
//! soon as its terminating blank line is in, however the chunks cut the lines. It
//! follows the WHATWG parsing rules for the fields it keeps (`event`, `data`); `id`,
//! `retry` and comments are skipped.
//!
//! ```
//! use sockhost_addon_sdk::sse::SseParser;
//!
//! let mut parser = SseParser::new();
//! assert!(parser.feed(b"data: {\"a\"").unwrap().is_empty());
//! let events = parser.feed(b":1}\n\ndata: [DONE]\n\n").unwrap();
//! assert_eq!(events[0].data, "{\"a\":1}");
//! assert_eq!(events[1].data, "[DONE]");
//! ```

use std::fmt;

/// One event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// The `event:` field; `None` for the default type `message`.
    pub event: Option<String>,
    /// The `data:` lines, joined with `\n`.
    pub data: String,
}

/// Why a stream is not valid SSE.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SseError {
    /// A line is not UTF-8.
    NotUtf8,
    /// A line grew past the parser's limit without ending.
    LineTooLong(usize),
}

impl fmt::Display for SseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SseError::NotUtf8 => f.write_str("event stream is not UTF-8"),
            SseError::LineTooLong(limit) => write!(f, "event stream line longer than {limit} bytes"),
        }
    }
}

impl std::error::Error for SseError {}

/// The parser's state between chunks.
#[derive(Debug, Default)]
pub struct SseParser {
    line: Vec<u8>,
    after_cr: bool,
    event: Option<String>,
    data: Option<String>,
}

/// Longest line kept, so a stream without newlines cannot grow memory without bound.
pub const MAX_LINE_BYTES: usize = 1 << 20;

impl SseParser {
    /// A parser at the start of a stream.
    pub fn new() -> SseParser {
        SseParser::default()
    }

    /// Consumes the next chunk; returns the events it completed.
    pub fn feed(&mut self, chunk: &[u8]) -> Result<Vec<Event>, SseError> {
        let mut events = Vec::new();
        for &byte in chunk {
            // A line ends at \n, \r or \r\n.
            if self.after_cr {
                self.after_cr = false;
                if byte == b'\n' {
                    continue;
                }
            }
            match byte {
                b'\n' | b'\r' => {
                    self.after_cr = byte == b'\r';
                    let line = std::mem::take(&mut self.line);
                    let line = String::from_utf8(line).map_err(|_| SseError::NotUtf8)?;
                    if let Some(event) = self.line_done(&line) {
                        events.push(event);
                    }
                }
                _ => {
                    if self.line.len() >= MAX_LINE_BYTES {
                        return Err(SseError::LineTooLong(MAX_LINE_BYTES));
                    }
                    self.line.push(byte);
                }
            }
        }
        Ok(events)
    }

    /// Whether the stream stopped in the middle of an event (data not yet dispatched).
    pub fn has_partial_event(&self) -> bool {
        !self.line.is_empty() || self.data.is_some()
    }

    fn line_done(&mut self, line: &str) -> Option<Event> {
        if line.is_empty() {
            let data = self.data.take();
            let event = self.event.take();
            return data.map(|data| Event { event, data });
        }
        if line.starts_with(':') {
            return None;
        }
        let (field, value) = match line.split_once(':') {
            Some((field, value)) => (field, value.strip_prefix(' ').unwrap_or(value)),
            None => (line, ""),
        };
        match field {
            "data" => match &mut self.data {
                Some(data) => {
                    data.push('\n');
                    data.push_str(value);
                }
                None => self.data = Some(value.to_owned()),
            },
            "event" => self.event = Some(value.to_owned()),
            _ => {}
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all(chunks: &[&[u8]]) -> Vec<Event> {
        let mut parser = SseParser::new();
        chunks.iter().flat_map(|c| parser.feed(c).unwrap()).collect()
    }

    #[test]
    fn events_come_out_however_the_chunks_cut_them() {
        let stream =
            b"data: one\n\nevent: update\ndata: two\ndata: lines\n\n: comment\nid: 7\ndata:three\r\n\r\n";
        let whole = all(&[stream]);
        assert_eq!(
            whole,
            [
                Event { event: None, data: "one".into() },
                Event { event: Some("update".into()), data: "two\nlines".into() },
                Event { event: None, data: "three".into() },
            ]
        );
        for cut in 1..stream.len() {
            assert_eq!(all(&[&stream[..cut], &stream[cut..]]), whole, "cut at {cut}");
        }
        let bytewise: Vec<&[u8]> = stream.chunks(1).collect();
        assert_eq!(all(&bytewise), whole);
    }

    #[test]
    fn utf8_split_across_chunks_is_kept_whole() {
        let text = "data: 你好\n\n".as_bytes();
        assert_eq!(all(&[&text[..8], &text[8..]])[0].data, "你好");
    }

    #[test]
    fn an_unfinished_event_is_reported_as_partial() {
        let mut parser = SseParser::new();
        parser.feed(b"data: half").unwrap();
        assert!(parser.has_partial_event());
        parser.feed(b"\n\n").unwrap();
        assert!(!parser.has_partial_event());
    }

    #[test]
    fn bad_streams_are_errors() {
        assert_eq!(SseParser::new().feed(b"data: \xff\n"), Err(SseError::NotUtf8));
        let long = vec![b'a'; MAX_LINE_BYTES + 1];
        assert_eq!(SseParser::new().feed(&long), Err(SseError::LineTooLong(MAX_LINE_BYTES)));
    }
}
