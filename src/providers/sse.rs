//! A spec-compliant Server-Sent-Events decoder: bytes in, events out.
//! Handles `\n`, `\r\n` and `\r` line endings, comments, multi-line `data:` and
//! events split anywhere across network reads.

use bytes::{Buf, Bytes, BytesMut};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseEvent {
    pub event: Option<String>,
    pub data: Bytes,
}

#[derive(Debug, Default)]
pub struct SseDecoder {
    buf: BytesMut,
    data: Vec<u8>,
    has_data: bool,
    event: Option<String>,
}

impl SseDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The next complete event in the buffer, if any.
    pub fn next_event(&mut self) -> Option<SseEvent> {
        while let Some(line) = self.take_line(false) {
            if let Some(ev) = self.feed_line(&line) {
                return Some(ev);
            }
        }
        None
    }

    /// At end of input: any event still pending, even without its blank line.
    pub fn finish(&mut self) -> Option<SseEvent> {
        if let Some(ev) = self.next_event() {
            return Some(ev);
        }
        if let Some(line) = self.take_line(true) {
            if let Some(ev) = self.feed_line(&line) {
                return Some(ev);
            }
        }
        self.dispatch()
    }

    fn take_line(&mut self, at_eof: bool) -> Option<BytesMut> {
        let pos = self.buf.iter().position(|&b| b == b'\n' || b == b'\r');
        match pos {
            Some(i) => {
                let cr = self.buf[i] == b'\r';
                if cr && i + 1 == self.buf.len() && !at_eof {
                    // A lone `\r` at the end may be the first half of `\r\n`: wait.
                    return None;
                }
                let line = self.buf.split_to(i);
                let skip = if cr && self.buf.len() > 1 && self.buf[1] == b'\n' {
                    2
                } else {
                    1
                };
                self.buf.advance(skip);
                Some(line)
            }
            None if at_eof && !self.buf.is_empty() => Some(self.buf.split()),
            None => None,
        }
    }

    fn feed_line(&mut self, line: &[u8]) -> Option<SseEvent> {
        if line.is_empty() {
            return self.dispatch();
        }
        if line[0] == b':' {
            return None;
        }
        let (field, value) = match line.iter().position(|&b| b == b':') {
            Some(i) => {
                let v = &line[i + 1..];
                (&line[..i], v.strip_prefix(b" ").unwrap_or(v))
            }
            None => (line, &b""[..]),
        };
        match field {
            b"data" => {
                if self.has_data {
                    self.data.push(b'\n');
                }
                self.data.extend_from_slice(value);
                self.has_data = true;
            }
            b"event" => self.event = Some(String::from_utf8_lossy(value).into_owned()),
            _ => {}
        }
        None
    }

    fn dispatch(&mut self) -> Option<SseEvent> {
        let event = self.event.take();
        if !self.has_data {
            return None;
        }
        self.has_data = false;
        Some(SseEvent {
            event,
            data: Bytes::from(std::mem::take(&mut self.data)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all(input: &[&[u8]]) -> Vec<SseEvent> {
        let mut d = SseDecoder::new();
        let mut out = vec![];
        for part in input {
            d.push(part);
            while let Some(e) = d.next_event() {
                out.push(e);
            }
        }
        while let Some(e) = d.finish() {
            out.push(e);
        }
        out
    }

    #[test]
    fn splits_anywhere_and_handles_line_endings() {
        let whole = b"data: {\"a\":1}\n\n: keep-alive\n\nevent: ping\r\ndata: x\r\ndata: y\r\n\r\ndata: [DONE]\r\r";
        let expected = all(&[whole]);
        assert_eq!(expected.len(), 3);
        assert_eq!(&expected[0].data[..], b"{\"a\":1}");
        assert_eq!(expected[1].event.as_deref(), Some("ping"));
        assert_eq!(&expected[1].data[..], b"x\ny");
        assert_eq!(&expected[2].data[..], b"[DONE]");
        for cut in 1..whole.len() {
            assert_eq!(
                all(&[&whole[..cut], &whole[cut..]]),
                expected,
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn pending_event_at_eof() {
        let evs = all(&[b"data: tail"]);
        assert_eq!(evs.len(), 1);
        assert_eq!(&evs[0].data[..], b"tail");
    }
}
